"""The train loop end to end: it learns, checkpoints round-trip, and a rerun resumes."""

import importlib.util
import json
import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smartclip_jax import (
  config as config_lib,
  flops as flops_lib,
  losses,
  malloc,
  optim,
  sharding,
  step as step_lib,
  storage,
  train,
)
from smartclip_jax.checkpoint import Checkpointer
from smartclip_jax.data import pipeline
from smartclip_jax.models.clip import build_model
from smartclip_jax.writer import MetricWriter
from tests import wandb_log
from tests.conftest import DEMO, TINY


def read_metrics(workdir):
  """metrics.jsonl of a local or gs:// workdir."""
  path = storage.path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


WANDB = importlib.util.find_spec("wandb") is not None  # requirements-wandb.txt (CI has it)


@pytest.fixture(scope="module")
def fifty_step_run(tmp_path_factory):
  """One 50-step demo run, logging every step, checkpointing at 25 and 50, tracing 3 steps,
  and to an offline W&B run when wandb is installed."""
  extra = ["wandb.project=smartclip-test", "wandb.name=fifty", "wandb.tags=('demo',)"]
  config = config_lib.load(DEMO, TINY + ["log_every=1", "profile_steps=3"] + extra * WANDB)
  workdir = tmp_path_factory.mktemp("run")
  with pytest.MonkeyPatch.context() as env:
    env.setenv("WANDB_MODE", "offline")
    env.setenv("WANDB_SILENT", "true")
    yield config, workdir, train.train_and_evaluate(config, workdir)


def test_fifty_steps_lower_the_loss_and_write_every_output(fifty_step_run):
  config, workdir, results = fifty_step_run
  logged = read_metrics(workdir)
  assert [m["step"] for m in logged] == list(range(1, 51))
  for key in ("loss", "lr", "mask_density", "images_per_sec", "tflops_per_device", "mfu"):
    assert all(np.isfinite(m[key]) for m in logged), key
  assert all(0 < m["mfu"] < 1 and m["tflops_per_device"] > 0 for m in logged[1:])
  assert all(0 < m["model_mfu"] < m["mfu"] for m in logged[1:])  # XLA counts more than matmuls
  dims = config.model.embed_dim  # the mask diagnostics, over windows of one step here
  assert all(0 <= m["mask_jaccard"] <= 1 for m in logged)
  assert all(m["mask_always_on"] + m["mask_never_on"] <= dims for m in logged)
  assert all(m["mask_always_on"] == int(m["mask_always_on"]) for m in logged)
  first = np.mean([m["loss"] for m in logged[:10]])
  last = np.mean([m["loss"] for m in logged[-10:]])
  assert last < 0.8 * first, (first, last)
  assert json.loads((workdir / "eval" / "step_50.json").read_text())["t2i_r1"] == results["t2i_r1"]
  assert json.loads((workdir / "config.json").read_text())["batch_size"] == config.batch_size
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [25, 50]


@pytest.mark.skipif(not WANDB, reason="needs requirements-wandb.txt")
def test_an_offline_wandb_run_holds_the_metrics_and_the_config(fifty_step_run):
  config, workdir, results = fifty_step_run
  (run_dir,) = (workdir / "wandb").glob("offline-run-*")
  run = wandb_log.run(run_dir)
  assert run["id"] == (workdir / "wandb_run_id").read_text() and run_dir.name.endswith(run["id"])
  assert (run["name"], run["tags"]) == ("fifty", ["demo"])
  assert run["config"]["batch_size"] == config.batch_size
  assert run["config"]["model"]["vision"]["width"] == config.model.vision.width
  rows = wandb_log.history(run_dir)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 51))
  for got, want in zip(train_rows, read_metrics(workdir)):
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
  (final,) = [r for r in rows if "eval/t2i_r1" in r]
  assert final["step"] == 50 and final["eval/t2i_r1"] == pytest.approx(results["t2i_r1"])


