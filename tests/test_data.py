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


def test_train_iterator_batches_and_resumes_from_state(demo_config):
  it = pipeline.train_iterator(demo_config)
  first = next(it)
  c = demo_config.model
  assert first["image"].shape == (16, c.vision.image_size, c.vision.image_size, 3)
  assert first["image"].dtype == np.float32
  assert first["tokens"].shape == (16, c.text.context_length)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.train_iterator(demo_config)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["image"], want["image"])


def test_two_processes_read_disjoint_slices_covering_the_data(demo_config):
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
  per_process = []
  for index in range(2):
    it = pipeline.train_iterator(demo_config, process_index=index, process_count=2)
    steps = (
      demo_config.data.demo.num_train // demo_config.batch_size
    )  # an epoch of 8-record batches
    per_process.append([bytes(t) for _ in range(steps) for t in next(it)["tokens"]])
  assert sorted(per_process[0] + per_process[1]) == want
  ids_0 = {i for i in range(len(source)) if i % 2 == 0}
  assert len(ids_0) == len(per_process[0])


@pytest.mark.slow
def test_worker_processes_resume_from_state(demo_config):
  demo_config.data.num_workers = 2
  it = pipeline.train_iterator(demo_config)
  next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(3)]
  resumed = pipeline.train_iterator(demo_config)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["tokens"], want)
