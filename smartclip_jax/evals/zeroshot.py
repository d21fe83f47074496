"""Zero-shot classification: a class is the mean of its prompt embeddings (CLIP's protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from smartclip_jax.evals import retrieval
from smartclip_jax.evals.encoder import Encoder


def class_embeddings(
  encoder: Encoder, classnames: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
  """[classes, D], unit rows: every template filled with the class name, embedded,
  normalised, averaged over templates and normalised again."""
  prompts = [t.format(c) for c in classnames for t in templates]
  emb = retrieval.normalize(encoder.texts(prompts)[0])
  return retrieval.normalize(emb.reshape(len(classnames), len(templates), -1).mean(axis=1))


def accuracy(
  img_emb: np.ndarray,
  cls_emb: np.ndarray,
  labels: np.ndarray,
  mesh: Mesh | None = None,
  ks: Sequence[int] = (1, 5),
) -> tuple[dict, np.ndarray]:
  """Top-k accuracy in percent (`top1`, `top5`) and the rank of the true class per image
  (ties: the lower class index first, as in retrieval)."""
  rank = retrieval.ranks(retrieval.normalize(img_emb), cls_emb, labels, mesh)
  return {f"top{k}": 100.0 * float(np.mean(rank < k)) for k in ks}, rank
