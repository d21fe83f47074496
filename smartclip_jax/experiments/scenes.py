"""Scenes for the partial-captions experiment: 2-5 objects, five factors each, one sentence each
(the identification experiment draws one object per scene).

An extension of the demo data (`data/demo.py`: its shapes, colours, sizes and 3x3 places) with a
fifth factor, texture. Scene i of a split comes from a generator seeded by (seed, split, i), so
the data is a pure function of its arguments: the same on every machine and every run.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from smartclip_jax.data import demo
from smartclip_jax.tokenizer import get_tokenizer

SHAPES = demo.SHAPES
COLOURS = tuple(demo.COLOURS)
SIZES = tuple(demo.SIZES)
TEXTURES = ("solid", "striped", "hollow")
PLACES = demo.PLACES
FACTORS = ("shape", "colour", "size", "texture", "place")
VALUES = {  # every factor's values, as `Thing.value` says them
  "shape": SHAPES,
  "colour": COLOURS,
  "size": SIZES,
  "texture": TEXTURES,
  "place": tuple(PLACES.values()),
}
FACTOR_VALUES = tuple((f, v) for f in FACTORS for v in VALUES[f])  # (factor, value), all 26
SPLITS = {"train": 0, "test": 1, "pretrain": 2}


@dataclasses.dataclass(frozen=True)
class Thing(demo.Shape):
  """A demo shape with a texture."""

  texture: str = "solid"

  def sentence(self) -> str:
    return f"A {self.size} {self.colour} {self.texture} {self.shape} {PLACES[self.cell]}."

  def value(self, factor: str) -> str:
    """The object's value of one of `FACTORS` as a caption says it."""
    return PLACES[self.cell] if factor == "place" else getattr(self, factor)


def draw(rng: np.random.Generator, min_objects: int = 2, max_objects: int = 5) -> list[Thing]:
  """min..max objects in distinct cells, every factor uniform; the list order is the caption's
  sentence order, which is therefore random with respect to place."""
  count = int(rng.integers(min_objects, max_objects + 1))
  cells = rng.choice(len(PLACES), size=count, replace=False)
  return [
    Thing(
      SHAPES[rng.integers(len(SHAPES))],
      COLOURS[rng.integers(len(COLOURS))],
      SIZES[rng.integers(len(SIZES))],
      divmod(int(c), 3),
      TEXTURES[rng.integers(len(TEXTURES))],
    )
    for c in cells
  ]


def render(things: list[Thing], size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, 3]. Textures: solid fill; horizontal stripes two pixels apart; hollow,
  an outline about two pixels wide."""
  image = demo.background(size, rng)
  rows = np.arange(size)[:, None]
  for t in things:
    radius = demo.SIZES[t.size]
    inside = demo.shape_mask(t.shape, t.cell, radius, size)
    if t.texture == "striped":
      inside &= (rows // 2) % 2 == 0
    elif t.texture == "hollow":
      inside &= ~demo.shape_mask(t.shape, t.cell, radius - 2.0 / size, size)
    image[inside] = demo.COLOURS[t.colour]
  return np.clip(image, 0, 255).astype(np.uint8)


@dataclasses.dataclass
class Split:
  """A whole split in memory: images uint8 [N, S, S, 3], each scene's objects, and each
  object's sentence as token ids (no start/end tokens) for building captions fast."""

  images: np.ndarray
  scenes: list[list[Thing]]
  sentence_ids: list[list[list[int]]]


def make_split(
  num: int, image_size: int, seed: int, split: str, objects: tuple[int, int] = (2, 5)
) -> Split:
  """`num` scenes of objects[0]..objects[1] objects each (`draw`)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
  encode = get_tokenizer().encode
  images = np.zeros((num, image_size, image_size, 3), np.uint8)
  scenes, ids = [], []
  for i in range(num):
    rng = np.random.default_rng([seed, SPLITS[split], i])
    things = draw(rng, *objects)
    images[i] = render(things, image_size, rng)
    scenes.append(things)
    ids.append([encode(t.sentence()) for t in things])
  return Split(images, scenes, ids)


def caption_tokens(sentences: list[list[int]], context_length: int) -> np.ndarray:
  """int32 [context_length]: start, the sentences' ids in order, end, zeros; the same ids as
  tokenising the sentences joined by spaces (the tokenizer splits at spaces and punctuation)."""
  tok = get_tokenizer()
  ids = [tok.sot_id, *(i for s in sentences for i in s), tok.eot_id]
  if len(ids) > context_length:
    raise ValueError(f"a caption of {len(ids)} tokens exceeds the context of {context_length}")
  out = np.zeros(context_length, np.int32)
  out[: len(ids)] = ids
  return out


def sample_sentences(n: int, mode: str, rng: np.random.Generator) -> list[int]:
  """Which of a scene's n sentences a training caption keeps, in caption order. `full`: all;
  `prefix`: the first k, k ~ U[1, n] (the paper's sampler); `subset`: each sentence with
  probability 1/2, one drawn at random kept if none was."""
  if mode == "full":
    return list(range(n))
  if mode == "prefix":
    return list(range(int(rng.integers(1, n + 1))))
  if mode == "subset":
    keep = np.flatnonzero(rng.random(n) < 0.5)
    return [int(i) for i in keep] if len(keep) else [int(rng.integers(n))]
  raise ValueError(f"unknown caption mode {mode!r} (full, prefix, subset)")
