"""What a resumed run may change, and what it may not.

A run resumes from its checkpoint's step, and its batches are a function of the seed and the
step (data/pipeline.py): a field that changes the data stream, the model or the loss makes the
resumed run a different run that only looks continuous, so it stops, naming each such field
with its saved and new value. Schedules, evaluation, logging, workers and the mesh may change;
the changes are logged. The saved side is the newest checkpoint's `config` item.
"""

from __future__ import annotations

import json
import logging
import zlib

import ml_collections
import numpy as np
from flax import traverse_util

from smartclip_jax import config as config_lib, distributed
from smartclip_jax.data import pipeline, sources

log = logging.getLogger("smartclip_jax")

# Fields, and groups of fields, that fix the data stream, the model, the loss or the optimizer
# state's layout (which parameters train, in which groups)...
FIXED = (
  "seed",
  "batch_size",
  "loss",
  "smartclip",
  "clip",
  "model",
  "data",
  "optim.frozen",
  "optim.groups",
  "optim.lr_mults",
  "optim.wd_mults",
)
# ...and those in them that do not (how the model computes, how data are read or judged).
MAY_CHANGE = (
  "model.dtype",
  "model.remat",
  "model.attention",
  "model.text.trim_padding",
  "data.num_workers",
  "data.eval_path",
  "data.eval_batch_size",
  "data.image_root",
  "data.max_bad_fraction",
  "data.accept_changed_sources",
  "data.demo.num_eval",
  "data.tfds.data_dir",
  "data.tfds.eval_split",
)


class ResumeError(config_lib.ConfigError):
  """A resume with a config that would change the run it continues."""


def _flat(values: dict) -> dict:
  return traverse_util.flatten_dict(values, sep=".")


def changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{field: (saved value, new value)} for every field that differs; a saved config of an older
  version is read with today's defaults for the fields it lacks (`config.from_dict`)."""
  old = _flat(config_lib.to_dict(config_lib.from_dict(saved)))
  new = _flat(config_lib.to_dict(config))
  return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}


def _within(field: str, names: tuple[str, ...]) -> bool:
  """Whether `field` is one of `names` or in a group named there: whole names, so that `loss`
  does not take in `loss_impl` (same values and gradients, a free choice on resume)."""
  return any(field == name or field.startswith(name + ".") for name in names)


def is_fixed(field: str) -> bool:
  return _within(field, FIXED) and not _within(field, MAY_CHANGE)


def check(saved: dict, config: ml_collections.ConfigDict, step: int, where: str) -> None:
  """Stops (`ResumeError`) on a change to a fixed field; logs the others."""
  found = changes(saved, config)
  fixed = {k: v for k, v in found.items() if is_fixed(k)}
  if fixed:
    lines = "\n  ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in fixed.items())
    raise ResumeError(
      f"{where} holds a run at step {step} that this config would continue differently:\n  "
      f"{lines}\nthese fields set the data stream, the model, the loss or which parameters "
      "train in which optimizer group. Resume with the "
      "values it was saved with, or start a new workdir (--config.init_from=<this workdir> "
      "takes its parameters)"
    )
  if found:
    log.info(
      "resuming at step %d with changed fields: %s",
      step,
      ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in found.items()),
    )


def check_data(stats: pipeline.DataStats, step: int, config: ml_collections.ConfigDict) -> None:
  """Stops when processes see different training data (a stale listing of a mounted bucket),
  or when the data differ from what the checkpoint at `step` was saved with (shards added,
  removed or rewritten): either would give batches the saved run never had. The second is a
  `ResumeError` that `data.accept_changed_sources` turns into a warning. A collective."""
  text = json.dumps(stats.sources, sort_keys=True)
  seen = distributed.gather(zlib.crc32(text.encode()) & 0x7FFFFFFF)
  if (seen != seen[0]).any():
    raise pipeline.DataError(
      f"processes see different training data: processes {np.flatnonzero(seen != seen[0])} "
      f"differ from process 0, which sees {stats.sources}; a shared file system that lists "
      "stale contents, or a data path that is not the same on every host"
    )
  if stats.saved_sources is None:  # a fresh start, or a checkpoint from before they were saved
    return
  lines = "\n  ".join(sources.changed_sources(stats.saved_sources, stats.sources))
  if not lines:
    return
  if config.data.accept_changed_sources:
    log.warning("resuming at step %d on changed training data:\n  %s", step, lines)
    return
  raise ResumeError(
    f"the training data differ from those the checkpoint at step {step} was saved with:\n  "
    f"{lines}\nthe batches of a step are a function of the data, so this run would not "
    "continue the saved one. Restore the data, or set --config.data.accept_changed_sources="
    "true to go on with the new data from this step"
  )
