"""Metrics out of a run: `metrics.jsonl` (one object per logged step) and TensorBoard events.

Only process 0 writes; the others get a writer that does nothing, so callers need no checks.
Objects in a bucket cannot be appended to, so under gs:// metrics.jsonl is rewritten whole at
each log, and the TensorBoard events are written to a local directory and copied up whole after
each flush (through epath, like everything else the run writes).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import jax
import numpy as np
from etils import epath
from tensorboardX import SummaryWriter

from smartclip_jax import storage

log = logging.getLogger("smartclip_jax")


class MetricWriter:
  def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = storage.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.board = self.workdir / "tensorboard"
    self.remote = storage.is_remote(self.workdir)
    self._local_board = epath.Path(tempfile.mkdtemp()) if self.remote else self.board
    self._tb = SummaryWriter(os.fspath(self._local_board)) if self.enabled else None
    self._lines: list[str] | None = None  # gs://: the file's lines, written whole

  def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
    """Appends `{"step": step, **metrics}` to metrics.jsonl and each scalar to TensorBoard."""
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if not prefix:
      line = json.dumps({"step": step, **values}) + "\n"
      if self.remote:
        if self._lines is None:
          self._lines = self._read()
        self._lines.append(line)
        self.path.write_text("".join(self._lines))
      else:
        with self.path.open("a") as f:
          f.write(line)
    for key, value in values.items():
      self._tb.add_scalar(f"{prefix}{key}", value, step)
    self._tb.flush()
    self._upload()

  def _upload(self) -> None:
    if self.remote:
      for file in storage.files(self._local_board):
        target = self.board / os.path.relpath(os.fspath(file), os.fspath(self._local_board))
        target.write_bytes(file.read_bytes())

  def truncate_after(self, step: int) -> None:
    """Drops metrics.jsonl lines logged after `step` (a resumed run logs them again), and the
    torn line a run killed mid-write leaves (with a warning). The file is replaced whole: a
    kill during the rewrite leaves the old one."""
    if not self.enabled or not self.path.exists():
      return
    self._lines, torn = [], 0
    for line in self._read():
      try:
        logged = json.loads(line)["step"]
      except (ValueError, KeyError, TypeError):
        torn += 1
        continue
      if logged <= step:
        self._lines.append(line if line.endswith("\n") else line + "\n")
    if torn:
      log.warning("%s: dropped %d torn line(s), left by a run that was killed", self.path, torn)
    if self.remote:  # an object is replaced whole by its write
      self.path.write_text("".join(self._lines))
    else:
      partial = self.path.with_name(self.path.name + ".partial")
      partial.write_text("".join(self._lines))
      os.replace(partial, self.path)

  def _read(self) -> list[str]:
    return self.path.read_text().splitlines(keepends=True) if self.path.exists() else []

  def close(self) -> None:
    """Flushes TensorBoard events (and uploads them for a gs:// workdir); later calls do
    nothing."""
    if self._tb is not None:
      self._tb.close()
      self._upload()
      self._tb = None
