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


# A hostile archive may ask for more than it holds: tensors are checked against their storage,
# all of them together against the archive's data (as read: bfloat16 becomes float32) and this
# limit, the module tree's depth too, and the paths through it (shared modules multiply them).
MAX_BYTES = 64 << 30
MAX_DEPTH = 64
MAX_PATHS = 1 << 20


class RefusedArchive(ValueError):
  """The archive's pickle names something other than modules, tensors and plain values, or
  describes tensors its data cannot hold."""


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


class _Tensor:
  """A tensor as the pickle describes it; read (`take`) once its name is known, to name it in
  a refusal."""

  def __init__(self, storage, offset, size, stride) -> None:
    if not isinstance(storage, np.ndarray):
      raise RefusedArchive("a tensor whose storage is not one of the archive's data files")
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def take(self, name: str, budget: list[int]) -> np.ndarray:
    """The tensor's values, copied; `budget` (bytes left, one-element list) shrinks by them."""
    size, stride, offset = self.size, self.stride, self.offset
    ints = all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
    if not ints or len(size) != len(stride):
      raise RefusedArchive(f"tensor {name}: shape {size}, strides {stride}, offset {offset}")
    count = int(np.prod(size, dtype=object))
    last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if count else offset - 1
    if last >= len(self.storage):
      raise RefusedArchive(
        f"tensor {name}: shape {tuple(size)} with strides {tuple(stride)} at offset {offset} "
        f"reaches element {last} of a storage of {len(self.storage)}"
      )
    nbytes = count * self.storage.itemsize
    if nbytes > budget[0]:
      raise RefusedArchive(
        f"tensor {name}: shape {tuple(size)} is {nbytes:,} bytes, more than the archive's data "
        f"or the {MAX_BYTES:,}-byte limit leaves"
      )
    budget[0] -= nbytes
    item = self.storage.itemsize
    return np.lib.stride_tricks.as_strided(
      self.storage[offset:], shape=tuple(size), strides=tuple(n * item for n in stride)
    ).copy()


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> _Tensor:
  """torch._utils._rebuild_tensor_v2, as a `_Tensor` to be checked and read."""
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_ignored) -> _Tensor:
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
    self.storages: dict[str, np.ndarray] = {}  # each data file read once
    self.nbytes = 0  # of the storages as read, which is twice the file for bfloat16

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
    if key not in self.storages:
      raw = self.archive.read(f"{self.prefix}data/{key}")
      if kind.dtype == "bfloat16":  # the upper half of a float32
        self.storages[key] = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(
          np.float32
        )
      else:
        self.storages[key] = np.frombuffer(raw, kind.dtype)
      self.nbytes += self.storages[key].nbytes
      if self.nbytes > MAX_BYTES:
        raise RefusedArchive(f"its data files read as {self.nbytes:,} bytes, over {MAX_BYTES:,}")
    return self.storages[key]


def read_archive(path: Any) -> dict[str, np.ndarray]:
  """Every tensor attribute of the archive's module tree, by dotted path (the state_dict's
  names: `visual.conv1.weight`, ...)."""
  with zipfile.ZipFile(path) as z:
    pickles = [n for n in z.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise RefusedArchive(f"expected one <name>/data.pkl in the archive, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    # Tensors may not hold more than the archive's data files, uncompressed, nor the limit.
    data = sum(i.file_size for i in z.infolist() if i.filename.startswith(f"{prefix}data/"))
    if data > MAX_BYTES:
      raise RefusedArchive(f"its data files unpack to {data:,} bytes, over {MAX_BYTES:,}")
    unpickler = _Unpickler(z.read(pickles[0]), z, prefix)
    root = unpickler.load()
  # Tied tensors share a storage, so twice the data is allowed; a hostile shape is far more.
  walk = _Walk(min(2 * unpickler.nbytes, MAX_BYTES))
  walk.collect(root, "")
  return walk.out


class _Walk:
  """The module tree's tensors by dotted name (`out`). A module may be reached by two paths
  (a shared submodule) and is then named under both, its tensors read once; a module inside
  itself (a loop), a tree deeper than MAX_DEPTH or with more than MAX_PATHS paths is refused."""

  def __init__(self, budget: int) -> None:
    self.out: dict[str, np.ndarray] = {}
    self.budget = [budget]  # bytes left for tensors (`_Tensor.take`)
    self.taken: dict[int, np.ndarray] = {}  # by id of the `_Tensor`
    self.ancestors: set[int] = set()  # ids of the modules on the path walked now
    self.paths = 0

  def collect(self, obj: Any, prefix: str) -> None:
    name = prefix.rstrip(".")
    self.paths += 1
    if self.paths > MAX_PATHS:
      raise RefusedArchive(f"the module tree has more than {MAX_PATHS:,} paths, at {name}")
    if prefix.count(".") > MAX_DEPTH:
      raise RefusedArchive(f"the module tree is deeper than {MAX_DEPTH} at {name}")
    if isinstance(obj, _Tensor):
      if id(obj) not in self.taken:
        self.taken[id(obj)] = obj.take(name, self.budget)
      self.out[name] = self.taken[id(obj)]
      return
    if not isinstance(obj, (_Module, dict)):
      return
    if id(obj) in self.ancestors:
      raise RefusedArchive(f"the module tree loops back to itself at {name}")
    self.ancestors.add(id(obj))
    items = obj.__dict__ if isinstance(obj, _Module) else obj  # a module, or its parameter dict
    for key, value in items.items():
      self.collect(value, f"{prefix}{key}.")
    self.ancestors.remove(id(obj))
