"""Contrastive losses as pure functions over global arrays (docs/method.md, the loss).

Each loss is written once, on per-example statistics of its logits matrix (log-sum-exps, the
matching pair's logit, top-1 hits). `impl="global"` computes them from the whole matrix, and XLA
inserts the gathers when the batch is sharded; `impl="ring"` computes the same statistics
blockwise around the mesh (ring.py) in memory that does not grow with the global batch.
All math is float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from smartclip_jax import config as config_lib, ring

Metrics = dict[str, jax.Array]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def masked_similarity(img_emb: jax.Array, txt_emb: jax.Array, masks: jax.Array) -> jax.Array:
  """S[i, j] = <z_i * m_j, t_j> / ||z_i * m_j||, as [N, M], in O(N·M) memory.

  img_emb [N, D] unnormalised, txt_emb [M, D] (normalised here), masks [M, D]. Factorised as
  Z @ (M*T)^T over sqrt((Z*Z) @ (M*M)^T), never forming N×M×D. Where z_i * m_j is all zero the
  numerator is zero too; S is defined as 0 there, with zero (finite) gradients.
  """
  z = img_emb.astype(jnp.float32)
  t = l2_normalize(txt_emb.astype(jnp.float32))
  m = masks.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  numerator = jnp.matmul(z, (m * t).T, precision=hp)
  norm_sq = jnp.matmul(z * z, (m * m).T, precision=hp)
  nonzero = norm_sq != 0  # not `> 0`: a NaN must reach the loss, not become similarity 0
  return jnp.where(nonzero, numerator * jax.lax.rsqrt(jnp.where(nonzero, norm_sq, 1.0)), 0.0)


def _top1(logits: jax.Array) -> Metrics:
  """Whether the matching pair is the first maximum of its row (image) and column (caption)."""
  labels = jnp.arange(logits.shape[0])
  return {
    "i2t_correct": jnp.argmax(logits, axis=1) == labels,
    "t2i_correct": jnp.argmax(logits, axis=0) == labels,
  }


def softmax_stats(logits: jax.Array) -> Metrics:
  """Per example of a square logits matrix: row (image -> text) and column log-sum-exps, the
  matching pair's logit, and whether it is the top-1 (first maximum) of its row / column."""
  return {
    "row_lse": jax.nn.logsumexp(logits, axis=1),
    "col_lse": jax.nn.logsumexp(logits, axis=0),
    "diag": jnp.diagonal(logits),
    **_top1(logits),
  }


def sigmoid_stats(logits: jax.Array) -> Metrics:
  """Per image, SigLIP's loss summed over every caption (positive on the diagonal); top-1 hits."""
  signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  return {"row_loss": -jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1), **_top1(logits)}


def cross_entropies(stats: Metrics) -> tuple[jax.Array, jax.Array]:
  """Mean CE of rows (image -> text) and of columns (text -> image) from `softmax_stats`."""
  return (jnp.mean(stats["row_lse"] - stats["diag"]), jnp.mean(stats["col_lse"] - stats["diag"]))


def _stats(fn, img: jax.Array, txt, theta, *, sigmoid: bool, impl: str) -> Metrics:
  """The statistics of logits fn(img, txt, theta) over the global batch: from the full matrix
  (`global`), or blockwise around the mesh's batch axes (`ring`, see ring.py)."""
  if img.shape[0] != jax.tree.leaves(txt)[0].shape[0]:
    raise ValueError(
      f"contrastive losses pair images and captions one to one, got "
      f"{img.shape[0]} images and {jax.tree.leaves(txt)[0].shape[0]} captions"
    )
  if impl == "ring":
    return (ring.sigmoid_stats if sigmoid else ring.softmax_stats)(fn, img, txt, theta)
  if impl != "global":
    raise ValueError(f"loss impl {impl!r}: choose global or ring")
  logits = fn(img, txt, theta)
  return sigmoid_stats(logits) if sigmoid else softmax_stats(logits)


def mask_sparsity(masks: jax.Array) -> jax.Array:
  """mean(|m|), with the gradient PyTorch gives it: sign(m) / size, which is 0 where m = 0.

  The reference's sparsity term (docs/method.md, the loss): on a hard straight-through mask it
  pushes only the entries that are on, and an off entry gets alignment gradient alone. (The
  plain mean(m) has the same value but pushes every off entry further down.) JAX's own `abs`
  has gradient 1 at 0, hence the explicit sign.
  """
  m = masks.astype(jnp.float32)
  return jnp.mean(m * jax.lax.stop_gradient(jnp.sign(m)))


MASK_ON = 0.5  # a mask entry at or above this counts as on (hard masks are exactly 0 or 1)
JACCARD_ROWS = 1024  # captions of a step's batch (every k-th) its mean Jaccard is taken over
MASK_DIMS = ("mask_dim_min", "mask_dim_max")  # per-dimension [D] flags, reduced by `mask_window`


