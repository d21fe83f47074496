"""Turning raw records into model inputs, and naming why a record cannot be used.

A raw record is a dict with `id`, `caption` (str, or bytes to be read as UTF-8) and `image`
(encoded bytes, or a uint8 [H, W, 3] array), or with `error` already set by its source (a
missing file). Every failure has one of `REASONS`; the pipeline and the prepare CLI count them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import PIL.Image

# Why a record was skipped; the order is the order of the counts in batches and summaries.
REASONS = (
  "missing_file",
  "undecodable_image",
  "empty_caption",
  "invalid_text",
  "too_small",
  "too_large",
  "no_image",  # a WebDataset sample without an image member
  "no_caption",  # ... without its .txt (or the JSON field asked for)
  "truncated_archive",  # the sample a tar file was cut off in (what follows is unreadable)
  "unreadable_record",  # reading or decoding it raised anything else (a corrupt shard chunk, ...)
)
# The image formats a record may hold. Pillow would otherwise also open EPS/PS (by running
# Ghostscript on the record's bytes) and dozens of other formats: only raster formats are read.
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG reads MPO too
PIL.Image.init()  # registers every plugin, so that each of RASTER_FORMATS is known by name

# OpenAI CLIP's image normalisation (RGB in [0, 1]).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class BadRecord(ValueError):
  """A record that cannot be used; `reason` is one of REASONS."""

  @classmethod
  def unreadable(cls, error: Exception) -> BadRecord:
    """Any other exception met reading or decoding a record, as a bad record naming it."""
    return cls("unreadable_record", f"{type(error).__name__}: {error}")

  def __init__(self, reason: str, detail: str = ""):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason

  def as_record(self, record_id: str) -> dict:
    """The error record that takes a bad record's place in the pipeline."""
    return {"error": self.reason, "id": record_id, "detail": str(self)}


def read_caption(caption: str | bytes) -> str:
  """The caption as clean text; bytes must be UTF-8; blank captions are bad records."""
  if isinstance(caption, bytes):
    try:
      caption = caption.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord("invalid_text", str(e)) from None
  if not isinstance(caption, str):
    raise BadRecord("invalid_text", f"caption of type {type(caption).__name__}")
  if "\ufffd" in caption or "\x00" in caption:
    raise BadRecord("invalid_text", "replacement or NUL characters in caption")
  caption = caption.strip()
  if not caption:
    raise BadRecord("empty_caption")
  return caption


def decode_image(data: bytes | np.ndarray, min_side: int, max_pixels: int) -> PIL.Image.Image:
  """An RGB PIL image from encoded bytes (`RASTER_FORMATS`) or a uint8 array.

  Grayscale, CMYK, palette and alpha images are converted to RGB (alpha composited on white).
  The size is checked from the header before pixels are decoded, so a huge image costs nothing.
  """
  if isinstance(data, np.ndarray):
    image = PIL.Image.fromarray(data.astype(np.uint8)).convert("RGB")
  else:
    if not data:
      raise BadRecord("undecodable_image", "zero bytes")
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        image = PIL.Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
    except PIL.Image.DecompressionBombError as e:  # PIL's own limit, from the header
      raise BadRecord("too_large", str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:
      raise BadRecord("undecodable_image", f"{type(e).__name__}: {e}") from None
  width, height = image.size
  if width * height > max_pixels:
    raise BadRecord("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
  if min(width, height) < min_side:
    raise BadRecord("too_small", f"{width}x{height} is below {min_side} px")
  try:
    image.load()
  except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt pixel data
    raise BadRecord("undecodable_image", f"{type(e).__name__}: {e}") from None
  if image.mode == "RGB":
    return image
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def random_resized_crop(
  image: PIL.Image.Image,
  size: int,
  scale: tuple[float, float],
  ratio: tuple[float, float],
  rng: np.random.Generator,
) -> np.ndarray:
  """A random crop of `scale` x the area and aspect `ratio`, resized to size x size (bicubic).

  Ten tries to fit the crop inside the image, then a centre crop, as torchvision does.
  """
  width, height = image.size
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      x0 = int(rng.integers(0, width - w + 1))
      y0 = int(rng.integers(0, height - h + 1))
      return _resize(image, size, (x0, y0, x0 + w, y0 + h))
  side = min(width, height)
  return _resize(image, size, _centre_box(width, height, side))


def centre_crop(image: PIL.Image.Image, size: int) -> np.ndarray:
  """CLIP's evaluation transform, as torchvision's Resize(size, bicubic) + CenterCrop(size) do
  it: the shorter side resized to `size` (the longer to int(size * long / short)), then the
  centre size x size, its offset rounded half to even. The reference trains with it too."""
  width, height = image.size
  short, long = min(width, height), max(width, height)
  scaled = (size, int(size * long / short))
  new_w, new_h = scaled if width <= height else scaled[::-1]
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), PIL.Image.Resampling.BICUBIC)
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))


def _centre_box(width: int, height: int, side: int) -> tuple[int, int, int, int]:
  x0, y0 = (width - side) // 2, (height - side) // 2
  return x0, y0, x0 + side, y0 + side


def _resize(image: PIL.Image.Image, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
  return np.asarray(image.resize((size, size), PIL.Image.Resampling.BICUBIC, box=box))


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32, CLIP mean/std normalised."""
  return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
