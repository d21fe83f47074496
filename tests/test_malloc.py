"""The allocator switch: a command restarted with tcmalloc/jemalloc preloaded, clear failures."""

import os
import subprocess
import sys

import pytest

from smartclip_jax import malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc._GUARD)}
  return subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
  )


@pytest.mark.parametrize("name", sorted(malloc.LIBRARIES))
def test_use_restarts_the_command_with_the_allocator_loaded(name):
  if malloc.find(name) is None:
    pytest.skip(f"{name} is not installed here ({malloc.PACKAGES[name]})")
  done = _python(
    "from smartclip_jax import malloc; before = malloc.loaded(); malloc.use("
    f"{name!r}); print(before, malloc.loaded())"
  )
  assert done.returncode == 0, done.stderr
  # The first run never reaches the print: `use` replaced it with the preloaded one.
  assert done.stdout.split() == [name, name]


def test_the_system_allocator_needs_no_restart():
  done = _python(
    "from smartclip_jax import malloc; print(malloc.loaded()); malloc.use('system'); print('on')"
  )
  assert done.stdout.split() == ["system", "on"], done.stderr


def test_a_preload_that_does_not_load_stops_instead_of_restarting_again():
  done = _python(
    "from smartclip_jax import malloc\n"
    "malloc.find = lambda name: '/nonexistent/libtcmalloc_minimal.so.4'\n"
    "malloc.use('tcmalloc')\n"
  )
  assert done.returncode != 0
  assert "did not load it" in done.stderr


def test_a_missing_allocator_names_its_package(monkeypatch):
  monkeypatch.setattr(malloc, "loaded", lambda: "system")
  monkeypatch.setattr(malloc, "find", lambda name: None)
  with pytest.raises(SystemExit, match="libjemalloc2"):
    malloc.use("jemalloc")
  with pytest.raises(ValueError, match="choose system"):
    malloc.use("mimalloc")


def test_the_hint_speaks_only_under_the_system_allocator(monkeypatch):
  monkeypatch.setattr(malloc, "find", lambda name: None)
  monkeypatch.setattr(malloc, "loaded", lambda: "system")
  assert "install libtcmalloc-minimal4" in malloc.hint()
  monkeypatch.setattr(malloc, "find", lambda name: f"/lib/{name}.so")
  assert "LD_PRELOAD=/lib/tcmalloc.so" in malloc.hint()
  monkeypatch.setattr(malloc, "loaded", lambda: "jemalloc")
  assert malloc.hint() is None
