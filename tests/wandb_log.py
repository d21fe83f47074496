"""Reads what W&B wrote offline, to check a run's content: the `.wandb` transaction log is
LevelDB's log framing (32 KiB blocks; each record a CRC, a little-endian length, a type, data;
a record cut by a block's end continues in the next) around `Record` protobufs."""

from __future__ import annotations

import json
import pathlib
import struct

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: pathlib.Path) -> list:
  from wandb.proto import wandb_internal_pb2

  data = path.read_bytes()
  assert data[:4] == b":W&B", path
  out, pos, pending = [], HEADER, b""
  while pos + HEADER <= len(data):
    left = BLOCK - pos % BLOCK
    if left < HEADER:  # the block's tail is padding
      pos += left
      continue
    length, kind = struct.unpack_from("<HB", data, pos + 4)
    chunk = data[pos + HEADER : pos + HEADER + length]
    pos += HEADER + length
    if kind == 0 and length == 0:
      continue
    pending = chunk if kind in (FULL, FIRST) else pending + chunk
    if kind in (FULL, LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
  return out


def history(run_dir: pathlib.Path) -> list[dict]:
  """The logged rows of an offline run directory, internal keys (`_step`, ...) left out."""
  (log,) = run_dir.glob("run-*.wandb")
  rows = []
  for r in records(log):
    if r.WhichOneof("record_type") == "history":
      row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      rows.append({k: v for k, v in row.items() if not k.startswith("_")})
  return rows


def run(run_dir: pathlib.Path) -> dict:
  """The run record: its id, name, tags and config (values JSON-decoded)."""
  (log,) = run_dir.glob("run-*.wandb")
  (r,) = [r.run for r in records(log) if r.WhichOneof("record_type") == "run"]
  values = {i.key: json.loads(i.value_json) for i in r.config.update if i.key != "_wandb"}
  return {"id": r.run_id, "name": r.display_name, "tags": list(r.tags), "config": values}
