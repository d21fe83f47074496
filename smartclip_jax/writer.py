"""Metrics out of a run: `metrics.jsonl` (one object per logged step) and TensorBoard events.

Only process 0 writes; the others get a writer that does nothing, so callers need no checks.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from tensorboardX import SummaryWriter


class MetricWriter:
  def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = pathlib.Path(workdir)
    self._tb = SummaryWriter(str(self.workdir / "tensorboard")) if self.enabled else None

  def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
    """Appends `{"step": step, **metrics}` to metrics.jsonl and each scalar to TensorBoard."""
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if not prefix:
      with open(self.workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")
    for key, value in values.items():
      self._tb.add_scalar(f"{prefix}{key}", value, step)
    self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops metrics.jsonl lines logged after `step` (a resumed run logs them again)."""
    path = self.workdir / "metrics.jsonl"
    if not self.enabled or not path.exists():
      return
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
