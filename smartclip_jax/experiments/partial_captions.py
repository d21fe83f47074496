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
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent import futures
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
SETTINGS = (
  ("scratch/prefix", "scratch", "prefix"),
  ("finetune/prefix", "finetune", "prefix"),
  ("finetune/subset", "finetune", "subset"),
)
SEEDS = (0, 1, 2)
TEST_SEED = 1000  # the test split's scenes: one fixed set for every run


@dataclasses.dataclass(frozen=True)
class Sizes:
  train: int = 8192
  test: int = 500
  pretrain: int = 8192
  steps: int = 250
  pretrain_steps: int = 500
  batch: int = 64
  layers: int = 2
  width: int = 32
  heads: int = 2
  patch: int = 12


QUICK = Sizes(train=256, test=48, pretrain=256, steps=3, pretrain_steps=3, batch=16, layers=1)
QUICK_METHODS = ("clip", "smartclip")  # --quick: every code path and output, two compiles


def base(sizes: Sizes) -> ml_collections.ConfigDict:
  """The towers every method shares: small ViT and text transformer, 48 px images, 64-token
  captions, D = 64 embedding dimensions for the masks to choose from."""
  c = config_lib.base_config()
  c.batch_size, c.total_steps = sizes.batch, sizes.steps
  c.model.embed_dim = 64
  c.model.vision.update(
    image_size=48, patch_size=sizes.patch, width=sizes.width, layers=sizes.layers, heads=sizes.heads
  )
  c.model.text.update(context_length=64, width=sizes.width, layers=sizes.layers, heads=sizes.heads)
  c.model.mask.heads = sizes.heads
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


