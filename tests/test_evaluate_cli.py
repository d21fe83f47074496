"""The evaluation suite end to end: the CLI on a PyTorch model agrees with a plain torch/numpy
evaluation of the same files; zero-shot on known answers; evaluation during training."""

import json

import numpy as np
import PIL.Image
import pytest

from smartclip_jax import evaluate
from smartclip_jax.data.demo import DemoSource
from smartclip_jax.evals import datasets, retrieval, tasks as tasks_lib, zeroshot
from tests.test_evaluate import oracle

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def urban1k_folder(root, n=12):
  """Demo scenes in Urban1k's layout: image/<stem>.png and caption/<stem>.txt."""
  (root / "image").mkdir(parents=True)
  (root / "caption").mkdir()
  source = DemoSource(n, 48, split="eval")
  for i in range(n):
    record = source[i]
    PIL.Image.fromarray(record["image"]).save(root / "image" / f"{i:03d}.png")
    (root / "caption" / f"{i:03d}.txt").write_text(record["caption"])
  return root


def class_folder(root, per_class=3):
  rng = np.random.default_rng(0)
  for name, rgb in COLOURS.items():
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      image = np.clip(np.array(rgb) + rng.integers(-20, 20, (40, 40, 3)), 0, 255)
      PIL.Image.fromarray(image.astype(np.uint8)).save(root / name / f"{i}.png")
  return root


