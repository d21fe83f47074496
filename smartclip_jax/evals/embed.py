"""Embeddings of an evaluation set, batch by batch over the mesh, cached on disk.

The cache key holds the model (its checkpoint step, or a PyTorch file's size and mtime), the
set (task, size, first and last items) and the preprocessing sizes, so a new checkpoint or a
changed set is never served stale embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
import PIL.Image
from jax.sharding import Mesh

from smartclip_jax import checkpoint, sharding
from smartclip_jax.interop.loading import Loaded, is_torch_path
from smartclip_jax.tokenizer import get_tokenizer

log = logging.getLogger("smartclip_jax")


def model_key(path: str | pathlib.Path) -> str:
  """What identifies a model's weights: the resolved checkpoint step, or file size + mtime."""
  path = pathlib.Path(path).absolute()
  if is_torch_path(path):
    files = [path] if path.is_file() else sorted(path.iterdir())
    return f"{path}|" + ",".join(
      f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files
    )
  return str(checkpoint.resolve_step_dir(path))


def apply_padded(fn: Callable, inputs: np.ndarray, batch_size: int, mesh: Mesh) -> np.ndarray:
  """fn over one batch split across the mesh, padded to `batch_size` rows so that its shape, and
  so its compilation, never changes; the padding's rows are dropped from the result."""
  pad = batch_size - len(inputs)
  padded = np.concatenate([inputs, np.zeros((pad, *inputs.shape[1:]), inputs.dtype)])
  out = fn(jax.device_put(padded, sharding.batch_sharding(mesh)))
  return np.asarray(jax.device_get(out))[: len(inputs)]


class Encoder:
  """Sharded image and text encoders of a loaded model."""

  def __init__(self, model: Loaded, mesh: Mesh | None = None, batch_size: int = 256):
    self.model, self.mesh = model, mesh or sharding.data_mesh()
    parts = sharding.data_parallel_size(self.mesh)
    self.batch_size = -(-batch_size // parts) * parts
    params = jax.device_put(model.params, sharding.replicated(self.mesh))
    rows, rep = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)

    def jit(method: str) -> Callable:
      fn = jax.jit(
        lambda p, x: model.model.apply({"params": p}, x, method=method),
        in_shardings=(rep, rows),
        out_shardings=rep,
      )
      return lambda x: fn(params, x)

    self._image, self._text = jit("encode_image"), jit("encode_text")
    self._masks = jit("text_masks") if model.config.loss == "smartclip" else None

  def _batched(self, fn: Callable, items: Sequence, prepare: Callable) -> np.ndarray:
    out = [
      apply_padded(
        fn,
        np.stack([prepare(x) for x in items[start : start + self.batch_size]]),
        self.batch_size,
        self.mesh,
      )
      for start in range(0, len(items), self.batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, self.model.config.model.embed_dim))

  def images(self, images: Sequence[str | np.ndarray]) -> np.ndarray:
    """Unnormalised embeddings of image files or uint8 HxWx3 arrays (CLIP's eval transform)."""
    return self._batched(self._image, images, self._prepare_image)

  def _prepare_image(self, image: str | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
      return self.model.preprocess(PIL.Image.fromarray(image))
    try:
      with PIL.Image.open(image) as f:
        return self.model.preprocess(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read image {image}: {e}") from None

  def texts(self, captions: Sequence[str]) -> tuple[np.ndarray, int]:
    """Unnormalised caption embeddings, and how many captions were truncated to the context."""
    length = self.model.config.model.text.context_length
    tokenizer = get_tokenizer()
    truncated = sum(len(tokenizer.encode(c)) + 2 > length for c in captions)
    return self._batched(self._text, captions, lambda c: self.model.tokenize(c)[0]), truncated

  def masks(self, captions: Sequence[str]) -> np.ndarray:
    """Each caption's SmartCLIP mask over the image embedding [N, D] (for analysis)."""
    if self._masks is None:
      raise ValueError("this model has no mask network (it was not trained as SmartCLIP)")
    return self._batched(self._masks, captions, lambda c: self.model.tokenize(c)[0])


def cached(cache_dir: pathlib.Path | None, parts: dict, compute: Callable[[], dict]) -> dict:
  """`compute()`'s arrays (and ints), stored under a hash of `parts`; loaded when present."""
  if cache_dir is None:
    return compute()
  key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
  path = cache_dir / f"{parts.get('task', 'set')}-{key}.npz"
  if path.is_file():
    log.info("embeddings from cache %s", path)
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  values = compute()
  if jax.process_index() != 0:  # every process computes; one writes
    return values
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **values)
  tmp.rename(path)  # a killed run never leaves half a cache file
  return values
