"""The losses against direct references: the N×M×D form of docs/method.md and numpy CE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartclip_jax import losses


def naive_masked_similarity(img, txt, masks):
  """The reference's form: build z_i * m_j for every pair, then cosine with t_j."""
  t = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  masked = img[:, None, :] * masks[None, :, :]  # [N, M, D]
  norm_sq = jnp.sum(masked * masked, axis=-1)
  dot = jnp.sum(masked * t[None], axis=-1)
  ok = norm_sq > 0
  return jnp.where(ok, dot / jnp.sqrt(jnp.where(ok, norm_sq, 1.0)), 0.0)


def _inputs(n=6, m=5, d=16, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(n, d)).astype(np.float32)
  txt = rng.normal(size=(m, d)).astype(np.float32)
  masks = rng.uniform(size=(m, d)).astype(np.float32)  # soft masks: gradients are non-trivial
  masks[1] = 0.0  # all-zero row
  masks[2] = 1.0  # all-one row
  masks[3] = masks[3] > 0.5  # a hard row
  return jnp.asarray(img), jnp.asarray(txt), jnp.asarray(masks)


def test_masked_similarity_matches_naive_values_and_gradients():
  img, txt, masks = _inputs()
  np.testing.assert_allclose(
    losses.masked_similarity(img, txt, masks), naive_masked_similarity(img, txt, masks), atol=1e-5
  )
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)), jnp.float32)
  grads = [
    jax.grad(lambda *a, f=f: jnp.sum(weights * f(*a)), argnums=(0, 1, 2))(img, txt, masks)
    for f in (losses.masked_similarity, naive_masked_similarity)
  ]
  for ours, ref in zip(*grads):
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_all_one_mask_is_plain_cosine_and_zero_mask_is_zero():
  img, txt, masks = _inputs()
  sim = np.asarray(losses.masked_similarity(img, txt, masks))
  cosine = (img / jnp.linalg.norm(img, axis=-1, keepdims=True)) @ (
    txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
  ).T
  np.testing.assert_allclose(sim[:, 2], cosine[:, 2], atol=1e-6)
  np.testing.assert_array_equal(sim[:, 1], 0.0)


def _np_ce(logits):
  """Mean cross-entropy of rows against the diagonal, in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  m = logits.max(axis=1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
  return float(np.mean(lse - np.diag(logits)))


def test_smartclip_loss_matches_its_equation():
  img, txt, _ = _inputs(n=5)
  masks = jnp.asarray(np.random.default_rng(3).uniform(size=(5, 16)) > 0.4, jnp.float32)
  loss, metrics = losses.smartclip_loss(
    img, txt, masks, temperature=0.05, align_weight=3.0, sparsity_weight=0.5
  )
  logits = np.asarray(naive_masked_similarity(img, txt, masks)) / 0.05
  rows, cols = _np_ce(logits), _np_ce(logits.T)
  expected = 3.0 * (rows + cols) + 0.5 * float(np.mean(masks))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["ce_i2t"], rows, rtol=1e-5)
  np.testing.assert_allclose(metrics["ce_t2i"], cols, rtol=1e-5)
  np.testing.assert_allclose(metrics["mask_density"], np.mean(masks), rtol=1e-6)
  np.testing.assert_allclose(metrics["i2t_top1"], np.mean(logits.argmax(1) == np.arange(5)))


def test_smartclip_without_modular_alignment_masks_each_image_by_its_own_caption():
  img, txt, _ = _inputs(n=5)
  masks = jnp.asarray(np.random.default_rng(4).uniform(size=(5, 16)) > 0.4, jnp.float32)
  loss, metrics = losses.smartclip_loss(
    img, txt, masks, temperature=0.05, align_weight=3.0, sparsity_weight=0.5, modular=False
  )
  z = np.asarray(img, np.float64) * np.asarray(masks)
  t = np.asarray(txt, np.float64)
  logits = (
    (z / np.linalg.norm(z, axis=1, keepdims=True))
    @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    / 0.05
  )
  expected = 3.0 * (_np_ce(logits) + _np_ce(logits.T)) + 0.5 * float(np.mean(masks))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["mask_density"], np.mean(masks), rtol=1e-6)


def _np_jaccard(a, b):
  """A plain Jaccard of two masks' on-sets (>= 0.5), 1 for two empty ones."""
  a, b = set(np.flatnonzero(a >= 0.5)), set(np.flatnonzero(b >= 0.5))
  return len(a & b) / len(a | b) if a | b else 1.0


