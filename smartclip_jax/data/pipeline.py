"""Grain pipelines: records -> (normalised image, tokenised caption) -> per-process batches.

Each process reads a disjoint slice of the source; its batches of `batch_size / processes`
records are assembled into global arrays by the train loop. The train iterator's state is
checkpointable (Grain's `get_state`), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import grain
import jax
import ml_collections
import numpy as np

from smartclip_jax.data.captions import sample_caption
from smartclip_jax.data.demo import DemoSource
from smartclip_jax.tokenizer import tokenize

# OpenAI CLIP's image normalisation (RGB in [0, 1]).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32, CLIP mean/std normalised."""
  return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def make_source(config: ml_collections.ConfigDict, split: str) -> DemoSource:
  d = config.data
  if d.name != "demo":
    raise ValueError(f"data.name={d.name!r}: only the embedded 'demo' data exists so far")
  num = d.num_train if split == "train" else d.num_eval
  return DemoSource(num, config.model.vision.image_size, seed=config.seed, split=split)


class _Featurize(grain.transforms.RandomMap):
  """Samples the caption (prefix / first / full), tokenises it and normalises the image."""

  def __init__(self, mode: str, context_length: int):
    self.mode, self.context_length = mode, context_length

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    caption = sample_caption(record["caption"], self.mode, rng)
    return {"image": normalize_image(record["image"]),
            "tokens": tokenize(caption, self.context_length)[0]}


def local_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"batch {global_batch} does not split over {jax.process_count()} processes")
  return global_batch // jax.process_count()


def train_iterator(config: ml_collections.ConfigDict) -> grain.DatasetIterator:
  """Endless, per-epoch reshuffled, process-sharded batches of the train split."""
  ds = grain.MapDataset.source(make_source(config, "train"))
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.shuffle(seed=config.seed).repeat()
  ds = ds.random_map(_Featurize(config.data.caption_mode, config.model.text.context_length),
                     seed=config.seed)
  ds = ds.batch(local_batch_size(config.batch_size), drop_remainder=True)
  iter_ds = ds.to_iter_dataset()
  if config.data.num_workers > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return iter(iter_ds)


def eval_records(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """The whole held-out split with full captions: images float32 [N, H, W, 3], tokens [N, L]."""
  source = make_source(config, "eval")
  records = [source[i] for i in range(len(source))]
  images = np.stack([normalize_image(r["image"]) for r in records])
  tokens = tokenize([r["caption"] for r in records], config.model.text.context_length)
  return images, tokens
