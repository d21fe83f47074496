"""The AOT tool compiles the real train step for a TPU topology on this CPU host (libtpu)."""

import json

import jax
import pytest

from smartclip_jax import aot, config as config_lib, optim, sharding, step as step_lib
from smartclip_jax.models.clip import build_model
from tests.conftest import DEMO, TINY

pytest.importorskip("libtpu", reason="needs requirements-tpu.txt")


def run_aot(capsys, overrides, topology="v5e:2x2"):
  code = aot.main(
    [
      "--config",
      DEMO,
      "--topology",
      topology,
      "--step_time",
      "0.01",
      *(f"--config.{o}" for o in TINY + overrides),
    ]
  )
  out = capsys.readouterr().out
  return code, out, json.loads(out.splitlines()[-1])


@pytest.mark.slow
def test_small_step_fits_with_state_replicated_per_chip(capsys):
  code, out, r = run_aot(capsys, [])
  assert code == 0 and r["fits"] and r["chips"] == 4 and "fits" in out
  config = config_lib.load(DEMO, TINY)
  abstract, _ = step_lib.abstract_state(
    build_model(config), optim.make_optimizer(config), config, sharding.make_mesh(config)
  )
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  batch_bytes = 16 * (32 * 32 * 3 * 4 + 32 * 4) / 4  # images and tokens, a quarter per chip
  # Data parallel: each chip holds the whole state (params and two Adam moments) and its batch
  # (a few percent more: TPU layouts pad small arrays to whole tiles).
  assert r["arguments_gib"] * aot.GIB == pytest.approx(state_bytes + batch_bytes, rel=0.05)
  assert r["flops_per_step"] == pytest.approx(4 * r["flops_per_chip"])
  assert r["mfu"] == pytest.approx(r["flops_per_chip"] / (0.01 * 197e12))


def test_a_step_that_does_not_fit_exits_1(capsys):
  code, out, r = run_aot(capsys, ["batch_size=1048576"])
  assert code == 1 and not r["fits"] and "DOES NOT FIT" in out
  assert "exceeds available HBM" in r["error"]
  assert "--config.skip_nonfinite=cond" in out  # the other skip form is worth a try
