"""Embeddings of an evaluation set cached on disk under a key of everything they depend on.

The key holds the model (its checkpoint step, or a PyTorch file's size and mtime), the set
(task, size, first and last items) and the preprocessing sizes, so a new checkpoint or a
changed set is never served stale embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence

import jax
import numpy as np
from etils import epath

log = logging.getLogger("smartclip_jax")


def fingerprint(items: Sequence) -> str:
  """Size, first and last item of a set of paths or captions (arrays count by size only)."""
  first = items[0] if len(items) and isinstance(items[0], str) else ""
  last = items[-1] if len(items) and isinstance(items[-1], str) else ""
  return f"{len(items)}|{first}|{last}"


def cached(cache_dir: epath.Path | None, parts: dict, compute: Callable[[], dict]) -> dict:
  """`compute()`'s arrays (and ints), stored under a hash of `parts`; loaded when present."""
  if cache_dir is None:
    return compute()
  key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
  path = cache_dir / f"{parts.get('task', 'set')}-{key}.npz"
  if path.is_file():
    log.info("embeddings from cache %s", path)
    with path.open("rb") as file, np.load(file) as f:
      return {k: f[k] for k in f.files}
  values = compute()
  if jax.process_index() != 0:  # every process computes; one writes
    return values
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  with tmp.open("wb") as f:
    np.savez(f, **values)
  tmp.rename(path)  # a killed run never leaves half a cache file
  return values
