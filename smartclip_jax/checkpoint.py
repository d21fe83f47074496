"""Orbax checkpoints of the train state and the Grain iterator, saved together per step.

Items: `state` (parameters, optimizer state, step; restored straight into the mesh's
shardings), `data` (each process's Grain iterator position), so a resumed run continues
with exactly the batches it would have seen, and `data_stats` (records used and skipped so far).
"""

from __future__ import annotations

import logging
import pathlib

import grain
import jax
import orbax.checkpoint as ocp

from smartclip_jax.data.pipeline import DataStats
from smartclip_jax.step import TrainState


class Checkpointer:
  """Async CheckpointManager under `<workdir>/checkpoints`, keeping the last `keep` steps."""

  def __init__(self, directory: str | pathlib.Path, keep: int):
    self.manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "data_stats"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_iter: grain.DatasetIterator,
           data_stats: DataStats | None = None) -> None:
    """Starts an async save at the state's step; returns once device arrays are copied."""
    step = int(jax.device_get(state.step))
    stats = (data_stats or DataStats()).state_dict()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        data_stats=ocp.args.JsonSave(stats)))

  def restore(self, shardings: TrainState, abstract: TrainState,
              data_iter: grain.DatasetIterator) -> tuple[TrainState | None, DataStats]:
    """The latest checkpoint's state, in `shardings`, with `data_iter` moved to its position,
    and the data counts so far; (None, empty counts) when there is no checkpoint."""
    step = self.manager.latest_step()
    if step is None:
      return None, DataStats()
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iter),
        data_stats=ocp.args.JsonRestore()))
    logging.info("restored checkpoint at step %d from %s", step, self.manager.directory)
    return restored["state"], DataStats.from_state_dict(restored["data_stats"])

  def close(self) -> None:
    """Waits for pending saves to be committed."""
    self.manager.wait_until_finished()
    self.manager.close()
