"""Embedded demo data: procedurally drawn shapes, each image with a one-sentence-per-object caption.

Record i of a split is drawn from its own generator seeded by (seed, split, i), so any record
can be produced on demand, in any order, by any process: nothing is downloaded or stored.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 190, 60),
  "blue": (50, 80, 230),
  "yellow": (235, 215, 40),
  "purple": (150, 60, 200),
  "orange": (245, 140, 30),
  "white": (240, 240, 240),
  "cyan": (40, 210, 220),
}
SIZES = {"small": 0.11, "large": 0.2}  # radius as a fraction of the image side
# A 3x3 grid of places, named the way a caption would say them.
PLACES = {
  (0, 0): "at the top left",
  (0, 1): "at the top",
  (0, 2): "at the top right",
  (1, 0): "on the left",
  (1, 1): "in the center",
  (1, 2): "on the right",
  (2, 0): "at the bottom left",
  (2, 1): "at the bottom",
  (2, 2): "at the bottom right",
}
SPLITS = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True)
class Shape:
  shape: str
  colour: str
  size: str
  cell: tuple[int, int]

  def sentence(self) -> str:
    return f"A {self.size} {self.colour} {self.shape} {PLACES[self.cell]}."


def draw_scene(rng: np.random.Generator, max_objects: int = 4) -> list[Shape]:
  """1..max_objects shapes in distinct grid cells, factors uniform at random."""
  count = int(rng.integers(1, max_objects + 1))
  cells = rng.choice(len(PLACES), size=count, replace=False)
  return [
    Shape(
      SHAPES[rng.integers(len(SHAPES))],
      list(COLOURS)[rng.integers(len(COLOURS))],
      list(SIZES)[rng.integers(len(SIZES))],
      divmod(int(c), 3),
    )
    for c in cells
  ]


def shape_mask(shape: str, cell: tuple[int, int], radius: float, size: int) -> np.ndarray:
  """bool [size, size]: the pixels of `shape` centred in grid `cell`, radius a fraction of
  the image side."""
  y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
  cy, cx = (np.asarray(cell) + 0.5) / 3
  dy, dx = y - cy, x - cx
  if shape == "circle":
    return dx**2 + dy**2 <= radius**2
  if shape == "square":
    return np.maximum(abs(dx), abs(dy)) <= radius * 0.85
  if shape == "triangle":
    return (dy <= radius * 0.8) & (dy >= -radius) & (abs(dx) <= (dy + radius) * 0.6)
  if shape == "diamond":
    return abs(dx) + abs(dy) <= radius
  raise ValueError(f"unknown shape {shape!r}")


def background(size: int, rng: np.random.Generator) -> np.ndarray:
  """float [size, size, 3]: dark noise that every scene is drawn on."""
  return rng.normal(40, 8, (size, size, 3))


def render(shapes: list[Shape], size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, 3]: noisy dark background with each shape filled in its colour."""
  image = background(size, rng)
  for s in shapes:
    image[shape_mask(s.shape, s.cell, SIZES[s.size], size)] = COLOURS[s.colour]
  return np.clip(image, 0, 255).astype(np.uint8)


class DemoSource:
  """A Grain random-access source of {"id", "image": uint8 [H, W, 3], "caption": str} records."""

  def __init__(
    self,
    num_records: int,
    image_size: int,
    seed: int = 0,
    split: str = "train",
    max_objects: int = 4,
  ):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    self.num_records, self.image_size = num_records, image_size
    self.seed, self.split, self.max_objects = seed, split, max_objects

  def __len__(self) -> int:
    return self.num_records

  def scene(self, index: int) -> tuple[list[Shape], np.random.Generator]:
    if not 0 <= index < self.num_records:
      raise IndexError(f"record {index} of {self.num_records}")
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    return draw_scene(rng, self.max_objects), rng

  def __getitem__(self, index: int) -> dict:
    shapes, rng = self.scene(int(index))
    return {
      "id": f"{self.split}-{index}",
      "image": render(shapes, self.image_size, rng),
      "caption": " ".join(s.sentence() for s in shapes),
    }

  def __repr__(self) -> str:  # Grain logs sources by repr.
    return (
      f"DemoSource(num_records={self.num_records}, image_size={self.image_size}, "
      f"seed={self.seed}, split={self.split!r})"
    )
