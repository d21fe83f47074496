"""Recall@K against a brute-force numpy oracle built on a stable sort: exact, with ties,
several captions per image, chunked or not, sharded over 8 devices or on one."""

import itertools
import logging

import jax
import ml_collections
import numpy as np
import pytest

from smartclip_jax import progress, sharding, tokenizer
from smartclip_jax.data import captions, pipeline, sources
from smartclip_jax.evals import report, retrieval, run as evals_run


def oracle(sim, text_to_image, ks=(1, 5, 10)):
  n_img, n_txt = sim.shape
  out = {}
  for k in ks:
    t2i = [text_to_image[t] in np.argsort(-sim[:, t], kind="stable")[:k] for t in range(n_txt)]
    i2t = []
    for i in range(n_img):
      top = np.argsort(-sim[i], kind="stable")[:k]
      i2t.append(any(text_to_image[t] == i for t in top))
    out[f"i2t_r{k}"] = 100.0 * np.mean(i2t)
    out[f"t2i_r{k}"] = 100.0 * np.mean(t2i)
  return out


def tied_embeddings(n_img=30, per=3, dim=6, seed=0):
  """Small integer embeddings: float32 dot products are exact and many of them tie."""
  rng = np.random.default_rng(seed)
  text_to_image = np.repeat(np.arange(n_img), per)
  rng.shuffle(text_to_image)
  img = rng.integers(-1, 2, size=(n_img, dim)).astype(np.float32)
  txt = rng.integers(-1, 2, size=(n_img * per, dim)).astype(np.float32)
  return img, txt, text_to_image


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_recall_matches_oracle_with_ties_and_several_captions_per_image(chunk):
  img, txt, text_to_image = tied_embeddings()
  rank = retrieval.retrieval_ranks(img, txt, text_to_image, chunk=chunk)
  got = retrieval.recalls(rank)
  want = oracle(img @ txt.T, text_to_image)
  assert {k: got[k] for k in want} == want
  assert got["mean_recall"] == pytest.approx(np.mean(list(want.values())))
  assert rank["t2i"].shape == (90,) and rank["i2t"].shape == (30,)


def test_ranks_are_the_same_on_one_device_and_sharded_over_eight():
  img, txt, text_to_image = tied_embeddings(n_img=50, per=5, seed=1)
  one = retrieval.retrieval_ranks(
    img, txt, text_to_image, sharding.data_mesh(jax.devices()[:1]), chunk=16
  )
  eight = retrieval.retrieval_ranks(img, txt, text_to_image, sharding.data_mesh(), chunk=40)
  for d in ("i2t", "t2i"):
    np.testing.assert_array_equal(one[d], eight[d])


def test_ranks_of_a_stable_sort():
  rng = np.random.default_rng(2)
  queries, keys = rng.integers(0, 2, (20, 3)).astype(np.float32), rng.integers(0, 2, (9, 3))
  targets = rng.integers(0, 9, 20)
  got = retrieval.ranks(queries, keys, targets, chunk=8)
  order = [np.argsort(-(q @ keys.T), kind="stable") for q in queries]
  np.testing.assert_array_equal(got, [list(o).index(t) for o, t in zip(order, targets)])


def test_perfect_and_reversed_embeddings():
  eye = np.eye(12, dtype=np.float32)
  assert all(
    v == 100.0
    for v in retrieval.recalls(retrieval.retrieval_ranks(eye, eye, np.arange(12))).values()
  )
  assert retrieval.recalls(retrieval.retrieval_ranks(eye, -eye, np.arange(12)))["t2i_r10"] == 0.0


def test_an_image_without_captions_is_an_error():
  with pytest.raises(ValueError, match="at least one caption"):
    retrieval.retrieval_ranks(np.eye(3), np.eye(3)[:2], [0, 1])


