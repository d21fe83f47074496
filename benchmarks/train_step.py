"""The train step on this machine: SmartCLIP vs CLIP on the same towers, ours vs a PyTorch step of
the same architecture, and MFU against this machine's measured matmul peak.

  python benchmarks/train_step.py [--arch vit_b16] [--batches 8 32] [--context 77]
      [--caption-tokens 20] [--dtype float32] [--repeats 3] [--no-torch] [--rows ...]
      [--malloc auto|system|tcmalloc|jemalloc]

Every step is loss + backward + AdamW on one device (all host cores), fp32 unless --dtype says.
Ours: `step.make_train_step` (the code the trainer runs). PyTorch: transformers' `CLIPModel`
configured to the same sizes (QuickGELU, the context length given), `return_loss=True`,
`backward()`, `torch.optim.AdamW`. FLOPs per step are XLA's cost analysis of our compiled step;
MFU divides them by the step time and by the peak of a large jitted fp32 matmul measured in the
same run. The steps of one batch size are timed in turns, so load from elsewhere falls on all
of them alike, and each keeps its best time (the least disturbed); `clip_again` and
`smartclip_again`, second copies, show what difference noise alone makes and give SmartCLIP's
overhead a second estimate; `clip_lit` locks the image tower (`optim.frozen='visual/.*'`) and
`clip_patch_dropout` drops half the patches (`model.patch_dropout=0.5`); `image_tower` and
`image_tower_patch_dropout` lock the text tower instead (`optim.frozen='text/.*'`: the step is
the image tower's training and the text tower's forward pass), at all and at half the
patches; GB held is the
compiled step's memory per device (`memory.step_bytes`); `minimal` is the same towers' math
with nothing of the trainer around it (see `minimal`). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from smartclip_jax import (  # noqa: E402
  config as config_lib,
  flops as flops_lib,
  losses,
  malloc,
  memory,
  optim,
  sharding,
  step as step_lib,
)
from smartclip_jax.data import pipeline  # noqa: E402
from smartclip_jax.models.clip import build_model  # noqa: E402


def seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_best(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
  """Best seconds of each callable, timed in turns after one warm-up each, so that load from
  elsewhere on a shared machine falls on all of them alike. Each round starts one further
  along (a, b, c; b, c, a; ...): a step timed right after PyTorch's seemed to pay for it
  (benchmarks/README.md), and the best of rotated rounds leaves that out."""
  for fn in runs.values():
    fn()  # compilation, allocations
  names = list(runs)
  times: dict[str, list[float]] = {name: [] for name in names}
  for round_ in range(repeats):
    for i in range(len(names)):
      name = names[(round_ + i) % len(names)]
      times[name].append(seconds(runs[name]))
  return {name: min(t) for name, t in times.items()}


def make_config(arch: str, loss: str, batch: int, context: int, dtype: str):
  c = config_lib.recipe_config(arch, loss)
  c.batch_size, c.model.dtype, c.model.text.context_length = batch, dtype, context
  c.optim.frozen_positions = min(c.optim.frozen_positions, context - 1)
  config_lib.validate(c)
  return c


def inputs(c, caption_tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random images; captions of `caption_tokens` tokens (all positions if 0), padded with 0."""
  rng = np.random.default_rng(seed)
  size, length = c.model.vision.image_size, c.model.text.context_length
  n = caption_tokens or length
  tokens = np.zeros((c.batch_size, length), np.int32)
  tokens[:, :n] = rng.integers(1, 49406, (c.batch_size, n))
  tokens[:, n - 1] = 49407  # end of text, the highest id, where CLIP pools
  return {
    "image": rng.standard_normal((c.batch_size, size, size, 3)).astype(np.float32),
    "tokens": tokens,
  }


def ours(c, caption_tokens: int) -> tuple[Callable[[], None], float, float]:
  """Our jitted train step on one device: one step to time, XLA's FLOPs per step and the
  compiled step's bytes (`memory.step_bytes`). The batch goes through the trainer's
  `pipeline.global_batch`, which cuts padding if the config says so."""
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  model, tx = build_model(c), optim.make_optimizer(c)
  shardings = step_lib.abstract_state(model, tx, c, mesh)[1]
  state = step_lib.init_state(model, tx, c, mesh, shardings)
  data = inputs(c, caption_tokens)
  batch = pipeline.global_batch(data, mesh, pipeline.text_length(data["tokens"], c))
  jitted = step_lib.jit_train_step(model, tx, c, mesh, shardings)
  with sharding.activate(mesh):
    compiled = jitted.lower(state, batch).compile()
  flops = flops_lib.compiled_flops(compiled)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)

  return run, flops, memory.step_bytes(compiled)["total"]


