"""Demo data, caption samplers and the Grain pipeline."""

import time

import numpy as np
import pytest

from smartclip_jax import config as config_lib
from smartclip_jax.data import demo, pipeline
from smartclip_jax.data.captions import sample_caption, split_sentences
from smartclip_jax.data.sources import make_source
from smartclip_jax.tokenizer import tokenize
from tests.test_faults import featurize


def test_demo_records_are_deterministic_and_splits_differ():
  a, b = demo.DemoSource(20, 32, seed=3), demo.DemoSource(20, 32, seed=3)
  for i in (0, 7, 19):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["caption"] == b[i]["caption"]
  held_out = demo.DemoSource(20, 32, seed=3, split="eval")
  assert [held_out[i]["caption"] for i in range(20)] != [a[i]["caption"] for i in range(20)]
  with pytest.raises(IndexError):
    a[20]


def test_demo_caption_describes_the_drawn_pixels():
  source = demo.DemoSource(50, 48, seed=1)
  for i in range(50):
    shapes, _ = source.scene(i)
    record = source[i]
    assert split_sentences(record["caption"]) == [s.sentence() for s in shapes]
    for s in shapes:  # the shape's centre pixel has its colour
      cy, cx = ((np.asarray(s.cell) + 0.5) / 3 * 48).astype(int)
      np.testing.assert_array_equal(record["image"][cy, cx], demo.COLOURS[s.colour])


def test_sentence_splitter_keeps_abbreviations_and_decimals():
  text = (
    "Dr. Smith holds a 3.5 m pole, e.g. a long one. It is red! Is it? "
    'J. R. Tolkien wrote "The Hobbit." The end'
  )
  assert split_sentences(text) == [
    "Dr. Smith holds a 3.5 m pole, e.g. a long one.",
    "It is red!",
    "Is it?",
    'J. R. Tolkien wrote "The Hobbit."',
    "The end",
  ]
  assert split_sentences("   ") == []


def test_prefix_sampler_covers_every_k_and_never_cuts_a_sentence():
  sentences = ["A red square on the left.", "A blue circle.", "Mr. Lee waves.", "It is 2.5 m."]
  text = " ".join(sentences)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(200):
    caption = sample_caption(text, "prefix", rng)
    k = len(split_sentences(caption))
    assert caption == " ".join(sentences[:k])
    seen.add(k)
  assert seen == {1, 2, 3, 4}
  assert sample_caption(text, "first", rng) == sentences[0]
  assert sample_caption(text, "full", rng) == text


def _reference_rule(caption: str, rng: np.random.Generator) -> tuple[str, int]:
  """The reference's caption sampler, transcribed: cut at every ". ", keep the first k."""
  pieces = caption.split(". ")
  k = int(rng.integers(1, len(pieces) + 1))
  return ". ".join(pieces[:k]), k


REFERENCE_CASES = [
  "A man, e.g. this one, stands by a car. He waves. The sky is blue.",
  "Two dogs play.  One is brown. ",  # a double space, a trailing one
  "a photo without any separator at all",
  "Dr. Smith holds a 3.5 m pole. It is red! Is it? Yes.",  # ends in "."
  "A cat. A dog.",
]


@pytest.mark.parametrize("caption", REFERENCE_CASES)
def test_reference_sentence_split_is_the_reference_rule_for_every_k(caption):
  ours, theirs = np.random.default_rng(7), np.random.default_rng(7)  # the same draws of k
  seen = set()
  for _ in range(100):
    want, k = _reference_rule(caption, theirs)
    assert sample_caption(caption, "prefix", ours, "reference") == want
    seen.add(k)
  assert seen == set(range(1, len(caption.split(". ")) + 1))
  assert sample_caption(caption, "first", ours, "reference") == caption.split(". ")[0]