def test_rerun_resumes_from_latest_checkpoint(fifty_step_run, tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  config, full, _ = fifty_step_run
  # A run that died after step 25's checkpoint, having logged a few steps more.
  cut = tmp_path / "cut"
  shutil.copytree(full, cut)
  shutil.rmtree(cut / "checkpoints" / "50")
  logged = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
  (cut / "metrics.jsonl").write_text("".join(logged[:30]))
  train.train_and_evaluate(config, cut)
  assert [m["step"] for m in read_metrics(cut)] == list(range(1, 51))
  for a, b in zip(read_metrics(full), read_metrics(cut)):
    assert a["loss"] == b["loss"], a["step"]
    assert a["data/used"] == b["data/used"] == a["step"] * config.batch_size  # counts resumed
  assert sorted(int(p.name) for p in (cut / "checkpoints").iterdir()) == [25, 50]
  if WANDB:  # the resumed run continued the W&B run: a second offline part with its id
    parts = sorted((cut / "wandb").glob("offline-run-*"))
    run_id = (cut / "wandb_run_id").read_text()
    assert len(parts) == 2 and all(p.name.endswith(run_id) for p in parts)
    assert [r["step"] for r in wandb_log.history(parts[1]) if "loss" in r] == list(range(26, 51))


def test_mask_diagnostics_are_reduced_over_each_log_window(demo_config, tmp_path, caplog):
  """SmartCLIP's per-dimension mask flags are kept until the log step, then counted over every
  step since the last log; metrics without them (CLIP, SigLIP) log no mask diagnostics."""
  demo_config.log_every = 2
  step_metrics = {"loss": 1.0, "lr": 1e-3, "max_skip_streak": 0}
  smart = {"mask_density": 0.5, "mask_jaccard": 0.25}  # and the flags of `losses.MASK_DIMS`:
  flags = [([1, 1, 0, 0], [1, 1, 1, 0]), ([1, 0, 0, 0], [1, 1, 0, 0]), ([0] * 4, [0, 0, 1, 0])]
  for name, steps in (("smart", flags), ("clip", [None] * 3)):
    writer = MetricWriter(tmp_path / name)
    meter = flops_lib.Meter(1.0, demo_config.batch_size, (0.0, 0))
    run = train.Run(demo_config, tmp_path / name, *[None] * 4, writer, 0, meter, None)
    with caplog.at_level(logging.INFO, logger="smartclip_jax"):
      for step, f in enumerate(steps, 1):
        mask = {} if f is None else {**smart, **dict(zip(losses.MASK_DIMS, jnp.asarray(f)))}
        metrics = {**step_metrics, **mask}
        if logged := train.fetch_metrics(run, step, metrics, pipeline.DataStats(), step == 3):
          train.write_metrics(run, step, logged)
    run.writer.close()
    logged = read_metrics(tmp_path / name)
    assert [m["step"] for m in logged] == [2, 3]
    if name == "smart":  # steps 1-2: dimension 0 always on, 3 never; step 3: 0, 1 and 3 never
      assert [(m["mask_always_on"], m["mask_never_on"]) for m in logged] == [(1, 1), (0, 3)]
      assert all("mask_dim_min" not in m and m["mask_jaccard"] == 0.25 for m in logged)
      assert "mask 0.500 J 0.25" in caplog.text
    else:
      assert not [k for m in logged for k in m if k.startswith("mask")]


@pytest.mark.slow
@pytest.mark.parametrize("patch_dropout", [0.0, 0.5])
def test_checkpoint_restores_identical_params_and_next_loss(demo_config, tmp_path, patch_dropout):
  """With patch dropout too: its draw is a function of the seed and the step."""
  demo_config.model.patch_dropout = patch_dropout
  mesh = sharding.make_mesh(demo_config)
  model, tx = build_model(demo_config), optim.make_optimizer(demo_config)
  shardings = step_lib.abstract_state(model, tx, demo_config, mesh)[1]
  state = step_lib.init_state(model, tx, demo_config, mesh, shardings)
  train_step = step_lib.make_train_step(model, tx, demo_config, mesh, shardings)
  data = pipeline.train_iterator(demo_config)
  for _ in range(3):
    state, _ = train_step(state, pipeline.global_batch(next(data), mesh))
  saved = jax.device_get(state)
  checkpointer = Checkpointer(tmp_path, keep=2)
  checkpointer.save(state)
  checkpointer.close()
  batch = next(data)
  _, want = train_step(state, pipeline.global_batch(batch, mesh))

  restored, _ = Checkpointer(tmp_path, keep=2).restore(
    step_lib.abstract_state(model, tx, demo_config, mesh)[0]
  )
  assert int(restored.step) == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  fresh_data = pipeline.train_iterator(demo_config, start_step=int(restored.step))
  np.testing.assert_array_equal(next(fresh_data)["tokens"], batch["tokens"])
  _, got = train_step(restored, pipeline.global_batch(batch, mesh))
  assert float(got["loss"]) == float(want["loss"])


# auto is cond on CPU; where as on TPU/GPU (slow: the default suite keeps one form)
@pytest.mark.parametrize("form", ["auto", pytest.param("where", marks=pytest.mark.slow)])
def test_nonfinite_steps_are_skipped_and_counted(demo_config, form):
  demo_config.skip_nonfinite = form
  mesh = sharding.make_mesh(demo_config)
  model, tx = build_model(demo_config), optim.make_optimizer(demo_config)
  shardings = step_lib.abstract_state(model, tx, demo_config, mesh)[1]
  state = step_lib.init_state(model, tx, demo_config, mesh, shardings)
  train_step = step_lib.make_train_step(model, tx, demo_config, mesh, shardings)
  batch = next(pipeline.train_iterator(demo_config))
  bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
  before, moments = jax.device_get((state.params, state.opt_state))
  state, metrics = train_step(state, pipeline.global_batch(bad, mesh))
  assert not np.isfinite(metrics["loss"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), moments)
  assert (int(state.step), int(state.skipped), int(state.skip_streak)) == (1, 1, 1)
  state, metrics = train_step(state, pipeline.global_batch(bad, mesh))
  state, metrics = train_step(state, pipeline.global_batch(batch, mesh))
  assert np.isfinite(metrics["loss"]) and int(metrics["skipped_steps"]) == 2
  assert (int(state.skip_streak), int(state.max_skip_streak)) == (0, 2)
  changed = jax.tree.map(
    lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), before
  )
  assert any(jax.tree.leaves(changed))  # the finite step was applied