def test_mask_diagnostics_match_a_plain_reference():
  masks = np.zeros((6, 8), np.float32)
  masks[0, :4] = masks[1, :4] = 1.0  # identical: Jaccard 1
  masks[2, 4:6] = 1.0  # disjoint from rows 0 and 1: 0
  masks[3, [0, 1, 4]] = [0.9, 0.2, 0.6]  # soft: on where >= 0.5 ({0, 4})
  # rows 4 and 5 empty: Jaccard 1 with each other, 0 with the others
  got = losses.mask_diagnostics(jnp.asarray(masks))
  pairs = [_np_jaccard(masks[i], masks[j]) for i in range(6) for j in range(i + 1, 6)]
  assert _np_jaccard(masks[0], masks[1]) == _np_jaccard(masks[4], masks[5]) == 1.0
  assert _np_jaccard(masks[0], masks[2]) == _np_jaccard(masks[4], masks[0]) == 0.0
  assert _np_jaccard(masks[0], masks[3]) == 1 / 5
  np.testing.assert_allclose(got["mask_jaccard"], np.mean(pairs), rtol=1e-6)
  full = np.array([[_np_jaccard(a, b) for b in masks] for a in masks])
  np.testing.assert_allclose(losses.mask_jaccard(jnp.asarray(masks)), full, rtol=1e-6)
  np.testing.assert_allclose(losses.mean_pairwise(jnp.asarray(full[:1, :1])), 1.0)

  # Over a window of steps: always on = on in every mask of every step; never on = in none.
  all_but = lambda d: np.ones((3, 8), np.float32) * (np.arange(8) != d)
  for window, want in (
    ([masks], (0, 2)),  # rows 4 and 5 are empty; dimensions 6 and 7 never on
    ([masks, all_but(6)], (0, 1)),
    ([all_but(6), all_but(0)], (6, 0)),
    ([np.ones((2, 8))], (8, 0)),
  ):
    on = np.concatenate(window) >= 0.5
    assert want == (on.all(0).sum(), (~on.any(0)).sum())
    steps = jax.device_get([losses.mask_diagnostics(jnp.asarray(m)) for m in window])
    assert losses.mask_window(steps) == {"mask_always_on": want[0], "mask_never_on": want[1]}
  assert losses.mask_window([]) == {}


def test_mask_jaccard_samples_large_batches(monkeypatch):
  monkeypatch.setattr(losses, "JACCARD_ROWS", 4)
  masks = np.zeros((8, 4), np.float32)
  masks[::2, 0] = 1.0  # the sampled rows (every 2nd) are identical
  masks[1::2, 1:] = 1.0
  got = losses.mask_diagnostics(jnp.asarray(masks))
  assert float(got["mask_jaccard"]) == 1.0
  np.testing.assert_array_equal(got["mask_dim_max"], [1, 1, 1, 1])  # flags use every row


def test_clip_with_a_fixed_temperature_gives_its_scale_no_gradient():
  from smartclip_jax import config as config_lib

  c = config_lib.set_loss(config_lib.base_config(), "clip")
  c.clip.temperature = 0.01
  img, txt, _ = _inputs(n=5)
  loss, grad = jax.value_and_grad(
    lambda s: losses.make(c)({"img_emb": img, "txt_emb": txt, "logit_scale": s})[0]
  )(jnp.asarray(2.0))
  np.testing.assert_allclose(loss, losses.clip_loss(img, txt, jnp.log(100.0))[0], rtol=1e-6)
  assert grad == 0.0


def test_clip_on_a_fixed_subset_of_image_dims_is_smartclip_under_one_constant_mask():
  from smartclip_jax import config as config_lib

  c = config_lib.set_loss(config_lib.base_config(), "clip")
  c.model.embed_dim, c.clip.temperature, c.clip.subset_dims = 16, 0.01, 5
  img, txt, _ = _inputs(n=6, m=6)
  keep = losses.subset_mask(c)
  assert float(keep.sum()) == 5 and bool(((keep == 0) | (keep == 1)).all())
  np.testing.assert_array_equal(keep, losses.subset_mask(c))  # fixed by the seed
  loss, grad = jax.value_and_grad(
    lambda z: losses.make(c)({"img_emb": z, "txt_emb": txt, "logit_scale": jnp.zeros(())})[0]
  )(img)
  same_mask = jnp.broadcast_to(keep, txt.shape)
  reference = losses.smartclip_loss(
    img, txt, same_mask, temperature=0.01, align_weight=0.5, sparsity_weight=0.0
  )[0]
  np.testing.assert_allclose(loss, reference, rtol=1e-5)
  assert not np.asarray(grad)[:, np.asarray(keep) == 0].any()  # the other dims never train
  c.loss = "smartclip"
  with pytest.raises(config_lib.ConfigError, match="subset_dims is an option of loss=clip"):
    losses.make(c)


