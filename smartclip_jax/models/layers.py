"""The residual attention block CLIP's towers and the mask network share.

Names follow OpenAI CLIP (`ln_1`, `attn.in_proj_*`, `attn.out_proj_*`, `ln_2`, `mlp.c_fc`,
`mlp.c_proj`) so that weights map 1:1 to PyTorch. Attention kernels are stored head-split
(`in_proj_kernel` [width, 3, heads, head_dim], `out_proj_kernel` [heads, head_dim, width]) so the
logical-axis rules can shard heads; PyTorch's fused layout is a reshape + transpose away.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype | str
LN_EPS = 1e-5  # PyTorch's LayerNorm default, which CLIP weights were trained with.


def param_init(init: Callable, axes: tuple[str | None, ...]) -> Callable:
  """An initializer tagged with logical axis names (see `sharding.py` for the rules)."""
  return nn.with_logical_partitioning(init, axes)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=LN_EPS,
    dtype=dtype,
    name=name,
    scale_init=param_init(nn.initializers.ones, ("embed",)),
    bias_init=param_init(nn.initializers.zeros, ("embed",)),
  )


def constrain(x: jax.Array) -> jax.Array:
  """Pins a [batch, length, width] activation to the mesh rules (no-op without a mesh)."""
  return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


def torch_linear_bias(fan_in: int) -> Callable:
  """PyTorch's default `nn.Linear` bias, uniform in ±1/sqrt(fan_in): OpenAI's initialisation
  leaves the MLP biases at it (docs/method.md, initialisation)."""
  bound = fan_in**-0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def residual_std(width: int, depth: int) -> float:
  """OpenAI CLIP's std for the matrices that write into the residual stream (`out_proj`,
  `c_proj`): width^-0.5 (2 depth)^-0.5, so a deeper stack adds smaller steps."""
  return width**-0.5 * (2 * depth) ** -0.5


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
  """Scaled dot-product attention on heads-first [batch, heads, length, head_dim] arrays, as
  plain batched matmuls and a softmax: on CPU XLA runs these with no transposes between them."""
  scores = jnp.einsum("bhqk,bhsk->bhqs", q * q.shape[-1] ** -0.5, k)
  if causal:
    length = scores.shape[-1]
    visible = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(visible, scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum("bhqs,bhsk->bhqk", jax.nn.softmax(scores, axis=-1), v)


ATTENTIONS = ("auto", "dot_product", "einsum")  # config.model.attention


class Attention(nn.Module):
  """Multi-head self-attention with a fused q/k/v projection (CLIP's `in_proj_weight`).

  `depth` is the number of blocks in the stack, for OpenAI's scaled `out_proj` initialisation.
  `attention` picks the core: `dot_product` is `jax.nn.dot_product_attention` on [B, L, H, K]
  (cuDNN's fused kernel on GPUs, XLA's best form on TPUs); `einsum` is `softmax_attention` on
  heads-first arrays, which XLA:CPU runs faster; `auto` lowers `einsum` for CPUs and
  `dot_product` for everything else (`lax.platform_dependent`, so an ahead-of-time compile for
  a TPU on a CPU host gets the TPU form). Same parameters and numerics either way.
  """

  heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  depth: int = 1
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by heads {self.heads}")
    head_dim = width // self.heads
    zeros = nn.initializers.zeros
    w_in = self.param(
      "in_proj_kernel",
      param_init(nn.initializers.normal(width**-0.5), ("embed", None, "heads", "kv")),
      (width, 3, self.heads, head_dim),
    )
    b_in = self.param(
      "in_proj_bias", param_init(zeros, (None, "heads", "kv")), (3, self.heads, head_dim)
    )
    w_out = self.param(
      "out_proj_kernel",
      param_init(nn.initializers.normal(residual_std(width, self.depth)), ("heads", "kv", "embed")),
      (self.heads, head_dim, width),
    )
    b_out = self.param("out_proj_bias", param_init(zeros, ("embed",)), (width,))
    x, w_in, b_in, w_out, b_out = (a.astype(self.dtype) for a in (x, w_in, b_in, w_out, b_out))

    def dot_product(x: jax.Array) -> jax.Array:
      qkv = jnp.einsum("bld,dthk->tblhk", x, w_in) + b_in[:, None, None]
      out = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
      return jnp.einsum("blhk,hkd->bld", out, w_out) + b_out

    def einsum(x: jax.Array) -> jax.Array:
      qkv = jnp.einsum("bld,dthk->tbhlk", x, w_in) + b_in[:, None, :, None]
      out = softmax_attention(qkv[0], qkv[1], qkv[2], self.causal)
      return jnp.einsum("bhlk,hkd->bld", out, w_out) + b_out

    if self.attention == "auto":
      return jax.lax.platform_dependent(x, cpu=einsum, default=dot_product)
    return {"dot_product": dot_product, "einsum": einsum}[self.attention](x)


class Mlp(nn.Module):
  """c_fc -> activation -> c_proj, hidden 4x width; OpenAI CLIP's initialisation."""

  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  depth: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(
      4 * width,
      dtype=self.dtype,
      name="c_fc",
      kernel_init=param_init(nn.initializers.normal((2 * width) ** -0.5), ("embed", "mlp")),
      bias_init=param_init(torch_linear_bias(width), ("mlp",)),
    )(x)
    x = ACTIVATIONS[self.activation](x)
    return nn.Dense(
      width,
      dtype=self.dtype,
      name="c_proj",
      kernel_init=param_init(
        nn.initializers.normal(residual_std(width, self.depth)), ("mlp", "embed")
      ),
      bias_init=param_init(torch_linear_bias(4 * width), ("embed",)),
    )(x)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). `depth`: blocks in its stack."""

  heads: int
  causal: bool = False
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  depth: int = 1
  attention: str = "auto"  # ATTENTIONS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x)
    x = x + Attention(self.heads, self.causal, self.dtype, self.depth, self.attention, name="attn")(
      layer_norm("ln_1", self.dtype)(x)
    )
    x = x + Mlp(self.activation, self.dtype, self.depth, name="mlp")(
      layer_norm("ln_2", self.dtype)(x)
    )
    return constrain(x)


# What a block keeps for the backward pass (`model.remat`): everything (none), only its input
# (full: the block is recomputed), or its input and the outputs of its weight matmuls (dots:
# attention scores, softmax and activations are recomputed).
REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


SCANNED = "resblocks"  # the name of a scanned stack; its parameters have a leading layer axis


class _ScanBlock(ResidualAttentionBlock):
  """A block with `nn.scan`'s (carry, input) -> (carry, output) signature."""

  def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    return super().__call__(x), None


