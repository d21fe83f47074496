"""The GPU check: our B/16 recipe step in bf16 at the largest batch that fits one GPU, with the
global and the ring loss, beside transformers' CLIPModel under torch.compile.

  bash benchmarks/gpu_check.sh            # one GPU, under 8 minutes
  bash benchmarks/gpu_check.sh --tiny     # a tiny model on the CPU, in seconds (slow tests)

The batch: XLA's memory analysis of the compiled step at two batch sizes gives the memory per
image; the largest multiple of `--round` that fits in `--memory-fraction` of the device is
compiled and run (and cut by a quarter until it does run). CLIPModel runs first, at the same
batch or half of it until it fits, in a process of its own: the two frameworks do not share a
GPU's memory well, so the script turns XLA's preallocation off. Images/s is the best of
`--steps` steps after warm-up; MFU divides XLA's FLOPs per step (ours, which CLIPModel's same
architecture is taken to do too) by the time and by the device's peak (flops.py). The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import train_step as bench  # noqa: E402

from smartclip_jax import (  # noqa: E402
  flops as flops_lib,
  memory,
  optim,
  sharding,
  step as step_lib,
)
from smartclip_jax.models.clip import build_model  # noqa: E402

TINY = {  # a model small enough for a CPU test, the B/16 recipe otherwise
  "model.embed_dim": 32,
  "model.vision.image_size": 32,
  "model.vision.patch_size": 8,
  "model.vision.width": 64,
  "model.vision.layers": 2,
  "model.vision.heads": 2,
  "model.text.width": 64,
  "model.text.layers": 2,
  "model.text.heads": 2,
  "model.text.context_length": 24,
  "model.mask.heads": 2,
}


def config_for(args: argparse.Namespace, batch: int, loss_impl: str):
  c = bench.make_config("vit_b16", "smartclip", batch, args.context, "bfloat16")
  c.loss_impl = loss_impl
  if args.tiny:
    for key, value in TINY.items():
      *path, field = key.split(".")
      node = c
      for part in path:
        node = node[part]
      node[field] = value
    c.optim.frozen_positions = min(c.optim.frozen_positions, c.model.text.context_length - 1)
  return c


def step_bytes(c) -> int:
  """Device bytes the compiled step needs at `c.batch_size`, from XLA's memory analysis
  (compiled on abstract shapes: nothing is allocated)."""
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  model, tx = build_model(c), optim.make_optimizer(c)
  state, shardings = step_lib.abstract_state(model, tx, c, mesh)
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), step_lib.dummy_batch(c, c.batch_size)
  )
  with sharding.activate(mesh):
    m = step_lib.jit_train_step(model, tx, c, mesh, shardings).lower(state, batch).compile()
  return memory.step_bytes(m)["total"]


def largest_batch(args: argparse.Namespace) -> int:
  """The largest multiple of `--round` whose step fits `--memory-fraction` of the device,
  from the memory at two batch sizes (memory grows linearly with the batch)."""
  if args.batch:
    return args.batch
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise SystemExit("this device reports no memory limit: give --batch")
  small, large = args.round, 2 * args.round
  a, b = (step_bytes(config_for(args, n, "global")) for n in (small, large))
  per_image = max(1, (b - a) / (large - small))
  budget = args.memory_fraction * stats["bytes_limit"] - (a - small * per_image)
  batch = int(budget / per_image) // args.round * args.round
  print(
    f"memory: {a / 2**30:.2f} GiB at batch {small}, {b / 2**30:.2f} at {large}; "
    f"{stats['bytes_limit'] / 2**30:.1f} GiB on the device -> batch {batch}",
    flush=True,
  )
  return max(batch, args.round)


def best_seconds(run, steps: int) -> float:
  return bench.interleaved_best({"step": run}, steps)["step"]


def is_out_of_memory(error: Exception) -> bool:
  text = str(error).lower()
  return "resource_exhausted" in text or "out of memory" in text


def time_ours(args, batch: int, loss_impl: str) -> tuple[int, float, float]:
  """(batch that ran, seconds per step, FLOPs per step), cutting the batch by a quarter on an
  out-of-memory error."""
  while True:
    try:
      run, flops, _ = bench.ours(config_for(args, batch, loss_impl), args.caption_tokens)
      return batch, best_seconds(run, args.steps), flops
    except Exception as error:  # noqa: BLE001 (XLA raises a runtime error; only OOM is retried)
      if not is_out_of_memory(error) or batch <= args.round:
        raise
      batch = max(args.round, batch * 3 // 4 // args.round * args.round)
      print(f"out of memory; trying batch {batch}", flush=True)


def time_torch(args, batch: int) -> dict:
  """{"batch": that ran, "seconds": per step} for CLIPModel under torch.compile, halving on OOM,
  from a child process (`--torch-part`) that prints them as JSON."""
  flags = ["--batch", str(batch), "--steps", str(args.steps), "--context", str(args.context)]
  flags += ["--caption-tokens", str(args.caption_tokens)] + (["--tiny"] if args.tiny else [])
  child = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--torch-part", *flags],
    check=True,
    stdout=subprocess.PIPE,
    text=True,
  )
  return json.loads(child.stdout.strip().splitlines()[-1])


def torch_part(args) -> None:
  """The child of `time_torch`: prints {"batch", "seconds"} as its last line."""
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  batch = args.batch
  while True:
    try:
      c = config_for(args, batch, "global")
      run = bench.torch_step(c, args.caption_tokens, os.cpu_count() or 1, device, compile=True)
      print(json.dumps({"batch": batch, "seconds": best_seconds(run, args.steps)}))
      return
    except torch.OutOfMemoryError:
      if batch <= 1:
        raise
      batch //= 2
      torch.cuda.empty_cache()
      print(f"torch out of memory; trying batch {batch}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--tiny", action="store_true", help="a tiny model, for a CPU test")
  parser.add_argument("--batch", type=int, default=0, help="skip the search; run this batch")
  parser.add_argument("--round", type=int, default=64, help="batch sizes are multiples of this")
  parser.add_argument("--memory-fraction", type=float, default=0.85)
  parser.add_argument("--context", type=int, default=248, help="text tokens (the recipe's 248)")
  parser.add_argument("--caption-tokens", type=int, default=0, help="0: every position")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (best kept)")
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  parser.add_argument("--torch-part", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_part:
    return torch_part(args)

  device = jax.devices()[0]
  peak = flops_lib.table_peak(device.device_kind) or flops_lib.measured_peak("bfloat16")
  print(f"{device.device_kind}: peak {peak / 1e12:.1f} TFLOP/s (bf16)", flush=True)
  batch = largest_batch(args)
  torch_row = None
  if args.torch:  # first, while this process holds little GPU memory
    torch_row = dict(step="transformers CLIPModel, torch.compile", **time_torch(args, batch))
  rows = []
  for loss_impl in ("global", "ring"):
    ran, seconds, flops = time_ours(args, batch, loss_impl)
    rows.append(dict(step=f"ours, {loss_impl} loss", batch=ran, seconds=seconds, flops=flops))
  if torch_row:
    torch_row["flops"] = rows[0]["flops"] / rows[0]["batch"] * torch_row["batch"]
    rows.append(torch_row)
  print(f"{'step':>40} {'batch':>6} {'s/step':>8} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6}")
  for row in rows:
    row["images_per_sec"] = row["batch"] / row["seconds"]
    row["tflops"] = row["flops"] / row["seconds"] / 1e12
    row["mfu"] = row["flops"] / row["seconds"] / peak
    print(
      f"{row['step']:>40} {row['batch']:>6} {row['seconds']:>8.3f} "
      f"{row['images_per_sec']:>8.1f} {row['tflops']:>8.1f} {row['mfu']:>6.1%}",
      flush=True,
    )
  print(
    json.dumps(
      dict(device=device.device_kind, peak_flops=peak, jax=jax.__version__, rows=rows),
      default=float,
    )
  )


if __name__ == "__main__":
  main()
