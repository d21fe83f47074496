"""SmartCLIP's masked similarity, forward + backward, on 8 CPU devices: our factorised form vs
the reference's form, which builds every caption's masked copy of every image embedding.

  python benchmarks/masked_loss.py [--dim 768] [--batches 1024 2048 ...] [--repeats 5]

Per global batch B (captions split over the 8 devices, images gathered): per-device temporary
memory from XLA's compiled memory analysis, and the median time of a jitted loss + gradient
(run only where the whole host can hold it). Prints a table, then ratios at the first batch;
the last line is one JSON object with every figure.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from smartclip_jax import losses, sharding  # noqa: E402

HOST_BUDGET = 16 * 2 ** 30  # run a form only when 8 devices' temporaries fit in this (24 GiB host)


def reference_similarity(img: jax.Array, txt: jax.Array, masks: jax.Array) -> jax.Array:
  """S[i, j] = cos(m_j * z_i, t_j) through the [captions, images, D] tensor of masked copies."""
  masked = masks[:, None, :] * img[None, :, :]
  masked = masked / jnp.linalg.norm(masked, axis=-1, keepdims=True)
  return jnp.einsum("jid,jd->ij", masked, losses.l2_normalize(txt))


def loss_of(similarity):
  """The SmartCLIP objective's alignment part on a similarity function (same for both)."""
  def loss(img, txt, masks):
    logits = similarity(img, txt, masks) / 0.01
    labels = jnp.arange(logits.shape[0])
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


FORMS = {"factorised": loss_of(losses.masked_similarity),
         "reference": loss_of(reference_similarity)}


def inputs(batch: int, dim: int, mesh) -> tuple[jax.Array, ...]:
  rng = np.random.default_rng(0)
  rows = sharding.batch_sharding(mesh)
  img = rng.standard_normal((batch, dim), np.float32)
  txt = rng.standard_normal((batch, dim), np.float32)
  masks = (rng.random((batch, dim)) < 0.5).astype(np.float32)
  return tuple(jax.device_put(x, rows) for x in (img, txt, masks))


def measure(form: str, batch: int, dim: int, repeats: int, mesh) -> dict:
  args = inputs(batch, dim, mesh)
  compiled = FORMS[form].lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  row = {"form": form, "batch": batch, "temp_mib_per_device": temp / 2 ** 20}
  if temp * mesh.devices.size > HOST_BUDGET:
    return {**row, "ms": None}
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {**row, "ms": 1e3 * float(np.median(times))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--batches", type=int, nargs="+",
                      default=[1024, 2048, 4096, 8192, 16384, 32768])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  mesh = sharding.data_mesh()
  rows = []
  print(f"{'form':>11} {'global B':>9} {'temp MiB/device':>16} {'fwd+bwd ms':>11}")
  for batch in args.batches:
    for form in FORMS:
      r = measure(form, batch, args.dim, args.repeats, mesh)
      rows.append(r)
      ms = f"{r['ms']:.1f}" if r["ms"] is not None else "not run"
      print(f"{form:>11} {batch:>9} {r['temp_mib_per_device']:>16.1f} {ms:>11}", flush=True)
  first = {r["form"]: r for r in rows if r["batch"] == args.batches[0]}
  f, ref = first["factorised"], first["reference"]
  ratios = {"batch": args.batches[0],
            "memory_ratio": ref["temp_mib_per_device"] / f["temp_mib_per_device"],
            "speed_ratio": (ref["ms"] / f["ms"]) if ref["ms"] and f["ms"] else None}
  print(f"at B={ratios['batch']}, D={args.dim}: the reference form needs "
        f"{ratios['memory_ratio']:.0f}x the per-device memory"
        + (f" and {ratios['speed_ratio']:.1f}x the time" if ratios["speed_ratio"] else ""))
  print(json.dumps({"dim": args.dim, "devices": mesh.devices.size, "rows": rows,
                    "ratios": ratios}))


if __name__ == "__main__":
  main()
