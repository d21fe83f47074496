"""One residual attention block, forward + backward, in each attention form, beside
transformers' `CLIPEncoderLayer` (PyTorch's fused SDPA kernel) of the same size.

  python benchmarks/attention.py [--shapes 8x197x768x12 32x197x768x12 8x77x512x8c 32x77x512x8c]
      [--repeats 5]

A shape is BATCHxTOKENSxWIDTHxHEADS, `c` at the end for a causal (text) block. Forms: our
`dot_product` (jax.nn.dot_product_attention on [B, L, H, K]) and `einsum` (heads-first plain
einsums, `layers.softmax_attention`), and `blockwise`: the einsum form with the softmax taken
online over blocks of `--block` keys (flash attention's recurrence in plain JAX), which is
defined here only, as it did not win. Times are the best of `--repeats`, the forms timed in
turns; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from train_step import interleaved_best  # noqa: E402

from smartclip_jax.models import layers  # noqa: E402


def blockwise_attention(q, k, v, causal: bool, block: int) -> jax.Array:
  """`layers.softmax_attention` with the softmax accumulated over key blocks: a running max,
  a running sum and a rescaled running output, as flash attention keeps them."""
  length = k.shape[2]
  q = q * q.shape[-1] ** -0.5
  pad = -length % block
  k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))
  top = jnp.full(q.shape[:-1], -jnp.inf, q.dtype)
  total = jnp.zeros(q.shape[:-1], q.dtype)
  out = jnp.zeros_like(q)
  rows = jnp.arange(q.shape[2])[:, None]
  for start in range(0, length + pad, block):
    scores = jnp.einsum("bhqk,bhsk->bhqs", q, k[:, :, start : start + block])
    cols = start + jnp.arange(block)[None, :]
    visible = (cols < length) & ((cols <= rows) if causal else True)
    scores = jnp.where(visible, scores, -jnp.inf)
    new_top = jnp.maximum(top, scores.max(-1))
    weights = jnp.exp(scores - new_top[..., None])
    rescale = jnp.exp(top - new_top)
    total = total * rescale + weights.sum(-1)
    out = out * rescale[..., None] + jnp.einsum(
      "bhqs,bhsk->bhqk", weights, v[:, :, start : start + block]
    )
    top = new_top
  return out / total[..., None]


def ours(form: str, shape: tuple[int, int, int, int], causal: bool, block: int):
  batch, length, width, heads = shape
  x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, length, width)), jnp.float32)
  attention = "dot_product" if form == "dot_product" else "einsum"
  model = layers.ResidualAttentionBlock(heads, causal, attention=attention)
  params = model.init(jax.random.key(0), x)
  core = layers.softmax_attention
  if form == "blockwise":
    core = lambda q, k, v, causal: blockwise_attention(q, k, v, causal, block)  # noqa: E731
  with mock.patch.object(layers, "softmax_attention", core):
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2), argnums=(0, 1)))
    grad(params, x)  # traced with this form's core
  return lambda: jax.block_until_ready(grad(params, x))


def torch_layer(shape: tuple[int, int, int, int], causal: bool):
  import torch
  import transformers

  batch, length, width, heads = shape
  torch.set_num_threads(os.cpu_count() or 1)
  config = transformers.CLIPTextConfig(
    hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads
  )
  config.hidden_act, config._attn_implementation = "quick_gelu", "sdpa"
  layer = transformers.models.clip.modeling_clip.CLIPEncoderLayer(config)
  x = torch.randn(batch, length, width, requires_grad=True)
  mask = None
  if causal:
    mask = torch.full((length, length), float("-inf")).triu(1).expand(batch, 1, length, length)

  def run():
    out = layer(x, mask)
    (out[0] if isinstance(out, tuple) else out).pow(2).sum().backward()

  return run


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--shapes", nargs="+", default=["8x197x768x12", "32x197x768x12", "8x77x512x8c", "32x77x512x8c"]
  )
  parser.add_argument("--block", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  rows = []
  for text in args.shapes:
    causal = text.endswith("c")
    shape = tuple(int(n) for n in text.rstrip("c").split("x"))
    runs = {form: ours(form, shape, causal, args.block) for form in layers.ATTENTIONS[1:]}
    runs["blockwise"] = ours("blockwise", shape, causal, args.block)
    runs["torch"] = torch_layer(shape, causal)
    times = interleaved_best(runs, args.repeats)
    line = ", ".join(f"{k} {t * 1e3:.0f} ms ({times['torch'] / t:.2f}x)" for k, t in times.items())
    print(f"{text}: {line}", flush=True)
    rows.append({"shape": text, **{k: t for k, t in times.items()}})
  print(json.dumps({"block": args.block, "seconds": rows}))


if __name__ == "__main__":
  main()
