"""The tensors of a TorchScript archive (OpenAI's original `ViT-B-16.pt` and friends), without
running any TorchScript or pickled code.

An archive is a zip: `<name>/data.pkl` pickles the module tree (objects of `__torch__.*`
classes whose attributes are submodules, tensors and plain values), tensor bytes live in
`<name>/data/<key>`, and `<name>/code/` holds the TorchScript, which is never read. The pickle is
read by an unpickler that knows three kinds of global and nothing else: the `__torch__` module
objects (rebuilt as empty attribute holders), torch's storage types and its tensor-rebuild
function (both rebuilt as numpy). Any other global, such as a function a crafted archive wants
called, stops the read with its name.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from typing import Any

import numpy as np

_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": "bfloat16",
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class RefusedArchive(ValueError):
  """The archive's pickle names something other than modules, tensors and plain values."""


def is_archive(path: Any) -> bool:
  """Whether `path` (a file path or a binary file) is a TorchScript archive: a zip with the
  `code/` folder that `torch.jit.save` writes (plain `torch.save` zips have none)."""
  try:
    with zipfile.ZipFile(path) as z:
      return any("/code/" in name for name in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


class _Module:
  """A `__torch__` object: its pickled attributes, nothing else (no methods, no code)."""

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict):
      raise RefusedArchive(f"a module's state is a {type(state).__name__}, not attributes")
    self.__dict__.update(state)


class _Storage:
  def __init__(self, dtype: Any) -> None:
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2 as numpy: a strided view of the storage, copied."""
  if not isinstance(storage, np.ndarray):
    raise RefusedArchive("a tensor whose storage is not one of the archive's data files")
  item = storage.itemsize
  return np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
  ).copy()


def _rebuild_parameter(data, *_ignored) -> np.ndarray:
  return data


_GLOBALS = {
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("collections", "OrderedDict"): dict,
}


class _Unpickler(pickle.Unpickler):
  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self.archive, self.prefix = archive, prefix

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith("__torch__.") or module == "__torch__":
      return _Module
    if module == "torch" and name in _STORAGE_DTYPES:
      return _Storage(_STORAGE_DTYPES[name])
    if (module, name) in _GLOBALS:
      return _GLOBALS[module, name]
    raise RefusedArchive(f"the archive's pickle names {module}.{name}, which is not a tensor")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise RefusedArchive(f"unknown persistent reference {pid!r}")
    kind, key = pid[1], pid[2]
    if not isinstance(kind, _Storage):
      raise RefusedArchive(f"a storage of unknown type {kind!r}")
    raw = self.archive.read(f"{self.prefix}data/{key}")
    if kind.dtype == "bfloat16":  # the upper half of a float32
      return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, kind.dtype)


def read_archive(path: Any) -> dict[str, np.ndarray]:
  """Every tensor attribute of the archive's module tree, by dotted path (the state_dict's
  names: `visual.conv1.weight`, ...)."""
  with zipfile.ZipFile(path) as z:
    pickles = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise RefusedArchive(f"expected one <name>/data.pkl in the archive, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    root = _Unpickler(z.read(pickles[0]), z, prefix).load()
  out: dict[str, np.ndarray] = {}
  _collect(root, "", out)
  return out


def _collect(obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
  if isinstance(obj, np.ndarray):
    out[prefix.rstrip(".")] = obj
  elif isinstance(obj, _Module):
    for name, value in obj.__dict__.items():
      _collect(value, f"{prefix}{name}.", out)
  elif isinstance(obj, dict):  # a module's parameter or buffer dict
    for name, value in obj.items():
      _collect(value, f"{prefix}{name}.", out)
