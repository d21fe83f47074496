"""Input pipeline images/s (decode + augment + tokenise, 224 px, ArrayRecord) with 0, 1, 2
workers, next to the ViT-B/16 SmartCLIP train step's images/s on the same machine.

  python benchmarks/input_pipeline.py [--images 512] [--batches 12] [--step-batch 8]

Both are measured in this one run (the machine is shared and noisy), and the ratio is printed.
From XLA's FLOP count of the step it also estimates how many host cores per TPU chip the
pipeline needs to keep a chip busy (`--chip-tflops`, `--mfu` set the chip's assumed speed).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import tempfile
import time

import numpy as np
import PIL.Image

from smartclip_jax import config as config_lib  # noqa: E402
from smartclip_jax.data import demo, pipeline, prepare  # noqa: E402


def write_images(root: pathlib.Path, count: int) -> list[tuple[str, str, str]]:
  """`count` 512 x 384 JPEGs of demo scenes with 3-6 sentence captions, as prepare entries."""
  entries = []
  for i in range(count):
    rng = np.random.default_rng([7, i])
    shapes = demo.draw_scene(rng, max_objects=6)
    pixels = demo.render(shapes, 512, rng)[:384]
    out = io.BytesIO()
    PIL.Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    (root / f"{i}.jpg").write_bytes(out.getvalue())
    caption = " ".join(s.sentence() for s in shapes) + " The background is dark and grainy."
    entries.append((str(i), f"{i}.jpg", caption))
  return entries


def pipeline_rate(config, batches: int) -> float:
  """Images/s of train batches after the first two (start-up excluded)."""
  it = pipeline.train_iterator(config)
  for _ in range(2):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * config.batch_size / (time.perf_counter() - start)


def step_rate(step_batch: int, steps: int) -> tuple[float, float]:
  """Images/s of the ViT-B/16 SmartCLIP train step (float32 on CPU) and its FLOPs per image."""
  import jax

  from smartclip_jax import optim, sharding, step as step_lib
  from smartclip_jax.models.clip import build_model

  config = config_lib.recipe_config("vit_b16")
  config.update(batch_size=step_batch)
  config.model.dtype = "float32"  # bf16 matmuls are emulated, slowly, on CPU
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  model, tx = build_model(config), optim.make_optimizer(config)
  shardings = step_lib.abstract_state(model, tx, config, mesh)[1]
  state = step_lib.init_state(model, tx, config, mesh, shardings)
  train_step = step_lib.make_train_step(model, tx, config, mesh, shardings)
  batch = jax.device_put(step_lib.dummy_batch(config, step_batch), sharding.batch_sharding(mesh))
  batch["tokens"] = batch["tokens"].at[:, 0].set(49406).at[:, 60].set(49407)
  with sharding.activate(mesh):
    jitted = step_lib.jit_train_step(model, tx, config, mesh, shardings)
    cost = jitted.lower(state, batch).compile().cost_analysis()
  flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  return steps * step_batch / (time.perf_counter() - start), flops / step_batch


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--step-batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--chip-tflops", type=float, default=459.0, help="v5p bf16 peak")
  parser.add_argument("--mfu", type=float, default=0.5, help="assumed on the chip")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / "images").mkdir()
    entries = write_images(tmp / "images", args.images)
    prepare.prepare(
      entries,
      str(tmp / "images"),
      tmp / "shards",
      holdout=0,
      num_shards=4,
      encoding=prepare.Encoding(512, 16, 10**8, 95),
      workers=2,
      progress=False,
    )
    config = config_lib.recipe_config("vit_b16")
    config.update(batch_size=args.batch)
    config.data.update(name="array_record", path=str(tmp / "shards" / "train"))
    rates = {}
    for workers in (0, 1, 2):
      config.data.num_workers = workers
      rates[workers] = pipeline_rate(config, args.batches)
  step_ips, flops_per_image = step_rate(args.step_batch, args.steps)

  print(f"{'what':46}{'images/s':>10}{'ratio to step':>15}")
  for workers, rate in rates.items():
    print(
      f"{f'input pipeline, {workers} worker(s), 224 px, ctx 248':46}{rate:10.1f}"
      f"{rate / step_ips:15.1f}"
    )
  print(f"{'ViT-B/16 SmartCLIP train step (fp32, this CPU)':46}{step_ips:10.2f}{1:15.1f}")
  result = {
    "pipeline_images_per_sec": {str(k): v for k, v in rates.items()},
    "train_step_images_per_sec": step_ips,
    "step_flops_per_image": flops_per_image,
  }
  if flops_per_image > 0:
    chip_ips = args.chip_tflops * 1e12 * args.mfu / flops_per_image
    cores = os.cpu_count() or 1
    per_core = max(rates.values()) / cores  # every setting above keeps all cores busy
    result.update(
      chip_images_per_sec=chip_ips,
      images_per_sec_per_core=per_core,
      host_cores_per_chip=chip_ips / per_core,
    )
    print(
      f"step: {flops_per_image / 1e9:.1f} GFLOP per image (XLA cost analysis); a chip at "
      f"{args.chip_tflops:.0f} TFLOP/s x {args.mfu:.0%} MFU trains {chip_ips:.0f} images/s, "
      f"which needs {chip_ips / per_core:.1f} host cores per chip at the best rate above "
      f"spread over this machine's {cores} cores ({per_core:.1f} images/s per core)"
    )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
