"""`smartclip_jax.load(path)`: any checkpoint this project meets, as one ready-to-use model.

Paths: a workdir or Orbax checkpoint of ours; a PyTorch file (`.pt`, `.pth`, `.bin`,
`.safetensors`) in the OpenAI / open_clip / Long-CLIP / SmartCLIP layout or transformers'; a
transformers `CLIPModel` directory. The architecture comes from the weights' shapes. Nothing
pickled is executed: safetensors, or `torch.load(weights_only=True)`, or a clear refusal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image

from smartclip_jax import checkpoint, config as config_lib
from smartclip_jax.data import decode
from smartclip_jax.interop import layout
from smartclip_jax.models.clip import TwoTowers, build_model
from smartclip_jax import step as step_lib
from smartclip_jax.tokenizer import tokenize

log = logging.getLogger("smartclip_jax")

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclasses.dataclass
class Loaded:
  """A model with its parameters. Embeddings are unnormalised and projected, float32."""

  config: ml_collections.ConfigDict
  params: Any
  model: TwoTowers

  def __post_init__(self):
    apply = lambda method: jax.jit(lambda p, x: self.model.apply({"params": p}, x, method=method))
    self._image, self._text = apply("encode_image"), apply("encode_text")

  def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 [N, context_length], CLIP's BPE, truncated with the end token kept."""
    return tokenize(texts, self.config.model.text.context_length)

  def encode_image(self, images: np.ndarray | jax.Array) -> jax.Array:
    """float32 NHWC images, resized and CLIP-normalised (see `preprocess`) -> [N, D]."""
    return self._image(self.params, jnp.asarray(images, jnp.float32))

  def encode_text(self, tokens: np.ndarray | jax.Array) -> jax.Array:
    return self._text(self.params, jnp.asarray(tokens, jnp.int32))

  def preprocess(self, image: PIL.Image.Image) -> np.ndarray:
    """CLIP's eval transform: RGB, shorter side resized (bicubic), centre crop, normalised."""
    pixels = decode.centre_crop(image.convert("RGB"), self.config.model.vision.image_size)
    return decode.normalize_image(pixels)


def load(path: str | pathlib.Path, **overrides) -> Loaded:
  """The model at `path` (see the module doc). `overrides` set config fields: a model field by
  its name (`activation="gelu"`, e.g. for open_clip's non-QuickGELU models), any other by its
  dotted path written with `__` (`model__mask__hard=False`)."""
  path = pathlib.Path(path)
  if (
    path.is_dir()
    and (path / "config.json").is_file()
    and not (path / "checkpoints").exists()
    and _is_hf_dir(path)
  ):
    state, config = _read_hf_dir(path)
  elif path.is_file() and path.suffix in TORCH_SUFFIXES:
    state = read_torch_file(path)
    state, config = _as_openai(state, path)
  elif path.is_file():
    raise ValueError(
      f"{path}: not a checkpoint this loader knows (give a workdir, an Orbax "
      f"checkpoint, a transformers directory or a {'/'.join(TORCH_SUFFIXES)} file)"
    )
  else:
    return _load_orbax(path, overrides)
  _override(config, overrides)
  model = build_model(config)
  shapes = nn.meta.unbox(step_lib.abstract_params(model, config))
  unused = layout.unused_keys(state, shapes)
  if unused:
    log.warning(
      "%s: %d tensors not used by the model: %s", path, len(unused), checkpoint.describe(unused)
    )
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), layout.from_openai(state, shapes))
  return Loaded(config, params, model)


def is_torch_path(path: str | pathlib.Path) -> bool:
  """A PyTorch file or a transformers directory (what `params_from_torch` reads)."""
  path = pathlib.Path(path)
  if path.is_dir():
    return (path / "config.json").is_file() and _is_hf_dir(path)
  return path.suffix in TORCH_SUFFIXES


def params_from_torch(path: str | pathlib.Path, target: Any) -> tuple[Any, list[str], list[str]]:
  """`init_from` a PyTorch checkpoint: like `checkpoint.load_params`, the tensors it has go
  into `target`'s leaves (and shardings), the others keep their values (e.g. the mask network
  when starting from OpenAI CLIP); returns (params, names kept fresh, names not used)."""
  path = pathlib.Path(path)
  state = _read_hf_dir(path)[0] if path.is_dir() else _as_openai(read_torch_file(path), path)[0]
  found = layout.flatten(layout.from_openai(state, target, partial=True))
  flat = layout.flatten(target)
  params = layout.unflatten(
    {
      n: jax.device_put(np.asarray(found[n], x.dtype), x.sharding) if n in found else x
      for n, x in flat.items()
    }
  )
  return params, sorted(set(flat) - set(found)), layout.unused_keys(state, target)