def schedule(
  split: scenes.Split, steps: int, batch: int, mode: str, seed: int, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Image indices [steps, batch] (epochs of fresh permutations) and caption tokens
  [steps, batch, L] with each caption's sentences sampled by `mode`: one data order per seed,
  the same for every method."""
  rng = np.random.default_rng([seed, 7, ("full", "prefix", "subset").index(mode)])
  n = len(split.scenes)
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch // n))])
  index = order[: steps * batch].reshape(steps, batch)
  tokens = np.stack(
    [
      scenes.caption_tokens(
        [
          split.sentence_ids[i][k] for k in scenes.sample_sentences(len(split.scenes[i]), mode, rng)
        ],
        context_length,
      )
      for i in index.reshape(-1)
    ]
  ).reshape(steps, batch, context_length)
  return index, tokens


class Trainer:
  """One compiled train step, initialiser and set of encoders per method, reused across seeds
  and settings. `configure(method)` is the method's config (total_steps is set here)."""

  def __init__(self, configure: Callable[[str], ml_collections.ConfigDict]):
    self.configure = configure
    self.device = jax.devices()[:1]
    self._parts: dict[str, Parts] = {}

  def parts(self, method: str, steps: int) -> Parts:
    key = f"{method}/{steps}"
    if key not in self._parts:
      c = self.configure(method)
      c.total_steps = steps
      mesh = sharding.make_mesh(c, self.device)
      model, tx = build_model(c), optim.make_optimizer(c)
      shardings = step_lib.state_shardings(model, tx, c, mesh)
      apply = lambda fn: jax.jit(lambda p, x: model.apply({"params": p}, x, method=fn))
      names = ("encode_image", "encode_text") + (("text_masks",) if c.loss == "smartclip" else ())
      self._parts[key] = Parts(
        mesh,
        shardings,
        step_lib.state_initializer(model, tx, c, mesh, shardings),
        step_lib.make_train_step(model, tx, c, mesh, shardings),
        {fn: apply(fn) for fn in names},
      )
    return self._parts[key]

  def train(
    self,
    method: str,
    seed: int,
    split: scenes.Split,
    index: np.ndarray,
    tokens: np.ndarray,
    init: Any = None,
  ) -> tuple[Parts, Any, float]:
    """Trains `method` from `seed`, the top-level parameters `init` holds (e.g. a pretrained
    CLIP's `visual` and `text`) taken from it and the rest fresh; returns (its parts, params,
    last loss)."""
    parts = self.parts(method, len(index))
    state = parts.init(seed)
    if init is not None:
      params = dict(state.params)
      params.update({k: jax.device_put(v, parts.shardings.params[k]) for k, v in init.items()})
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

  def batched(
    self, method: str, params: Any, prepare: Callable = lambda x: x, batch: int = 256
  ) -> Callable[[np.ndarray], np.ndarray]:
    """inputs [N, ...] -> numpy outputs [N, ...], `batch` rows at a time."""
    fn = self.apply[method]
    return lambda x: np.concatenate(
      [np.asarray(fn(params, prepare(x[i : i + batch]))) for i in range(0, len(x), batch)]
    )

  def encoders(self, params: Any) -> tuple[Callable, Callable]:
    return (
      self.batched("encode_image", params, normalize_image),
      self.batched("encode_text", params),
    )


def summarize(runs: list[dict]) -> dict:
  """{setting: {method: {metric: [mean, std over seeds]}}}."""
  out: dict = {}
  for r in runs:
    out.setdefault(r["setting"], {}).setdefault(r["method"], []).append(r)
  return {
    setting: {
      method: {
        m: [float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs]))]
        for m in probes_lib.METRICS
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


def _exit_with_parent() -> None:
  """A worker whose parent is killed stops too (Linux), not running its queue to the end."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  if os.getppid() == 1:  # the parent died before prctl
    os._exit(1)


def pin_to_core(cores: Any) -> None:
  """A pool worker takes one core from the `cores` queue and keeps to it: XLA sizes its CPU
  thread pool by the cores a process may use, and these towers are too small for intra-op
  threads to pay, so one process per core is about twice as fast as one process on all."""
  _exit_with_parent()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {cores.get()})  # before jax's CPU client exists


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


class _InProcess(futures.Executor):
  """Runs each task when it is submitted, in this process (`--workers 1`, the tests)."""

  def __init__(self, start: Callable, *args):
    start(*args)

  def submit(self, fn, /, *args, **kwargs) -> futures.Future:
    future: futures.Future = futures.Future()
    future.set_result(fn(*args, **kwargs))
    return future


def executor(workers: int, start: Callable, *args) -> futures.Executor:
  """`workers` processes, each readied by `start(*args, cores)` (one core each), or with
  workers = 1 this process, readied by `start(*args)`."""
  if workers == 1:
    return _InProcess(start, *args)
  context = multiprocessing.get_context("spawn")
  cores = context.SimpleQueue()
  available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
  for i in range(workers):
    cores.put(available[i % len(available)])
  return futures.ProcessPoolExecutor(
    workers, mp_context=context, initializer=start, initargs=(*args, cores)
  )


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

  def done(future: futures.Future) -> None:
    record, _ = future.result()
    runs.append(record)
    log.info(
      "[%d/%d] %s %s seed %d (%.0f s, %.0f s in): %s",
      len(runs),
      total,
      record["setting"],
      record["method"],
      record["seed"],
      record["seconds"],
      time.perf_counter() - start,
      _brief(record),
    )

  def submit(
    seed: int, setting: str, mode: str, method: str, pretrained: Any = None
  ) -> futures.Future:
    analyse = method.startswith("smartclip") and seed == seeds[0] and setting == "finetune/prefix"
    future = pool.submit(run_task, seed, setting, mode, method, pretrained, analyse)
    future.add_done_callback(done)
    if analyse:
      future.add_done_callback(lambda f: masks.update({method: f.result()[1]}))
    return future

  log.info("%d runs on %d process(es); %s", total, workers, sizes)
  with executor(workers, start_process, sizes) as pool:
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
    "wall_seconds": time.perf_counter() - start,
  }
  (out / "results.json").write_text(json.dumps(results, indent=1))
  write_outputs(out, results)
  log.info("done in %.0f s; %s", results["wall_seconds"], out)
  return results


def write_outputs(out: pathlib.Path, results: dict) -> None:
  """table.md and the figures, from what results.json holds."""
  (out / "table.md").write_text(table(results["summary"]))
  figures.write_all(out, results["summary"], results["masks"])


def _brief(record: dict) -> str:
  return "  ".join(f"{k} {record[k]:.1f}" for k in probes_lib.METRICS)


def experiment_main(
  argv: Sequence[str] | None,
  prog: str,
  doc: str,
  quick: str,
  run_quick: Callable[[pathlib.Path, int], Any],
  run_full: Callable[[pathlib.Path, int], Any],
  replot: Callable[[pathlib.Path, dict], None],
) -> None:
  """The command line an experiment shares: --out, --workers, --quick, --replot; prints the
  table it wrote."""
  parser = argparse.ArgumentParser(
    prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument(
    "--workers",
    type=int,
    default=min(os.cpu_count() or 1, 8),
    help="processes running runs side by side, one core each (default: "
    "this machine's cores, at most 8)",
  )
  parser.add_argument("--quick", action="store_true", help=quick)
  parser.add_argument(
    "--replot",
    action="store_true",
    help="no runs: redraw table.md and the figures from --out's results.json",
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
  if args.replot:
    replot(args.out, json.loads((args.out / "results.json").read_text()))
  elif args.quick:
    run_quick(args.out, args.workers)
  else:
    run_full(args.out, args.workers)
  print((args.out / "table.md").read_text())


def main(argv: Sequence[str] | None = None) -> None:
  experiment_main(
    argv,
    "python -m smartclip_jax.experiments.partial_captions",
    __doc__,
    "tiny sizes, one seed, CLIP and SmartCLIP only: every output file, for the tests",
    lambda out, workers: run(out, QUICK, seeds=SEEDS[:1], methods=QUICK_METHODS, workers=workers),
    lambda out, workers: run(out, Sizes(), workers=workers),
    write_outputs,
  )


if __name__ == "__main__":
  main()
