"""The package's import graph, read from the source with `ast` (nothing is imported).

  python tests/test_imports.py [--rev REV]   # prints `module -> modules it imports`

The tests pin the shape docs/design.md describes: modules sit in layers (LAYERS), each
importing only its own layer and those below, so no import climbs up and no two modules import
each other, directly or through others; the train loop does not reach the command-line tools.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "smartclip_jax"


# Lowest first. A module belongs to the first layer naming it or a package above it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
  (
    "utilities",
    (
      "distributed", "sharding", "storage", "progress", "memory", "malloc", "watchdog",
      "profiling", "preemption", "ring", "tokenizer",
    ),
  ),
  ("models", ("models", "flops")),
  ("config", ("config", "config_reference")),
  ("data and weight files", ("data", "interop")),
  ("the step's math", ("losses", "optim", "step")),
  ("run state", ("checkpoint", "init_from", "resume", "writer")),
  ("evaluation", ("evals", "preflight")),
  ("public API", ("load", "")),  # "": the package's __init__
  ("programs", ("train", "evaluate", "masks", "convert", "aot", "experiments")),
)  # fmt: skip


def layer(module: str) -> int:
  """The index in LAYERS of `module` (a full name)."""
  short = module.removeprefix(PACKAGE).removeprefix(".")
  for i, (_, names) in enumerate(LAYERS):
    if any(short == n or short.startswith(n + ".") for n in names):
      return i
  raise LookupError(f"{module} is in no layer of tests/test_imports.py's LAYERS")


def _module_name(path: pathlib.PurePath) -> str:
  parts = list(path.with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
  """{module: package modules it imports}, from {path: source} (default: this checkout)."""
  if sources is None:
    sources = {
      str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / PACKAGE).rglob("*.py"))
    }
  modules = {_module_name(pathlib.PurePath(p)) for p in sources}
  out = {}
  for path, text in sources.items():
    deps = set()
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        deps |= {
          f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
          for a in node.names
        }
    out[_module_name(pathlib.PurePath(path))] = {d for d in deps if d in modules}
  return out


def _at(rev: str) -> dict[str, str]:
  files = subprocess.run(
    ["git", "ls-tree", "-r", "--name-only", rev, PACKAGE],
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
  ).stdout.split()
  return {
    f: subprocess.run(
      ["git", "show", f"{rev}:{f}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    for f in files
    if f.endswith(".py")
  }


def reaches(g: dict[str, set[str]], start: str) -> set[str]:
  """Every module `start` imports, directly or not."""
  seen, todo = set(), [start]
  while todo:
    for dep in g.get(todo.pop(), ()):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_every_import_runs_to_the_same_layer_or_one_below():
  g = graph()
  up = [
    f"{m} ({LAYERS[layer(m)][0]}) -> {d} ({LAYERS[layer(d)][0]})"
    for m, deps in sorted(g.items())
    for d in sorted(deps)
    if layer(d) > layer(m)
  ]
  assert not up, up


def test_no_module_imports_one_that_imports_it_back():
  g = graph()
  assert not [m for m in g if m in reaches(g, m)]


def test_the_package_imports_no_jax_and_load_stays_its_function():
  code = (
    "import sys, smartclip_jax\n"
    "assert 'jax' not in sys.modules\n"
    "from smartclip_jax import evaluate\n"
    "from smartclip_jax.load import Loaded\n"
    "assert smartclip_jax.load.__module__ == 'smartclip_jax.load', smartclip_jax.load\n"
  )
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_train_loop_does_not_import_the_command_line_tools():
  g = graph()
  assert not {"smartclip_jax.evaluate", "smartclip_jax.load"} & g["smartclip_jax.train"]
  assert "smartclip_jax.evaluate" not in reaches(g, "smartclip_jax.train")


def test_checkpoint_only_saves_and_restores():
  g = graph()
  assert (
    not {"smartclip_jax.interop.layout", "smartclip_jax.models.text"}
    & g["smartclip_jax.checkpoint"]
  )


if __name__ == "__main__":
  rev = sys.argv[sys.argv.index("--rev") + 1] if "--rev" in sys.argv else None
  g = graph(_at(rev) if rev else None)
  for module in sorted(g):
    short = lambda m: m.removeprefix(PACKAGE + ".")
    print(f"{short(module):28} -> {', '.join(sorted(short(d) for d in g[module])) or '-'}")
