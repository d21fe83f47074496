"""Where a run's outputs live: a local directory, a gcsfuse mount or an object store (`gs://`).

Everything a run writes goes through `etils.epath` (gcsfs under `gs://`; Orbax's arrays go
through TensorStore, which talks to GCS itself). Object stores and gcsfuse mounts cannot rename
a directory (gcsfuse on a flat bucket refuses to rename one with subdirectories, and a rename on
GCS is a copy anyway), so there checkpoints are committed by a `commit_success.txt` file and a
checkpoint set aside is copied, then deleted (`checkpoint_atomicity` in the config). Which of the
two a directory needs is not guessed from names alone: FUSE mounts (gcsfuse, GKE's GCS FUSE CSI
driver, whose mounts say just `fuse`) commit by file, and elsewhere a rename is tried.

A multi-process run needs one directory that every process sees; `check_shared` proves it at
start-up, before a checkpoint can be split across hosts' local disks.
"""

from __future__ import annotations

import os
import pathlib
import re
import secrets
import shutil
import time
from collections.abc import Iterator

import jax
from etils import epath

from smartclip_jax import distributed

ATOMICITIES = ("auto", "rename", "commit_file")
MOUNTS = pathlib.Path("/proc/mounts")
SHARED_WAIT_S = 30.0  # how long a process looks for process 0's file (mounts cache listings)


