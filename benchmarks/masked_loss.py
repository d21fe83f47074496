"""SmartCLIP's alignment loss, forward + backward, over 8 CPU devices in three forms: the
reference's (every caption's masked copy of every image embedding), ours factorised over the
global batch (`loss_impl=global`), and ours blockwise around the devices (`loss_impl=ring`).

  python benchmarks/masked_loss.py [--dim 768] [--batches 1024 2048 ...] [--repeats 5]
      [--weak 8 16 32 64]

Per global batch B (split over the 8 devices): per-device temporary memory from XLA's compiled
memory analysis, and the median time of a jitted loss + gradient (run only where the whole host
can hold it). `--weak` also compiles (does not run) the global and ring forms at 128 examples
per device on that many simulated devices, one process each. Prints tables, then ratios at the
first batch; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import os
import sys

DEVICES = int(os.environ.get("MASKED_LOSS_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from smartclip_jax import losses, sharding  # noqa: E402

HOST_BUDGET = 16 * 2**30  # run a form only when 8 devices' temporaries fit in this (24 GiB host)


def reference_similarity(img: jax.Array, txt: jax.Array, masks: jax.Array) -> jax.Array:
  """S[i, j] = cos(m_j * z_i, t_j) through the [captions, images, D] tensor of masked copies."""
  masked = masks[:, None, :] * img[None, :, :]
  masked = masked / jnp.linalg.norm(masked, axis=-1, keepdims=True)
  return jnp.einsum("jid,jd->ij", masked, losses.l2_normalize(txt))


def reference_loss(img: jax.Array, txt: jax.Array, masks: jax.Array) -> jax.Array:
  """The alignment part of the SmartCLIP objective (temperature 0.01) on the reference form."""
  rows, cols = losses.cross_entropies(
    losses.softmax_stats(reference_similarity(img, txt, masks) / 0.01)
  )
  return rows + cols


def ours(impl: str):
  return lambda img, txt, masks: losses.smartclip_loss(
    img, txt, masks, temperature=0.01, align_weight=1.0, sparsity_weight=0.0, impl=impl
  )[0]


FORMS = {
  name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
  for name, fn in (
    ("reference", reference_loss),
    ("factorised", ours("global")),
    ("ring", ours("ring")),
  )
}


def inputs(batch: int, dim: int, mesh) -> tuple[jax.Array, ...]:
  rng = np.random.default_rng(0)
  rows = sharding.batch_sharding(mesh)
  img = rng.standard_normal((batch, dim), np.float32)
  txt = rng.standard_normal((batch, dim), np.float32)
  masks = (rng.random((batch, dim)) < 0.5).astype(np.float32)
  return tuple(jax.device_put(x, rows) for x in (img, txt, masks))


def temp_mib(form: str, batch: int, dim: int, mesh):
  rows = sharding.batch_sharding(mesh)
  spec = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
  with sharding.activate(mesh):
    compiled = FORMS[form].lower(spec, spec, spec).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes / 2**20


def measure(form: str, batch: int, dim: int, repeats: int, mesh) -> dict:
  compiled, temp = temp_mib(form, batch, dim, mesh)
  row = {"form": form, "batch": batch, "temp_mib_per_device": temp}
  if temp * 2**20 * mesh.devices.size > HOST_BUDGET:
    return {**row, "ms": None}
  args = inputs(batch, dim, mesh)
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {**row, "ms": 1e3 * float(np.median(times))}


WEAK_PER_DEVICE = 128


def weak_row(devices: int, dim: int) -> dict:
  """In a process with `devices` simulated devices: compiled temporaries of global and ring."""
  env = {**os.environ, "MASKED_LOSS_DEVICES": str(devices)}
  out = subprocess.run(
    [sys.executable, __file__, "--_weak_child", "--dim", str(dim)],
    env=env,
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument(
    "--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768]
  )
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--weak",
    type=int,
    nargs="*",
    default=[8, 16, 32, 64],
    help="device counts for the weak-scaling table (none: skip it)",
  )
  parser.add_argument("--_weak_child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  mesh = sharding.data_mesh()
  if args._weak_child:
    batch = WEAK_PER_DEVICE * DEVICES
    print(
      json.dumps(
        {
          "devices": DEVICES,
          "batch": batch,
          **{form: temp_mib(form, batch, args.dim, mesh)[1] for form in ("factorised", "ring")},
        }
      )
    )
    return
  rows = []
  print(f"{'form':>11} {'global B':>9} {'temp MiB/device':>16} {'fwd+bwd ms':>11}")
  for batch in args.batches:
    for form in FORMS:
      r = measure(form, batch, args.dim, args.repeats, mesh)
      rows.append(r)
      ms = f"{r['ms']:.1f}" if r["ms"] is not None else "not run"
      print(f"{form:>11} {batch:>9} {r['temp_mib_per_device']:>16.1f} {ms:>11}", flush=True)
  weak = []
  if args.weak:
    print(f"\nweak scaling, {WEAK_PER_DEVICE} examples per device (compiled, not run):")
    print(f"{'devices':>8} {'global B':>9} {'factorised MiB':>15} {'ring MiB':>9}")
  for devices in args.weak:
    w = weak_row(devices, args.dim)
    weak.append(w)
    print(f"{devices:>8} {w['batch']:>9} {w['factorised']:>15.1f} {w['ring']:>9.1f}", flush=True)
  first = {r["form"]: r for r in rows if r["batch"] == args.batches[0]}
  f, ref, rg = first["factorised"], first["reference"], first["ring"]
  ratio = lambda a, b: (a / b) if a and b else None
  ratios = {
    "batch": args.batches[0],
    "memory_ratio": ratio(ref["temp_mib_per_device"], f["temp_mib_per_device"]),
    "speed_ratio": ratio(ref["ms"], f["ms"]),
    "ring_time_vs_factorised": ratio(rg["ms"], f["ms"]),
  }
  print(
    f"at B={ratios['batch']}, D={args.dim}: the reference form needs "
    f"{ratios['memory_ratio']:.0f}x the per-device memory"
    + (f" and {ratios['speed_ratio']:.1f}x the time" if ratios["speed_ratio"] else "")
    + (
      f"; the ring takes {ratios['ring_time_vs_factorised']:.2f}x the factorised time"
      if ratios["ring_time_vs_factorised"]
      else ""
    )
  )
  print(
    json.dumps(
      {"dim": args.dim, "devices": mesh.devices.size, "rows": rows, "weak": weak, "ratios": ratios}
    )
  )


if __name__ == "__main__":
  main()
