"""Config schema, loading, `--config.a.b=value` overrides and validation.

Every config in `configs/` starts from `base_config()`, so the set of fields is fixed here and
a mistyped override fails with the field's name and the nearest real ones, before any compile.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib
from collections.abc import Sequence

import ml_collections

LOSSES = ("smartclip", "clip", "siglip")
LOSS_IMPLS = ("global", "ring")
SKIP_FORMS = ("auto", "where", "cond")  # step.keep_if_finite
REMATS = ("none", "full", "dots")  # models.layers.REMAT_POLICIES, and none
CAPTION_MODES = ("prefix", "full", "first")
TRAIN_TRANSFORMS = ("centre_crop", "random_resized_crop")
DECAYS = ("all", "matrices")


# OpenAI CLIP tower sizes; SmartCLIP's mask net uses the text tower's head count.
ARCHS = {
  "vit_b16": dict(
    embed_dim=512,
    vision=dict(image_size=224, patch_size=16, width=768, layers=12, heads=12),
    text=dict(width=512, layers=12, heads=8),
    mask_heads=8,
  ),
  "vit_l14": dict(
    embed_dim=768,
    vision=dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
    text=dict(width=768, layers=12, heads=12),
    mask_heads=12,
  ),
}


class ConfigError(ValueError):
  """A config that cannot run: unknown field, wrong type, inconsistent sizes."""


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
  c.log_every = 50
  c.checkpoint_every = 500
  c.eval_every = 0  # 0: evaluate once, at the end
  c.eval = ml_collections.ConfigDict()
  c.eval.every = c.get_ref("eval_every")  # the same field, under the eval group's name
  # During training, besides the held-out split: `--tasks` of smartclip_jax.evaluate, e.g.
  # "urban1k:/data/Urban1k,cifar10"; results in eval/step_<N>.json and TensorBoard.
  c.eval.tasks = ""
  # Keep the best checkpoint by this eval metric (under checkpoints_best/): "i2t_r1" of the
  # held-out split, or "<task>/<metric>" such as "urban1k/t2i_r1"; "" keeps none.
  c.eval.best_metric = ""
  c.keep_checkpoints = 3
  # Start from another model's parameters (fresh optimizer, step 0): a workdir or Orbax
  # checkpoint, a PyTorch file or a transformers directory (anything smartclip_jax.load reads).
  c.init_from = ""
  c.profile_steps = 0  # trace this many steps after the first into WORKDIR/tensorboard
  c.max_nonfinite_steps = 10  # stop after this many steps in a row with non-finite loss/grads
  # How a non-finite step is left out (step.keep_if_finite): "where" (leaf by leaf) or "cond";
  # "auto" is where on TPU/GPU, cond on CPU. Same result; they differ in memory (README, AOT).
  c.skip_nonfinite = "auto"

  # modular=False: the ablation without modular alignment (see losses.smartclip_loss).
  c.smartclip = ml_collections.ConfigDict(
    dict(temperature=0.01, align_weight=10.0, sparsity_weight=2.0, modular=True)
  )
  c.clip = ml_collections.ConfigDict(dict(temperature=0.0))  # loss=clip: > 0 fixes τ, 0 learns it

  arch = ARCHS["vit_l14"]  # sizes only; configs pick theirs
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = arch["embed_dim"]
  c.model.activation = "quick_gelu"
  c.model.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
  c.model.remat = "none"  # none | full | dots: what each tower block keeps for the backward pass
  c.model.scan_layers = False  # tower blocks under nn.scan: compile time flat in depth
  c.model.vision = ml_collections.ConfigDict(arch["vision"])
  c.model.text = ml_collections.ConfigDict(
    dict(context_length=248, vocab_size=49408, **arch["text"])
  )
  # CLIP/SigLIP: each step's text tower runs on its longest caption rounded up to a multiple of
  # this, not on all context_length positions (0: all). Same loss; see train.text_length.
  c.model.text.trim_padding = 0
  c.model.mask = ml_collections.ConfigDict(dict(heads=arch["mask_heads"], hard=True))

  c.optim = ml_collections.ConfigDict()
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW's, as the reference
  # Weight decay on every parameter of a group (all: the reference) or on matrices only
  # (matrices: open_clip's, for training from scratch).
  c.optim.decay = "all"
  c.optim.grad_clip_norm = 0.0  # 0: no clipping
  c.optim.end_lr_ratio = 0.0  # cosine ends at lr * end_lr_ratio
  c.optim.frozen_positions = 20
  c.optim.towers = ml_collections.ConfigDict(dict(lr=1e-6, weight_decay=1e-2, warmup_steps=200))
  c.optim.mask_net = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.0))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the other devices

  c.data = ml_collections.ConfigDict()
  c.data.name = "demo"  # demo | sharegpt4v | folder | array_record | tfds
  # ShareGPT4V JSON; folder dir / CSV / TSV / JSONL; ArrayRecord dir or glob; TFDS name.
  c.data.path = ""
  c.data.image_root = ""  # images are read relative to this (default: beside data.path)
  c.data.eval_path = ""  # held-out split for folder / array_record (ShareGPT4V: its first 1k)
  c.data.holdout = 1000  # ShareGPT4V records held out of training (the ShareGPT4V-1k test set)
  c.data.image_key = "filepath"  # CSV/TSV columns, open_clip's names
  c.data.caption_key = "title"
  c.data.tfds_data_dir = ""  # TFDS: where the prepared data set lives (TFDS's default if "")
  c.data.tfds_train_split = "train"
  c.data.tfds_eval_split = "validation"
  c.data.tfds_image_key = "image"  # '/'-separated paths into a TFDS example
  c.data.tfds_caption_key = "captions/text"
  c.data.num_train = 4096  # demo data only
  c.data.num_eval = 256  # demo data only
  c.data.caption_mode = "prefix"  # prefix: first k sentences, k ~ U[1, n] per load
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
  c.data.eval_batch_size = 256
  return c


def recipe_config(arch: str, loss: str = "smartclip") -> ml_collections.ConfigDict:
  """The recipe (docs/method.md, the recipe) for an OpenAI CLIP architecture in `ARCHS`."""
  a = ARCHS[arch]
  c = base_config()
  c.loss = loss
  c.model.embed_dim = a["embed_dim"]
  c.model.dtype = "bfloat16"
  c.model.vision.update(**a["vision"])
  c.model.text.update(**a["text"])
  c.model.mask.heads = a["mask_heads"]
  return c


def load(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Imports `path`, calls its `get_config()`, applies `a.b=value` overrides, validates."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    apply_override(config, item)
  validate(config)
  return config


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config's values as JSON types (tuples become lists): what checkpoints store and
  `from_dict` reads back."""
  return json.loads(config.to_json_best_effort())


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """A config from a saved one's values (`config.json`, a checkpoint's `config` item): the
  fields of `base_config()` it names take its values; fields it lacks (an older run) keep their
  defaults, and names that are no longer fields are ConfigErrors."""
  config = base_config()

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


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked without devices; `check_batch` does the mesh part."""
  unknown = sorted(_field_paths(config) - _field_paths(base_config()))
  if unknown:
    raise ConfigError(f"config has fields that base_config() does not define: {unknown}")
  m = config.model
  errors = []
  if config.loss not in LOSSES:
    errors.append(f"loss={config.loss!r}: choose one of {LOSSES}")
  if config.loss_impl not in LOSS_IMPLS:
    errors.append(f"loss_impl={config.loss_impl!r}: choose one of {LOSS_IMPLS}")
  if config.skip_nonfinite not in SKIP_FORMS:
    errors.append(f"skip_nonfinite={config.skip_nonfinite!r}: choose one of {SKIP_FORMS}")
  if config.data.name in ("sharegpt4v", "folder", "array_record", "tfds") and not config.data.path:
    errors.append(f"data.name={config.data.name!r} needs data.path")
  if config.data.caption_mode not in CAPTION_MODES:
    errors.append(f"data.caption_mode={config.data.caption_mode!r}: choose one of {CAPTION_MODES}")
  if config.data.train_transform not in TRAIN_TRANSFORMS:
    errors.append(
      f"data.train_transform={config.data.train_transform!r}: choose one of {TRAIN_TRANSFORMS}"
    )
  if config.optim.decay not in DECAYS:
    errors.append(f"optim.decay={config.optim.decay!r}: choose one of {DECAYS}")
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
  for field in ("batch_size", "accum_steps", "total_steps", "log_every", "checkpoint_every"):
    if config[field] <= 0:
      errors.append(f"{field}={config[field]} must be positive")
  if m.text.trim_padding < 0:
    errors.append(f"model.text.trim_padding={m.text.trim_padding} must be >= 0")
  if m.text.trim_padding and config.loss == "smartclip":
    errors.append(
      "model.text.trim_padding needs loss=clip or siglip: SmartCLIP's mask network "
      "attends to every position, padding included, so cutting it changes the masks"
    )
  if config.optim.frozen_positions >= m.text.context_length:
    errors.append(
      f"optim.frozen_positions={config.optim.frozen_positions} freezes every "
      f"position of a {m.text.context_length}-token context"
    )
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


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
