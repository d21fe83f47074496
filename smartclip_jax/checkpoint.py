"""Orbax checkpoints of the train state and the Grain iterator, saved together per step.

Items: `state` (parameters, optimizer state, step, skip counters; restored straight into the
mesh's shardings, whatever mesh saved them), `data_stats` (records used and skipped so far) and
`config` (the run's config, for `init_from`, `smartclip_jax.load` and people). The data
position needs no item: the batches of a step are a function of the seed and the step
(`data/pipeline.py`), and the model has no other RNG, so the state's step is the whole story
on any number of processes. Parameters from another run into a new one: `init_from.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from smartclip_jax import config as config_lib, distributed, storage
from smartclip_jax.data.pipeline import DataStats
from smartclip_jax.step import TrainState

log = logging.getLogger("smartclip_jax")

ITEMS = ("state", "data_stats", "config")
RETRY_AFTER_S = (1.0, 5.0, 25.0)  # pauses before reading a failed step again
OK, BROKEN, UNREACHABLE = 0, 1, 2  # how a step's restore ended on one process
SAVING, COMMITTED, LOST = 0, 1, 2  # where process 0 sees the last save


class CheckpointError(RuntimeError):
  """No checkpoint in a directory can be restored."""


class Checkpointer:
  """Async CheckpointManager under `directory` (local, gcsfuse or `gs://`), keeping the last
  `keep` steps.

  A checkpoint that fails to restore while an older one restores (a truncated file, a missing
  item) is reported and moved to `<directory>.unusable/<step>`, so that later saves are not
  shadowed by it; Orbax itself never lists a save that did not finish. Where directories cannot
  be renamed (`storage.commit_file`), saves commit by file and the move is a copy.

  Saves a killed run left unfinished are deleted when the next run opens the directory (they
  hold space and nothing else). A save that fails in the background (a full disk, a lost
  bucket) stops the run at the next `check` or save: CheckpointManager only logs it, and lists
  the step until reloaded, so the run would go on with no new checkpoints.
  """

  def __init__(
    self,
    directory: str | pathlib.Path | epath.Path,
    keep: int,
    config: ml_collections.ConfigDict | None = None,
  ):
    self.directory = storage.path(directory)
    self.config, self.keep = config, keep
    atomicity = config.checkpoint_atomicity if config is not None else "auto"
    self.commit_file = storage.commit_file(self.directory, atomicity)
    self.options = dict(
      create=True,
      temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath if self.commit_file else None,
      cleanup_tmp_directories=True,
    )
    if jax.process_index() == 0 and (left := unfinished(self.directory)):
      log.warning("deleting saves a stopped run left unfinished in %s: %s", self.directory, left)
    self.pending: int | None = None  # the step of the last save until it is seen committed
    self.best: ocp.CheckpointManager | None = None  # created by the first save_best
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, **self.options),
      item_names=ITEMS,
    )

  def save(self, state: TrainState, data_stats: DataStats | None = None) -> None:
    """Starts an async save at the state's step; returns once device arrays are copied."""
    step = int(jax.device_get(state.step))
    stats = (data_stats or DataStats()).state_dict()
    self.check(wait=True)  # the previous save ends, committed or not, before the next starts
    self.check_space(state, step)
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_stats=ocp.args.JsonSave(stats),
        config=self._config_item(),
      ),
    )
    self.pending = step

  def check(self, wait: bool = False) -> None:
    """Raises `storage.StorageError` on every process once the last save has ended without
    committing, or (`wait`) after waiting for it to end: a collective, all processes call it at
    the same steps. Process 0, which commits saves, decides; cheap while nothing is pending."""
    if self.pending is None:
      return
    status, error = self._ended(wait)
    status = distributed.from_process_0([status])[0]
    if status == SAVING:
      return
    step, self.pending = self.pending, None
    if status == LOST:
      self.manager.reload()
      why = error or "process 0 logged why"
      raise storage.StorageError(
        f"the checkpoint of step {step} in {self.directory} did not commit: {why}"
        f"{_free_space(self.directory)}. Rerun once the storage is fixed to resume from the "
        f"last committed checkpoint: {self._newest()}"
      )

  def _ended(self, wait: bool) -> tuple[int, str]:
    """How the last save stands here (SAVING, COMMITTED or LOST) and, when lost, why."""
    if not wait and self.manager.is_saving_in_progress():
      return SAVING, ""
    try:  # joins the save's thread, which raises what failed in the background
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  Orbax, TensorStore and file systems raise many kinds
      return LOST, f"{type(e).__name__}: {e}"
    if jax.process_index() != 0 or committed(self.directory / str(self.pending)):
      return COMMITTED, ""
    return LOST, "its save ended without a commit (see the log above)"

  def check_space(self, state: TrainState, step: int) -> None:
    """Raises `storage.StorageError` on every process when a local or mounted workdir has less
    free space than the state takes: before each save, which would fail in the background, and
    at start-up, so a restarted run stops before its first step instead of one interval on (a
    collective). Object stores are not checked."""
    need = sum(x.nbytes for x in jax.tree.leaves(state))
    free = storage.free_bytes(self.directory)
    short = distributed.gather(int(free is not None and free < need))
    if short.any():
      seen = "" if free is None else f"; {free / 2**30:.2f} GiB are free there"
      raise storage.StorageError(
        f"cannot save a checkpoint at step {step}: it takes up to {need / 2**30:.2f} GiB, more "
        f"than processes {np.flatnonzero(short).tolist()} have free in {self.directory}{seen}. "
        f"Free space there or lower keep_checkpoints (now {self.keep}); {self._newest()}"
      )

  def _newest(self) -> str:
    step = self.manager.latest_step()
    return "no checkpoint has committed yet" if step is None else f"the newest is step {step}"

  def restore(
    self, abstract: TrainState, labels: tuple[str, ...] = ("",)
  ) -> tuple[TrainState | None, DataStats]:
    """The newest checkpoint every process can restore, laid out as `abstract` says (its
    shardings: `step.abstract_state`), and the data counts so far (per train source `labels`);
    (None, empty counts) when there is no checkpoint.

    One decision for all processes: each reads a step on its own (no barrier inside, so one
    process's failure cannot strand the others), retrying with backoff; then they compare
    outcomes. A storage error that outlasts the retries stops the run (a rerun tries again) and
    moves nothing; a step that fails to read on any process after its retries is passed over by
    all together, and set aside once an older one restores everywhere.
    """
    step, restored, failed = self._agree(lambda step: self._read(step, abstract), "restored")
    if restored is not None:
      self._set_aside([s for s, _ in failed])
      log.info("restored checkpoint at step %d from %s", step, self.directory)
      return restored["state"], DataStats.from_state_dict(restored["data_stats"], labels)
    if failed:  # nothing restores: more likely a config that does not match than corruption
      step, error = failed[0]
      raise CheckpointError(
        f"none of the checkpoints {[s for s, _ in failed]} in {self.directory} can be "
        f"restored; the newest (step {step}) failed with {error}. "
        "Was the run started with a different model config?"
      )
    return None, DataStats(labels)

  def _agree(
    self, read: Callable[[int], Any], what: str
  ) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """The newest step that `read` succeeds on in every process, what it read there, and the
    newer steps that failed somewhere (with the error); (None, None, failed) if none succeeds.

    Process 0's list of steps is everyone's; each process reads alone, retrying with backoff
    (`_retrying`), then all compare outcomes and move on together. A storage error that outlasts
    the retries on any process stops every process with `storage.StorageError`.
    """
    failed: list[tuple[int, str]] = []
    for step in distributed.from_process_0(sorted(self.manager.all_steps(), reverse=True)):
      value, error = _retrying(
        functools.partial(read, step), f"reading the checkpoint of step {step}"
      )
      outcomes = distributed.gather(OK if error is None else _failure(error))
      if (outcomes == OK).all():
        return step, value, failed
      who = [int(i) for i in np.flatnonzero(outcomes != OK)]
      said = f"{type(error).__name__}: {error}" if error else "see their logs"
      if (outcomes == UNREACHABLE).any():
        raise storage.StorageError(
          f"cannot read the checkpoint of step {step} in {self.directory} on processes {who}: "
          f"storage errors outlasted {len(RETRY_AFTER_S)} retries ({said}). Nothing was moved; "
          "rerun when the storage answers"
        )
      log.warning(
        "checkpoint at step %d in %s cannot be %s by processes %s (%s); all processes try the "
        "previous one",
        step,
        self.directory,
        what,
        who,
        said,
      )
      failed.append((step, said))
    return None, None, failed

  def _read(self, step: int, target: TrainState) -> dict:
    """This process's part of `step`, with no collective inside, so that a failure here cannot
    strand the other processes at a barrier."""
    reader = ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(
        state=ocp.StandardCheckpointHandler(multiprocessing_options=_alone()),
        data_stats=ocp.JsonCheckpointHandler(multiprocessing_options=_alone()),
      ),
      multiprocessing_options=_alone(),
      temporary_path_class=self.options["temporary_path_class"],
    )
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data_stats=ocp.args.JsonRestore()
    )
    return reader.restore(self.directory / str(step), args=args)

  def latest_config(self) -> tuple[int, dict] | None:
    """The newest checkpoint's step and the config it was saved with (None: no checkpoint),
    agreed by all processes as in `restore`; a config that cannot be read gives way to the one
    before (`restore` reports and sets aside a torn checkpoint)."""
    step, saved, _ = self._agree(lambda step: saved_config(self.directory / str(step)), "read")
    return None if step is None else (step, saved)

  def _set_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory.parent / f"{self.directory.name}.unusable"
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        storage.move_tree(self.directory / str(step), aside / str(step), not self.commit_file)
        log.warning("moved the unusable checkpoint of step %d to %s", step, aside / str(step))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("smartclip_jax: unusable checkpoints set aside")
    self.manager.reload()

  def save_best(self, state: TrainState, metric: str, value: float) -> None:
    """Saves the state (and config) under `<directory>_best/` when `value` of `metric` is the
    highest seen so far; Orbax keeps only the best one, across resumes."""
    if self.best is None:
      self.best = ocp.CheckpointManager(
        self.directory.parent / f"{self.directory.name}_best",
        options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_mode="max", best_fn=lambda m: m[metric], **self.options
        ),
        item_names=("state", "config"),
      )
    self.best.save(
      int(jax.device_get(state.step)),
      metrics={metric: value},
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=self._config_item()),
    )

  def _config_item(self) -> ocp.args.JsonSave:
    return ocp.args.JsonSave(config_lib.to_dict(self.config) if self.config else {})

  def close(self) -> None:
    """Waits for pending saves to end; later calls do nothing. Process 0 raises
    `storage.StorageError` if the last save did not commit (no collective: `close` also runs
    while an error unwinds one process alone)."""
    status, error = self._ended(wait=True) if self.pending is not None else (COMMITTED, "")
    for manager in (self.manager, self.best):
      if manager is not None:
        manager.wait_until_finished()
        manager.close()
    self.manager = self.best = None
    step, self.pending = self.pending, None
    if status == LOST and jax.process_index() == 0:
      raise storage.StorageError(
        f"the checkpoint of step {step} in {self.directory} did not commit: "
        f"{error}{_free_space(self.directory)}"
      )


