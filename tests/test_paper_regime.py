"""The paper-regime experiment: its configs, test sets, masked scoring, statistics and outputs."""

import json

import numpy as np
import pytest

from smartclip_jax.experiments import paper_regime as pr, probes, scenes


def test_finetune_configs_are_the_recipe_and_pretraining_is_from_scratch():
  sizes = pr.default_sizes()
  for lr, rate in pr.TOWER_LRS.items():
    c = pr.configure(f"smartclip@{lr}", sizes)
    assert (c.loss, c.optim.towers.lr, c.optim.mask_net.lr) == ("smartclip", rate, 1e-3)
    assert (c.optim.b2, c.optim.eps, c.optim.decay, c.optim.grad_clip_norm) == (
      0.999,
      1e-8,
      "all",
      0.0,
    )
    assert (c.optim.towers.weight_decay, c.optim.mask_net.weight_decay) == (1e-2, 0.0)
    assert c.optim.towers.warmup_steps == 11  # 200 of 3,650 of 200 steps
  assert pr.configure("clip@small", sizes).loss == "clip"
  base = pr.configure("pretrain", sizes)
  assert (base.loss, base.optim.towers.lr, base.optim.decay) == ("clip", 1e-3, "matrices")


def test_partial_queries_name_some_never_all_objects_and_keep_their_draws():
  split = scenes.make_split(30, 48, 5, "test")
  q = probes.make_partial(split, 64, per_image=3, seed=9)
  assert len(q.named) == 90
  for i, things in enumerate(split.scenes):
    for named in q.named[3 * i : 3 * i + 3]:
      assert 1 <= len(named) < len(things)
      assert [t for t in things if t in named] == named  # caption order kept
  shorter = probes.make_partial(scenes.make_split(10, 48, 5, "test"), 64, per_image=3, seed=9)
  np.testing.assert_array_equal(shorter.tokens, q.tokens[:30])


def test_named_hits_need_every_named_object_in_the_top_image():
  split = scenes.make_split(4, 48, 5, "test")
  named = [split.scenes[0][:1], split.scenes[1][:2], split.scenes[2][:1]]
  scores = np.zeros((4, 3))
  scores[0, 0] = scores[3, 1] = scores[2, 2] = 1.0  # query 1's top image is the wrong scene
  hits = probes.named_hits(scores, named, split)
  assert hits[0] and hits[2]
  assert hits[1] == all(t in split.scenes[3] for t in named[1])


def test_masked_score_with_all_one_masks_equals_the_plain_score():
  split = scenes.make_split(20, 48, 5, "test")
  p = probes.make_probes(split, 64)
  rng = np.random.default_rng(0)
  proj = rng.normal(size=(48 * 48 * 3, 16))
  table = rng.normal(size=(49408, 16))
  encode_image = lambda x: x.reshape(len(x), -1).astype(np.float64) @ proj / 1e3
  encode_text = lambda t: (table[t] * np.arange(1, t.shape[1] + 1)[:, None]).sum(
    1
  )  # word order counts
  plain = probes.evaluate(encode_image, encode_text, p)
  ones = probes.evaluate(encode_image, encode_text, p, lambda t: np.ones((len(t), 16)))
  for metric in probes.METRICS:
    np.testing.assert_allclose(ones[metric], plain[metric], atol=1e-6, err_msg=metric)
  # A mask that keeps dimension 0 only: sign(z_i0) t_j0 / ||t_j||, the masked cosine.
  img, txt = encode_image(split.images), encode_text(p.full)
  first = probes.scorer(img, encode_text, lambda t: np.eye(16)[np.zeros(len(t), int)])(p.full)
  want = np.sign(img[:, :1]) * (txt[:, 0] / np.linalg.norm(txt, axis=1))[None]
  np.testing.assert_allclose(first, want, atol=1e-6)


def test_gallery_rule_and_detectable_difference():
  by = {
    "500": {pr.MAIN: 12.0},
    "250": {pr.MAIN: 19.9},
    "100": {pr.MAIN: 35.0},
    "50": {pr.MAIN: 60.0},
  }
  assert pr.choose_gallery(by) == 100
  assert pr.choose_gallery({"500": {pr.MAIN: 5.0}, "50": {pr.MAIN: 90.0}}) == 500
  # 3 seeds: (t_.975,2 + t_.8,2) / sqrt(3) = (4.303 + 1.061) / 1.732
  np.testing.assert_allclose(pr.detectable(1.0, 3), 3.097, atol=1e-3)
  np.testing.assert_allclose(pr.detectable(2.0, 5), 2 * 1.663, atol=2e-3)


def test_paired_differences_per_seed():
  runs = []
  for seed, (a, b) in enumerate([(0.6, 0.4), (0.5, 0.5), (0.7, 0.4)]):
    hits = lambda p: (np.arange(100) < 100 * p).tolist()
    runs.append(
      {
        "setting": "prefix",
        "method": "smartclip",
        "lr": "small",
        "seed": seed,
        "hits": {"plain": hits(a), "masked": hits(b)},
      }
    )
    runs.append(
      {
        "setting": "prefix",
        "method": "clip",
        "lr": "small",
        "seed": seed,
        "hits": {"plain": hits(b)},
      }
    )
  plain, masked = pr.paired(runs, np.random.default_rng(0))
  np.testing.assert_allclose(plain["differences"], [20.0, 0.0, 30.0])
  np.testing.assert_allclose(masked["differences"], [0.0, 0.0, 0.0])
  np.testing.assert_allclose(plain["mean"], 50 / 3)
  lo, hi = plain["t_interval"]
  assert lo < plain["mean"] < hi
  assert plain["bootstrap_per_seed"][1][0] <= 0.0 <= plain["bootstrap_per_seed"][1][1]


@pytest.mark.slow
def test_quick_run_writes_every_output(tmp_path):
  pr.main(["--out", str(tmp_path), "--quick", "--workers", "1"])
  results = json.loads((tmp_path / "results.json").read_text())
  assert len(results["runs"]) == 2 * len(pr.QUICK_RUNS)
  smart = next(r for r in results["runs"] if r["method"] == "smartclip")
  assert set(smart["modes"]) == {"plain", "masked"}
  assert len(smart["hits"]["plain"]) == len(smart["hits"]["masked"]) == 48
  assert {p["view"] for p in results["paired"]} == {"plain", "masked"}
  for name in (
    "table.md",
    "lr_sweep.png",
    "mask_size.png",
    "mask_heatmap_smartclip@small.png",
    "models/base.msgpack",
    "models/prefix_clip@small_seed1.msgpack",
  ):
    assert (tmp_path / name).is_file(), name


@pytest.mark.slow
def test_the_control_runs_all_three_together_and_pairs_each(tmp_path):
  from smartclip_jax.experiments import paper_regime_control

  paper_regime_control.main(["--out", str(tmp_path), "--quick", "--workers", "1"])
  results = json.loads((tmp_path / "results.json").read_text())
  assert {r["method"] for r in results["runs"]} == {"smartclip", "clip", "clip_subset"}
  pairs = {(p["method"], p["minus"], p["view"]) for p in results["paired"]}
  assert pairs == {
    ("smartclip", "clip", "plain"),
    ("smartclip", "clip", "masked"),
    ("smartclip", "clip_subset", "plain"),
    ("smartclip", "clip_subset", "masked"),
    ("clip_subset", "clip", "plain"),
  }
  assert "clip_subset − clip" in (tmp_path / "table.md").read_text()