@pytest.mark.parametrize("select", [True, False])
def test_keep_if_finite_both_forms(select):
  """The accelerator form (`where`) and the CPU form (`cond`) skip and apply alike."""
  state = {"w": jnp.arange(4.0), "m": (jnp.ones(3), jnp.int32(2))}
  double = lambda s: jax.tree.map(lambda x: x * 2 + 1, s)
  for finite, update_ok, applied in [
    (False, True, False),
    (True, False, False),
    (True, True, True),
  ]:
    update = lambda s, ok=update_ok: (double(s), jnp.bool_(ok))
    skip = jax.jit(lambda f, s, u=update: step_lib.keep_if_finite(f, u, s, select=select))
    new, took = skip(jnp.bool_(finite), state)
    assert bool(took) == applied
    jax.tree.map(np.testing.assert_array_equal, new, double(state) if applied else state)


@pytest.mark.parametrize("form", [pytest.param("where", marks=pytest.mark.slow), "cond"])
def test_a_nonfinite_update_from_finite_gradients_is_skipped(demo_config, form):
  """An optimizer can turn finite gradients into a non-finite update (a zero second moment
  under eps=0, a scale of nan): the step is counted as skipped and nothing moves."""
  demo_config.skip_nonfinite = form
  mesh = sharding.make_mesh(demo_config)
  model = build_model(demo_config)
  tx = optax.chain(optim.make_optimizer(demo_config), optax.scale(float("nan")))
  shardings = step_lib.abstract_state(model, tx, demo_config, mesh)[1]
  state = step_lib.init_state(model, tx, demo_config, mesh, shardings)
  train_step = step_lib.make_train_step(model, tx, demo_config, mesh, shardings)
  before = jax.device_get(state.params)
  state, metrics = train_step(
    state, pipeline.global_batch(next(pipeline.train_iterator(demo_config)), mesh)
  )
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert int(metrics["skipped_steps"]) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


@pytest.mark.slow
def test_run_stops_after_too_many_nonfinite_steps(demo_config, tmp_path, monkeypatch):
  real = pipeline.train_iterator

  def poisoned(config, **kwargs):
    for batch in real(config, **kwargs):
      yield {**batch, "image": np.full_like(batch["image"], np.nan)}

  monkeypatch.setattr(pipeline, "train_iterator", poisoned)
  demo_config.update(log_every=1, max_nonfinite_steps=3)
  with pytest.raises(FloatingPointError, match="non-finite for 3 steps in a row by step 3"):
    train.train_and_evaluate(demo_config, tmp_path)


def test_a_cpu_run_under_glibc_malloc_logs_what_to_preload(
  demo_config, tmp_path, monkeypatch, caplog
):
  monkeypatch.setattr(malloc, "hint", lambda: "preload an allocator that keeps memory")
  with caplog.at_level(logging.INFO, logger="smartclip_jax"):
    train.setup(demo_config, tmp_path)
  assert "preload an allocator that keeps memory" in caplog.text


