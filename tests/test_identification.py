"""The identification experiment: its captions name what they should, each image's caption
subsets are fixed by seed and variety, DCI and precision@k score known cases as defined, and
`--quick` writes every output."""

import json

import numpy as np
import pytest

from smartclip_jax.experiments import identification as ident, scenes
from smartclip_jax.tokenizer import tokenize

THING = scenes.Thing("square", "red", "large", (0, 0), "striped")


def test_captions_name_the_subsets_types_in_a_fixed_order():
  text = lambda subset: ident.caption(ident.words(THING), subset)
  assert text(("colour",)) == "a red thing."
  assert text(("shape", "place")) == "a square at the top left."
  assert text(("size", "texture", "shape")) == "a large striped square."
  assert text(scenes.FACTORS) == "a large red striped square at the top left."
  assert len(set(ident.SUBSETS)) == 31 and all(ident.SUBSETS)
  assert ident.SUBSETS[ident.FULL] == scenes.FACTORS
  assert len({text(s) for s in ident.SUBSETS}) == 31
  np.testing.assert_array_equal(
    ident.caption_ids(text(("colour",)), 64), tokenize("a red thing.", 64)[0]
  )


def test_the_26_attribute_captions():
  split = scenes.make_split(30, 48, 0, "test", ident.ONE_OBJECT)
  assert all(len(s) == 1 for s in split.scenes)
  test = ident.make_test(split, 64)
  queries = {
    "a circle.",
    "a red thing.",
    "a large thing.",
    "a striped thing.",
    "a thing at the top left.",
  }
  texts = [ident.caption({f: v}, (f,)) for f, v in scenes.FACTOR_VALUES]
  assert len(texts) == 26 and queries <= set(texts)
  np.testing.assert_array_equal(test.attributes, tokenize(texts, 64))
  assert (test.relevant.sum(1) == 5).all()  # one value of each factor per object


def test_varieties():
  v1 = ident.allowed_subsets(50, "V1", 0)
  assert v1.shape == (50, 1) and (v1 == ident.FULL).all()
  v4 = ident.allowed_subsets(50, "V4", 0)
  assert v4.shape == (50, 4) and all(len(set(row)) == 4 for row in v4)
  np.testing.assert_array_equal(v4, ident.allowed_subsets(50, "V4", 0))
  assert not np.array_equal(v4, ident.allowed_subsets(50, "V4", 1))
  assert len({frozenset(row) for row in v4}) > 40
  assert all(set(row) == set(range(31)) for row in ident.allowed_subsets(50, "V31", 0))


def test_schedule_draws_each_caption_from_its_images_subsets():
  split = scenes.make_split(40, 48, 0, "train", ident.ONE_OBJECT)
  index, tokens = ident.schedule(split, 5, 16, "V4", 0, 64)
  again = ident.schedule(split, 5, 16, "V4", 0, 64)
  np.testing.assert_array_equal(index, again[0])
  np.testing.assert_array_equal(tokens, again[1])
  allowed = ident.allowed_subsets(40, "V4", 0)
  for i, t in zip(index.reshape(-1), tokens.reshape(-1, 64)):
    options = ident.caption_tokens([split.scenes[i][0]] * 4, allowed[i], 64)
    assert (options == t).all(1).any()
  index, tokens = ident.schedule(split, 3, 16, "V1", 0, 64)  # 48 draws: two epochs of 40
  assert sorted(index.reshape(-1)[:40]) == list(range(40))
  things = [split.scenes[i][0] for i in index.reshape(-1)]
  full = ident.caption_tokens(things, [ident.FULL] * len(things), 64)
  np.testing.assert_array_equal(tokens.reshape(-1, 64), full)


def _labels(n: int, rng: np.random.Generator) -> np.ndarray:
  return np.stack([rng.integers(len(scenes.VALUES[f]), size=n) for f in scenes.FACTORS], 1)


def test_dci_of_synthetic_codes():
  """Each factor's one-hot on its own dimensions: DCI near 1, far lower after a rotation, and
  probes exact; every dimension a mixture of all factors: low DCI, no better than rotated."""
  rng = np.random.default_rng(0)
  labels = _labels(1000, rng)
  one_hots = np.concatenate([ident.one_hot(labels, f) for f in range(5)], 1)  # 26 dims
  aligned = one_hots + 0.05 * rng.normal(size=one_hots.shape)
  scores = ident.dci_scores(aligned, labels)
  assert scores["dci"] > 0.95 and scores["dci_rotated"] < 0.3 and scores["delta_dci"] > 0.65
  padded = np.concatenate([aligned, 0.05 * rng.normal(size=(1000, 38))], 1)  # D = 64
  assert ident.dci(padded, labels) > 0.95
  assert (ident.probe_accuracy(aligned, labels) == 100).all()
  mixed = one_hots @ rng.normal(size=(26, 32)) + 0.001 * rng.normal(size=(1000, 32))
  scores = ident.dci_scores(mixed, labels)
  assert scores["dci"] < 0.3 and abs(scores["delta_dci"]) < 0.05


def test_disentanglement_of_handmade_importances():
  assert ident.disentanglement(np.eye(5)) == pytest.approx(1.0)
  assert ident.disentanglement(np.ones((4, 5))) == pytest.approx(0.0)
  half = np.array([[1.0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])  # ρ 1/6 and 5/6
  assert ident.disentanglement(half) == pytest.approx(1 / 6)


def test_precision_at_k():
  scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.9]])
  relevant = np.array([[True, False], [False, False], [True, True], [True, True]])
  np.testing.assert_allclose(ident.precision_at(scores, relevant, k=2), [0.5, 1.0])
  np.testing.assert_allclose(ident.precision_at(scores, relevant, k=3), [2 / 3, 2 / 3])


@pytest.mark.slow
def test_quick_run_writes_every_output(tmp_path):
  out = tmp_path / "ident"
  ident.main(["--out", str(out), "--quick", "--workers", "1"])
  results = json.loads((out / "results.json").read_text())
  methods = ident.QUICK_RUN["methods"]
  settings = [f"{s}/{v}" for s in ident.STARTS for v in ident.VARIETIES]
  assert len(results["runs"]) == 1 + len(settings) * len(methods)
  assert {r["setting"] for r in results["runs"]} == {"pretrained", *settings}
  for setting in settings:
    assert set(results["summary"][setting]) == set(methods)
    assert "mask_jaccard" in results["summary"][setting]["smartclip"]
  for r in results["runs"]:
    assert all(np.isfinite(r[m]) for m in ident.METRICS if m in r)
  assert len(results["paired"]) == len(settings)
  table = (out / "table.md").read_text()
  assert all(f"| {m} |" in table for m in methods) and "Paired differences" in table
  for name in ("dci.png", "mask_types.png", "attribute_retrieval.png"):
    assert (out / name).stat().st_size > 1000, name
