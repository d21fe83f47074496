"""Metrics out of a run: `metrics.jsonl` (one object per logged step), TensorBoard events and,
when `wandb.project` is set, a Weights & Biases run with the same metrics and the config.

Only process 0 writes; the others get a writer that does nothing, so callers need no checks.
Objects in a bucket cannot be appended to, so under gs:// metrics.jsonl is rewritten whole at
each log, and the TensorBoard events are written to a local directory and copied up whole after
each flush (through epath, like everything else the run writes).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from tensorboardX import SummaryWriter

from smartclip_jax import config as config_lib, storage

log = logging.getLogger("smartclip_jax")


WANDB_ID = "wandb_run_id"  # the workdir's file naming its W&B run, so a resume continues it


class WandbRun:
  """Process 0's W&B run (`config.wandb`): the config at the start, then every metric the
  TensorBoard writer gets, against the trainer's `step`. Its id is kept in the workdir, so a
  resumed run continues the same W&B run (resume="allow"); the steps a stopped run logged after
  its last checkpoint are logged again by the resumed one, as in metrics.jsonl before its
  rewrite. `WANDB_MODE=offline` writes the run under the workdir's `wandb/` with no network
  (`wandb sync` uploads it later); a gs:// workdir keeps W&B's local files in a temporary
  directory."""

  def __init__(self, workdir: epath.Path, settings: Any, config_values: dict):
    import wandb  # an optional extra: requirements-wandb.txt (preflight checks it is there)

    id_file = workdir / WANDB_ID
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
    local = tempfile.mkdtemp() if storage.is_remote(workdir) else os.fspath(workdir)
    self._run = wandb.init(
      project=settings.project,
      entity=settings.entity or None,
      name=settings.name or None,
      tags=list(settings.tags) or None,
      id=run_id,
      resume="allow",
      dir=local,
      config=config_values,
    )
    self._run.define_metric("*", step_metric="step")
    if not id_file.exists():
      id_file.write_text(run_id)
    log.info("W&B run %s (project %s): %s", run_id, settings.project, self._run.url or "offline")

  def log(self, step: int, values: dict[str, float]) -> None:
    self._run.log({"step": step, **values})

  def close(self) -> None:
    self._run.finish()


class MetricWriter:
  def __init__(
    self,
    workdir: str | os.PathLike,
    enabled: bool | None = None,
    config: ml_collections.ConfigDict | None = None,
  ):
    """`config`: the run's, whose `wandb.project` (if set) adds a W&B run logging the same."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = storage.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.board = self.workdir / "tensorboard"
    self.remote = storage.is_remote(self.workdir)
    self._local_board = epath.Path(tempfile.mkdtemp()) if self.remote else self.board
    self._tb = SummaryWriter(os.fspath(self._local_board)) if self.enabled else None
    self._lines: list[str] | None = None  # gs://: the file's lines, written whole
    self._wandb = None
    if self.enabled and config is not None and config.wandb.project:
      self._wandb = WandbRun(self.workdir, config.wandb, config_lib.to_dict(config))

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
    if self._wandb is not None:
      self._wandb.log(step, {f"{prefix}{k}": v for k, v in values.items()})

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
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None
