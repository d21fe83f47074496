"""CLIP's causal text tower and Long-CLIP's stretch of its position table (docs/method.md, the
model)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smartclip_jax.models.layers import Tower, layer_norm, param_init

KEEP_POSITIONS = 20  # Long-CLIP keeps CLIP's first 20 positions as trained, and frozen.


def stretch_positions(
  table: np.ndarray | jax.Array, new_length: int = 248, keep: int = KEEP_POSITIONS
) -> jax.Array:
  """Stretches a [L, width] position table to `new_length` rows, Long-CLIP style.

  Rows < `keep` are copied. Row keep + f*i + r (r < f) interpolates linearly between old rows
  keep + i and keep + i + 1 at fraction r/f, where f = (new_length - keep) / (L - keep) must be
  whole (77 -> 248 gives f = 4). The last f rows continue the final row's slope past it.
  """
  table = jnp.asarray(table)
  length = table.shape[0]
  factor, rest = divmod(new_length - keep, length - keep)
  if rest or factor < 1 or length - keep < 2:
    raise ValueError(
      f"cannot stretch {length} positions to {new_length} keeping {keep}: "
      "(new_length - keep) must be a whole multiple of (length - keep)"
    )
  source = keep + np.arange(new_length - keep) / factor  # fractional old row of each new row
  lo = np.minimum(np.floor(source).astype(int), length - 2)  # the last rows extrapolate
  frac = jnp.asarray(source - lo, table.dtype)[:, None]
  stretched = table[lo] + frac * (table[lo + 1] - table[lo])
  return jnp.concatenate([table[:keep], stretched], axis=0)


class TextTransformer(Tower):
  """Tokens [B, L] -> (unnormalised embedding [B, embed_dim], ln_final tokens [B, L, width]).

  The pooled token is the end-of-text token, found as the highest id in each row as CLIP does.
  """

  context_length: int = 77
  vocab_size: int = 49408

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    if tokens.shape[1] > self.context_length:  # fewer: padding cut (pipeline.text_length)
      raise ValueError(
        f"expected at most {self.context_length} tokens per caption, got {tokens.shape}"
      )
    x = nn.Embed(
      self.vocab_size,
      self.width,
      dtype=self.dtype,
      name="token_embedding",
      embedding_init=param_init(nn.initializers.normal(0.02), ("vocab", "embed")),
    )(tokens)
    pos = self.param(
      "positional_embedding",
      param_init(nn.initializers.normal(0.01), (None, "embed")),
      (self.context_length, self.width),
    )
    x = x + pos[: tokens.shape[1]].astype(x.dtype)
    x = self.transformer(causal=True)(x)
    x = layer_norm("ln_final", self.dtype)(x)
    pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
    proj = self.param(
      "text_projection",
      param_init(nn.initializers.normal(self.width**-0.5), ("embed", "proj")),
      (self.width, self.embed_dim),
    )
    return pooled @ proj.astype(x.dtype), x
