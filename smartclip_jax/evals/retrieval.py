"""Image-text retrieval recall, exact and memory-bounded (docs/method.md, evaluation protocols).

Similarities are computed a chunk of queries at a time (the chunk split over the mesh's batch
axes, the keys replicated), so no more than `chunk` x keys scores exist at once: 25k COCO
captions x 5k images never become one matrix. Ties are broken deterministically: among equal
scores the lower index ranks first, exactly as a stable sort by descending score orders them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from smartclip_jax import losses, sharding

KS = (1, 5, 10)


def _chunk_ranks(
  queries: jax.Array, keys: jax.Array, targets: jax.Array, masks: jax.Array | None, masked: str
) -> jax.Array:
  if masked == "queries":  # queries are captions with their masks, keys images
    scores = losses.masked_similarity(keys, queries, masks).T
  elif masked == "keys":  # keys are captions with their masks, queries images
    scores = losses.masked_similarity(queries, keys, masks)
  else:
    scores = jnp.matmul(queries, keys.T, precision=jax.lax.Precision.HIGHEST)
  target = jnp.take_along_axis(scores, targets[:, None], axis=1)
  index = jnp.arange(keys.shape[0])[None]
  ahead = (scores > target) | ((scores == target) & (index < targets[:, None]))
  return ahead.sum(axis=1, dtype=jnp.int32)


def ranks(
  queries: np.ndarray,
  keys: np.ndarray,
  targets: np.ndarray,
  mesh: Mesh | None = None,
  chunk: int = 1024,
  query_masks: np.ndarray | None = None,
  key_masks: np.ndarray | None = None,
) -> np.ndarray:
  """0-based rank of `keys[targets[q]]` among all keys by score with `queries[q]` (ties: the
  lower key index first), for every query q. Scores are dot products, or SmartCLIP's masked
  similarity when the caption side (queries or keys) comes with its masks."""
  queries, keys = np.asarray(queries, np.float32), np.asarray(keys, np.float32)
  targets = np.asarray(targets, np.int32)
  mesh = mesh or sharding.data_mesh()
  parts = sharding.data_parallel_size(mesh)
  chunk = -(-min(chunk, max(len(queries), 1)) // parts) * parts  # whole rows per device
  rep = sharding.replicated(mesh)
  # Ranks come back replicated: every process can read them (a multi-process run included).
  chunk_ranks = jax.jit(_chunk_ranks, static_argnames="masked", out_shardings=rep)
  keys_dev = jax.device_put(keys, rep)
  masked = "queries" if query_masks is not None else "keys" if key_masks is not None else ""
  key_masks_dev = (
    None if key_masks is None else jax.device_put(np.asarray(key_masks, np.float32), rep)
  )
  out = np.empty(len(queries), np.int64)
  for start in range(0, len(queries), chunk):
    stop = min(start + chunk, len(queries))
    rows = slice(start, stop)  # padded to `chunk` rows: one shape, one compilation
    masks = (
      sharding.put_padded(np.asarray(query_masks, np.float32)[rows], chunk, mesh)
      if masked == "queries"
      else key_masks_dev
    )
    got = chunk_ranks(
      sharding.put_padded(queries[rows], chunk, mesh),
      keys_dev,
      sharding.put_padded(targets[rows], chunk, mesh),
      masks,
      masked,
    )
    out[start:stop] = np.asarray(got)[: stop - start]
  return out


def retrieval_ranks(
  img_emb: np.ndarray,
  txt_emb: np.ndarray,
  text_to_image: Sequence[int],
  mesh: Mesh | None = None,
  chunk: int = 1024,
  masks: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Per-query ranks. `t2i`: of each caption's image among all images. `i2t`: of each image's
  best-ranked caption among all captions (any of its captions counts as a hit). With `masks`
  (one per caption), pairs are scored with the caption's mask on the image embedding."""
  text_to_image = np.asarray(text_to_image, np.int64)
  if len(img_emb) and np.bincount(text_to_image, minlength=len(img_emb)).min() == 0:
    raise ValueError("every image needs at least one caption")
  img_emb, txt_emb = np.asarray(img_emb, np.float32), np.asarray(txt_emb, np.float32)
  t2i = ranks(txt_emb, img_emb, text_to_image, mesh, chunk, query_masks=masks)
  each = ranks(
    img_emb[text_to_image], txt_emb, np.arange(len(txt_emb)), mesh, chunk, key_masks=masks
  )
  i2t = np.full(len(img_emb), np.iinfo(np.int64).max)
  np.minimum.at(i2t, text_to_image, each)
  return {"i2t": i2t, "t2i": t2i}


def recalls(rank: dict[str, np.ndarray], ks: Sequence[int] = KS) -> dict[str, float]:
  """R@K in percent for both directions, and their mean (`mean_recall`)."""
  out = {f"{d}_r{k}": 100.0 * float(np.mean(rank[d] < k)) for d in ("i2t", "t2i") for k in ks}
  out["mean_recall"] = float(np.mean(list(out.values())))
  return out


def normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length (cosine similarity as a dot product)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