def minimal(c, caption_tokens: int) -> tuple[Callable[[], None], float]:
  """The same towers' math and nothing else: `model.apply`, a plain symmetric cross-entropy,
  `optax.adamw`, one jit with the state donated. No mesh, schedules, parameter groups,
  non-finite skip or metrics: the gap to `ours` is what all of those cost."""
  model, data = build_model(c), inputs(c, caption_tokens)
  batch = {k: jnp.asarray(v) for k, v in data.items()}
  params = nn.meta.unbox(model.init(jax.random.key(0), batch["image"][:1], batch["tokens"][:1]))
  tx = optax.adamw(1e-6, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps, weight_decay=0.01)

  def loss(params):
    out = model.apply(params, batch["image"], batch["tokens"])
    img, txt = losses.l2_normalize(out["img_emb"]), losses.l2_normalize(out["txt_emb"])
    logits = jnp.exp(out["logit_scale"]) * img @ txt.T
    diag = jnp.diagonal(logits)
    rows, cols = jax.nn.logsumexp(logits, axis=1), jax.nn.logsumexp(logits, axis=0)
    return (jnp.mean(rows - diag) + jnp.mean(cols - diag)) / 2

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  holder = {"state": (params, tx.init(params))}
  flops = flops_lib.compiled_flops(step.lower(*holder["state"]).compile())

  def run():
    *holder["state"], value = step(*holder["state"])
    value.block_until_ready()

  return run, flops


def torch_step(
  c, caption_tokens: int, threads: int, device: str = "cpu", compile: bool = False
) -> Callable[[], None]:
  """transformers' CLIPModel of the same sizes: loss, backward, AdamW (fp32 or bf16 autocast),
  on `device`, its forward and loss under `torch.compile` if `compile`."""
  import torch
  import transformers

  torch.set_num_threads(threads)
  m = c.model
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=m.text.vocab_size,
      hidden_size=m.text.width,
      intermediate_size=4 * m.text.width,
      num_hidden_layers=m.text.layers,
      num_attention_heads=m.text.heads,
      max_position_embeddings=m.text.context_length,
      hidden_act="quick_gelu",
      eos_token_id=49407,
    ),
    vision_config=dict(
      hidden_size=m.vision.width,
      intermediate_size=4 * m.vision.width,
      num_hidden_layers=m.vision.layers,
      num_attention_heads=m.vision.heads,
      image_size=m.vision.image_size,
      patch_size=m.vision.patch_size,
      hidden_act="quick_gelu",
    ),
    projection_dim=m.embed_dim,
  )
  model = transformers.CLIPModel(config).train().to(device)
  opt = torch.optim.AdamW(
    model.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01
  )
  data = inputs(c, caption_tokens)
  pixels = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous().to(device)
  tokens = torch.from_numpy(data["tokens"]).long().to(device)
  bf16 = c.model.dtype == "bfloat16"

  def loss_of(tokens, pixels):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      return model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss

  forward = torch.compile(loss_of) if compile else loss_of

  def run():
    forward(tokens, pixels).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device != "cpu":
      torch.cuda.synchronize()

  return run


ROWS = (
  "smartclip",
  "clip",
  "smartclip_again",
  "clip_again",
  "clip_trim",
  "clip_lit",
  "clip_patch_dropout",
  "image_tower",
  "image_tower_patch_dropout",
  "minimal",
  "torch_clip",
)


