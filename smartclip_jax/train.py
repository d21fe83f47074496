"""The train loop and its command line.

  python -m smartclip_jax.train --config configs/demo.py --workdir runs/demo [--config.a.b=v ...]

Writes `config.json`, `metrics.jsonl`, TensorBoard events, Orbax checkpoints under
`checkpoints/` and `eval/step_<N>.json`; rerunning the same command resumes from the latest
checkpoint. SIGTERM or Ctrl-C saves at the next step and exits 0. Multi-process runs join with
`--coordinator_address/--num_processes/--process_id`, or on their own under SLURM and on Cloud
TPU (see `distributed.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from smartclip_jax import (
  checkpoint,
  config as config_lib,
  distributed,
  flops as flops_lib,
  init_from,
  losses,
  malloc,
  memory,
  optim,
  preemption,
  preflight,
  profiling,
  progress,
  resume,
  sharding,
  step as step_lib,
  storage,
  watchdog,
)
from smartclip_jax.data import pipeline, sources
from smartclip_jax.evals import report, run as evals_run
from smartclip_jax.evals.encoder import Encoder, Interrupted
from smartclip_jax.models.clip import build_model
from smartclip_jax.writer import MetricWriter

log = logging.getLogger("smartclip_jax")


@dataclasses.dataclass
class Run:
  """What the loop's helpers share: the run's config, places and writers."""

  config: ml_collections.ConfigDict
  workdir: epath.Path  # local, gcsfuse or gs:// (storage.py)
  mesh: Mesh
  model: nn.Module
  shardings: step_lib.TrainState
  checkpointer: checkpoint.Checkpointer
  writer: MetricWriter
  start: int  # the step this process started (or resumed) from
  meter: flops_lib.Meter  # throughput since the last log
  watchdog: watchdog.Watchdog  # started by the loop
  frozen: frozenset = frozenset()  # towers frozen whole (optim.frozen_towers): forward only
  # each step's per-dimension mask flags since the last log (losses.MASK_DIMS), left on device
  mask_dims: list = dataclasses.field(default_factory=list)
  should_stop: Callable[[], bool] = lambda: False  # asked between evaluation batches


def due(step: int, every: int, last: int) -> bool:
  """Whether `step` is one of every `every` (0: none), or the run's `last`."""
  return (every > 0 and step % every == 0) or step == last


def fetch_metrics(
  run: Run, step: int, metrics: dict, data_stats: pipeline.DataStats, force: bool
) -> dict | None:
  """At every `log_every`-th step (and when `force`), the step's metrics on the host with the
  data counts and the window's mask diagnostics; None between. SmartCLIP's per-dimension mask
  flags are kept on device until then, and reduced to `mask_always_on` / `mask_never_on` over
  the window."""
  if losses.MASK_DIMS[0] in metrics:
    run.mask_dims.append({k: metrics[k] for k in losses.MASK_DIMS})
    metrics = {k: v for k, v in metrics.items() if k not in losses.MASK_DIMS}
  if not (force or due(step, run.config.log_every, run.config.total_steps)):
    return None
  window, run.mask_dims = jax.device_get(run.mask_dims), []
  return {**jax.device_get(metrics), **losses.mask_window(window), **data_stats.metrics()}


def write_metrics(run: Run, step: int, metrics: dict) -> None:
  """A logged step's metrics and throughput to metrics.jsonl, TensorBoard (W&B) and the log."""
  figures, seconds_per_step = run.meter.read(step)
  metrics = {**metrics, **figures}
  run.writer.write(step, metrics)
  log.info(progress.step_line(step, run.config.total_steps, metrics, seconds_per_step))


def abort_if_nonfinite(run: Run, step: int, metrics: dict) -> None:
  """Stops after `max_nonfinite_steps` skipped (non-finite) steps in a row, once every pending
  save is committed: each saved state has finite parameters."""
  if metrics["max_skip_streak"] < run.config.max_nonfinite_steps:
    return
  run.checkpointer.close()
  raise FloatingPointError(
    f"loss or gradients were non-finite for {int(metrics['max_skip_streak'])} steps in a "
    f"row by step {step} (max_nonfinite_steps={run.config.max_nonfinite_steps}); those "
    f"steps were not applied. Checkpoints (all with finite parameters) are in "
    f"{run.workdir / 'checkpoints'}"
  )


def maybe_save(
  run: Run,
  step: int,
  state: step_lib.TrainState,
  data_stats: pipeline.DataStats,
  force: bool,
) -> None:
  """An async checkpoint every `checkpoint_every` steps, at the last step and when `force`;
  at log steps between, a save that failed in the background stops the run."""
  if force or due(step, run.config.checkpoint_every, run.config.total_steps):
    run.checkpointer.save(state, data_stats)
  elif due(step, run.config.log_every, -1):
    run.checkpointer.check()