def _alone() -> ocp.options.MultiprocessingOptions:
  """Orbax options for this process reading on its own: no barrier with the others."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def unfinished(directory: epath.Path) -> list[str]:
  """Names of the saves in a checkpoints `directory` that never committed (cut short by a
  kill, or a failure): Orbax's temporary directories, and step directories without a commit."""
  if not directory.is_dir():
    return []
  return sorted(p.name for p in directory.iterdir() if p.is_dir() and not committed(p))


def _free_space(directory: epath.Path) -> str:
  free = storage.free_bytes(directory)
  return "" if free is None else f"; {free / 2**30:.2f} GiB are free there"


def _retrying(read: Callable[[], Any], what: str) -> tuple[Any, Exception | None]:
  """(read(), None), or (None, the last error) once the `RETRY_AFTER_S` pauses are spent."""
  pauses = iter(RETRY_AFTER_S)
  while True:
    try:
      return read(), None
    except Exception as e:  # noqa: BLE001  Orbax, TensorStore and file systems raise many kinds
      if (pause := next(pauses, None)) is None:
        return None, e
      log.warning(
        "process %d: %s failed (%s: %s); retrying in %.0f s",
        jax.process_index(),
        what,
        type(e).__name__,
        e,
        pause,
      )
      time.sleep(pause)


