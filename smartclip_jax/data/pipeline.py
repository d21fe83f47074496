"""Grain pipelines: raw records -> (normalised image, tokenised caption) -> per-process batches.

Each process reads a disjoint slice of the source; its batches of `batch_size / processes`
records are assembled into global arrays by the train loop. Bad records are dropped before
batching, so batches stay full; the number dropped (per reason) rides along with the next good
record as `skipped`, and `DataStats` adds them up and stops a run whose data is mostly broken.
The iterator's state is checkpointable (Grain's `get_state`), so a resumed run sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from smartclip_jax.data import decode
from smartclip_jax.data.captions import sample_caption
from smartclip_jax.data.sources import make_source
from smartclip_jax.tokenizer import tokenize

HOST_FIELDS = ("skipped", "bad_example")  # batch fields that stay on the host


def featurize(
  record: dict,
  rng: np.random.Generator,
  *,
  train: bool,
  caption_mode: str,
  image_size: int,
  context_length: int,
  transform: str,
  crop_scale: tuple[float, float],
  crop_ratio: tuple[float, float],
  min_side: int,
  max_pixels: int,
) -> dict:
  """One raw record -> {"image", "tokens"}, or {"error", "id", "detail"} if it is unusable."""
  if record.get("error"):
    return record
  try:
    caption = record["caption"]
    if isinstance(caption, (list, tuple, np.ndarray)):  # several captions: draw one (eval: first)
      if not len(caption):
        raise decode.BadRecord("empty_caption", "no captions")
      caption = caption[int(rng.integers(len(caption))) if train else 0]
    caption = sample_caption(decode.read_caption(caption), caption_mode, rng)
    image = decode.decode_image(record["image"], min_side, max_pixels)
    if train and transform == "random_resized_crop":
      pixels = decode.random_resized_crop(image, image_size, crop_scale, crop_ratio, rng)
    else:
      pixels = decode.centre_crop(image, image_size)
  except decode.BadRecord as e:
    return {"error": e.reason, "id": record.get("id", "?"), "detail": str(e)}
  return {"image": decode.normalize_image(pixels), "tokens": tokenize(caption, context_length)[0]}


class _SkipBadIterator(grain.DatasetIterator):
  def __next__(self) -> dict:
    skipped, example = np.zeros(len(decode.REASONS), np.int32), ""
    while True:
      record = next(self._parent)
      if "error" not in record:
        return {**record, "skipped": skipped, "bad_example": example}
      skipped[decode.REASONS.index(record["error"])] += 1
      example = f"{record.get('id', '?')}: {record.get('detail') or record['error']}"

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipBad(grain.IterDataset):
  """Drops records with `error`, attaching per-reason counts of the dropped to the next one."""

  def __iter__(self) -> _SkipBadIterator:
    return _SkipBadIterator(self._parent.__iter__())


def _featurizer(config: ml_collections.ConfigDict, train: bool) -> functools.partial:
  d = config.data
  return functools.partial(
    featurize,
    train=train,
    caption_mode=d.caption_mode if train else "full",
    image_size=config.model.vision.image_size,
    context_length=config.model.text.context_length,
    transform=d.train_transform,
    crop_scale=tuple(d.crop_scale),
    crop_ratio=tuple(d.crop_ratio),
    min_side=d.min_image_side,
    max_pixels=d.max_image_pixels,
  )


def train_iterator(
  config: ml_collections.ConfigDict,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """Endless, per-epoch reshuffled batches of this process's slice of the train split.

  Process p of P reads records p, p + P, ...: the slices are disjoint and cover the data once
  per epoch. The process defaults to JAX's; the arguments let tests play several processes.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if config.batch_size % count:
    raise ValueError(f"batch_size={config.batch_size} does not split over {count} processes")
  ds = grain.MapDataset.source(make_source(config, "train"))
  ds = ds[index::count]
  ds = ds.shuffle(seed=config.seed).repeat()
  ds = ds.random_map(_featurizer(config, train=True), seed=config.seed)
  iter_ds = SkipBad(ds.to_iter_dataset())
  iter_ds = iter_ds.batch(config.batch_size // count, drop_remainder=True)
  if config.data.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; we do not use absl.app
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return iter(iter_ds)


def eval_batches(config: ml_collections.ConfigDict) -> tuple[Iterator[dict], int]:
  """The held-out split in order, full captions, eval transform (the last batch may be short),
  and the number of records in the split, usable or not."""
  source = make_source(config, "eval")
  ds = grain.MapDataset.source(source).random_map(
    _featurizer(config, train=False), seed=config.seed
  )
  return iter(SkipBad(ds.to_iter_dataset()).batch(config.data.eval_batch_size)), len(source)


class DataError(RuntimeError):
  """Too large a fraction of the input records cannot be used."""


@dataclasses.dataclass
class DataStats:
  """Running counts of records used and skipped by reason, summed over all processes.

  `restored` holds the global totals a checkpoint carried, so counts survive a resume.
  """

  used: int = 0
  skipped: np.ndarray = dataclasses.field(
    default_factory=lambda: np.zeros(len(decode.REASONS), np.int64)
  )
  examples: list[str] = dataclasses.field(default_factory=list)
  restored: np.ndarray = dataclasses.field(
    default_factory=lambda: np.zeros(1 + len(decode.REASONS), np.int64)
  )

  def update(self, batch: dict) -> None:
    """Counts a local batch's host fields."""
    self.used += len(batch["skipped"])
    self.skipped += batch["skipped"].sum(axis=0)
    self.examples += [e for e in batch["bad_example"] if e][: 5 - len(self.examples)]

  def totals(self) -> tuple[int, np.ndarray]:
    """(used, skipped per reason) over all processes; every process must call it together."""
    local = np.concatenate([[self.used], self.skipped]).astype(np.int64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      local = multihost_utils.process_allgather(local).sum(axis=0)
    total = local + self.restored
    return int(total[0]), total[1:]

  def state_dict(self) -> dict:
    """Global totals, for a checkpoint (a collective, like `totals`)."""
    used, skipped = self.totals()
    return {"used": used, "skipped": dict(zip(decode.REASONS, map(int, skipped)))}

  @classmethod
  def from_state_dict(cls, state: dict | None) -> DataStats:
    stats = cls()
    if state:
      stats.restored = np.array(
        [state["used"], *(state["skipped"].get(r, 0) for r in decode.REASONS)], np.int64
      )
    return stats

  def metrics(self) -> dict[str, float]:
    used, skipped = self.totals()
    seen = used + skipped.sum()
    out = {f"data/skipped_{r}": float(n) for r, n in zip(decode.REASONS, skipped)}
    out["data/skipped_fraction"] = float(skipped.sum() / seen) if seen else 0.0
    out["data/used"] = float(used)
    return out

  def check(self, max_fraction: float, min_seen: int = 1000) -> None:
    """Raises DataError once at least `min_seen` records were read and too many were bad."""
    used, skipped = self.totals()
    seen = used + int(skipped.sum())
    if seen >= min_seen and skipped.sum() > max_fraction * seen:
      reasons = ", ".join(f"{r}: {n}" for r, n in zip(decode.REASONS, skipped) if n)
      raise DataError(
        f"{skipped.sum()} of {seen} records could not be used ({reasons}), more "
        f"than data.max_bad_fraction={max_fraction}; for example: " + "; ".join(self.examples)
      )
