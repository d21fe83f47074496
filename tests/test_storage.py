"""Run directories in a bucket (a local GCS emulator) and on gcsfuse-like mounts: saves commit by
file, bad checkpoints are set aside without renaming directories, a bucket that cannot be
written stops the run before its first step, and evaluate and convert write there too."""

import http.server
import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

import smartclip_jax
from smartclip_jax import checkpoint, config as config_lib, storage, train
from tests.conftest import DEMO, REPO, TINY
from tests.gcs_emulator import endpoint_env, free_port
from tests.test_checkpoint import restore, save_steps
from tests.test_evaluate_cli import urban1k_folder

MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
my-bucket /mnt/bucket fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=0,group_id=0 0 0
tmpfs /mnt/bucket/tmp tmpfs rw 0 0
"""


def test_the_mount_type_of_a_path_is_that_of_its_deepest_mount():
  assert storage.mount_type("/mnt/bucket/runs/a", MOUNTS) == "fuse.gcsfuse"
  assert storage.mount_type("/mnt/bucket", MOUNTS) == "fuse.gcsfuse"
  assert storage.mount_type("/mnt/bucket/tmp/x", MOUNTS) == "tmpfs"
  assert storage.mount_type("/mnt/bucketful", MOUNTS) == "ext4"


def test_commit_file_for_buckets_and_when_asked(tmp_path):
  assert storage.commit_file("gs://b/run") and not storage.commit_file(tmp_path)
  assert storage.commit_file(tmp_path, "commit_file") and not storage.commit_file(
    "gs://b", "rename"
  )
  with pytest.raises(ValueError, match="choose one of"):
    storage.commit_file(tmp_path, "atomic")
  with pytest.raises(config_lib.ConfigError, match="checkpoint_atomicity"):
    config_lib.load(DEMO, ["checkpoint_atomicity=atomic"])


@pytest.mark.parametrize("kind", ["fuse.gcsfuse", "fuse", "fuse.gcsfuse2"])
def test_fuse_mounts_commit_by_file_whatever_their_name(tmp_path, monkeypatch, kind):
  """GKE's GCS FUSE CSI driver mounts a bucket with type `fuse`, gcsfuse with `fuse.gcsfuse`."""
  mounts = tmp_path / "mounts"
  mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nbucket {tmp_path} {kind} rw 0 0\n")
  monkeypatch.setattr(storage, "MOUNTS", mounts)
  assert storage.commit_file(tmp_path / "run")


def test_a_directory_that_refuses_renames_commits_by_file(tmp_path, monkeypatch):
  """Not every such file system has a telling name: a rename tried at start-up decides."""
  assert storage.renames_directories(tmp_path) and not storage.commit_file(tmp_path)
  refuse_directory_renames(monkeypatch)
  assert not storage.renames_directories(tmp_path) and storage.commit_file(tmp_path)
  assert os.listdir(tmp_path) == []  # the probe leaves nothing behind


def refuse_directory_renames(monkeypatch):
  """What gcsfuse does on a flat bucket: a directory (with subdirectories) cannot be renamed."""
  real = os.rename

  def rename(src, dst, *args, **kwargs):
    if os.path.isdir(src):
      raise OSError(38, "Function not implemented (gcsfuse: directory rename)", src)
    return real(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "rename", rename)


def truncate_state_files(step_dir):
  """A save cut short by a dying disk (not one Orbax left unfinished): large files cut to 1/3."""
  for f in storage.files(step_dir / "state"):
    if f.stat().length > 1000:
      f.write_bytes(f.read_bytes()[: f.stat().length // 3])


@pytest.mark.slow
def test_commit_file_saves_and_sets_aside_where_directories_cannot_be_renamed(
  demo_config, tmp_path, monkeypatch
):
  refuse_directory_renames(monkeypatch)
  demo_config.checkpoint_atomicity = "commit_file"
  saved = save_steps(demo_config, tmp_path / "ckpt", [10, 20])
  assert (tmp_path / "ckpt" / "20" / "commit_success.txt").is_file()
  truncate_state_files(storage.path(tmp_path / "ckpt" / "20"))
  state, _ = restore(demo_config, tmp_path / "ckpt")
  assert int(state.step) == 10
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved.params)
  assert (tmp_path / "ckpt.unusable" / "20" / "commit_success.txt").is_file()
  assert not (tmp_path / "ckpt" / "20").exists()


@pytest.mark.slow
def test_a_truncated_checkpoint_in_a_bucket_falls_back_and_is_set_aside(demo_config, gcs):
  directory = storage.path(f"{gcs}/fallback/checkpoints")
  saved = save_steps(demo_config, directory, [10, 20])
  assert (directory / "20" / "commit_success.txt").exists()
  truncate_state_files(directory / "20")
  state, _ = restore(demo_config, directory)
  assert int(state.step) == 10
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), saved.params)
  assert (storage.path(f"{gcs}/fallback/checkpoints.unusable") / "20" / "state").is_dir()
  assert not (directory / "20").exists()
  assert checkpoint.Checkpointer(directory, keep=5).manager.all_steps() == [10]


class Forbidden(http.server.BaseHTTPRequestHandler):
  """A GCS endpoint where the account may read nothing and write nothing."""

  def _refuse(self):
    body = json.dumps(
      {"error": {"code": 403, "message": "caller does not have storage.objects.create access"}}
    ).encode()
    self.send_response(403)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

  def log_message(self, *args):
    pass