def _failure(error: Exception) -> int:
  """UNREACHABLE for a storage error that may pass (a timeout, a 503), else BROKEN."""
  return UNREACHABLE if storage.transient(error) else BROKEN


def resolve_step_dir(path: str | pathlib.Path) -> epath.Path:
  """A workdir, a checkpoints directory (its newest committed step) or one committed step's
  directory (absolute: Orbax's metadata readers do not resolve relative paths). A save that
  never committed is never read: it may lack files, or hold some of another save's."""
  path = storage.path(path)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "state").is_dir():
    if not committed(path):
      raise CheckpointError(
        f"{path} is a checkpoint whose save never committed (cut short, or still being "
        f"written); name a committed step, or {path.parent} for the newest one"
      )
    return path
  steps = [p for p in path.iterdir() if p.name.isdigit()] if path.is_dir() else []
  done = [int(p.name) for p in steps if committed(p)]
  if not done:
    uncommitted = f" (uncommitted saves: {sorted(int(p.name) for p in steps)})" if steps else ""
    raise CheckpointError(
      f"{path} is not a workdir, a checkpoints directory or a committed step of one{uncommitted}"
    )
  return path / str(max(done))


def committed(step_dir: epath.Path) -> bool:
  """Whether Orbax calls the save in `step_dir` finished under both of its atomicities: named
  as a final step (rename commits by renaming a temporary directory) and holding the commit
  file (commit_file's mark, which Orbax >= 0.12.8 also writes before a rename), so a reader need
  not know which atomicity the run used."""
  return all(
    ocp.path.step.is_path_finalized(step_dir, temporary_path_cls=cls)
    for cls in (
      ocp.path.atomicity.AtomicRenameTemporaryPath,
      ocp.path.atomicity.CommitFileTemporaryPath,
    )
  )