def test_the_two_sentence_splits_differ_and_ours_is_the_default():
  text = REFERENCE_CASES[0]
  firsts = {split: sample_caption(text, "first", None, split) for split in ("ours", "reference")}
  assert firsts == {"ours": "A man, e.g. this one, stands by a car.", "reference": "A man, e.g"}
  assert sample_caption("A cat. A dog.", "first", None, "reference") == "A cat"
  caption = REFERENCE_CASES[3]  # the default is ours, draw for draw
  default, ours = np.random.default_rng(3), np.random.default_rng(3)
  for _ in range(50):
    want = sample_caption(caption, "prefix", ours, "ours")
    assert sample_caption(caption, "prefix", default) == want
  config = config_lib.base_config()
  assert config.data.sentence_split == "ours"
  assert pipeline._featurizer(config, train=True).keywords["sentence_split"] == "ours"
  config.data.sentence_split = "reference"
  config_lib.validate(config)
  assert pipeline._featurizer(config, train=True).keywords["sentence_split"] == "reference"
  image = np.zeros((24, 24, 3), np.uint8)
  out = featurize(
    {"id": "x", "image": image, "caption": text}, caption_mode="first", sentence_split="reference"
  )
  np.testing.assert_array_equal(out["tokens"], tokenize("A man, e.g", 16)[0])
  config.data.sentence_split = "spacy"
  with pytest.raises(config_lib.ConfigError, match="data.sentence_split='spacy'"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="unknown sentence split"):
    sample_caption(text, "prefix", np.random.default_rng(0), "spacy")


def test_splitting_is_linear_in_a_caption_of_initials():
  start = time.perf_counter()  # each initial used to re-split the text so far: minutes here
  assert split_sentences("A. " * 200_000 + "B c.") == [("A. " * 200_000 + "B c.").strip()]
  assert time.perf_counter() - start < 10


def test_a_caption_is_sampled_whole_and_capped_only_by_the_tokenizer(monkeypatch):
  caption = " ".join(f"Sentence {i} of many." for i in range(500))  # 10x max_chars(16)
  seen, real = [], pipeline.sample_caption
  monkeypatch.setattr(
    pipeline, "sample_caption", lambda text, *a: seen.append(text) or real(text, *a)
  )
  image = np.zeros((24, 24, 3), np.uint8)
  out = featurize({"id": "long", "image": image, "caption": caption}, caption_mode="prefix")
  assert seen == [caption]  # every sentence counts towards the prefix drawn
  np.testing.assert_array_equal(
    out["tokens"], tokenize(real(caption, "prefix", np.random.default_rng(0)), 16)[0]
  )


@pytest.mark.parametrize("record", [["a", "list"], "text", None, 7])
def test_a_record_that_is_not_a_dict_is_an_unreadable_record(record):
  out = featurize(record, caption_mode="prefix")
  assert out["error"] == "unreadable_record" and out["id"] == "?"


def test_train_iterator_batches_and_resumes_at_any_step(demo_config):
  it = pipeline.train_iterator(demo_config)
  first = next(it)
  c = demo_config.model
  assert first["image"].shape == (16, c.vision.image_size, c.vision.image_size, 3)
  assert first["image"].dtype == np.float32
  assert first["tokens"].shape == (16, c.text.context_length)
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.train_iterator(demo_config, start_step=1)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["image"], want["image"])


def test_process_slices_are_parts_of_one_global_batch_and_an_epoch_covers_the_data(demo_config):
  demo_config.data.caption_mode = "full"
  source = make_source(demo_config, "train")
  want = sorted(
    map(
      bytes,
      tokenize(
        [source[i]["caption"] for i in range(len(source))], demo_config.model.text.context_length
      ),
    )
  )
  steps = demo_config.data.demo.num_train // demo_config.batch_size  # one epoch
  one = pipeline.train_iterator(demo_config, process_index=0, process_count=1)
  globals_ = [next(one) for _ in range(steps)]
  assert sorted(bytes(t) for b in globals_ for t in b["tokens"]) == want
  for count in (2, 4):
    slices = [pipeline.train_iterator(demo_config, p, count) for p in range(count)]
    for global_batch in globals_:
      parts = [next(it) for it in slices]
      for key in ("image", "tokens", "skipped"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), global_batch[key])


def test_a_resume_on_another_process_count_reads_the_same_global_batches(demo_config):
  one = pipeline.train_iterator(demo_config, 0, 1)
  want = [next(one)["image"] for _ in range(5)]
  slices = [pipeline.train_iterator(demo_config, p, 2, start_step=3) for p in range(2)]
  for w in want[3:]:
    np.testing.assert_array_equal(np.concatenate([next(it)["image"] for it in slices]), w)


