"""The README as a newcomer pastes it: every command in its blocks is accepted (parsed by its own
argument parser, run with --dry-run, or found), nothing in a block is an [--optional] bracket, it
stays short, and docs/config.md is the config as it is.

  python tests/test_readme.py   # prints each README command and how it is checked
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 350
# External tools whose lines are documentation of another program (never run here).
EXTERNAL = ("gcloud", "tensorboard", "hf", "curl")


def blocks(language: str, text: str | None = None) -> list[str]:
  text = README.read_text() if text is None else text
  return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def commands() -> list[list[str]]:
  """Each shell command of the README's bash blocks, as its words (continuations joined)."""
  out = []
  for block in blocks("bash"):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" # ")[0].strip()
      if line and not line.startswith("#"):
        out.append(shlex.split(line))
  return out


def _python_module(words: list[str]) -> str:
  from smartclip_jax import aot, config as config_lib, convert, evaluate, train
  from smartclip_jax.data import prepare

  module, args = words[2], words[3:]
  if module in ("smartclip_jax.train", "smartclip_jax.aot"):
    parser = (train if module.endswith("train") else aot).arg_parser()
    config_lib.parse_args(parser, args, check=config_lib.validate)
    return "parsed by its parser, config loaded and validated (no files needed)"
  parsers = {
    "smartclip_jax.evaluate": evaluate,
    "smartclip_jax.convert": convert,
    "smartclip_jax.data.prepare": prepare,
  }
  parsers[module].arg_parser().parse_args(args)
  return "parsed by its parser"


def _launcher(words: list[str], fake_bin: pathlib.Path) -> str:
  if words[0] == "sbatch":  # sbatch's own options, then the script and its arguments
    words = ["bash", *words[next(i for i, w in enumerate(words) if w.endswith(".sbatch")) :]]
  script, args = (words[1], words[2:]) if words[0] == "bash" else (words[0], words[1:])
  env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
  env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
  done = subprocess.run(
    ["bash", str(ROOT / script), "--dry-run", *args],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert done.returncode == 0, f"{words}: {done.stderr}"
  assert "smartclip_jax.train" in done.stdout
  return "run with --dry-run (gcloud and git stand-ins)"


def check(words: list[str], fake_bin: pathlib.Path) -> str:
  """How one README command is checked; raises when it would not work as written."""
  if words[:2] == ["python", "-m"] and words[2].startswith("smartclip_jax."):
    return _python_module(words)
  if words[0] in ("pip", "python") and "install" in words:
    files = [words[i + 1] for i, w in enumerate(words) if w == "-r"]
    assert files and all((ROOT / f).is_file() for f in files), words
    return "requirements files exist"
  if words[:3] == ["sudo", "apt-get", "install"]:
    from smartclip_jax import malloc

    assert words[-1] in malloc.PACKAGES["tcmalloc"], words  # the library malloc.py looks for
    return "a system package (tcmalloc), not installed by the test"
  if words[0] == "pytest" or words[:3] == ["python", "-m", "pytest"]:
    assert set(words[1:]) <= {"-m", "slow"}, words
    return "the test suites (run by .ci/run)"
  if words[0].startswith("launch/") or words[0] in ("sbatch", "bash"):
    return _launcher(words, fake_bin)
  if words[0] in EXTERNAL:
    return "another program's command, not run"
  raise AssertionError(f"README command not covered by this test: {shlex.join(words)}")


def make_fake_bin(folder: pathlib.Path) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for name in ("gcloud", "git"):
    (folder / name).write_text("#!/bin/sh\nexit 0\n")
    (folder / name).chmod(0o755)
  return folder


def test_every_readme_command_works_as_written(tmp_path):
  found = commands()
  assert len(found) >= 10
  for words in found:
    check(words, make_fake_bin(tmp_path / "bin"))


def test_readme_blocks_have_no_optional_brackets_and_python_blocks_compile():
  for block in blocks("bash"):
    assert not re.search(r"\[--|\[<", block), block
  for block in blocks("python"):
    compile(block, "README.md", "exec")


def test_readme_is_short():
  assert len(README.read_text().splitlines()) <= MAX_LINES


def test_the_config_reference_is_complete_and_fresh():
  from smartclip_jax import config_reference

  assert set(config_reference.FIELDS) == set(config_reference.fields())
  assert (ROOT / "docs" / "config.md").read_text() == config_reference.markdown(), (
    "docs/config.md is stale: python -m smartclip_jax.config_reference > docs/config.md"
  )


if __name__ == "__main__":
  import tempfile

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  with tempfile.TemporaryDirectory() as tmp:
    fake = make_fake_bin(pathlib.Path(tmp))
    for words in commands():
      print(f"{shlex.join(words)}\n    -> {check(words, fake)}")
