"""PyTorch weights as numpy arrays in the OpenAI layout, with the config their shapes imply.

Files (`.pt`, `.pth`, `.bin`, `.safetensors`) in the OpenAI / open_clip / Long-CLIP / SmartCLIP
layout or transformers'; OpenAI's TorchScript archives (`torchscript.py`); transformers
`CLIPModel` directories. Nothing pickled is executed: safetensors, a TorchScript archive's
tensors through a tensors-only unpickler, or `torch.load(weights_only=True)`, or a refusal.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import ml_collections
import numpy as np
from etils import epath

from smartclip_jax import config as config_lib, storage
from smartclip_jax.interop import layout, torchscript

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
SAFE_TORCH = (2, 6)  # the first torch whose weights_only unpickler runs no code
HUB_PREFIX = "hf-hub:"
OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"  # beside them: {"model_cfg": ..., "preprocess_cfg": ...}

log = logging.getLogger("smartclip_jax")
Stated = tuple[str, pathlib.Path] | None  # an activation, and the file that states it


def resolve(path: str | os.PathLike) -> epath.Path:
  """A model's location: `hf-hub:ORG/NAME[@REVISION]` resolved in huggingface_hub's local cache
  (offline), anything else as a local or gs:// path (`storage.path`)."""
  name = os.fspath(path)
  if not name.startswith(HUB_PREFIX):
    return storage.path(name)
  repo, _, revision = name[len(HUB_PREFIX) :].partition("@")
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError

  try:
    snapshot = epath.Path(
      snapshot_download(
        repo,
        revision=revision or None,
        cache_dir=os.environ.get("HF_HUB_CACHE"),  # read now, not when huggingface_hub loaded
        local_files_only=True,
      )
    )
  except LocalEntryNotFoundError:
    raise FileNotFoundError(
      f"{name}: not in the Hugging Face cache ({os.environ.get('HF_HUB_CACHE', 'the default')}); "
      f"fetch it first with: hf download {repo}" + (f" --revision {revision}" if revision else "")
    ) from None
  for file in OPEN_CLIP_HUB_FILES:  # an open_clip repository: its weights file
    if (snapshot / file).is_file():
      return snapshot / file
  return snapshot


def is_torch_path(path: str | pathlib.Path) -> bool:
  """A PyTorch file or a transformers directory (what `read` reads)."""
  path = resolve(path)
  if path.is_dir():
    return (path / "config.json").is_file() and is_hf_dir(path)
  return path.suffix in TORCH_SUFFIXES


def read(
  path: str | pathlib.Path, activation: str | None = None
) -> tuple[dict[str, np.ndarray], ml_collections.ConfigDict]:
  """A PyTorch file or transformers directory: its tensors in the OpenAI layout, and the config
  its weights and the model config beside them (`model_card`, or transformers' config.json)
  describe. `activation`, the caller's (`load(path, activation=...)`, a run's), is taken where
  the files say nothing; where they state another, it is an error."""
  path = resolve(path)
  if path.is_dir():
    state, config, stated = read_hf_dir(path)
  else:
    state, config = as_openai(read_torch_file(path), path)
    stated = _apply_model_card(config, path)
  _set_activation(config, path, stated, activation)
  return state, config


def _set_activation(
  config: ml_collections.ConfigDict, path: pathlib.Path, stated: Stated, asked: str | None
) -> None:
  if stated and asked and stated[0] != asked:
    raise ValueError(
      f"{path}: {stated[1]} says the activation is {stated[0]!r}, but {asked!r} was asked for "
      f"(load's activation=, --activation, or a run's model.activation): use {stated[0]!r}, or "
      f"correct {stated[1].name} if it is wrong"
    )
  if not (stated or asked):
    log.warning(
      "%s does not record its activation (no model config json beside it); assuming "
      "QuickGELU, OpenAI CLIP's. For a GELU model (open_clip's, unless trained by OpenAI) say "
      "so: smartclip_jax.load(path, activation='gelu'), convert --activation gelu, or open_clip's "
      "model config beside the weights (%s.json, or %s)",
      path,
      path.stem,
      OPEN_CLIP_CONFIG,
    )
  config.model.activation = asked or (stated[0] if stated else "quick_gelu")