def evaluate(run: Run, step: int, state: step_lib.TrainState) -> dict:
  """The run's evaluation (`evals.run`) at `step`: written under eval/ and TensorBoard,
  printed, logged, and the best checkpoint kept by `eval.best_metric`."""
  config = run.config
  encoder = Encoder(
    config,
    run.model,
    state.params,
    run.mesh,
    config.data.eval_batch_size,
    param_shardings=run.shardings.params,
    workers=config.data.num_workers,
  )
  encoder.should_stop = run.should_stop
  results = evals_run.run_eval(
    config, encoder, f"{run.workdir}@{step}", run.workdir / "eval" / f"step_{step}"
  )
  if jax.process_index() == 0:
    report.write_step(results, step, run.workdir, run.writer, config.data.name)
  log.info("eval at step %d (I2T/T2I R@1, zero-shot top-1): %s", step, report.summary(results))
  if config.eval.best_metric:
    run.checkpointer.save_best(
      state, config.eval.best_metric, report.metric_value(results, config.eval.best_metric)
    )
  return results


def stopped(run: Run, step: int, reason: str) -> None:
  """A stop notice ended the run: its checkpoint (saved at this step) and metrics committed."""
  run.checkpointer.close()
  run.writer.close()
  where = run.workdir / "checkpoints"
  log.warning(
    f"stopped by {reason} after step {step} of {run.config.total_steps}; checkpoint saved in "
    f"{where}; rerun the same command to resume"
  )


def maybe_evaluate(
  run: Run, step: int, state: step_lib.TrainState, data_stats: pipeline.DataStats
) -> bool:
  """`evaluate` every `eval.every` steps before the last (which always evaluates); False when
  a stop notice ended it, the state then saved at `step` (for the rerun to go on from)."""
  if due(step, run.config.eval.every, -1) and step != run.config.total_steps:
    try:
      with run.watchdog.paused():
        evaluate(run, step, state)
    except Interrupted:
      if step % run.config.checkpoint_every:  # else saved before the evaluation began
        run.checkpointer.save(state, data_stats)
      return False
  return True


