"""The partial-captions experiment: its scenes are deterministic and say what the images show,
its test sets score as defined, and `--quick` writes every output."""

import json
import re

import numpy as np
import pytest

from smartclip_jax import config as config_lib
from smartclip_jax.data import demo
from smartclip_jax.experiments import partial_captions, probes, scenes
from smartclip_jax.tokenizer import tokenize

SENTENCE = re.compile(r"A (small|large) (\w+) (solid|striped|hollow) (\w+) (.+)\.$")


def test_scenes_are_a_pure_function_of_seed_split_and_index():
  a, b = scenes.make_split(20, 48, 0, "train"), scenes.make_split(20, 48, 0, "train")
  np.testing.assert_array_equal(a.images, b.images)
  assert a.scenes == b.scenes
  other = scenes.make_split(20, 48, 0, "test")
  assert other.scenes != a.scenes
  assert all(2 <= len(s) <= 5 for s in a.scenes)


def test_captions_match_the_images_factor_by_factor():
  """Each sentence parses back to its object; the image shows it: around the object's centre
  (which no other object reaches), its colour fills a solid object, fills every other pair of
  rows of a striped one and is absent from a hollow one; a large solid object still has its
  colour 7.5 px from its centre, beyond any small shape's reach."""
  size = 48
  split = scenes.make_split(60, size, 3, "train")
  places = {v: k for k, v in scenes.PLACES.items()}
  for image, things, ids in zip(split.images, split.scenes, split.sentence_ids):
    for thing, sentence_ids in zip(things, ids):
      size_name, colour, texture, shape, place = SENTENCE.match(thing.sentence()).groups()
      assert scenes.Thing(shape, colour, size_name, places[place], texture) == thing
      assert sentence_ids == tokenize(thing.sentence(), 64)[0, 1 : len(sentence_ids) + 1].tolist()
      cy, cx = (int((c + 0.5) * size / 3) for c in thing.cell)
      is_colour = lambda y, x, image=image, colour=colour: (
        0 <= y < size and 0 <= x < size and np.array_equal(image[y, x], demo.COLOURS[colour])
      )
      centre = [(y, x) for y in (cy - 1, cy, cy + 1) for x in (cx - 1, cx, cx + 1)]
      if texture == "solid":
        assert all(is_colour(y, x) for y, x in centre)
      elif texture == "hollow":
        assert not any(is_colour(y, x) for y, x in centre)
      else:
        assert all(is_colour(y, x) == ((y // 2) % 2 == 0) for y, x in centre)
      if texture == "solid" and size_name == "large":
        assert any(is_colour(cy + dy, cx + dx) for dy, dx in ((8, 0), (-7, 0), (0, 7), (0, -7)))


def test_caption_tokens_equal_tokenising_the_joined_sentences():
  split = scenes.make_split(10, 48, 0, "train")
  for things, ids in zip(split.scenes, split.sentence_ids):
    keep = scenes.sample_sentences(len(things), "subset", np.random.default_rng(len(things)))
    text = " ".join(things[k].sentence() for k in keep)
    np.testing.assert_array_equal(
      scenes.caption_tokens([ids[k] for k in keep], 64), tokenize(text, 64)[0]
    )


def test_samplers():
  rng = np.random.default_rng(0)
  prefixes = [scenes.sample_sentences(4, "prefix", rng) for _ in range(400)]
  assert {len(p) for p in prefixes} == {1, 2, 3, 4} and all(p == sorted(p) for p in prefixes)
  assert all(p == list(range(len(p))) for p in prefixes)
  subsets = [scenes.sample_sentences(4, "subset", rng) for _ in range(400)]
  assert all(len(s) >= 1 and s == sorted(s) for s in subsets)
  assert any(s[0] != 0 for s in subsets)
  assert scenes.sample_sentences(3, "full", rng) == [0, 1, 2]


def test_probe_scores_of_an_oracle_embedding():
  """Embeddings that encode exactly the (colour, shape) pairs an image or text names score 100
  on everything that depends only on colour and shape."""
  split = scenes.make_split(40, 48, 5, "test")
  p = probes.make_probes(split, 64)
  concept = {c: k for k, c in enumerate(probes.CONCEPTS)}
  text_of = {}
  for i, things in enumerate(split.scenes):
    text_of[tuple(p.full[i])] = things
  for (_, thing), tokens in zip(p.single_things, p.single):
    text_of[tuple(tokens)] = [thing]
  thing = lambda colour, shape: scenes.Thing(shape, colour, "small", (0, 0))
  for tokens, (colour, shape) in zip(p.concepts, probes.CONCEPTS):
    text_of[tuple(tokens)] = [thing(colour, shape)]
  for i, true, swapped in p.pairs:
    a, b = split.scenes[i][:2]
    text_of[tuple(true)] = [a, b]
    text_of[tuple(swapped)] = [thing(b.colour, a.shape), thing(a.colour, b.shape)]

  def embed(things):
    v = np.zeros(len(probes.CONCEPTS))
    for t in things:
      v[concept[(t.colour, t.shape)]] += 1
    return v

  encode_image = lambda images: np.stack([embed(split.scenes[j]) for j in range(len(images))])
  encode_text = lambda tokens: np.stack(
    [
      embed(text_of[tuple(t)]) if tuple(t) in text_of else np.ones(len(probes.CONCEPTS))
      for t in tokens
    ]
  )
  scores = probes.evaluate(encode_image, encode_text, p)
  assert scores["colour_acc"] == scores["shape_acc"] == scores["presence_auc"] == 100.0
  assert scores["full_i2t_r1"] > 90 and scores["full_t2i_r1"] > 90  # ties aside
  assert len(p.pairs) > 10 and scores["swap_acc"] > 90


def test_auc():
  assert probes.auc(np.array([3.0, 2.0, 1.0]), np.array([True, False, False])) == 1.0
  assert probes.auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5


@pytest.mark.slow
def test_quick_run_writes_every_output(tmp_path):
  out = tmp_path / "pc"
  partial_captions.main(["--out", str(out), "--quick", "--workers", "1"])
  results = json.loads((out / "results.json").read_text())
  methods = set(partial_captions.QUICK_METHODS)
  for setting, _, _ in partial_captions.SETTINGS:
    assert set(results["summary"][setting]) == methods
  assert {r["setting"] for r in results["runs"]} >= {"pretrained"}
  for r in results["runs"]:
    assert all(0 <= r[m] <= 100 or np.isnan(r[m]) for m in probes.METRICS)
  assert set(results["masks"]) == {"smartclip"}
  table = (out / "table.md").read_text()
  assert all(f"| {m} |" in table for m in methods)
  for name in [
    "recall_bars.png",
    "mask_size.png",
    "mask_heatmap_smartclip.png",
    "mask_overlap_smartclip.png",
  ]:
    assert (out / name).stat().st_size > 1000, name


@pytest.mark.slow
def test_worker_processes_give_the_numbers_of_one_process(tmp_path):
  """Two spawned single-threaded workers, tasks in another order: every score the same."""
  scores = lambda r: {k: v for k, v in r.items() if k != "seconds"}
  one, two = (
    partial_captions.run(
      tmp_path / str(w),
      partial_captions.QUICK,
      seeds=(0,),
      methods=partial_captions.QUICK_METHODS,
      workers=w,
    )
    for w in (1, 2)
  )
  assert [scores(r) for r in one["runs"]] == [scores(r) for r in two["runs"]]
  assert one["masks"] == two["masks"]


@pytest.mark.parametrize("mode", ["full", "prefix", "subset"])
def test_schedule_is_shared_by_methods_and_fixed_by_seed(mode):
  split = scenes.make_split(30, 48, 0, "train")
  a = partial_captions.schedule(split, 4, 8, mode, 0, 64)
  b = partial_captions.schedule(split, 4, 8, mode, 0, 64)
  c = partial_captions.schedule(split, 4, 8, mode, 1, 64)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_every_method_is_a_valid_config_of_the_same_towers():
  configs = {
    m: partial_captions.method_config(m, partial_captions.Sizes()) for m in partial_captions.METHODS
  }
  loss_parts = set(config_lib.LOSS_MODELS["clip"])  # the mask net, scale and bias of each loss
  towers = lambda c: json.dumps(
    {k: v for k, v in config_lib.to_dict(c)["model"].items() if k not in loss_parts}, sort_keys=True
  )
  assert (
    len({towers(c) for m, c in configs.items() if m != "smartclip_soft"}) == 1
  )  # only the soft mask changes a tower field
  for m, c in configs.items():
    assert {k: c.model[k] for k in loss_parts} == config_lib.LOSS_MODELS[c.loss], m
  assert configs["clip_tau0.01"].clip.temperature == 0.01
  assert not configs["smartclip_no_modular"].smartclip.modular
  assert configs["smartclip_no_sparsity"].smartclip.sparsity_weight == 0.0