def ratios(found: dict[str, dict]) -> list[str]:
  """The run's comparisons, each where both of its rows were timed (also stored in `found`)."""
  seconds = {name: row["seconds"] for name, row in found.items()}
  pairs = [  # (row, against, key, how it reads)
    ("smartclip", "clip", "overhead_vs_clip", "SmartCLIP step {:+.1%} vs CLIP"),
    ("smartclip_again", "clip_again", "overhead_vs_clip", "their second copies: {:+.1%}"),
    ("clip_again", "clip", "vs_clip", "the same CLIP step again: {:+.1%}"),
    ("clip", "minimal", "vs_minimal", "our CLIP step {:+.1%} vs the minimal step"),
    ("clip_trim", "clip", "speedup_vs_clip", "padding cut: {:.2f}x"),
    ("clip_lit", "clip", "speedup_vs_clip", "image tower locked (LiT): {:.2f}x"),
    ("clip_patch_dropout", "clip", "speedup_vs_clip", "half the patches dropped: {:.2f}x"),
    (
      "image_tower_patch_dropout",
      "image_tower",
      "speedup_vs_image_tower",
      "the image tower's step at half its patches: {:.2f}x",
    ),
    ("clip", "torch_clip", "speedup_vs_torch", "ours {:.2f}x the speed of transformers' CLIPModel"),
  ]
  lines = []
  for row, against, key, text in pairs:
    if row in seconds and against in seconds:
      speedup = key.startswith("speedup")
      value = seconds[against] / seconds[row] if speedup else seconds[row] / seconds[against] - 1
      found[row][key] = value
      lines.append(text.format(value))
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--arch", default="vit_b16", choices=sorted(config_lib.ARCHS))
  parser.add_argument("--batches", type=int, nargs="+", default=[8])
  parser.add_argument(
    "--context",
    type=int,
    default=77,
    help="text tokens (77: CLIP's, which transformers' CLIP takes as is)",
  )
  parser.add_argument(
    "--caption-tokens",
    type=int,
    default=0,
    help="caption length in tokens (0: all of --context); > 0 adds a CLIP row "
    "with model.text.trim_padding=16",
  )
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-torch", dest="torch", action="store_false")
  parser.add_argument(
    "--rows",
    nargs="+",
    default=list(ROWS),
    choices=ROWS,
    help="the steps to time (fewer hold less memory: each keeps its state between turns)",
  )
  parser.add_argument(
    "--malloc",
    default=malloc.chosen(),
    choices=[malloc.AUTO, "system", *malloc.LIBRARIES],
    help="the heap allocator to run under (the command starts again with it preloaded): "
    "XLA:CPU's per-step temporaries cost page faults under glibc's; auto (the default, as "
    "the trainer): tcmalloc or jemalloc where installed",
  )
  args = parser.parse_args()
  malloc.use(args.malloc)
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")

  peak = flops_lib.measured_peak("float32", n=4096, repeats=5)
  threads = os.cpu_count() or 1
  print(
    f"{jax.devices()[0].device_kind}, {threads} cores, {malloc.loaded()} malloc: "
    f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s",
    flush=True,
  )
  print(
    f"{'step':>18} {'batch':>6} {'s/step':>8} {'img/s':>7} {'GFLOP/step':>11} {'MFU':>6} "
    f"{'GB held':>8}"
  )
  rows = []
  for batch in args.batches:
    configs = {
      name: make_config(
        args.arch,
        "smartclip" if name.startswith("smartclip") else "clip",
        batch,
        args.context,
        args.dtype,
      )
      for name in ROWS
    }
    configs["clip_trim"].model.text.trim_padding = 16
    configs["clip_lit"].optim.frozen = "visual/.*"
    configs["clip_patch_dropout"].model.patch_dropout = 0.5
    for name in ("image_tower", "image_tower_patch_dropout"):  # the text tower forward only
      configs[name].optim.frozen = "text/.*"
    configs["image_tower_patch_dropout"].model.patch_dropout = 0.5
    wanted = [r for r in args.rows if (r != "clip_trim" or args.caption_tokens)]
    wanted = [r for r in wanted if r != "torch_clip" or args.torch]
    runs, flops, held = {}, {}, {}
    for name in wanted:
      if name == "minimal":
        runs[name], flops[name] = minimal(configs[name], args.caption_tokens)
      elif name == "torch_clip":
        runs[name] = torch_step(configs[name], args.caption_tokens, threads)
      else:
        runs[name], flops[name], held[name] = ours(configs[name], args.caption_tokens)
    if "torch_clip" in runs:  # the same model as clip: its FLOPs, if clip or minimal ran
      flops["torch_clip"] = flops.get("clip") or flops.get("minimal") or 0.0
    times = interleaved_best(runs, args.repeats)
    found = {}
    for name, t in times.items():
      row = found[name] = {
        "step": name,
        "batch": batch,
        "seconds": t,
        "flops": flops[name],
        "images_per_sec": batch / t,
        "mfu": flops[name] / t / peak,
        "step_bytes": held.get(name),
      }
      rows.append(row)
      gb = f"{held[name] / 1e9:>8.2f}" if name in held else f"{'-':>8}"
      print(
        f"{name:>18} {batch:>6} {t:>8.2f} {row['images_per_sec']:>7.2f} "
        f"{flops[name] / 1e9:>11.1f} {row['mfu']:>6.1%} {gb}",
        flush=True,
      )
    print(f"batch {batch}: " + "; ".join(ratios(found)), flush=True)
  print(
    json.dumps(
      {
        "arch": args.arch,
        "context": args.context,
        "dtype": args.dtype,
        "malloc": malloc.loaded(),
        "caption_tokens": args.caption_tokens,
        "peak_flops": peak,
        "threads": threads,
        "rows": rows,
      }
    )
  )


if __name__ == "__main__":
  main()
