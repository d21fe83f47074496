#!/usr/bin/env bash
# Trains on one host with all its GPUs: one process, to which JAX shows every local GPU.
#
# Usage: launch/multi_gpu.sh --config FILE --workdir DIR [--gpus 0,1,2,3] [--dry-run]
#            [-- TRAIN_ARGS...]
#
#   --config FILE       a configs/*.py file, relative to the repository root
#   --workdir DIR       run directory, relative to the repository root or absolute
#   --gpus LIST         the GPUs to use (sets CUDA_VISIBLE_DEVICES); default all
#   --dry-run           print the environment and the command, and run nothing
#   -- TRAIN_ARGS...    passed to the train command as they are: --config.a.b=value overrides,
#                       which may also come before `--`
#
# The XLA and NCCL settings come from launch/gpu_env.sh (one comment there says why for each). Run
# it with the project's venv active; it starts in the repository root and becomes the train process
# (exec), so a SIGTERM sent to it reaches the run, which saves a checkpoint and stops. Rerun the
# same command to resume.
set -euo pipefail
source "$(dirname "$0")/common.sh"

config='' workdir='' gpus='' dry_run=0 train_args=()
while (($#)); do
  case $1 in
    --config|--workdir|--gpus)
      (($# >= 2)) || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;  # --config VALUE sets $config, and so on
    --) shift; train_args+=("$@"); break ;;
    *) common_option "$1"; shift ;;
  esac
done
[[ -n $config ]] || die "--config is required"
[[ -n $workdir ]] || die "--workdir is required"

source "$(dirname "$0")/gpu_env.sh"
env_names=("${gpu_env_names[@]}")
if [[ -n $gpus ]]; then
  [[ $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus takes GPU indices like 0,1,2,3, not '$gpus'"
  export CUDA_VISIBLE_DEVICES=$gpus
  env_names+=(CUDA_VISIBLE_DEVICES)
fi

show_env "${env_names[@]}"
run cd "$(cd "$(dirname "$0")/.." && pwd)"
train=(python -m smartclip_jax.train --config "$config" --workdir "$workdir" "${train_args[@]}")
show "${train[@]}"
[[ $dry_run == 1 ]] || exec "${train[@]}"
