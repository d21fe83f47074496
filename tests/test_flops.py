"""Throughput accounting (flops.py): XLA's FLOPs per device and the peak MFU divides by."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from smartclip_jax import flops, sharding


@pytest.mark.parametrize(
  "kind,peak",
  [
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),  # v5p's device_kind
    ("TPU v6 lite", 918e12),
    ("TPU v4", 275e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("cpu", None),
  ],
)
def test_table_peak_by_device_kind(kind, peak):
  assert flops.table_peak(kind) == peak


def test_compiled_flops_are_per_device():
  """A matmul's 2·M·K·N FLOPs, split 8 ways when its rows are sharded over 8 devices."""
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  one = jax.jit(jnp.matmul).lower(a, b).compile()
  assert flops.compiled_flops(one) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)
  mesh = sharding.data_mesh(jax.devices()[:8])
  rows = NamedSharding(mesh, P("data"))
  split = jax.jit(jnp.matmul, in_shardings=(rows, sharding.replicated(mesh)), out_shardings=rows)
  eight = split.lower(a, b).compile()
  assert flops.compiled_flops(eight) == pytest.approx(2 * 64 * 32 * 16 / 8, rel=0.01)


def test_cpu_peak_is_measured_and_shared_by_the_local_devices():
  mesh = sharding.data_mesh(jax.devices()[:8])
  peak = flops.measured_peak("float32")
  assert np.isfinite(peak) and peak > 1e8  # any CPU of this century: > 0.1 GFLOP/s
  assert flops.mesh_peak(mesh) == peak / len(jax.local_devices())


@pytest.mark.parametrize("loss", ["smartclip", "clip"])
def test_model_flops_count_the_forward_pass_as_xla_does(loss):
  """The architecture's matmuls against XLA's count of the compiled forward pass (which adds
  the layer norms, softmaxes and activations: a few per cent at these widths)."""
  from smartclip_jax import config as config_lib
  from smartclip_jax.models.clip import build_model

  c = config_lib.load("configs/demo.py" + (":clip" if loss == "clip" else ""), [])
  model, batch = build_model(c), 8
  images, tokens = jnp.zeros((batch, 32, 32, 3)), jnp.zeros((batch, 48), jnp.int32)
  params = model.init(jax.random.key(0), images, tokens)
  compiled = jax.jit(lambda p: model.apply(p, images, tokens)).lower(params).compile()
  ratio = batch * flops.forward_flops(c) / flops.compiled_flops(compiled)
  assert 0.92 < ratio <= 1.0, ratio
  shorter = flops.forward_flops(c, text_length=16)
  assert shorter < flops.forward_flops(c)  # trimmed padding: fewer text positions run
  logits = 2 * c.batch_size * c.model.embed_dim * (2 if loss == "smartclip" else 1)
  assert flops.model_flops(c) == 3 * (flops.forward_flops(c) + logits)


def test_model_flops_of_patch_dropout_and_a_locked_tower():
  """A training pass with half the patches dropped against XLA's count of it; a tower frozen
  whole counts its forward pass once (no backward through it)."""
  from smartclip_jax import config as config_lib, step as step_lib
  from smartclip_jax.models.clip import build_model

  c = config_lib.load("configs/demo.py:clip", ["model.patch_dropout=0.5"])
  model, batch = build_model(c), step_lib.dummy_batch(c, 8)
  params = model.init(jax.random.key(0), batch["image"], batch["tokens"])["params"]
  forward = lambda p: step_lib.forward(model, p, batch, jax.random.key(1))
  compiled = jax.jit(forward).lower(params).compile()
  trained, full = flops.tower_flops(c, train=True), flops.tower_flops(c)
  assert trained["visual"] < 0.6 * full["visual"] and trained["text"] == full["text"]
  ratio = 8 * sum(trained.values()) / flops.compiled_flops(compiled)
  assert 0.9 < ratio <= 1.0, ratio
  logits = 2 * c.batch_size * c.model.embed_dim
  assert (
    flops.model_flops(c, frozen={"visual"}) == 3 * logits + trained["visual"] + 3 * trained["text"]
  )
