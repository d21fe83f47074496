"""The planted-structure experiment (results/planted): the loss's pull on mask entries, the
scores it reports, and its quick run's outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smartclip_jax import losses
from smartclip_jax.experiments import planted


@pytest.mark.parametrize("seed", [0, 1])
def test_at_a_random_half_mask_named_dims_that_are_off_are_pulled_on_and_others_are_not(seed):
  rng = np.random.default_rng(seed)
  ex = planted.World(seed).examples(rng, 256, 12)
  on = rng.random((256, planted.DIM)) < 0.5
  named = planted.concept_dims(ex["named"])
  z, t = (jnp.asarray(ex[k], jnp.float32) for k in "zt")
  g = np.asarray(jax.grad(lambda m: losses.smartclip_loss(z, t, m)[0])(jnp.asarray(on, float)))
  named_off, other_off = g[named & ~on], g[~named & ~on]
  assert named_off.mean() < 0 and (named_off < 0).mean() > 0.7  # descent turns them on
  assert abs(other_off.mean()) < 0.01 * abs(named_off.mean())  # no pull either way
  assert 0.4 < (other_off < 0).mean() < 0.6


def test_scores_of_ideal_constant_and_empty_masks():
  named = np.zeros((4, planted.CONCEPTS), bool)
  named[[0, 1, 2, 3], [0, 1, 2, 2]] = True
  named[3, 5] = True  # a two-concept caption
  ideal = planted.scores(planted.concept_dims(named).astype(float), named)
  assert ideal["recall"] == 1 and ideal["false_on"] == 0 and ideal["jaccard"] == 0
  assert ideal["size_by_named"]["1"] == 8 and ideal["size_by_named"]["2"] == 16
  full = planted.scores(np.ones((4, planted.DIM)), named)
  assert full["recall"] == 1 and full["false_on"] == 1 and full["jaccard"] == 1
  assert planted.jaccard(np.zeros((2, 3), bool)).tolist() == [[1, 1], [1, 1]]


def test_captions_name_a_prefix_of_the_concepts_their_image_holds():
  ex = planted.World(0).examples(np.random.default_rng(0), 64, 12)
  held = np.abs(ex["z"]).reshape(64, planted.CONCEPTS, planted.BLOCK).mean(-1) > 0.2
  assert (held.sum(1) == planted.PER_IMAGE).all() and (ex["named"] <= held).all()
  assert set(ex["named"].sum(1)) == {1, 2, 3}
  text_blocks = np.abs(ex["t"]).reshape(64, planted.CONCEPTS, planted.BLOCK).mean(-1) > 0.2
  np.testing.assert_array_equal(text_blocks, ex["named"])
  tokens = ex["tokens"]
  np.testing.assert_allclose(tokens.mean(-1), 0, atol=1e-6)
  np.testing.assert_allclose(tokens.std(-1), 1, atol=1e-6)


@pytest.mark.slow
def test_the_quick_run_writes_every_output_and_the_shuffled_control_fails(tmp_path):
  results = planted.run(tmp_path, workers=1, **planted.QUICK_RUN)
  names = {p.name for p in tmp_path.iterdir()}
  assert {"results.json", "table.md", "scores.png", "masks_B_planted.png"} <= names
  assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
  b = results["summary"]["B"]
  assert b["planted"]["false_on"][0] < 0.2 < 0.5 < b["shuffled"]["false_on"][0]
