"""What the experiments share: their sizes, the caption schedule, a trainer that compiles each
method once, worker processes pinned to cores, and the command line."""

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
import types
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import jax
import ml_collections
import numpy as np

from smartclip_jax import config as config_lib, optim, sharding, step as step_lib
from smartclip_jax.data.decode import normalize_image
from smartclip_jax.evals.encoder import Encoder
from smartclip_jax.experiments import scenes
from smartclip_jax.models.clip import build_model

log = logging.getLogger("smartclip_jax")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Set sizes (scenes), steps, batch and tower sizes of an experiment's runs."""

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
  partial_per_image: int = 0  # partial-caption queries per test image (paper_regime)


def towers(sizes: Sizes) -> ml_collections.ConfigDict:
  """The model every experiment's runs share: a ViT on 48 px scenes and a text transformer with
  a 64-token context, D = 64 dimensions for the masks to choose from; no position is frozen
  (nothing was stretched: every position trains)."""
  c = config_lib.base_config()
  c.batch_size = sizes.batch
  c.model.embed_dim = 64
  c.model.vision.update(
    image_size=48, patch_size=sizes.patch, width=sizes.width, layers=sizes.layers, heads=sizes.heads
  )
  c.model.text.update(context_length=64, width=sizes.width, layers=sizes.layers, heads=sizes.heads)
  c.model.mask.heads = sizes.heads
  c.optim.frozen_positions = 0
  return c


def schedule(
  split: scenes.Split, steps: int, batch: int, mode: str, seed: int, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Image indices [steps, batch] (epochs of fresh permutations) and caption tokens
  [steps, batch, L] with each caption's sentences sampled by `mode`: one data order per seed,
  the same for every method."""
  rng = np.random.default_rng([seed, 7, ("full", "prefix", "subset").index(mode)])
  index = data_order(rng, len(split.scenes), steps, batch)
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


def data_order(rng: np.random.Generator, n: int, steps: int, batch: int) -> np.ndarray:
  """Image indices [steps, batch] of `n` images: epochs of fresh permutations drawn from `rng`."""
  order = np.concatenate([rng.permutation(n) for _ in range(-(-steps * batch // n))])
  return order[: steps * batch].reshape(steps, batch)


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
      shardings = step_lib.abstract_state(model, tx, c, mesh)[1]
      self._parts[key] = Parts(
        mesh,
        shardings,
        step_lib.state_initializer(model, tx, c, mesh, shardings),
        step_lib.make_train_step(model, tx, c, mesh, shardings),
        c,
        model,
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
  step, and one `Encoder` compiled for the method's model (`encoder(params)`)."""

  mesh: Any
  shardings: Any
  init: Callable[[int], Any]
  step: Callable
  config: ml_collections.ConfigDict
  model: Any
  _encoder: Encoder | None = None

  def encoder(self, params: Any) -> Encoder:
    if self._encoder is None:
      self._encoder = Encoder(self.config, self.model, params, self.mesh)
    return self._encoder.with_params(params)

  def batched(self, method: str, params: Any) -> Callable[[np.ndarray], np.ndarray]:
    """inputs [N, ...] -> numpy outputs [N, ...] of a model method (`Encoder.apply`)."""
    encoder = self.encoder(params)
    return lambda x: encoder.apply(method, x)

  def encoders(self, params: Any) -> tuple[Callable, Callable]:
    """(uint8 images -> embeddings, tokens -> embeddings)."""
    encoder = self.encoder(params)
    return (
      lambda x: encoder.apply("encode_image", normalize_image(x)),
      lambda t: encoder.apply("encode_text", t),
    )


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
  threads to pay: one process per core runs them faster than one process on all."""
  _exit_with_parent()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {cores.get()})  # before jax's CPU client exists


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


def tracked(
  pool: futures.Executor,
  total: int,
  start: float,
  records: list[dict],
  brief: Callable[[dict], str],
) -> Callable[..., futures.Future]:
  """`pool.submit` for tasks that return (record, extra): as each task ends, its record is
  appended to `records` and logged as "[done/total] <setting> <method> seed <seed> (its seconds,
  seconds since `start`): <brief(record)>"."""

  def done(future: futures.Future) -> None:
    record, _ = future.result()
    records.append(record)
    log.info(
      "[%d/%d] %s %s seed %d (%.0f s, %.0f s in): %s",
      len(records),
      total,
      record["setting"],
      record["method"],
      record["seed"],
      record["seconds"],
      time.perf_counter() - start,
      brief(record),
    )

  def submit(task: Callable, *args: Any) -> futures.Future:
    future = pool.submit(task, *args)
    future.add_done_callback(done)
    return future

  return submit


def finish(
  out: pathlib.Path, results: dict, start: float, write_outputs: Callable[[pathlib.Path, dict], Any]
) -> dict:
  """An experiment's `results` with its wall time, written to `out/results.json` and drawn by
  `write_outputs`."""
  results["wall_seconds"] = time.perf_counter() - start
  (out / "results.json").write_text(json.dumps(results, indent=1))
  write_outputs(out, results)
  log.info("done in %.0f s; %s", results["wall_seconds"], out)
  return results


def experiment_main(argv: Sequence[str] | None, experiment: types.ModuleType) -> None:
  """The command line an experiment module shares: --out, --workers, --quick, --replot; prints
  the table it wrote. The module has `run(out, workers=, **arguments)` with `QUICK_RUN` and
  `FULL_RUN` arguments, `QUICK_HELP` and `write_outputs(out, results)`."""
  parser = argparse.ArgumentParser(
    prog=f"python -m {experiment.__spec__.name}",
    description=experiment.__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument(
    "--workers",
    type=int,
    default=min(os.cpu_count() or 1, 8),
    help="processes running runs side by side, one core each (default: "
    "this machine's cores, at most 8)",
  )
  parser.add_argument("--quick", action="store_true", help=experiment.QUICK_HELP)
  parser.add_argument(
    "--replot",
    action="store_true",
    help="no runs: redraw table.md and the figures from --out's results.json",
  )
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
  if args.replot:
    experiment.write_outputs(args.out, json.loads((args.out / "results.json").read_text()))
  else:
    arguments = experiment.QUICK_RUN if args.quick else experiment.FULL_RUN
    experiment.run(args.out, workers=args.workers, **arguments)
  print((args.out / "table.md").read_text())
