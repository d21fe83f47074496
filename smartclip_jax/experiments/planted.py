"""Planted structure: with frozen embeddings in which each concept owns known dimensions, do
SmartCLIP's masks keep the dimensions a caption names? (results/planted/README.md)

  python -m smartclip_jax.experiments.planted --out results/planted [--quick]

Level A learns additive per-concept mask logits (the loss, the straight-through mask and the
sparsity gradient alone); level B trains the package's `MaskNetwork` on synthetic token
sequences that name the concepts. Conditions: the code as planted, captions shuffled against
their masks (must fail), and the code rotated off the axes (masks should be constant).
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smartclip_jax import losses
from smartclip_jax.experiments import runner
from smartclip_jax.models.mask import MaskNetwork, masks_from_logits

CONCEPTS, BLOCK, PER_IMAGE = 8, 8, 3
DIM = CONCEPTS * BLOCK
LEVELS = ("A", "B")
CONDITIONS = ("planted", "shuffled", "rotated")
SEEDS = (0, 1, 2)
INSTANCE_NOISE, NOISE, TOKEN_NOISE = 0.5, 0.05, 0.1
FILLERS = 4  # filler words ("a", "and", "with", ...) between concept words
SOT, EOT, PAD = range(CONCEPTS + FILLERS, CONCEPTS + FILLERS + 3)  # rows of the word table
METRICS = ("recall", "false_on", "jaccard")


@dataclasses.dataclass(frozen=True)
class Sizes:
  steps: int = 2000
  batch: int = 256
  test: int = 2000
  length: int = 12  # tokens per caption (level B), padding included


QUICK_HELP = "300 steps, one seed: every output file, for the tests"
QUICK_RUN = dict(sizes=Sizes(steps=300, test=400), seeds=SEEDS[:1])
FULL_RUN = dict(sizes=Sizes())


def concept_dims(named: np.ndarray) -> np.ndarray:
  """[n, CONCEPTS] booleans -> [n, DIM]: the dimensions of the concepts named."""
  return np.repeat(named, BLOCK, axis=-1)


class World:
  """One seed's planted code: prototypes, the word table of level B, and the rotation."""

  def __init__(self, seed: int):
    rng = np.random.default_rng(seed)
    self.prototypes = rng.normal(size=(CONCEPTS, BLOCK))
    self.words = rng.normal(size=(CONCEPTS + FILLERS + 3, DIM))
    self.rotation = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]

  def examples(self, rng: np.random.Generator, n: int, length: int) -> dict[str, np.ndarray]:
    """n images with their captions: embeddings `z`, `t`, the concepts named [n, CONCEPTS]
    and the caption's tokens [n, length, DIM] as ln_final would leave them."""
    order = np.argsort(rng.random((n, CONCEPTS)), axis=1)[:, :PER_IMAGE]  # held, random order
    count = rng.integers(1, PER_IMAGE + 1, n)
    held, named = np.zeros((n, CONCEPTS), bool), np.zeros((n, CONCEPTS), bool)
    np.put_along_axis(held, order, True, axis=1)
    np.put_along_axis(named, order, np.arange(PER_IMAGE) < count[:, None], axis=1)
    blocks = self.prototypes[None] + INSTANCE_NOISE * rng.normal(size=(n, CONCEPTS, BLOCK))
    z = (blocks * held[..., None]).reshape(n, DIM) + NOISE * rng.normal(size=(n, DIM))
    t = (blocks * named[..., None]).reshape(n, DIM) + NOISE * rng.normal(size=(n, DIM))
    ids = np.full((n, length), PAD)
    ids[:, 0] = SOT
    for i in range(n):
      words = [w for c in order[i, : count[i]] for w in (rng.integers(CONCEPTS, SOT), c)]
      ids[i, 1 : len(words) + 2] = [*words, EOT]
    tokens = self.words[ids] + TOKEN_NOISE * rng.normal(size=(n, length, DIM))
    tokens = (tokens - tokens.mean(-1, keepdims=True)) / tokens.std(-1, keepdims=True)
    return {"z": z, "t": t, "named": named, "tokens": tokens}


