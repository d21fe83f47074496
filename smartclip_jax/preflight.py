"""What a training run checks before anything compiles: everything that would otherwise fail
later (at the first evaluation, at the end, at a resume), named all at once.

`config.validate` sees the config alone; this adds what a run needs of the world: the data and
evaluation sources exist, the starting weights are there (unless a checkpoint is, to resume
from), a recipe config was given both, and `eval.best_metric` names a metric the evaluation
produces. The memory check of the compiled step is `memory.check_fits`; what a resume may
change, `resume.py`.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

import ml_collections

from smartclip_jax import checkpoint, config as config_lib, storage
from smartclip_jax.evals import datasets, tasks as tasks_lib
from smartclip_jax.interop import torch_files

log = logging.getLogger("smartclip_jax")


def _missing(path: str, glob_ok: bool = False) -> bool:
  """Whether nothing is at `path` (local, a mount or gs://); a local glob must match a file."""
  if glob_ok and any(c in path for c in "*?[") and not storage.is_remote(path):
    return not glob.glob(path)
  return not storage.path(path).exists()


def data_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The training data and held-out split: named, and present."""
  d, errors = config.data, []
  try:
    mixture = config_lib.parse_mixture(d.mixture)
  except ValueError:  # config.problems names it
    mixture = []
  if not d.name:
    which = "a recipe config" if config.recipe else "this config"
    errors.append(
      f"data.name is not set: {which} trains on data you name, e.g. "
      "--config.data.name=array_record --config.data.path=/data/train_shards "
      "--config.data.eval_path=/data/eval_shards (shards from `python -m "
      "smartclip_jax.data.prepare`), or data.name=folder|sharegpt4v|tfds (docs/data.md); "
      "data.name=demo trains on generated shapes"
    )
  kinds = config_lib.DATA_SOURCES
  sources = [(d.name, d.path, "data.path")] if d.name in kinds else []
  sources += [(name, path, f"data.mixture's {name}:{path}") for name, path, _ in mixture]
  for name, path, what in sources:
    if kinds[name].path in ("file", "glob") and path and _missing(path, kinds[name].path == "glob"):
      errors.append(f"{what}: nothing at {path}")
  if d.name in kinds and kinds[d.name].eval_path:
    if not d.eval_path:
      errors.append(
        f"data.name={d.name} needs data.eval_path, the held-out split evaluated at the end "
        "(and every eval.every steps)"
      )
    elif _missing(d.eval_path, glob_ok=kinds[d.name].path == "glob"):
      errors.append(f"data.eval_path: nothing at {d.eval_path}")
  if d.image_root and _missing(d.image_root):
    errors.append(f"data.image_root: nothing at {d.image_root}")
  return errors


def eval_problems(config: ml_collections.ConfigDict) -> list[str]:
  """`eval.tasks` parse and their files exist; `eval.best_metric` is among their metrics."""
  try:
    parsed = tasks_lib.parse_tasks(config.eval.tasks)
  except ValueError as e:
    return [f"eval.tasks={config.eval.tasks!r}: {e}"]
  errors = []
  for t in parsed:
    # tfds tasks name a data set, not a file; the others' paths are files or data_dirs.
    paths = [t.image_root] if t.name == "tfds" else [t.path, t.image_root]
    errors += [f"eval.tasks {t.name}: nothing at {p}" for p in paths if p and _missing(p)]
  retrieval = {t.label: t.name in datasets.RETRIEVAL_TASKS for t in parsed}
  if problem := config_lib.best_metric_problem(config, retrieval):
    errors.append(problem)
  return errors


def init_problems(config: ml_collections.ConfigDict) -> list[str]:
  """A recipe starts from named weights, which must be there."""
  source = config.init_from
  if source in ("", config_lib.INIT_SCRATCH):
    if config.recipe and not source:
      repo = config_lib.ARCHS[config.recipe]["weights"]
      return [
        f"init_from is not set: a recipe config ({config.recipe}) fine-tunes a pretrained "
        f"CLIP. Set --config.init_from=hf-hub:{repo} after fetching it with `hf download "
        f"{repo}`, or give OpenAI's .pt file, an open_clip or transformers file or directory, "
        f"or a run of ours; --config.init_from={config_lib.INIT_SCRATCH} trains these towers "
        "from random initialisation (then raise optim.towers.lr: 1e-6 only nudges a trained "
        "CLIP)"
      ]
    return []
  try:
    if not torch_files.resolve(source).exists():
      return [f"init_from: nothing at {source}"]
  except FileNotFoundError as e:  # a hub name not in the local cache: says how to fetch it
    return [f"init_from: {e}"]
  except ImportError as e:
    return [
      f"init_from={source}: reading it needs {e.name or 'a package not installed'} "
      "(pip install -r requirements-torch.txt)"
    ]
  except Exception as e:  # noqa: BLE001  the hub and storage clients raise many kinds
    return [f"init_from={source} cannot be looked up: {type(e).__name__}: {e}"]
  return []


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds a committed checkpoint, which a run resumes from instead of
  starting from `init_from`."""
  try:
    checkpoint.resolve_step_dir(storage.path(workdir) / "checkpoints")
  except checkpoint.CheckpointError:
    return False
  return True


def check(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> None:
  """`config.validate`'s problems and a run's, in one ConfigError. Starting weights that cannot
  be found only warn when `workdir` has a checkpoint: a resume does not read them (and their
  cache may be gone by then)."""
  config_lib.check_fields(config)
  errors = config_lib.problems(config)
  errors += data_problems(config) + eval_problems(config)
  if config.wandb.project and importlib.util.find_spec("wandb") is None:
    errors.append(
      f"wandb.project={config.wandb.project!r} but wandb is not installed: "
      "pip install -r requirements-wandb.txt"
    )
  init = init_problems(config)
  if init and workdir is not None and has_checkpoint(workdir):
    for problem in init:
      log.warning("%s (not needed: the run resumes from %s's checkpoints)", problem, workdir)
  else:
    errors += init
  config_lib.raise_problems(errors)
