"""Does SmartCLIP's claim hold on data we control? CLIP vs SmartCLIP and ablations, on partial
captions.

  python -m smartclip_jax.experiments.partial_captions --out results/partial_captions [--quick]

Every method trains the same towers for the same steps on the same batches (per seed), in three
settings: from scratch on prefix captions (the paper's sampler), and fine-tuned from a CLIP
pretrained on full captions, on prefix captions and on random-subset captions. Each run is scored
on the fixed test sets of `probes.py`. Writes `results.json` (every number), `table.md`
(mean ± std over seeds) and the figures of `figures.py` to --out.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import ml_collections
import numpy as np

from smartclip_jax import config as config_lib
from smartclip_jax.experiments import figures, probes as probes_lib, runner, scenes
from smartclip_jax.experiments.runner import (
  Sizes,
  Trainer,
  executor,
  experiment_main,
  pin_to_core,
  schedule,
)

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
}  # `loss=X` goes through config.set_loss: the loss and the model it trains
# (name, start, caption mode): `finetune` starts from the CLIP pretrained on full captions.
SETTINGS = (
  ("scratch/prefix", "scratch", "prefix"),
  ("finetune/prefix", "finetune", "prefix"),
  ("finetune/subset", "finetune", "subset"),
)
SEEDS = (0, 1, 2)
TEST_SEED = 1000  # the test split's scenes: one fixed set for every run


QUICK = Sizes(train=256, test=48, pretrain=256, steps=3, pretrain_steps=3, batch=16, layers=1)
QUICK_METHODS = ("clip", "smartclip")  # --quick: every code path and output, two compiles
QUICK_HELP = "tiny sizes, one seed, CLIP and SmartCLIP only: every output file, for the tests"
QUICK_RUN = dict(sizes=QUICK, seeds=SEEDS[:1], methods=QUICK_METHODS)
FULL_RUN = dict(sizes=Sizes())


def base(sizes: Sizes) -> ml_collections.ConfigDict:
  """The towers every method shares (`runner.towers`) with a from-scratch optimizer."""
  c = runner.towers(sizes)
  c.total_steps = sizes.steps
  c.optim.towers.update(lr=1e-3, weight_decay=0.1, warmup_steps=min(50, sizes.steps))
  c.optim.mask_net.lr = 1e-3
  c.optim.grad_clip_norm = 1.0
  return c


def method_config(
  method: str, sizes: Sizes, methods: dict[str, list[str]] = METHODS
) -> ml_collections.ConfigDict:
  """`base(sizes)` with the overrides `methods` lists for `method`."""
  c = base(sizes)
  for item in methods[method]:
    if item.startswith("loss="):
      config_lib.set_loss(c, item[len("loss=") :])
    else:
      config_lib.apply_override(c, item)
  config_lib.validate(c)
  return c


def summarize(runs: list[dict], metrics: Sequence[str] = probes_lib.METRICS) -> dict:
  """{setting: {method: {metric: [mean, std over seeds]}}}, for the `metrics` a method's runs
  have."""
  out: dict = {}
  for r in runs:
    out.setdefault(r["setting"], {}).setdefault(r["method"], []).append(r)
  return {
    setting: {
      method: {
        m: [float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs]))]
        for m in metrics
        if m in rs[0]
      }
      for method, rs in by_method.items()
    }
    for setting, by_method in out.items()
  }


def table(summary: dict) -> str:
  heads = " | ".join(probes_lib.METRICS)
  lines = []
  for setting, by_method in summary.items():
    lines += [
      f"### {setting}",
      "",
      f"| method | {heads} |",
      "|---" * (len(probes_lib.METRICS) + 1) + "|",
    ]
    for method, metrics in by_method.items():
      cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in metrics.values())
      lines.append(f"| {method} | {cells} |")
    lines.append("")
  return "\n".join(lines)


@dataclasses.dataclass
class Data:
  """Every split a run reads, generated once per process."""

  train: scenes.Split
  pretrain: scenes.Split
  test: probes_lib.Probes


def make_data(sizes: Sizes) -> Data:
  c = base(sizes)
  context, size = c.model.text.context_length, c.model.vision.image_size
  return Data(
    scenes.make_split(sizes.train, size, 0, "train"),
    scenes.make_split(sizes.pretrain, size, 0, "pretrain"),
    probes_lib.make_probes(scenes.make_split(sizes.test, size, TEST_SEED, "test"), context),
  )


_PROCESS: dict[str, Any] = {}  # this process's sizes, Data and Trainer (`start_process`)


def start_process(sizes: Sizes, cores: Any = None) -> None:
  """Makes this process ready to run tasks (`pin_to_core` for a pool worker)."""
  if cores is not None:
    pin_to_core(cores)
  _PROCESS.update(
    sizes=sizes, data=make_data(sizes), trainer=Trainer(lambda method: method_config(method, sizes))
  )


def run_task(
  seed: int, setting: str, mode: str, method: str, pretrained: Any = None, analyse: bool = False
) -> tuple[dict, Any]:
  """One training run on captions sampled by `mode`, and its scores, in a process readied by
  `start_process`. Returns (its record, extra): extra is the towers of a `pretrained` run, the
  mask analysis when `analyse`, else None."""
  sizes, data, trainer = _PROCESS["sizes"], _PROCESS["data"], _PROCESS["trainer"]
  context = base(sizes).model.text.context_length
  t0 = time.perf_counter()
  if setting == "pretrained":
    split, steps = data.pretrain, sizes.pretrain_steps
  else:
    split, steps = data.train, sizes.steps
  index, tokens = schedule(split, steps, sizes.batch, mode, seed, context)
  parts, params, loss = trainer.train(method, seed, split, index, tokens, pretrained)
  record = {
    "setting": setting,
    "method": method,
    "seed": seed,
    "loss": loss,
    **probes_lib.evaluate(*parts.encoders(params), data.test),
    "seconds": time.perf_counter() - t0,
  }
  if setting == "pretrained":
    return record, {k: params[k] for k in ("visual", "text")}
  if analyse:
    return record, figures.mask_analysis(parts.batched("text_masks", params), data.test, context)
  return record, None


def run(
  out: pathlib.Path,
  sizes: Sizes,
  seeds: Sequence[int] = SEEDS,
  methods: Sequence[str] = tuple(METHODS),
  settings=SETTINGS,
  workers: int = 1,
) -> dict:
  """Every (seed, setting, method) run on `workers` processes; a seed's fine-tuning runs start
  when its pretraining is done. Writes the outputs to `out`."""
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  finetune = [(name, mode) for name, start_from, mode in settings if start_from == "finetune"]
  scratch = [(name, mode) for name, start_from, mode in settings if start_from == "scratch"]
  total = len(seeds) * (len(settings) * len(methods) + bool(finetune))
  runs: list[dict] = []
  masks: dict[str, Any] = {}

  def submit(
    seed: int, setting: str, mode: str, method: str, pretrained: Any = None
  ) -> futures.Future:
    analyse = method.startswith("smartclip") and seed == seeds[0] and setting == "finetune/prefix"
    future = track(run_task, seed, setting, mode, method, pretrained, analyse)
    if analyse:
      future.add_done_callback(lambda f: masks.update({method: f.result()[1]}))
    return future

  log.info("%d runs on %d process(es); %s", total, workers, sizes)
  with executor(workers, start_process, sizes) as pool:
    track = runner.tracked(pool, total, start, runs, _brief)
    pretraining = (
      {seed: submit(seed, "pretrained", "full", "clip") for seed in seeds} if finetune else {}
    )
    jobs = [submit(seed, s, mode, m) for seed in seeds for s, mode in scratch for m in methods]
    for seed, future in pretraining.items():
      towers = future.result()[1]
      jobs += [submit(seed, s, mode, m, towers) for s, mode in finetune for m in methods]
    for job in futures.as_completed(jobs):
      job.result()  # a failed run stops the experiment with its error
  order = ["pretrained", *(s[0] for s in settings)]
  rank = {m: i for i, m in enumerate(methods)}
  runs.sort(key=lambda r: (order.index(r["setting"]), rank[r["method"]], r["seed"]))
  summary = summarize(runs)
  masks = {m: masks[m] for m in methods if m in masks}
  results = {
    "sizes": dataclasses.asdict(sizes),
    "seeds": list(seeds),
    "methods": METHODS,
    "settings": [s[0] for s in settings],
    "test_seed": TEST_SEED,
    "workers": workers,
    "runs": runs,
    "summary": summary,
    "masks": masks,
  }
  return runner.finish(out, results, start, write_outputs)


def write_outputs(out: pathlib.Path, results: dict) -> None:
  """table.md and the figures, from what results.json holds."""
  (out / "table.md").write_text(table(results["summary"]))
  figures.write_all(out, results["summary"], results["masks"])


def _brief(record: dict) -> str:
  return "  ".join(f"{k} {record[k]:.1f}" for k in probes_lib.METRICS)


def main(argv: Sequence[str] | None = None) -> None:
  experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
  main()
