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


def test_auto_takes_the_first_installed_allocator_or_stays(monkeypatch):
  """What the commands ask for by default (`SMARTCLIP_MALLOC` unset): tcmalloc where found,
  then jemalloc, else glibc's without a restart; nothing when one is already loaded."""
  asked = []
  # A copy of the environment: what `use` sets there must not reach later tests' commands.
  monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != malloc.ENV})
  monkeypatch.setattr(malloc.os, "execv", lambda *a: asked.append(os.environ["LD_PRELOAD"]))
  os.environ.pop(malloc._GUARD, None)
  os.environ["LD_PRELOAD"] = ""
  monkeypatch.setattr(malloc, "loaded", lambda: "system")
  monkeypatch.setattr(malloc, "find", lambda name: None)
  malloc.use(malloc.chosen())
  monkeypatch.setattr(
    malloc, "find", lambda name: f"/lib/{name}.so" if name == "jemalloc" else None
  )
  malloc.use(malloc.chosen())
  assert asked == ["/lib/jemalloc.so"]
  del os.environ[malloc._GUARD]
  monkeypatch.setattr(malloc, "find", lambda name: f"/lib/{name}.so")
  malloc.use(malloc.chosen())
  assert asked[-1].startswith("/lib/tcmalloc.so")
  os.environ[malloc.ENV] = "system"
  malloc.use(malloc.chosen())
  monkeypatch.setattr(malloc, "loaded", lambda: "jemalloc")
  malloc.use(malloc.AUTO)
  assert len(asked) == 2


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_the_commands_ask_for_the_allocator_only_as_commands(command, monkeypatch):
  """`python -m smartclip_jax.train` (argv from the command line) restarts under tcmalloc
  where installed; a caller passing argv (a test, a script) keeps its process."""
  import importlib

  module = importlib.import_module(f"smartclip_jax.{command}")
  asked = []
  monkeypatch.setattr(malloc, "use", asked.append)
  monkeypatch.setattr(sys, "argv", [command, "--help"])
  for argv in (["--help"], None):
    with pytest.raises(SystemExit):
      module.main(argv)
  assert asked == [malloc.AUTO]


def test_the_environment_holds_no_leftover_from_the_tests_above():
  assert malloc._GUARD not in os.environ and "/lib/" not in os.environ.get("LD_PRELOAD", "")
