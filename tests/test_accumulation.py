"""Gradient accumulation by a feature cache: K micro-batches give the loss, metrics and
gradients of one batch of K x B (the contrastive loss still sees every pair)."""

import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartclip_jax import config as config_lib, losses, optim, sharding, step as step_lib
from smartclip_jax.data import pipeline
from smartclip_jax.models.clip import build_model
from tests.conftest import assert_gradients_close


def _setup(config):
  model, tx = build_model(config), optim.make_optimizer(config)
  mesh = sharding.make_mesh(config)
  shardings = step_lib.abstract_state(model, tx, config, mesh)[1]
  state = step_lib.init_state(model, tx, config, mesh, shardings)
  batch = next(pipeline.train_iterator(config))
  return model, mesh, shardings, state, {"image": batch["image"], "tokens": batch["tokens"]}


def _loss_and_grads(model, config, mesh, shardings, params, batch):
  groups = sharding.data_parallel_size(mesh)
  if config.accum_steps > 1:
    fn = lambda p, b: step_lib.accumulated_loss_and_grads(
      model, losses.make(config), p, b, config.accum_steps, groups
    )
  else:
    fn = jax.value_and_grad(
      lambda p, b: step_lib.compute_loss(model, losses.make(config), p, b), has_aux=True
    )
  with sharding.activate(mesh):
    return jax.device_get(
      jax.jit(fn, in_shardings=(shardings.params, sharding.batch_sharding(mesh)))(params, batch)
    )


def _assert_same(got, ref):
  (loss, metrics), grads = got
  (ref_loss, ref_metrics), ref_grads = ref
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  assert_gradients_close(grads, ref_grads)


@pytest.mark.slow
@pytest.mark.parametrize(
  "loss,impl,mesh",
  [
    ("smartclip", "global", dict(data=4, fsdp=2, tensor=1)),
    ("clip", "ring", dict(data=2, fsdp=2, tensor=2)),
    ("siglip", "global", dict(data=8, fsdp=1, tensor=1)),
  ],
)
def test_accumulated_gradients_equal_the_full_batch(demo_config, loss, impl, mesh):
  config_lib.set_loss(demo_config, loss).update(loss_impl=impl, batch_size=32)
  demo_config.mesh.update(mesh)
  model, mesh, shardings, state, batch = _setup(demo_config)
  ref = _loss_and_grads(model, demo_config, mesh, shardings, state.params, batch)
  demo_config.accum_steps = 4
  got = _loss_and_grads(model, demo_config, mesh, shardings, state.params, batch)
  _assert_same(got, ref)


@pytest.mark.slow
def test_train_step_with_accumulation_matches_one_batch(demo_config):
  """Through the jitted step (update, skip bookkeeping): the same parameters after a step."""
  demo_config.batch_size = 32
  # eps 1e-6, not the recipe's 1e-8: Adam's first step moves a leaf whose gradient is rounding
  # noise (the attention pooling's bias) by +-lr at the noise's sign (see test_models).
  demo_config.optim.eps = 1e-6
  model, mesh, shardings, state, batch = _setup(demo_config)
  tx = optim.make_optimizer(demo_config)
  params = {}
  for k in (1, 2):
    demo_config.accum_steps = k
    step = step_lib.make_train_step(model, tx, demo_config, mesh, shardings)
    fresh = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input
    new_state, metrics = step(fresh, batch)
    params[k] = jax.device_get(new_state.params)
    assert int(metrics["skipped_steps"]) == 0
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(params[2]), jax.tree.leaves(params[1])
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_accumulation_with_patch_dropout_pulls_back_through_the_same_drops(demo_config):
  """Micro-batch i drops the patches `rng` folded with i draws, in the embedding pass and again
  in the pass that pulls gradients back: the result equals differentiating those K forward
  passes directly (a second draw in the pull-back would not)."""
  demo_config.update(batch_size=32, accum_steps=4)
  demo_config.model.patch_dropout = 0.5
  model, mesh, shardings, state, batch = _setup(demo_config)
  groups, k, loss_fn = sharding.data_parallel_size(mesh), 4, losses.make(demo_config)
  rng = step_lib.step_rng(demo_config, 7)

  def direct(p, b):
    micro = step_lib._split(b, k, groups)

    def loss(p):
      outs = [
        step_lib.forward(
          model, p, jax.tree.map(operator.itemgetter(i), micro), jax.random.fold_in(rng, i)
        )
        for i in range(k)
      ]
      rows = {key: jnp.stack([o[key] for o in outs]) for key in outs[0] if outs[0][key].ndim > 1}
      scalars = {key: v for key, v in outs[0].items() if v.ndim <= 1}
      return loss_fn({**scalars, **step_lib._merge(rows, groups)})

    return jax.value_and_grad(loss, has_aux=True)(p)

  cached = lambda p, b: step_lib.accumulated_loss_and_grads(
    model, loss_fn, p, b, k, groups, rng=rng
  )
  with sharding.activate(mesh):
    run = lambda fn: jax.device_get(
      jax.jit(fn, in_shardings=(shardings.params, sharding.batch_sharding(mesh)))(
        state.params, batch
      )
    )
    _assert_same(run(cached), run(direct))
