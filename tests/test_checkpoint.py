"""Checkpoints: unusable ones are skipped, restores reshard, `init_from` takes parameters only,
and a stop notice saves at the next step."""

import http.server
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartclip_jax import (
  checkpoint,
  config as config_lib,
  init_from,
  optim,
  preemption,
  sharding,
  step as step_lib,
  storage,
  train,
)
from smartclip_jax.data import pipeline
from smartclip_jax.evals import run as evals_run
from smartclip_jax.models.clip import build_model
from smartclip_jax.models.text import stretch_positions
from tests.conftest import DEMO, TINY
from tests.test_train import read_metrics


def fresh_state(config, devices=None):
  mesh = sharding.make_mesh(config, devices)
  model, tx = build_model(config), optim.make_optimizer(config)
  shardings = step_lib.abstract_state(model, tx, config, mesh)[1]
  return model, tx, shardings, step_lib.init_state(model, tx, config, mesh, shardings)


def save_steps(config, directory, steps):
  """Checkpoints of one state under several step numbers; returns it (on the host)."""
  _, _, _, state = fresh_state(config)
  ckpt = checkpoint.Checkpointer(directory, keep=5, config=config)
  for s in steps:
    ckpt.save(state.replace(step=jnp.asarray(s, jnp.int32)))
  ckpt.close()
  return jax.device_get(state)


def restore(config, directory, devices=None):
  model, tx = build_model(config), optim.make_optimizer(config)
  abstract, _ = step_lib.abstract_state(model, tx, config, sharding.make_mesh(config, devices))
  return checkpoint.Checkpointer(directory, keep=5, config=config).restore(abstract)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
  monkeypatch.setattr(checkpoint, "RETRY_AFTER_S", (0.0, 0.0))


def fail_reads(monkeypatch, errors):
  """Checkpoint reads raise `errors` in turn, then read as usual; returns the steps asked."""
  asked, real = [], checkpoint.ocp.Checkpointer.restore

  def flaky(self, directory, *args, **kwargs):
    asked.append(int(os.path.basename(directory)))
    if errors:
      raise errors.pop(0)
    return real(self, directory, *args, **kwargs)

  monkeypatch.setattr(checkpoint.ocp.Checkpointer, "restore", flaky)
  return asked


@pytest.mark.slow
def test_a_transient_read_error_is_retried_at_the_same_step_and_moves_nothing(
  demo_config, tmp_path, monkeypatch
):
  save_steps(demo_config, tmp_path / "ckpt", [10, 20])
  asked = fail_reads(monkeypatch, [OSError("503 Service Unavailable"), TimeoutError("read")])
  state, _ = restore(demo_config, tmp_path / "ckpt")
  assert int(state.step) == 20 and asked == [20, 20, 20]
  assert not (tmp_path / "ckpt.unusable").exists()


@pytest.mark.slow
def test_storage_errors_that_outlast_the_retries_stop_and_move_nothing(
  demo_config, tmp_path, monkeypatch
):
  save_steps(demo_config, tmp_path / "ckpt", [10, 20])
  fail_reads(monkeypatch, [ConnectionError("connection reset by peer")] * 3)
  with pytest.raises(storage.StorageError, match="outlasted 2 retries.*Nothing was moved"):
    restore(demo_config, tmp_path / "ckpt")
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["10", "20"]


@pytest.mark.slow
def test_a_step_that_fails_again_is_passed_over_and_set_aside(demo_config, tmp_path, monkeypatch):
  save_steps(demo_config, tmp_path / "ckpt", [10, 20])
  asked = fail_reads(monkeypatch, [ValueError("bad chunk")] * 3)
  state, _ = restore(demo_config, tmp_path / "ckpt")
  assert int(state.step) == 10 and asked == [20, 20, 20, 10]
  assert (tmp_path / "ckpt.unusable" / "20").is_dir()


BOTH_ATOMICITIES = ["rename", pytest.param("commit_file", marks=pytest.mark.slow)]


