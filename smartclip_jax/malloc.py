"""The process's heap allocator, which decides a CPU step's speed more than any XLA flag.

XLA:CPU allocates a step's temporaries (gigabytes for a ViT-B/16 step) afresh each step. glibc's
malloc serves blocks that large with mmap and returns them with munmap, so every step faults all
of them in again page by page. Its tunables cannot keep them: mmap_threshold stops at 32 MiB,
and the arena of the worker thread that runs the step maps such a block whatever mmap_max says.
tcmalloc and jemalloc keep freed memory for the next step. A library replaces malloc only when
loaded before everything else (LD_PRELOAD), so `use` starts the program again with it preloaded.
The commands (train, evaluate, the benchmarks) do that with `AUTO` (tcmalloc, else jemalloc,
where installed: the README's install line puts tcmalloc there) unless `SMARTCLIP_MALLOC` names
another (`system` keeps glibc's). benchmarks/README.md has the measurements. GPU and TPU steps
keep their temporaries in device memory and gain nothing on the device side.
"""

from __future__ import annotations

import os
import pathlib
import sys

# Library file names by allocator, and the package that installs them.
LIBRARIES: dict[str, tuple[str, ...]] = {
  "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
  "jemalloc": ("libjemalloc.so.2",),
}
PACKAGES = {
  "tcmalloc": "libtcmalloc-minimal4 (apt) or gperftools",
  "jemalloc": "libjemalloc2 (apt)",
}
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
_GUARD = "SMARTCLIP_MALLOC_RESTARTED"
AUTO = "auto"  # the first of LIBRARIES that is installed, else the system's
ENV = "SMARTCLIP_MALLOC"  # the commands' allocator: auto (default), system, tcmalloc, jemalloc


def loaded() -> str:
  """The allocator mapped into this process: a key of LIBRARIES, or "system" (glibc's)."""
  try:
    maps = pathlib.Path("/proc/self/maps").read_text()
  except OSError:
    return "system"
  for name, files in LIBRARIES.items():
    if any(f"/{f}" in maps for f in files):
      return name
  return "system"


def find(name: str) -> str | None:
  """The path of allocator `name`'s library in the usual library folders, or None."""
  for folder in _DIRS:
    for file in LIBRARIES[name]:
      path = pathlib.Path(folder, file)
      if path.exists():
        return str(path)
  return None


def chosen() -> str:
  """The allocator the commands ask `use` for: `SMARTCLIP_MALLOC`, or AUTO."""
  return os.environ.get(ENV, AUTO)


def use(name: str) -> None:
  """Makes `name` ("system", "tcmalloc", "jemalloc", or AUTO: the first installed, else the
  system's) this process's allocator: returns at once if it already is (or for "system"), else
  starts this same command again with the library preloaded. Fails with the package to
  install if a library named outright is missing."""
  if name == AUTO:
    if loaded() != "system":
      return
    name = next((n for n in LIBRARIES if find(n)), "system")
  if name == "system" or loaded() == name:
    return
  if name not in LIBRARIES:
    raise ValueError(f"allocator {name!r}: choose system, {', '.join(LIBRARIES)}")
  path = find(name)
  if path is None:
    raise SystemExit(f"allocator {name} not found in {', '.join(_DIRS)}: install {PACKAGES[name]}")
  if os.environ.get(_GUARD):
    raise SystemExit(f"allocator {name}: preloading {path} did not load it (see ld.so's message)")
  preload = " ".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
  os.environ.update(LD_PRELOAD=preload, **{_GUARD: "1"})
  print(
    f"starting again with {name} preloaded ({path}; {ENV}=system keeps glibc's)", file=sys.stderr
  )
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def hint() -> str | None:
  """One line for a CPU run on glibc's allocator: what to preload, or None if another runs."""
  if loaded() != "system":
    return None
  path = next(filter(None, map(find, LIBRARIES)), None)
  how = f"rerun with LD_PRELOAD={path}" if path else f"install {PACKAGES['tcmalloc']}"
  return (
    "CPU steps on glibc's malloc fault their temporaries in afresh every step; "
    f"{how} for faster large steps (smartclip_jax/malloc.py)"
  )