def saved_config(step_dir: str | pathlib.Path) -> dict:
  """The config a checkpoint was saved with: its `config` item, else the run's config.json."""
  step_dir = epath.Path(step_dir)
  item = step_dir / "config"
  if item.is_dir():
    reader = ocp.Checkpointer(ocp.JsonCheckpointHandler(), multiprocessing_options=_alone())
    saved = reader.restore(item, args=ocp.args.JsonRestore())
    if saved:
      return saved
  run_config = step_dir.parent.parent / "config.json"
  if run_config.is_file():
    return json.loads(run_config.read_text())
  raise CheckpointError(
    f"{step_dir} has no saved config (no config item, no "
    f"{run_config}); load it with the config it was trained with"
  )


def write_params(params: Any, config: ml_collections.ConfigDict, out: str | pathlib.Path) -> None:
  """An Orbax checkpoint of a model alone (step 0: `state` with the parameters, and `config`),
  which `smartclip_jax.load` and `init_from` read (`convert --from` writes one)."""
  manager = ocp.CheckpointManager(
    storage.path(out),
    item_names=("state", "config"),
    options=ocp.CheckpointManagerOptions(create=True),
  )
  manager.save(
    0,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params}),
      config=ocp.args.JsonSave(config_lib.to_dict(config)),
    ),
  )
  manager.wait_until_finished()
  manager.close()
