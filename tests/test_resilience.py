"""Whole runs in subprocesses: killed with SIGKILL and resumed bit for bit, stopped by SIGTERM,
and split over two processes (jax.distributed on 127.0.0.1) with the losses of one."""

import os
import signal
import socket
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from smartclip_jax import config as config_lib, train
from smartclip_jax.data import pipeline
from tests.conftest import DEMO, REPO, TINY
from tests.test_train import read_metrics

pytestmark = pytest.mark.slow


def launch(workdir, overrides, devices=8, flags=(), log=None):
  """`python -m smartclip_jax.train` on the TINY demo."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": REPO,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
  }
  cmd = [
    sys.executable,
    "-m",
    "smartclip_jax.train",
    "--config",
    DEMO,
    "--workdir",
    str(workdir),
    *flags,
    *(f"--config.{o}" for o in TINY + overrides),
  ]
  return subprocess.Popen(
    cmd, env=env, cwd=REPO, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def wait_for_step(proc, workdir, step, timeout=300):
  """Blocks until metrics.jsonl has logged `step` (the run is then past it)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    path = workdir / "metrics.jsonl"
    if path.exists() and any(m["step"] >= step for m in read_metrics(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early:\n{proc.stdout.read() if proc.stdout else ''}")
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


def finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out
  return out


def losses(workdir):
  return [(m["step"], m["loss"]) for m in read_metrics(workdir)]


RUN = ["total_steps=30", "log_every=1", "checkpoint_every=10"]


def test_sigkill_at_any_point_resumes_with_bit_identical_losses(tmp_path):
  reference = tmp_path / "reference"
  finish(launch(reference, RUN))
  killed = tmp_path / "killed"
  transcript = []
  # Killed between checkpoints, then again just after a save started (still being written).
  for kill_after in (14, 20):
    proc = launch(killed, RUN)
    wait_for_step(proc, killed, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    transcript.append(f"SIGKILL after step {max(s for s, _ in losses(killed))}")
  out = finish(launch(killed, RUN))
  transcript += [line for line in out.splitlines() if "restored" in line or "resumed" in line]
  print("\n".join(transcript))
  assert any("resumed at step 20" in line or "resumed at step 10" in line for line in transcript)
  assert losses(killed) == losses(reference)  # every step, bit for bit
  assert [s for s, _ in losses(killed)] == list(range(1, 31))


def test_sigterm_saves_and_exits_zero(tmp_path):
  proc = launch(tmp_path, ["total_steps=1000", "log_every=1", "checkpoint_every=1000"])
  wait_for_step(proc, tmp_path, 3)
  proc.send_signal(signal.SIGTERM)
  out = finish(proc)
  stopped = max(s for s, _ in losses(tmp_path))
  assert f"stopped by SIGTERM after step {stopped} of 1000" in out
  assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir()] == [stopped]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two(workdir, overrides):
  address = f"127.0.0.1:{free_port()}"
  return [
    launch(
      workdir,
      overrides,
      devices=4,
      log=open(workdir.parent / f"{workdir.name}.{i}", "w"),
      flags=["--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)],
    )
    for i in range(2)
  ]


def test_two_processes_of_four_devices_match_one_of_eight(tmp_path, monkeypatch):
  overrides = ["total_steps=6", "log_every=1"]
  procs = launch_two(tmp_path / "two", overrides)
  # The same global batches in one process: process p's slice fills rows p*B/2 ... (p+1)*B/2.
  real = pipeline.train_iterator

  class BothSlices(grain.DatasetIterator):
    def __init__(self, config):
      super().__init__([real(config, p, 2) for p in range(2)])

    def __next__(self):
      parts = [next(it) for it in self._parents]
      return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
      return {str(p): it.get_state() for p, it in enumerate(self._parents)}

    def set_state(self, state):
      for p, it in enumerate(self._parents):
        it.set_state(state[str(p)])

  monkeypatch.setattr(pipeline, "train_iterator", BothSlices)
  config = config_lib.load(DEMO, TINY + overrides)
  train.train_and_evaluate(config, tmp_path / "one")
  for p in procs:
    assert p.wait(timeout=600) == 0, (tmp_path / f"two.{procs.index(p)}").read_text()
  two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
  assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 7))
  np.testing.assert_allclose([loss for _, loss in two], [loss for _, loss in one], rtol=2e-5)
  log0 = (tmp_path / "two.0").read_text()
  assert "process 0 of 2 (explicit)" in log0 and "held-out demo" in log0


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  procs = launch_two(tmp_path / "run", ["total_steps=1000", "log_every=1", "checkpoint_every=1000"])
  wait_for_step(procs[0], tmp_path / "run", 3)
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    assert p.wait(timeout=300) == 0
  logs = [(tmp_path / f"run.{i}").read_text() for i in range(2)]
  stopped = max(s for s, _ in losses(tmp_path / "run"))
  for log in logs:
    assert f"stopped by SIGTERM after step {stopped} of 1000" in log, log
  assert [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()] == [stopped]
