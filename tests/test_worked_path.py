"""The README's "Fine-tune OpenAI CLIP on your data", run as written: its commands with only
sizes and paths changed, on generated images and a traced OpenAI-layout archive; then its
PyTorch snippet, whose exported model must embed as ours does."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import smartclip_jax
from tests.conftest import REPO

torch = pytest.importorskip("torch", reason="needs requirements-torch.txt")
pytest.importorskip("transformers", reason="needs requirements-torch.txt")
from tests.torch_reference import ReferenceCLIP, open_clip_model  # noqa: E402

SECTION = "## Fine-tune OpenAI CLIP on your data"
# What the test changes in the commands: where things are, and sizes a CPU runs in a minute.
SIZES = {"--holdout 500": "--holdout 24", "--workers 8": "--workers 2"}
TRAIN_SIZES = [
  "batch_size=16",
  "total_steps=4",
  "log_every=1",
  "data.eval_batch_size=8",
  "model.dtype=float32",
  "model.embed_dim=64",
  "model.vision.image_size=32",
  "model.vision.patch_size=8",
  "model.vision.width=128",
  "model.vision.layers=1",
  "model.vision.heads=2",
  "model.text.width=64",
  "model.text.layers=1",
  "model.text.heads=1",
  "model.mask.heads=1",
]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def readme_blocks(language: str) -> list[str]:
  """The section's code blocks in `language`."""
  text = (pathlib.Path(REPO) / "README.md").read_text()
  section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
  return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def commands(block: str) -> list[str]:
  """Shell commands of a block, continuation lines joined."""
  joined = block.replace("\\\n", " ")
  return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def picture(rng, colour: str, size=(48, 40)) -> PIL.Image.Image:
  image = np.full((size[1], size[0], 3), 128, np.uint8)
  x, y = rng.integers(0, size[0] - 16), rng.integers(0, size[1] - 16)
  image[y : y + 16, x : x + 16] = COLOURS[colour]
  return PIL.Image.fromarray(image)


def write_data(root, rng) -> None:
  """Images with captions (captions.jsonl) and an Urban1k-layout evaluation set."""
  images = root / "data" / "mine" / "images"
  images.mkdir(parents=True)
  lines = []
  for i in range(72):
    colour = list(COLOURS)[i % 3]
    picture(rng, colour).save(images / f"{i}.jpg")
    caption = f"a {colour} square on a grey background. it is small."
    lines.append(json.dumps({"image": f"images/{i}.jpg", "caption": caption}))
  (root / "data" / "mine" / "captions.jsonl").write_text("\n".join(lines) + "\n")
  urban = root / "data" / "Urban1k"
  (urban / "image").mkdir(parents=True)
  (urban / "caption").mkdir()
  for i, colour in enumerate(COLOURS):
    picture(rng, colour).save(urban / "image" / f"{i}.jpg")
    (urban / "caption" / f"{i}.txt").write_text(f"a {colour} square.\n")


def write_openai_archive(path) -> None:
  """A small CLIP in OpenAI's layout, traced and saved as OpenAI's .pt files are."""
  torch.manual_seed(0)
  ref = ReferenceCLIP(
    embed_dim=64, image_size=32, patch=8, vision_width=128, vision_layers=1, context=77,
    text_width=64, text_layers=1,
  ).eval()  # fmt: skip
  archive = torch.jit.trace_module(
    ref,
    {"encode_image": torch.zeros(1, 3, 32, 32), "encode_text": torch.zeros(1, 77).long()},
    check_trace=False,
  )
  archive.save(str(path))


def run(command: str, cwd) -> str:
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  argv = shlex.split(command)
  argv[0] = sys.executable if argv[0] == "python" else argv[0]
  done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
  return done.stdout + done.stderr


def normalise(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_the_worked_path_runs_as_written_and_exports_embed_as_ours(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  write_data(tmp_path, rng)
  write_openai_archive(tmp_path / "ViT-B-16.pt")
  (bash,) = readme_blocks("bash")
  outputs = []
  for command in commands(bash):
    changes = {**SIZES, "/data/": f"{tmp_path}/data/", "configs/": f"{REPO}/configs/"}
    for old, new in changes.items():
      command = command.replace(old, new)
    if " smartclip_jax.train " in command:
      command += "".join(f" --config.{o}" for o in TRAIN_SIZES)
    outputs.append(run(command, tmp_path))
  prepare, train, evaluate, to_open_clip, to_hf = outputs
  assert json.loads((tmp_path / "data/mine_ar/summary.json").read_text())["written"] == 72
  assert "parameters from ViT-B-16.pt; kept at initialisation: mask_net/" in train
  assert "step 4/4" in train
  assert "urban1k" in evaluate
  assert (tmp_path / "runs/mine/eval_urban1k").is_dir()
  assert "left out (the open_clip model has no place for them): mask_net" in to_open_clip

  ours = smartclip_jax.load(tmp_path / "runs/mine")
  # The PyTorch snippet, as written, on a generated photo.
  picture(rng, "red", size=(61, 47)).save(tmp_path / "photo.jpg")
  (snippet,) = readme_blocks("python")
  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  exec(compile(snippet, "README.md", "exec"), scope)
  inputs, out = scope["inputs"], scope["out"]
  tokens = inputs["input_ids"].numpy()
  np.testing.assert_array_equal(tokens, ours.tokenize(["a red square on a grey background."]))
  pixels = inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)
  image, text = normalise(ours.encode_image(pixels)), normalise(ours.encode_text(tokens))
  np.testing.assert_allclose(out.image_embeds.numpy(), image, atol=1e-4)
  np.testing.assert_allclose(out.text_embeds.numpy(), text, atol=1e-4)

  # The open_clip export, built from its model config and loaded strictly.
  spec = json.loads((tmp_path / "export/mine.json").read_text())
  ref = open_clip_model(**spec).eval()
  from safetensors.torch import load_file

  ref.load_state_dict(load_file(tmp_path / "export/mine.safetensors"), strict=True)
  with torch.no_grad():
    img = ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()
    txt = ref.encode_text(torch.from_numpy(tokens).long()).numpy()
  np.testing.assert_allclose(img, ours.encode_image(pixels), atol=1e-4)
  np.testing.assert_allclose(txt, ours.encode_text(tokens), atol=1e-4)
