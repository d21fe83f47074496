"""Config loading, overrides and the errors a mistyped run must get before compiling."""

import glob
import os

import pytest

from smartclip_jax import config as config_lib, train
from tests.conftest import DEMO, REPO


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))))
def test_every_shipped_config_validates(path):
  config = config_lib.load(path)
  assert config.loss in config_lib.LOSSES


def test_overrides_are_typed():
  c = config_lib.load(
    DEMO,
    [
      "batch_size=32",
      "model.mask.hard=false",
      "optim.towers.lr=2e-4",
      "loss=clip",
      "model.mask_net=false",
    ],
  )
  assert (c.batch_size, c.model.mask.hard, c.optim.towers.lr, c.loss) == (32, False, 2e-4, "clip")


def test_unknown_field_names_the_field_and_suggests():
  with pytest.raises(config_lib.ConfigError, match=r"'model.vision.widht'.*did you mean width"):
    config_lib.load(DEMO, ["model.vision.widht=3"])


def test_bad_value_and_bad_choice():
  with pytest.raises(config_lib.ConfigError, match="cannot set batch_size='many'"):
    config_lib.load(DEMO, ["batch_size=many"])
  with pytest.raises(config_lib.ConfigError, match="loss='softmax'"):
    config_lib.load(DEMO, ["loss=softmax"])
  with pytest.raises(config_lib.ConfigError, match="trim_padding needs loss=clip or siglip"):
    config_lib.load(DEMO, ["model.text.trim_padding=16"])  # the demo trains SmartCLIP
  config_lib.load(DEMO + ":clip", ["model.text.trim_padding=16"])


def test_batch_not_divisible_by_data_axes():
  c = config_lib.load(DEMO, ["batch_size=12"])
  with pytest.raises(config_lib.ConfigError, match="batch_size=12 is not divisible by the 8"):
    config_lib.check_batch(c, data_parallel=8, processes=1)


def test_accum_steps_must_divide_each_devices_rows():
  c = config_lib.load(DEMO, ["batch_size=48", "accum_steps=4"])
  with pytest.raises(config_lib.ConfigError, match="accum_steps=4 does not divide the 6"):
    config_lib.check_batch(c, data_parallel=8, processes=1)
  config_lib.check_batch(config_lib.load(DEMO, ["batch_size=64", "accum_steps=4"]), 8, 1)


def test_cli_reports_unknown_field_and_exits(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.parse_args(["--config", DEMO, "--workdir", "/tmp/x", "--config.bacth_size=8"])
  assert exit_info.value.code == 2
  assert "unknown config field 'bacth_size'" in capsys.readouterr().err


def test_the_loss_and_the_model_are_set_together():
  from smartclip_jax import losses

  c = config_lib.load(DEMO, ["loss=clip"])  # the demo's model has a mask network
  with pytest.raises(config_lib.ConfigError, match="model.mask_net=false"):
    losses.make(c)
  c = config_lib.load(DEMO, ["loss=siglip", "model.mask_net=false"])
  with pytest.raises(config_lib.ConfigError, match="model.logit_bias_init=-10.0"):
    losses.make(c)
  c = config_lib.load(DEMO + ":siglip")
  losses.make(c)
  assert (c.loss, c.model.mask_net, c.model.logit_bias_init) == ("siglip", False, -10.0)


def test_a_renamed_field_names_its_new_name(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"write --config.eval.every=5"):
    config_lib.load(DEMO, ["eval_every=5"])
  with pytest.raises(config_lib.ConfigError, match=r"data.tfds_data_dir is now data.tfds.data_dir"):
    c = config_lib.base_config()
    c.data.tfds_data_dir = "/x"  # a config file written the old way
    config_lib.validate(c)
  old = config_lib.to_dict(config_lib.load(DEMO))  # a run saved before the fields moved
  old["eval_every"] = old["eval"].pop("every") + 7
  old["data"]["holdout"] = old["data"].pop("sharegpt4v")["holdout"] + 1
  c = config_lib.from_dict(old)
  assert (c.eval.every, c.data.sharegpt4v.holdout) == (7, config_lib.SHAREGPT4V_HOLDOUT + 1)


@pytest.mark.parametrize(
  "spec", ["folder:/a", "folder:/a=0", "folder:/a=x", "nothing:/a=1", "folder=1"]
)
def test_a_mixture_item_that_cannot_be_read_is_named(spec):
  with pytest.raises(config_lib.ConfigError, match="data.mixture item"):
    config_lib.load(DEMO, [f"data.mixture={spec}"])
  assert config_lib.parse_mixture("folder:/d/a.tsv=0.7, array_record:/d/b=0.3") == [
    ("folder", "/d/a.tsv", 0.7),
    ("array_record", "/d/b", 0.3),
  ]
