"""SmartCLIP's mask network: a caption chooses which image-embedding dimensions it aligns with."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from smartclip_jax.models.layers import Dtype, ResidualAttentionBlock, param_init


def straight_through_hard(soft: jax.Array) -> jax.Array:
  """1[soft >= 0.5] forward; the gradient of `soft` backward (straight-through estimator).

  Values are exactly 0 and 1: soft + (0 - soft) is 0, and for soft >= 0.5, 1 - soft is exact.
  """
  hard = (soft >= 0.5).astype(soft.dtype)
  return soft + jax.lax.stop_gradient(hard - soft)


def masks_from_logits(logits: jax.Array, hard: bool) -> jax.Array:
  """The mask net's pooled pre-sigmoid outputs [B, D] -> masks: sigmoid, then (hard) the
  straight-through threshold at 0.5."""
  soft = jax.nn.sigmoid(logits.astype(jnp.float32))
  return straight_through_hard(soft) if hard else soft


class MaskNetwork(nn.Module):
  """Text tokens after ln_final [B, L, width] -> masks over the image embedding [B, embed_dim].

  Reads a stop-gradient copy (the mask net never trains the text tower), runs one unmasked
  residual attention block, pools tokens by learned attention scores, maps width -> embed_dim
  when they differ, then sigmoid and (by default) a hard straight-through threshold. Initialised
  as the reference initialises it (docs/method.md, initialisation): the block as OpenAI's with
  one layer, the pooling weights normal(width^-0.5) with a zero bias.
  """

  embed_dim: int
  heads: int
  hard: bool = True
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  attention: str = "auto"  # layers.ATTENTIONS

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = jax.lax.stop_gradient(tokens)
    x = ResidualAttentionBlock(
      self.heads,
      causal=False,
      activation=self.activation,
      dtype=self.dtype,
      attention=self.attention,
      name="resblocks_0",
    )(x)
    width = x.shape[-1]
    scores = nn.Dense(
      1,
      dtype=self.dtype,
      name="attn_pool",
      kernel_init=param_init(nn.initializers.normal(width**-0.5), ("embed", None)),
      bias_init=param_init(nn.initializers.zeros, (None,)),
    )(x)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=1)
    pooled = jnp.sum(weights * x.astype(jnp.float32), axis=1)
    if pooled.shape[-1] != self.embed_dim:
      pooled = nn.Dense(
        self.embed_dim,
        dtype=jnp.float32,
        name="proj",
        kernel_init=param_init(nn.initializers.lecun_normal(), ("embed", "proj")),
        bias_init=param_init(nn.initializers.zeros, ("proj",)),
      )(pooled)
    return masks_from_logits(pooled, self.hard)
