"""Recall@K against a brute-force oracle built on a stable sort."""

import numpy as np

from smartclip_jax.evaluate import retrieval_metrics


def oracle(sim, text_to_image, ks=(1, 5, 10)):
  n_img, n_txt = sim.shape
  out = {}
  for k in ks:
    t2i = [text_to_image[t] in np.argsort(-sim[:, t], kind="stable")[:k] for t in range(n_txt)]
    i2t = []
    for i in range(n_img):
      top = np.argsort(-sim[i], kind="stable")[:k]
      i2t.append(any(text_to_image[t] == i for t in top))
    out[f"i2t_r{k}"] = 100.0 * np.mean(i2t)
    out[f"t2i_r{k}"] = 100.0 * np.mean(t2i)
  return out


def test_recall_matches_oracle_with_ties_and_several_captions_per_image():
  rng = np.random.default_rng(0)
  n_img, per = 30, 3
  text_to_image = np.repeat(np.arange(n_img), per)
  rng.shuffle(text_to_image)
  sim = rng.integers(0, 4, size=(n_img, n_img * per)).astype(np.float32)  # many ties
  assert retrieval_metrics(sim, text_to_image) == oracle(sim, text_to_image)


def test_perfect_and_reversed_embeddings():
  sim = np.eye(12)
  assert all(v == 100.0 for v in retrieval_metrics(sim, np.arange(12)).values())
  assert retrieval_metrics(-sim, np.arange(12))["t2i_r10"] == 0.0
