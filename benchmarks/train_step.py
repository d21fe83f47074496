"""The train step on this machine: SmartCLIP vs CLIP on the same towers, ours vs a PyTorch step of
the same architecture, and MFU against this machine's measured matmul peak.

  python benchmarks/train_step.py [--arch vit_b16] [--batches 8 32] [--context 77]
      [--dtype float32] [--repeats 3] [--no-torch]

Every step is loss + backward + AdamW on one device (all host cores), fp32 unless --dtype says.
Ours: `step.make_train_step` (the code the trainer runs). PyTorch: transformers' `CLIPModel`
configured to the same sizes (QuickGELU, the context length given), `return_loss=True`,
`backward()`, `torch.optim.AdamW`. FLOPs per step are XLA's cost analysis of our compiled step;
MFU divides them by the step time and by the peak of a large jitted fp32 matmul measured in the
same run. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from smartclip_jax import config as config_lib, optim, sharding, step as step_lib  # noqa: E402
from smartclip_jax.models.clip import build_model  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up (compilation, allocations)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
  """FLOP/s of an n x n x n float32 matmul, the best this machine does on dense math."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / median_seconds(lambda: f(a).block_until_ready(), repeats)


def make_config(arch: str, loss: str, batch: int, context: int, dtype: str):
  c = config_lib.recipe_config(arch, loss)
  c.batch_size, c.model.dtype, c.model.text.context_length = batch, dtype, context
  c.optim.frozen_positions = min(c.optim.frozen_positions, context - 1)
  config_lib.validate(c)
  return c


def inputs(c, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  size, length = c.model.vision.image_size, c.model.text.context_length
  tokens = rng.integers(1, 49406, (c.batch_size, length)).astype(np.int32)
  tokens[:, -1] = 49407  # end of text, the highest id, where CLIP pools
  return {"image": rng.standard_normal((c.batch_size, size, size, 3)).astype(np.float32),
          "tokens": tokens}


def ours(c, repeats: int) -> dict:
  """Our jitted train step on one device: seconds per step and XLA's FLOPs per step."""
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  model, tx = build_model(c), optim.make_optimizer(c)
  shardings = step_lib.state_shardings(model, tx, c, mesh)
  state = step_lib.init_state(model, tx, c, mesh, shardings)
  batch = jax.device_put(inputs(c), sharding.batch_sharding(mesh))
  jitted = step_lib.jit_train_step(model, tx, c, mesh, shardings)
  with sharding.activate(mesh):
    compiled = jitted.lower(state, batch).compile()
  flops = compiled.cost_analysis()["flops"]
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  return {"seconds": median_seconds(run, repeats), "flops": flops}


def torch_step(c, repeats: int, threads: int) -> dict:
  """transformers' CLIPModel of the same sizes: loss, backward, AdamW (fp32 or bf16 autocast)."""
  import torch
  import transformers

  torch.set_num_threads(threads)
  m = c.model
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=m.text.vocab_size, hidden_size=m.text.width,
                       intermediate_size=4 * m.text.width, num_hidden_layers=m.text.layers,
                       num_attention_heads=m.text.heads,
                       max_position_embeddings=m.text.context_length, hidden_act="quick_gelu",
                       eos_token_id=49407),
      vision_config=dict(hidden_size=m.vision.width, intermediate_size=4 * m.vision.width,
                         num_hidden_layers=m.vision.layers, num_attention_heads=m.vision.heads,
                         image_size=m.vision.image_size, patch_size=m.vision.patch_size,
                         hidden_act="quick_gelu"),
      projection_dim=m.embed_dim)
  model = transformers.CLIPModel(config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-6,
                          weight_decay=0.01)
  data = inputs(c)
  pixels = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous()
  tokens = torch.from_numpy(data["tokens"]).long()
  bf16 = c.model.dtype == "bfloat16"

  def run():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return {"seconds": median_seconds(run, repeats)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", default="vit_b16", choices=sorted(config_lib.ARCHS))
  parser.add_argument("--batches", type=int, nargs="+", default=[8])
  parser.add_argument("--context", type=int, default=77,
                      help="text tokens (77: CLIP's, which transformers' CLIP takes as is)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  args = parser.parse_args()

  peak = matmul_peak()
  threads = os.cpu_count() or 1
  print(f"{jax.devices()[0].device_kind}, {threads} cores: fp32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s", flush=True)
  print(f"{'step':>16} {'batch':>6} {'s/step':>8} {'img/s':>7} {'GFLOP/step':>11} {'MFU':>6}")
  rows = []
  for batch in args.batches:
    found = {}
    for name in ("smartclip", "clip", "torch_clip"):
      if name == "torch_clip" and not args.torch:
        continue
      c = make_config(args.arch, "clip" if name == "torch_clip" else name, batch, args.context,
                      args.dtype)
      r = torch_step(c, args.repeats, threads) if name == "torch_clip" else ours(c, args.repeats)
      r["flops"] = r.get("flops", found.get("clip", {}).get("flops"))  # the same model's work
      row = {"step": name, "batch": batch, **r, "images_per_sec": batch / r["seconds"],
             "mfu": r["flops"] / r["seconds"] / peak}
      found[name] = row
      rows.append(row)
      print(f"{name:>16} {batch:>6} {r['seconds']:>8.2f} {row['images_per_sec']:>7.2f} "
            f"{r['flops'] / 1e9:>11.1f} {row['mfu']:>6.1%}", flush=True)
    overhead = found["smartclip"]["seconds"] / found["clip"]["seconds"] - 1
    line = f"batch {batch}: SmartCLIP step {overhead:+.1%} vs CLIP"
    if "torch_clip" in found:
      speedup = found["torch_clip"]["seconds"] / found["clip"]["seconds"]
      line += f"; ours {speedup:.2f}x the speed of transformers' CLIPModel"
      found["clip"]["speedup_vs_torch"] = speedup
    found["smartclip"]["overhead_vs_clip"] = overhead
    print(line, flush=True)
  print(json.dumps({"arch": args.arch, "context": args.context, "dtype": args.dtype,
                    "peak_flops": peak, "threads": threads, "rows": rows}))


if __name__ == "__main__":
  main()
