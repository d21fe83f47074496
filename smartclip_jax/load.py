"""`smartclip_jax.load(path)`: any checkpoint this project meets, as one ready-to-use model.

Paths (local or gs://): a workdir or Orbax checkpoint of ours; a PyTorch file (`.pt`, `.pth`,
`.bin`, `.safetensors`) in the OpenAI / open_clip / Long-CLIP / SmartCLIP layout or
transformers'; OpenAI's TorchScript archives; a transformers `CLIPModel` directory; or a
`hf-hub:ORG/NAME` name in the local Hugging Face cache. The architecture comes from the weights'
shapes (PyTorch) or the saved config (ours); the weights go in through `init_from`, the one way
parameters are filled. Nothing pickled is executed (interop/torch_files.py).

`import smartclip_jax` imports this module (so that `smartclip_jax.load` stays the function
whatever is imported later), so jax and the model code are imported inside `load`, not here: a
launcher may still set jax's flags after importing the package.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  import jax
  import ml_collections
  import PIL.Image

  from smartclip_jax.evals.encoder import Encoder
  from smartclip_jax.models.clip import TwoTowers

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
    from smartclip_jax.evals.encoder import Encoder

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
  new patch grid). A parameter the model needs that the checkpoint lacks is an error; tensors
  the model does not use are logged."""
  import flax.linen as nn
  import jax

  from smartclip_jax import checkpoint, config as config_lib, init_from, step as step_lib
  from smartclip_jax.interop import torch_files
  from smartclip_jax.models.clip import build_model

  fields = config_lib.base_config()
  overrides = {_dotted(k, fields): v for k, v in overrides.items()}
  path = torch_files.resolve(path)
  if torch_files.is_torch_path(path):
    state, config = torch_files.read(path, overrides.get("model.activation"))
    fill = functools.partial(init_from.from_state, state)
  elif path.is_file():
    raise ValueError(
      f"{path}: not a checkpoint this loader knows (give a workdir, an Orbax "
      f"checkpoint, a transformers directory or a "
      f"{'/'.join(torch_files.TORCH_SUFFIXES)} file)"
    )
  else:
    path = checkpoint.resolve_step_dir(path)
    config = config_lib.from_dict(checkpoint.saved_config(path))
    fill = functools.partial(init_from.from_orbax, path)
  for key, value in overrides.items():
    config_lib.apply_override(config, f"{key}={value}")
  config_lib.validate(config)
  model = build_model(config)
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here),
    nn.meta.unbox(step_lib.abstract_params(model, config)),
  )
  params, missing, unused = fill(target)
  if missing:
    raise ValueError(f"{path} lacks parameters the model needs: {init_from.describe(missing)}")
  if unused:
    log.warning(
      "%s: %d tensors not used by the model: %s", path, len(unused), init_from.describe(unused)
    )
  return Loaded(config, params, model)


def _dotted(key: str, config: ml_collections.ConfigDict) -> str:
  """`load`'s keyword -> a config path: `__` for dots, `model.` implied where the config has no
  such top-level field but its model does (`vision__image_size` -> `model.vision.image_size`)."""
  dotted = key.replace("__", ".")
  head = dotted.split(".")[0]
  return f"model.{dotted}" if head not in config and head in config.model else dotted
