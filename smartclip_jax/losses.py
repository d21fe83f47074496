"""Contrastive losses as pure functions over global arrays (SMARTCLIP.md §3).

Called under jit with the batch sharded over the mesh, XLA inserts the gathers; nothing here
knows about devices. All math is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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


def _cross_entropies(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean CE of rows (image -> text) and of columns (text -> image), targets on the diagonal."""
  n = logits.shape[0]
  if logits.shape != (n, n):
    raise ValueError(f"contrastive logits must be square, got {logits.shape}")
  labels = jnp.arange(n)
  rows = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  cols = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return rows, cols


def _accuracies(logits: jax.Array) -> Metrics:
  labels = jnp.arange(logits.shape[0])
  return {"i2t_top1": jnp.mean(jnp.argmax(logits, axis=1) == labels),
          "t2i_top1": jnp.mean(jnp.argmax(logits, axis=0) == labels)}


def smartclip_loss(img_emb: jax.Array, txt_emb: jax.Array, masks: jax.Array, *,
                   temperature: float = 0.01, align_weight: float = 10.0,
                   sparsity_weight: float = 2.0) -> tuple[jax.Array, Metrics]:
  """align_weight * (CE rows + CE columns) of S / temperature + sparsity_weight * mean(mask)."""
  logits = masked_similarity(img_emb, txt_emb, masks) / temperature
  ce_rows, ce_cols = _cross_entropies(logits)
  active = jnp.sum(masks.astype(jnp.float32), axis=-1)
  density = jnp.mean(masks.astype(jnp.float32))
  loss = align_weight * (ce_rows + ce_cols) + sparsity_weight * density
  return loss, {"loss": loss, "ce_i2t": ce_rows, "ce_t2i": ce_cols, "mask_density": density,
                "mask_active_mean": jnp.mean(active), "mask_active_min": jnp.min(active),
                "mask_active_max": jnp.max(active), **_accuracies(logits)}


def clip_loss(img_emb: jax.Array, txt_emb: jax.Array,
              logit_scale: jax.Array) -> tuple[jax.Array, Metrics]:
  """CLIP's symmetric InfoNCE; `logit_scale` is the log of the scale, capped at 100 as CLIP does."""
  scale = jnp.minimum(jnp.exp(logit_scale), 100.0)
  logits = scale * jnp.matmul(l2_normalize(img_emb.astype(jnp.float32)),
                              l2_normalize(txt_emb.astype(jnp.float32)).T,
                              precision=jax.lax.Precision.HIGHEST)
  ce_rows, ce_cols = _cross_entropies(logits)
  loss = 0.5 * (ce_rows + ce_cols)
  return loss, {"loss": loss, "ce_i2t": ce_rows, "ce_t2i": ce_cols, "temperature": 1 / scale,
                **_accuracies(logits)}


def siglip_loss(img_emb: jax.Array, txt_emb: jax.Array, logit_scale: jax.Array,
                logit_bias: jax.Array) -> tuple[jax.Array, Metrics]:
  """SigLIP's pairwise sigmoid loss, summed over texts and averaged over images."""
  logits = jnp.exp(logit_scale) * jnp.matmul(
      l2_normalize(img_emb.astype(jnp.float32)), l2_normalize(txt_emb.astype(jnp.float32)).T,
      precision=jax.lax.Precision.HIGHEST) + logit_bias
  signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
  loss = -jnp.mean(jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1))
  return loss, {"loss": loss, "temperature": jnp.exp(-logit_scale), "bias": logit_bias,
                **_accuracies(logits)}