def test_masked_ranks_match_the_full_masked_similarity_matrix():
  from smartclip_jax import losses

  img, txt, text_to_image = tied_embeddings(n_img=20, per=2, dim=8, seed=3)
  masks = np.random.default_rng(3).integers(0, 2, size=txt.shape).astype(np.float32)
  sim = np.asarray(losses.masked_similarity(img, txt, masks))  # [images, captions]
  got = retrieval.retrieval_ranks(img, txt, text_to_image, chunk=6, masks=masks)
  t2i = [
    list(np.argsort(-sim[:, t], kind="stable")).index(text_to_image[t]) for t in range(len(txt))
  ]
  i2t = [
    min(
      list(np.argsort(-sim[i], kind="stable")).index(t) for t in np.flatnonzero(text_to_image == i)
    )
    for i in range(len(img))
  ]
  np.testing.assert_array_equal(got["t2i"], t2i)
  np.testing.assert_array_equal(got["i2t"], i2t)


class Echo:
  """An encoder whose embeddings are its inputs: each batch's images and tokens as given."""

  mesh = sharding.data_mesh(jax.devices()[:1])

  def apply(self, method, x):
    return x


@pytest.mark.parametrize("skipped", [0, 2])
def test_the_heldout_progress_ends_with_one_last_line(skipped, caplog, monkeypatch):
  """The loop's last update and the one after it (which counts skipped records) both report
  every record: one line says so, whether or not records were skipped."""
  emb = np.eye(8, dtype=np.float32)
  batches = [{"image": emb[:4], "tokens": emb[:4]}, {"image": emb[4:], "tokens": emb[4:]}]
  monkeypatch.setattr(pipeline, "eval_batches", lambda config: (batches, 8 + skipped))
  clock = itertools.count(0.0, 40.0)  # every update is due
  monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
  config = ml_collections.ConfigDict({"data": {"name": "demo"}})
  with caplog.at_level(logging.INFO, logger="smartclip_jax"):
    results = evals_run.evaluate_heldout(config, Echo())
  lines = [r.getMessage() for r in caplog.records]
  total = 8 + skipped
  want = [f"held-out demo: {n}/{total} records" for n in sorted({4, 8, total})]
  assert [line.split(",")[0] for line in lines] == want
  assert results["skipped"] == skipped and results["i2t_r1"] == 100.0
  assert "first_t2i_r1" not in results  # batches without first sentences: no such measure


def test_the_heldout_split_also_retrieves_each_image_from_its_first_sentence(monkeypatch):
  emb = np.eye(6, dtype=np.float32)
  first = emb[[0, 1, 2, 3, 5, 4]]  # images 4 and 5 swapped: their first sentences mislead
  batches = [{"image": emb, "tokens": emb, "first_tokens": first}]
  monkeypatch.setattr(pipeline, "eval_batches", lambda config: (batches, 6))
  config = ml_collections.ConfigDict({"data": {"name": "demo"}})
  results = evals_run.evaluate_heldout(config, Echo())
  assert results["t2i_r1"] == 100.0 and results["first_t2i_r1"] == pytest.approx(400 / 6)
  assert {"first_t2i_r5", "first_t2i_r10"} <= set(results) and "first_i2t_r1" not in results
  assert "1st->I" in report.format_table(results, "t")
  assert "first sentence T2I 66.7" in report.summary(results)


def test_held_out_records_carry_their_first_sentence(demo_config):
  batches, _ = pipeline.eval_batches(demo_config)
  batch = next(batches)
  record = sources.make_source(demo_config, "eval")[0]
  first = captions.sample_caption(record["caption"], "first", np.random.default_rng(0))
  np.testing.assert_array_equal(
    batch["first_tokens"][0], tokenizer.tokenize(first, demo_config.model.text.context_length)[0]
  )
  assert (batch["first_tokens"] != batch["tokens"]).any()


def test_held_out_batches_decoded_by_worker_processes_are_the_same(demo_config):
  """`data.num_workers` Grain processes decode the held-out split ahead of the device, in
  order: the same batches as Grain's threads in this process."""
  demo_config.data.demo.num_eval = 40
  threads, records = pipeline.eval_batches(demo_config)
  demo_config.data.num_workers = 2
  workers, _ = pipeline.eval_batches(demo_config)
  got, want = list(workers), list(threads)
  assert len(got) == len(want) == 3 and records == 40
  for a, b in zip(got, want, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