def test_cli_matches_a_plain_torch_and_numpy_evaluation(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  import smartclip_jax
  from tests.torch_reference import ReferenceCLIP

  torch.manual_seed(0)
  ref = ReferenceCLIP(image_size=32, context=77).eval()
  torch.save(ref.state_dict(), tmp_path / "random.pt")
  urban, colours = urban1k_folder(tmp_path / "urban"), class_folder(tmp_path / "colours")
  argv = [
    "--model",
    str(tmp_path / "random.pt"),
    "--tasks",
    f"urban1k:{urban},folder:{colours}",
    "--out",
    str(tmp_path / "out"),
    "--chunk",
    "5",
  ]
  evaluate.main(argv)
  printed = capsys.readouterr().out
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert set(results) == {"urban1k", "folder"} and "urban1k" in printed
  assert (tmp_path / "out" / "recall_at_k.png").stat().st_size > 0
  assert np.load(tmp_path / "out" / "ranks" / "urban1k.npz")["t2i"].shape == (12,)

  # The same evaluation written plainly: torch embeddings, numpy similarities, a stable sort.
  model = smartclip_jax.load(tmp_path / "random.pt")
  stems = sorted(p.stem for p in (urban / "image").iterdir())
  pixels = np.stack([model.preprocess(PIL.Image.open(urban / "image" / f"{s}.png")) for s in stems])
  tokens = model.tokenize([(urban / "caption" / f"{s}.txt").read_text() for s in stems])
  with torch.no_grad():
    img = ref.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy()
    txt = ref.encode_text(torch.from_numpy(tokens).long()).numpy()
  sim = retrieval.normalize(img) @ retrieval.normalize(txt).T
  want = oracle(sim, np.arange(12))
  assert {k: results["urban1k"][k] for k in want} == want

  names = sorted(COLOURS)
  templates = (datasets.ZEROSHOT_DIR / "generic_templates.txt").read_text().split("\n")
  templates = [t for t in templates if t]
  with torch.no_grad():
    cls = []
    for name in names:
      t = ref.encode_text(
        torch.from_numpy(model.tokenize([x.format(name) for x in templates])).long()
      ).numpy()
      cls.append(retrieval.normalize(retrieval.normalize(t).mean(0)))
    files = [colours / n / f"{i}.png" for n in names for i in range(3)]
    img = ref.encode_image(
      torch.from_numpy(
        np.stack([model.preprocess(PIL.Image.open(f)) for f in files]).transpose(0, 3, 1, 2)
      )
    ).numpy()
  predicted = np.argmax(retrieval.normalize(img) @ np.stack(cls).T, axis=1)
  assert results["folder"]["top1"] == pytest.approx(
    100 * np.mean(predicted == np.repeat(np.arange(3), 3))
  )

  evaluate.main(argv)  # a second run reads the embeddings from the cache
  assert capsys.readouterr().err.count("embeddings from cache") == 2
  assert json.loads((tmp_path / "out" / "results.json").read_text()) == results


def test_masks_on_is_labelled_and_needs_a_mask_network(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  from tests.torch_reference import ReferenceCLIP

  torch.manual_seed(1)
  urban = urban1k_folder(tmp_path / "urban", n=6)
  for name, mask_net in (("smart.pt", True), ("plain.pt", False)):
    torch.save(
      ReferenceCLIP(image_size=32, context=77, mask_net=mask_net).state_dict(), tmp_path / name
    )
  evaluate.main(
    [
      "--model",
      str(tmp_path / "smart.pt"),
      "--tasks",
      f"urban1k:{urban}",
      "--out",
      str(tmp_path / "out"),
      "--masks",
    ]
  )
  assert "MASKS ON" in capsys.readouterr().out
  assert json.loads((tmp_path / "out" / "results.json").read_text())["urban1k"]["masks"]
  with pytest.raises(ValueError, match="no mask network"):
    evaluate.main(
      [
        "--model",
        str(tmp_path / "plain.pt"),
        "--tasks",
        f"urban1k:{urban}",
        "--out",
        str(tmp_path / "out2"),
        "--masks",
      ]
    )


def test_zero_shot_is_perfect_when_images_sit_on_their_class():
  rng = np.random.default_rng(0)
  classes = retrieval.normalize(rng.standard_normal((10, 16)))
  labels = rng.integers(0, 10, 50)
  images = classes[labels] + 0.01 * rng.standard_normal((50, 16))
  metrics, rank = zeroshot.accuracy(images, classes, labels)
  assert metrics == {"top1": 100.0, "top5": 100.0} and not rank.any()
  metrics, _ = zeroshot.accuracy(-images, classes, labels)
  assert metrics["top1"] == 0.0


def test_unknown_task_is_refused():
  with pytest.raises(ValueError, match="unknown task"):
    tasks_lib.parse_tasks("urban1k:/x,coco2014:/y")
  with pytest.raises(ValueError, match="needs a path"):
    tasks_lib.parse_tasks("urban1k")


def test_flickr30k_full_task_takes_the_token_file_and_an_optional_image_dir():
  full, karpathy, default = tasks_lib.parse_tasks(
    "flickr30k_full:/f/results_20130124.token:/f/images,flickr30k:/f/dataset_flickr30k.json,"
    "flickr30k_full:/f/results_20130124.token"
  )
  assert full == tasks_lib.Task("flickr30k_full", "/f/results_20130124.token", "/f/images")
  assert karpathy.name == "flickr30k" and default.image_root == ""
  with pytest.raises(ValueError, match="needs a path"):
    tasks_lib.parse_tasks("flickr30k_full")


@pytest.mark.slow
def test_training_evaluates_its_tasks_and_keeps_the_best_checkpoint(demo_config, tmp_path):
  from smartclip_jax import train

  urban = urban1k_folder(tmp_path / "urban", n=8)
  demo_config.update(total_steps=4, log_every=2)
  demo_config.eval.update(every=2, tasks=f"urban1k:{urban}", best_metric="urban1k/t2i_r1")
  train.train_and_evaluate(demo_config, tmp_path / "run")
  for step in (2, 4):
    saved = json.loads((tmp_path / "run" / "eval" / f"step_{step}.json").read_text())
    assert saved["tasks"]["urban1k"]["num_images"] == 8 and "i2t_r1" in saved
  best = [p.name for p in (tmp_path / "run" / "checkpoints_best").iterdir() if p.name.isdigit()]
  assert len(best) == 1


def tiny_encoder(config):
  """A randomly initialised demo model behind the one `Encoder`."""
  import flax.linen as nn
  import jax

  from smartclip_jax.evals.encoder import Encoder
  from smartclip_jax.step import dummy_batch
  from smartclip_jax.train import build_model

  model, batch = build_model(config), dummy_batch(config)
  params = model.init(jax.random.key(0), batch["image"], batch["tokens"])["params"]
  return Encoder(config, model, nn.meta.unbox(params), batch_size=4)


def test_an_undecodable_image_is_counted_and_left_out_with_its_captions(demo_config, tmp_path):
  """Scores as if the image (and its caption) were not in the set, and say so in `skipped`."""
  encoder = tiny_encoder(demo_config)
  urban, colours = urban1k_folder(tmp_path / "urban", n=6), class_folder(tmp_path / "colours")
  spec = tasks_lib.parse_tasks(f"urban1k:{urban},folder:{colours}")
  (urban / "image" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n but no image")
  (colours / "red" / "1.png").write_bytes(b"not an image at all")
  broken = tasks_lib.run_tasks(encoder, "tiny", spec, tmp_path / "out")
  (urban / "image" / "002.png").unlink()
  (urban / "caption" / "002.txt").unlink()
  (colours / "red" / "1.png").unlink()
  without = tasks_lib.run_tasks(encoder, "tiny", spec, tmp_path / "out")
  assert broken["urban1k"].pop("skipped") == {"undecodable_image": 1}
  assert broken["folder"].pop("skipped") == {"undecodable_image": 1}
  without["urban1k"].pop("skipped")
  assert broken == without and without["urban1k"]["num_images"] == 5
  assert without["folder"]["num_images"] == 8


def test_a_stop_notice_ends_an_evaluation_between_batches(demo_config, tmp_path):
  from smartclip_jax.evals.encoder import Interrupted

  encoder, asked = tiny_encoder(demo_config), []
  encoder.should_stop = lambda: asked.append(1) or len(asked) > 2
  with pytest.raises(Interrupted, match="stop notice"):
    encoder.images([np.zeros((40, 40, 3), np.uint8)] * 20)
  assert len(asked) == 3  # two batches of four embedded, then the notice was seen


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_images_decoded_ahead_by_grain_embed_as_one_by_one(demo_config, tmp_path, workers):
  """Grain's threads (0) or worker processes decode ahead of the device, in order: the
  embeddings are those of decoding each file in turn, bit for bit, and an unreadable file is
  reported at its index with a blank image in its row."""
  import PIL.Image

  from smartclip_jax.evals.encoder import DecodeImage

  rng = np.random.default_rng(0)
  paths = []
  for i in range(10):
    paths.append(tmp_path / f"{i}.png")
    PIL.Image.fromarray(rng.integers(0, 256, (48, 40 + i, 3), np.uint8)).save(paths[-1])
  paths[6].write_bytes(b"not an image")
  encoder = tiny_encoder(demo_config)
  encoder.workers = workers
  unreadable = []
  got = encoder.images([str(p) for p in paths], unreadable)
  decode = DecodeImage(demo_config.model.vision.image_size)
  pixels = np.stack([decode((i, str(p)))[0] for i, p in enumerate(paths)])
  np.testing.assert_array_equal(got, encoder.apply("encode_image", pixels))
  assert unreadable == [6]
  with pytest.raises(ValueError, match="cannot read image .*6.png"):
    encoder.images([str(p) for p in paths])
