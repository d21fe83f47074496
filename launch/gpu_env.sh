# shellcheck shell=bash
# The GPU settings shared by multi_gpu.sh and slurm.sbatch; sourced, never run. A value already in
# the environment wins (flags given in XLA_FLAGS come last, and the last copy of a flag counts), so
# `XLA_FLAGS=--xla_gpu_enable_triton_gemm=true launch/multi_gpu.sh ...` overrides one of them.
# tests/test_launch.py checks that the pinned jaxlib knows every flag below.

# Preallocate 90 % of each GPU's memory up front (JAX's default is 75 %; NVIDIA's JAX guide uses
# 0.9): more room for activations, and preallocation avoids fragmentation. XLA_CLIENT_MEM_FRACTION
# is the current name; jaxlib refuses to start when the deprecated XLA_PYTHON_CLIENT_MEM_FRACTION
# is also set, so a value given under the old name moves to the new one.
export XLA_CLIENT_MEM_FRACTION="${XLA_CLIENT_MEM_FRACTION:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}}"
unset XLA_PYTHON_CLIENT_MEM_FRACTION

gpu_flags=(
  # Overlap collectives (the gradient all-reduce, FSDP all-gathers) with compute by scheduling them
  # asynchronously; off by default (JAX's GPU performance tips).
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Matmuls through cuBLAS only, not Triton-generated GEMM kernels (on by default), as NVIDIA's JAX
  # performance guide sets it; fewer kernels to autotune also shortens compilation.
  --xla_gpu_enable_triton_gemm=false
)
export XLA_FLAGS="${gpu_flags[*]}${XLA_FLAGS:+ $XLA_FLAGS}"

# NCCL picks its transports and protocols (NVLink, InfiniBand) by itself; its documentation asks
# that tuning variables such as NCCL_PROTO stay out of scripts. WARN makes NCCL print its own
# reason when a collective fails, which XLA's error message alone does not give.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# What the launchers print (and --dry-run shows) before they start the run.
# shellcheck disable=SC2034  # used by the launchers
gpu_env_names=(XLA_CLIENT_MEM_FRACTION XLA_FLAGS NCCL_DEBUG)