def test_smartclip_loss_finite_with_all_zero_masks():
  img, txt, _ = _inputs(n=4, m=4)
  masks = jnp.zeros((4, 16)).at[0].set(1.0)
  loss, grads = jax.value_and_grad(lambda *a: losses.smartclip_loss(*a)[0], argnums=(0, 1, 2))(
    img, txt, masks
  )
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_clip_loss_matches_numpy():
  img, txt, _ = _inputs(n=5)
  loss, metrics = losses.clip_loss(img, txt, jnp.log(1 / 0.07))
  i = np.asarray(img, np.float64)
  t = np.asarray(txt, np.float64)
  logits = (
    (1 / 0.07)
    * (i / np.linalg.norm(i, axis=1, keepdims=True))
    @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
  )
  np.testing.assert_allclose(loss, 0.5 * (_np_ce(logits) + _np_ce(logits.T)), rtol=1e-5)
  np.testing.assert_allclose(metrics["temperature"], 0.07, rtol=1e-5)


def test_clip_loss_caps_the_scale_at_100():
  img, txt, _ = _inputs(n=5)
  np.testing.assert_allclose(
    losses.clip_loss(img, txt, jnp.log(1000.0))[0],
    losses.clip_loss(img, txt, jnp.log(100.0))[0],
    rtol=1e-6,
  )


def test_siglip_loss_matches_numpy():
  img, txt, _ = _inputs(n=5)
  loss, _ = losses.siglip_loss(img, txt, jnp.log(10.0), jnp.asarray(-3.0))
  i = np.asarray(img, np.float64)
  t = np.asarray(txt, np.float64)
  logits = (
    10.0
    * (i / np.linalg.norm(i, axis=1, keepdims=True))
    @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    - 3.0
  )
  signs = 2 * np.eye(5) - 1
  expected = np.mean(np.sum(np.log1p(np.exp(-signs * logits)), axis=1))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_non_square_batch_is_rejected():
  img, txt, masks = _inputs(n=6, m=5)
  with pytest.raises(ValueError, match="one to one"):
    losses.smartclip_loss(img, txt, masks)


def test_nan_embeddings_are_not_hidden_by_the_zero_mask_guard():
  img, txt, masks = _inputs()
  img = img.at[0].set(jnp.nan)
  sim = np.asarray(losses.masked_similarity(img, txt, masks))
  assert np.isnan(sim[0, 0]) and np.isfinite(sim[1:]).all()


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_smartclip_gradients_match_the_reference_module(hard):
  """The whole loss (both alignment terms and the sparsity term) and its gradients with respect
  to the mask net's pre-sigmoid outputs and both embeddings, against the reference's own form
  in PyTorch. With hard masks this pins the sparsity gradient: an off entry gets none."""
  torch = pytest.importorskip("torch", reason="needs requirements-torch.txt")
  from smartclip_jax.models.mask import masks_from_logits
  from tests.torch_reference import smartclip_loss as reference_loss

  rng = np.random.default_rng(5)
  img = rng.normal(size=(6, 16)).astype(np.float32)
  txt = rng.normal(size=(6, 16)).astype(np.float32)
  logits = rng.normal(scale=2.0, size=(6, 16)).astype(np.float32)
  logits += np.where(logits >= 0, 0.1, -0.1).astype(np.float32)  # no entry near the threshold
  kwargs = dict(temperature=0.05, align_weight=3.0, sparsity_weight=2.0)

  def ours(img, txt, logits):
    return losses.smartclip_loss(img, txt, masks_from_logits(logits, hard), **kwargs)[0]

  loss, grads = jax.value_and_grad(ours, argnums=(0, 1, 2))(img, txt, logits)
  inputs = [torch.tensor(a, requires_grad=True) for a in (img, txt, logits)]
  want = reference_loss(*inputs, hard=hard, **kwargs)
  want.backward()
  np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
  for name, got, ref in zip(("image", "text", "mask logits"), grads, inputs):
    np.testing.assert_allclose(got, ref.grad.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
  if hard:  # the sparsity term's part: on entries only
    sparsity = jax.grad(lambda x: losses.mask_sparsity(masks_from_logits(x, True)))(logits)
    s = jax.nn.sigmoid(logits)
    np.testing.assert_allclose(sparsity, (logits >= 0) * s * (1 - s) / logits.size, rtol=1e-6)