@pytest.mark.slow
def test_the_number_of_grain_workers_does_not_change_the_batches(demo_config):
  want = [b["image"] for b, _ in zip(pipeline.train_iterator(demo_config), range(4))]
  for workers in (1, 3):
    demo_config.data.num_workers = workers
    it = pipeline.train_iterator(demo_config, start_step=1)
    for w in want[1:]:
      np.testing.assert_array_equal(next(it)["image"], w)


def test_interleave_gives_each_source_its_share_in_every_prefix():
  pattern, rank, counts = pipeline.interleave([0.7, 0.3])
  assert counts == [233, 100] and len(pattern) == 333
  assert pipeline.interleave([5.0])[2] == [1] and pipeline.interleave([2, 2])[2] == [1, 1]
  seen = np.zeros(2)
  for n, (source, r) in enumerate(zip(pattern, rank), 1):
    assert r == seen[source]
    seen[source] += 1
    assert np.all(np.abs(seen - n * np.array(counts) / 333) < 1)


def caption_folder(root, prefix, n):
  """n images with one-sentence captions `<prefix> <i>.` (a folder source)."""
  from tests.test_sources import image_bytes

  root.mkdir()
  for i in range(n):
    (root / f"{i}.png").write_bytes(image_bytes(fmt="PNG", seed=i))
    (root / f"{i}.txt").write_text(f"{prefix} {i}.")
  return root


def test_a_mixture_blends_by_weight_resumes_anywhere_and_counts_per_source(demo_config, tmp_path):
  a, b = caption_folder(tmp_path / "a", "Alpha", 12), caption_folder(tmp_path / "b", "Beta", 5)
  demo_config.data.update(mixture=f"folder:{a}=3,folder:{b}=1", caption_mode="full")
  demo_config.batch_size = 8
  it = pipeline.train_iterator(demo_config)
  batches = [next(it) for _ in range(6)]  # 48 positions: 36 of a (3 epochs), 12 of b
  sources = np.concatenate([b["source"] for b in batches])
  assert np.bincount(sources).tolist() == [36, 12]
  for n in range(0, 48, 4):  # 3:1 in every 4 positions
    assert np.bincount(sources[n : n + 4], minlength=2).tolist() == [3, 1]
  alpha = [bytes(t) for b in batches for t, s in zip(b["tokens"], b["source"]) if s == 0]
  epoch = tokenize([f"Alpha {i}." for i in range(12)], demo_config.model.text.context_length)
  assert sorted(alpha[:12]) == sorted(map(bytes, epoch))  # each epoch of a: every record once
  halves = [pipeline.train_iterator(demo_config, p, 2, start_step=4) for p in range(2)]
  for want in batches[4:]:
    got = [next(h) for h in halves]
    for key in ("image", "tokens", "source"):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
  labels = ("mix0", "mix1")
  stats = pipeline.DataStats(labels)
  for batch in batches:
    stats.update(batch)
  metrics = stats.metrics()
  assert (metrics["data/mix0/used"], metrics["data/mix1/used"], metrics["data/used"]) == (
    36,
    12,
    48,
  )
  back = pipeline.DataStats.from_state_dict(stats.state_dict(), labels)
  assert back.metrics() == metrics


@pytest.mark.slow
def test_a_mixture_run_keeps_its_per_source_counts_across_a_resume(demo_config, tmp_path):
  from smartclip_jax import train
  from tests.test_train import read_metrics

  a, b = caption_folder(tmp_path / "a", "Alpha", 12), caption_folder(tmp_path / "b", "Beta", 5)
  demo_config.data.update(mixture=f"folder:{a}=3,folder:{b}=1")
  demo_config.update(batch_size=8, total_steps=4, log_every=1, checkpoint_every=2)
  train.train_and_evaluate(demo_config, tmp_path / "run")
  demo_config.total_steps = 6  # a rerun with more steps resumes at 4
  train.train_and_evaluate(demo_config, tmp_path / "run")
  last = read_metrics(tmp_path / "run")[-1]
  assert last["step"] == 6
  assert (last["data/mix0/used"], last["data/mix1/used"], last["data/used"]) == (36, 12, 48)