def leave_unfinished(ckpts, atomicity, step, like):
  """What a save of `step` killed before its commit leaves, copied from the committed `like`."""
  if atomicity == "rename":  # killed before the rename (its commit file already written)
    left = ckpts / f"{step}.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(ckpts / str(like), left)
  else:  # killed before the commit file
    left = ckpts / str(step)
    shutil.copytree(ckpts / str(like), left)
    (left / "commit_success.txt").unlink()
  return left


@pytest.mark.parametrize("atomicity", BOTH_ATOMICITIES)
def test_readers_take_the_newest_committed_step_and_refuse_an_uncommitted_one(
  demo_config, tmp_path, atomicity
):
  demo_config.checkpoint_atomicity = atomicity
  ckpts = tmp_path / "checkpoints"
  save_steps(demo_config, ckpts, [10])
  uncommitted = leave_unfinished(ckpts, atomicity, 20, like=10)
  for path in (tmp_path, ckpts):
    assert checkpoint.resolve_step_dir(path) == ckpts / "10"
  with pytest.raises(checkpoint.CheckpointError, match="never committed"):
    checkpoint.resolve_step_dir(uncommitted)
  shutil.rmtree(ckpts / "10")
  with pytest.raises(checkpoint.CheckpointError, match="not a workdir"):
    checkpoint.resolve_step_dir(tmp_path)


@pytest.mark.parametrize("atomicity", BOTH_ATOMICITIES)
def test_saves_a_killed_run_left_unfinished_are_deleted_by_the_next_run(
  demo_config, tmp_path, atomicity, caplog
):
  demo_config.checkpoint_atomicity = atomicity
  ckpts = tmp_path / "checkpoints"
  _, _, _, state = fresh_state(demo_config)
  for step in (10, 12):  # a run, then its rerun
    ckpt = checkpoint.Checkpointer(ckpts, keep=5, config=demo_config)
    ckpt.save(state.replace(step=jnp.asarray(step, jnp.int32)))
    ckpt.close()
    if step == 10:
      left = leave_unfinished(ckpts, atomicity, 20, like=10)
      assert checkpoint.unfinished(ckpts) == [left.name]
  assert sorted(os.listdir(ckpts)) == ["10", "12"]
  assert f"left unfinished in {ckpts}: ['{left.name}']" in caplog.text


@pytest.fixture
def failing_commits(monkeypatch):
  """Saves fail in the background at their commit, as on a full disk."""

  async def full(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  for cls in (
    checkpoint.ocp.path.atomicity.AtomicRenameTemporaryPath,
    checkpoint.ocp.path.atomicity.CommitFileTemporaryPath,
  ):
    monkeypatch.setattr(cls, "finalize", full)


@pytest.mark.parametrize("atomicity", BOTH_ATOMICITIES)
def test_a_save_that_fails_in_the_background_stops_the_run_at_the_next_check(
  demo_config, tmp_path, atomicity, request
):
  demo_config.checkpoint_atomicity = atomicity
  _, _, _, state = fresh_state(demo_config)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, config=demo_config)
  ckpt.save(state.replace(step=jnp.asarray(10, jnp.int32)))
  ckpt.manager.wait_until_finished()
  ckpt.check()  # committed: nothing to say
  request.getfixturevalue("failing_commits")
  ckpt.save(state.replace(step=jnp.asarray(20, jnp.int32)))
  while ckpt.manager.is_saving_in_progress():  # Orbax logs the error and carries on
    time.sleep(0.05)
  lost = "step 20 .* did not commit: OSError.* No space.*newest is step 10"
  with pytest.raises(storage.StorageError, match=lost):
    ckpt.check()
  ckpt.check()  # said once
  ckpt.save(state.replace(step=jnp.asarray(30, jnp.int32)))
  with pytest.raises(storage.StorageError, match="step 30 .* did not commit"):
    ckpt.close()  # the last save, at the end of a run
  assert checkpoint.resolve_step_dir(tmp_path) == tmp_path / "10"


