"""Orbax checkpoints of the train state and the Grain iterator, saved together per step.

Items: `state` (parameters, optimizer state, step; restored straight into the mesh's
shardings) and `data` (each process's Grain iterator position), so a resumed run continues
with exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import pathlib

import grain
import jax
import orbax.checkpoint as ocp

from smartclip_jax.step import TrainState


class Checkpointer:
  """Async CheckpointManager under `<workdir>/checkpoints`, keeping the last `keep` steps."""

  def __init__(self, directory: str | pathlib.Path, keep: int):
    self.manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, data_iter: grain.DatasetIterator) -> None:
    """Starts an async save at the state's step; returns once device arrays are copied."""
    step = int(jax.device_get(state.step))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)))

  def restore(self, shardings: TrainState, abstract: TrainState,
              data_iter: grain.DatasetIterator) -> TrainState | None:
    """The latest checkpoint's state, in `shardings`, with `data_iter` moved to its position;
    None when there is no checkpoint."""
    step = self.manager.latest_step()
    if step is None:
      return None
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    logging.info("restored checkpoint at step %d from %s", step, self.manager.directory)
    return restored["state"]

  def close(self) -> None:
    """Waits for pending saves to be committed."""
    self.manager.wait_until_finished()
    self.manager.close()
