"""The two optimizer groups, their schedules, weight-decay mask and frozen positions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smartclip_jax import optim


def _params():
  return {
    "visual": {"proj": jnp.ones((4, 3)), "ln_post": {"scale": jnp.ones((4,))}},
    "text": {"positional_embedding": jnp.ones((6, 4))},
    "mask_net": {"attn_pool": {"kernel": jnp.ones((4, 1))}},
    "logit_scale": jnp.asarray(1.0),
  }


def test_schedules_follow_the_recipe(demo_config):
  demo_config.update(total_steps=1000)
  demo_config.optim.towers.update(lr=1e-6, warmup_steps=200)
  demo_config.optim.mask_net.lr = 1e-3
  lrs = optim.schedules(demo_config)
  towers, mask = lrs["towers"], lrs["mask_net"]
  # The reference's warm-up: lr (step + 1) / 200, so the first step moves at lr / 200.
  np.testing.assert_allclose(
    [towers(0), towers(99), towers(199), towers(200)], [5e-9, 5e-7, 1e-6, 1e-6], rtol=1e-6
  )
  np.testing.assert_allclose(towers(600), 1e-6 * 0.5 * (1 + np.cos(np.pi * 400 / 800)), rtol=1e-5)
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


def test_recipe_optimizer_matches_torch_adamw():
  """Eight steps of the recipe's optimizer (its constants, decay, clipping and schedule shapes;
  shorter schedules and larger rates so that they show) against torch.optim.AdamW with the
  reference's two groups and defaults: towers warm up over 3 steps then cosine, with weight
  decay on every parameter; the mask net cosine from its first step without decay; the first
  position rows never train. Parameters agree after every step."""
  torch = pytest.importorskip("torch", reason="needs requirements-torch.txt")
  from smartclip_jax.config import recipe_config
  from tests.torch_reference import cosine_lr

  c = recipe_config("vit_b16")
  c.total_steps = 8
  c.optim.frozen_positions = 2
  c.optim.towers.update(lr=0.01, weight_decay=0.1, warmup_steps=3)
  c.optim.mask_net.lr = 0.02
  rng = np.random.default_rng(0)
  shapes = {
    "visual": {"proj": (4, 3), "ln_post": {"scale": (4,), "bias": (4,)}},
    "text": {"positional_embedding": (6, 4)},
    "mask_net": {"attn_pool": {"kernel": (4, 1), "bias": (1,)}},
  }
  params = jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
    shapes,
    is_leaf=lambda s: isinstance(s, tuple),
  )
  leaves, treedef = jax.tree.flatten(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  frozen = paths.index("['text']['positional_embedding']")
  # Torch: the frozen rows are not parameters at all (the reference's frozen table).
  ref = [
    torch.tensor(np.asarray(x)[2:] if i == frozen else np.asarray(x), requires_grad=True)
    for i, x in enumerate(leaves)
  ]
  is_mask = ["mask_net" in p for p in paths]
  towers_lr, mask_lr = cosine_lr(0.01, 3, 8), cosine_lr(0.02, 0, 8)
  opt = torch.optim.AdamW(  # torch's default betas and eps, as the reference
    [
      {"params": [t for t, m in zip(ref, is_mask) if not m], "weight_decay": 0.1},
      {"params": [t for t, m in zip(ref, is_mask) if m], "weight_decay": 0.0},
    ],
    lr=0.0,
  )
  tx = optim.make_optimizer(c)
  state = tx.init(params)
  for step in range(8):
    grads = [rng.normal(size=x.shape).astype(np.float32) for x in leaves]
    for group, lr in zip(opt.param_groups, (towers_lr(step), mask_lr(step))):
      group["lr"] = lr
    for i, (t, g) in enumerate(zip(ref, grads)):
      t.grad = torch.from_numpy(g[2:] if i == frozen else g)
    opt.step()
    updates, state = tx.update(
      jax.tree.unflatten(treedef, [jnp.asarray(g) for g in grads]), state, params
    )
    params = optax.apply_updates(params, updates)
    for i, (got, want) in enumerate(zip(jax.tree.leaves(params), ref)):
      got = np.asarray(got)
      if i == frozen:
        np.testing.assert_array_equal(got[:2], np.asarray(leaves[i])[:2])
        got = got[2:]
      np.testing.assert_allclose(
        got, want.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {step} {paths[i]}"
      )