def read_torch_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A state_dict as numpy arrays; training checkpoints ({'state_dict': ...}, 'module.'
  prefixes) are unwrapped. Pickle is read only with torch's weights_only loader."""
  if path.suffix == ".safetensors":
    from safetensors.numpy import load

    return load(path.read_bytes())
  with path.open("rb") as f:
    if torchscript.is_archive(f):  # OpenAI's original files: tensors only, no code run
      try:
        return torchscript.read_archive(f)
      except torchscript.RefusedArchive as e:
        raise ValueError(f"{path}: {e}; refused (nothing in it was run)") from None
  import torch

  if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < SAFE_TORCH:
    raise ValueError(
      f"{path}: reading a pickled checkpoint without running its code needs torch >= "
      f"{'.'.join(map(str, SAFE_TORCH))} (older weights_only loads could still run code, "
      f"CVE-2025-32434); this is torch {torch.__version__}. Upgrade torch, or convert the file "
      "to .safetensors"
    )
  try:
    with path.open("rb") as f:
      obj = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  torch raises UnpicklingError, RuntimeError, ...
    raise ValueError(
      f"{path} cannot be read without running pickled code, which this loader refuses "
      f"({type(e).__name__}: {str(e).splitlines()[0]})."
    ) from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
  strip = lambda k: k[len("module.") :] if k.startswith("module.") else k
  return {strip(k): (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in obj.items()}


def is_hf_dir(path: pathlib.Path) -> bool:
  return json.loads((path / "config.json").read_text()).get("model_type") == "clip"


def read_hf_dir(path: pathlib.Path) -> tuple[dict, ml_collections.ConfigDict, Stated]:
  """A transformers directory: its tensors, config, and the activation its config.json states
  (transformers' default, QuickGELU, where it names none)."""
  files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
  if not files:
    raise ValueError(
      f"{path} has a CLIP config.json but no model.safetensors or "
      "pytorch_model.bin (sharded checkpoints are not supported)"
    )
  state, config = as_openai(read_torch_file(files[0]), path)
  hf = json.loads((path / "config.json").read_text())
  for ours, theirs in (("vision", "vision_config"), ("text", "text_config")):
    c = hf.get(theirs, {})
    if "num_attention_heads" in c:
      config.model[ours].heads = c["num_attention_heads"]
  act = hf.get("text_config", {}).get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ValueError(f"{path}: activation {act!r} is not supported (quick_gelu, gelu)")
  return state, config, (act, path / "config.json")


def as_openai(state: dict, path: pathlib.Path) -> tuple[dict, ml_collections.ConfigDict]:
  """Detects the layout from the keys and builds the config the weights imply."""
  if any(k.startswith(("vision_model.", "text_model.")) for k in state):
    state = layout.hf_to_openai(state)
  if "visual.conv1.weight" not in state:
    raise ValueError(
      f"{path}: neither the OpenAI/open_clip layout nor transformers' "
      f"(first keys: {sorted(state)[:5]})"
    )
  arch = layout.infer_arch(state)
  config = config_lib.base_config()
  config.model.mask_net = bool(arch["mask_net"])
  config.model.logit_bias_init = 0.0 if arch["logit_bias"] else None  # the weights set its value
  config.model.embed_dim = int(arch["embed_dim"])
  config.model.vision.update({k: int(v) for k, v in arch["vision"].items()})
  config.model.text.update({k: int(v) for k, v in arch["text"].items()})
  config.model.mask.heads = int(arch["mask_heads"])
  config.optim.frozen_positions = min(
    config.optim.frozen_positions, config.model.text.context_length - 1
  )
  return state, config


def model_card(path: pathlib.Path) -> tuple[pathlib.Path, dict] | None:
  """The open_clip model config of the weights file `path`, and where it is: `<name>.json` beside
  it (the form of open_clip's model_configs/ and of `convert`'s outputs), else the `model_cfg` of
  an `open_clip_config.json` in its directory (open_clip's hub repositories)."""
  for card, key in (
    (path.with_suffix(".json"), None),
    (path.parent / OPEN_CLIP_CONFIG, "model_cfg"),
  ):
    if card.is_file():
      spec = json.loads(card.read_text())
      spec = spec.get(key) if key else spec
      if isinstance(spec, dict) and "vision_cfg" in spec:
        return card, spec
  return None


def _apply_model_card(config: ml_collections.ConfigDict, path: pathlib.Path) -> Stated:
  """What a state_dict cannot say (head counts, activation, the logit inits) from its model card,
  once the sizes the card states are found to be the weights'. Absent fields take open_clip's
  defaults (head_width 64, text heads 8, quick_gelu false); the activation it states is returned."""
  found = model_card(path)
  if found is None:
    return None
  card, spec = found
  m, vision, text = config.model, spec["vision_cfg"], spec.get("text_cfg", {})
  square = lambda v: v[0] if isinstance(v, (list, tuple)) and len(set(v)) == 1 else v
  sizes = {
    "embed_dim": (spec.get("embed_dim"), m.embed_dim),
    "vision_cfg.image_size": (square(vision.get("image_size")), m.vision.image_size),
    "vision_cfg.patch_size": (square(vision.get("patch_size")), m.vision.patch_size),
    "vision_cfg.width": (vision.get("width"), m.vision.width),
    "vision_cfg.layers": (vision.get("layers"), m.vision.layers),
    "text_cfg.context_length": (text.get("context_length"), m.text.context_length),
    "text_cfg.vocab_size": (text.get("vocab_size"), m.text.vocab_size),
    "text_cfg.width": (text.get("width"), m.text.width),
    "text_cfg.layers": (text.get("layers"), m.text.layers),
  }
  wrong = [
    f"{k}={said} (the weights: {got})"
    for k, (said, got) in sizes.items()
    if said not in (None, got)
  ]
  head_width = vision.get("head_width", 64)
  if m.vision.width % head_width:
    wrong.append(
      f"vision_cfg.head_width={head_width} (does not divide the width, {m.vision.width})"
    )
  if wrong:
    raise ValueError(
      f"{card} does not describe the weights {path.name}: it says {'; '.join(wrong)}. Correct "
      f"it, or move it away to let the weights' shapes set the sizes"
    )
  m.vision.heads = m.vision.width // head_width
  m.text.heads = text.get("heads", 8)
  m.mask.heads = m.text.heads  # the reference's rule (docs/method.md, the model)
  m.logit_scale_init = float(spec.get("init_logit_scale", m.logit_scale_init))
  if m.logit_bias_init is not None and spec.get("init_logit_bias") is not None:
    m.logit_bias_init = float(spec["init_logit_bias"])
  return ("quick_gelu" if spec.get("quick_gelu") else "gelu"), card
