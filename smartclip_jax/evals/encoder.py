"""The one encoder: a model's image, text and mask functions, jitted once over its parameters and
run batch by batch across a mesh (training's evaluation, `smartclip_jax.load`, the evaluate
command and the experiments all embed through it)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import PIL.Image
from jax.sharding import Mesh

from smartclip_jax import sharding
from smartclip_jax.data import decode, pipeline
from smartclip_jax.progress import Progress
from smartclip_jax.tokenizer import get_tokenizer, tokenize

METHODS = ("encode_image", "encode_text", "text_masks")
log = logging.getLogger("smartclip_jax")


class Interrupted(Exception):
  """An evaluation ended early by `Encoder.should_stop`."""


@dataclasses.dataclass(frozen=True)
class DecodeImage:
  """CLIP's eval transform of one (index, image file or uint8 HxWx3 array), picklable so that
  Grain's threads and worker processes run it ahead of the device: (pixels, "") or, for an
  image that cannot be read, (a blank image's pixels, why)."""

  size: int

  def preprocess(self, image: PIL.Image.Image) -> np.ndarray:
    """RGB, shorter side resized (bicubic), centre crop, normalised."""
    return decode.normalize_image(decode.centre_crop(image.convert("RGB"), self.size))

  def __call__(self, item: tuple[int, str | np.ndarray]) -> tuple[np.ndarray, str]:
    image = item[1]
    if isinstance(image, np.ndarray):
      return self.preprocess(PIL.Image.fromarray(image)), ""
    try:
      with PIL.Image.open(image, formats=decode.RASTER_FORMATS) as f:
        return self.preprocess(f), ""
    except (OSError, ValueError) as e:
      blank = PIL.Image.new("RGB", (self.size, self.size))
      return self.preprocess(blank), f"cannot read image {image}: {e}"


class Encoder:
  """Unnormalised float32 embeddings (and SmartCLIP masks) of a model with fixed parameters.

  Inputs go `batch_size` rows at a time, each batch padded to `batch_size` rows and split over
  the mesh's batch axes, so a whole set compiles one shape per method; outputs are numpy.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: nn.Module,
    params: Any,
    mesh: Mesh | None = None,
    batch_size: int = 256,
    param_shardings: Any = None,
    workers: int = 0,
  ):
    """`param_shardings`: where `params` already live on `mesh` (a training run's state, which
    stays sharded as it trains); by default the parameters are replicated over the mesh.
    `workers`: Grain processes decoding image files ahead of the device (0: Grain's threads
    in this process do it, also ahead)."""
    self.config, self.model, self.mesh = config, model, mesh or sharding.data_mesh()
    self.workers = workers
    self._decode = DecodeImage(config.model.vision.image_size)
    self.parts = sharding.data_parallel_size(self.mesh)
    self.batch_size = self.round_up(batch_size)
    rep, rows = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
    if param_shardings is None:
      param_shardings = rep
      params = jax.device_put(params, rep)
    self.params, self._param_shardings = params, param_shardings
    # Asked before every batch (a training run's stop notice): True ends the evaluation with
    # `Interrupted`. Every process must answer alike (it is asked in lock-step).
    self.should_stop: Callable[[], bool] = lambda: False
    self._fns: dict[str, Callable] = {}
    for method in METHODS[: 3 if config.model.mask_net else 2]:
      self._fns[method] = jax.jit(
        lambda p, x, method=method: model.apply({"params": p}, x, method=method),
        in_shardings=(param_shardings, rows),
        out_shardings=rep,
      )

  def with_params(self, params: Any) -> Encoder:
    """This encoder, its functions compiled once, over other parameters of the same shapes."""
    other = copy.copy(self)
    other.params = jax.device_put(params, self._param_shardings)
    return other

  def round_up(self, rows: int) -> int:
    """`rows` rounded up to whole rows per data-parallel device."""
    return -(-max(rows, 1) // self.parts) * self.parts

  def apply(self, method: str, inputs: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """`method` ("encode_image": normalised NHWC float32 pixels; "encode_text"/"text_masks":
    int32 tokens) over `inputs`, `batch_size` (default: the encoder's) padded rows at a time."""
    if method not in self._fns:
      raise ValueError(
        "this model has no mask network (model.mask_net is false)"
        if method == "text_masks"
        else f"no method {method!r}: one of {METHODS}"
      )
    rows = self.batch_size if batch_size is None else self.round_up(batch_size)
    out = []
    for start in range(0, len(inputs), rows):
      if self.should_stop():
        raise Interrupted(f"evaluation stopped by a stop notice before a batch of {method}")
      batch = inputs[start : start + rows]
      got = self._fns[method](self.params, sharding.put_padded(batch, rows, self.mesh))
      out.append(np.asarray(jax.device_get(got))[: len(batch)])
    return np.concatenate(out) if out else np.zeros((0, self.config.model.embed_dim), np.float32)

  def preprocess(self, image: PIL.Image.Image) -> np.ndarray:
    """CLIP's eval transform: RGB, shorter side resized (bicubic), centre crop, normalised."""
    return self._decode.preprocess(image)

  def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 [N, context_length], CLIP's BPE, truncated with the end token kept."""
    return tokenize(texts, self.config.model.text.context_length)

  def images(
    self, images: Sequence[str | np.ndarray], unreadable: list[int] | None = None
  ) -> np.ndarray:
    """Embeddings of image files or uint8 HxWx3 arrays (CLIP's eval transform), batch by batch,
    decoded by Grain ahead of the device (`workers` processes for files, else threads) in
    order, so the result does not depend on how many decode.

    An image that cannot be decoded raises, or with `unreadable` given, has its index appended
    there and a blank image's embedding in its row (for the caller to leave out)."""
    decoded = self._decoded(images)

    def pixels() -> Iterator[np.ndarray]:
      for start, (batch, errors) in zip(itertools.count(0, self.batch_size), decoded):
        for i, error in enumerate(errors.tolist(), start):
          if error and unreadable is None:
            raise ValueError(error)
          if error:
            log.warning("%s; counted as undecodable and left out", error)
            unreadable.append(i)
        yield batch

    try:
      return self._embed("encode_image", pixels(), len(images), "images")
    finally:
      decoded.close()

  def _decoded(self, images: Sequence[str | np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels, errors) batches of `images` from a Grain pipeline; worker processes only for
    files (arrays would be copied to every worker)."""
    ds = grain.MapDataset.source(list(enumerate(images))).map(self._decode).to_iter_dataset()
    if self.workers > 0 and not any(isinstance(x, np.ndarray) for x in images):
      ds = pipeline.ahead(ds, self.workers)
    it = iter(ds.batch(self.batch_size))
    try:
      yield from it
    finally:
      closing = getattr(it, "close", None)  # stops the worker processes
      if closing is not None:
        closing()

  def texts(self, captions: Sequence[str]) -> tuple[np.ndarray, int]:
    """Caption embeddings, and how many captions were truncated to the context."""
    length, tokenizer = self.config.model.text.context_length, get_tokenizer()
    truncated = sum(len(tokenizer.encode(c)) + 2 > length for c in captions)
    return self._embed("encode_text", self._tokens(captions), len(captions), "captions"), truncated

  def masks(self, captions: Sequence[str]) -> np.ndarray:
    """Each caption's SmartCLIP mask over the image embedding [N, D] (for analysis)."""
    return self._embed("text_masks", self._tokens(captions), len(captions), "captions")

  def _tokens(self, captions: Sequence[str]) -> Iterator[np.ndarray]:
    for i in range(0, len(captions), self.batch_size):
      yield self.tokenize(list(captions[i : i + self.batch_size]))

  def _embed(self, method: str, batches: Iterator[np.ndarray], total: int, unit: str) -> np.ndarray:
    """`method` over prepared batches of `batch_size` rows (the last may be short), with a
    progress line counting `total` `unit`."""
    progress, out, done = Progress(f"embedding {unit}", total, unit), [], 0
    for batch in batches:
      out.append(self.apply(method, batch))
      done += len(batch)
      progress.update(done)
    return np.concatenate(out) if out else np.zeros((0, self.config.model.embed_dim), np.float32)
