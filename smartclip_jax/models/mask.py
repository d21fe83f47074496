"""SmartCLIP's mask network: a caption chooses which image-embedding dimensions it aligns with."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from smartclip_jax.models.layers import Dtype, ResidualAttentionBlock, param_init


def straight_through_hard(soft: jax.Array) -> jax.Array:
  """1[soft >= 0.5] forward; the gradient of `soft` backward (straight-through estimator)."""
  hard = (soft >= 0.5).astype(soft.dtype)
  return soft + jax.lax.stop_gradient(hard - soft)


class MaskNetwork(nn.Module):
  """Text tokens after ln_final [B, L, width] -> masks over the image embedding [B, embed_dim].

  Reads a stop-gradient copy (the mask net never trains the text tower), runs one unmasked
  residual attention block, pools tokens by learned attention scores, maps width -> embed_dim
  when they differ, then sigmoid and (by default) a hard straight-through threshold.
  """
  embed_dim: int
  heads: int
  hard: bool = True
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = jax.lax.stop_gradient(tokens)
    x = ResidualAttentionBlock(self.heads, causal=False, activation=self.activation,
                               dtype=self.dtype, name="resblocks_0")(x)
    scores = nn.Dense(1, dtype=self.dtype, name="attn_pool",
                      kernel_init=param_init(nn.initializers.lecun_normal(), ("embed", None)),
                      bias_init=param_init(nn.initializers.zeros, (None,)))(x)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=1)
    pooled = jnp.sum(weights * x.astype(jnp.float32), axis=1)
    if pooled.shape[-1] != self.embed_dim:
      pooled = nn.Dense(self.embed_dim, dtype=jnp.float32, name="proj",
                        kernel_init=param_init(nn.initializers.lecun_normal(), ("embed", "proj")),
                        bias_init=param_init(nn.initializers.zeros, ("proj",)))(pooled)
    soft = jax.nn.sigmoid(pooled.astype(jnp.float32))
    return straight_through_hard(soft) if self.hard else soft
