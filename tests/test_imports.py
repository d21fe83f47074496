"""The package's import graph, read from the source with `ast` (nothing is imported).

  python tests/test_imports.py [--rev REV]   # prints `module -> modules it imports`

The tests pin the shape docs/design.md describes: data flows data -> model ->
loss -> update -> checkpoint, and the train loop does not reach back up into the command-line
tools.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "smartclip_jax"


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


def test_the_train_loop_does_not_import_the_command_line_tools():
  g = graph()
  assert not {"smartclip_jax.evaluate", "smartclip_jax.interop.loading"} & g["smartclip_jax.train"]
  assert "smartclip_jax.evaluate" not in reaches(g, "smartclip_jax.train")


def test_the_library_does_not_import_the_programs_built_on_it():
  programs = {
    "smartclip_jax.train",
    "smartclip_jax.evaluate",
    "smartclip_jax.masks",
    "smartclip_jax.convert",
    "smartclip_jax.aot",
  }
  g = graph()
  for module, deps in g.items():
    if module not in programs and not module.startswith("smartclip_jax.experiments"):
      assert not deps & programs, (module, deps & programs)


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
