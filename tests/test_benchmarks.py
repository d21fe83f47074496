"""The benchmark scripts still run: the GPU check in its tiny CPU mode, so it has not rotted by
the day a GPU is lent (benchmarks/README.md)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_in_its_tiny_cpu_mode():
  pytest.importorskip("transformers", reason="needs requirements-torch.txt")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  run = subprocess.run(
    ["bash", "benchmarks/gpu_check.sh", "--tiny", "--batch", "8", "--steps", "1"],
    cwd=ROOT,
    env={**env, "PYTHON": sys.executable},
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  steps = [row["step"] for row in result["rows"]]
  assert steps == ["ours, global loss", "ours, ring loss", "transformers CLIPModel, torch.compile"]
  for row in result["rows"]:
    assert row["batch"] == 8 and row["seconds"] > 0 and row["flops"] > 0, row
    assert 0 < row["mfu"] < 1, row
