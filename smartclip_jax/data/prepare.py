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
import dataclasses
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence

import PIL.Image
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from tqdm import tqdm

from smartclip_jax import config as config_lib, storage
from smartclip_jax.data import decode, readers, sources

Entry = tuple[str, str, object]


@dataclasses.dataclass(frozen=True)
class Encoding:
  """How records are stored: decoded, converted to RGB, skipped below `min_side` or above
  `max_pixels`, shrunk so the longer side is at most `max_side`, re-encoded as JPEG."""

  max_side: int = 512
  min_side: int = 16
  max_pixels: int = 100_000_000
  quality: int = 95


DEFAULT_ENCODING = Encoding()


def encode_record(record: dict, encoding: Encoding) -> bytes:
  """A raw record as packed bytes of a resized JPEG; raises BadRecord when unusable."""
  if record.get("error"):
    raise decode.BadRecord(record["error"], record.get("detail", ""))
  caption = decode.read_caption(record["caption"])
  image = decode.decode_image(record["image"], encoding.min_side, encoding.max_pixels)
  if max(image.size) > encoding.max_side:
    scale = encoding.max_side / max(image.size)
    image = image.resize(
      (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
      PIL.Image.Resampling.BICUBIC,
    )
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=encoding.quality)
  return sources.pack(str(record["id"]), caption, out.getvalue())


def write_records(records: Iterable[dict], path: str, encoding: Encoding) -> dict:
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
      packed = encode_record(record, encoding)
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


def write_shard(entries: list[Entry], image_root: str, path: str, encoding: Encoding) -> dict:
  """One shard of file entries (ShareGPT4V, folders)."""
  source = sources.FileListSource(entries, image_root, "prepare")
  return write_records((source[i] for i in range(len(source))), path, encoding)


def write_tar_shard(tar: str, caption_key: str, path: str, encoding: Encoding) -> dict:
  """One shard of one WebDataset tar."""
  return write_records(readers.tar_records(tar, caption_key), path, encoding)


def write_parquet_shard(file: str, caption_key: str, path: str, encoding: Encoding) -> dict:
  """One shard of one Parquet file."""
  return write_records(readers.parquet_records(file, caption_key), path, encoding)


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
  **options,
) -> dict:
  """Writes train (and eval, with a holdout) shards of file entries in parallel; returns the
  summary. `options`: `_run`'s (encoding, workers, progress, part)."""
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
  return _run(jobs, out, [split for split in splits if splits[split]], **options)


def prepare_files(
  files: list[str], out: str | os.PathLike, *, kind: str, caption_key: str, **options
) -> dict:
  """One train shard per WebDataset tar or Parquet file (`kind`), written in parallel; returns
  the summary. `options`: `_run`'s."""
  out = storage.path(out)
  write = {"webdataset": write_tar_shard, "parquet": write_parquet_shard}[kind]
  (out / "train").mkdir(parents=True, exist_ok=True)
  jobs = [
    (write, (file, caption_key), str(out / "train" / _shard_name(k, len(files))), 1)
    for k, file in enumerate(files)
  ]
  return _run(jobs, out, ["train"], unit="file", **options)


def _shard_name(k: int, n: int) -> str:
  return f"shard-{k:05d}-of-{n:05d}.array_record"


def _run(
  jobs: list[tuple],
  out: epath.Path,
  splits: list[str],
  encoding: Encoding = DEFAULT_ENCODING,
  workers: int = 1,
  progress: bool = True,
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
    futures = {pool.submit(fn, *args, path, encoding): size for fn, args, path, size in todo}
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
  parser.add_argument("--max-side", type=int, default=DEFAULT_ENCODING.max_side)
  parser.add_argument("--min-side", type=int, default=DEFAULT_ENCODING.min_side)
  parser.add_argument("--max-pixels", type=int, default=DEFAULT_ENCODING.max_pixels)
  parser.add_argument("--quality", type=int, default=DEFAULT_ENCODING.quality, help="JPEG quality")
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
  options = dict(
    encoding=Encoding(args.max_side, args.min_side, args.max_pixels, args.quality),
    workers=args.workers,
    part=(args.process_index, args.process_count),
  )
  if args.format in ("webdataset", "parquet"):
    if args.holdout:
      parser.error(f"--holdout: a {args.format} held-out split is its own files (prepare apart)")
    try:
      files = readers.expand(args.input)
      if args.format == "parquet":
        for file in files:  # a file of URLs stops here, saying what to do; a cut one is counted
          with contextlib.suppress(OSError, ValueError):
            try:
              readers.parquet_columns(file, args.caption_key or "")
            except readers.UnusableParquet as e:
              parser.error(str(e))
    except FileNotFoundError as e:
      parser.error(str(e))
    summary = prepare_files(
      files,
      args.out,
      kind=args.format,
      caption_key=args.caption_key or "",
      **options,
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
      **options,
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
