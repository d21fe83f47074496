"""Will the train step compile and fit on a TPU slice? Answered on a CPU host, before paying.

  python -m smartclip_jax.aot --config configs/smartclip_vitl14.py --topology v5p:4x4x4 \
      [--step_time 1.5] [--config.batch_size=32768 ...]

Compiles the real train step (the config's model, optimizer, mesh rules and global batch) for
the slice with jax's `topologies` API and libtpu (`pip install -r requirements-tpu.txt`; no TPU
needed), then prints per-chip memory against the chip's HBM, the FLOPs of one step from XLA's
cost analysis, and the utilisation a step time would mean. Exits 1 when the step does not fit.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; libtpu only compiles
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata to ask
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no chip to lock

import jax  # noqa: E402
import ml_collections  # noqa: E402

from smartclip_jax import (
  config as config_lib,  # noqa: E402
  flops as flops_lib,
  memory,
  optim,
  sharding,
  step as step_lib,
)
from smartclip_jax.models.clip import build_model  # noqa: E402

GIB = 2**30
# HBM per chip (GiB), from Cloud TPU's published specifications; peaks are flops.PEAK_FLOPS.
CHIPS = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


def compile_step(config: ml_collections.ConfigDict, topology: str):
  """The train step compiled for `topology` ('v5p:4x4x4'), and the mesh it was laid out on."""
  from jax.experimental import topologies

  chip = topology.split(":")[0]
  if chip not in CHIPS:
    raise ValueError(f"unknown chip {chip!r} in {topology!r}: one of {sorted(CHIPS)}")
  devices = topologies.get_topology_desc(topology, "tpu").devices
  mesh = sharding.make_mesh(config, devices)
  config_lib.check_batch(config, sharding.data_parallel_size(mesh), 1)
  model, tx = build_model(config), optim.make_optimizer(config)
  state, shardings = step_lib.abstract_state(model, tx, config, mesh)
  batch = {
    k: jax.ShapeDtypeStruct(
      (config.batch_size, *v.shape[1:]), v.dtype, sharding=sharding.batch_sharding(mesh)
    )
    for k, v in step_lib.dummy_batch(config).items()
  }
  step = step_lib.jit_train_step(model, tx, config, mesh, shardings)
  with sharding.activate(mesh):
    return step.lower(state, batch).compile(), mesh


def report(compiled, mesh, topology: str, step_time: float | None) -> dict:
  """Per-chip memory and FLOPs of a compiled step, with the chip's HBM and peak."""
  hbm = CHIPS[topology.split(":")[0]]
  peak = flops_lib.table_peak(mesh.devices.flat[0].device_kind) / 1e12
  mem = memory.step_bytes(compiled)
  chips, total = mesh.devices.size, mem["total"]
  flops_per_chip = flops_lib.compiled_flops(compiled)  # partitioned: one chip's share
  out = {
    "topology": topology,
    "chips": chips,
    "mesh": dict(mesh.shape),
    "arguments_gib": mem["arguments"] / GIB,
    "temporaries_gib": mem["temporaries"] / GIB,
    "outputs_gib": mem["outputs"] / GIB,
    "aliased_gib": mem["aliased"] / GIB,
    "total_gib": total / GIB,
    "hbm_gib": hbm,
    "fits": total <= hbm * GIB,
    "flops_per_step": flops_per_chip * chips,
    "flops_per_chip": flops_per_chip,
    "peak_tflops_per_chip": peak,
    "step_time_at_50pct_mfu": flops_per_chip / (0.5 * peak * 1e12),
  }
  if step_time:
    out["step_time"] = step_time
    out["mfu"] = flops_per_chip / (step_time * peak * 1e12)
  return out


def format_report(r: dict, name: str, batch_size: int, seconds: float) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
    f"{name} on {r['topology']}: {r['chips']} chips, mesh {mesh}, "
    f"global batch {batch_size} ({batch_size / r['chips']:g} per chip), "
    f"compiled in {seconds:.0f} s",
    f"per-chip memory: arguments {r['arguments_gib']:.2f} GiB, temporaries "
    f"{r['temporaries_gib']:.2f} GiB, outputs {r['outputs_gib']:.2f} GiB (donated "
    f"{r['aliased_gib']:.2f}), total {r['total_gib']:.2f} GiB of {r['hbm_gib']} GiB HBM: "
    + ("fits" if r["fits"] else "DOES NOT FIT"),
    f"FLOPs per step: {r['flops_per_step']:.3e} ({r['flops_per_chip']:.3e} per chip, XLA "
    f"cost analysis, recomputation included)",
    f"at {r['peak_tflops_per_chip']:g} TFLOP/s bf16 per chip, 50% utilisation is a "
    f"{r['step_time_at_50pct_mfu']:.3g} s step",
  ]
  if "mfu" in r:
    lines.append(f"a {r['step_time']} s step would be {100 * r['mfu']:.1f}% utilisation")
  return "\n".join(lines)


def skip_hint(config: ml_collections.ConfigDict) -> str | None:
  """What else to try when a step does not fit: the other form of the non-finite skip. Neither
  form is smaller everywhere (docs/scaling.md's AOT table has both), and only a compile tells."""
  if config.skip_nonfinite == "cond":
    return None
  return (
    "the step skips non-finite updates with `where` on TPUs; `cond` lays memory out "
    "differently and can fit where it does not: try --config.skip_nonfinite=cond"
  )


def arg_parser() -> argparse.ArgumentParser:
  """`--config` and `--topology` (`config.parse_args` adds the `--config.a.b=value` overrides)."""
  parser = config_lib.arg_parser("python -m smartclip_jax.aot", __doc__)
  parser.add_argument(
    "--topology",
    required=True,
    help=f"chip:shape, e.g. v5p:4x4x4, v5e:16x16 (chips: {sorted(CHIPS)})",
  )
  parser.add_argument("--step_time", type=float, help="seconds per step, for the utilisation")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  config, args = config_lib.parse_args(arg_parser(), sys.argv[1:] if argv is None else argv)
  start = time.perf_counter()
  try:
    compiled, mesh = compile_step(config, args.topology)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # libtpu refuses to finish a program that cannot fit; its message says by how much.
    message = str(e).split("RESOURCE_EXHAUSTED: ")[-1].splitlines()[0]
    print(
      f"{args.config} on {args.topology}, global batch {config.batch_size}: DOES NOT FIT: {message}"
    )
    if hint := skip_hint(config):
      print(hint)
    print(
      json.dumps(
        {
          "config": args.config,
          "batch_size": config.batch_size,
          "topology": args.topology,
          "fits": False,
          "error": message,
        }
      )
    )
    return 1
  r = report(compiled, mesh, args.topology, args.step_time)
  print(format_report(r, args.config, config.batch_size, time.perf_counter() - start))
  if config.model.scan_layers:
    r["flops_undercounted"] = True
    print(
      "model.scan_layers: XLA's cost analysis counts a loop body once, not once per layer, "
      "so the FLOPs above leave out all but one block of each tower; compile without it "
      "for FLOPs (memory is right)"
    )
  if not r["fits"] and (hint := skip_hint(config)):
    print(hint)
  print(json.dumps({"config": args.config, "batch_size": config.batch_size, **r}))
  return 0 if r["fits"] else 1


if __name__ == "__main__":
  sys.exit(main())
