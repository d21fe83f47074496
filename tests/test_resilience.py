"""Whole runs in subprocesses: killed with SIGKILL and resumed bit for bit, stopped by SIGTERM,
and split over two processes (jax.distributed on 127.0.0.1) with the losses of one."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from smartclip_jax import config as config_lib, storage, train, watchdog
from tests.conftest import DEMO, REPO, TINY
from tests.test_train import read_metrics

pytestmark = pytest.mark.slow


def launch(
  workdir,
  overrides,
  devices=8,
  flags=(),
  log=None,
  session=False,
  module="smartclip_jax.train",
  cwd=REPO,
):
  """`python -m smartclip_jax.train` on the TINY demo, its output to `log` (a temporary file if
  none; a pipe that nobody reads while the run goes on fills up and stalls it)."""
  log = log or tempfile.NamedTemporaryFile("w", suffix=".log")  # noqa: SIM115  lives with proc
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": REPO,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
  }
  cmd = [
    sys.executable,
    "-m",
    module,
    "--config",
    DEMO,
    "--workdir",
    str(workdir),
    *flags,
    *(f"--config.{o}" for o in TINY + overrides),
  ]
  proc = subprocess.Popen(
    cmd,
    env=env,
    cwd=cwd,
    stdout=log,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=session,  # its own process group, for a signal to the whole group
  )
  proc.log = log
  return proc


def output(proc) -> str:
  return Path(proc.log.name).read_text()


def wait_for_step(proc, workdir, step, timeout=300):
  """Blocks until metrics.jsonl has logged `step` (the run is then past it). A bucket is asked
  less often: its emulator serves one request at a time, the run's writes included."""
  deadline, pause = time.time() + timeout, 0.5 if storage.is_remote(workdir) else 0.05
  while time.time() < deadline:
    path = storage.path(workdir) / "metrics.jsonl"
    if path.exists() and any(m["step"] >= step for m in read_metrics(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early:\n{output(proc)}")
    time.sleep(pause)
  raise TimeoutError(f"step {step} not reached")


def finish(proc, timeout=600):
  proc.wait(timeout=timeout)
  out = output(proc)
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


def test_a_run_in_a_bucket_killed_with_sigkill_resumes_with_bit_identical_losses(tmp_path, gcs):
  reference, killed = tmp_path / "reference", f"{gcs}/runs/killed"
  finish(launch(reference, RUN))
  transcript = [f"workdir {killed} (GCS emulator on {os.environ['STORAGE_EMULATOR_HOST']})"]
  for kill_after in (14, 20):
    proc = launch(killed, RUN)
    wait_for_step(proc, killed, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(p.name for p in (storage.path(killed) / "checkpoints").iterdir())
    transcript.append(
      f"SIGKILL after step {max(s for s, _ in losses(killed))}; checkpoints in the bucket: {steps}"
    )
  out = finish(launch(killed, RUN))
  transcript += [line for line in out.splitlines() if "restored" in line or "resumed" in line]
  print("\n".join(transcript))
  assert losses(killed) == losses(reference)  # every step, bit for bit
  assert [s for s, _ in losses(killed)] == list(range(1, 31))


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_sigterm_saves_and_exits_zero(tmp_path, where, request):
  workdir = tmp_path if where == "local" else f"{request.getfixturevalue('gcs')}/runs/sigterm"
  proc = launch(workdir, ["total_steps=1000", "log_every=1", "checkpoint_every=1000"])
  wait_for_step(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)
  out = finish(proc)
  stopped = max(s for s, _ in losses(workdir))
  assert f"stopped by SIGTERM after step {stopped} of 1000" in out
  saved = storage.path(workdir) / "checkpoints"
  assert [int(p.name) for p in saved.iterdir()] == [stopped]
  assert where == "local" or (saved / str(stopped) / "commit_success.txt").exists()


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two(workdir, overrides, logs=None, cwds=(REPO, REPO), **kwargs):
  """Two processes of 4 devices, in folders `cwds`; process i logs to `<logs or the workdir's
  parent>/<name>.i`."""
  address = f"127.0.0.1:{free_port()}"
  logs = logs or Path(workdir).parent
  name = storage.path(workdir).name
  return [
    launch(
      workdir,
      overrides,
      devices=4,
      log=open(logs / f"{name}.{i}", "w"),
      flags=["--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)],
      cwd=cwds[i],
      **kwargs,
    )
    for i in range(2)
  ]


def test_two_processes_of_four_devices_match_one_of_eight(tmp_path):
  # The global batch of a step does not depend on the process count: one process reads it all.
  overrides = ["total_steps=6", "log_every=1"]
  procs = launch_two(tmp_path / "two", overrides)
  config = config_lib.load(DEMO, TINY + overrides)
  train.train_and_evaluate(config, tmp_path / "one")
  for p in procs:
    assert p.wait(timeout=600) == 0, (tmp_path / f"two.{procs.index(p)}").read_text()
  two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
  assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 7))
  np.testing.assert_allclose([loss for _, loss in two], [loss for _, loss in one], rtol=2e-5)
  log0 = (tmp_path / "two.0").read_text()
  assert "process 0 of 2 (explicit)" in log0 and "held-out demo" in log0


@pytest.mark.parametrize("first", [2, 1], ids=["2_then_1", "1_then_2"])
def test_a_run_resumes_exactly_on_another_number_of_processes(tmp_path, first):
  # Killed by SIGKILL once step 4's checkpoint is committed by `first` process(es), resumed to
  # the end by the other count; compared with an uninterrupted one-process run, step by step
  # (the order of reductions over devices aside).
  run = ["total_steps=8", "log_every=1", "checkpoint_every=4"]
  reference, workdir = tmp_path / "reference", tmp_path / "run"
  finish(launch(reference, run))
  procs = [launch(workdir, run)] if first == 1 else launch_two(workdir, run)
  deadline = time.time() + 600
  while not (workdir / "checkpoints" / "4").is_dir():  # appears only once committed
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint 4"
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  if first == 1:
    for i, p in enumerate(launch_two(workdir, run)):
      assert p.wait(timeout=600) == 0, (tmp_path / f"run.{i}").read_text()
  else:
    out = finish(launch(workdir, run))
    assert "resumed at step 4 of 8" in out, out
  got, want = losses(workdir), losses(reference)
  assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 9))
  np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-5)
  used = [read_metrics(d)[-1]["data/used"] for d in (workdir, reference)]
  assert used[0] == used[1] == 8 * config_lib.load(DEMO, TINY).batch_size
  print(f"saved by {first}, resumed by {3 - first}: losses " + " ".join(f"{x:.6f}" for _, x in got))
  print("uninterrupted, 1 process:  losses " + " ".join(f"{x:.6f}" for _, x in want))


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


