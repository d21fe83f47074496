"""A run stops before it compiles when it would fail later: each refusal, with its message."""

import json
import logging
import os

import pytest

from smartclip_jax import config as config_lib, memory, preflight, resume, train
from tests.conftest import DEMO, REPO, TINY

B16 = os.path.join(REPO, "configs", "smartclip_vitb16.py")


def refusal(capsys, *argv: str) -> str:
  """What `python -m smartclip_jax.train` prints when it refuses the command line."""
  with pytest.raises(SystemExit) as exit_info:
    train.parse_args(["--workdir", "/tmp/unused", *argv])
  assert exit_info.value.code == 2
  return capsys.readouterr().err


def test_a_recipe_without_starting_weights_or_data_names_both(capsys):
  err = refusal(capsys, "--config", B16)
  assert "init_from is not set: a recipe config (vit_b16) fine-tunes a pretrained CLIP" in err
  assert "hf download openai/clip-vit-base-patch16" in err
  assert "--config.init_from=scratch" in err
  assert "data.name is not set: a recipe config trains on data you name" in err


def test_a_recipe_from_scratch_on_demo_data_is_an_explicit_choice():
  config = config_lib.load(B16, ["init_from=scratch", "data.name=demo"], check=preflight.check)
  assert config.recipe == "vit_b16" and config.init_from == config_lib.INIT_SCRATCH


def test_a_recipe_with_a_hub_name_not_in_the_cache_says_how_to_fetch_it(
  capsys, tmp_path, monkeypatch
):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
  err = refusal(capsys, "--config", B16, "--config.init_from=hf-hub:openai/clip-vit-base-patch16")
  assert "init_from: hf-hub:openai/clip-vit-base-patch16: not in the Hugging Face cache" in err
  assert "hf download openai/clip-vit-base-patch16" in err


HUB = "hf-hub:openai/clip-vit-base-patch16"


def test_unreachable_starting_weights_only_warn_when_the_workdir_has_a_checkpoint(
  tmp_path, monkeypatch, caplog
):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
  config = config_lib.load(DEMO, [f"init_from={HUB}"])
  (tmp_path / "run" / "checkpoints" / "20").mkdir(parents=True)  # a save that never committed
  for workdir in (None, tmp_path / "run"):
    with pytest.raises(config_lib.ConfigError, match="not in the Hugging Face cache"):
      preflight.check(config, workdir)
  (tmp_path / "run" / "checkpoints" / "10").mkdir()
  (tmp_path / "run" / "checkpoints" / "10" / "commit_success.txt").write_text("")
  with caplog.at_level(logging.WARNING, "smartclip_jax"):
    preflight.check(config, tmp_path / "run")
  assert "not in the Hugging Face cache" in caplog.text and "resumes from" in caplog.text


@pytest.mark.parametrize(
  "error,message",
  [
    (ModuleNotFoundError("no hub", name="huggingface_hub"), "needs huggingface_hub (pip install"),
    (OSError("503 Service Unavailable"), "cannot be looked up: OSError: 503"),
  ],
)
def test_starting_weights_that_cannot_be_looked_up_are_a_problem(monkeypatch, error, message):
  def fail(path):
    raise error

  monkeypatch.setattr(preflight.torch_files, "resolve", fail)
  config = config_lib.load(DEMO, [f"init_from={HUB}"])
  assert message in preflight.init_problems(config)[0]


def test_a_missing_eval_source_is_refused(capsys, tmp_path):
  train_dir = tmp_path / "train"
  train_dir.mkdir()
  err = refusal(
    capsys, "--config", DEMO, "--config.data.name=folder", f"--config.data.path={train_dir}"
  )
  assert "data.name=folder needs data.eval_path" in err
  err = refusal(
    capsys,
    "--config",
    DEMO,
    "--config.data.name=array_record",
    f"--config.data.path={train_dir}",
    f"--config.data.eval_path={tmp_path / 'eval'}",
  )
  assert f"data.eval_path: nothing at {tmp_path / 'eval'}" in err
  err = refusal(capsys, "--config", DEMO, f"--config.eval.tasks=urban1k:{tmp_path / 'Urban1k'}")
  assert f"eval.tasks urban1k: nothing at {tmp_path / 'Urban1k'}" in err


@pytest.mark.parametrize(
  "override,message",
  [
    ("optim.towers.lr=nan", "optim.towers.lr=nan must be finite"),
    ("smartclip.sparsity_weight=inf", "smartclip.sparsity_weight=inf must be finite"),
    ("optim.b2=1", "optim.b2=1.0 is outside [0, 1)"),
    ("smartclip.temperature=0", "smartclip.temperature=0.0 is outside (0, inf)"),
    ("data.crop_scale=(0.5, 1.5)", "data.crop_scale=(0.5, 1.5)"),
  ],
)
def test_a_float_that_is_not_finite_or_out_of_range_is_refused(override, message):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.load(DEMO, [override])
  assert message in str(e.value)


