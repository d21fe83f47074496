"""CLIP's ViT image tower: patch conv, class token, positions, ln_pre, blocks, ln_post, proj."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smartclip_jax.models.layers import Tower, layer_norm, param_init

log = logging.getLogger("smartclip_jax")


def resample_positions(table: np.ndarray | jax.Array, new_rows: int) -> jax.Array:
  """An image position table [1 + g*g, width] for another patch grid, [new_rows, width]: the class
  token's row kept, the g x g grid resampled to g' x g' bicubically, as open_clip's
  `resize_pos_embed` (torch's bicubic with antialias, align_corners=False) and big_vision do when
  a model is fine-tuned at another resolution. `jax.image.resize`'s antialiased Keys cubic
  (a = -0.5) is that kernel (tests/test_interop.py pins it against torch)."""
  table = jnp.asarray(table)
  grid, new_grid = (round((n - 1) ** 0.5) for n in (table.shape[0], new_rows))
  if grid * grid + 1 != table.shape[0] or new_grid * new_grid + 1 != new_rows:
    raise ValueError(
      f"cannot resample {table.shape[0]} image positions to {new_rows}: both must be a class "
      "token and a square patch grid (1 + g * g rows)"
    )
  log.info(
    "image positions resampled from a %dx%d patch grid to %dx%d", grid, grid, new_grid, new_grid
  )
  width = table.shape[1]
  cells = table[1:].reshape(grid, grid, width).astype(jnp.float32)
  cells = jax.image.resize(cells, (new_grid, new_grid, width), "bicubic")
  return jnp.concatenate([table[:1], cells.reshape(-1, width).astype(table.dtype)], axis=0)


PATCH_DROPOUT_RNG = "patch_dropout"  # the rng stream a training forward pass is given


def kept_patches(patches: int, rate: float) -> int:
  """Patches each image keeps when `rate` of them are dropped (at least one)."""
  return max(1, int(patches * (1.0 - rate)))


def drop_patches(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """FLIP's patch dropout, as open_clip's: tokens [B, 1 + N, W] -> [B, 1 + n, W], the class
  token kept and each image keeping its own random `kept_patches(N, rate)` patches (in the
  order of a random ranking; positions were added before, so the order does not matter)."""
  cls, patches = x[:, :1], x[:, 1:]
  keep = kept_patches(patches.shape[1], rate)
  scores = jax.random.uniform(rng, patches.shape[:2])
  _, idx = jax.lax.top_k(scores, keep)
  return jnp.concatenate([cls, jnp.take_along_axis(patches, idx[..., None], axis=1)], axis=1)


class VisionTransformer(Tower):
  """Images [B, H, W, 3] (CLIP-normalised) -> unnormalised embeddings [B, embed_dim].

  `patch_dropout`: the fraction of patches dropped in a training forward pass (`train=True`,
  given a `PATCH_DROPOUT_RNG` stream), after the positions are added; evaluation sees all."""

  image_size: int = 224
  patch_size: int = 16
  patch_dropout: float = 0.0

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch_size}")
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"expected {self.image_size}px images, got shape {images.shape}")
    scale = self.width**-0.5
    x = nn.Conv(
      self.width,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
      name="conv1",
      kernel_init=param_init(nn.initializers.lecun_normal(), (None, None, None, "embed")),
    )(images)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param(
      "class_embedding", param_init(nn.initializers.normal(scale), ("embed",)), (self.width,)
    )
    pos = self.param(
      "positional_embedding",
      param_init(nn.initializers.normal(scale), (None, "embed")),
      (x.shape[1] + 1, self.width),
    )
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
    if train and self.patch_dropout > 0:
      x = drop_patches(x, self.patch_dropout, self.make_rng(PATCH_DROPOUT_RNG))
    x = layer_norm("ln_pre", self.dtype)(x)
    x = self.transformer(causal=False)(x)
    x = layer_norm("ln_post", self.dtype)(x[:, 0])
    proj = self.param(
      "proj",
      param_init(nn.initializers.normal(scale), ("embed", "proj")),
      (self.width, self.embed_dim),
    )
    return x @ proj.astype(x.dtype)
