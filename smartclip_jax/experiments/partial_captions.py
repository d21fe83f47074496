"""Does SmartCLIP's claim hold on data we control? CLIP vs SmartCLIP and ablations, partial captions.

  python -m smartclip_jax.experiments.partial_captions --out results/partial_captions [--quick]

Every method trains the same towers for the same steps on the same batches (per seed), in three
settings: from scratch on prefix captions (the paper's sampler), and fine-tuned from a CLIP
pretrained on full captions, on prefix captions and on random-subset captions. Each run is scored
on the fixed test sets of `probes.py`. Writes `results.json` (every number), `table.md`
(mean ± std over seeds) and the figures of `figures.py` to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from smartclip_jax import config as config_lib, optim, sharding, step as step_lib
from smartclip_jax.data.decode import normalize_image
from smartclip_jax.experiments import figures, probes as probes_lib, scenes
from smartclip_jax.models.clip import build_model

log = logging.getLogger("smartclip_jax")

# Each method is config overrides on `base(...)`; the names are the table's rows.
METHODS: dict[str, list[str]] = {
    "clip": ["loss=clip"],
    "clip_tau0.01": ["loss=clip", "clip.temperature=0.01"],
    "smartclip": ["loss=smartclip"],
    "smartclip_soft": ["loss=smartclip", "model.mask.hard=false"],
    "smartclip_no_sparsity": ["loss=smartclip", "smartclip.sparsity_weight=0.0"],
    "smartclip_no_modular": ["loss=smartclip", "smartclip.modular=false"],
    "siglip": ["loss=siglip"],
}
# (name, start, caption mode): `finetune` starts from the CLIP pretrained on full captions.
SETTINGS = (("scratch/prefix", "scratch", "prefix"), ("finetune/prefix", "finetune", "prefix"),
            ("finetune/subset", "finetune", "subset"))
SEEDS = (0, 1, 2)
TEST_SEED = 1000  # the test split's scenes: one fixed set for every run


@dataclasses.dataclass(frozen=True)
class Sizes:
  train: int = 16384
  test: int = 500
  pretrain: int = 16384
  steps: int = 500
  pretrain_steps: int = 500
  batch: int = 128
  layers: int = 2


QUICK = Sizes(train=256, test=48, pretrain=256, steps=3, pretrain_steps=3, batch=16, layers=1)
QUICK_METHODS = ("clip", "smartclip")  # --quick: every code path and output, two compiles


def base(sizes: Sizes) -> ml_collections.ConfigDict:
  """The towers every method shares: the demo's, on 48 px images with 64-token captions."""
  c = config_lib.base_config()
  c.batch_size, c.total_steps = sizes.batch, sizes.steps
  c.model.embed_dim = 64
  c.model.vision.update(image_size=48, patch_size=8, width=64, layers=sizes.layers, heads=4)
  c.model.text.update(context_length=64, width=64, layers=sizes.layers, heads=4)
  c.model.mask.heads = 4
  c.optim.towers.update(lr=1e-3, weight_decay=0.1, warmup_steps=min(50, sizes.steps))
  c.optim.mask_net.lr = 1e-3
  c.optim.frozen_positions = 0
  c.optim.grad_clip_norm = 1.0
  return c


def method_config(method: str, sizes: Sizes) -> ml_collections.ConfigDict:
  c = base(sizes)
  for item in METHODS[method]:
    config_lib.apply_override(c, item)
  config_lib.validate(c)
  return c


