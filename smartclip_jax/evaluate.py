"""Retrieval evaluation with plain (unmasked) embeddings, as the paper evaluates (SMARTCLIP.md §5).

Ranks are tie-deterministic: among equal scores the lower index ranks first, exactly as a
stable sort by descending score would order them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from smartclip_jax import sharding
from smartclip_jax.data import pipeline

KS = (1, 5, 10)


def _ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based rank of column targets[q] in row q of scores [Q, C] (ties: lower index first)."""
  target = scores[np.arange(len(scores)), targets][:, None]
  columns = np.arange(scores.shape[1])[None]
  ahead = (scores > target) | ((scores == target) & (columns < targets[:, None]))
  return ahead.sum(axis=1)


def retrieval_metrics(sim: np.ndarray, text_to_image: np.ndarray,
                      ks: Sequence[int] = KS) -> dict[str, float]:
  """Recall@K in percent from similarities [images, texts].

  text -> image: a hit when the caption's image is in the top K. image -> text: a hit when
  any of the image's captions is in the top K (its best-ranked caption counts).
  """
  sim = np.asarray(sim, np.float64)
  text_to_image = np.asarray(text_to_image)
  t2i = _ranks(sim.T, text_to_image)
  # Rank of every caption within its own image's row; an image keeps its best caption.
  i2t_each = _ranks(sim[text_to_image], np.arange(len(text_to_image)))
  best_i2t = np.full(sim.shape[0], np.iinfo(np.int64).max)
  np.minimum.at(best_i2t, text_to_image, i2t_each)
  if (best_i2t == np.iinfo(np.int64).max).any():
    raise ValueError("every image needs at least one caption")
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = 100.0 * float(np.mean(best_i2t < k))
    out[f"t2i_r{k}"] = 100.0 * float(np.mean(t2i < k))
  return out


def encoders(model: nn.Module, params, mesh: Mesh) -> tuple[Callable, Callable]:
  """Jitted image and text encoders over fixed params."""
  out = sharding.replicated(mesh)
  image = jax.jit(lambda x: model.apply({"params": params}, x, method="encode_image"),
                  out_shardings=out)
  text = jax.jit(lambda t: model.apply({"params": params}, t, method="encode_text"),
                 out_shardings=out)
  return image, text


def _apply_padded(fn: Callable, inputs: np.ndarray, batch_size: int, mesh: Mesh) -> np.ndarray:
  """fn over one mesh-sharded batch, padded to `batch_size` so that shapes never change."""
  pad = batch_size - len(inputs)
  padded = np.concatenate([inputs, np.zeros((pad, *inputs.shape[1:]), inputs.dtype)])
  out = fn(jax.device_put(padded, sharding.batch_sharding(mesh)))
  return np.asarray(jax.device_get(out))[:len(inputs)]


def evaluate_heldout(config: ml_collections.ConfigDict, model: nn.Module, params,
                     mesh: Mesh) -> dict[str, float]:
  """I2T/T2I R@1/5/10 on the held-out split with full captions, masks off.

  Unusable held-out records are skipped (and reported in `skipped`), never silently.
  """
  encode_image, encode_text = encoders(model, params, mesh)
  bs = config.data.eval_batch_size
  batches, num_records = pipeline.eval_batches(config)
  images, texts = [], []
  for batch in batches:
    images.append(_apply_padded(encode_image, batch["image"], bs, mesh))
    texts.append(_apply_padded(encode_text, batch["tokens"], bs, mesh))
  img, txt = np.concatenate(images), np.concatenate(texts)
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  return {**retrieval_metrics(img @ txt.T, np.arange(len(txt))), "num_images": len(img),
          "skipped": num_records - len(img)}


def format_table(results: dict[str, float], title: str) -> str:
  """A small fixed-width table: rows I->T and T->I, columns R@K."""
  lines = [title, "        " + "".join(f"{f'R@{k}':>8}" for k in KS)]
  for name, key in (("I->T", "i2t"), ("T->I", "t2i")):
    lines.append(f"  {name:6}" + "".join(f"{results[f'{key}_r{k}']:8.1f}" for k in KS))
  return "\n".join(lines)