class StorageError(RuntimeError):
  """A run directory that cannot be used: unreachable, no credentials, or not writable."""


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store (`gs://...`, any URL scheme epath knows)."""
  return "://" in os.fspath(path)


def path(value: str | os.PathLike) -> epath.Path:
  """`value` as an epath: URLs as they are, local paths made absolute (Orbax needs that)."""
  return epath.Path(value) if is_remote(value) else epath.Path(os.path.abspath(value))


def mount_type(directory: str | os.PathLike, mounts: str | None = None) -> str:
  """The file system type of the mount holding local `directory` (from /proc/mounts), or ""."""
  if mounts is None:
    mounts = MOUNTS.read_text() if MOUNTS.is_file() else ""
  target = os.path.realpath(directory)
  best, kind = "", ""
  for line in mounts.splitlines():
    fields = line.split()
    if len(fields) < 3:
      continue
    point = fields[1].replace("\\040", " ")
    inside = target == point or target.startswith(point.rstrip("/") + "/")
    if inside and len(point) > len(best):
      best, kind = point, fields[2]
  return kind


def commit_file(directory: str | os.PathLike, atomicity: str = "auto") -> bool:
  """Whether saves under `directory` must commit by file instead of by renaming a directory:
  `atomicity` says so, or (auto) the directory is remote or on a gcsfuse mount."""
  if atomicity not in ATOMICITIES:
    raise ValueError(f"checkpoint_atomicity={atomicity!r}: choose one of {ATOMICITIES}")
  if atomicity != "auto":
    return atomicity == "commit_file"
  if is_remote(directory) or mount_type(directory).split(".")[0] == "fuse":
    return True
  return not renames_directories(directory)


def renames_directories(directory: str | os.PathLike) -> bool:
  """Whether a directory with a subdirectory can be renamed inside local `directory` (created
  if missing): what a checkpoint's rename commit does. False where it cannot, or where nothing
  can be written (a reader of checkpoints saves nothing)."""
  probe = pathlib.Path(directory) / f".rename_check.{os.getpid()}"
  try:
    (probe / "sub").mkdir(parents=True, exist_ok=True)
    os.rename(probe, f"{probe}.done")
    shutil.rmtree(f"{probe}.done")
    return True
  except OSError:
    shutil.rmtree(probe, ignore_errors=True)
    return False


def check_shared(directory: epath.Path) -> None:
  """In a multi-process run, stops every process with `StorageError` unless all of them see a
  file that process 0 writes in `directory`: a node-local path (or a relative one, resolved in
  different folders) would split checkpoints across hosts, unrestorable later. A collective."""
  if jax.process_count() == 1:
    return
  nonce, probe = 0, None
  if jax.process_index() == 0:
    try:
      nonce = secrets.randbelow(2**31 - 1) + 1
      probe = directory / f".shared_check.{nonce}"
      probe.write_text(str(nonce))
    except Exception:  # noqa: BLE001  every process must reach the collective below to stop
      nonce = 0
  nonce = distributed.from_process_0([nonce])[0]
  if not nonce:
    raise StorageError(f"process 0 cannot write its shared-directory check file in {directory}")
  deadline, path = time.monotonic() + SHARED_WAIT_S, directory / f".shared_check.{nonce}"
  while not (seen := _holds(path, nonce)) and time.monotonic() < deadline:
    time.sleep(0.5)
  blind = [i for i, ok in enumerate(distributed.gather(int(seen))) if not ok]
  if probe is not None:
    probe.unlink(missing_ok=True)
  if blind:
    raise StorageError(
      f"the workdir {directory} is not shared by all processes: processes {blind} do not see "
      f"the file process 0 wrote there within {SHARED_WAIT_S:.0f} s. A multi-process run needs "
      "one directory that every process sees (a gs:// bucket, a gcsfuse or NFS mount); a "
      "relative path is resolved in each process's own working folder"
    )


def _holds(path: epath.Path, nonce: int) -> bool:
  try:
    return path.read_text() == str(nonce)
  except Exception:  # noqa: BLE001  not there yet, or unreadable: both mean not seen
    return False


def move_tree(src: epath.Path, dst: epath.Path, rename: bool) -> None:
  """Moves directory `src` into `dst`: a rename where the file system has one, else a streamed
  copy of every file (across file systems too) followed by deleting `src`, so nothing is lost
  if it stops half-way."""
  if rename:
    src.rename(dst)
    return
  for file in files(src):
    target = dst / os.path.relpath(os.fspath(file), os.fspath(src))
    target.parent.mkdir(parents=True, exist_ok=True)
    with file.open("rb") as reader, target.open("wb") as writer:
      shutil.copyfileobj(reader, writer, 1 << 24)
  src.rmtree()


def files(root: epath.Path) -> Iterator[epath.Path]:
  """Every file under `root` (epath's own walk and `**` globs drop the gs:// scheme)."""
  for child in root.iterdir():
    if child.is_dir():
      yield from files(child)
    else:
      yield child


def free_bytes(directory: epath.Path) -> int | None:
  """Bytes free to an unprivileged writer on the file system holding local `directory` (its
  nearest existing parent); None for an object store, which reports no such figure."""
  if is_remote(directory):
    return None
  where = pathlib.Path(directory)
  while not where.exists():
    where = where.parent
  return shutil.disk_usage(where).free


def check_writable(directory: epath.Path, name: str) -> None:
  """Creates `directory`, writes, reads back and deletes a small object `name` in it, so that a
  missing bucket, missing credentials or a read-only bucket stop a run before its first step,
  naming the path and what failed."""
  probe = directory / name
  if os.fspath(directory).startswith("gs://") and not os.environ.get("STORAGE_EMULATOR_HOST"):
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
      google.auth.default()
    except DefaultCredentialsError as e:
      raise StorageError(
        f"cannot write to {directory}: no Google Cloud credentials (run `gcloud auth "
        "application-default login`, or on a Cloud TPU VM use its service account); "
        f"{type(e).__name__}: {e}"
      ) from e
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("smartclip_jax write check\n")
    if probe.read_text() != "smartclip_jax write check\n":
      raise OSError("the object read back differs from the one written")
    probe.unlink()
  except Exception as e:  # noqa: BLE001  gcsfs, google-auth and the OS raise many kinds
    raise StorageError(f"cannot write to {directory}: {_reason(e)}") from e


def _statuses(text: str) -> set[int]:
  """The HTTP statuses named in an error's text, not the same digits inside a port or a URL
  (127.0.0.1:40323)."""
  return {int(code) for code in re.findall(r"(?<![\w:./?%-])([45]\d\d)(?![\w.:/])", text)}


TRANSIENT_WORDS = ("unavailable", "timed out", "timeout", "deadline", "connection", "temporar")


def transient(error: Exception) -> bool:
  """Whether a storage error may pass if tried again (a timeout, a dropped connection, HTTP 408,
  429 or 5xx) rather than say something about the data (missing, truncated, malformed)."""
  text = f"{type(error).__name__}: {error}".lower()
  if isinstance(error, TimeoutError | ConnectionError):
    return True
  return bool(_statuses(text) & {408, 429, 500, 502, 503, 504}) or any(
    word in text for word in TRANSIENT_WORDS
  )


def _reason(error: Exception) -> str:
  """What a storage error means for a user, with the library's own message."""
  text = f"{type(error).__name__}: {error}"
  low = text.lower()
  status = _statuses(low)
  if "credentials" in low or "defaultcredentialserror" in low or 401 in status:
    hint = "no usable credentials (run `gcloud auth application-default login`, or on a TPU VM "
    hint += "give its service account access to the bucket)"
  elif 403 in status or "forbidden" in low or "permission" in low or "read-only" in low:
    hint = "permission denied (the account needs roles/storage.objectAdmin on the bucket)"
  elif (
    isinstance(error, FileNotFoundError)
    or 404 in status
    or any(word in low for word in ("nosuchbucket", "bucket does not exist"))
  ):  # gcsfs's plain file system says 404 as FileNotFoundError, naming only the URL
    hint = "the bucket does not exist (create it with `gcloud storage buckets create`)"
  elif "connect" in low or "timeout" in low or "resolve" in low:
    hint = "the storage endpoint cannot be reached"
  else:
    return text
  return f"{hint}; {text}"
