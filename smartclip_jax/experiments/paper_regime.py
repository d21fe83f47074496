"""SmartCLIP against CLIP in the paper's regime, on scenes we generate.

  python -m smartclip_jax.experiments.paper_regime --out results/paper_regime [--quick]

A base CLIP is pretrained on full captions until it separates the concepts (the bar of
`BAR`), then fine-tuned on partial captions as the reference fine-tunes OpenAI's CLIP: the
towers at a small learning rate after a warm-up, the mask network at 1e-3 from its first step
(docs/method.md, the recipe). CLIP fine-tuned on the same captions and schedule (Long-CLIP's
recipe) and the untouched base are the baselines; the towers' learning rate is swept. Every
SmartCLIP model is scored two ways, with plain embeddings (the paper's inference) and with the
masked training score. The design, written before any run, is results/paper_regime/README.md.
Writes `results.json`, `table.md`, `lr_sweep.png`, the mask figures and `models/` to --out.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import flax.serialization
import jax
import ml_collections
import numpy as np
import scipy.stats

from smartclip_jax import config as config_lib
from smartclip_jax.experiments import figures, probes as probes_lib, runner, scenes
from smartclip_jax.experiments.partial_captions import TEST_SEED
from smartclip_jax.experiments.runner import (
  Trainer,
  executor,
  experiment_main,
  pin_to_core,
  schedule as caption_schedule,
)

log = logging.getLogger("smartclip_jax")


def default_sizes(**changes: int) -> runner.Sizes:
  """The shared sizes with this experiment's longer pretraining, wider towers and partial
  queries per test image."""
  return runner.Sizes(
    **{
      **dict(pretrain_steps=1000, steps=200, width=64, heads=4, patch=8, partial_per_image=3),
      **changes,
    }
  )


QUICK = default_sizes(
  train=256,
  test=48,
  pretrain=256,
  pretrain_steps=3,
  steps=3,
  batch=16,
  layers=1,
  width=32,
  heads=2,
  patch=12,
  partial_per_image=1,
)

TOWER_LRS = {"frozen": 0.0, "small": 1e-5, "large": 1e-3}
# The control for the gain (README, follow-up): CLIP on a fixed random SUBSET_DIMS of the image
# dimensions at SmartCLIP's τ, i.e. SmartCLIP's similarity under one mask for every caption
# (`clip.subset_dims`), to tell the towers' drifting less from per-caption selection.
SUBSET_DIMS = 18  # about the dimensions SmartCLIP's masks kept here (results/paper_regime)
LOSSES = ("smartclip", "clip", "clip_subset")
COMPARISONS = (("smartclip", "clip"), ("smartclip", "clip_subset"), ("clip_subset", "clip"))
# Every fine-tuning run of a seed: (caption mode, loss, towers' learning rate).
RUNS = (
  *(("prefix", "smartclip", lr) for lr in TOWER_LRS),
  *(("prefix", "clip", lr) for lr in ("small", "large")),
  ("subset", "smartclip", "small"),
  ("subset", "clip", "small"),
)
QUICK_RUNS = (("prefix", "smartclip", "small"), ("prefix", "clip", "small"))
SEEDS = (0, 1, 2, 3)
BASE_SEED = 0
# The main metric, and the galleries it may be measured on: the largest on which the base
# scores within MAIN_RANGE, chosen from the base alone before any fine-tuning run.
MAIN = "partial_t2i_r1"
MAIN_RANGE = (20.0, 80.0)
GALLERIES = (500, 250, 100, 50)
# What the base must reach on the full test split to count as separating the concepts.
BAR = {"full_i2t_r1": 60.0, "full_t2i_r1": 60.0, "colour_acc": 30.0, "shape_acc": 40.0}
METRICS = (MAIN, *probes_lib.METRICS)
PARTIAL_SEED = 2000  # the partial test queries' draws
BOOTSTRAP = 2000
QUICK_HELP = "tiny sizes, two seeds, two runs each: every output file, for the tests"
QUICK_RUN = dict(sizes=QUICK, seeds=SEEDS[:2], runs=QUICK_RUNS)
FULL_RUN = dict(sizes=default_sizes())


def configure(name: str, sizes: runner.Sizes) -> ml_collections.ConfigDict:
  """`pretrain`: the base CLIP from scratch (configs/demo.py's from-scratch optimizer, for its
  reasons). `<loss>@<lr name>`: a fine-tuning run with the recipe's optimizer (AdamW 0.9 /
  0.999 / 1e-8, decay 1e-2 on every tower parameter, no clipping), the towers at TOWER_LRS[lr]
  with the recipe's share of warm-up steps (200 of 3,650), the mask net at 1e-3 from step 0."""
  c = runner.towers(sizes)
  if name == "pretrain":
    config_lib.set_loss(c, "clip")
    c.optim.towers.update(lr=1e-3, weight_decay=0.1, warmup_steps=50)
    c.optim.update(decay="matrices", grad_clip_norm=1.0)
  else:
    loss, lr = name.split("@")
    config_lib.set_loss(c, "clip" if loss == "clip_subset" else loss)
    if loss == "clip_subset":
      c.clip.update(temperature=0.01, subset_dims=SUBSET_DIMS)
    c.optim.towers.update(lr=TOWER_LRS[lr], warmup_steps=max(1, round(sizes.steps * 200 / 3650)))
  config_lib.validate(c)
  return c


