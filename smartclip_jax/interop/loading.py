"""`smartclip_jax.load(path)`: any checkpoint this project meets, as one ready-to-use model.

Paths (local or gs://): a workdir or Orbax checkpoint of ours; a PyTorch file (`.pt`, `.pth`,
`.bin`, `.safetensors`) in the OpenAI / open_clip / Long-CLIP / SmartCLIP layout or
transformers'; OpenAI's TorchScript archives; a transformers `CLIPModel` directory; or a
`hf-hub:ORG/NAME` name in the local Hugging Face cache. The architecture comes from the weights'
shapes. Nothing pickled is executed (interop/torch_files.py).
"""

from __future__ import annotations

import dataclasses
import functools
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

from smartclip_jax import checkpoint, config as config_lib, init_from, step as step_lib
from smartclip_jax.evals.encoder import Encoder
from smartclip_jax.interop import layout, torch_files
from smartclip_jax.models.clip import TwoTowers, build_model

log = logging.getLogger("smartclip_jax")


@dataclasses.dataclass
class Loaded:
  """A model with its parameters. Embeddings are unnormalised and projected, float32 numpy,
  computed by the one `Encoder` (over every local device)."""

  config: ml_collections.ConfigDict
  params: Any
  model: TwoTowers

  def encoder(self, batch_size: int = 256, workers: int = 0) -> Encoder:
    """An `Encoder` of this model, `batch_size` rows per padded batch, images decoded by
    `workers` Grain processes (0: threads)."""
    return Encoder(self.config, self.model, self.params, batch_size=batch_size, workers=workers)

  @functools.cached_property
  def _encoder(self) -> Encoder:
    return self.encoder()

  def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 [N, context_length], CLIP's BPE, truncated with the end token kept."""
    return self._encoder.tokenize(texts)

  def encode_image(self, images: np.ndarray | jax.Array) -> np.ndarray:
    """float32 NHWC images, resized and CLIP-normalised (see `preprocess`) -> [N, D]."""
    images = np.asarray(images, np.float32)
    return self._encoder.apply("encode_image", images, batch_size=len(images))

  def encode_text(self, tokens: np.ndarray | jax.Array) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32)
    return self._encoder.apply("encode_text", tokens, batch_size=len(tokens))

  def preprocess(self, image: PIL.Image.Image) -> np.ndarray:
    """CLIP's eval transform: RGB, shorter side resized (bicubic), centre crop, normalised."""
    return self._encoder.preprocess(image)


def load(path: str | pathlib.Path, **overrides) -> Loaded:
  """The model at `path` (see the module doc). `overrides` set config fields by their dotted
  paths written with `__` (`model__mask__hard=False`), where `model__` may be left out
  (`activation="gelu"` for a GELU state_dict with no model config beside it;
  `vision__image_size=336` to run at another resolution, the image positions resampled to the
  new patch grid)."""
  fields = config_lib.base_config()
  overrides = {_dotted(k, fields): v for k, v in overrides.items()}
  path = torch_files.resolve(path)
  if (
    path.is_dir()
    and (path / "config.json").is_file()
    and not (path / "checkpoints").exists()
    and torch_files.is_hf_dir(path)
    or path.is_file()
    and torch_files.is_torch_path(path)
  ):
    state, config = torch_files.read(path, overrides.get("model.activation"))
  elif path.is_file():
    raise ValueError(
      f"{path}: not a checkpoint this loader knows (give a workdir, an Orbax "
      f"checkpoint, a transformers directory or a "
      f"{'/'.join(torch_files.TORCH_SUFFIXES)} file)"
    )
  else:
    return _load_orbax(path, overrides)
  _override(config, overrides)
  model = build_model(config)
  shapes = nn.meta.unbox(step_lib.abstract_params(model, config))
  unused = layout.unused_keys(state, shapes)
  if unused:
    log.warning(
      "%s: %d tensors not used by the model: %s", path, len(unused), init_from.describe(unused)
    )
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), layout.from_openai(state, shapes))
  return Loaded(config, params, model)


def _dotted(key: str, config: ml_collections.ConfigDict) -> str:
  """`load`'s keyword -> a config path: `__` for dots, `model.` implied where the config has no
  such top-level field but its model does (`vision__image_size` -> `model.vision.image_size`)."""
  dotted = key.replace("__", ".")
  head = dotted.split(".")[0]
  return f"model.{dotted}" if head not in config and head in config.model else dotted


def _override(config: ml_collections.ConfigDict, overrides: dict) -> None:
  for key, value in overrides.items():
    config_lib.apply_override(config, f"{key}={value}")
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
  params, missing, unused = init_from.from_orbax(step_dir, fresh)
  if missing:
    raise ValueError(f"{step_dir} lacks parameters the config needs: {init_from.describe(missing)}")
  if unused:
    log.warning("%s: parameters not used by the model: %s", step_dir, init_from.describe(unused))
  return Loaded(config, params, model)
