"""The one place for the device mesh and the logical-axis rules that map arrays onto it.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `tensor` (heads / MLP hidden split). The batch is split over data x fsdp.
Modules tag parameters with logical names (`embed`, `mlp`, `heads`, ...); `RULES` maps each
name to mesh axes. With fsdp = tensor = 1 every parameter is replicated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Parameters: embed/mlp/heads/vocab; activations: batch/act_embed.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", BATCH_AXES),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("vocab", "tensor"),
  ("kv", None),
  ("proj", None),
  ("length", None),
  ("act_embed", None),
  ("layers", None),  # the stacked layer axis of `model.scan_layers`: not split
)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves the one -1 axis of `config.mesh` to the remaining devices, checking the product."""
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: give positive sizes and at most one -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[MESH_AXES.index(free[0])] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
      f"{num_devices} are present"
    )
  return tuple(sizes)


def make_mesh(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """The (data, fsdp, tensor) mesh over all devices of all processes (or the ones given)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  # Auto axes: XLA propagates shardings from the inputs and the rules' constraints (GSPMD).
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Every device on `data`: for evaluation, which splits batches and replicates the rest."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(
    (len(devices), 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def local_device(mesh: Mesh) -> jax.Device:
  """This process's first device of `mesh`: what only a device of this host can answer (its
  memory) must be asked of one; in a multi-process run the mesh's first may be another's."""
  return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_padded(x: np.ndarray, rows: int, mesh: Mesh) -> jax.Array:
  """`x` with zero rows appended up to `rows`, split over the batch axes: callers that pad every
  batch to one size compile once, and drop the padding's rows from the result."""
  x = np.asarray(x)
  pad = np.zeros((rows - len(x), *x.shape[1:]), x.dtype)
  return jax.device_put(np.concatenate([x, pad]), batch_sharding(mesh))


def logical_shardings(abstract_boxed_tree, mesh: Mesh):
  """NamedShardings for a tree whose leaves carry logical axis names (flax Partitioned boxes)."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """While tracing: the mesh and `RULES` that the models' activation constraints resolve against."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield
