"""Towers, mask network and position stretch against the behaviour docs/method.md specifies."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from smartclip_jax import config as config_lib, losses
from smartclip_jax.models import layers, vit
from smartclip_jax.models.clip import build_model
from smartclip_jax.models.mask import MaskNetwork, straight_through_hard
from smartclip_jax.models.text import TextTransformer, stretch_positions


def test_straight_through_values_and_gradient():
  x = jnp.linspace(-3, 3, 13)
  hard = straight_through_hard(jax.nn.sigmoid(x))
  np.testing.assert_array_equal(hard, (x >= 0).astype(np.float32))
  w = jnp.arange(13.0)
  grad = jax.grad(lambda x: jnp.sum(w * straight_through_hard(jax.nn.sigmoid(x))))(x)
  np.testing.assert_allclose(grad, w * jax.nn.sigmoid(x) * (1 - jax.nn.sigmoid(x)), rtol=1e-6)


def _long_clip_stretch(table):
  """The 77 -> 248 stretch written out row by row, as docs/method.md describes it."""
  old = np.asarray(table)
  rows = [old[p] for p in range(20)]
  for i in range(20, 76):
    for r in range(4):
      rows.append(old[i] + r / 4 * (old[i + 1] - old[i]))
  for r in range(4):  # past the last row: continue its slope
    rows.append(old[76] + r / 4 * (old[76] - old[75]))
  return np.stack(rows)


def test_stretch_positions_77_to_248():
  table = np.random.default_rng(0).normal(size=(77, 8)).astype(np.float32)
  out = np.asarray(stretch_positions(table, 248))
  assert out.shape == (248, 8)
  np.testing.assert_array_equal(out[:20], table[:20])
  np.testing.assert_array_equal(out[20:244:4], table[20:76])
  np.testing.assert_allclose(out, _long_clip_stretch(table), atol=1e-6)


def test_stretch_positions_rejects_uneven_factor():
  with pytest.raises(ValueError, match="whole multiple"):
    stretch_positions(np.zeros((77, 4)), 250)


def _tokens(rows, length=16, seed=0):
  rng = np.random.default_rng(seed)
  out = np.zeros((rows, length), np.int32)
  for r in range(rows):
    n = rng.integers(3, length)
    out[r, 0] = 49406
    out[r, 1 : n - 1] = rng.integers(1, 49000, n - 2)
    out[r, n - 1] = 49407
  return jnp.asarray(out)


def test_text_tower_is_causal_and_pools_end_of_text():
  tower = TextTransformer(
    context_length=16, vocab_size=49408, width=32, layers=2, heads=4, embed_dim=24
  )
  tokens = _tokens(3)
  params = nn.meta.unbox(jax.jit(tower.init)(jax.random.key(0), tokens))
  apply = jax.jit(tower.apply)
  emb, seq = apply(params, tokens)
  assert emb.shape == (3, 24) and seq.shape == (3, 16, 32)
  eot = np.argmax(np.asarray(tokens), axis=1)
  proj = params["params"]["text_projection"]
  np.testing.assert_allclose(emb, seq[np.arange(3), eot] @ proj, atol=1e-5)
  # Changing a token after the end-of-text changes nothing at or before it (causal mask).
  assert eot[0] < 15
  emb2, seq2 = apply(params, tokens.at[0, -1].set(5))
  np.testing.assert_allclose(emb2[0], emb[0], atol=1e-6)
  np.testing.assert_allclose(seq2[0, : eot[0] + 1], seq[0, : eot[0] + 1], atol=1e-6)
  assert not np.allclose(seq2[0, -1], seq[0, -1])


@pytest.mark.parametrize("width,embed_dim", [(32, 32), (32, 20)])
def test_mask_network_shapes_and_stop_gradient(width, embed_dim):
  net = MaskNetwork(embed_dim=embed_dim, heads=4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10, width)), jnp.float32)
  params = nn.meta.unbox(net.init(jax.random.key(0), x))
  masks = net.apply(params, x)
  assert masks.shape == (3, embed_dim)
  assert set(np.unique(np.asarray(masks))) <= {0.0, 1.0}
  assert ("proj" in params["params"]) == (width != embed_dim)
  np.testing.assert_array_equal(jax.grad(lambda x: net.apply(params, x).sum())(x), 0.0)
  soft = MaskNetwork(embed_dim=embed_dim, heads=4, hard=False).apply(params, x)
  assert np.all((soft > 0) & (soft < 1))


def test_parameter_names_follow_openai_clip(demo_config):
  model = build_model(demo_config)
  c = demo_config.model
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0),
      jnp.zeros((1, c.vision.image_size, c.vision.image_size, 3)),
      jnp.zeros((1, c.text.context_length), jnp.int32),
    )
  )["params"]
  names = {"/".join(k) for k in traverse_util.flatten_dict(shapes)}
  for name in [
    "visual/conv1/kernel",
    "visual/class_embedding",
    "visual/positional_embedding",
    "visual/ln_pre/scale",
    "visual/transformer/resblocks_0/attn/in_proj_kernel",
    "visual/transformer/resblocks_0/mlp/c_fc/kernel",
    "visual/ln_post/bias",
    "visual/proj",
    "text/token_embedding/embedding",
    "text/positional_embedding",
    "text/transformer/resblocks_0/ln_2/scale",
    "text/ln_final/scale",
    "text/text_projection",
    "mask_net/resblocks_0/attn/out_proj_kernel",
    "mask_net/attn_pool/kernel",
    "logit_scale",
  ]:
    assert name in names, name


def _loss_and_grads(config, params, batch):
  from smartclip_jax import step as step_lib

  model = build_model(config)
  fn = jax.value_and_grad(lambda p: step_lib.compute_loss(model, losses.make(config), p, batch)[0])
  return jax.device_get(jax.jit(fn)(params))


def _same_loss_and_gradients(config, field: str, reference, value):
  """Loss and gradients on a demo batch with config.model.<field> = value match `reference`."""
  from smartclip_jax.data import pipeline

  batch = next(pipeline.train_iterator(config))
  config.model[field] = reference
  model = build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])["params"]
  ref = _loss_and_grads(config, params, batch)
  config.model[field] = value
  got = _loss_and_grads(config, params, batch)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(ref[1])):
    # The floor: the pooling bias's gradient is zero in exact arithmetic (a softmax ignores a
    # shift shared by all its inputs), so both sides are rounding noise of ~1e-6.
    atol = max(1e-6 * np.abs(r).max(), 1e-5)
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_gives_the_same_loss_and_gradients(demo_config, remat):
  _same_loss_and_gradients(demo_config, "remat", "none", remat)


@pytest.mark.parametrize("attention", ["einsum", "auto"])
def test_attention_forms_give_the_same_loss_and_gradients(demo_config, attention):
  """The heads-first einsum core (and `auto`, which picks it on CPU) against
  jax.nn.dot_product_attention: both towers, the causal text tower and the mask net's block."""
  _same_loss_and_gradients(demo_config, "attention", "dot_product", attention)


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_attention_matches_the_definition(causal):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 3, 7, 4)).astype(np.float32) for _ in range(3))
  scores = q @ k.transpose(0, 1, 3, 2) / 2.0  # head_dim 4
  if causal:
    scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  want = (weights / weights.sum(-1, keepdims=True)) @ v
  got = layers.softmax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_give_the_same_loss_gradients_and_updates(demo_config, remat):
  """The unrolled model's parameters, stacked, give the scanned model the same loss, gradients
  and AdamW updates (weight decay included: a stacked LayerNorm gain is still a vector)."""
  from smartclip_jax import optim, step as step_lib
  from smartclip_jax.data import pipeline
  from smartclip_jax.interop import layout
  from tests.conftest import assert_gradients_close

  demo_config.model.vision.layers, demo_config.model.text.layers = 2, 3  # layer order shows
  batch = next(pipeline.train_iterator(demo_config))
  params = jax.jit(build_model(demo_config).init)(
    jax.random.key(0), batch["image"][:1], batch["tokens"][:1]
  )["params"]
  params = nn.meta.unbox(params)
  scan_config = demo_config.copy_and_resolve_references()
  scan_config.model.update(scan_layers=True, remat=remat)
  boxed = traverse_util.flatten_dict(
    step_lib.abstract_params(build_model(scan_config), scan_config), sep="/"
  )
  stack = boxed["visual/transformer/resblocks/attn/in_proj_kernel"]
  assert stack.names == ("layers", "embed", None, "heads", "kv")
  assert stack.value.shape[0] == demo_config.model.vision.layers
  like = nn.meta.unbox(boxed)
  stacked = layout.unflatten(layout.restack_layers(layout.flatten(params), like))
  assert sorted(layout.flatten(stacked)) == sorted(like)
  unstack = lambda tree: layout.unflatten(layout.unstack_layers(layout.flatten(tree)))

  ref_loss, ref_grads = _loss_and_grads(demo_config, params, batch)
  loss, grads = _loss_and_grads(scan_config, stacked, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert_gradients_close(unstack(grads), ref_grads)
  # The optimizer on the stacks, fed the unrolled model's own gradients restacked: Adam's first
  # update, lr * g / (|g| + eps), magnifies the rounding differences of gradients near eps, so
  # the same gradients on both sides make this a comparison of the optimizer alone.
  tx = optim.make_optimizer(demo_config)
  ref_updates = tx.update(ref_grads, tx.init(params), params)[0]
  same_grads = layout.unflatten(layout.restack_layers(layout.flatten(ref_grads), like))
  updates = tx.update(same_grads, tx.init(stacked), stacked)[0]
  assert_gradients_close(unstack(updates), ref_updates)


@pytest.mark.parametrize("loss", ["clip", pytest.param("siglip", marks=pytest.mark.slow)])
def test_trimmed_text_padding_gives_the_same_loss_and_gradients(demo_config, loss):
  from smartclip_jax.data import pipeline

  config_lib.set_loss(demo_config, loss)
  demo_config.model.text.context_length = 64  # room to cut: the demo's captions are shorter
  batch = next(pipeline.train_iterator(demo_config))
  model = build_model(demo_config)
  params = jax.jit(model.init)(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])["params"]
  context = demo_config.model.text.context_length
  assert pipeline.text_length(batch["tokens"], demo_config) == context  # off by default
  demo_config.model.text.trim_padding = 8
  length = pipeline.text_length(batch["tokens"], demo_config)
  longest = max(int(np.flatnonzero(row)[-1]) + 1 for row in batch["tokens"])
  assert length % 8 == 0 and longest <= length < longest + 8 and length < context
  ref = _loss_and_grads(demo_config, params, batch)
  got = _loss_and_grads(demo_config, params, {**batch, "tokens": batch["tokens"][:, :length]})
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
  from tests.conftest import assert_gradients_close

  assert_gradients_close(got[1], ref[1])


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_gradients(demo_config):
  """bf16 matmuls and activations; parameters, embeddings and gradients float32; loss close."""
  from smartclip_jax.data import pipeline

  batch = next(pipeline.train_iterator(demo_config))
  ref_config = demo_config.copy_and_resolve_references()
  demo_config.model.dtype = "bfloat16"
  model = build_model(demo_config)
  params = jax.jit(model.init)(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])["params"]
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  out = jax.jit(model.apply)({"params": params}, batch["image"], batch["tokens"])
  assert out["img_emb"].dtype == out["txt_emb"].dtype == out["masks"].dtype == jnp.float32
  got = _loss_and_grads(demo_config, params, batch)
  ref = _loss_and_grads(ref_config, params, batch)
  np.testing.assert_allclose(got[0], ref[0], rtol=2e-2)
  assert {g.dtype for g in jax.tree.leaves(got[1])} == {np.dtype("float32")}


def test_mask_net_initialisation_matches_the_reference():
  """Each parameter's spread against the reference's initialisation of the same PyTorch
  module (one OpenAI-initialised block, the pooling Linear at width^-0.5 with a zero bias):
  sample stds and mean magnitudes within 5 % (wider for small tensors: 4 / sqrt(size)), uniform
  biases with the same largest magnitude, zeros and ones exact."""
  torch = pytest.importorskip("torch", reason="needs requirements-torch.txt")
  from smartclip_jax.interop import layout
  from tests.torch_reference import MaskNet

  width = 256
  torch.manual_seed(0)
  want = {k: v.numpy() for k, v in MaskNet(width, 4, True).state_dict().items()}
  params = MaskNetwork(embed_dim=width, heads=4).init(jax.random.key(0), jnp.zeros((1, 8, width)))[
    "params"
  ]
  got = layout.to_openai({"mask_net": nn.meta.unbox(params)})
  assert sorted(got) == sorted(f"mask_net.{k}" for k in want)
  for key, ref in want.items():
    ours = np.asarray(got[f"mask_net.{key}"])
    assert ours.shape == ref.shape, key
    if np.all(ref == ref.flat[0]):  # constants: zeros, LayerNorm ones
      np.testing.assert_array_equal(ours, ref, err_msg=key)
      continue
    rtol = max(0.05, 4 / np.sqrt(ref.size))
    np.testing.assert_allclose(ours.std(), ref.std(), rtol=rtol, err_msg=key)
    np.testing.assert_allclose(np.abs(ours).mean(), np.abs(ref).mean(), rtol=rtol, err_msg=key)
    if key.endswith("bias"):  # uniform: the same bound
      np.testing.assert_allclose(np.abs(ours).max(), np.abs(ref).max(), rtol=0.05, err_msg=key)


def test_patch_dropout_keeps_the_class_token_and_distinct_patches_per_image():
  """Tokens [2 images, class token + 10 patches, 3]: patch p holds p, the class token -1."""
  x = jnp.broadcast_to(jnp.arange(-1.0, 10.0)[None, :, None], (2, 11, 3))
  out = np.asarray(vit.drop_patches(x, 0.5, jax.random.key(0)))
  assert out.shape == (2, 6, 3) and vit.kept_patches(10, 0.5) == 5
  np.testing.assert_array_equal(out[:, 0], -1.0)
  kept = [set(out[b, 1:, 0].tolist()) for b in range(2)]
  assert all(len(k) == 5 and k <= set(range(10)) for k in kept)  # no repeats, no class token
  assert kept[0] != kept[1]  # each image draws its own
  assert vit.kept_patches(196, 0.5) == 98 and vit.kept_patches(4, 0.99) == 1


def test_patch_dropout_is_for_training_only(demo_config):
  """Evaluation (`encode_image`) sees every patch whatever the rate; a training pass drops
  patches drawn from the seed and step (`step.step_rng`): the same step draws the same."""
  from smartclip_jax import step as step_lib

  batch = step_lib.dummy_batch(demo_config, 4)
  batch["image"] = jax.random.normal(jax.random.key(1), batch["image"].shape)
  plain = build_model(demo_config)
  params = nn.meta.unbox(plain.init(jax.random.key(0), batch["image"], batch["tokens"]))["params"]
  demo_config.model.patch_dropout = 0.5
  dropping = build_model(demo_config)
  evaluate = lambda m: m.apply({"params": params}, batch["image"], method=m.encode_image)
  np.testing.assert_array_equal(evaluate(dropping), evaluate(plain))
  train = lambda m, step: step_lib.forward(m, params, batch, step_lib.step_rng(demo_config, step))
  np.testing.assert_array_equal(train(plain, 3)["img_emb"], evaluate(plain))
  np.testing.assert_array_equal(train(dropping, 3)["img_emb"], train(dropping, 3)["img_emb"])
  assert not np.allclose(train(dropping, 3)["img_emb"], evaluate(plain), atol=1e-3)
  assert not np.allclose(train(dropping, 3)["img_emb"], train(dropping, 4)["img_emb"], atol=1e-3)
  np.testing.assert_array_equal(train(dropping, 3)["txt_emb"], train(plain, 3)["txt_emb"])
