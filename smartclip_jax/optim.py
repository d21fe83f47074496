"""Optimizer: AdamW over parameter groups chosen by regex, as the reference trains by default
(docs/method.md, the recipe; docs/training.md, parameter groups).

Every parameter is named by its '/'-joined path (`visual/...`, `text/...`, `mask_net/...`,
`logit_scale`). Tables of (regex, value) in `config.optim` give each parameter, by the first
entry whose regex matches the whole path: its schedule (`optim.groups`: the recipe's two
groups, the mask network on its own and the towers), a learning-rate and a weight-decay
multiplier (`optim.lr_mults`, `optim.wd_mults`), whether it trains at all (`optim.frozen`; LiT
is `visual/.*`) and how many leading rows stay as they are (the text position table's first
`optim.frozen_positions` rows, Long-CLIP's frozen positions).

Weight decay applies to every parameter of a group (`optim.decay=all`, the reference's
`torch.optim.AdamW` over all parameters) or to matrices only (`matrices`, open_clip's choice:
gains, biases, the class token and the logit scale are not decayed). Frozen parameters get no
optimizer state; the train step takes no gradient for them (`stop_frozen`) and keeps them
bit for bit (`keep_frozen`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from smartclip_jax.config import OPTIM_GROUPS, ConfigError
from smartclip_jax.models.layers import SCANNED

TOWER_GROUP, MASK_GROUP = OPTIM_GROUPS
FROZEN = "frozen"
POSITIONS = "text/positional_embedding"  # the table whose first rows `frozen_positions` keeps


@dataclasses.dataclass(frozen=True)
class Setting:
  """How one parameter trains: its schedule's group (or FROZEN), multipliers, kept rows."""

  group: str
  lr_mult: float = 1.0
  wd_mult: float = 1.0
  rows: int = 0

  @property
  def label(self) -> str:
    """The optimizer group's name: the schedule's alone unless a multiplier differs from 1
    (so the recipe's optimizer state keeps its two groups' names)."""
    if self.group == FROZEN or (self.lr_mult, self.wd_mult) == (1.0, 1.0):
      return self.group
    return f"{self.group} lr*{self.lr_mult:g} wd*{self.wd_mult:g}"


def tables(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[str, Any], ...]]:
  """The config's (regex, value) tables by field name, the recipe's entries included."""
  o = config.optim
  return {
    "optim.frozen": ((o.frozen, True),) if o.frozen else (),
    "optim.groups": tuple(tuple(e) for e in o.groups),
    "optim.lr_mults": tuple(tuple(e) for e in o.lr_mults),
    "optim.wd_mults": tuple(tuple(e) for e in o.wd_mults),
    "optim.frozen_positions": ((POSITIONS, o.frozen_positions),) if o.frozen_positions else (),
  }


def _first(table: tuple[tuple[str, Any], ...], name: str, default: Any) -> Any:
  return next((value for pattern, value in table if re.fullmatch(pattern, name)), default)


def settings(params: Any, config: ml_collections.ConfigDict) -> dict[tuple, Setting]:
  """Each parameter's Setting by its flattened key. An entry of `optim.frozen`, `lr_mults` or
  `wd_mults` that matches no parameter, a parameter without a group, or nothing left to train
  is a ConfigError (a typo in a regex would otherwise train the model the wrong way without a
  word). `optim.groups` may name what a model lacks (a CLIP model has no `mask_net/`).
  Computed once per tree structure and tables (the step's transforms each ask at trace time)."""
  return _settings(tuple(traverse_util.flatten_dict(params)), tuple(tables(config).items()))


@functools.lru_cache(maxsize=32)
def _settings(keys: tuple[tuple, ...], items: tuple) -> dict[tuple, Setting]:
  names, t = {k: "/".join(k) for k in keys}, dict(items)
  for field, table in t.items():
    for pattern, _ in table if field != "optim.groups" else ():
      if not any(re.fullmatch(pattern, n) for n in names.values()):
        tops = sorted({n.split("/")[0] + ("/" if "/" in n else "") for n in names.values()})
        raise ConfigError(
          f"{field}: {pattern!r} matches no parameter path (they begin {', '.join(tops)}; "
          "the regex must match a whole path, e.g. 'visual/.*')"
        )
  groups = {
    k: FROZEN if _first(t["optim.frozen"], n, False) else _first(t["optim.groups"], n, None)
    for k, n in names.items()
  }
  missing = sorted(names[k] for k, g in groups.items() if g is None)
  if missing:
    raise ConfigError(
      f"optim.groups gives {len(missing)} parameters no group ({', '.join(missing[:3])}"
      f"{', ...' if len(missing) > 3 else ''}): end it with ('.*', 'towers')"
    )
  out = {
    k: Setting(
      groups[k],
      float(_first(t["optim.lr_mults"], n, 1.0)),
      float(_first(t["optim.wd_mults"], n, 1.0)),
      int(_first(t["optim.frozen_positions"], n, 0)),
    )
    for k, n in names.items()
  }
  if all(s.group == FROZEN for s in out.values()):
    raise ConfigError(f"optim.frozen={t['optim.frozen'][0][0]!r} freezes every parameter")
  return out


