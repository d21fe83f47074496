"""Parameter groups by regex, their schedules, weight-decay mask, frozen parameters and rows."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smartclip_jax import config as config_lib, optim
from smartclip_jax.config import ConfigError


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
  assert optim.labels(params, demo_config)["mask_net"]["attn_pool"]["kernel"] == "mask_net"


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


def test_regex_tables_freeze_scale_and_decay(demo_config):
  """Frozen parameters get a zero update and no optimizer state; learning-rate and decay
  multipliers scale the first Adam step (about lr * mult) and the decay (lr * wd * mult)."""
  demo_config.optim.update(
    frozen="visual/ln_post/.*",
    lr_mults=(("text/.*", 0.5),),
    wd_mults=(("visual/proj", 3.0), ("mask_net/.*", 0.0)),
    frozen_positions=0,
  )
  demo_config.optim.towers.update(lr=0.1, weight_decay=0.1, warmup_steps=0)
  demo_config.optim.mask_net.update(lr=0.01, weight_decay=0.2)
  tx = optim.make_optimizer(demo_config)
  params = _params()
  state = tx.init(params)
  moments = [
    jax.tree_util.keystr(path).split(".mu")[1]
    for path, _ in jax.tree_util.tree_leaves_with_path(state)
    if ".mu[" in jax.tree_util.keystr(path)
  ]
  assert sorted(moments) == [
    "['logit_scale']",
    "['mask_net']['attn_pool']['kernel']",
    "['text']['positional_embedding']",
    "['visual']['proj']",
  ]  # no moments for the frozen gain
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_array_equal(updates["visual"]["ln_post"]["scale"], 0.0)
  np.testing.assert_allclose(updates["visual"]["proj"], -0.1 - 0.03, rtol=1e-4)
  np.testing.assert_allclose(updates["text"]["positional_embedding"], -0.05 - 0.005, rtol=1e-4)
  np.testing.assert_allclose(updates["logit_scale"], -0.1, rtol=1e-4)  # a scalar: no decay
  np.testing.assert_allclose(updates["mask_net"]["attn_pool"]["kernel"], -0.01, rtol=1e-4)
  labels = optim.labels(params, demo_config)
  assert labels["visual"]["ln_post"]["scale"] == "frozen"
  assert labels["text"]["positional_embedding"] == "towers lr*0.5 wd*1"


def test_the_recipe_keeps_its_two_groups(demo_config):
  """The default tables give the recipe's optimizer state (old checkpoints restore)."""
  tx = optim.make_optimizer(demo_config)
  inner = next(s for s in tx.init(_params()) if hasattr(s, "inner_states")).inner_states
  assert sorted(inner) == ["mask_net", "towers"]


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("frozen", "visul/.*", "matches no parameter path (they begin logit_scale, mask_net/"),
    ("frozen", ".*", "freezes every parameter"),
    ("lr_mults", (("txt/.*", 0.1),), "optim.lr_mults: 'txt/.*' matches no parameter"),
    (
      "groups",
      (("mask_net/.*", "mask_net"),),
      "optim.groups gives 4 parameters no group (logit_scale, text/positional_embedding, "
      "visual/ln_post/scale, ...)",
    ),
  ],
)
def test_a_table_that_does_not_fit_the_model_is_refused(demo_config, field, value, message):
  demo_config.optim[field] = value
  tx = optim.make_optimizer(demo_config)
  with pytest.raises(ConfigError, match=re.escape(message)):
    tx.init(_params())


def test_malformed_tables_are_config_problems(demo_config):
  demo_config.optim.update(
    frozen="visual/(",
    groups=(("mask_net/.*", "mask"), (".*", "towers")),
    lr_mults=(("text/.*", -1.0), ("x",)),
  )
  errors = "\n".join(config_lib.problems(demo_config))
  assert "optim.frozen: 'visual/(' is not a regex" in errors
  assert "optim.groups: ('mask_net/.*', 'mask') needs one of ('towers', 'mask_net')" in errors
  assert "optim.lr_mults: ('text/.*', -1.0) needs a number >= 0" in errors
  assert "optim.lr_mults: ('x',) is not a (regex, value) pair" in errors


def test_a_model_without_a_mask_net_keeps_the_default_groups(demo_config):
  """The recipe's `mask_net/.*` group names nothing in a CLIP model, and that is fine."""
  params = {k: v for k, v in _params().items() if k != "mask_net"}
  labels = optim.labels(params, config_lib.set_loss(demo_config, "clip"))
  assert set(jax.tree.leaves(labels)) == {"towers"}
