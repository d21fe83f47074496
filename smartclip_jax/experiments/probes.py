"""The held-out test sets of the partial-captions experiment, fixed before any model was run.

On one test split of scenes (see `results/partial_captions/README.md` for the design and why):
(a) full captions: image <-> caption retrieval, R@1 both ways;
(b) single objects: each object's own sentence retrieves an image; a hit is a top-1 image that
    holds an object equal to it in all five factors;
(c) concepts, zero-shot, with prompts "A {colour} {shape}.": the colour of a shape that occurs
    once (8-way), the shape of a colour that occurs once (4-way), and whether an image holds a
    colour-shape pair (ROC AUC over images, averaged over the pairs);
(d) compositional pairs: "A {cA} {sA}. A {cB} {sB}." against the colour-swapped
    "A {cB} {sA}. A {cA} {sB}." for two objects that differ in both; a hit scores the true one
    higher.
Scoring uses plain embeddings, masks off, as the paper's inference does.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from smartclip_jax import losses
from smartclip_jax.evals import retrieval
from smartclip_jax.experiments import scenes
from smartclip_jax.tokenizer import tokenize

CONCEPTS = list(itertools.product(scenes.COLOURS, scenes.SHAPES))  # (colour, shape) prompts
METRICS = (
  "full_i2t_r1",
  "full_t2i_r1",
  "single_t2i_r1",
  "colour_acc",
  "shape_acc",
  "presence_auc",
  "swap_acc",
)


def prompt(colour: str, shape: str) -> str:
  return f"A {colour} {shape}."


@dataclasses.dataclass
class Probes:
  split: scenes.Split
  full: np.ndarray  # [N, L] tokens, one full caption per image
  single: np.ndarray  # [Q, L] tokens, one per object
  single_things: list[tuple[int, scenes.Thing]]  # (image, object) of each single query
  concepts: np.ndarray  # [len(CONCEPTS), L]
  pairs: list[tuple[int, np.ndarray, np.ndarray]]  # (image, true tokens, swapped tokens)


@dataclasses.dataclass
class PartialQueries:
  """Captions that name some, never all, of a scene's objects, each to retrieve its scene."""

  tokens: np.ndarray  # [Q, L]
  named: list[list[scenes.Thing]]  # the objects each query names


def make_partial(
  split: scenes.Split, context_length: int, per_image: int, seed: int
) -> PartialQueries:
  """`per_image` queries per scene: k of its n sentences, k uniform in 1..n-1, kept in caption
  order. Scene i's draws depend on (seed, i) only, so the first K scenes of a split have the
  same queries whatever its length."""
  tokens, named = [], []
  for i, things in enumerate(split.scenes):
    rng = np.random.default_rng([seed, 17, i])
    for _ in range(per_image):
      keep = sorted(rng.choice(len(things), int(rng.integers(1, len(things))), replace=False))
      tokens.append(scenes.caption_tokens([split.sentence_ids[i][k] for k in keep], context_length))
      named.append([things[k] for k in keep])
  return PartialQueries(np.stack(tokens), named)


def make_probes(split: scenes.Split, context_length: int) -> Probes:
  full = np.stack([scenes.caption_tokens(ids, context_length) for ids in split.sentence_ids])
  single_things = [(i, t) for i, things in enumerate(split.scenes) for t in things]
  single = np.stack(
    [
      scenes.caption_tokens([split.sentence_ids[i][k]], context_length)
      for i, things in enumerate(split.scenes)
      for k in range(len(things))
    ]
  )
  pairs = []
  for i, things in enumerate(split.scenes):
    a, b = things[0], things[1]
    if a.colour != b.colour and a.shape != b.shape:
      true = f"{prompt(a.colour, a.shape)} {prompt(b.colour, b.shape)}"
      swapped = f"{prompt(b.colour, a.shape)} {prompt(a.colour, b.shape)}"
      pairs.append((i, *tokenize([true, swapped], context_length)))
  return Probes(
    split,
    full,
    single,
    single_things,
    tokenize([prompt(c, s) for c, s in CONCEPTS], context_length),
    pairs,
  )


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """ROC AUC by the rank-sum statistic (ties count half)."""
  pos, neg = scores[labels], scores[~labels]
  greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
  return float(greater / (len(pos) * len(neg)))