@dataclasses.dataclass
class TestSet:
  """The probes and partial queries on the first `gallery` test scenes."""

  gallery: int
  probes: probes_lib.Probes
  partial: probes_lib.PartialQueries


def test_set(split: scenes.Split, gallery: int, sizes: runner.Sizes) -> TestSet:
  part = scenes.Split(split.images[:gallery], split.scenes[:gallery], split.sentence_ids[:gallery])
  context = runner.towers(sizes).model.text.context_length
  return TestSet(
    gallery,
    probes_lib.make_probes(part, context),
    probes_lib.make_partial(part, context, sizes.partial_per_image, PARTIAL_SEED),
  )


def score(parts: Any, params: Any, test: TestSet, masked: bool) -> tuple[dict, list[bool]]:
  """Every metric in percent, and the main metric's hit per query, with plain embeddings or
  (`masked`) each caption's mask on the image side."""
  encode_image, encode_text = parts.encoders(params)
  masks = parts.batched("text_masks", params) if masked else None
  scorer = probes_lib.scorer(encode_image(test.probes.split.images), encode_text, masks)
  metrics = probes_lib.evaluate_scores(scorer, test.probes)
  hits = probes_lib.named_hits(scorer(test.partial.tokens), test.partial.named, test.probes.split)
  return {MAIN: 100 * float(hits.mean()), **metrics}, hits.tolist()


_PROCESS: dict[str, Any] = {}


def start_process(sizes: runner.Sizes, cores: Any = None) -> None:
  """Makes this process ready to run tasks (`pin_to_core` for a pool worker); a process that
  is ready for these sizes already stays as it is."""
  if cores is not None:
    pin_to_core(cores)
  if _PROCESS.get("sizes") == sizes:
    return
  size = runner.towers(sizes).model.vision.image_size
  test = scenes.make_split(sizes.test, size, TEST_SEED, "test")
  _PROCESS.update(
    sizes=sizes,
    test=test,
    tests={},
    train=scenes.make_split(sizes.train, size, 0, "train"),
    pretrain=scenes.make_split(sizes.pretrain, size, 0, "pretrain"),
    trainer=Trainer(lambda name: configure(name, sizes)),
  )


def _test(gallery: int) -> TestSet:
  tests = _PROCESS["tests"]
  if gallery not in tests:
    tests[gallery] = test_set(_PROCESS["test"], gallery, _PROCESS["sizes"])
  return tests[gallery]