class Transformer(nn.Module):
  """A stack of residual attention blocks named `resblocks_{i}` (CLIP's `resblocks.{i}`), or
  with `scan` one block `resblocks` under `nn.scan` whose parameters carry a leading layer axis
  (logical name `layers`): one block to compile instead of `layers` (see `layout.unstack_layers`
  for the per-layer names)."""

  layers: int
  heads: int
  causal: bool = False
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  remat: str = "none"
  scan: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block = _ScanBlock if self.scan else ResidualAttentionBlock
    if self.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
    args = (self.heads, self.causal, self.activation, self.dtype, self.layers, self.attention)
    if self.scan:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      return stack(*args, name=SCANNED)(x, None)[0]
    for i in range(self.layers):
      x = block(*args, name=f"resblocks_{i}")(x)
    return x


class Tower(nn.Module):
  """The fields both CLIP towers share: a `layers`-deep, `width`-wide transformer of `heads`
  heads, projected to `embed_dim`; the towers add their input's fields."""

  width: int
  layers: int
  heads: int
  embed_dim: int
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  remat: str = "none"  # REMAT_POLICIES, or none
  scan: bool = False  # blocks under nn.scan
  attention: str = "auto"  # ATTENTIONS

  def transformer(self, causal: bool) -> Transformer:
    return Transformer(
      self.layers,
      self.heads,
      causal=causal,
      activation=self.activation,
      dtype=self.dtype,
      remat=self.remat,
      scan=self.scan,
      attention=self.attention,
      name="transformer",
    )
