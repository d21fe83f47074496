"""Converts ShareGPT4V or an image folder into ArrayRecord shards for pod-scale training.

  python -m smartclip_jax.data.prepare --format sharegpt4v|folder --input <json/csv/dir>
      --image-root <dir> --out <dir> [--num-shards N] [--max-side 512] [--workers W]

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
import io
import json
import math
import multiprocessing
import os
import pathlib
import sys
from collections.abc import Sequence

import PIL.Image
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from smartclip_jax import config as config_lib
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


def write_shard(
  entries: list[Entry],
  image_root: str,
  path: str,
  max_side: int,
  min_side: int,
  max_pixels: int,
  quality: int,
) -> dict:
  """Writes one shard atomically (tmp + rename), then its summary `<path>.json`."""
  source = sources.FileListSource(entries, image_root, "prepare")
  skipped = dict.fromkeys(decode.REASONS, 0)
  examples, written = [], 0
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  for index in range(len(source)):
    record = source[index]
    try:
      writer.write(encode_record(record, max_side, min_side, max_pixels, quality))
      written += 1
    except decode.BadRecord as e:
      skipped[e.reason] += 1
      if len(examples) < 5:
        examples.append(f"{record['id']}: {e}")
  writer.close()
  os.replace(tmp, path)
  summary = {"records": len(entries), "written": written, "skipped": skipped, "examples": examples}
  pathlib.Path(path + ".json").write_text(json.dumps(summary))
  return summary


def plan_shards(
  entries: list[Entry], out_dir: pathlib.Path, num_shards: int
) -> list[tuple[list[Entry], str]]:
  """Contiguous, nearly equal slices of `entries`, each with its shard path."""
  bounds = [round(k * len(entries) / num_shards) for k in range(num_shards + 1)]
  return [
    (
      entries[bounds[k] : bounds[k + 1]],
      str(out_dir / f"shard-{k:05d}-of-{num_shards:05d}.array_record"),
    )
    for k in range(num_shards)
  ]


def prepare(
  entries: list[Entry],
  image_root: str,
  out: pathlib.Path,
  *,
  holdout: int,
  num_shards: int | None,
  max_side: int,
  min_side: int,
  max_pixels: int,
  quality: int,
  workers: int,
  progress: bool = True,
) -> dict:
  """Writes train (and eval, with a holdout) shards in parallel; returns the summary."""
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
    jobs += plan_shards(items, out / split, min(shards, len(items)))
  todo = [(e, p) for e, p in jobs if not pathlib.Path(p + ".json").exists()]
  done_records = sum(len(e) for e, _ in jobs) - sum(len(e) for e, _ in todo)
  bar = tqdm(
    total=len(entries),
    initial=done_records,
    unit="img",
    disable=not progress,
    desc=f"{len(todo)}/{len(jobs)} shards to write",
  )
  args = (max_side, min_side, max_pixels, quality)
  # spawn, not fork: a caller may have started threads (JAX does) that fork would copy broken.
  spawn = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=spawn) as pool:
    futures = {pool.submit(write_shard, e, image_root, p, *args): len(e) for e, p in todo}
    for future in concurrent.futures.as_completed(futures):
      future.result()
      bar.update(futures[future])
  bar.close()
  shard_summaries = [json.loads(pathlib.Path(p + ".json").read_text()) for _, p in jobs]
  summary = {
    "records": len(entries),
    "shards": len(jobs),
    "written": sum(s["written"] for s in shard_summaries),
    "skipped": {r: sum(s["skipped"][r] for s in shard_summaries) for r in decode.REASONS},
    "examples": [x for s in shard_summaries for x in s["examples"]][:20],
    "splits": {split: str(out / split) for split in splits if splits[split]},
  }
  (out / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(
    prog="python -m smartclip_jax.data.prepare",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--format", choices=("sharegpt4v", "folder"), required=True)
  parser.add_argument(
    "--input", required=True, help="ShareGPT4V JSON; or a folder, CSV/TSV or JSONL of captions"
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
    "--caption-key", default=config_lib.CSV_KEYS[1], help="CSV/TSV caption column"
  )
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.format == "sharegpt4v":
    entries, root = sources.sharegpt4v_entries(args.input)
    holdout = config_lib.SHAREGPT4V_HOLDOUT if args.holdout is None else args.holdout
  else:
    entries, root = sources.folder_entries(args.input, args.image_key, args.caption_key)
    holdout = args.holdout or 0
  summary = prepare(
    entries,
    str(args.image_root or root),
    pathlib.Path(args.out),
    holdout=holdout,
    num_shards=args.num_shards,
    max_side=args.max_side,
    min_side=args.min_side,
    max_pixels=args.max_pixels,
    quality=args.quality,
    workers=args.workers,
  )
  skipped = ", ".join(f"{r} {n}" for r, n in summary["skipped"].items() if n) or "none"
  print(
    f"wrote {summary['written']} of {summary['records']} records in {summary['shards']} "
    f"shards to {args.out}; skipped: {skipped}"
  )
  return summary


if __name__ == "__main__":
  main()