def pretrain_task(out: pathlib.Path) -> tuple[dict, Any]:
  """The base CLIP: trained, scored on every gallery, saved; returns (record, parameters)."""
  sizes, trainer = _PROCESS["sizes"], _PROCESS["trainer"]
  t0 = time.perf_counter()
  context = runner.towers(sizes).model.text.context_length
  index, tokens = caption_schedule(
    _PROCESS["pretrain"], sizes.pretrain_steps, sizes.batch, "full", BASE_SEED, context
  )
  parts, params, loss = trainer.train("pretrain", BASE_SEED, _PROCESS["pretrain"], index, tokens)
  by_gallery = {str(g): score(parts, params, _test(g), False)[0] for g in galleries(sizes)}
  _save(out / "models" / "base.msgpack", params)
  return {"loss": loss, "by_gallery": by_gallery, "seconds": time.perf_counter() - t0}, params


def finetune_task(
  out: pathlib.Path,
  seed: int,
  mode: str,
  loss: str,
  lr: str,
  base: Any,
  gallery: int,
  analyse: bool,
) -> dict:
  """One fine-tuning run from the base, scored (SmartCLIP both ways), its model saved."""
  sizes, trainer = _PROCESS["sizes"], _PROCESS["trainer"]
  t0 = time.perf_counter()
  context = runner.towers(sizes).model.text.context_length
  index, tokens = caption_schedule(_PROCESS["train"], sizes.steps, sizes.batch, mode, seed, context)
  init = {k: base[k] for k in ("visual", "text")}
  if loss == "clip":
    init["logit_scale"] = base["logit_scale"]  # the base's temperature, as CLIP goes on
  name = f"{loss}@{lr}"
  parts, params, final = trainer.train(name, seed, _PROCESS["train"], index, tokens, init)
  test = _test(gallery)
  record = {
    "setting": mode,
    "method": loss,
    "lr": lr,
    "seed": seed,
    "loss": final,
    "modes": {},
    "hits": {},
  }
  for masked in (False, True) if loss == "smartclip" else (False,):
    view = "masked" if masked else "plain"
    record["modes"][view], record["hits"][view] = score(parts, params, test, masked)
  if analyse:
    record["masks"] = figures.mask_analysis(
      parts.batched("text_masks", params), test.probes, context
    )
  _save(out / "models" / f"{mode}_{name}_seed{seed}.msgpack", params)
  record["seconds"] = time.perf_counter() - t0
  return record


