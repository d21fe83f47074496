"""A local Google Cloud Storage for tests: gcp-storage-emulator (requirements-dev.txt) on
127.0.0.1, with the variables that point gcsfs, google-cloud-storage and TensorStore at it.

Run as a script, it is that emulator with two changes. One header is added: GCS sends an
object's generation as `x-goog-generation` with its bytes, and TensorStore (Orbax's array
writer, which makes conditional writes by generation) refuses a download without it. And the
emulator's metadata of every object ever written is no longer dumped to one JSON file after
each write: that made every write cost more than the one before, until a session's later runs
stalled on a one-threaded server (the metadata lives in memory, which is all tests need).

  python tests/gcs_emulator.py DATA_DIR PORT BUCKET
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

BUCKET = "smartclip-test"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def endpoint_env(url: str) -> dict[str, str]:
  """What the GCS clients read: gcsfs and google-cloud-storage STORAGE_EMULATOR_HOST,
  TensorStore its own URL and a token it sends as is (the emulator checks none). gcsfs is kept
  to its plain file system: its default one asks Google's control-plane API (which no emulator
  serves) for the bucket's layout before every operation, and logs a warning each time."""
  return {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
  }


@contextlib.contextmanager
def emulator(data_dir: str) -> Iterator[str]:
  """Runs the emulator with bucket BUCKET, its endpoint variables set in os.environ (so child
  processes inherit them); yields `gs://BUCKET`. Skips the test where it cannot start."""
  if importlib.util.find_spec("gcp_storage_emulator") is None:
    pytest.skip("gcp-storage-emulator is not installed (pip install -r requirements-dev.txt)")
  port = free_port()
  proc = subprocess.Popen(
    [sys.executable, __file__, data_dir, str(port), BUCKET],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.STDOUT,
  )
  deadline = time.time() + 30
  while True:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
      break
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.skip(f"gcp-storage-emulator did not start on 127.0.0.1:{port}")
    time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in endpoint_env("")}
  os.environ.update(endpoint_env(f"http://127.0.0.1:{port}"))
  try:
    yield f"gs://{BUCKET}"
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    proc.terminate()
    proc.wait(timeout=30)


def serve(data_dir: str, port: int, bucket: str) -> None:
  from gcp_storage_emulator.handlers import objects

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
    except Exception:  # noqa: BLE001  a missing object: `download` answers 404 itself
      pass
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation  # before `server` binds its handler table
  from gcp_storage_emulator.server import create_server
  from gcp_storage_emulator.storage import Storage

  Storage._write_config_to_file = lambda self: None

  logging.disable(logging.WARNING)
  create_server("127.0.0.1", port, default_bucket=bucket, data_dir=data_dir).run()


if __name__ == "__main__":
  serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
