"""Optimizer: two AdamW groups (towers, mask net) with their own schedules, as the reference
trains (docs/method.md, the recipe).

Weight decay applies to every parameter of a group (`optim.decay=all`, the reference's
`torch.optim.AdamW` over all parameters) or to matrices only (`matrices`, open_clip's choice:
gains, biases, the class token and the logit scale are not decayed). The first
`frozen_positions` rows of the text position table get no update at all (Long-CLIP keeps CLIP's
first 20 positions as trained).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from smartclip_jax.models.layers import SCANNED

MASK_GROUP, TOWER_GROUP = "mask_net", "towers"


def param_groups(params: Any) -> Any:
  """A tree of group labels: the mask network's parameters vs everything else."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
    {k: MASK_GROUP if k[0] == MASK_GROUP else TOWER_GROUP for k in flat}
  )


def warmup_cosine(lr: float, warmup: int, steps: int, end_ratio: float = 0.0) -> optax.Schedule:
  """The reference's schedule: lr (step + 1) / warmup for the first `warmup` steps (so the
  first step already moves, at lr / warmup), then a cosine from lr at step `warmup` down to
  lr * end_ratio at step `steps`. warmup = 0 is a cosine from the first step."""
  end = lr * end_ratio

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    ramp = lr * (step + 1) / max(warmup, 1)
    frac = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
    cosine = end + (lr - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup, ramp, cosine)

  return schedule


def schedules(config: ml_collections.ConfigDict) -> dict[str, optax.Schedule]:
  """Learning rate per group: towers warm up then cosine; mask net cosine from the start."""
  o, steps = config.optim, config.total_steps
  return {
    TOWER_GROUP: warmup_cosine(
      o.towers.lr, min(o.towers.warmup_steps, steps), steps, o.end_lr_ratio
    ),
    MASK_GROUP: warmup_cosine(o.mask_net.lr, 0, steps, o.end_lr_ratio),
  }


def _decay_mask(decay: str) -> Any:
  """`all`: every parameter; `matrices`: ndim >= 2, a scanned stack's layer axis not counted."""

  def per_layer_ndim(path, p) -> int:
    return p.ndim - any(getattr(k, "key", None) == SCANNED for k in path)

  def mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
      lambda path, p: decay == "all" or per_layer_ndim(path, p) >= 2, params
    )

  return mask


def freeze_rows(rows: int) -> optax.GradientTransformation:
  """Zeroes the update of the first `rows` rows of the text position table."""

  def update(updates, state, params=None):
    del params
    if rows <= 0 or "text" not in updates:
      return updates, state
    text = dict(updates["text"])
    pos = text["positional_embedding"]
    keep = (jnp.arange(pos.shape[0]) >= rows)[:, None]
    text["positional_embedding"] = jnp.where(keep, pos, 0.0).astype(pos.dtype)
    return {**updates, "text": text}, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip -> per-group AdamW -> frozen position rows."""
  o, lrs = config.optim, schedules(config)
  decay = {TOWER_GROUP: o.towers.weight_decay, MASK_GROUP: o.mask_net.weight_decay}
  groups = {
    group: optax.adamw(
      lrs[group], b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=decay[group], mask=_decay_mask(o.decay)
    )
    for group in (TOWER_GROUP, MASK_GROUP)
  }
  chain = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
  chain += [optax.multi_transform(groups, param_groups), freeze_rows(o.frozen_positions)]
  return optax.chain(*chain)