def test_too_little_free_space_stops_a_save_before_it_starts(demo_config, tmp_path, monkeypatch):
  _, _, _, state = fresh_state(demo_config)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, config=demo_config)
  monkeypatch.setattr(storage, "free_bytes", lambda directory: 1000)
  short = "at step 7: it takes up to .* free in .* no checkpoint has committed yet"
  with pytest.raises(storage.StorageError, match=short):
    ckpt.save(state.replace(step=jnp.asarray(7, jnp.int32)))
  ckpt.close()
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_run_whose_workdir_lacks_the_space_for_a_checkpoint_stops_before_step_1(
  demo_config, tmp_path, monkeypatch
):
  monkeypatch.setattr(storage, "free_bytes", lambda directory: 1000)
  with pytest.raises(storage.StorageError, match="at step 0: .* lower keep_checkpoints"):
    train.train_and_evaluate(demo_config, tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(demo_config, tmp_path):
  saved = save_steps(demo_config, tmp_path / "ckpt", [10, 20])
  files = [
    p
    for p in (tmp_path / "ckpt" / "20" / "state").rglob("*")
    if p.is_file() and p.stat().st_size > 1000
  ]
  for f in files:  # a save cut short by a dying disk, not one Orbax left unfinished
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  state, _ = restore(demo_config, tmp_path / "ckpt")
  assert int(state.step) == 10
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved.params)
  assert (tmp_path / "ckpt.unusable" / "20").is_dir()  # out of the way of the next save
  assert not (tmp_path / "ckpt" / "20").exists()


@pytest.mark.slow
def test_latest_checkpoint_missing_an_item_falls_back(demo_config, tmp_path):
  save_steps(demo_config, tmp_path / "ckpt", [10, 20])
  for p in sorted((tmp_path / "ckpt" / "20" / "data_stats").rglob("*"), reverse=True):
    p.unlink() if p.is_file() else p.rmdir()
  (tmp_path / "ckpt" / "20" / "data_stats").rmdir()
  state, _ = restore(demo_config, tmp_path / "ckpt")
  assert int(state.step) == 10


@pytest.mark.slow
def test_no_restorable_checkpoint_is_an_error_that_moves_nothing(demo_config, tmp_path):
  save_steps(demo_config, tmp_path / "ckpt", [10])
  other = config_lib.load(DEMO, TINY + ["model.embed_dim=32"])  # a different model
  with pytest.raises(checkpoint.CheckpointError, match="different model config"):
    restore(other, tmp_path / "ckpt")
  assert (tmp_path / "ckpt" / "10").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("devices,mesh", [(4, "mesh.fsdp=2"), (1, "mesh.data=1")])
def test_restore_reshards_onto_a_smaller_mesh(tmp_path, devices, mesh):
  saved_on = config_lib.load(DEMO, TINY + ["mesh.fsdp=4", "mesh.tensor=2", "mesh.data=1"])
  saved = save_steps(saved_on, tmp_path / "ckpt", [7])
  config = config_lib.load(DEMO, TINY + [mesh])
  state, _ = restore(config, tmp_path / "ckpt", jax.devices()[:devices])
  assert int(state.step) == 7
  leaves = jax.tree.leaves(state)
  assert all(len(x.sharding.device_set) == devices for x in leaves)
  got = jax.device_get(state)
  jax.tree.map(
    np.testing.assert_array_equal, (got.params, got.opt_state), (saved.params, saved.opt_state)
  )


@pytest.mark.slow
def test_init_from_takes_parameters_only_and_fills_in_the_rest(tmp_path):
  clip = config_lib.load(
    DEMO, TINY + ["loss=clip", "model.mask_net=false"]
  )  # no mask network, 32 positions
  saved = save_steps(clip, tmp_path / "pretrained", [40])
  smart = config_lib.load(DEMO, TINY + ["model.text.context_length=68"])
  _, _, _, state = fresh_state(smart)
  params, fresh, unused = init_from.load_params(tmp_path / "pretrained", state.params)
  assert fresh and all(n.startswith("mask_net/") for n in fresh) and unused == []
  got, want = jax.device_get(params), saved.params
  np.testing.assert_array_equal(got["visual"]["proj"], want["visual"]["proj"])
  np.testing.assert_array_equal(  # 32 -> 68 positions, Long-CLIP's stretch (x4 after 20)
    got["text"]["positional_embedding"], stretch_positions(want["text"]["positional_embedding"], 68)
  )
  np.testing.assert_array_equal(
    got["mask_net"]["attn_pool"]["kernel"],
    jax.device_get(state.params)["mask_net"]["attn_pool"]["kernel"],
  )
  bad = config_lib.load(DEMO, TINY + ["model.embed_dim=32"])
  with pytest.raises(checkpoint.CheckpointError, match="shape"):
    init_from.load_params(tmp_path / "pretrained", fresh_state(bad)[3].params)