def mask_model(level: str) -> tuple[Any, Any]:
  """(init(key, example), masks(params, named, tokens)) of a level's mask side."""
  if level == "A":

    def init(key, example):
      return {"bias": jnp.zeros(DIM), "w": 0.1 * jax.random.normal(key, (CONCEPTS, DIM))}

    def masks(params, named, tokens):
      return masks_from_logits(params["bias"] + named.astype(jnp.float32) @ params["w"], True)

    return init, masks
  net = MaskNetwork(embed_dim=DIM, heads=8)
  return (
    lambda key, example: net.init(key, jnp.asarray(example["tokens"][:2], jnp.float32)),
    lambda params, named, tokens: net.apply(params, tokens),
  )


def loss_fn(masks_fn, params, z, t, named, tokens):
  masks = masks_fn(params, named, tokens)
  return losses.smartclip_loss(z, t, masks)[0]


def train(level: str, condition: str, seed: int, sizes: Sizes) -> dict:
  """One run: the mask side trained on fresh batches; its scores on held-out captions."""
  start = time.perf_counter()
  world, rng = World(seed), np.random.default_rng(seed + 1)
  init, masks_fn = mask_model(level)
  params = init(jax.random.key(seed), world.examples(rng, 2, sizes.length))
  tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
  opt_state = tx.init(params)
  grad = jax.grad(lambda p, *a: loss_fn(masks_fn, p, *a))

  @jax.jit
  def step(params, opt_state, z, t, named, tokens):
    updates, opt_state = tx.update(grad(params, z, t, named, tokens), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(sizes.steps):
    ex = world.examples(rng, sizes.batch, sizes.length)
    z, t = ex["z"], ex["t"]
    if condition == "rotated":
      z, t = z @ world.rotation, t @ world.rotation
    named, tokens = ex["named"], ex["tokens"]
    if condition == "shuffled":  # each mask reads another caption of the batch
      perm = rng.permutation(sizes.batch)
      named, tokens = named[perm], tokens[perm]
    params, opt_state = step(
      params, opt_state, *(jnp.asarray(a, jnp.float32) for a in (z, t, named, tokens))
    )
  test = world.examples(np.random.default_rng(10_000 + seed), sizes.test, sizes.length)
  m = np.asarray(
    masks_fn(
      params, jnp.asarray(test["named"], jnp.float32), jnp.asarray(test["tokens"], jnp.float32)
    )
  )
  return {
    "level": level,
    "condition": condition,
    "seed": seed,
    "seconds": time.perf_counter() - start,
    **scores(m, test["named"]),
    "example_masks": example_masks(m, test["named"]),
  }


def scores(masks: np.ndarray, named: np.ndarray) -> dict:
  """Recall of the named dimensions, false-on rate elsewhere, cross-concept Jaccard of
  one-concept captions, and mask size by concepts named."""
  on, want = masks > 0.5, concept_dims(named)
  single = named.sum(1) == 1
  concept = named[single].argmax(1)
  pairs = jaccard(on[single])[concept[:, None] != concept[None, :]]
  return {
    "recall": float(((on & want).sum(1) / want.sum(1)).mean()),
    "false_on": float((on & ~want).sum() / (~want).sum()),
    "jaccard": float(pairs.mean()) if pairs.size else float("nan"),
    "size_by_named": {
      str(k): float(on[named.sum(1) == k].sum(1).mean())
      for k in range(1, PER_IMAGE + 1)
      if (named.sum(1) == k).any()
    },
  }


def jaccard(on: np.ndarray) -> np.ndarray:
  """Pairwise Jaccard of boolean masks [n, D] -> [n, n]; two empty masks count as equal
  (`losses.mask_jaccard`, the trainer's diagnostic)."""
  return np.asarray(losses.mask_jaccard(jnp.asarray(on, jnp.float32)))


def example_masks(masks: np.ndarray, named: np.ndarray) -> list[list[int]]:
  """The first one-concept caption's mask for each concept, then two- and three-concept ones:
  the rows of the mask figure."""
  rows = [np.flatnonzero((named.sum(1) == 1) & named[:, c])[:1] for c in range(CONCEPTS)]
  rows += [np.flatnonzero(named.sum(1) == k)[:2] for k in (2, 3)]
  return [[int(x) for x in masks[i] > 0.5] for i in np.concatenate(rows)]


def _start(cores: Any = None) -> None:
  if cores is not None:
    runner.pin_to_core(cores)


def run(out: pathlib.Path, sizes: Sizes, seeds: Sequence[int] = SEEDS, workers: int = 1) -> dict:
  """Every (level, condition, seed) run, on `workers` processes; writes the outputs."""
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  cells = list(itertools.product(LEVELS, CONDITIONS, seeds))
  with runner.executor(workers, _start) as pool:
    runs = [f.result() for f in [pool.submit(train, *cell, sizes) for cell in cells]]
  results = {"sizes": dataclasses.asdict(sizes), "seeds": list(seeds), "runs": runs}
  results["summary"] = summarize(runs)
  return runner.finish(out, results, start, write_outputs)


def summarize(runs: list[dict]) -> dict:
  """{level: {condition: {metric: (mean, std) over seeds}}}, mask sizes included."""
  summary: dict = {}
  for (level, condition), group in itertools.groupby(
    runs, key=lambda r: (r["level"], r["condition"])
  ):
    group = list(group)
    cell = {m: _mean_std([r[m] for r in group]) for m in METRICS}
    for k in map(str, range(1, PER_IMAGE + 1)):
      cell[f"size_{k}"] = _mean_std([r["size_by_named"][k] for r in group])
    summary.setdefault(level, {})[condition] = cell
  return summary


def _mean_std(values: list[float]) -> list[float]:
  """[mean, std]: a list, as results.json gives it back."""
  return [float(np.mean(values)), float(np.std(values))]


def table(summary: dict) -> str:
  columns = [*METRICS, *(f"size_{k}" for k in range(1, PER_IMAGE + 1))]
  lines = [
    "| level | condition | " + " | ".join(columns) + " |",
    "|---|---|" + "---|" * len(columns),
  ]
  for level, conditions in summary.items():
    for condition, cell in conditions.items():
      values = " | ".join(f"{cell[c][0]:.2f} ± {cell[c][1]:.2f}" for c in columns)
      lines.append(f"| {level} | {condition} | {values} |")
  ideal = " | ".join(["1.00", "0.00", "0.00", *(str(BLOCK * k) for k in range(1, 4))])
  return "\n".join([*lines, f"| ideal | | {ideal} |", ""])


def write_outputs(out: pathlib.Path, results: dict) -> None:
  """table.md, scores.png (the three measures per cell) and one mask figure per cell."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  (out / "table.md").write_text(table(results["summary"]))
  summary = results["summary"]
  fig, axes = plt.subplots(1, len(METRICS), figsize=(12, 3.4))
  for ax, metric in zip(axes, METRICS):
    for j, level in enumerate(summary):
      cells = summary[level]
      mean = [cells[c][metric][0] for c in cells]
      std = [cells[c][metric][1] for c in cells]
      ax.bar(np.arange(len(cells)) + 0.4 * j, mean, 0.4, yerr=std, label=f"level {level}")
      ax.set_xticks(np.arange(len(cells)) + 0.2, list(cells))
    ax.set_ylim(0, 1.05)
    ax.set_title(metric)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "scores.png", dpi=110)
  plt.close(fig)
  first = results["seeds"][0]
  for r in results["runs"]:
    if r["seed"] != first:
      continue
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.imshow(np.asarray(r["example_masks"]), aspect="auto", cmap="Greys", vmin=0, vmax=1)
    ax.set_xticks(np.arange(0, DIM, BLOCK) - 0.5, [f"c{c}" for c in range(CONCEPTS)], ha="left")
    ax.set_yticks(range(CONCEPTS + 4), [f"c{c}" for c in range(CONCEPTS)] + ["2", "2", "3", "3"])
    ax.set_ylabel("concepts named")
    ax.set_title(f"level {r['level']}, {r['condition']}, seed {first}: masks (black = on)")
    fig.tight_layout()
    fig.savefig(out / f"masks_{r['level']}_{r['condition']}.png", dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  runner.experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
  main()
