"""Demo data, caption samplers and the Grain pipeline."""

import numpy as np
import pytest

from smartclip_jax.data import demo, pipeline
from smartclip_jax.data.captions import sample_caption, split_sentences
from smartclip_jax.data.sources import make_source
from smartclip_jax.tokenizer import tokenize


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
