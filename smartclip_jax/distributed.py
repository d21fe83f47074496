"""Joining a multi-process JAX job: once per process, before anything touches a device.

  explicit   --coordinator_address HOST:PORT --num_processes N --process_id I (any cluster)
  SLURM      srun with more than one task: jax reads SLURM_JOB_ID, SLURM_NODELIST, SLURM_PROCID...
  Cloud TPU  a TPU VM (one host or a pod slice): jax reads the slice from the TPU metadata
  otherwise  one process, nothing to join

Initialising also starts JAX's preemption service, which turns a SIGTERM on any process into a
step that all processes agree to save at (see `preemption.py`).
"""

from __future__ import annotations

import glob
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("smartclip_jax")


def detect() -> str:
  """Which environment this process runs in: 'slurm', 'tpu' or 'single'."""
  if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU chips on this VM
    return "tpu"
  return "single"


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> str:
  """Calls `jax.distributed.initialize` the way this environment needs; returns which way."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError(
        "give all of --coordinator_address, --num_processes and --process_id, or none of them"
      )
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return "explicit"
  how = detect()
  if how != "single":
    jax.distributed.initialize()  # jax's own cluster detection fills in every argument
  return how


def gather(value: np.ndarray | int) -> np.ndarray:
  """`value` from every process, stacked on a new first axis in process order (a collective:
  every process calls it together)."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value[None]
  return np.asarray(multihost_utils.process_allgather(value))


def from_process_0(values: list[int]) -> list[int]:
  """Process 0's list of (int32) integers, on every process (a collective), so that all
  processes walk the same list whatever each of them sees."""
  size = int(gather(len(values))[0])
  padded = np.zeros(max(size, 1), np.int32)
  padded[: min(size, len(values))] = values[:size]
  return [int(v) for v in gather(padded)[0][:size]]
