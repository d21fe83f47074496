"""Faults a pod run meets: a corrupt shard, a record of an unexpected kind, an image format that
would run a program (each counted and replaced, never a crash), data workers in a signalled
process group, a torn metrics line, an unsafe torch."""

import io
import json
import logging
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from smartclip_jax import config as config_lib, train
from smartclip_jax.data import decode, pipeline, prepare, sources
from tests.conftest import DEMO, REPO, TINY

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto 32 32 lineto stroke\n"


def featurize(record: dict, **changes) -> dict:
  """A training record through the pipeline's featurizer, at small sizes (or `changes`)."""
  options = dict(
    train=True,
    caption_mode="full",
    image_size=32,
    context_length=16,
    transform="centre_crop",
    crop_scale=(0.9, 1.0),
    crop_ratio=(0.75, 1.33),
    min_side=1,
    max_pixels=10**8,
  )
  return pipeline.featurize(record, np.random.default_rng(0), **{**options, **changes})


def write_shard(folder, count: int, rng) -> pathlib.Path:
  """`count` records of 40x40 JPEGs, one Riegeli chunk each, as `prepare` writes them."""
  folder.mkdir(parents=True)
  path = folder / "shard-00000-of-00001.array_record"
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for i in range(count):
    image = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image, "JPEG")
    writer.write(sources.pack(str(i), f"a noisy square number {i}.", image.getvalue()))
  writer.close()
  return path


def test_a_shard_with_corrupted_bytes_trains_to_the_end_counting_what_it_skipped(tmp_path):
  rng = np.random.default_rng(0)
  path = write_shard(tmp_path / "shards", 64, rng)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
  path.write_bytes(bytes(data))
  config = config_lib.load(
    DEMO,
    TINY
    + [
      "total_steps=4",  # one epoch of 64 records in batches of 16
      "log_every=4",
      "data.name=array_record",
      f"data.path={tmp_path / 'shards'}",
      f"data.eval_path={tmp_path / 'shards'}",
      "data.max_bad_fraction=0.1",
    ],
  )
  results = train.train_and_evaluate(config, tmp_path / "run")
  (last,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert last["step"] == 4 and last["data/skipped_unreadable_record"] >= 1
  assert results["skipped"] >= 1 and results["num_images"] + results["skipped"] == 64


def test_an_eps_record_never_runs_ghostscript(tmp_path, monkeypatch):
  ran = tmp_path / "gs_ran"
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "gs").write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
  (fake / "gs").chmod(0o755)
  monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
  with pytest.raises(decode.BadRecord) as e:
    decode.decode_image(EPS, min_side=1, max_pixels=10**8)
  assert e.value.reason == "undecodable_image"
  out = featurize({"id": "eps", "caption": "a line.", "image": EPS})
  assert out["error"] == "undecodable_image"
  assert not ran.exists()  # Pillow never handed the bytes to Ghostscript


def test_records_of_an_unexpected_kind_are_counted_as_unreadable():
  class Odd:
    def __len__(self):
      return 3

    def __getitem__(self, i):
      if i == 0:
        raise RuntimeError("Corrupted Riegeli/records file: chunk data hash mismatch")
      return [1, 2] if i == 1 else {"id": "no image", "caption": "a caption."}

  guarded = sources.Guarded(Odd())
  first = guarded[0]
  assert (
    first["error"] == "unreadable_record" and "RuntimeError: Corrupted Riegeli" in (first["detail"])
  )
  assert guarded[1]["error"] == "unreadable_record" and "a list, not a dict" in guarded[1]["detail"]
  out = featurize(guarded[2])
  assert out["error"] == "unreadable_record" and "KeyError" in out["detail"]


def test_prepare_counts_a_record_it_cannot_read_and_writes_the_rest(tmp_path):
  image = io.BytesIO()
  PIL.Image.new("RGB", (32, 32), (200, 10, 10)).save(image, "PNG")
  records = [
    {"id": "good", "caption": "a red square.", "image": image.getvalue()},
    {"id": "no image", "caption": "a caption."},
    {"id": "eps", "caption": "a line.", "image": EPS},
  ]
  summary = prepare.write_records(iter(records), str(tmp_path / "s.array_record"), 64, 1, 10**8, 90)
  assert summary["written"] == 1
  assert summary["skipped"]["unreadable_record"] == 1
  assert summary["skipped"]["undecodable_image"] == 1
  assert any("KeyError" in e for e in summary["examples"])


def test_data_workers_ignore_stop_signals_and_end_when_the_trainer_closes_them(demo_config):
  demo_config.data.num_workers = 2
  batches = pipeline.train_iterator(demo_config)
  next(batches)
  workers = multiprocessing.active_children()
  assert len(workers) >= 2
  for worker in workers:  # what a signal to the process group does to them
    os.kill(worker.pid, signal.SIGTERM)
  time.sleep(1)
  assert all(w.is_alive() for w in workers)
  assert next(batches)["tokens"].shape == (demo_config.batch_size, 32)
  batches.close()
  assert not any(w.is_alive() for w in workers)


def test_data_workers_die_with_a_trainer_that_never_closed_them(tmp_path):
  """SIGKILL, the watchdog's exit or a crash skip the trainer's cleanup: its workers, which
  ignore stop signals, must not outlive it into the restarted run."""
  script = (
    "import multiprocessing, os, signal, sys\n"
    "from smartclip_jax import config as config_lib\n"
    "from smartclip_jax.data import pipeline\n"
    f"config = config_lib.load({DEMO!r}, {TINY!r} + ['data.num_workers=2'])\n"
    "batches = pipeline.train_iterator(config)\n"
    "next(batches)\n"
    "print(*[w.pid for w in multiprocessing.active_children()], flush=True)\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  pids = [int(p) for p in done.stdout.split()]
  assert done.returncode == -signal.SIGKILL and len(pids) >= 2, done.stderr
  deadline = time.time() + 10
  while any(alive(pid) for pid in pids) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, reaped by init, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_a_torn_metrics_line_does_not_stop_a_resume(demo_config, tmp_path, caplog):
  demo_config.update(total_steps=2, log_every=1, checkpoint_every=2)
  train.train_and_evaluate(demo_config, tmp_path)
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "loss": 4.2, "l')  # a run killed while writing step 3's line
  demo_config.total_steps = 3
  with caplog.at_level(logging.WARNING, logger="smartclip_jax"):
    train.train_and_evaluate(demo_config, tmp_path)
  assert "dropped 1 torn line(s)" in caplog.text
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_pickled_checkpoints_need_a_torch_whose_weights_only_load_runs_no_code(
  tmp_path, monkeypatch
):
  torch = pytest.importorskip("torch", reason="needs requirements-torch.txt")
  from smartclip_jax.interop import torch_files

  torch.save({"w": torch.zeros(2)}, tmp_path / "m.pt")
  monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
  with pytest.raises(ValueError, match=r"needs torch >= 2.6 .* this is torch 2.5.1\+cpu"):
    torch_files.read_torch_file(tmp_path / "m.pt")
