#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): images/s and MFU of the B/16 recipe step in bf16 at
# the largest batch one GPU holds, global vs ring loss, and transformers' CLIPModel under
# torch.compile. Under 8 minutes on one GPU; `--tiny` runs a tiny model on the CPU.
#   bash benchmarks/gpu_check.sh [--tiny] [gpu_check.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, where the package is not installed
if [[ " $* " == *" --tiny "* ]]; then
  export JAX_PLATFORMS=cpu
fi
# XLA may use 95 % of the GPU, allocated as needed: the PyTorch child runs first beside it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
