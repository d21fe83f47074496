"""Throughput as MaxText reports it: TFLOP/s per device and MFU against the device's peak.

Two FLOP counts: the model's, from the architecture (`model_flops`, as MaxText's MFU), and the
hardware's, XLA's cost analysis of the compiled (SPMD-partitioned) step, so they are per device
and count what the program does, mask network and rematerialisation included (but a scanned
stack, `model.scan_layers`, is counted once, so its MFU reads low). The peak is the
chip's dense bf16 matrix rate from its data sheet (the rate MaxText divides by, whatever the
model's dtype) or, on a CPU, a large jitted matmul measured once in the model's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Collection

import jax
import jax.numpy as jnp

from smartclip_jax.models.vit import kept_patches

# Dense bf16 FLOP/s per JAX device, by a substring of `device_kind`, most specific first.
# TPU v2 and v3 expose each of a chip's two cores as a device: half the chip's rate.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
  ("TPU v2", 22.5e12),
  ("TPU v3", 61.5e12),
  ("TPU v4 lite", 137.5e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),  # v5e
  ("TPU v5", 459e12),  # v5p
  ("TPU v6 lite", 918e12),  # v6e (Trillium)
  ("TPU7x", 2307e12),  # Ironwood
  ("H100 PCIe", 756e12),
  ("H100", 989e12),
  ("H200", 989e12),
  ("GH200", 989e12),
  ("B200", 2250e12),
  ("A100", 312e12),
  ("L40S", 362e12),
  ("L4", 121e12),
)


def table_peak(device_kind: str) -> float | None:
  """The data-sheet peak of a device kind, or None if the table does not know it."""
  for name, peak in PEAK_FLOPS:
    if name in device_kind:
      return peak
  return None


@functools.cache
def measured_peak(dtype: str = "float32", n: int = 2048, repeats: int = 3) -> float:
  """FLOP/s of the best of `repeats` jitted n x n x n matmuls in `dtype` on the default device:
  the peak of a device with no data sheet here (a CPU). Measured once per process."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def compiled_flops(compiled: jax.stages.Compiled) -> float:
  """FLOPs of one call of a compiled program per device, from XLA's cost analysis (0 if the
  backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def mesh_peak(mesh: jax.sharding.Mesh, dtype: str = "float32") -> float:
  """Peak FLOP/s of one device of `mesh`. Simulated CPU devices share the host's cores, so a
  measured host peak is split between the process's local devices."""
  device = mesh.devices.flat[0]
  peak = table_peak(device.device_kind)
  if peak is not None:
    return peak
  return measured_peak(dtype) / max(1, len(jax.local_devices(backend=device.platform)))


def _blocks(tokens: int, width: int, layers: int) -> float:
  """Forward FLOPs of `layers` transformer blocks on `tokens` tokens: the q, k, v and output
  projections (8 t w^2), the 4x MLP (16 t w^2), and the attention scores and mix (4 t^2 w)."""
  return layers * (24 * tokens * width**2 + 4 * tokens**2 * width)


def tower_flops(config, text_length: int | None = None, train: bool = False) -> dict[str, float]:
  """Forward FLOPs of one example through each tower and the mask network
  (`model.mask_net`), by parameter prefix, counted from the architecture as MaxText counts
  them: matmuls only, full (not causal-halved) attention. `text_length`: the positions the
  text tower ran on (`model.text.trim_padding`), all of them by default; `train`: the image
  blocks see only the patches `model.patch_dropout` keeps."""
  m = config.model
  v, t = m.vision, m.text
  length = text_length or t.context_length
  patches = (v.image_size // v.patch_size) ** 2
  seen = kept_patches(patches, m.patch_dropout) if train else patches
  flops = {
    "visual": 2 * patches * 3 * v.patch_size**2 * v.width  # patch embedding
    + _blocks(seen + 1, v.width, v.layers)
    + 2 * v.width * m.embed_dim,
    "text": _blocks(length, t.width, t.layers) + 2 * t.width * m.embed_dim,
  }
  if m.mask_net:
    flops["mask_net"] = _blocks(length, t.width, 1) + 2 * length * t.width  # block, pooling
    if t.width != m.embed_dim:
      flops["mask_net"] += 2 * t.width * m.embed_dim
  return flops


def forward_flops(config, text_length: int | None = None) -> float:
  """Forward FLOPs of one example through the towers and the mask network (`tower_flops`)."""
  return sum(tower_flops(config, text_length).values())


def model_flops(config, text_length: int | None = None, frozen: Collection[str] = ()) -> float:
  """Model FLOPs of one training example, forward and backward (3x forward), without
  rematerialisation: `tower_flops` of a training pass and the example's row of the logits
  matrix (SmartCLIP's S takes two matmuls, a numerator and a norm). A tower in `frozen` (all
  its parameters frozen, `optim.frozen_towers`) runs forward only: nothing below it takes a
  gradient. MFU from these does not rise with remat, as the hardware figure
  (`compiled_flops`) does."""
  logits = 2 * config.batch_size * config.model.embed_dim * (2 if config.model.mask_net else 1)
  towers = tower_flops(config, text_length, train=True)
  return 3 * logits + sum((1 if k in frozen else 3) * f for k, f in towers.items())


@dataclasses.dataclass
class Meter:
  """Throughput between readings, per device: images per second, TFLOP/s and MFU from the
  hardware FLOPs (`compiled_flops`) and from the model's (`model_flops`), against `peak`."""

  peak: float  # one device's peak FLOP/s (`mesh_peak`)
  batch_size: int  # global
  since: tuple[float, int]  # (time, step) of the last reading
  flops: float = 0.0  # hardware FLOPs per device since then
  model_flops: float = 0.0  # model FLOPs per device since then

  def add(self, flops: float, model_flops: float) -> None:
    """One step's FLOPs per device."""
    self.flops += flops
    self.model_flops += model_flops

  def restart(self, step: int) -> None:
    """Counts from now, as at `step` (after the first, compiling, step)."""
    self.since, self.flops, self.model_flops = (time.perf_counter(), step), 0.0, 0.0

  def read(self, step: int) -> tuple[dict[str, float], float]:
    """The figures since the last reading and the seconds per step; restarts the count."""
    (last_time, last_step), now = self.since, time.perf_counter()
    seconds = now - last_time
    figures = {
      "images_per_sec": self.batch_size * (step - last_step) / seconds,
      "tflops_per_device": self.flops / seconds / 1e12,
      "mfu": self.flops / seconds / self.peak,
      "model_mfu": self.model_flops / seconds / self.peak,
    }
    self.since, self.flops, self.model_flops = (now, step), 0.0, 0.0
    return figures, seconds / max(step - last_step, 1)