def _save(path: pathlib.Path, params: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(flax.serialization.to_bytes(params))


def galleries(sizes: runner.Sizes) -> list[int]:
  """GALLERIES as far as the test split reaches, largest first."""
  return sorted({min(g, sizes.test) for g in GALLERIES}, reverse=True)


def choose_gallery(by_gallery: dict[str, dict]) -> int:
  """The largest gallery on which the base's main metric lies within MAIN_RANGE; the full test
  split if none does (the main metric then has no room, and the result says so)."""
  low, high = MAIN_RANGE
  sizes = [int(g) for g in by_gallery]
  return next((g for g in sizes if low <= by_gallery[str(g)][MAIN] <= high), sizes[0])


def detectable(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
  """The paired mean difference a two-sided t-test over n seeds detects with `power`, given
  the standard deviation of the per-seed differences."""
  if n < 2 or not np.isfinite(sd):
    return float("nan")
  t = scipy.stats.t
  return float((t.ppf(1 - alpha / 2, n - 1) + t.ppf(power, n - 1)) * sd / math.sqrt(n))


def paired(runs: list[dict], rng: np.random.Generator) -> list[dict]:
  """Each of COMPARISONS (SmartCLIP plain and masked minus CLIP fine-tuned, and the control's
  pairs) on the main metric, per seed, for each caption mode and learning rate that has both:
  mean, std, a t interval over seeds, the difference the design detects, and per seed a
  bootstrap interval over the test queries."""
  by_key = {(r["setting"], r["method"], r["lr"], r["seed"]): r for r in runs}
  out = []
  for first, second in COMPARISONS:
    cells = sorted({(mode, lr) for mode, method, lr, _ in by_key if method == first})
    for mode, lr in cells:
      seeds = sorted(
        s
        for m, method, rate, s in by_key
        if (m, method, rate) == (mode, second, lr) and (mode, first, lr, s) in by_key
      )
      views = ("plain", "masked") if first == "smartclip" else ("plain",)
      for view in views if seeds else ():
        diffs, intervals = [], []
        for s in seeds:
          a = np.asarray(by_key[(mode, first, lr, s)]["hits"][view], float)
          b = np.asarray(by_key[(mode, second, lr, s)]["hits"]["plain"], float)
          diffs.append(100 * (a.mean() - b.mean()))
          draws = rng.integers(0, len(a), (BOOTSTRAP, len(a)))
          boot = 100 * (a[draws].mean(1) - b[draws].mean(1))
          intervals.append([float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))])
        n, mean = len(diffs), float(np.mean(diffs))
        sd = float(np.std(diffs, ddof=1)) if n > 1 else float("nan")
        half = float(scipy.stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
        out.append(
          {
            "setting": mode,
            "lr": lr,
            "method": first,
            "minus": second,
            "view": view,
            "seeds": seeds,
            "differences": diffs,
            "mean": mean,
            "sd": sd,
            "t_interval": [mean - half, mean + half],
            "detectable": detectable(sd, n),
            "bootstrap_per_seed": intervals,
          }
        )
  return out


def summarize(runs: list[dict]) -> dict:
  """{setting: {"<method>@<lr> <view>": {metric: [mean, std over seeds]}}}."""
  groups: dict = {}
  for r in runs:
    for view, metrics in r["modes"].items():
      groups.setdefault(r["setting"], {}).setdefault(f"{r['method']}@{r['lr']} {view}", []).append(
        metrics
      )
  return {
    setting: {
      row: {
        m: [float(np.mean([x[m] for x in rows])), float(np.std([x[m] for x in rows]))]
        for m in METRICS
      }
      for row, rows in by_row.items()
    }
    for setting, by_row in groups.items()
  }


def table(results: dict) -> str:
  """Markdown: the base, then per caption mode every row's mean ± std, then the paired
  differences on the main metric."""
  gallery, base = results["gallery"], results["base"]
  heads = " | ".join(METRICS)
  lines = [
    f"Main metric `{MAIN}` on a gallery of {gallery} test scenes; the other retrieval "
    "metrics on the same gallery.",
    "",
    "### base CLIP (one model)",
    "",
    f"| gallery | {heads} |",
    "|---" * (len(METRICS) + 1) + "|",
  ]
  for g, metrics in base["by_gallery"].items():
    lines.append(f"| {g} | " + " | ".join(f"{metrics[m]:.1f}" for m in METRICS) + " |")
  for setting, rows in results["summary"].items():
    lines += [
      "",
      f"### fine-tuned on {setting} captions (mean ± std over seeds)",
      "",
      f"| run | {heads} |",
      "|---" * (len(METRICS) + 1) + "|",
    ]
    for row, metrics in rows.items():
      lines.append(
        f"| {row} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in metrics.values()) + " |"
      )
  lines += [
    "",
    f"### Paired differences on `{MAIN}`, by seed (points)",
    "",
    "| captions | towers' lr | difference | scored | per seed | mean | 95 % t interval | "
    "detectable (80 % power) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for p in results["paired"]:
    lo, hi = p["t_interval"]
    # results written before the control name their first method's view `smartclip`
    first, second = p.get("method", "smartclip"), p.get("minus", "clip")
    lines.append(
      f"| {p['setting']} | {p['lr']} | {first} − {second} | {p.get('view', p.get('smartclip'))} | "
      + ", ".join(f"{d:+.1f}" for d in p["differences"])
      + f" | {p['mean']:+.1f} | [{lo:+.1f}, {hi:+.1f}] | {p['detectable']:.1f} |"
    )
  return "\n".join(lines) + "\n"


def write_outputs(out: pathlib.Path, results: dict) -> None:
  (out / "table.md").write_text(table(results))
  prefix = results["summary"].get("prefix", {})
  curves = {}
  for method, view in (("smartclip", "plain"), ("smartclip", "masked"), ("clip", "plain")):
    rows = [
      (TOWER_LRS[lr], prefix[f"{method}@{lr} {view}"][MAIN])
      for lr in TOWER_LRS
      if f"{method}@{lr} {view}" in prefix
    ]
    if rows:
      curves[f"{method} ({view})"] = (
        [r[0] for r in rows],
        [r[1][0] for r in rows],
        [r[1][1] for r in rows],
      )
  base = results["base"]["by_gallery"][str(results["gallery"])][MAIN]
  figures.lr_sweep(out / "lr_sweep.png", curves, base, MAIN)
  figures.mask_figures(out, results["masks"])


def run(
  out: pathlib.Path,
  sizes: runner.Sizes,
  seeds: Sequence[int] = SEEDS,
  runs: Sequence[tuple[str, str, str]] = RUNS,
  workers: int = 1,
) -> dict:
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  total = 1 + len(seeds) * len(runs)
  log.info("%d runs on %d process(es); %s", total, workers, sizes)
  records: list[dict] = []
  start_process(sizes)  # the base trains here, on every core, before the pool starts
  base, params = pretrain_task(out)
  gallery = choose_gallery(base["by_gallery"])
  full = base["by_gallery"][str(galleries(sizes)[0])]
  base["passes_bar"] = all(full[m] >= v for m, v in BAR.items())
  log.info(
    "[1/%d] base CLIP (%.0f s): %s; gallery %d; bar %s",
    total,
    base["seconds"],
    _brief(full),
    gallery,
    "met" if base["passes_bar"] else "NOT met",
  )
  base_params = jax.device_get(params)
  with executor(workers, start_process, sizes) as pool:

    def done(future: futures.Future) -> None:
      r = future.result()
      records.append(r)
      log.info(
        "[%d/%d] %s %s@%s seed %d (%.0f s, %.0f s in): %s",
        len(records) + 1,
        total,
        r["setting"],
        r["method"],
        r["lr"],
        r["seed"],
        r["seconds"],
        time.perf_counter() - start,
        "  ".join(f"{v} {_brief(m)}" for v, m in r["modes"].items()),
      )

    jobs = []
    for seed in seeds:
      for mode, loss, lr in runs:
        analyse = loss == "smartclip" and mode == "prefix" and seed == seeds[0]
        job = pool.submit(finetune_task, out, seed, mode, loss, lr, base_params, gallery, analyse)
        job.add_done_callback(done)
        jobs.append(job)
    for job in futures.as_completed(jobs):
      job.result()  # a failed run stops the experiment with its error
  order = {r: i for i, r in enumerate(runs)}
  records.sort(key=lambda r: (order[(r["setting"], r["method"], r["lr"])], r["seed"]))
  masks = {f"smartclip@{r['lr']}": r.pop("masks") for r in records if "masks" in r}
  results = {
    "sizes": dataclasses.asdict(sizes),
    "seeds": list(seeds),
    "runs_per_seed": runs,
    "tower_lrs": TOWER_LRS,
    "bar": BAR,
    "main": MAIN,
    "main_range": MAIN_RANGE,
    "gallery": gallery,
    "base": base,
    "summary": summarize(records),
    "paired": paired(records, np.random.default_rng(0)),
    "runs": records,
    "masks": masks,
    "workers": workers,
  }
  return runner.finish(out, results, start, write_outputs)


def _brief(metrics: dict) -> str:
  return " ".join(
    f"{k} {metrics[k]:.1f}" for k in (MAIN, "full_i2t_r1", "full_t2i_r1", "colour_acc", "shape_acc")
  )


def main(argv: Sequence[str] | None = None) -> None:
  experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
  main()