def read_torch_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A state_dict as numpy arrays; training checkpoints ({'state_dict': ...}, 'module.'
  prefixes) are unwrapped. Pickle is read only with torch's weights_only loader."""
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file

    return load_file(str(path))
  import torch

  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  torch raises UnpicklingError, RuntimeError, ...
    raise ValueError(
      f"{path} cannot be read without running pickled code, which this loader refuses "
      f"({type(e).__name__}: {str(e).splitlines()[0]}). A TorchScript archive (OpenAI's "
      "original .pt files) can be converted where you trust it: "
      "torch.save(torch.jit.load(path).state_dict(), 'weights.pt')."
    ) from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
  strip = lambda k: k[len("module.") :] if k.startswith("module.") else k
  return {strip(k): (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in obj.items()}


def _is_hf_dir(path: pathlib.Path) -> bool:
  return json.loads((path / "config.json").read_text()).get("model_type") == "clip"


def _read_hf_dir(path: pathlib.Path) -> tuple[dict, ml_collections.ConfigDict]:
  files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
  if not files:
    raise ValueError(
      f"{path} has a CLIP config.json but no model.safetensors or "
      "pytorch_model.bin (sharded checkpoints are not supported)"
    )
  state, config = _as_openai(read_torch_file(files[0]), path)
  hf = json.loads((path / "config.json").read_text())
  for ours, theirs in (("vision", "vision_config"), ("text", "text_config")):
    c = hf.get(theirs, {})
    if "num_attention_heads" in c:
      config.model[ours].heads = c["num_attention_heads"]
  act = hf.get("text_config", {}).get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ValueError(f"{path}: activation {act!r} is not supported (quick_gelu, gelu)")
  config.model.activation = act
  return state, config


def _as_openai(state: dict, path: pathlib.Path) -> tuple[dict, ml_collections.ConfigDict]:
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
  config.loss = "smartclip" if arch["mask_net"] else "siglip" if arch["logit_bias"] else "clip"
  config.model.embed_dim = int(arch["embed_dim"])
  config.model.vision.update({k: int(v) for k, v in arch["vision"].items()})
  config.model.text.update({k: int(v) for k, v in arch["text"].items()})
  config.model.mask.heads = int(arch["mask_heads"])
  config.optim.frozen_positions = min(
    config.optim.frozen_positions, config.model.text.context_length - 1
  )
  _apply_model_card(config, path.with_suffix(".json"))
  return state, config


def _apply_model_card(config: ml_collections.ConfigDict, card: pathlib.Path) -> None:
  """What a state_dict cannot say (head counts, activation), from an open_clip model config
  beside it (`m.json` for `m.pt`, as `convert` writes)."""
  if not card.is_file():
    return
  spec = json.loads(card.read_text())
  if "vision_cfg" not in spec:
    return
  vision, text = spec["vision_cfg"], spec.get("text_cfg", {})
  config.model.vision.heads = config.model.vision.width // vision.get("head_width", 64)
  config.model.text.heads = text.get("heads", config.model.text.heads)
  config.model.mask.heads = (
    config.model.text.heads
  )  # the reference's rule (docs/method.md, the model)
  config.model.activation = "quick_gelu" if spec.get("quick_gelu") else "gelu"


def _override(config: ml_collections.ConfigDict, overrides: dict) -> None:
  for key, value in overrides.items():
    dotted = key.replace("__", ".")
    if "." not in dotted and dotted not in config and dotted in config.model:
      dotted = f"model.{dotted}"
    config_lib.apply_override(config, f"{dotted}={value}")
  config_lib.validate(config)


def _load_orbax(path: pathlib.Path, overrides: dict) -> Loaded:
  step_dir = checkpoint.resolve_step_dir(path)
  saved = checkpoint.saved_config(step_dir)
  config = config_lib.from_dict(saved)
  _override(config, overrides)
  model = build_model(config)
  batch = step_lib.dummy_batch(config)
  fresh = nn.meta.unbox(
    jax.jit(model.init)(jax.random.key(0), batch["image"], batch["tokens"])["params"]
  )
  params, missing, unused = checkpoint.load_params(step_dir, fresh)
  if missing:
    raise ValueError(
      f"{step_dir} lacks parameters the config needs: {checkpoint.describe(missing)}"
    )
  if unused:
    log.warning("%s: parameters not used by the model: %s", step_dir, checkpoint.describe(unused))
  return Loaded(config, params, model)
