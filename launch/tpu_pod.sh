#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: one process per TPU worker, all started at once.
#
# Usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE --config FILE --workdir DIR
#            [--version RUNTIME] [--spot] [--data-bucket BUCKET[:MOUNT]] [--python BIN]
#            [--dry-run] [-- TRAIN_ARGS...]
#
#   --name NAME          the TPU VM: created if missing, reused if it exists, recreated if preempted
#   --zone ZONE          e.g. us-east5-a
#   --accelerator TYPE   e.g. v5p-64 (used when the slice is created)
#   --version RUNTIME    TPU software version for the accelerator (default v2-alpha-tpuv5)
#   --spot               create a Spot slice (cheaper; may be preempted: rerun to resume)
#   --config FILE        a configs/*.py file, relative to the repository root
#   --workdir DIR        gs://BUCKET/PATH (preferred: checkpoints and logs written natively), or an
#                        absolute path that every worker shares (NFS, a gcsfuse mount)
#   --data-bucket B[:M]  mount bucket B read-only with gcsfuse at M (default /mnt/gcs/B) on every
#                        worker before training (installs gcsfuse where missing); point
#                        --config.data.path at files under M
#   --python BIN         the workers' Python 3.11 for the venv (default python3.11, installed
#                        with apt where missing; another that is not 3.11 stops the launch)
#   --follow             after starting, print worker 0's log as it grows (Ctrl-C stops
#                        following, not the run)
#   --dry-run            print every command, one per line after `+ `, and run none
#   -- TRAIN_ARGS...     passed to the train command as they are: --config.a.b=value overrides,
#                        which may also come before `--`
#
# Steps: (1) create or reuse the slice, and stop (changing nothing) if a run is still going on
# any worker; (2) pack the committed HEAD with `git archive` (uncommitted changes stay behind) and
# scp it to every worker; (3) unpack it into ~/smartclip_jax and install requirements.txt and
# requirements-tpu.txt into ~/smartclip_venv (and tcmalloc with apt where missing), and mount the
# data bucket if one is given; (4) start
# the train command on all workers at once (ssh --worker=all), detached from the ssh session
# (setsid nohup: the run outlives the launcher and a dropped connection), each worker appending
# to ~/smartclip_train.log; the processes find each other by themselves (jax.distributed on a TPU
# slice). SIGTERM or SIGHUP to the run saves a checkpoint and stops it. Rerun the same command to
# resume from the latest checkpoint in --workdir.
set -euo pipefail
source "$(dirname "$0")/common.sh"

name='' zone='' accelerator='' version=v2-alpha-tpuv5 spot=() config='' workdir=''
python=python3.11 dry_run=0 follow=0 train_args=() data_bucket=''
while (($#)); do
  case $1 in
    --name|--zone|--accelerator|--version|--config|--workdir|--python)
      (($# >= 2)) || die "$1 needs a value"
      declare "${1#--}=$2"; shift 2 ;;  # --name VALUE sets $name, and so on
    --data-bucket) (($# >= 2)) || die "$1 needs a value"; data_bucket=$2; shift 2 ;;
    --spot) spot=(--spot); shift ;;
    --follow) follow=1; shift ;;
    --) shift; train_args+=("$@"); break ;;
    *) common_option "$1"; shift ;;
  esac
done
for option in name zone accelerator config workdir; do
  [[ -n ${!option} ]] || die "--$option is required"
