"""Random-access sources of raw (id, image, caption) records, one per supported format.

Every source is a Grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose records follow
`decode.py`'s raw layout. A file that cannot be read becomes a record with `error` set, never an
exception, so that one bad file cannot stop a 256-chip run.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
import pathlib
import posixpath
import time

import ml_collections
import msgpack
from etils import epath

from smartclip_jax import config as config_lib, storage
from smartclip_jax.data import decode
from smartclip_jax.data.demo import DemoSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _read_file(path: epath.Path, record_id: str, caption) -> dict:
  try:
    data = path.read_bytes()
  except OSError as e:
    return {"id": record_id, "error": "missing_file", "detail": f"{path}: {e.strerror or e}"}
  return {"id": record_id, "image": data, "caption": caption}


class FileListSource:
  """Records from (id, image path, caption) triples; images are read when a record is asked for
  (under a local or mounted folder, or gs://)."""

  def __init__(
    self, entries: list[tuple[str, str, object]], image_root: str | os.PathLike, name: str
  ):
    self.entries, self.image_root, self.name = entries, storage.path(image_root), name

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> dict:
    record_id, path, caption = self.entries[index]
    return _read_file(self.image_root / path, record_id, caption)

  def __repr__(self) -> str:
    return f"{self.name}({len(self)} records under {self.image_root})"


class Guarded:
  """A source whose records cannot stop a run: one that cannot be read (a corrupt ArrayRecord
  chunk, a TFDS read error, ...) or is not a dict comes back as an `unreadable_record` error
  record, which the pipeline counts and replaces like any bad record. A storage error that may
  pass (`storage.transient`: a timeout, a 503) is first retried after each of `RETRY_AFTER_S`."""

  RETRY_AFTER_S = (0.5, 2.0, 8.0)

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    pauses = iter(self.RETRY_AFTER_S)
    while True:
      try:
        record = self.source[index]
        if not isinstance(record, dict):
          raise TypeError(f"a record is a {type(record).__name__}, not a dict")
        return record
      except Exception as e:  # noqa: BLE001  whatever the storage or format raised
        if storage.transient(e) and (pause := next(pauses, None)) is not None:
          time.sleep(pause)
          continue
        return decode.BadRecord.unreadable(e).as_record(f"record {index}")

  def __repr__(self) -> str:
    return repr(self.source)


def sharegpt4v_entries(
  json_path: str | os.PathLike,
) -> tuple[list[tuple[str, str, str]], epath.Path]:
  """(id, image path, long caption) from a ShareGPT4V captioner JSON, in file order, and the
  root the image paths are relative to by default: the JSON's folder (as for every source).

  The caption is the first `gpt` turn of `conversations`; a record without one gets an empty
  caption (skipped and counted as `empty_caption` downstream, not dropped here).
  """
  json_path = storage.path(json_path)
  items = json.loads(json_path.read_bytes())
  entries = []
  for i, item in enumerate(items):
    turns = item.get("conversations") or []
    caption = next((t.get("value", "") for t in turns if t.get("from") == "gpt"), "")
    entries.append((str(item.get("id", i)), str(item.get("image", "")), caption))
  return entries, json_path.parent


def sharegpt4v_source(json_path: str, image_root: str, split: str, holdout: int) -> FileListSource:
  """`train`: records after the first `holdout` (ShareGPT4V-1k); `eval`: the first `holdout`.
  Images are read under `image_root`, or beside the JSON when it is empty."""
  entries, root = sharegpt4v_entries(json_path)
  entries = entries[holdout:] if split == "train" else entries[:holdout]
  return FileListSource(entries, image_root or root, "ShareGPT4V")


def folder_entries(
  path: str | os.PathLike,
  image_key: str = config_lib.CSV_KEYS[0],
  caption_key: str = config_lib.CSV_KEYS[1],
) -> tuple[list[tuple[str, str, str]], epath.Path]:
  """(id, image path, caption) of an image folder, and the root the paths are relative to.

  `path` is a CSV/TSV with `image_key`/`caption_key` columns (open_clip's `filepath`/`title`),
  a JSONL of {"image": ..., "caption": ...}, or a directory where each image has a `.txt` with
  the same stem. An image without a caption file gets an empty caption, and a caption without
  an image a missing one, so both are counted downstream rather than silently left out.
  """
  path = storage.path(path)
  if path.is_dir():
    # Listed once: a bucket answers a listing, not a probe per file. (A bucket's walk names its
    # folders without the gs://, hence the paths rebuilt relative to the first.)
    listing = list(path.walk())
    top = str(listing[0][0]) if listing else str(path)
    files = {
      path / posixpath.relpath(posixpath.join(str(folder), name), top)
      for folder, _, names in listing
      for name in names
    }
    images = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
    entries = []
    for image in images:
      text = image.with_suffix(".txt")
      caption = text.read_bytes() if text in files else ""
      rel = str(image.relative_to(path))
      entries.append((rel, rel, caption))
    # A caption whose image is gone is a record too (counted as missing_file, not ignored).
    stems = {image.with_suffix("") for image in images}
    for text in sorted(p for p in files if p.suffix == ".txt"):
      if text.with_suffix("") not in stems:
        rel = str(text.with_suffix("").relative_to(path))
        entries.append((rel, rel + ".<image missing>", text.read_bytes()))
    return entries, path
  # Bad bytes in a caption file become U+FFFD (invalid_text downstream), not an exception.
  text = path.read_bytes().decode("utf-8", errors="replace")
  if path.suffix == ".jsonl":
    entries = []
    for i, line in enumerate(io.StringIO(text)):  # lines as a text file splits them
      if line.strip():
        row = json.loads(line)
        entries.append((str(row.get("id", i)), str(row["image"]), row.get("caption", "")))
    return entries, path.parent
  if path.suffix in (".csv", ".tsv"):
    with io.StringIO(text, newline="") as f:
      rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    missing = {image_key, caption_key} - set(rows[0] if rows else ())
    if missing:
      raise ValueError(
        f"{path} has no column(s) {sorted(missing)}; set data.folder.image_key / "
        "data.folder.caption_key to its column names"
      )
    return [(str(i), r[image_key], r[caption_key]) for i, r in enumerate(rows)], path.parent
  raise ValueError(f"{path}: give a directory, a .csv/.tsv or a .jsonl of captions")


class ArrayRecordSource:
  """Records written by `smartclip_jax.data.prepare`: msgpack {id, caption, image bytes}."""

  def __init__(self, pattern: str):
    import grain  # deferred: keeps `prepare`'s writer processes light

    paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if pathlib.Path(pattern).is_dir():
      paths = sorted(str(p) for p in pathlib.Path(pattern).glob("*.array_record"))
    if not paths:
      raise FileNotFoundError(f"no ArrayRecord shards match {pattern!r}")
    self.paths = paths
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return unpack(self._source[index])

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"

  def identity(self) -> dict:
    return {"shards": {pathlib.Path(p).name: os.path.getsize(p) for p in self.paths}}


class TfdsSource:
  """Any TFDS data set prepared in ArrayRecord format, through `tfds.data_source`.

  `image_key` and `caption_key` are '/'-separated paths into the example (COCO captions:
  `image` and `captions/text`); a caption field holding several captions is passed on whole
  and one is drawn per load.
  """

  def __init__(
    self, name: str, split: str, image_key: str, caption_key: str, data_dir: str | None = None
  ):
    import tensorflow_datasets as tfds  # deferred: heavy, and only this source needs it

    self.name, self.split = name, split
    self.image_key, self.caption_key = image_key.split("/"), caption_key.split("/")
    self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    example = self._source[index]
    return {
      "id": f"{self.name}/{self.split}/{index}",
      "image": _lookup(example, self.image_key),
      "caption": _lookup(example, self.caption_key),
    }

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, {self.split}, {len(self)} records)"

  def identity(self) -> dict:
    return {"name": self.name, "split": self.split}


