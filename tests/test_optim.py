"""The two optimizer groups, their schedules, weight-decay mask and frozen positions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smartclip_jax import optim


def _params():
  return {"visual": {"proj": jnp.ones((4, 3)), "ln_post": {"scale": jnp.ones((4,))}},
          "text": {"positional_embedding": jnp.ones((6, 4))},
          "mask_net": {"attn_pool": {"kernel": jnp.ones((4, 1))}},
          "logit_scale": jnp.asarray(1.0)}


def test_schedules_follow_the_recipe(demo_config):
  demo_config.update(total_steps=1000)
  demo_config.optim.towers.update(lr=1e-6, warmup_steps=200)
  demo_config.optim.mask_net.lr = 1e-3
  lrs = optim.schedules(demo_config)
  towers, mask = lrs["towers"], lrs["mask_net"]
  np.testing.assert_allclose([towers(0), towers(100), towers(200)], [0, 5e-7, 1e-6], rtol=1e-6)
  np.testing.assert_allclose(towers(600), 1e-6 * 0.5 * (1 + np.cos(np.pi * 400 / 800)),
                             rtol=1e-5)
  np.testing.assert_allclose([mask(0), mask(500), mask(1000)], [1e-3, 5e-4, 0], atol=1e-9)


def test_groups_decay_and_frozen_rows(demo_config):
  demo_config.optim.update(frozen_positions=2, grad_clip_norm=0.0)
  demo_config.optim.towers.update(lr=0.1, weight_decay=0.5, warmup_steps=0)
  demo_config.optim.mask_net.update(lr=0.01, weight_decay=0.0)
  tx = optim.make_optimizer(demo_config)
  params = _params()
  grads = jax.tree.map(jnp.zeros_like, params)  # no gradient: only weight decay moves weights
  grads["text"]["positional_embedding"] = jnp.ones((6, 4))
  updates, _ = tx.update(grads, tx.init(params), params)
  # Matrices decay (lr * wd * w = 0.05), vectors and scalars do not.
  np.testing.assert_allclose(updates["visual"]["proj"], -0.05, rtol=1e-5)
  np.testing.assert_array_equal(updates["visual"]["ln_post"]["scale"], 0.0)
  np.testing.assert_array_equal(updates["logit_scale"], 0.0)
  # The mask net has no decay; Adam's first step moves a parameter by about lr.
  np.testing.assert_array_equal(updates["mask_net"]["attn_pool"]["kernel"], 0.0)
  pos = np.asarray(updates["text"]["positional_embedding"])
  np.testing.assert_array_equal(pos[:2], 0.0)
  np.testing.assert_allclose(pos[2:], -0.1 - 0.05, rtol=1e-4)
  assert optim.param_groups(params)["mask_net"]["attn_pool"]["kernel"] == "mask_net"


def test_mask_group_gets_its_own_learning_rate(demo_config):
  demo_config.optim.towers.update(lr=0.1, weight_decay=0.0, warmup_steps=0)
  demo_config.optim.mask_net.lr = 0.01
  tx = optim.make_optimizer(demo_config)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["mask_net"]["attn_pool"]["kernel"], -0.01, rtol=1e-4)
  np.testing.assert_allclose(updates["visual"]["proj"], -0.1, rtol=1e-4)
  assert optax.global_norm(updates) > 0