def test_a_run_says_its_data_its_compile_time_and_when_it_ends(demo_config, tmp_path, caplog):
  demo_config.update(total_steps=3, log_every=1)
  with caplog.at_level(logging.INFO, logger="smartclip_jax"):
    train.train_and_evaluate(demo_config, tmp_path)
  text = caplog.text
  # 3 steps of 16 over the demo's 256 training records
  assert "training data: DemoSource(num_records=256" in text
  assert "0.188 epochs in 3 steps of 16 (48 examples)" in text
  assert "compiling the train step for batch" in text
  assert re.search(r"compiled the train step in [\d.]+ s: [\d.]+ GB per device", text)
  assert re.search(r"step 2/3 .* ETA \d+s", text) and "step 3/3" in text


def test_progress_lines_count_what_is_done_and_estimate_the_rest(caplog, monkeypatch):
  from smartclip_jax import progress

  clock = iter([0.0, 40.0, 50.0, 90.0])
  monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
  p = progress.Progress("embedding images", 1000, "images")  # starts at 0 s
  with caplog.at_level(logging.INFO, logger="smartclip_jax"):
    p.update(250)  # 40 s: a line, 120 s to go
    p.update(500)  # 50 s: too soon for another
    p.update(1000)  # 90 s: the last
  lines = [r.getMessage() for r in caplog.records]
  assert lines == [
    "embedding images: 250/1000 images, 40s, ETA 2m00s",
    "embedding images: 1000/1000 images, 1m30s",
  ]
  assert progress.duration(3725) == "1h02m"


def test_epochs_count_the_records_of_every_train_source(demo_config, monkeypatch):
  monkeypatch.setattr(pipeline, "train_sources", lambda config: ([[0] * 64, [0] * 32], [3, 1], []))
  demo_config.update(batch_size=16, epochs=2.0)
  assert pipeline.steps_for_epochs(demo_config) == 12  # 2 x 96 records / 16
  demo_config.epochs = 0.1
  assert pipeline.steps_for_epochs(demo_config) == 1  # a part of a step is a step


@pytest.mark.slow
def test_two_epochs_of_64_records_at_batch_16_run_8_steps(demo_config, tmp_path, caplog):
  demo_config.update(batch_size=16, epochs=2.0, total_steps=1000, log_every=4)
  demo_config.data.demo.num_train = 64
  with caplog.at_level(logging.INFO, logger="smartclip_jax"):
    train.train_and_evaluate(demo_config, tmp_path)
  assert [m["step"] for m in read_metrics(tmp_path)] == [4, 8]
  assert "epochs=2 of the training data: total_steps=8" in caplog.text
  assert "2 epochs in 8 steps of 16 (128 examples)" in caplog.text
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 8


def test_a_locked_image_tower_stays_bit_identical_and_takes_no_backward_pass(demo_config):
  """LiT (`optim.frozen='visual/.*'`): after training steps the image embeddings are those of
  the starting parameters bit for bit, the text tower's have moved, the optimizer holds no
  moments for the image tower, and the compiled step does at least 1.5 image-tower forwards
  fewer FLOPs than the full step (no gradient through the frozen tower)."""
  mesh = sharding.make_mesh(demo_config)
  model = build_model(demo_config)
  batch = next(pipeline.train_iterator(demo_config))
  runs = {}
  for frozen in ("", "visual/.*"):
    demo_config.optim.frozen = frozen
    tx = optim.make_optimizer(demo_config)
    shardings = step_lib.abstract_state(model, tx, demo_config, mesh)[1]
    state = step_lib.init_state(model, tx, demo_config, mesh, shardings)
    start = jax.device_get(state.params)
    train_step = step_lib.make_train_step(model, tx, demo_config, mesh, shardings)
    for _ in range(2):
      state, metrics = train_step(state, pipeline.global_batch(batch, mesh))
    runs[frozen] = start, jax.device_get(state), train_step.flops
  start, state, lit_flops = runs["visual/.*"]
  embed = lambda params, method: model.apply(
    {"params": params}, batch["image" if method == "encode_image" else "tokens"], method=method
  )
  np.testing.assert_array_equal(embed(state.params, "encode_image"), embed(start, "encode_image"))
  jax.tree.map(np.testing.assert_array_equal, state.params["visual"], start["visual"])
  assert not np.allclose(embed(state.params, "encode_text"), embed(start, "encode_text"))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert not [p for p in paths if "['visual']" in p]
  assert [p for p in paths if "['text']" in p]
  image_forward = flops_lib.tower_flops(demo_config)["visual"] * demo_config.batch_size / mesh.size
  print(
    f"step FLOPs per device: {runs[''][2]:.3g} full, {lit_flops:.3g} LiT; "
    f"image forward {image_forward:.3g}"
  )
  assert runs[""][2] - lit_flops > 1.5 * image_forward