def _lookup(example: dict, path: list[str]):
  for key in path:
    example = example[key]
  return example


def pack(record_id: str, caption: str, image: bytes) -> bytes:
  return msgpack.packb({"id": record_id, "caption": caption, "image": image}, use_bin_type=True)


def unpack(data: bytes) -> dict:
  return msgpack.unpackb(data, raw=False)


def train_sources(config: ml_collections.ConfigDict) -> tuple[list, list[float], list[str]]:
  """The train split's sources, their weights and labels: `data.mixture`'s components
  (labelled mix0, mix1, ...), or the one source `data.name` names (weight 1, label "")."""
  mixture = config_lib.parse_mixture(config.data.mixture)
  if not mixture:
    return [make_source(config, "train")], [1.0], list(train_labels(config))
  found = []
  for name, path, _ in mixture:
    part = config.copy_and_resolve_references()
    part.data.update(name=name, path=path)
    found.append(make_source(part, "train"))
  return found, [w for _, _, w in mixture], list(train_labels(config))


def train_labels(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The train sources' labels in metrics and checkpoints: mix0, mix1, ... or ("",)."""
  count = len(config_lib.parse_mixture(config.data.mixture))
  return tuple(f"mix{i}" for i in range(count)) or ("",)


def identity(source, label: str) -> dict:
  """What a training source is, for a checkpoint to be compared with on resume: its kind and
  record count, and what the source adds (ArrayRecord: each shard's name and size), since the
  batches of a step are a function of the data."""
  return {"label": label, "kind": type(source).__name__, "records": len(source)} | (
    source.identity() if hasattr(source, "identity") else {}
  )


def changed_sources(saved: list[dict], now: list[dict]) -> list[str]:
  """How the training sources `now` differ from those a checkpoint `saved`, one line each."""
  lines = []
  for old, new in itertools.zip_longest(saved, now, fillvalue={}):
    if old == new:
      continue
    label = new.get("label", old.get("label")) or "the training data"
    keys = (old.keys() | new.keys()) - {"label", "shards"}
    keys = sorted(k for k in keys if old.get(k) != new.get(k))
    said = [f"{k} {old.get(k)!r} then, {new.get(k)!r} now" for k in keys]
    before, after = old.get("shards", {}), new.get("shards", {})
    for what, names in (
      ("added", sorted(after.keys() - before.keys())),
      ("removed", sorted(before.keys() - after.keys())),
      ("resized", sorted(n for n in before.keys() & after.keys() if before[n] != after[n])),
    ):
      if names:
        said.append(f"shards {what}: {', '.join(names[:5])}{' ...' * (len(names) > 5)}")
    lines.append(f"{label}: {'; '.join(said)}")
  return lines


def make_source(config: ml_collections.ConfigDict, split: str):
  """The source `config.data` names, for `split` (`train` or `eval`)."""
  d = config.data
  if d.name == "demo":
    num = d.demo.num_train if split == "train" else d.demo.num_eval
    return DemoSource(num, config.model.vision.image_size, seed=config.seed, split=split)
  if d.name == "sharegpt4v":
    return sharegpt4v_source(d.path, d.image_root, split, d.sharegpt4v.holdout)
  if d.name == "tfds":
    t = d.tfds
    return TfdsSource(
      d.path,
      t.train_split if split == "train" else t.eval_split,
      t.image_key,
      t.caption_key,
      t.data_dir,
    )
  path = d.path if split == "train" else d.eval_path
  if not path:
    raise ValueError(f"data.name={d.name!r} has no held-out split: set data.eval_path")
  if d.name == "folder":
    entries, root = folder_entries(path, d.folder.image_key, d.folder.caption_key)
    return FileListSource(entries, d.image_root or root, "ImageFolder")
  if d.name == "array_record":
    return ArrayRecordSource(path)
  raise ValueError(f"unknown data.name={d.name!r}")