def schedule(split: scenes.Split, steps: int, batch: int, mode: str, seed: int,
             context_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Image indices [steps, batch] (epochs of fresh permutations) and caption tokens
  [steps, batch, L] with each caption's sentences sampled by `mode`: one data order per seed,
  the same for every method."""
  rng = np.random.default_rng([seed, 7, ("full", "prefix", "subset").index(mode)])
  n = len(split.scenes)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch // n))])
  index = order[:steps * batch].reshape(steps, batch)
  tokens = np.stack([
      scenes.caption_tokens([split.sentence_ids[i][k] for k in
                             scenes.sample_sentences(len(split.scenes[i]), mode, rng)],
                            context_length)
      for i in index.reshape(-1)]).reshape(steps, batch, context_length)
  return index, tokens


class Trainer:
  """One compiled train step, initialiser and set of encoders per method, reused across seeds
  and settings."""

  def __init__(self, sizes: Sizes):
    self.sizes = sizes
    self.device = jax.devices()[:1]
    self._parts: dict[str, Parts] = {}

  def parts(self, method: str, steps: int) -> Parts:
    key = f"{method}/{steps}"
    if key not in self._parts:
      c = method_config(method, self.sizes)
      c.total_steps = steps
      mesh = sharding.make_mesh(c, self.device)
      model, tx = build_model(c), optim.make_optimizer(c)
      shardings = step_lib.state_shardings(model, tx, c, mesh)
      apply = lambda fn: jax.jit(lambda p, x: model.apply({"params": p}, x, method=fn))
      names = ("encode_image", "encode_text") + (("text_masks",) if c.loss == "smartclip" else ())
      self._parts[key] = Parts(
          mesh, shardings, step_lib.state_initializer(model, tx, c, mesh, shardings),
          step_lib.make_train_step(model, tx, c, mesh, shardings),
          {fn: apply(fn) for fn in names})
    return self._parts[key]

  def train(self, method: str, seed: int, split: scenes.Split, index: np.ndarray,
            tokens: np.ndarray, init: Any = None) -> tuple[Parts, Any, float]:
    """Trains `method` from `seed` (towers from `init` if given: a pretrained CLIP's `visual`
    and `text`; the mask net, scale and bias start fresh); returns (its parts, params, last
    loss)."""
    parts = self.parts(method, len(index))
    state = parts.init(seed)
    if init is not None:
      params = dict(state.params)
      params.update({k: jax.device_put(init[k], parts.shardings.params[k])
                     for k in ("visual", "text")})
      state = state.replace(params=params)
    rows = sharding.batch_sharding(parts.mesh)
    metrics = {}
    for s in range(len(index)):
      batch = {"image": normalize_image(split.images[index[s]]), "tokens": tokens[s]}
      state, metrics = parts.step(state, jax.device_put(batch, rows))
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
      raise FloatingPointError(f"{method} seed {seed}: the loss ended non-finite ({loss})")
    return parts, jax.device_get(state.params), loss


@dataclasses.dataclass
class Parts:
  """What a method's runs share: its mesh, state shardings, initialiser (seed -> state), train
  step, and jitted (params, inputs) -> outputs per model method."""
  mesh: Any
  shardings: Any
  init: Callable[[int], Any]
  step: Callable
  apply: dict[str, Callable]

  def batched(self, method: str, params: Any, prepare: Callable = lambda x: x,
              batch: int = 256) -> Callable[[np.ndarray], np.ndarray]:
    """inputs [N, ...] -> numpy outputs [N, ...], `batch` rows at a time."""
    fn = self.apply[method]
    return lambda x: np.concatenate([np.asarray(fn(params, prepare(x[i:i + batch])))
                                     for i in range(0, len(x), batch)])

  def encoders(self, params: Any) -> tuple[Callable, Callable]:
    return (self.batched("encode_image", params, normalize_image),
            self.batched("encode_text", params))


def summarize(runs: list[dict]) -> dict:
  """{setting: {method: {metric: [mean, std over seeds]}}}."""
  out: dict = {}
  for r in runs:
    out.setdefault(r["setting"], {}).setdefault(r["method"], []).append(r)
  return {setting: {method: {m: [float(np.mean([r[m] for r in rs])),
                                 float(np.std([r[m] for r in rs]))]
                             for m in probes_lib.METRICS}
                    for method, rs in by_method.items()}
          for setting, by_method in out.items()}


def table(summary: dict) -> str:
  heads = " | ".join(probes_lib.METRICS)
  lines = []
  for setting, by_method in summary.items():
    lines += [f"### {setting}", "", f"| method | {heads} |",
              "|---" * (len(probes_lib.METRICS) + 1) + "|"]
    for method, metrics in by_method.items():
      cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in metrics.values())
      lines.append(f"| {method} | {cells} |")
    lines.append("")
  return "\n".join(lines)


def run(out: pathlib.Path, sizes: Sizes, seeds: Sequence[int] = SEEDS,
        methods: Sequence[str] = tuple(METHODS), settings=SETTINGS) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  context = base(sizes).model.text.context_length
  size = base(sizes).model.vision.image_size
  train_split = scenes.make_split(sizes.train, size, 0, "train")
  pre_split = scenes.make_split(sizes.pretrain, size, 0, "pretrain")
  test = probes_lib.make_probes(scenes.make_split(sizes.test, size, TEST_SEED, "test"), context)
  log.info("data: %d train, %d pretrain, %d test scenes (%.0f s)", sizes.train, sizes.pretrain,
           sizes.test, time.perf_counter() - start)
  trainer = Trainer(sizes)
  runs, kept = [], {}
  for seed in seeds:
    pretrained = None
    if any(s[1] == "finetune" for s in settings):
      index, tokens = schedule(pre_split, sizes.pretrain_steps, sizes.batch, "full", seed, context)
      parts, pretrained, loss = trainer.train("clip", seed, pre_split, index, tokens)
      scores = probes_lib.evaluate(*parts.encoders(pretrained), test)
      runs.append({"setting": "pretrained", "method": "clip", "seed": seed, "loss": loss,
                   **scores})
      log.info("seed %d: CLIP pretrained on full captions: %s", seed, _brief(scores))
    for setting, start_from, mode in settings:
      index, tokens = schedule(train_split, sizes.steps, sizes.batch, mode, seed, context)
      for method in methods:
        t0 = time.perf_counter()
        init = pretrained if start_from == "finetune" else None
        parts, params, loss = trainer.train(method, seed, train_split, index, tokens, init)
        scores = probes_lib.evaluate(*parts.encoders(params), test)
        runs.append({"setting": setting, "method": method, "seed": seed, "loss": loss,
                     "seconds": time.perf_counter() - t0, **scores})
        log.info("%s %s seed %d (%.0f s): %s", setting, method, seed,
                 time.perf_counter() - t0, _brief(scores))
        if method.startswith("smartclip") and seed == seeds[0] and setting == "finetune/prefix":
          kept[method] = (parts, params)
  summary = summarize(runs)
  analysis = {name: figures.mask_analysis(parts.batched("text_masks", params), test, context)
              for name, (parts, params) in kept.items()}
  results = {"sizes": dataclasses.asdict(sizes), "seeds": list(seeds), "methods": METHODS,
             "settings": [s[0] for s in settings], "test_seed": TEST_SEED, "runs": runs,
             "summary": summary, "masks": analysis,
             "wall_seconds": time.perf_counter() - start}
  (out / "results.json").write_text(json.dumps(results, indent=1))
  (out / "table.md").write_text(table(summary))
  figures.write_all(out, summary, analysis)
  log.info("done in %.0f s; %s", results["wall_seconds"], out)
  return results


def _brief(scores: dict) -> str:
  return "  ".join(f"{k} {v:.1f}" for k, v in scores.items())


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m smartclip_jax.experiments.partial_captions",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, one seed, CLIP and SmartCLIP only: every output file, "
                           "for the tests")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
  if args.quick:
    run(args.out, QUICK, seeds=SEEDS[:1], methods=QUICK_METHODS)
  else:
    run(args.out, Sizes())
  print((args.out / "table.md").read_text())


if __name__ == "__main__":
  main()
