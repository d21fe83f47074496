"""Config schema, loading, `--config.a.b=value` overrides and validation.

Every config in `configs/` starts from `base_config()`, so the set of fields is fixed here and
a mistyped override fails with the field's name and the nearest real ones, before any compile.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import math
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import ml_collections
from etils import epath
from flax import traverse_util

from smartclip_jax import storage
from smartclip_jax.models.clip import CLIP_LOGIT_SCALE
from smartclip_jax.models.layers import ATTENTIONS
from smartclip_jax.models.text import KEEP_POSITIONS

LOSSES = ("smartclip", "clip", "siglip")
LOSS_IMPLS = ("global", "ring")
SKIP_FORMS = ("auto", "where", "cond")  # step.keep_if_finite
REMATS = ("none", "full", "dots")  # models.layers.REMAT_POLICIES, and none
CAPTION_MODES = ("prefix", "full", "first")
SENTENCE_SPLITS = ("ours", "reference")  # data/captions.py
TRAIN_TRANSFORMS = ("centre_crop", "random_resized_crop")
DECAYS = ("all", "matrices")
OPTIM_GROUPS = ("towers", "mask_net")  # the schedules optim.groups may name (optim.<group>)
OPTIONAL_FLOATS = ("model.logit_bias_init",)  # a number, or none
SHAREGPT4V_HOLDOUT = 1000  # ShareGPT4V-1k: the JSON's first records, never trained on
INIT_SCRATCH = "scratch"  # init_from's explicit "random initialisation"
CSV_KEYS = ("filepath", "title")  # image and caption columns of CSV/TSV captions (open_clip's)
# Fields that moved: old name -> new name. Given the old way, they stop the run naming the new
# one; saved configs of older runs are read with them moved.
RENAMED = {
  "eval_every": "eval.every",
  "data.num_train": "data.demo.num_train",
  "data.num_eval": "data.demo.num_eval",
  "data.holdout": "data.sharegpt4v.holdout",
  "data.image_key": "data.folder.image_key",
  "data.caption_key": "data.folder.caption_key",
  **{
    f"data.tfds_{k}": f"data.tfds.{k}"
    for k in ("data_dir", "train_split", "eval_split", "image_key", "caption_key")
  },
}


# OpenAI CLIP tower sizes, and the pretrained weights the recipe starts from (Hugging Face Hub
# names); SmartCLIP's mask net uses the text tower's head count.
ARCHS = {
  "vit_b16": dict(
    weights="openai/clip-vit-base-patch16",
    embed_dim=512,
    vision=dict(image_size=224, patch_size=16, width=768, layers=12, heads=12),
    text=dict(width=512, layers=12, heads=8),
    mask_heads=8,
  ),
  "vit_l14": dict(
    weights="openai/clip-vit-large-patch14",
    embed_dim=768,
    vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
    text=dict(width=768, layers=12, heads=12),
    mask_heads=12,
  ),
}


# The model each loss trains, as `model.*` fields (docs/method.md, the model): SmartCLIP adds
# the mask network; SigLIP a logit bias, with its own initial scale (log 10) and bias (-10).
LOSS_MODELS = {
  "smartclip": dict(mask_net=True, logit_scale_init=CLIP_LOGIT_SCALE, logit_bias_init=None),
  "clip": dict(mask_net=False, logit_scale_init=CLIP_LOGIT_SCALE, logit_bias_init=None),
  "siglip": dict(mask_net=False, logit_scale_init=math.log(10.0), logit_bias_init=-10.0),
}


class ConfigError(ValueError):
  """A config that cannot run: unknown field, wrong type, inconsistent sizes."""


def set_loss(config: ml_collections.ConfigDict, loss: str) -> ml_collections.ConfigDict:
  """Sets `loss` and the model fields of the model that loss trains (`LOSS_MODELS`)."""
  if loss not in LOSS_MODELS:
    raise ConfigError(f"loss={loss!r}: choose one of {LOSSES}")
  config.loss = loss
  config.model.update(LOSS_MODELS[loss])
  return config


def base_config() -> ml_collections.ConfigDict:
  """All fields, with the recipe as the reference runs it as defaults (docs/method.md, the
  recipe); configs override sizes."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.loss = "smartclip"
  # global: logits of the whole batch on every device; ring: blockwise around the data axes,
  # memory O(B_local) per device (ring.py). Equal values and gradients.
  c.loss_impl = "global"
  c.batch_size = 1024  # global, over all devices and processes
  # Split each batch into this many micro-batches for memory; the loss and its gradients are
  # still those of the whole batch (step.accumulated_loss_and_grads), at ~4/3 the compute.
  c.accum_steps = 1
  c.total_steps = 3650
  # > 0: passes over the training data; sets total_steps from the train sources' records and
  # batch_size at start-up (a mixture: passes over all its records, drawn by the weights)
  c.epochs = 0.0
  c.log_every = 50
  c.checkpoint_every = 500
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # evaluate every this many steps, and at the end (0: only at the end)
  # During training, besides the held-out split: `--tasks` of smartclip_jax.evaluate, e.g.
  # "urban1k:/data/Urban1k,cifar10"; results in eval/step_<N>.json and TensorBoard.
  c.eval.tasks = ""
  # Keep the best checkpoint by this eval metric (under checkpoints_best/): "i2t_r1" of the
  # held-out split, or "<task>/<metric>" such as "urban1k/t2i_r1"; "" keeps none.
  c.eval.best_metric = ""
  c.keep_checkpoints = 3
  # How a checkpoint is committed: "rename" (a finished temporary directory is renamed), or
  # "commit_file" (a commit_success.txt file; for object stores and gcsfuse mounts, which cannot
  # rename directories); "auto" picks commit_file for gs:// workdirs and FUSE mounts (gcsfuse,
  # GKE's GCS FUSE CSI driver), and elsewhere whichever a rename tried at start-up allows.
  c.checkpoint_atomicity = "auto"
  # Start from another model's parameters (fresh optimizer, step 0): a workdir or Orbax
  # checkpoint, a PyTorch file or a transformers directory, an hf-hub:ORG/NAME name (anything
  # smartclip_jax.load reads); "" or "scratch" (INIT_SCRATCH): random initialisation.
  c.init_from = ""
  # The paper recipe's architecture (ARCHS) when this config is that recipe ("": not a recipe).
  # A recipe fine-tunes a pretrained CLIP: a run needs init_from (or init_from=scratch, said
  # explicitly) and data.name.
  c.recipe = ""
  c.profile_steps = 0  # trace this many steps after the first into WORKDIR/tensorboard
  c.max_nonfinite_steps = 10  # stop after this many steps in a row with non-finite loss/grads
  # End a run (exit status 3) with every thread's stack printed when no step finishes for this
  # many seconds, compiling and evaluating apart: a stuck process, restarted (watchdog.py). 0: off.
  c.step_timeout_s = 1800.0
  # How a non-finite step is left out (step.keep_if_finite): "where" (leaf by leaf) or "cond";
  # "auto" is where on TPU/GPU, cond on CPU. Same result; they differ in memory (docs/scaling.md).
  c.skip_nonfinite = "auto"

  # modular=False: the ablation without modular alignment (see losses.smartclip_loss).
  c.smartclip = ml_collections.ConfigDict(
    dict(temperature=0.01, align_weight=10.0, sparsity_weight=2.0, modular=True)
  )
  # loss=clip: temperature > 0 fixes τ, 0 learns it; subset_dims > 0 compares texts with the
  # image embedding on that many of its dimensions only, fixed at random by the seed (a
  # control for SmartCLIP: a mask that never depends on the caption)
  c.clip = ml_collections.ConfigDict(dict(temperature=0.0, subset_dims=0))

  arch = ARCHS["vit_l14"]  # sizes only; configs pick theirs
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = arch["embed_dim"]
  c.model.activation = "quick_gelu"
  c.model.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
  c.model.remat = "none"  # none | full | dots: what each tower block keeps for the backward pass
  c.model.scan_layers = False  # tower blocks under nn.scan: compile time flat in depth
  # The attention core (models.layers.Attention): auto | dot_product | einsum. auto is
  # jax.nn.dot_product_attention on TPU/GPU and plain einsums on CPU; same numerics.
  c.model.attention = "auto"
  c.model.vision = ml_collections.ConfigDict(arch["vision"])
  c.model.text = ml_collections.ConfigDict(
    dict(context_length=248, vocab_size=49408, **arch["text"])
  )
  # CLIP/SigLIP: each step's text tower runs on its longest caption rounded up to a multiple of
  # this, not on all context_length positions (0: all). Same loss; see pipeline.text_length.
  c.model.text.trim_padding = 0
  c.model.mask = ml_collections.ConfigDict(dict(heads=arch["mask_heads"], hard=True))
  # What the model has besides its towers (`LOSS_MODELS`; `set_loss` sets them with the loss):
  # the mask network, the initial logit scale, and a logit bias (None: no bias parameter).
  c.model.mask_net = True
  # Fraction of image patches dropped in training (FLIP; open_clip's --force-patch-dropout):
  # a cheaper image tower, the class token kept; evaluation sees every patch.
  c.model.patch_dropout = 0.0
  c.model.logit_scale_init = CLIP_LOGIT_SCALE
  c.model.logit_bias_init = None

  c.optim = ml_collections.ConfigDict()
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW's, as the reference
  # Weight decay on every parameter of a group (all: the reference) or on matrices only
  # (matrices: open_clip's, for training from scratch).
  c.optim.decay = "all"
  c.optim.grad_clip_norm = 0.0  # 0: no clipping
  c.optim.end_lr_ratio = 0.0  # cosine ends at lr * end_lr_ratio
  c.optim.frozen_positions = KEEP_POSITIONS
  # Parameter groups (optim.py): tables of (regex over '/'-joined parameter paths, value), the
  # first entry matching a whole path wins. Paths begin visual/, text/, mask_net/, logit_scale.
  c.optim.frozen = ""  # these do not train: no gradient, no optimizer state (LiT: "visual/.*")
  c.optim.groups = (("mask_net/.*", "mask_net"), (".*", "towers"))  # schedule: optim.<group>
  c.optim.lr_mults = ()  # e.g. (("text/.*", 0.1),): learning rate times this
  c.optim.wd_mults = ()  # e.g. ((".*/bias", 0.0),): weight decay times this
  c.optim.towers = ml_collections.ConfigDict(dict(lr=1e-6, weight_decay=1e-2, warmup_steps=200))
  c.optim.mask_net = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.0))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the other devices

  # Weights & Biases (optional: requirements-wandb.txt): a project turns it on, beside
  # metrics.jsonl and TensorBoard; WANDB_MODE=offline needs no network.
  c.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", tags=()))

  c.data = ml_collections.ConfigDict()
  c.data.name = "demo"  # demo | sharegpt4v | folder | array_record | tfds ("": not set yet)
  # ShareGPT4V JSON; folder dir / CSV / TSV / JSONL; ArrayRecord dir or glob; TFDS name.
  c.data.path = ""
  c.data.image_root = ""  # images are read relative to this (default: beside data.path)
  c.data.eval_path = ""  # held-out split for folder / array_record (ShareGPT4V: its first 1k)
  # Train on a blend instead of data.name/data.path: "NAME:PATH=WEIGHT,..." (e.g.
  # "array_record:/d/a/train=0.7,folder:/d/b.tsv=0.3"); evaluation stays on data.name's split.
  c.data.mixture = ""
  # Fields of one source each.
  c.data.demo = ml_collections.ConfigDict(dict(num_train=4096, num_eval=256))
  # The first `holdout` records are held out of training: the ShareGPT4V-1k test set.
  c.data.sharegpt4v = ml_collections.ConfigDict(dict(holdout=SHAREGPT4V_HOLDOUT))
  # CSV/TSV columns, open_clip's names.
  c.data.folder = ml_collections.ConfigDict(dict(image_key=CSV_KEYS[0], caption_key=CSV_KEYS[1]))
  # data_dir: where the prepared set lives (TFDS's default if ""); keys are '/'-separated paths
  # into an example.
  c.data.tfds = ml_collections.ConfigDict(
    dict(
      data_dir="",
      train_split="train",
      eval_split="validation",
      image_key="image",
      caption_key="captions/text",
    )
  )
  c.data.caption_mode = "prefix"  # prefix: first k sentences, k ~ U[1, n] per load
  # ours: our sentence splitter; reference: the reference's cut at the literal ". "
  c.data.sentence_split = "ours"
  # Training images: centre_crop is evaluation's transform (shorter side resized, centre crop),
  # as the reference trains; random_resized_crop takes a crop of crop_scale x the area with an
  # aspect ratio in crop_ratio.
  c.data.train_transform = "centre_crop"
  c.data.crop_scale = (0.9, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.min_image_side = 16  # smaller images are skipped as too_small
  c.data.max_image_pixels = 100_000_000  # larger ones as too_large, before decoding
  c.data.max_bad_fraction = 0.05  # stop when more records than this fraction are unusable
  c.data.num_workers = 0  # Grain worker processes; 0 decodes in the main process
  # A resume stops when the training sources differ from the checkpoint's (records, shards):
  # true goes on with the new data from the saved step, a different stream from then on.
  c.data.accept_changed_sources = False
  c.data.eval_batch_size = 256
  return c


def recipe_config(arch: str, loss: str = "smartclip") -> ml_collections.ConfigDict:
  """The recipe (docs/method.md, the recipe) for an OpenAI CLIP architecture in `ARCHS`."""
  a = ARCHS[arch]
  c = set_loss(base_config(), loss)
  c.recipe = arch
  c.data.name = ""  # the user's data: a train run stops until it is named (preflight.py)
  c.model.embed_dim = a["embed_dim"]
  c.model.dtype = "bfloat16"
  c.model.vision.update(**a["vision"])
  c.model.text.update(**a["text"])
  c.model.mask.heads = a["mask_heads"]
  return c


def load(
  path: str | pathlib.Path,
  overrides: Sequence[str] = (),
  check: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> ml_collections.ConfigDict:
  """Imports `path`, calls its `get_config()`, applies `a.b=value` overrides, then `check`s it
  (`validate` by default; a train run's `preflight.check` adds what the run needs).

  `FILE:ARG` calls `get_config(ARG)` (big_vision's form), e.g. `configs/demo.py:clip`.
  """
  path, sep, arg = str(path).partition(".py:")
  path = pathlib.Path(path + ".py" if sep else path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if sep else module.get_config()
  for item in overrides:
    apply_override(config, item)
  (check or validate)(config)
  return config


def arg_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
  """A command's parser with `--config FILE[:ARG]`; `parse_args` adds the overrides."""
  parser = argparse.ArgumentParser(
    prog=prog,
    description=doc,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  parser.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
  return parser


def parse_args(
  parser: argparse.ArgumentParser,
  argv: Sequence[str],
  check: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
  """The parser's arguments and the config they name, with any number of `--config.a.b=value`
  overrides, `check`ed as `load` does; a bad override or config stops with the parser's usage
  error."""
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognised argument {item!r} (overrides look like --config.a.b=value)")
    overrides.append(item[len("--config.") :])
  try:
    return load(args.config, overrides, check), args
  except ConfigError as e:
    parser.error(str(e))


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config's values as JSON types (tuples become lists): what checkpoints store and
  `from_dict` reads back."""
  return json.loads(config.to_json_best_effort())


def write(workdir: epath.Path, config: ml_collections.ConfigDict, step: int) -> None:
  """A run's `config.json`, the config of its latest start; one it replaces that differs is
  kept as `config.before_step_<step>.json`."""
  path, text = workdir / "config.json", config.to_json_best_effort(indent=2)
  if path.exists() and (old := path.read_text()) != text:
    (workdir / f"config.before_step_{step}.json").write_text(old)
  path.write_text(text)


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """A config from a saved one's values (`config.json`, a checkpoint's `config` item): the
  fields of `base_config()` it names take its values; fields it lacks (an older run) keep their
  defaults, and names that are no longer fields are ConfigErrors."""
  config = base_config()
  values = _moved(values)

  def put(node: ml_collections.ConfigDict, tree: dict, prefix: str) -> None:
    for key, value in tree.items():
      if key not in node:
        raise ConfigError(f"saved config has {prefix}{key}, which is not a config field")
      if isinstance(node[key], ml_collections.ConfigDict):
        put(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = tuple(value) if isinstance(node[key], tuple) else value

  put(config, values, "")
  validate(config)
  return config


def _moved(values: dict) -> dict:
  """A saved config's values with `RENAMED` fields under their new names."""
  flat = traverse_util.flatten_dict(values, sep=".")
  return traverse_util.unflatten_dict({RENAMED.get(k, k): v for k, v in flat.items()}, sep=".")


def _renamed(key: str) -> str:
  return f"; {key} is now {RENAMED[key]}" if key in RENAMED else ""


def _parse(text: str, current: object) -> object:
  """Parses `text` as the type of the field's current value."""
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"{text!r} is not a boolean")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  return ast.literal_eval(text)


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Sets one `a.b.c=value` on `config`; unknown fields and unparsable values are ConfigErrors."""
  key, sep, text = item.partition("=")
  if not sep:
    raise ConfigError(f"override {item!r} must look like field.path=value")
  if key in RENAMED:
    raise ConfigError(f"config field {key!r} was renamed: write --config.{RENAMED[key]}={text}")
  node, parts = config, key.split(".")
  for depth, part in enumerate(parts):
    fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    if part not in fields:
      where = ".".join(parts[:depth]) or "the config"
      close = difflib.get_close_matches(part, fields, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else f"; fields: {', '.join(fields)}"
      raise ConfigError(f"unknown config field {key!r}: {where} has no {part!r}{hint}")
    if depth < len(parts) - 1:
      node = node[part]
  current = node[parts[-1]]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"{key!r} is a group of fields; set one of {', '.join(current.keys())}")
  try:
    if key in OPTIONAL_FLOATS:
      node[parts[-1]] = None if text.lower() == "none" else float(text)
    else:
      node[parts[-1]] = _parse(text, current)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"cannot set {key}={text!r} ({type(current).__name__} field): {e}") from None


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  paths = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths |= _field_paths(value, f"{prefix}{key}.")
    else:
      paths.add(prefix + key)
  return paths


class DataSource(NamedTuple):
  """What a `data.name` reads. `path`: "file" (a file or folder), "glob" (files, wildcards
  allowed), "tfds" (a TFDS data set's name) or "" (none); `eval_path`: whether its held-out
  split is `data.eval_path` (otherwise it is split off the training data)."""

  path: str
  eval_path: bool


# The one list of training sources; data/sources.py's `make_source` builds each.
DATA_SOURCES = {
  "demo": DataSource("", False),
  "sharegpt4v": DataSource("file", False),
  "folder": DataSource("file", True),
  "array_record": DataSource("glob", True),
  "tfds": DataSource("tfds", False),
}
DATA_NAMES = tuple(DATA_SOURCES)


def parse_mixture(spec: str) -> list[tuple[str, str, float]]:
  """`data.mixture` as (name, path, weight) triples; "" is no mixture."""
  parts = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    source, _, weight = item.rpartition("=")
    name, _, path = source.partition(":")
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    if name not in DATA_NAMES or not path or not value > 0:
      raise ValueError(
        f"data.mixture item {item!r}: write NAME:PATH=WEIGHT with NAME one of {DATA_NAMES} and "
        "a positive weight"
      )
    parts.append((name, path, value))
  return parts


# Numeric fields and their allowed intervals ("[a, b)": a included, b not); every float field
# must also be finite.
RANGES = {
  "batch_size": "[1, inf)",
  "accum_steps": "[1, inf)",
  "total_steps": "[1, inf)",
  "epochs": "[0, inf)",
  "log_every": "[1, inf)",
  "checkpoint_every": "[1, inf)",
  "keep_checkpoints": "[1, inf)",
  "max_nonfinite_steps": "[1, inf)",
  "profile_steps": "[0, inf)",
  "step_timeout_s": "[0, inf)",
  "eval.every": "[0, inf)",
  "smartclip.temperature": "(0, inf)",
  "smartclip.align_weight": "[0, inf)",
  "smartclip.sparsity_weight": "[0, inf)",
  "clip.temperature": "[0, inf)",
  "clip.subset_dims": "[0, inf)",
  "model.text.trim_padding": "[0, inf)",
  "model.patch_dropout": "[0, 1)",
  "optim.b1": "[0, 1)",
  "optim.b2": "[0, 1)",
  "optim.eps": "(0, inf)",
  "optim.grad_clip_norm": "[0, inf)",
  "optim.end_lr_ratio": "[0, 1]",
  "optim.frozen_positions": "[0, inf)",
  "optim.towers.lr": "[0, inf)",
  "optim.towers.weight_decay": "[0, inf)",
  "optim.towers.warmup_steps": "[0, inf)",
  "optim.mask_net.lr": "[0, inf)",
  "optim.mask_net.weight_decay": "[0, inf)",
  "data.min_image_side": "[1, inf)",
  "data.max_image_pixels": "[1, inf)",
  "data.max_bad_fraction": "[0, 1]",
  "data.num_workers": "[0, inf)",
  "data.eval_batch_size": "[1, inf)",
}
# Held-out split's metrics, and each kind of `eval.tasks` task's (evals/retrieval, zeroshot).
RETRIEVAL_METRICS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)) + (
  "mean_recall",
)
ZEROSHOT_METRICS = ("top1", "top5")


def _in_range(value: float, interval: str) -> bool:
  low, high = (float(x) for x in interval[1:-1].split(","))
  above = value > low or (interval[0] == "[" and value == low)
  below = value < high or (interval[-1] == "]" and value == high)
  return above and below


def _numeric_problems(config: ml_collections.ConfigDict) -> list[str]:
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  errors = []
  for key, value in flat.items():
    values = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
      errors.append(f"{key}={value} must be finite")
    elif key in RANGES and not _in_range(value, RANGES[key]):
      errors.append(f"{key}={value} is outside {RANGES[key]}")
  d = config.data
  if not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
    errors.append(f"data.crop_scale={d.crop_scale}: write (low, high) with 0 < low <= high <= 1")
  if not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
    errors.append(f"data.crop_ratio={d.crop_ratio}: write (low, high) with 0 < low <= high")
  return errors


def best_metric_problem(config: ml_collections.ConfigDict, task_labels: dict[str, bool]) -> str:
  """Why `eval.best_metric` names no metric the run's evaluation produces ("" if it does).
  `task_labels`: each `eval.tasks` task's label and whether it is a retrieval task."""
  name = config.eval.best_metric
  if not name:
    return ""
  task, _, metric = name.rpartition("/")
  if not task:
    known, where = RETRIEVAL_METRICS, "the held-out split"
  elif task in task_labels:
    known = RETRIEVAL_METRICS if task_labels[task] else ZEROSHOT_METRICS
    where = f"task {task}"
  else:
    return (
      f"eval.best_metric={name!r}: eval.tasks has no task {task!r} "
      f"(tasks: {', '.join(task_labels) or 'none'})"
    )
  if metric in known:
    return ""
  return f"eval.best_metric={name!r}: {where} gives {', '.join(known)}"


def _regex_problem(field: str, pattern: object) -> str:
  if not isinstance(pattern, str):
    return f"{field}: {pattern!r} is not a regex string"
  try:
    re.compile(pattern)
  except re.error as e:
    return f"{field}: {pattern!r} is not a regex ({e})"
  return ""


def _table_problems(optim: ml_collections.ConfigDict) -> list[str]:
  """The parameter-group tables' shapes, regexes and values (which parameters they match is
  checked against the model's paths when the optimizer first sees them, optim.settings)."""
  errors = [_regex_problem("optim.frozen", optim.frozen)] if optim.frozen else []
  for field, ok, what in (
    ("groups", lambda v: v in OPTIM_GROUPS, f"one of {OPTIM_GROUPS}"),
    ("lr_mults", lambda v: _is_number(v) and 0 <= v < math.inf, "a number >= 0"),
    ("wd_mults", lambda v: _is_number(v) and 0 <= v < math.inf, "a number >= 0"),
  ):
    for entry in optim[field]:
      if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
        errors.append(f"optim.{field}: {entry!r} is not a (regex, value) pair")
        continue
      errors.append(_regex_problem(f"optim.{field}", entry[0]))
      if not ok(entry[1]):
        errors.append(f"optim.{field}: {entry!r} needs {what} after the regex")
  return [e for e in errors if e]


def _is_number(value: object) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Everything wrong with `config` that can be seen without devices or files, one line each."""
  m = config.model
  errors = []
  if config.loss not in LOSSES:
    errors.append(f"loss={config.loss!r}: choose one of {LOSSES}")
  if config.loss_impl not in LOSS_IMPLS:
    errors.append(f"loss_impl={config.loss_impl!r}: choose one of {LOSS_IMPLS}")
  if config.recipe and config.recipe not in ARCHS:
    errors.append(f"recipe={config.recipe!r}: one of {', '.join(ARCHS)}, or '' for none")
  if config.checkpoint_atomicity not in storage.ATOMICITIES:
    errors.append(
      f"checkpoint_atomicity={config.checkpoint_atomicity!r}: choose one of {storage.ATOMICITIES}"
    )
  if config.skip_nonfinite not in SKIP_FORMS:
    errors.append(f"skip_nonfinite={config.skip_nonfinite!r}: choose one of {SKIP_FORMS}")
  if config.data.name not in DATA_NAMES + ("",):
    errors.append(f"data.name={config.data.name!r}: choose one of {DATA_NAMES}")
  source = DATA_SOURCES.get(config.data.name)
  if source and source.path and not config.data.path:
    errors.append(f"data.name={config.data.name!r} needs data.path")
  try:
    parse_mixture(config.data.mixture)
  except ValueError as e:
    errors.append(str(e))
  if config.data.caption_mode not in CAPTION_MODES:
    errors.append(f"data.caption_mode={config.data.caption_mode!r}: choose one of {CAPTION_MODES}")
  if config.data.sentence_split not in SENTENCE_SPLITS:
    errors.append(
      f"data.sentence_split={config.data.sentence_split!r}: choose one of {SENTENCE_SPLITS}"
    )
  if config.data.train_transform not in TRAIN_TRANSFORMS:
    errors.append(
      f"data.train_transform={config.data.train_transform!r}: choose one of {TRAIN_TRANSFORMS}"
    )
  if config.optim.decay not in DECAYS:
    errors.append(f"optim.decay={config.optim.decay!r}: choose one of {DECAYS}")
  errors += _table_problems(config.optim)
  if m.attention not in ATTENTIONS:
    errors.append(f"model.attention={m.attention!r}: choose one of {ATTENTIONS}")
  if m.remat not in REMATS:
    errors.append(f"model.remat={m.remat!r}: choose one of {REMATS}")
  if m.activation not in ("quick_gelu", "gelu"):
    errors.append(f"model.activation={m.activation!r}: choose quick_gelu or gelu")
  if m.vision.image_size % m.vision.patch_size:
    errors.append(
      f"model.vision.image_size {m.vision.image_size} is not a multiple of "
      f"patch_size {m.vision.patch_size}"
    )
  for name, width, heads in (
    ("vision", m.vision.width, m.vision.heads),
    ("text", m.text.width, m.text.heads),
    ("mask", m.text.width, m.mask.heads),
  ):
    if width % heads:
      errors.append(f"model.{name}: width {width} is not divisible by {heads} heads")
  errors += _numeric_problems(config)
  if m.text.trim_padding and m.mask_net:
    errors.append(
      "model.text.trim_padding needs loss=clip or siglip (model.mask_net=false): "
      "SmartCLIP's mask network attends to every position, padding included, so cutting it "
      "changes the masks"
    )
  if config.optim.frozen_positions >= m.text.context_length:
    errors.append(
      f"optim.frozen_positions={config.optim.frozen_positions} freezes every "
      f"position of a {m.text.context_length}-token context"
    )
  return errors


def raise_problems(errors: Sequence[str]) -> None:
  """One ConfigError naming every problem, or nothing."""
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def check_fields(config: ml_collections.ConfigDict) -> None:
  """A config file's `get_config` may add fields; those `base_config()` lacks stop here."""
  unknown = sorted(_field_paths(config) - _field_paths(base_config()))
  if unknown:
    raise ConfigError(
      "config has fields that base_config() does not define: "
      + ", ".join(k + _renamed(k) for k in unknown)
    )


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked without devices or files (`problems`); `check_batch` does the
  mesh part and `preflight.check` what a training run needs besides."""
  check_fields(config)
  raise_problems(problems(config))


def check_batch(config: ml_collections.ConfigDict, data_parallel: int, processes: int) -> None:
  """The global batch must split evenly over the data axes and over the processes."""
  for what, n in (("data x fsdp mesh axes", data_parallel), ("processes", processes)):
    if config.batch_size % n:
      raise ConfigError(
        f"batch_size={config.batch_size} is not divisible by the {n} {what}; use a multiple of {n}"
      )
  per_device = config.batch_size // data_parallel
  if per_device % config.accum_steps:
    raise ConfigError(
      f"accum_steps={config.accum_steps} does not divide the {per_device} "
      f"examples per data-parallel device (batch_size={config.batch_size})"
    )
  if config.data.eval_batch_size % data_parallel:
    raise ConfigError(
      f"data.eval_batch_size={config.data.eval_batch_size} is not divisible by "
      f"the {data_parallel} data x fsdp mesh axes"
    )