Scorer = Callable[[np.ndarray], np.ndarray]  # caption tokens [M, L] -> scores [images, M]


def scorer(
  img_emb: np.ndarray,
  encode_text: Callable[[np.ndarray], np.ndarray],
  text_masks: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Scorer:
  """Scores of every image against captions: plain cosines (the paper's inference), or with
  `text_masks` each caption's mask on the image side, the training score (`losses`)."""
  if text_masks is None:
    img = retrieval.normalize(img_emb)
    return lambda tokens: img @ retrieval.normalize(encode_text(tokens)).T
  return lambda tokens: np.asarray(
    losses.masked_similarity(img_emb, encode_text(tokens), text_masks(tokens))
  )


def named_hits(
  scores: np.ndarray,
  named: list[list[scenes.Thing]],
  split: scenes.Split,
) -> np.ndarray:
  """bool [Q]: whether each query's top-1 image (scores [images, Q]) holds every object the
  query names, each equal in all five factors."""
  top = scores.argmax(0)
  return np.array([all(t in split.scenes[j] for t in things) for things, j in zip(named, top)])


def evaluate(
  encode_image: Callable[[np.ndarray], np.ndarray],
  encode_text: Callable[[np.ndarray], np.ndarray],
  probes: Probes,
  text_masks: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
  """Every test set's score in percent (AUC too), from unnormalised embedding functions; with
  `text_masks`, pairs are scored with each caption's mask (`scorer`)."""
  return evaluate_scores(scorer(encode_image(probes.split.images), encode_text, text_masks), probes)


def evaluate_scores(score: Scorer, probes: Probes) -> dict[str, float]:
  """`evaluate` from a `scorer` of the probes' images, for callers that score more queries."""
  p = probes
  sims = score(p.full)
  n = len(sims)
  out = {
    "full_i2t_r1": np.mean(sims.argmax(1) == np.arange(n)),
    "full_t2i_r1": np.mean(sims.argmax(0) == np.arange(n)),
  }
  out["single_t2i_r1"] = np.mean(
    named_hits(score(p.single), [[t] for _, t in p.single_things], p.split)
  )

  concept = score(p.concepts)  # [N, colours x shapes]
  grid = concept.reshape(n, len(scenes.COLOURS), len(scenes.SHAPES))
  colour_hits, shape_hits = [], []
  for i, things in enumerate(p.split.scenes):
    for s_idx, shape in enumerate(scenes.SHAPES):
      found = [t for t in things if t.shape == shape]
      if len(found) == 1:
        colour_hits.append(scenes.COLOURS[grid[i, :, s_idx].argmax()] == found[0].colour)
    for c_idx, colour in enumerate(scenes.COLOURS):
      found = [t for t in things if t.colour == colour]
      if len(found) == 1:
        shape_hits.append(scenes.SHAPES[grid[i, c_idx].argmax()] == found[0].shape)
  out["colour_acc"], out["shape_acc"] = np.mean(colour_hits), np.mean(shape_hits)
  aucs = []
  for k, (colour, shape) in enumerate(CONCEPTS):
    labels = np.array(
      [any(t.colour == colour and t.shape == shape for t in things) for things in p.split.scenes]
    )
    if labels.any() and not labels.all():
      aucs.append(auc(concept[:, k], labels))
  out["presence_auc"] = np.mean(aucs)

  if p.pairs:
    pair_scores = score(np.concatenate([np.stack([t, s]) for _, t, s in p.pairs]))
    rows = pair_scores[[i for i, _, _ in p.pairs]]
    true, swapped = np.diagonal(rows[:, 0::2]), np.diagonal(rows[:, 1::2])
    out["swap_acc"] = np.mean(true > swapped)
  else:
    out["swap_acc"] = float("nan")
  return {k: 100 * float(v) for k, v in out.items()}