@pytest.mark.slow
def test_init_from_in_a_run_starts_at_step_zero(demo_config, tmp_path):
  save_steps(demo_config, tmp_path / "pretrained", [40])
  demo_config.update(init_from=str(tmp_path / "pretrained"), total_steps=2, log_every=1)
  train.train_and_evaluate(demo_config, tmp_path / "run")
  assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize(
  "sig", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)]
)
def test_a_stop_signal_saves_at_the_next_step_and_a_rerun_finishes(
  demo_config, tmp_path, monkeypatch, sig
):
  real = pipeline.train_iterator

  def signal_at_fifth_batch(config, **kwargs):
    for n, batch in enumerate(real(config, **kwargs), 1):
      if n == 5:
        os.kill(os.getpid(), sig)
      yield batch

  monkeypatch.setattr(pipeline, "train_iterator", signal_at_fifth_batch)
  demo_config.update(total_steps=12, log_every=4, checkpoint_every=100)
  before = signal.getsignal(sig)  # SIG_IGN for SIGHUP under nohup, else SIG_DFL
  assert train.train_and_evaluate(demo_config, tmp_path) is None
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [5]
  assert [m["step"] for m in read_metrics(tmp_path)] == [4, 5]
  assert signal.getsignal(sig) == before  # handlers put back
  monkeypatch.setattr(pipeline, "train_iterator", real)
  assert train.train_and_evaluate(demo_config, tmp_path) is not None
  assert [m["step"] for m in read_metrics(tmp_path)] == [4, 5, 8, 12]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["periodic", "final"])
def test_a_stop_signal_during_evaluation_ends_it_between_batches_and_a_rerun_goes_on(
  demo_config, tmp_path, monkeypatch, when
):
  """A periodic evaluation (step 3, no checkpoint due there) or the final one: the notice is
  seen before the next evaluation batch, the step is saved, and the rerun takes it from there."""
  real, asked = evals_run.evaluate_heldout, []

  def interrupted(config, encoder):
    asked.append(1)
    if len(asked) == 1:
      os.kill(os.getpid(), signal.SIGINT)
    return real(config, encoder)

  monkeypatch.setattr(evals_run, "evaluate_heldout", interrupted)
  every = 3 if when == "periodic" else 0
  demo_config.update(total_steps=6, log_every=1, checkpoint_every=4)
  demo_config.eval.every = every
  assert train.train_and_evaluate(demo_config, tmp_path) is None
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert saved == ([3] if when == "periodic" else [4, 6])
  assert train.train_and_evaluate(demo_config, tmp_path) is not None
  assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 7))


def test_a_maintenance_notice_is_a_stop_request_and_the_watch_outlives_a_503():
  events = iter([503, b"NONE", b"TERMINATE_ON_HOST_MAINTENANCE"])
  queries = []

  class Metadata(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      queries.append((self.path, self.headers["Metadata-Flavor"]))
      body = next(events)
      self.send_response(503 if body == 503 else 200)
      self.end_headers()
      if body != 503:
        self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  stop = preemption.StopRequest()
  try:
    assert not stop.reached(1)
    stop.watch_maintenance(f"http://127.0.0.1:{server.server_port}/maintenance-event", retry_s=0.01)
    deadline = time.time() + 10
    while not stop.reached(2) and time.time() < deadline:
      time.sleep(0.05)
    assert stop.reason == "maintenance event TERMINATE_ON_HOST_MAINTENANCE"
    assert queries == [
      ("/maintenance-event", "Google"),  # 503: asked again
      ("/maintenance-event", "Google"),
      ("/maintenance-event?wait_for_change=true", "Google"),
    ]
  finally:
    stop.close()
    server.shutdown()
