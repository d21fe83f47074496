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

from smartclip_jax import config as config_lib, distributed, resume, train
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


def shard_config(shards, *overrides):
  """The tiny demo model trained on the ArrayRecord shards in `shards` (batches of 16)."""
  return config_lib.load(
    DEMO,
    TINY
    + ["data.name=array_record", f"data.path={shards}", f"data.eval_path={shards}"]
    + list(overrides),
  )


@pytest.mark.slow  # a whole run and its resume: about a minute
def test_a_shard_with_corrupted_bytes_trains_to_the_end_counting_what_it_skipped(tmp_path):
  rng = np.random.default_rng(0)
  path = write_shard(tmp_path / "shards", 64, rng)
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
  path.write_bytes(bytes(data))
  # one epoch of 64 records in batches of 16
  config = shard_config(tmp_path / "shards", "total_steps=4", "log_every=4")
  config.data.max_bad_fraction = 0.1
  results = train.train_and_evaluate(config, tmp_path / "run")
  (last,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert last["step"] == 4 and last["data/skipped_unreadable_record"] >= 1
  assert results["skipped"] >= 1 and results["num_images"] + results["skipped"] == 64


def test_changed_sources_name_each_difference():
  saved = [sources.identity(type("S", (), {"__len__": lambda self: 64})(), "mix0")]
  saved[0]["shards"] = {"a": 10, "b": 20, "c": 30}
  now = [dict(saved[0], records=70, shards={"a": 10, "b": 21, "d": 5})]
  (line,) = sources.changed_sources(saved, now)
  assert line == (
    "mix0: records 64 then, 70 now; shards added: d; shards removed: c; shards resized: b"
  )
  assert sources.changed_sources(saved, saved) == []
  assert sources.changed_sources(saved, saved + now) == [
    "mix0: kind None then, 'S' now; records None then, 70 now; shards added: a, b, d"
  ]


def test_the_sources_identity_rides_with_the_data_counts_in_a_checkpoint():
  stats = pipeline.DataStats(sources=[{"label": "", "kind": "DemoSource", "records": 64}])
  back = pipeline.DataStats.from_state_dict(json.loads(json.dumps(stats.state_dict())))
  assert back.saved_sources == stats.sources and back.sources == []
  assert pipeline.DataStats.from_state_dict({"used": 3, "skipped": {}}).saved_sources is None


def test_processes_that_see_different_training_data_stop(demo_config, monkeypatch):
  stats = pipeline.DataStats(sources=[{"label": "", "kind": "DemoSource", "records": 64}])
  resume.check_data(stats, 0, demo_config)  # one process agrees with itself
  monkeypatch.setattr(distributed, "gather", lambda value: np.array([value, value + 1]))
  with pytest.raises(pipeline.DataError, match=r"processes \[1\] differ from process 0"):
    resume.check_data(stats, 0, demo_config)


@pytest.mark.slow
def test_a_resume_on_added_shards_stops_unless_accepted(tmp_path, caplog):
  write_shard(tmp_path / "shards", 64, np.random.default_rng(0))
  config = shard_config(tmp_path / "shards", "total_steps=2", "checkpoint_every=2", "eval.every=0")
  train.train_and_evaluate(config, tmp_path / "run")
  shard = tmp_path / "shards" / "shard-00000-of-00001.array_record"
  (tmp_path / "shards" / "added.array_record").write_bytes(shard.read_bytes())
  config.total_steps = 4
  with pytest.raises(resume.ResumeError, match="records 64 then, 128 now; shards added: added"):
    train.train_and_evaluate(config, tmp_path / "run")
  config.data.accept_changed_sources = True
  train.train_and_evaluate(config, tmp_path / "run")
  assert "resuming at step 2 on changed training data" in caplog.text
  steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert steps[-1] == 4


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


def test_a_transient_storage_error_reading_a_record_is_retried_before_it_is_counted(
  monkeypatch,
):
  monkeypatch.setattr(sources.Guarded, "RETRY_AFTER_S", (0.0, 0.0))
  errors = [OSError("503 Service Unavailable"), TimeoutError("read timed out")]

  class Flaky:
    def __len__(self):
      return 1

    def __getitem__(self, i):
      if errors:
        raise errors.pop(0)
      return {"id": "fine", "caption": "a caption."}

  assert sources.Guarded(Flaky())[0]["id"] == "fine"
  errors.extend([TimeoutError("read timed out")] * 3)  # outlasts the retries
  assert "TimeoutError" in sources.Guarded(Flaky())[0]["detail"] and not errors


def test_prepare_counts_a_record_it_cannot_read_and_writes_the_rest(tmp_path):
  image = io.BytesIO()
  PIL.Image.new("RGB", (32, 32), (200, 10, 10)).save(image, "PNG")
  records = [
    {"id": "good", "caption": "a red square.", "image": image.getvalue()},
    {"id": "no image", "caption": "a caption."},
    {"id": "eps", "caption": "a line.", "image": EPS},
  ]
  encoding = prepare.Encoding(max_side=64, min_side=1, max_pixels=10**8, quality=90)
  summary = prepare.write_records(iter(records), str(tmp_path / "s.array_record"), encoding)
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


@pytest.mark.slow  # a whole run and its resume: about a minute
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
