"""The package as users install it: a wheel, used from another folder."""

import os
import shutil
import subprocess
import sys

import numpy as np

from smartclip_jax import tokenizer
from tests.conftest import REPO


def run(argv, **kw) -> str:
  done = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)
  assert done.returncode == 0, f"{argv}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
  return done.stdout


def test_the_wheel_installs_and_works_from_another_folder(tmp_path):
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  # Built without isolation (the venv's setuptools, no index needed), from a copy of the tree:
  # a build writes its scratch folders beside the sources.
  source = tmp_path / "src"
  skip = (".venv", ".git", "runs", "results", "build", "*.egg-info", "__pycache__", ".*_cache")
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*skip))
  run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)])
  (wheel,) = tmp_path.glob("smartclip_jax-*.whl")
  site = tmp_path / "site"
  run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)])

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  out = run(
    [
      sys.executable,
      "-c",
      "import smartclip_jax, smartclip_jax.tokenizer as t; print(smartclip_jax.__file__); "
      "print(*t.tokenize(['A red square, twice!'])[0][:8])",
    ],
    cwd=elsewhere,
    env=env,
  )
  where, tokens = out.splitlines()
  assert where.startswith(str(site))  # the installed copy, not the checkout
  ours = tokenizer.tokenize(["A red square, twice!"])[0][:8]
  np.testing.assert_array_equal(np.array(tokens.split(), int), ours)
  assert "--workdir" in run(
    [str(site / "bin" / "smartclip-train"), "--help"], cwd=elsewhere, env=env
  )