def test_every_problem_is_named_in_one_message(capsys):
  err = refusal(
    capsys,
    "--config",
    DEMO,
    "--config.optim.eps=0",
    "--config.data.name=sharegpt4v",
    "--config.data.path=/nowhere/captions.json",
    "--config.eval.tasks=cifar10",
    "--config.eval.best_metric=cifar10/i2t_r1",
  )
  assert "optim.eps=0.0 is outside (0, inf)" in err
  assert "data.path: nothing at /nowhere/captions.json" in err
  assert "eval.best_metric='cifar10/i2t_r1': task cifar10 gives top1, top5" in err


@pytest.mark.parametrize(
  "tasks,metric,ok",
  [
    ("", "i2t_r1", True),
    ("", "top1", False),
    ("urban1k:/u", "urban1k/t2i_r5", True),
    ("urban1k:/u,cifar10", "cifar10/top1", True),
    ("cifar10", "imagenet2012/top1", False),
  ],
)
def test_best_metric_must_be_one_the_evaluation_produces(tasks, metric, ok):
  config = config_lib.load(DEMO, [f"eval.tasks={tasks}", f"eval.best_metric={metric}"])
  labels = {"urban1k": True, "cifar10": False}
  labels = {k: v for k, v in labels.items() if k in tasks}
  assert (config_lib.best_metric_problem(config, labels) == "") == ok


def test_a_step_that_cannot_fit_stops_before_it_runs(tmp_path, monkeypatch):
  config = config_lib.load(DEMO, TINY)
  monkeypatch.setattr(memory, "device_bytes", lambda device: 10**6)
  with pytest.raises(memory.DoesNotFit) as e:
    train.train_and_evaluate(config, tmp_path)
  message = str(e.value)
  assert "GB per device" in message and "holds 0.0 GB" in message
  for way in ("batch_size (now 16)", "accum_steps=K", "model.remat=full", "mesh.fsdp=N", "aot"):
    assert way in message
  assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()


def test_a_program_that_fits_passes_and_its_bytes_are_xlas(demo_config):
  import jax
  import jax.numpy as jnp

  x = jnp.ones((256, 512), jnp.float32)
  compiled = jax.jit(lambda a: jnp.tanh(a @ a.T) @ a, donate_argnums=0).lower(x).compile()
  got = memory.step_bytes(compiled)
  m = compiled.memory_analysis()
  assert got["arguments"] == m.argument_size_in_bytes == 256 * 512 * 4
  assert got["total"] == (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
    + m.generated_code_size_in_bytes
  )
  memory.check_fits(compiled, jax.devices()[0], demo_config)  # a small program fits


@pytest.mark.slow  # two whole runs: 30 s
def test_resume_with_another_batch_size_stops_and_a_longer_run_goes_ahead(tmp_path, caplog, capsys):
  config = config_lib.load(DEMO, TINY + ["total_steps=2", "checkpoint_every=2"])
  train.train_and_evaluate(config, tmp_path)
  first = (tmp_path / "config.json").read_text()

  changed = config_lib.load(DEMO, TINY + ["total_steps=2", "batch_size=32", "seed=3"])
  with pytest.raises(resume.ResumeError) as e:
    train.train_and_evaluate(changed, tmp_path)
  message = str(e.value)
  assert "batch_size: 16 then, 32 now" in message and "seed: 0 then, 3 now" in message
  assert (tmp_path / "config.json").read_text() == first  # nothing written by a refused start

  longer = config_lib.load(DEMO, TINY + ["total_steps=3", "checkpoint_every=2"])
  with caplog.at_level(logging.INFO, logger="smartclip_jax"):
    train.train_and_evaluate(longer, tmp_path)
  assert "resuming at step 2 with changed fields: total_steps 2 -> 3" in caplog.text
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 3
  assert (tmp_path / "config.before_step_2.json").read_text() == first  # kept, not overwritten
  with pytest.raises(SystemExit, match="batch_size: 16 then, 32 now"):  # the command line's form
    train.main(
      ["--config", DEMO, "--workdir", str(tmp_path)]
      + [f"--config.{o}" for o in TINY + ["total_steps=3", "batch_size=32"]]
    )


def test_which_fields_a_resume_may_change():
  for field in ("batch_size", "seed", "data.path", "data.mixture", "model.vision.width", "loss"):
    assert resume.is_fixed(field), field
  for field in ("total_steps", "eval.tasks", "log_every", "data.num_workers", "mesh.fsdp"):
    assert not resume.is_fixed(field), field
  assert not resume.is_fixed("model.remat") and not resume.is_fixed("optim.towers.lr")
  # Whole names: a field that merely begins like a fixed one is not fixed, nor the other way.
  assert not resume.is_fixed("loss_impl") and not resume.is_fixed("seed_offset")
  assert not resume.is_fixed("clip_grad") and not resume.is_fixed("model.remat.policy")
  assert resume.is_fixed("model.remat_scan") and resume.is_fixed("data.num_workers_x")