def setup(config: ml_collections.ConfigDict, workdir: epath.Path):
  """Everything before the first step: mesh, model, optimizer, data, and the state restored
  from the latest checkpoint or freshly initialised. Checks that can fail do so here."""
  preflight.check(config)  # again for callers that did not come through parse_args
  if config.epochs:
    config.total_steps = pipeline.steps_for_epochs(config)
  storage.check_writable(workdir, f".write_check.{jax.process_index()}")
  storage.check_shared(workdir)
  mesh = sharding.make_mesh(config)
  losses.make(config)  # a loss the model cannot train fails now, not at the first compile
  config_lib.check_batch(config, sharding.data_parallel_size(mesh), jax.process_count())
  platform, processes = jax.devices()[0].platform, jax.process_count()
  log.info(
    f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices ({platform}), {processes}"
    " process(es)"
  )
  if platform == "cpu" and (line := malloc.hint()):
    log.info(line)
  model, tx = build_model(config), optim.make_optimizer(config)
  abstract, shardings = step_lib.abstract_state(model, tx, config, mesh)
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", config.keep_checkpoints, config)
  if saved := checkpointer.latest_config():
    resume.check(saved[1], config, saved[0], str(workdir))
  if jax.process_index() == 0:
    config_lib.write(workdir, config, saved[0] if saved else 0)
  state, data_stats = checkpointer.restore(abstract, sources.train_labels(config))
  if state is None:
    state = init_from.initial_state(config, model, tx, mesh, shardings)
  start = int(jax.device_get(state.step))
  checkpointer.check_space(state, start)
  data_iter = pipeline.train_iterator(config, start_step=start, stats=data_stats)
  resume.check_data(data_stats, start, config)
  size = sum(x.size for x in jax.tree.leaves(state.params)) / 1e6
  frozen = f" ({config.optim.frozen!r} frozen)" if config.optim.frozen else ""
  how = "resumed" if start else "starting"
  log.info(
    f"{config.loss} model, {size:.2f}M parameters{frozen}, {how} at step {start} of "
    f"{config.total_steps}"
  )

  peak = flops_lib.mesh_peak(mesh, config.model.dtype)
  run = Run(
    config,
    workdir,
    mesh,
    model,
    shardings,
    checkpointer,
    MetricWriter(workdir, config=config),
    start,
    flops_lib.Meter(peak, config.batch_size, (time.perf_counter(), start)),
    watchdog.Watchdog(config.step_timeout_s),
    frozen=frozenset(optim.frozen_towers(state.params, config)),
  )
  run.writer.truncate_after(start)  # a resumed run rewrites the steps after its checkpoint
  train_step = step_lib.make_train_step(
    model, tx, config, mesh, shardings, compiling=run.watchdog.paused
  )
  return run, state, train_step, data_iter, data_stats


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, float] | None:
  """Trains to `config.total_steps` (resuming if checkpoints exist), then evaluates; returns
  the evaluation, or None when a stop notice (SIGTERM, Ctrl-C) ended the run early."""
  run, state, train_step, data_iter, data_stats = setup(config, storage.path(workdir))
  start = run.start
  profile = profiling.Profile(
    run.workdir, range(start + 2, min(start + 2 + config.profile_steps, config.total_steps + 1))
  )
  stop = preemption.StopRequest()
  run.should_stop = stop.pending
  if distributed.detect() == "tpu":
    stop.watch_maintenance()
  run.watchdog.start()
  try:
    for step in range(start + 1, config.total_steps + 1):
      profile.maybe_start(step)
      batch = next(data_iter)
      data_stats.update(batch)
      length = pipeline.text_length(batch["tokens"], config)
      state, metrics = train_step(state, pipeline.global_batch(batch, run.mesh, length))
      model_flops = flops_lib.model_flops(config, length, run.frozen)
      run.meter.add(train_step.flops, model_flops * config.batch_size / run.mesh.size)
      profile.maybe_stop(step, state)
      stopping = stop.reached(step)
      if logged := fetch_metrics(run, step, metrics, data_stats, force=stopping):
        data_stats.check(config.data.max_bad_fraction)
        abort_if_nonfinite(run, step, logged)
        write_metrics(run, step, logged)
      if step == start + 1:  # later throughput figures leave compilation out
        jax.block_until_ready(metrics)
        run.meter.restart(step)
      maybe_save(run, step, state, data_stats, force=stopping)
      if stopping:
        return stopped(run, step, stop.reason)
      run.watchdog.beat()
      if not maybe_evaluate(run, step, state, data_stats):
        return stopped(run, step, f"{stop.reason or 'a stop notice'} during evaluation")
    try:
      with run.watchdog.paused():
        return evaluate(run, config.total_steps, state)
    except Interrupted:  # the last step is saved: the rerun evaluates it
      return stopped(
        run, config.total_steps, f"{stop.reason or 'a stop notice'} in the final evaluation"
      )
  finally:
    run.watchdog.close()
    stop.close()
    profile.close()
    data_iter.close()  # its worker processes, which ignore stop signals, end here
    run.checkpointer.close()  # pending saves commit whatever ended the run
    run.writer.close()


def arg_parser() -> argparse.ArgumentParser:
  """`--config FILE --workdir DIR` and the multi-process flags (`parse_args` adds the
  `--config.a.b=value` overrides)."""
  parser = config_lib.arg_parser("python -m smartclip_jax.train", __doc__)
  parser.add_argument(
    "--workdir",
    required=True,
    help="run directory, local or gs://BUCKET/PATH (resumed if it exists)",
  )
  group = parser.add_argument_group(
    "multi-process (all three, or none: SLURM and Cloud TPU are detected)"
  )
  group.add_argument("--coordinator_address", help="HOST:PORT of process 0")
  group.add_argument("--num_processes", type=int)
  group.add_argument("--process_id", type=int)
  return parser


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
  """The command line and the config it names, checked as a run needs (`preflight.check`)."""
  return config_lib.parse_args(arg_parser(), argv, check=preflight.check)


def main(argv: Sequence[str] | None = None) -> None:
  if argv is None:  # the command itself (callers with argv keep their process)
    malloc.use(malloc.chosen())  # tcmalloc where installed: a CPU step's speed (malloc.py)
  config, args = parse_args(sys.argv[1:] if argv is None else argv)
  watchdog.enable_stack_dumps()
  how = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  progress.log_to_stderr(logging.INFO if jax.process_index() == 0 else logging.WARNING)
  if how != "single":
    log.info("process %d of %d (%s)", jax.process_index(), jax.process_count(), how)
  start = time.perf_counter()
  try:
    results = train_and_evaluate(config, args.workdir)
  except (storage.StorageError, config_lib.ConfigError, memory.DoesNotFit) as e:
    # before the first step: say what, not where in our code
    raise SystemExit(f"smartclip_jax.train: {e}") from e
  if results is not None:
    log.info("done in %.0f s; outputs in %s", time.perf_counter() - start, args.workdir)


if __name__ == "__main__":
  main()
