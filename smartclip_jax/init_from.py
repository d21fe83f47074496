"""Parameters from another model poured into a tree of the target's shapes and shardings: the
one way weights get in, for `config.init_from` and for `smartclip_jax.load`.

Whatever the source (an Orbax workdir or checkpoint of ours, a PyTorch file, a transformers
directory), the rule is one: the leaves it has go into the target's leaves and shardings, the
others keep their fresh values (e.g. a mask network added for fine-tuning), and the caller is
told which stayed fresh and which of the source's went unused.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from smartclip_jax import checkpoint, config as config_lib, step as step_lib
from smartclip_jax.interop import layout, torch_files

log = logging.getLogger("smartclip_jax")

Filled = tuple[Any, list[str], list[str]]  # (params, names kept fresh, source names not used)


def initial_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  shardings: step_lib.TrainState,
) -> step_lib.TrainState:
  """A fresh train state, with parameters from `config.init_from` when it names a model."""
  state = step_lib.init_state(model, tx, config, mesh, shardings)
  if config.init_from in ("", config_lib.INIT_SCRATCH):
    return state
  try:  # AdamW's initial moments do not depend on the parameters' values.
    params = fill(config.init_from, state.params, config.model.activation)
  except (ValueError, KeyError, checkpoint.CheckpointError) as e:  # weights that do not fit
    raise config_lib.ConfigError(f"init_from={config.init_from}: {e}") from e
  return state.replace(params=params)


def fill(path: str | pathlib.Path, target: Any, activation: str | None = None) -> Any:
  """`load_params`'s parameters, with a log line of what stayed fresh and what went unused."""
  params, fresh, unused = load_params(path, target, activation)
  log.info(
    "parameters from %s; kept at initialisation: %s; not used from there: %s",
    path,
    describe(fresh),
    describe(unused),
  )
  return params


def load_params(path: str | pathlib.Path, target: Any, activation: str | None = None) -> Filled:
  """`target` (a tree of sharded arrays) filled from the model at `path`. `activation`: the
  target's (the run's model.activation); a PyTorch model whose model config states another is
  an error (`torch_files.read`)."""
  if torch_files.is_torch_path(path):
    return from_state(torch_files.read(path, activation)[0], target)
  return from_orbax(path, target)


def from_state(state: dict[str, np.ndarray], target: Any) -> Filled:
  """From the tensors of a PyTorch file or transformers directory in the OpenAI layout
  (`torch_files.read`; e.g. OpenAI CLIP, whose lack of a mask network leaves ours fresh).
  `target`'s leaves may be arrays or ShapeDtypeStructs: only their shapes, dtypes and
  shardings are read."""
  found = layout.flatten(layout.from_openai(state, target))
  flat = layout.flatten(target)
  params = layout.unflatten(
    {
      n: jax.device_put(np.asarray(found[n], x.dtype), x.sharding) if n in found else x
      for n, x in flat.items()
    }
  )
  return params, sorted(set(flat) - set(found)), layout.unused_keys(state, target)


def from_orbax(path: str | pathlib.Path, target: Any) -> Filled:
  """From another run's checkpoint (its parameters only: no optimizer state, no step), read
  straight into the target's shardings. A position table with another number of rows is resized
  as `layout.from_openai` resizes it (text: Long-CLIP's stretch; image: resampled to this run's
  patch grid, for fine-tuning at another resolution)."""
  state_dir = checkpoint.resolve_step_dir(path) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(state_dir).item_metadata.tree["params"]
  saved_flat, target_flat = layout.flatten(saved), layout.flatten(target)
  if layout.has_stacks(saved_flat) != layout.has_stacks(target_flat):
    raise checkpoint.CheckpointError(
      f"init_from {path}: saved with model.scan_layers={layout.has_stacks(saved_flat)}, "
      f"this run has {layout.has_stacks(target_flat)}; set it the same (a PyTorch export, "
      "`python -m smartclip_jax.convert`, loads into either)"
    )

  def want(name: str, like: jax.Array) -> jax.ShapeDtypeStruct:
    shape = tuple(saved_flat[name].shape)
    if shape != like.shape and (name not in layout.RESIZED or shape[1:] != like.shape[1:]):
      raise checkpoint.CheckpointError(
        f"init_from {path}: {name} has shape {shape} there and {like.shape} here"
      )
    sh = like.sharding
    if shape != like.shape and isinstance(sh, jax.sharding.NamedSharding):  # read whole, resized
      sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(shape, like.dtype, sharding=sh)

  wanted = {n: want(n, x) for n, x in target_flat.items() if n in saved_flat}
  item = {"params": layout.unflatten(wanted)}
  restored = checkpointer.restore(
    state_dir,
    args=ocp.args.PyTreeRestore(
      item=item,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True,
    ),
  )["params"]
  loaded = layout.flatten(restored)

  def pick(name: str, fresh: jax.Array) -> jax.Array:
    if name not in loaded:
      return fresh
    value = loaded[name]
    if value.shape != fresh.shape:  # a position table: 77 -> 248, a 14x14 grid -> 16x16, ...
      value = jax.device_put(layout.RESIZED[name](value, fresh.shape[0]), fresh.sharding)
    return value

  params = layout.unflatten({n: pick(n, x) for n, x in target_flat.items()})
  fresh = sorted(set(target_flat) - set(saved_flat))
  unused = sorted(set(saved_flat) - set(target_flat))
  return params, fresh, unused


def describe(values: list[str], limit: int = 6) -> str:
  """A short list for log lines: the first few names and how many more."""
  more = f" and {len(values) - limit} more" if len(values) > limit else ""
  return ", ".join(values[:limit]) + more if values else "none"
