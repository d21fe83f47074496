"""Converts ShareGPT4V, an image folder, WebDataset tars or Parquet files into ArrayRecord shards.

  python -m smartclip_jax.data.prepare --format sharegpt4v|folder --input <json/csv/dir>
      --image-root <dir> --out <dir> [--num-shards N] [--max-side 512] [--workers W]
  python -m smartclip_jax.data.prepare --format webdataset --input 'shards/{00000..00127}.tar'
      --out <dir> [--caption-key FIELD] [--workers W]
      [--process-index I --process-count N]   (one of N hosts sharing the work)

Inputs and `--out` may be gs:// paths (storage.py).

WebDataset shards are img2dataset's layout: members grouped by key (`<key>.jpg|png|webp`,
`<key>.txt`, `<key>.json`); the caption is the `.txt`, or `--caption-key`'s field of the `.json`
(recaptioned sets). `--format parquet` reads img2dataset's Parquet output (image bytes in a
`jpg`/`png`/`webp`/`image` column, the caption in `caption`, or `--caption-key`). `--input` takes
brace ranges and globs; each tar or Parquet file becomes one output shard.

Images are decoded, converted to RGB, shrunk so their longer side is at most `--max-side`, and
re-encoded as JPEG; each record is msgpack {id, caption, image}. Unusable records are skipped
and counted by reason (`decode.REASONS`). Each finished shard leaves a `<shard>.json` beside it;
a rerun skips those shards, so an interrupted run completes only what is missing. The result:

  <out>/train/shard-00000-of-00016.array_record ...   (ShareGPT4V: records after --holdout)
  <out>/eval/...                                       (ShareGPT4V: the first --holdout records)
  <out>/summary.json   {"written": N, "skipped": {reason: n}, "examples": [...], ...}
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import io
import json
import math
import multiprocessing
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import PIL.Image
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm import tqdm

from smartclip_jax import config as config_lib, storage
from smartclip_jax.data import decode, sources

Entry = tuple[str, str, object]


def encode_record(
  record: dict, max_side: int, min_side: int, max_pixels: int, quality: int
) -> bytes:
  """A raw record as packed bytes of a resized JPEG; raises BadRecord when unusable."""
  if record.get("error"):
    raise decode.BadRecord(record["error"], record.get("detail", ""))
  caption = decode.read_caption(record["caption"])
  image = decode.decode_image(record["image"], min_side, max_pixels)
  if max(image.size) > max_side:
    scale = max_side / max(image.size)
    image = image.resize(
      (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
      PIL.Image.Resampling.BICUBIC,
    )
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=quality)
  return sources.pack(str(record["id"]), caption, out.getvalue())


def write_records(records: Iterable[dict], path: str, *encode_args) -> dict:
  """Writes one shard, then its summary `<path>.json`, the mark that it is done. Locally the
  shard is written beside itself and renamed into place; into a bucket (gs://), written to a
  local temporary file and uploaded (ArrayRecord writes local files)."""
  skipped = dict.fromkeys(decode.REASONS, 0)
  examples, written, seen = [], 0, 0
  remote = storage.is_remote(path)
  tmp = os.path.join(tempfile.mkdtemp(), "shard") if remote else path + ".tmp"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  for record in records:
    seen += 1
    try:
      packed = encode_record(record, *encode_args)
    except Exception as e:  # noqa: BLE001  a record may be broken in any way: counted, not fatal
      bad = e if isinstance(e, decode.BadRecord) else decode.BadRecord.unreadable(e)
      skipped[bad.reason] += 1
      if len(examples) < 5:
        examples.append(f"{record.get('id', '?')}: {bad}")
      continue
    writer.write(packed)
    written += 1
  writer.close()
  if remote:
    with open(tmp, "rb") as src, storage.path(path).open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
    shutil.rmtree(os.path.dirname(tmp))
  else:
    os.replace(tmp, path)
  summary = {"records": seen, "written": written, "skipped": skipped, "examples": examples}
  storage.path(path + ".json").write_text(json.dumps(summary))
  return summary


def write_shard(entries: list[Entry], image_root: str, path: str, *encode_args) -> dict:
  """One shard of file entries (ShareGPT4V, folders)."""
  source = sources.FileListSource(entries, image_root, "prepare")
  return write_records((source[i] for i in range(len(source))), path, *encode_args)


def write_tar_shard(tar: str, caption_key: str, path: str, *encode_args) -> dict:
  """One shard of one WebDataset tar."""
  return write_records(tar_records(tar, caption_key), path, *encode_args)


def write_parquet_shard(file: str, caption_key: str, path: str, *encode_args) -> dict:
  """One shard of one Parquet file."""
  return write_records(parquet_records(file, caption_key), path, *encode_args)


PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")


class UnusableParquet(ValueError):
  """A Parquet file without image bytes (URLs to download first) or without the caption column."""


def parquet_columns(path: str, caption_key: str = "") -> tuple[str, str]:
  """(image column, caption column) of an img2dataset Parquet file. A file of URLs without
  image bytes (img2dataset's input, not its output), or one without the caption column, is
  UnusableParquet, saying so."""
  import pyarrow.parquet as pq

  with storage.path(path).open("rb") as f:
    schema = pq.read_schema(f)
  image = next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)
  if image is None:
    has_urls = "url" in schema.names
    raise UnusableParquet(
      f"{path} has no image bytes (columns {schema.names})"
      + (
        ": it lists image URLs; download them first, e.g. `img2dataset --url_list "
        f"{path} --input_format parquet --output_format parquet`, and prepare its output"
        if has_urls
        else f"; expected one of {PARQUET_IMAGE_COLUMNS}"
      )
    )
  caption = caption_key or next((c for c in ("caption", "txt", "text") if c in schema.names), "")
  if caption not in schema.names:
    raise UnusableParquet(f"{path}: no caption column {caption_key or 'caption'} in {schema.names}")
  return image, caption


def parquet_records(path: str, caption_key: str = "") -> Iterator[dict]:
  """An img2dataset Parquet file's rows as raw records; rows without image bytes (failed
  downloads) or caption are bad records; a file that stops being readable ends with one
  `truncated_archive`."""
  import pyarrow.parquet as pq

  key_col, row = "key", 0
  try:
    image_col, caption_col = parquet_columns(path, caption_key)
    file = pq.ParquetFile(storage.path(path).open("rb"))
    columns = [c for c in (key_col, image_col, caption_col) if c in file.schema_arrow.names]
    for batch in file.iter_batches(columns=columns, batch_size=256):
      data = batch.to_pydict()
      for i in range(batch.num_rows):
        key = str(data[key_col][i]) if key_col in data else f"{path}:{row}"
        image, caption = data[image_col][i], data[caption_col][i]
        if isinstance(image, dict):  # {"bytes": ..., "path": ...}, as datasets writes images
          image = image.get("bytes")
        row += 1
        if image is None:
          yield {"error": "no_image", "id": key, "detail": f"no bytes in column {image_col}"}
        elif caption is None:
          yield {"error": "no_caption", "id": key, "detail": f"no {caption_col}"}
        else:
          yield {"id": key, "image": image, "caption": caption}
  except (OSError, ValueError) as e:  # pyarrow's errors on a cut or corrupt file
    yield {"error": "truncated_archive", "id": f"{path}:{row}", "detail": str(e)}


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def tar_records(path: str, caption_key: str = "") -> Iterator[dict]:
  """A WebDataset tar's samples in order, as raw records ({"id", "image", "caption"}) or bad
  ones ({"error", "id", "detail"}); a tar cut off mid-way ends with one `truncated_archive`."""
  key, parts = None, {}
  try:  # read as a stream, in order: a tar in a bucket is downloaded once, not seeked around
    with storage.path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as archive:
      for member in archive:
        if not member.isfile():
          continue
        folder, base = posixpath.split(member.name)
        stem, _, ext = base.partition(".")
        if posixpath.join(folder, stem) != key:
          if key is not None:
            yield _sample(key, parts, caption_key)
          key, parts = posixpath.join(folder, stem), {}
        parts[ext.lower()] = archive.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError) as e:
    yield {"error": "truncated_archive", "id": f"{path}:{key}", "detail": str(e)}
    return
  if key is not None:
    yield _sample(key, parts, caption_key)


def _sample(key: str, parts: dict[str, bytes], caption_key: str) -> dict:
  image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
  if image is None:
    return {"error": "no_image", "id": key, "detail": f"members {sorted(parts)}"}
  if caption_key:
    try:
      caption = json.loads(parts["json"])[caption_key] if "json" in parts else None
    except (ValueError, TypeError, KeyError):
      caption = None
  else:
    caption = parts.get("txt")
  if caption is None:
    what = f"{key}.json field {caption_key!r}" if caption_key else f"{key}.txt"
    return {"error": "no_caption", "id": key, "detail": f"no {what}"}
  return {"id": key, "image": image, "caption": caption}


def expand(pattern: str) -> list[str]:
  """Files matching `pattern`: brace ranges `{00000..00127}` (zero-padded as written) and lists
  `{a,b}`, then glob wildcards; sorted (names that match no file are left out, as a shard
  img2dataset failed to write). Raises FileNotFoundError when nothing matches."""
  files = _expand(pattern)
  if not files:
    raise FileNotFoundError(f"no file matches {pattern}")
  return files


def _expand(pattern: str) -> list[str]:
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match:
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    options = (
      [str(i).zfill(len(span.group(1))) for i in range(int(span.group(1)), int(span.group(2)) + 1)]
      if span
      else body.split(",")
    )
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return sorted({f for o in options for f in _expand(head + o + tail)})
  if storage.is_remote(pattern):  # gs://: wildcards in the file name only
    folder, name = posixpath.split(pattern)
    found = storage.path(folder).glob(name) if glob.has_magic(name) else [storage.path(pattern)]
    return [str(f) for f in found if f.is_file()]
  files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
  return [f for f in files if os.path.isfile(f)]


def plan_shards(
  entries: list[Entry], out_dir: epath.Path, num_shards: int
) -> list[tuple[list[Entry], str]]:
  """Contiguous, nearly equal slices of `entries`, each with its shard path."""
  bounds = [round(k * len(entries) / num_shards) for k in range(num_shards + 1)]
  return [
    (entries[bounds[k] : bounds[k + 1]], str(out_dir / _shard_name(k, num_shards)))
    for k in range(num_shards)
  ]


def prepare(
  entries: list[Entry],
  image_root: str,
  out: str | os.PathLike,
  *,
  holdout: int,
  num_shards: int | None,
  max_side: int,
  min_side: int,
  max_pixels: int,
  quality: int,
  workers: int,
  progress: bool = True,
  part: tuple[int, int] = (0, 1),
) -> dict:
  """Writes train (and eval, with a holdout) shards in parallel; returns the summary.
  `part` (index, count): this process writes every count-th shard from the index-th (`_run`)."""
  out = storage.path(out)
  splits = (
    {"train": entries[holdout:], "eval": entries[:holdout]} if holdout else {"train": entries}
  )
  jobs = []
  for split, items in splits.items():
    if not items:
      continue
    shards = num_shards or max(1, math.ceil(len(items) / 5000))
    if split == "eval":
      shards = min(shards, max(1, math.ceil(len(items) / 5000)))
    (out / split).mkdir(parents=True, exist_ok=True)
    jobs += [
      (write_shard, (e, image_root), p, len(e))
      for e, p in plan_shards(items, out / split, min(shards, len(items)))
    ]
  splits = [split for split in splits if splits[split]]
  encode_args = (max_side, min_side, max_pixels, quality)
  return _run(jobs, out, splits, encode_args, workers, progress, part=part)


def prepare_files(
  files: list[str],
  out: str | os.PathLike,
  *,
  kind: str,
  caption_key: str,
  max_side: int,
  min_side: int,
  max_pixels: int,
  quality: int,
  workers: int,
  progress: bool = True,
  part: tuple[int, int] = (0, 1),
) -> dict:
  """One train shard per WebDataset tar or Parquet file (`kind`), written in parallel; returns
  the summary. `part`: as `prepare`'s."""
  out = storage.path(out)
  write = {"webdataset": write_tar_shard, "parquet": write_parquet_shard}[kind]
  (out / "train").mkdir(parents=True, exist_ok=True)
  jobs = [
    (write, (file, caption_key), str(out / "train" / _shard_name(k, len(files))), 1)
    for k, file in enumerate(files)
  ]
  encode_args = (max_side, min_side, max_pixels, quality)
  return _run(jobs, out, ["train"], encode_args, workers, progress, unit="file", part=part)


def _shard_name(k: int, n: int) -> str:
  return f"shard-{k:05d}-of-{n:05d}.array_record"


def _run(
  jobs: list[tuple],
  out: epath.Path,
  splits: list[str],
  encode_args: tuple,
  workers: int,
  progress: bool,
  unit: str = "img",
  part: tuple[int, int] = (0, 1),
) -> dict:
  """Runs the shard jobs (fn, args, path, size) of this part not done yet (no `<path>.json`)
  in worker processes, then, once every shard of every part is done, sums their summaries into
  `<out>/summary.json`. Part (i, n) takes jobs i, i + n, i + 2n, ...: processes or hosts given
  the same input and n split one prepare between them, each writing its own shards (the job
  list is a function of the input alone). Until the last part ends, the summary returned is
  partial (`"complete": false`) and no summary.json is written."""
  index, count = part
  if not 0 <= index < count:
    raise ValueError(f"part {index} of {count}: the index must be in [0, {count})")
  mine = jobs[index::count]
  todo = [job for job in mine if not storage.path(job[2] + ".json").exists()]
  bar = tqdm(
    total=sum(job[3] for job in mine),
    initial=sum(job[3] for job in mine) - sum(job[3] for job in todo),
    unit=unit,
    disable=not progress,
    desc=f"{len(todo)}/{len(mine)} shards to write" + (f" (part {index} of {count})" * (count > 1)),
  )
  # spawn, not fork: a caller may have started threads (JAX does) that fork would copy broken.
  spawn = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=spawn) as pool:
    futures = {pool.submit(fn, *args, path, *encode_args): size for fn, args, path, size in todo}
    for future in concurrent.futures.as_completed(futures):
      future.result()
      bar.update(futures[future])
  bar.close()
  marks = [storage.path(job[2] + ".json") for job in jobs]
  shard_summaries = [json.loads(m.read_text()) for m in marks if m.exists()]
  summary = {
    "records": sum(s["records"] for s in shard_summaries),
    "shards": len(jobs),
    "written": sum(s["written"] for s in shard_summaries),
    "skipped": {r: sum(s["skipped"][r] for s in shard_summaries) for r in decode.REASONS},
    "examples": [x for s in shard_summaries for x in s["examples"]][:20],
    "splits": {split: str(out / split) for split in splits},
  }
  if len(shard_summaries) < len(jobs):
    return {**summary, "complete": False, "shards_done": len(shard_summaries)}
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def arg_parser() -> argparse.ArgumentParser:
  """The command line, apart so that tools (and the README's test) can check arguments."""
  parser = argparse.ArgumentParser(
    prog="python -m smartclip_jax.data.prepare",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--format", choices=("sharegpt4v", "folder", "webdataset", "parquet"), required=True
  )
  parser.add_argument(
    "--input",
    required=True,
    help="ShareGPT4V JSON; a folder, CSV/TSV or JSONL of captions; tar shards ({0..9}, globs)",
  )
  parser.add_argument("--image-root", default="", help="image paths are relative to this")
  parser.add_argument("--out", required=True)
  parser.add_argument(
    "--num-shards", type=int, default=None, help="train shards (default: one per 5,000 records)"
  )
  parser.add_argument("--max-side", type=int, default=512)
  parser.add_argument("--min-side", type=int, default=16)
  parser.add_argument("--max-pixels", type=int, default=100_000_000)
  parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
  parser.add_argument(
    "--holdout",
    type=int,
    default=None,
    help=(
      f"first records written to eval/ (default: {config_lib.SHAREGPT4V_HOLDOUT} for ShareGPT4V, 0)"
    ),
  )
  parser.add_argument("--image-key", default=config_lib.CSV_KEYS[0], help="CSV/TSV image column")
  parser.add_argument(
    "--caption-key",
    default=None,
    help=f"CSV/TSV caption column (default {config_lib.CSV_KEYS[1]}); webdataset: the .json "
    "field to caption with (default: the .txt)",
  )
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument(
    "--process-index",
    type=int,
    default=0,
    help="this process's part when --process-count split one prepare (e.g. $SLURM_PROCID)",
  )
  parser.add_argument(
    "--process-count",
    type=int,
    default=1,
    help="processes or hosts sharing this prepare, each run with the same arguments and its own "
    "--process-index; each writes every count-th shard, the last to finish the summary",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> dict:
  parser = arg_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if not 0 <= args.process_index < args.process_count:
    parser.error(f"--process-index {args.process_index}: give 0 .. {args.process_count - 1}")
  encode = dict(
    max_side=args.max_side,
    min_side=args.min_side,
    max_pixels=args.max_pixels,
    quality=args.quality,
    part=(args.process_index, args.process_count),
  )
  if args.format in ("webdataset", "parquet"):
    if args.holdout:
      parser.error(f"--holdout: a {args.format} held-out split is its own files (prepare apart)")
    try:
      files = expand(args.input)
      if args.format == "parquet":
        for file in files:  # a file of URLs stops here, saying what to do; a cut one is counted
          with contextlib.suppress(OSError, ValueError):
            try:
              parquet_columns(file, args.caption_key or "")
            except UnusableParquet as e:
              parser.error(str(e))
    except FileNotFoundError as e:
      parser.error(str(e))
    summary = prepare_files(
      files,
      args.out,
      kind=args.format,
      caption_key=args.caption_key or "",
      workers=args.workers,
      **encode,
    )
  elif args.format == "sharegpt4v":
    entries, root = sources.sharegpt4v_entries(args.input)
    holdout = config_lib.SHAREGPT4V_HOLDOUT if args.holdout is None else args.holdout
  else:
    entries, root = sources.folder_entries(
      args.input, args.image_key, args.caption_key or config_lib.CSV_KEYS[1]
    )
    holdout = args.holdout or 0
  if args.format in ("sharegpt4v", "folder"):
    summary = prepare(
      entries,
      str(args.image_root or root),
      args.out,
      holdout=holdout,
      num_shards=args.num_shards,
      workers=args.workers,
      **encode,
    )
  if not summary.get("complete", True):
    print(
      f"part {args.process_index} of {args.process_count}: its shards are written; "
      f"{summary['shards_done']} of {summary['shards']} shards done in {args.out}. The part "
      "that finishes last writes summary.json (rerun any part to write it once all are done)"
    )
    return summary
  skipped = ", ".join(f"{r} {n}" for r, n in summary["skipped"].items() if n) or "none"
  print(
    f"wrote {summary['written']} of {summary['records']} records in {summary['shards']} "
    f"shards to {args.out}; skipped: {skipped}"
  )
  return summary


def cli() -> None:
  """The `smartclip-prepare` command: `main` without its return value (the summary), which a
  console script would take for an exit status."""
  main()


if __name__ == "__main__":
  cli()