def _tree(params: Any, config: ml_collections.ConfigDict, field: str) -> Any:
  """A tree shaped like `params` holding one field of each parameter's Setting."""
  chosen = settings(params, config)
  return traverse_util.unflatten_dict({k: getattr(s, field) for k, s in chosen.items()})


def labels(params: Any, config: ml_collections.ConfigDict) -> Any:
  """A tree of optimizer-group labels, shaped like `params`."""
  return _tree(params, config, "label")


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


def keep_rows(rows_of: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Zeroes the update of each parameter's first `rows` rows (`rows_of(updates)`, a tree)."""

  def cut(u: jax.Array, rows: int) -> jax.Array:
    if rows <= 0:
      return u
    keep = (jnp.arange(u.shape[0]) >= rows).reshape(-1, *[1] * (u.ndim - 1))
    return jnp.where(keep, u, 0.0).astype(u.dtype)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(cut, updates, rows_of(updates)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _multipliers(table: tuple[tuple[str, Any], ...]) -> list[float]:
  return sorted({1.0, *(float(v) for _, v in table)})


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip -> AdamW per group label (a schedule's group and its multipliers; frozen: nothing,
  no state) -> kept rows. Only labels the config can give exist, so the recipe's state has
  its two groups and no more."""
  o, lrs, t = config.optim, schedules(config), tables(config)
  decay = {TOWER_GROUP: o.towers.weight_decay, MASK_GROUP: o.mask_net.weight_decay}
  groups = {}
  for group, lr_mult, wd_mult in itertools.product(
    sorted({g for _, g in t["optim.groups"]}),
    _multipliers(t["optim.lr_mults"]),
    _multipliers(t["optim.wd_mults"]),
  ):
    lr = lrs[group] if lr_mult == 1.0 else (lambda s, f=lrs[group], m=lr_mult: m * f(s))
    groups[Setting(group, lr_mult, wd_mult).label] = optax.adamw(
      lr,
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=decay[group] * wd_mult,
      mask=_decay_mask(o.decay),
    )
  if o.frozen:
    groups[FROZEN] = optax.set_to_zero()
  chain = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
  chain += [
    optax.multi_transform(groups, lambda params: labels(params, config)),
    keep_rows(lambda updates: _tree(updates, config, "rows")),
  ]
  return optax.chain(*chain)


def _frozen_keys(params: Any, config: ml_collections.ConfigDict) -> set[tuple]:
  if not config.optim.frozen:
    return set()
  return {k for k, s in settings(params, config).items() if s.group == FROZEN}


def frozen_towers(params: Any, config: ml_collections.ConfigDict) -> set[str]:
  """Top-level parameter names (`visual`, `text`, ...) whose parameters are all frozen."""
  chosen = settings(params, config)
  tops = {k[0] for k in chosen}
  return {t for t in tops if all(s.group == FROZEN for k, s in chosen.items() if k[0] == t)}


def stop_frozen(params: Any, config: ml_collections.ConfigDict) -> Any:
  """`params` with the frozen ones behind `stop_gradient`: JAX then computes no gradient for
  them, and no backward pass at all through a tower that is frozen whole (LiT)."""
  frozen = _frozen_keys(params, config)
  if not frozen:
    return params
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
    {k: jax.lax.stop_gradient(v) if k in frozen else v for k, v in flat.items()}
  )


def keep_frozen(new: Any, old: Any, config: ml_collections.ConfigDict) -> Any:
  """`new` with the frozen parameters taken from `old`, bit for bit (adding a zero update
  would turn -0.0 into 0.0)."""
  frozen = _frozen_keys(old, config)
  if not frozen:
    return new
  flat_new, flat_old = traverse_util.flatten_dict(new), traverse_util.flatten_dict(old)
  return traverse_util.unflatten_dict(
    {k: flat_old[k] if k in frozen else v for k, v in flat_new.items()}
  )
