"""A trace of a few train steps beside the TensorBoard scalars (`profile_steps`)."""

from __future__ import annotations

import logging
import os
import tempfile

import jax
from etils import epath

from smartclip_jax import storage

log = logging.getLogger("smartclip_jax")


class Profile:
  """A trace of `steps` (those after the first, compiling, one), beside the TensorBoard
  scalars: `tensorboard --logdir WORKDIR/tensorboard`, Profile tab. The profiler writes local
  files only, so under a gs:// workdir it traces into a temporary directory, copied up after."""

  def __init__(self, workdir: epath.Path, steps: range):
    self.workdir, self.steps, self.tracing = workdir, steps, False
    self.trace_dir = None

  def maybe_start(self, step: int) -> None:
    if len(self.steps) and step == self.steps.start:
      board = self.workdir / "tensorboard"
      self.trace_dir = epath.Path(tempfile.mkdtemp()) if storage.is_remote(board) else board
      jax.profiler.start_trace(os.fspath(self.trace_dir))
      self.tracing = True

  def maybe_stop(self, step: int, state: object) -> None:
    if self.tracing and step == self.steps[-1]:
      jax.block_until_ready(state)
      self.close()
      log.info(
        "profile of steps %d-%d written under %s (tensorboard --logdir %s, Profile tab)",
        self.steps.start,
        step,
        self.workdir / "tensorboard/plugins/profile",
        self.workdir / "tensorboard",
      )

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
      if self.trace_dir != self.workdir / "tensorboard":
        storage.move_tree(self.trace_dir, self.workdir / "tensorboard", rename=False)