def test_two_processes_write_one_run_into_a_bucket_and_a_rerun_resumes(tmp_path, gcs):
  # What a pod does: every process writes its shards of each checkpoint to gs://, process 0
  # commits; then a rerun of the same command (here by one process) resumes from the bucket.
  workdir = f"{gcs}/runs/two_processes"
  run = ["total_steps=8", "log_every=1", "checkpoint_every=4"]
  for i, p in enumerate(launch_two(workdir, ["total_steps=4", *run[1:]], logs=tmp_path)):
    assert p.wait(timeout=600) == 0, (tmp_path / f"two_processes.{i}").read_text()
  saved = storage.path(workdir) / "checkpoints" / "4"
  assert (saved / "commit_success.txt").exists()
  assert sorted(p.name for p in (saved / "state").iterdir() if p.name.startswith("ocdbt.process"))
  out = finish(launch(workdir, run))
  assert "resumed at step 4 of 8" in out, out
  assert [s for s, _ in losses(workdir)] == list(range(1, 9))


def test_two_processes_in_different_folders_with_a_relative_workdir_stop_before_step_1(tmp_path):
  """Each resolves `run` in its own folder: as good as a node-local path, which would split
  checkpoints across hosts."""
  folders = [tmp_path / "host0", tmp_path / "host1"]
  for folder in folders:
    folder.mkdir()
  procs = launch_two(Path("run"), ["total_steps=4"], logs=tmp_path, cwds=folders)
  for i, p in enumerate(procs):
    assert p.wait(timeout=300) != 0, (tmp_path / f"run.{i}").read_text()
  for i in range(2):
    text = (tmp_path / f"run.{i}").read_text()
    assert "the workdir" in text and "is not shared by all processes: processes [1]" in text, text
  assert not (folders[0] / "run" / "metrics.jsonl").exists()
  assert not (folders[0] / "run" / "checkpoints").exists()
  assert [p.name for p in (folders[0] / "run").iterdir()] == []


def test_a_transient_restore_error_on_one_process_is_retried_and_both_resume_together(
  tmp_path, monkeypatch
):
  run = ["total_steps=8", "log_every=1", "checkpoint_every=4"]
  for i, p in enumerate(launch_two(tmp_path / "run", ["total_steps=4", *run[1:]])):
    assert p.wait(timeout=600) == 0, (tmp_path / f"run.{i}").read_text()
  monkeypatch.setenv("FLAKY_PROCESS", "1")
  for i, p in enumerate(launch_two(tmp_path / "run", run, module="tests.flaky_restore")):
    assert p.wait(timeout=600) == 0, (tmp_path / f"run.{i}").read_text()
  logs = [(tmp_path / f"run.{i}").read_text() for i in range(2)]
  assert "process 1: reading the checkpoint of step 4 failed (OSError: 503" in logs[1], logs[1]
  assert "retrying in 1 s" in logs[1] and "resumed at step 4 of 8" in logs[0], logs
  assert "cannot be" not in logs[0] + logs[1], logs
  assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, 9))
  assert not (tmp_path / "run" / "checkpoints.unusable").exists()


def test_a_group_sigterm_with_data_workers_saves_and_resumes(tmp_path):
  """Preemption, slurmstepd and Ctrl-C signal the whole process group, Grain's workers too."""
  overrides = RUN + ["data.num_workers=2"]
  proc = launch(tmp_path, overrides, session=True)
  wait_for_step(proc, tmp_path, 5)
  os.killpg(proc.pid, signal.SIGTERM)
  out = finish(proc)
  stopped = int(out.split("stopped by SIGTERM after step ")[1].split()[0])
  assert stopped >= 5 and (tmp_path / "checkpoints" / str(stopped)).is_dir()
  out = finish(launch(tmp_path, overrides))
  assert f"resumed at step {stopped} of 30" in out
  assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 31))


def test_a_stuck_run_is_ended_by_the_watchdog_with_every_stack_printed(tmp_path):
  """A read that never returns (here a FIFO nobody writes, as a stalled mount would) stops a
  run that is alive; the watchdog ends it for the launcher to restart."""
  os.mkfifo(tmp_path / "stalled.jpg")
  captions = tmp_path / "captions.jsonl"
  captions.write_text('{"image": "stalled.jpg", "caption": "a stall."}\n' * 32)
  data = ["data.name=folder", f"data.path={captions}", f"data.eval_path={captions}"]
  proc = launch(tmp_path / "run", [*data, "step_timeout_s=5"])
  proc.wait(timeout=300)
  out = output(proc)
  assert proc.returncode == watchdog.EXIT_STUCK, out
  assert "no step finished for" in out and "step_timeout_s=5" in out
  assert "most recent call first" in out and "in _read_file" in out  # where it was stuck