def check_in_subprocess(workdir: str, env: dict) -> subprocess.CompletedProcess:
  """`storage.check_writable` as `train.setup` runs it, in a process with only `env`'s GCS
  settings (GCS clients cache their endpoint per process)."""
  clean = {k: v for k, v in os.environ.items() if k not in endpoint_env("")}
  code = (
    "import sys; from smartclip_jax import storage\n"
    "try:\n  storage.check_writable(storage.path(sys.argv[1]), '.write_check.0')\n"
    "except storage.StorageError as e:\n  sys.exit(str(e))\n"
  )
  return subprocess.run(
    [sys.executable, "-c", code, workdir],
    env={**clean, "PYTHONPATH": REPO, "NO_GCE_CHECK": "True", **env},
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.slow  # three child processes against the emulator: 40 s
def test_a_bucket_that_cannot_be_written_is_named_with_the_reason(gcs):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    cases = {
      "the bucket does not exist": ("gs://no-such-bucket/run", os.environ),
      "permission denied": (
        "gs://locked/run",
        endpoint_env(f"http://127.0.0.1:{server.server_address[1]}"),
      ),
      "cannot be reached": ("gs://b/run", endpoint_env(f"http://127.0.0.1:{free_port()}")),
      "no Google Cloud credentials": (
        "gs://b/run",
        {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"},
      ),
    }
    for reason, (workdir, env) in cases.items():
      env = {k: v for k, v in env.items() if k in endpoint_env("") or k.startswith("GOOGLE_")}
      done = check_in_subprocess(workdir, env)
      assert done.returncode != 0 and f"cannot write to {workdir}: " in done.stderr, done.stderr
      assert reason in done.stderr, done.stderr
  finally:
    server.shutdown()


def test_train_stops_before_the_first_step_when_the_bucket_is_missing(tmp_path, gcs):
  done = subprocess.run(
    [sys.executable, "-m", "smartclip_jax.train", "--config", DEMO]
    + ["--workdir", "gs://no-such-bucket/run", *(f"--config.{o}" for o in TINY)],
    env={**os.environ, "PYTHONPATH": REPO},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 1
  assert (
    done.stderr.strip()
    .splitlines()[-1]
    .startswith(
      "smartclip_jax.train: cannot write to gs://no-such-bucket/run: the bucket does not exist"
    )
  ), done.stderr
  assert "step" not in done.stderr.lower().replace("first step", "")


@pytest.mark.slow
def test_a_run_in_a_bucket_writes_everything_there_and_evaluate_and_convert_too(gcs, tmp_path):
  from smartclip_jax import convert, evaluate

  workdir = f"{gcs}/runs/demo"
  config = config_lib.load(DEMO, TINY + ["total_steps=2", "log_every=1", "eval.best_metric=i2t_r1"])
  results = train.train_and_evaluate(config, workdir)
  root = storage.path(workdir)
  assert json.loads((root / "config.json").read_text())["total_steps"] == 2
  logged = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
  assert logged == [1, 2]
  assert json.loads((root / "eval" / "step_2.json").read_text())["i2t_r1"] == results["i2t_r1"]
  assert list((root / "tensorboard").glob("events.out.tfevents.*"))
  assert (root / "checkpoints" / "2" / "commit_success.txt").exists()
  assert (root / "checkpoints_best" / "2" / "commit_success.txt").exists()
  assert not list(root.glob(".write_check*"))
  model = smartclip_jax.load(workdir)
  local = smartclip_jax.load(checkpoint.resolve_step_dir(workdir))
  jax.tree.map(np.testing.assert_array_equal, model.params, local.params)

  convert.main(["--checkpoint", workdir, "--to", "hf", "--out", f"{gcs}/exports/hf"])
  assert (storage.path(f"{gcs}/exports/hf") / "model.safetensors").exists()
  convert.main(["--checkpoint", workdir, "--to", "openai", "--out", f"{gcs}/exports/m.pt"])
  convert.main(["--from", f"{gcs}/exports/m.pt", "--out", f"{gcs}/exports/back"])
  back = smartclip_jax.load(f"{gcs}/exports/back")
  jax.tree.map(np.testing.assert_array_equal, back.params, model.params)

  urban = urban1k_folder(tmp_path / "urban")
  evaluate.main(["--model", workdir, "--tasks", f"urban1k:{urban}", "--out", f"{gcs}/eval/demo"])
  out = storage.path(f"{gcs}/eval/demo")
  assert json.loads((out / "results.json").read_text())["urban1k"]["num_images"] == 12
  assert (out / "ranks" / "urban1k.npz").exists() and (out / "recall_at_k.png").exists()
  assert list((out / "cache").glob("urban1k-*.npz"))


@pytest.mark.parametrize("port", [40123, 40323, 40423, 4403])
def test_a_status_code_is_not_read_out_of_a_port_number(port):
  """A local endpoint's port (an emulator's, a proxy's) may hold 401, 403 or 404."""
  url = f"http://127.0.0.1:{port}/upload/storage/v1/b/no-such-bucket/o?name=run%2F.write_check.0"
  assert storage._reason(FileNotFoundError(url)).startswith("the bucket does not exist")
  assert storage._reason(OSError(f"{url}: 403 Forbidden")).startswith("permission denied")