done
[[ $workdir == gs://?* || $workdir == /* ]] ||
  die "--workdir must be gs://BUCKET/PATH or an absolute path that every worker shares"
data_bucket=${data_bucket#gs://}  # gs://BUCKET works too
bucket=${data_bucket%%:*} mount=${data_bucket#*:}
[[ $data_bucket == *:* ]] || mount=/mnt/gcs/$bucket
[[ -z $data_bucket || ($bucket =~ ^[a-z0-9][a-z0-9._-]*$ && $mount == /*) ]] ||
  die "--data-bucket takes BUCKET or BUCKET:/ABSOLUTE/MOUNT"
[[ $dry_run == 1 ]] || command -v gcloud >/dev/null ||
  fail "gcloud not found on PATH: install the Google Cloud SDK, or use --dry-run"

tpu=(gcloud compute tpus tpu-vm)
where=("$name" --zone "$zone")

# (1) The slice. `describe` tells whether it exists; --dry-run cannot know, so it shows `create`.
create=("${tpu[@]}" create "${where[@]}" --accelerator-type "$accelerator" --version "$version"
        "${spot[@]}")
show "${tpu[@]}" describe "${where[@]}" --format='value(state)'
if [[ $dry_run == 1 ]]; then
  show "${create[@]}"
else
  state=$("${tpu[@]}" describe "${where[@]}" --format='value(state)' 2>/dev/null || true)
  case $state in
    '') run "${create[@]}" ;;
    PREEMPTED) run "${tpu[@]}" delete "${where[@]}" --quiet; run "${create[@]}" ;;
    *) echo "# $name exists ($state): reusing it" ;;
  esac
fi

# (1b) Refuse while a run is still going on any worker, before anything on them changes: the
# setup below replaces the code a run is using. The pid file alone is not proof, since a pid of a
# run long gone may now be another process's: that process must be a train command too. ssh
# commands start in the home directory.
busy="a run is still going on this worker (pid \$pid): follow it with"
busy+=" tail -F ~/smartclip_train.log, or stop it (and save) with kill \$pid"
check="pid=\$(cat smartclip_train.pid 2>/dev/null) && [ -n \"\$pid\" ]"
check+=" && ps -o args= -p \"\$pid\" 2>/dev/null | grep -q 'smartclip_jax[.]train'"
check+=" && { echo \"\$(hostname): $busy\" >&2; exit 1; }; exit 0"
run "${tpu[@]}" ssh "${where[@]}" --worker=all --command "$check" ||
  fail "not launching: a worker is still running (said above) or did not answer; nothing changed"

# (2) The code, as committed.
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=${TMPDIR:-/tmp}/smartclip_jax-$name.tar.gz
run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
run "${tpu[@]}" scp "$tarball" "$name:smartclip_jax.tar.gz" --zone "$zone" --worker=all

# (3) Python 3.11 (the pins need it), then unpack and install on every worker.
py=$(quote "$python")
need="the workers need Python 3.11 for the pinned requirements: install it (sudo apt-get install"
need+=" -y python3.11 python3.11-venv) or name one with --python"
setup="(command -v $py >/dev/null"
[[ $python != python3.11 ]] ||
  setup+=" || (sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv)"
setup+=") && $py -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'"
setup+=" || { echo \"\$(hostname): $need\" >&2; exit 1; }"
setup+=" && rm -rf smartclip_jax && mkdir smartclip_jax"
setup+=" && tar -xzf smartclip_jax.tar.gz -C smartclip_jax"
setup+=" && $py -m venv smartclip_venv"
setup+=" && smartclip_venv/bin/pip install -q"
setup+=" -r smartclip_jax/requirements.txt -r smartclip_jax/requirements-tpu.txt"
# tcmalloc for the host side (the trainer preloads it when present, smartclip_jax/malloc.py);
# best effort: a worker without it trains on glibc's malloc.
tcmalloc="sudo apt-get install -y -q libtcmalloc-minimal4"
setup+=" && { ldconfig -p | grep -q libtcmalloc_minimal || $tcmalloc >/dev/null 2>&1"
setup+=" || { sudo apt-get update -q >/dev/null 2>&1 && $tcmalloc >/dev/null 2>&1; } || true; }"
run "${tpu[@]}" ssh "${where[@]}" --worker=all --command "$setup"

# (3b) The data bucket, read-only on every worker (gcsfuse from Google's apt repository if absent).
if [[ -n $data_bucket ]]; then
  repo_line='deb [signed-by=/usr/share/keyrings/cloud.google.asc]'
  # shellcheck disable=SC2016  # $(lsb_release -cs) is left for the worker's shell: its release
  repo_line+=' https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main'
  install="curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  install+=" | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
  install+=" && echo \"$repo_line\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
  install+=" && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse"
  m=$(quote "$mount")
  fuse="(command -v gcsfuse >/dev/null || ($install))"
  fuse+=" && sudo mkdir -p $m && sudo chown \"\$USER\" $m"
  fuse+=" && (mountpoint -q $m || gcsfuse -o ro --implicit-dirs $(quote "$bucket") $m)"
  run "${tpu[@]}" ssh "${where[@]}" --worker=all --command "$fuse"
fi

# (4) Train on every worker at once, detached. The log is appended to, a line marking each
# start: the previous run's log (why it stopped) outlives a resume.
train=(../smartclip_venv/bin/python -m smartclip_jax.train --config "$config"
       --workdir "$workdir" "${train_args[@]}")
start="cd smartclip_jax"
start+=" && echo \"# \$(date -u +%Y-%m-%dT%H:%M:%SZ) launching a run\" >> ../smartclip_train.log"
start+=" && { setsid nohup $(quote "${train[@]}") >> ../smartclip_train.log 2>&1 < /dev/null &"
start+=" echo \$! > ../smartclip_train.pid; }"
run "${tpu[@]}" ssh "${where[@]}" --worker=all --command "$start"
follow_cmd=("${tpu[@]}" ssh "${where[@]}" --worker=0 --command "tail -n 100 -F smartclip_train.log")
echo "# started on every worker; worker 0's log: $(quote "${follow_cmd[@]}")"
[[ $follow == 0 ]] || run "${follow_cmd[@]}"