def mask_jaccard(masks: jax.Array) -> jax.Array:
  """[N, N] Jaccard overlaps |a & b| / |a | b| of the masks' sets of on dimensions (entries
  >= MASK_ON), 1 where both masks are empty; two matmul-sized terms, never N x N x D."""
  on = (jax.lax.stop_gradient(masks) >= MASK_ON).astype(jnp.float32)
  both = jnp.matmul(on, on.T)  # 0/1 entries: exact at any matmul precision
  size = jnp.sum(on, axis=-1)
  union = size[:, None] + size[None, :] - both
  return jnp.where(union > 0, both / jnp.maximum(union, 1.0), 1.0)


def mean_pairwise(matrix: jax.Array) -> jax.Array:
  """The mean of a square matrix's entries above the diagonal (pairs i < j); 1 with no pair."""
  n = matrix.shape[0]
  if n < 2:
    return jnp.ones((), jnp.float32)
  return jnp.sum(jnp.triu(matrix, 1)) / (n * (n - 1) / 2)


def mask_diagnostics(masks: jax.Array) -> Metrics:
  """Whether the masks collapsed (docs/training.md, mask diagnostics), from masks [B, D]:
  `mask_jaccard`, the mean pairwise Jaccard of the batch's masks (over at most JACCARD_ROWS of
  them, every k-th, so that memory stays bounded under `impl="ring"`); and per dimension,
  whether it is on in every mask (`mask_dim_min`) and in any mask (`mask_dim_max`), as float
  0/1 vectors [D] that the trainer reduces over each log window (`mask_window`)."""
  on = (jax.lax.stop_gradient(masks) >= MASK_ON).astype(jnp.float32)
  sample = masks[:: -(-masks.shape[0] // JACCARD_ROWS)]
  return {
    "mask_jaccard": mean_pairwise(mask_jaccard(sample)),
    "mask_dim_min": jnp.min(on, axis=0),
    "mask_dim_max": jnp.max(on, axis=0),
  }


def mask_window(steps: Sequence[Metrics]) -> dict[str, float]:
  """`mask_always_on` / `mask_never_on`: how many dimensions were on in every mask / in no mask
  of `steps` (the MASK_DIMS of each step's `mask_diagnostics`, on the host); {} for none."""
  if not steps:
    return {}
  dim_min = np.min([np.asarray(s["mask_dim_min"]) for s in steps], axis=0)
  dim_max = np.max([np.asarray(s["mask_dim_max"]) for s in steps], axis=0)
  return {
    "mask_always_on": float(np.sum(dim_min == 1)),
    "mask_never_on": float(np.sum(dim_max == 0)),
  }


def _hits(stats: Metrics) -> Metrics:
  return {"i2t_top1": jnp.mean(stats["i2t_correct"]), "t2i_top1": jnp.mean(stats["t2i_correct"])}


def smartclip_loss(
  img_emb: jax.Array,
  txt_emb: jax.Array,
  masks: jax.Array,
  *,
  temperature: float = 0.01,
  align_weight: float = 10.0,
  sparsity_weight: float = 2.0,
  modular: bool = True,
  impl: str = "global",
) -> tuple[jax.Array, Metrics]:
  """align_weight * (CE rows + CE columns) of S / temperature + sparsity_weight * mean|mask|
  (`mask_sparsity`, the reference's gradient). The metrics add `mask_diagnostics`.

  `modular=False` is the ablation without the modular alignment: image i is masked by its own
  caption's mask m_i and compared with every caption, S_ij = cos(z_i * m_i, t_j), a plain
  contrastive loss between masked images and texts.
  """
  if modular:
    logits = lambda z, text, _: masked_similarity(z, *text) / temperature
    stats = _stats(logits, img_emb, (txt_emb, masks), (), sigmoid=False, impl=impl)
  else:
    logits = lambda z, t, _: _cosines(z, t) / temperature
    stats = _stats(logits, img_emb * masks, txt_emb, (), sigmoid=False, impl=impl)
  ce_rows, ce_cols = cross_entropies(stats)
  active = jnp.sum(masks.astype(jnp.float32), axis=-1)
  density = mask_sparsity(masks)
  loss = align_weight * (ce_rows + ce_cols) + sparsity_weight * density
  return loss, {
    "loss": loss,
    "ce_i2t": ce_rows,
    "ce_t2i": ce_cols,
    "mask_density": density,
    "mask_active_mean": jnp.mean(active),
    "mask_active_min": jnp.min(active),
    "mask_active_max": jnp.max(active),
    **mask_diagnostics(masks),
    **_hits(stats),
  }


def _cosines(img_emb: jax.Array, txt_emb: jax.Array) -> jax.Array:
  return jnp.matmul(
    l2_normalize(img_emb.astype(jnp.float32)),
    l2_normalize(txt_emb.astype(jnp.float32)).T,
    precision=jax.lax.Precision.HIGHEST,
  )


def _clip_scale(logit_scale: jax.Array) -> jax.Array:
  return jnp.minimum(jnp.exp(logit_scale), 100.0)


def clip_loss(
  img_emb: jax.Array, txt_emb: jax.Array, logit_scale: jax.Array, *, impl: str = "global"
) -> tuple[jax.Array, Metrics]:
  """CLIP's symmetric InfoNCE; `logit_scale` is the log of the scale, capped at 100 as CLIP does
  (a fixed temperature τ is a constant logit_scale of log(1/τ))."""
  logits = lambda img, txt, ls: _clip_scale(ls) * _cosines(img, txt)
  stats = _stats(logits, img_emb, txt_emb, logit_scale, sigmoid=False, impl=impl)
  ce_rows, ce_cols = cross_entropies(stats)
  loss = 0.5 * (ce_rows + ce_cols)
  return loss, {
    "loss": loss,
    "ce_i2t": ce_rows,
    "ce_t2i": ce_cols,
    "temperature": 1 / _clip_scale(logit_scale),
    **_hits(stats),
  }


def siglip_loss(
  img_emb: jax.Array,
  txt_emb: jax.Array,
  logit_scale: jax.Array,
  logit_bias: jax.Array,
  *,
  impl: str = "global",
) -> tuple[jax.Array, Metrics]:
  """SigLIP's pairwise sigmoid loss, summed over texts and averaged over images."""
  logits = lambda img, txt, sb: jnp.exp(sb[0]) * _cosines(img, txt) + sb[1]
  stats = _stats(logits, img_emb, txt_emb, (logit_scale, logit_bias), sigmoid=True, impl=impl)
  loss = jnp.mean(stats["row_loss"])
  return loss, {
    "loss": loss,
    "temperature": jnp.exp(-logit_scale),
    "bias": logit_bias,
    **_hits(stats),
  }


LossFn = Callable[[dict[str, jax.Array]], tuple[jax.Array, Metrics]]


def subset_mask(config: ml_collections.ConfigDict) -> jax.Array | None:
  """`clip.subset_dims` image dimensions, chosen at random by the seed, as a 0/1 mask [D]: the
  cosine of the kept part of the image embedding with the whole text embedding is SmartCLIP's
  similarity under one mask for every caption. None when the option is off (0)."""
  k, dims = config.clip.subset_dims, config.model.embed_dim
  if not k:
    return None
  if k > dims:
    raise config_lib.ConfigError(f"clip.subset_dims={k} exceeds model.embed_dim={dims}")
  chosen = np.random.default_rng(config.seed).choice(dims, k, replace=False)
  return jnp.zeros(dims, jnp.float32).at[chosen].set(1.0)


def make(config: ml_collections.ConfigDict) -> LossFn:
  """`config.loss` over the model's outputs (`TwoTowers.__call__`): embeddings, masks, scale and
  bias. The model is described by `config.model`; a loss that needs a part the model lacks, or
  leaves one it has untrained, is a ConfigError (`config.set_loss` sets both together)."""
  loss, m, impl = config.loss, config.model, config.loss_impl
  wants = config_lib.LOSS_MODELS[loss]
  if config.clip.subset_dims and loss != "clip":
    raise config_lib.ConfigError(f"clip.subset_dims is an option of loss=clip, not loss={loss}")
  if bool(m.mask_net) != wants["mask_net"]:
    raise config_lib.ConfigError(
      f"loss={loss} with model.mask_net={m.mask_net}: the SmartCLIP loss needs the mask "
      f"network and the others do not train it; set --config.model.mask_net="
      f"{str(wants['mask_net']).lower()} (config.set_loss sets the loss and model together)"
    )
  if (m.logit_bias_init is None) != (wants["logit_bias_init"] is None):
    raise config_lib.ConfigError(
      f"loss={loss} with model.logit_bias_init={m.logit_bias_init}: SigLIP needs a logit bias "
      f"and the other losses have none; set --config.model.logit_bias_init="
      f"{wants['logit_bias_init']} (config.set_loss sets the loss and model together)"
    )
  if loss == "smartclip":
    s = config.smartclip
    return lambda out: smartclip_loss(
      out["img_emb"],
      out["txt_emb"],
      out["masks"],
      temperature=s.temperature,
      align_weight=s.align_weight,
      sparsity_weight=s.sparsity_weight,
      modular=s.modular,
      impl=impl,
    )
  if loss == "clip":
    fixed, keep = config.clip.temperature, subset_mask(config)

    def clip(out: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
      scale = out["logit_scale"]
      if fixed > 0:  # a fixed temperature: the learned scale gets no gradient
        scale = jnp.full_like(scale, -math.log(fixed))
      img = out["img_emb"] if keep is None else out["img_emb"] * keep
      return clip_loss(img, out["txt_emb"], scale, impl=impl)

    return clip
  return lambda out: siglip_loss(
    out["img_emb"], out["txt_emb"], out["logit_scale"], out["logit_bias"], impl=impl
  )
