"""Grain pipelines: raw records -> (normalised image, tokenised caption) -> per-process batches.

The global batch of step N is a function of the seed and N alone: positions N*B ... N*B + B - 1
of one endless stream (the source reshuffled each epoch), each featurized with randomness keyed
by the seed and its position. Process p of P featurizes its contiguous slice of those positions;
the train loop assembles the slices into global arrays. So a run resumes at any step on any
number of processes, with any number of Grain workers, and sees the batches an uninterrupted
run would have seen: the position is the checkpointed state step, nothing else.

A record that cannot be used is replaced by the record at the same position of a later epoch
(another draw of the shuffle), so batches stay full and stay a function of the step; the
replaced ones (per reason) ride along as `skipped`, and `DataStats` adds them up and stops a run
whose data is mostly broken.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh

from smartclip_jax import distributed, sharding
from smartclip_jax.data import decode
from smartclip_jax.data.captions import sample_caption
from smartclip_jax.data.sources import Guarded, identity, make_source, train_sources
from smartclip_jax.tokenizer import tokenize

log = logging.getLogger("smartclip_jax")

PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies
HOST_FIELDS = ("skipped", "bad_example", "source")  # batch fields that stay on the host


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
  sentence_split: str = "ours",
  first_sentence: bool = False,
) -> dict:
  """One raw record -> {"image", "tokens"} (and with `first_sentence`, "first_tokens": its
  caption's first sentence alone, a partial caption for evaluation), or {"error", "id",
  "detail"} if it is unusable."""
  try:
    if record.get("error"):
      return record
    caption = record["caption"]
    if isinstance(caption, (list, tuple, np.ndarray)):  # several captions: draw one (eval: first)
      if not len(caption):
        raise decode.BadRecord("empty_caption", "no captions")
      caption = caption[int(rng.integers(len(caption))) if train else 0]
    # Sampled from the whole caption (a prefix's k ~ U[1, n] counts every sentence); `tokenize`
    # then reads only the characters that can fill `context_length` positions.
    text = decode.read_caption(caption)
    caption = sample_caption(text, caption_mode, rng, sentence_split)
    image = decode.decode_image(record["image"], min_side, max_pixels)
    if train and transform == "random_resized_crop":
      pixels = decode.random_resized_crop(image, image_size, crop_scale, crop_ratio, rng)
    else:
      pixels = decode.centre_crop(image, image_size)
    out = {"image": decode.normalize_image(pixels), "tokens": tokenize(caption, context_length)[0]}
    if first_sentence:
      first = sample_caption(text, "first", rng, sentence_split)
      out["first_tokens"] = tokenize(first, context_length)[0]
  except Exception as e:  # noqa: BLE001  any record may be broken in a way nobody foresaw
    bad = e if isinstance(e, decode.BadRecord) else decode.BadRecord.unreadable(e)
    return bad.as_record(record.get("id", "?") if isinstance(record, dict) else "?")
  return out


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
    sentence_split=d.sentence_split,
    first_sentence=not train,
    image_size=config.model.vision.image_size,
    context_length=config.model.text.context_length,
    transform=d.train_transform,
    crop_scale=tuple(d.crop_scale),
    crop_ratio=tuple(d.crop_ratio),
    min_side=d.min_image_side,
    max_pixels=d.max_image_pixels,
  )


SUBSTITUTE_TRIES = 16  # a bad record and its replacements (each from a later epoch) tried


def interleave(weights: list[float]) -> tuple[list[int], list[int], list[int]]:
  """A fixed pattern that blends sources in proportion to `weights`: (source of each slot,
  how many earlier slots of the pattern are that source's, slots per source). Weights become
  integers (the smallest 100, then divided by their common divisor), and the slots are spread
  evenly (smooth weighted round robin), so any window of the stream is close to the shares."""
  counts = [max(1, round(100 * w / min(weights))) for w in weights]
  counts = [c // math.gcd(*counts) for c in counts]
  total, credit = sum(counts), [0] * len(counts)
  pattern, rank, seen = [], [], [0] * len(counts)
  for _ in range(total):
    credit = [c + n for c, n in zip(credit, counts)]
    source = max(range(len(counts)), key=lambda i: credit[i])
    credit[source] -= total
    pattern.append(source)
    rank.append(seen[source])
    seen[source] += 1
  return pattern, rank, counts


class _Slice(grain.MapDataset):
  """Example k of one process's share of the endless train stream (see the module doc).

  Local example k is stream position i = (k // b) * B + p * b + k % b, for b = B / P examples
  per process and step. Position i is record n of source s by the `interleave` pattern (one
  source: s = 0, n = i). Each source is shuffled per epoch and repeated, so n + j * epoch is
  the same slot j epochs later, which the shuffle fills with another record: a bad record's
  replacement.
  """

  def __init__(
    self,
    sources: list[grain.MapDataset],
    weights: list[float],
    featurize: Callable,
    seed: int,
    batch_size: int,
    process_index: int,
    process_count: int,
  ):
    super().__init__([src.shuffle(seed=seed).repeat() for src in sources])
    self._records, self._epochs = self._parents, [len(src) for src in sources]
    self._pattern, self._rank, self._counts = interleave(weights)
    self._featurize, self._seed = featurize, seed
    self._batch, self._local = batch_size, batch_size // process_count
    self._offset = process_index * self._local

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local)
    position = step * self._batch + self._offset + row
    cycle, slot = divmod(position, len(self._pattern))
    source = self._pattern[slot]
    n = cycle * self._counts[source] + self._rank[slot]
    # One source keeps the key it had before mixtures existed; several add theirs to it.
    key = [self._seed] if len(self._records) == 1 else [self._seed, source]
    skipped, example = np.zeros(len(decode.REASONS), np.int32), ""
    for tries in range(SUBSTITUTE_TRIES):
      at = n + tries * self._epochs[source]
      out = self._featurize(self._records[source][at], np.random.default_rng([*key, at]))
      if "error" not in out:
        return {**out, "skipped": skipped, "bad_example": example, "source": np.int32(source)}
      skipped[decode.REASONS.index(out["error"])] += 1
      example = f"{out.get('id', '?')}: {out.get('detail') or out['error']}"
    raise DataError(
      f"stream position {position} and its {SUBSTITUTE_TRIES - 1} replacements from later "
      f"epochs are all unusable (the last: {example})"
    )


def steps_for_epochs(config: ml_collections.ConfigDict) -> int:
  """The steps of `batch_size` that read `config.epochs` passes over the training data: the
  records of every train source together (a mixture draws them by its weights, so a source's
  own passes follow its weight; `coverage` logs them)."""
  records = sum(len(source) for source in train_sources(config)[0])
  steps = max(1, math.ceil(config.epochs * records / config.batch_size))
  log.info("epochs=%g of the training data: total_steps=%d", config.epochs, steps)
  return steps


def coverage(
  config: ml_collections.ConfigDict, sources: list, weights: list[float], labels: list[str]
) -> str:
  """Each train source, its records, and the epochs of it that `total_steps` steps of
  `batch_size` read (a mixture's sources in proportion to their weights)."""
  seen = config.total_steps * config.batch_size
  parts = []
  for source, weight, label in zip(sources, weights, labels):
    epochs = seen * weight / sum(weights) / len(source)
    parts.append(f"{label + ' ' if label else ''}{source!r}: {epochs:.3g} epochs")
  return (
    "; ".join(parts) + f" in {config.total_steps} steps of {config.batch_size} ({seen:,} examples)"
  )


def leave_stopping_to_the_trainer(worker_index: int, worker_count: int) -> None:
  """A Grain worker ignores stop signals: preemption, slurmstepd and Ctrl-C signal the whole
  process group, and a worker that died of it would fail the trainer's next batch before the
  trainer could save. The trainer stops its workers itself (closing the iterator); should the
  trainer die without closing them (SIGKILL, the watchdog's exit, a crash), Linux kills each
  worker with it (PR_SET_PDEATHSIG) rather than leave it running, holding memory and a GCS
  connection, into the restarted run."""
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
  if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def train_iterator(
  config: ml_collections.ConfigDict,
  process_index: int | None = None,
  process_count: int | None = None,
  start_step: int = 0,
  stats: DataStats | None = None,
) -> grain.DatasetIterator:
  """This process's slices of the global batches of steps start_step + 1, start_step + 2, ...

  Step N's global batch is stream positions (N - 1) * B ... N * B - 1; process p of P gets the
  p-th of its P equal parts. Each epoch of the stream covers the data once. The process defaults
  to JAX's; the arguments let tests play several processes. `stats` gets the sources' identity
  (`sources.identity`), for checkpoints and the resume check.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if config.batch_size % count:
    raise ValueError(f"batch_size={config.batch_size} does not split over {count} processes")
  sources, weights, labels = train_sources(config)
  for source, label in zip(sources, labels):
    if not len(source):
      raise DataError(f"the train split{f' of {label}' if label else ''} has no records")
  log.info("training data: %s", coverage(config, sources, weights, labels))
  if stats is not None:
    stats.sources = [identity(source, label) for source, label in zip(sources, labels)]
  share = _Slice(
    [grain.MapDataset.source(Guarded(src)) for src in sources],
    weights,
    _featurizer(config, train=True),
    config.seed,
    config.batch_size,
    index,
    count,
  )
  local = config.batch_size // count
  iter_ds = ahead(share[start_step * local :].to_iter_dataset(), config.data.num_workers)
  return iter(iter_ds.batch(local, drop_remainder=True))


def ahead(ds: grain.IterDataset, workers: int) -> grain.IterDataset:
  """`ds` featurized by `workers` Grain processes (0: as it is, Grain's threads). Worker w
  featurizes examples w, w + W, ... and Grain hands them back round-robin, in order, so what
  comes out (and batches made after) does not depend on the worker count."""
  if workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; we do not use absl.app
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(
    grain.MultiprocessingOptions(num_workers=workers),
    worker_init_fn=leave_stopping_to_the_trainer,
  )


def eval_batches(config: ml_collections.ConfigDict) -> tuple[Iterator[dict], int]:
  """The held-out split in order, full captions, eval transform (the last batch may be short),
  and the number of records in the split, usable or not; decoded ahead of the device by
  `data.num_workers` processes (or Grain's threads)."""
  source = make_source(config, "eval")
  ds = grain.MapDataset.source(Guarded(source)).random_map(
    _featurizer(config, train=False), seed=config.seed
  )
  ds = ahead(ds.to_iter_dataset(), config.data.num_workers)
  return iter(SkipBad(ds).batch(config.data.eval_batch_size)), len(source)


class DataError(RuntimeError):
  """Too large a fraction of the input records cannot be used."""


@dataclasses.dataclass
class DataStats:
  """Running counts of records used and skipped by reason, per train source (`labels`: one ""
  without a mixture), summed over all processes.

  `counts[s]` is this process's [used, skipped per reason] of source s; `restored` holds the
  global counts a checkpoint carried, so they survive a resume.
  """

  labels: tuple[str, ...] = ("",)
  counts: np.ndarray = None  # [sources, 1 + reasons], int64
  examples: list[str] = dataclasses.field(default_factory=list)
  restored: np.ndarray = None
  sources: list[dict] = dataclasses.field(default_factory=list)  # `sources.identity` of each
  saved_sources: list[dict] | None = None  # those the checkpoint was saved with, if it says

  def __post_init__(self):
    shape = (len(self.labels), 1 + len(decode.REASONS))
    self.counts = np.zeros(shape, np.int64) if self.counts is None else self.counts
    self.restored = np.zeros(shape, np.int64) if self.restored is None else self.restored

  def update(self, batch: dict) -> None:
    """Counts a local batch's host fields."""
    source = batch.get("source", np.zeros(len(batch["skipped"]), np.int32))
    np.add.at(self.counts[:, 0], source, 1)
    np.add.at(self.counts[:, 1:], source, batch["skipped"])
    self.examples += [e for e in batch["bad_example"] if e][: 5 - len(self.examples)]

  def per_source(self) -> np.ndarray:
    """[sources, used + skipped per reason] over all processes (a collective: every process
    calls it together)."""
    return distributed.gather(self.counts).sum(axis=0) + self.restored

  def totals(self) -> tuple[int, np.ndarray]:
    """(used, skipped per reason) over all processes and sources (a collective)."""
    total = self.per_source().sum(axis=0)
    return int(total[0]), total[1:]

  def state_dict(self) -> dict:
    """Global totals, and per source with a mixture, for a checkpoint (a collective)."""
    counts = self.per_source()
    as_dict = lambda c: {"used": int(c[0]), "skipped": dict(zip(decode.REASONS, map(int, c[1:])))}
    state = as_dict(counts.sum(axis=0))
    if len(self.labels) > 1:
      state["sources"] = {label: as_dict(c) for label, c in zip(self.labels, counts)}
    if self.sources:
      state["identity"] = self.sources
    return state

  @classmethod
  def from_state_dict(cls, state: dict | None, labels: tuple[str, ...] = ("",)) -> DataStats:
    stats = cls(tuple(labels), saved_sources=(state or {}).get("identity"))
    as_row = lambda d: [d["used"], *(d["skipped"].get(r, 0) for r in decode.REASONS)]
    if state and len(labels) == 1:
      stats.restored[0] = as_row(state)
    elif state:
      saved = state.get("sources", {})
      for s, label in enumerate(labels):
        if label in saved:
          stats.restored[s] = as_row(saved[label])
    return stats

  def metrics(self) -> dict[str, float]:
    counts = self.per_source()
    used, skipped = int(counts[:, 0].sum()), counts[:, 1:].sum(axis=0)
    seen = used + skipped.sum()
    out = {f"data/skipped_{r}": float(n) for r, n in zip(decode.REASONS, skipped)}
    out["data/skipped_fraction"] = float(skipped.sum() / seen) if seen else 0.0
    out["data/used"] = float(used)
    if len(self.labels) > 1:
      for label, c in zip(self.labels, counts):
        out[f"data/{label}/used"], out[f"data/{label}/skipped"] = float(c[0]), float(c[1:].sum())
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


def global_batch(
  local: dict[str, np.ndarray], mesh: Mesh, text_length: int | None = None
) -> dict[str, jax.Array]:
  """Assembles each process's slice into arrays sharded over the mesh's batch axes (the
  host-side bookkeeping fields stay behind), tokens cut to `text_length` positions if given."""
  target = sharding.batch_sharding(mesh)
  if text_length is not None:
    local = {**local, "tokens": local["tokens"][:, :text_length]}
  return {
    k: jax.make_array_from_process_local_data(target, v)
    for k, v in local.items()
    if k not in HOST_FIELDS
  }


def text_length(tokens: np.ndarray, config: ml_collections.ConfigDict) -> int:
  """The token positions a step needs (`model.text.trim_padding`). The text tower is causal and
  pools the end token, so positions after every caption's end cannot change the embeddings, a
  CLIP or SigLIP loss or its gradients: the batch's longest caption (over all processes), rounded
  up to a multiple of `trim_padding` so that a run compiles a few shapes, not one per length."""
  multiple, context = config.model.text.trim_padding, config.model.text.context_length
  if not multiple:
    return context
  longest = int(np.argmax(tokens, axis=1).max()) + 1  # the end token has the highest id
  longest = int(distributed.gather(np.int32(longest)).max())
  return min(context, -(-longest // multiple) * multiple)
