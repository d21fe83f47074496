"""The ring losses equal the global ones (values, gradients, metrics) on 8 CPU devices, and
their temporaries do not hold a B_local x B_global block."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartclip_jax import losses, ring, sharding
from smartclip_jax.data import pipeline
from smartclip_jax.models.clip import build_model
from tests.conftest import assert_gradients_close
from tests.test_sharding import loss_and_grads


def _mesh(data, fsdp, tensor):
  return jax.make_mesh(
    (data, fsdp, tensor), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3
  )


def _inputs(batch=32, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(batch, dim)).astype(np.float32)
  txt = rng.normal(size=(batch, dim)).astype(np.float32)
  masks = rng.uniform(size=(batch, dim)).astype(np.float32)
  masks[3] = 0.0  # a caption that keeps nothing: similarity 0 against every image
  masks[5] = masks[5] > 0.5
  return jnp.asarray(img), jnp.asarray(txt), jnp.asarray(masks)


LOSSES = {
  "smartclip": (lambda a, impl: losses.smartclip_loss(*a, temperature=0.05, impl=impl), 3),
  "clip": (lambda a, impl: losses.clip_loss(*a, impl=impl), 3),
  "siglip": (lambda a, impl: losses.siglip_loss(*a, impl=impl), 4),
}


def _args(name):
  img, txt, masks = _inputs()
  return {
    "smartclip": (img, txt, masks),
    "clip": (img, txt, jnp.float32(2.5)),
    "siglip": (img, txt, jnp.float32(2.3), jnp.float32(-4.0)),
  }[name]


def _assert_close_trees(got, ref, what):
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(
      g,
      r,
      rtol=1e-5,
      atol=1e-5 * max(1.0, np.abs(r).max()),
      err_msg=f"{what} {jax.tree_util.keystr(path)}",
    )


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_ring_equals_global(name, shape):
  fn, _ = LOSSES[name]
  args = _args(name)
  results = {}
  with sharding.activate(_mesh(*shape)):
    for impl in ("global", "ring"):
      grad = jax.value_and_grad(lambda a, impl=impl: fn(a, impl), has_aux=True)
      results[impl] = jax.device_get(jax.jit(grad)(args))
  (loss_g, metrics_g), grads_g = results["global"]
  (loss_r, metrics_r), grads_r = results["ring"]
  np.testing.assert_allclose(loss_r, loss_g, rtol=1e-5)
  assert metrics_r.keys() == metrics_g.keys()
  _assert_close_trees(metrics_r, metrics_g, f"{name} metrics")
  _assert_close_trees(grads_r, grads_g, f"{name} gradients")


def _masked_logits(z, text, _):
  return losses.masked_similarity(z, *text) / 0.05


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_blocks_and_ties_match_the_full_matrix(chunk):
  """Blocks of 4 captions per device scored 1, 2 (or the divisor 2 of 3) at a time; equal
  logits (an all-zero mask) break ties to the lower index, as argmax over a full row does."""
  img, txt, masks = _inputs()
  masks = masks.at[jnp.arange(0, 32, 2)].set(0.0)  # half the captions tie at 0 on every image
  logits = _masked_logits(img, (txt, masks), ())
  with sharding.activate(_mesh(8, 1, 1)):
    got = jax.jit(functools.partial(ring.softmax_stats, _masked_logits, chunk=chunk))(
      img, (txt, masks), ()
    )
    sig = jax.jit(functools.partial(ring.sigmoid_stats, _masked_logits, chunk=chunk))(
      img, (txt, masks), ()
    )
  _assert_close_trees(got, losses.softmax_stats(logits), "softmax stats")
  _assert_close_trees(sig, losses.sigmoid_stats(logits), "sigmoid stats")
  assert not np.all(got["t2i_correct"])  # the ties are really there


def test_ring_needs_a_mesh():
  with pytest.raises(ValueError, match="needs an active mesh"):
    losses.clip_loss(*_args("clip"), impl="ring")


def _temp_mib(impl, batch, dim=64):
  rows = sharding.batch_sharding(sharding.data_mesh())
  spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
  fn = jax.value_and_grad(lambda *a: losses.smartclip_loss(*a, impl=impl)[0], argnums=(0, 1, 2))
  with sharding.activate(sharding.data_mesh()):
    compiled = jax.jit(fn).lower(spec, spec, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_ring_memory_is_linear_in_the_batch():
  small, large = (_temp_mib("ring", b) for b in (8192, 32768))  # 1k, 4k per device
  full = _temp_mib("global", 32768)
  assert large < 5 * small  # 4x the batch: about 4x the memory, not 16x
  assert large < full / 8


@pytest.mark.slow
def test_train_loss_ring_equals_global(demo_config):
  """The model's forward and the configured loss: same loss and parameter gradients."""
  model = build_model(demo_config)
  batch = next(pipeline.train_iterator(demo_config))
  batch = {"image": batch["image"], "tokens": batch["tokens"]}
  params = jax.jit(lambda r: model.init(r, batch["image"][:1], batch["tokens"][:1]))(
    jax.random.key(0)
  )["params"]
  demo_config.mesh.update(data=4, fsdp=2, tensor=1)
  mesh = sharding.make_mesh(demo_config)
  out = {}
  for impl in ("global", "ring"):
    demo_config.loss_impl = impl
    out[impl] = loss_and_grads(demo_config, mesh, params, batch)
  np.testing.assert_allclose(out["ring"][0], out["global"][0], rtol=1e-5)
  assert_gradients_close(out["ring"][2], out["global"][2])
