"""Per-chip memory and FLOPs of the recipes on TPU slices, compiled on this CPU host.

  python benchmarks/aot_table.py [--configs ...] [--batches 1024 32768] [--topologies ...]
      [--variants "" "loss_impl=ring" "loss_impl=ring,model.remat=full"]

Runs `python -m smartclip_jax.aot` once per (config, global batch, variant, topology), each in
its own process, and prints a markdown table; the last line is one JSON object with every row.
A variant is a comma-separated list of config overrides ("" is the config as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def compile_one(config: str, batch: int, topology: str, extra: list[str]) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "smartclip_jax.aot",
    "--config",
    config,
    "--topology",
    topology,
    f"--config.batch_size={batch}",
    *extra,
  ]
  start = time.perf_counter()
  proc = subprocess.run(
    cmd,
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"},
  )
  lines = proc.stdout.strip().splitlines()
  if proc.returncode not in (0, 1) or not lines:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return {**json.loads(lines[-1]), "compile_s": time.perf_counter() - start}


def row(r: dict) -> str:
  name = pathlib.Path(r["config"]).stem
  variant = r.get("variant") or "—"
  if "total_gib" not in r:
    return (
      f"| {name} | {r['batch_size']} | {variant} | {r['topology']} | no | — | — | {r['error']} |"
    )
  fits = "yes" if r["fits"] else "no"
  return (
    f"| {name} | {r['batch_size']} | {variant} | {r['topology']} ({r['chips']} chips) | "
    f"{fits} | "
    f"{r['total_gib']:.1f} of {r['hbm_gib']} | {r['flops_per_step']:.3g} | "
    f"args {r['arguments_gib']:.1f}, temps {r['temporaries_gib']:.1f} |"
  )


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--configs", nargs="+", default=["configs/smartclip_vitl14.py", "configs/smartclip_vitb16.py"]
  )
  parser.add_argument("--batches", nargs="+", type=int, default=[1024, 32768])
  parser.add_argument("--topologies", nargs="+", default=["v5p:4x4x4", "v5e:16x16"])
  parser.add_argument(
    "--variants",
    nargs="+",
    default=[""],
    help="comma-separated overrides per variant, e.g. loss_impl=ring",
  )
  parser.add_argument("--extra", nargs="*", default=[], help="--config.a=b for every compile")
  args = parser.parse_args()
  print(
    "| config | global batch | variant | slice | fits | GiB per chip | FLOPs per step | "
    "memory (GiB) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for config in args.configs:
    for batch in args.batches:
      for variant in args.variants:
        overrides = [f"--config.{o}" for o in variant.split(",") if o]
        for topology in args.topologies:
          r = compile_one(config, batch, topology, args.extra + overrides)
          rows.append({**r, "variant": variant})
          print(row(rows[-1]), flush=True)
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
