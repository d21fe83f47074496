"""The two-tower model: image tower, text tower, optional mask network, learned logit scale/bias.

One module serves the CLIP, SigLIP and SmartCLIP losses; `build_model` reads `config.model`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from smartclip_jax.models.layers import Dtype
from smartclip_jax.models.mask import MaskNetwork
from smartclip_jax.models.text import TextTransformer
from smartclip_jax.models.vit import VisionTransformer

CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial log logit scale (temperature 0.07)


class TwoTowers(nn.Module):
  """Params: `visual`, `text`, `mask_net` (if `use_mask_net`), `logit_scale` (+ `logit_bias`)."""

  vision: dict
  text: dict
  embed_dim: int
  activation: str = "quick_gelu"
  use_mask_net: bool = False
  mask_heads: int = 8
  mask_hard: bool = True
  init_logit_scale: float = CLIP_LOGIT_SCALE
  init_logit_bias: float | None = None
  dtype: Dtype = jnp.float32
  attention: str = "auto"  # layers.ATTENTIONS

  def setup(self):
    common = dict(
      embed_dim=self.embed_dim,
      activation=self.activation,
      dtype=self.dtype,
      attention=self.attention,
    )
    self.visual = VisionTransformer(**self.vision, **common)
    self.text_tower = TextTransformer(**self.text, **common, name="text")
    if self.use_mask_net:
      self.mask_net = MaskNetwork(heads=self.mask_heads, hard=self.mask_hard, **common)
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(self.init_logit_scale), ()
    )
    if self.init_logit_bias is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.init_logit_bias), ())

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Unnormalised image embeddings [B, D] (float32); `train`: with patch dropout."""
    return self.visual(images, train).astype(jnp.float32)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """Unnormalised text embeddings [B, D] (float32)."""
    return self.text_tower(tokens)[0].astype(jnp.float32)

  def text_masks(self, tokens: jax.Array) -> jax.Array:
    """Each caption's mask over the image embedding [B, D] (SmartCLIP models only)."""
    return self.mask_net(self.text_tower(tokens)[1])

  def __call__(
    self, images: jax.Array, tokens: jax.Array, train: bool = False
  ) -> dict[str, jax.Array]:
    """Everything a loss needs: embeddings, masks when present, scale and bias. `train`: the
    train step's pass (patch dropout, which needs a `vit.PATCH_DROPOUT_RNG` stream)."""
    txt_emb, txt_tokens = self.text_tower(tokens)
    out = {
      "img_emb": self.encode_image(images, train),
      "txt_emb": txt_emb.astype(jnp.float32),
      "logit_scale": self.logit_scale,
    }
    if self.use_mask_net:
      out["masks"] = self.mask_net(txt_tokens)
    if self.init_logit_bias is not None:
      out["logit_bias"] = self.logit_bias
    return out


def build_model(config: ml_collections.ConfigDict) -> TwoTowers:
  """The model `config.model` describes: towers, and the mask net, scale and bias it names."""
  m = config.model
  tower = lambda c, *fields: {
    **{f: c[f] for f in (*fields, "width", "layers", "heads")},
    "remat": m.remat,
    "scan": m.scan_layers,
  }
  return TwoTowers(
    vision={**tower(m.vision, "image_size", "patch_size"), "patch_dropout": m.patch_dropout},
    text=tower(m.text, "context_length", "vocab_size"),
    embed_dim=m.embed_dim,
    activation=m.activation,
    use_mask_net=m.mask_net,
    mask_heads=m.mask.heads,
    mask_hard=m.mask.hard,
    init_logit_scale=m.logit_scale_init,
    init_logit_bias=m.logit_bias_init,
    dtype=jnp.dtype(m.dtype),
    attention=m.attention,
  )
