"""Does a compiled step fit its devices? XLA's memory analysis against what a device holds.

A step that cannot fit dies inside XLA with an allocation error (on a CPU host, after trying to
map hundreds of GB), so the trainer asks before the first step runs and stops with the figure
and the ways out; `aot.py` asks the same of TPU slices from a CPU host.
"""

from __future__ import annotations

import os

import jax
import ml_collections

GB = 1e9


class DoesNotFit(MemoryError):
  """A compiled step needs more memory than a device has."""


def step_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program: its arguments, outputs (less what is donated back
  into the arguments), temporaries and code, and their `total`."""
  m = compiled.memory_analysis()
  parts = {
    "arguments": m.argument_size_in_bytes,
    "outputs": m.output_size_in_bytes,
    "aliased": m.alias_size_in_bytes,
    "temporaries": m.temp_size_in_bytes,
    "code": m.generated_code_size_in_bytes,
  }
  kept = parts["arguments"] + parts["outputs"] - parts["aliased"]
  return {**parts, "total": kept + parts["temporaries"] + parts["code"]}


def device_bytes(device: jax.Device) -> int | None:
  """What one device can hold: the allocator's limit on GPUs and TPUs; on a CPU host, its
  physical memory shared by the process's CPU devices. None when the runtime does not say."""
  if device.platform == "cpu":
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return physical // len(jax.local_devices(backend="cpu"))
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001  some runtimes do not implement it
    return None
  return stats.get("bytes_limit")


def check_fits(
  compiled: jax.stages.Compiled, device: jax.Device, config: ml_collections.ConfigDict
) -> None:
  """Raises `DoesNotFit`, with the figures and what to change, when the step cannot fit."""
  have = device_bytes(device)
  need = step_bytes(compiled)
  if have is None or need["total"] <= have:
    return
  raise DoesNotFit(
    f"the train step needs {need['total'] / GB:.1f} GB per device (temporaries "
    f"{need['temporaries'] / GB:.1f} GB, state and batch {need['arguments'] / GB:.1f} GB) and a "
    f"{device.platform} device here holds {have / GB:.1f} GB; stopped before the first step. "
    "Ways out: a smaller batch_size (now "
    f"{config.batch_size}); accum_steps=K (K micro-batches, the same loss and gradients, now "
    f"{config.accum_steps}); model.remat=full (now {config.model.remat}); mesh.fsdp=N (parameters "
    f"and optimizer state sharded over N devices, now {config.mesh.fsdp}); "
    + ("model.dtype=bfloat16 on TPU/GPU; " if config.model.dtype == "float32" else "")
    + "and for a TPU slice, "
    "`python -m smartclip_jax.aot --config ... --topology v5p:2x2x1` sizes the step from this "
    "host before you pay for the slice"
  )
