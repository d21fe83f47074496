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
import tempfile
import time
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
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


def global_batch(
  local: dict[str, np.ndarray], mesh: Mesh, text_length: int | None = None
) -> dict[str, jax.Array]:
  """Assembles each process's slice into arrays sharded over the mesh's batch axes (the
  host-side bookkeeping fields stay behind), tokens cut to `text_length` positions if given."""
  target = sharding.batch_sharding(mesh)
  if text_length is not None:
    local = {**local, "tokens": local["tokens"][:, :text_length]}
  return {
    k: jax.make_array_from_process_local_data(target, v)
    for k, v in local.items()
    if k not in pipeline.HOST_FIELDS
  }


def text_length(tokens: np.ndarray, config: ml_collections.ConfigDict) -> int:
  """The token positions a step needs (`model.text.trim_padding`). The text tower is causal and
  pools the end token, so positions after every caption's end cannot change the embeddings, a
  CLIP or SigLIP loss or its gradients: the batch's longest caption (over all processes), rounded
  up to a multiple of `trim_padding` so that a run compiles a few shapes, not one per length."""
  multiple, context = config.model.text.trim_padding, config.model.text.context_length
  if not multiple:
    return context
  longest = int(np.argmax(tokens, axis=1).max()) + 1  # the end token has the highest id
  longest = int(distributed.gather(np.int32(longest)).max())
  return min(context, -(-longest // multiple) * multiple)


def initial_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  shardings: step_lib.TrainState,
) -> step_lib.TrainState:
  """A fresh state, with parameters from `config.init_from` when it names a model."""
  state = step_lib.init_state(model, tx, config, mesh, shardings)
  if config.init_from in ("", config_lib.INIT_SCRATCH):
    return state
  try:  # AdamW's initial moments do not depend on the parameters' values.
    params = init_from.fill(config.init_from, state.params, config.model.activation)
  except (ValueError, KeyError, checkpoint.CheckpointError) as e:  # weights that do not fit
    raise config_lib.ConfigError(f"init_from={config.init_from}: {e}") from e
  return state.replace(params=params)


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
  clock: tuple[float, int]  # (time, step) of the last throughput figure
  peak_flops: float  # one device's peak FLOP/s (flops.py), for MFU
  watchdog: watchdog.Watchdog  # started by the loop
  flops: float = 0.0  # hardware FLOPs per device run since the clock (XLA's count)
  model_flops: float = 0.0  # model FLOPs per device since the clock (flops.model_flops)
  frozen: frozenset = frozenset()  # towers frozen whole (optim.frozen_towers): forward only
  # each step's per-dimension mask flags since the last log (losses.MASK_DIMS), left on device
  mask_dims: list = dataclasses.field(default_factory=list)
  should_stop: Callable[[], bool] = lambda: False  # asked between evaluation batches


class Profile:
  """A trace of `profile_steps` steps after the first (compiling) one, beside the TensorBoard
  scalars: `tensorboard --logdir WORKDIR/tensorboard`, Profile tab. The profiler writes local
  files only, so under a gs:// workdir it traces into a temporary directory, copied up after."""

  def __init__(self, workdir: epath.Path, steps: range):
    self.workdir, self.steps, self.tracing = workdir, steps, False
    self.trace_dir = None

  def maybe_start(self, step: int) -> None:
    if len(self.steps) and step == self.steps.start:
      board = self.workdir / "tensorboard"
      self.trace_dir = epath.Path(tempfile.mkdtemp()) if storage.is_remote(board) else board
      jax.profiler.start_trace(os.fspath(self.trace_dir))
      self.tracing = True

  def maybe_stop(self, step: int, state: step_lib.TrainState) -> None:
    if self.tracing and step == self.steps[-1]:
      jax.block_until_ready(state)
      self.close()
      log.info(
        "profile of steps %d-%d written under %s (tensorboard --logdir %s, Profile tab)",
        self.steps.start,
        step,
        self.workdir / "tensorboard/plugins/profile",
        self.workdir / "tensorboard",
      )

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
      if self.trace_dir != self.workdir / "tensorboard":
        storage.move_tree(self.trace_dir, self.workdir / "tensorboard", rename=False)


def maybe_log(
  run: Run, step: int, metrics: dict, data_stats: pipeline.DataStats, force: bool
) -> None:
  """Every `log_every` steps (and when `force`): metrics to metrics.jsonl, TensorBoard and the
  log; stops the run when too many records were unusable or steps non-finite in a row.
  SmartCLIP's per-dimension mask flags are kept (not fetched) until the log step, which
  reduces them to `mask_always_on` / `mask_never_on` over the window."""
  config = run.config
  if losses.MASK_DIMS[0] in metrics:
    run.mask_dims.append({k: metrics[k] for k in losses.MASK_DIMS})
    metrics = {k: v for k, v in metrics.items() if k not in losses.MASK_DIMS}
  if step % config.log_every == 0 or step == config.total_steps or force:
    write_metrics(run, step, metrics, data_stats)
  if step == run.start + 1:  # later throughput figures leave compilation out
    jax.block_until_ready(metrics)
    run.clock, run.flops, run.model_flops = (time.perf_counter(), step), 0.0, 0.0


def write_metrics(run: Run, step: int, metrics: dict, data_stats: pipeline.DataStats) -> None:
  config = run.config
  window, run.mask_dims = jax.device_get(run.mask_dims), []
  metrics = {  # the host waits only here
    **jax.device_get(metrics),
    **losses.mask_window(window),
    **data_stats.metrics(),
  }
  data_stats.check(config.data.max_bad_fraction)
  maybe_abort_nonfinite(run, step, metrics)
  now, (last_time, last_step) = time.perf_counter(), run.clock
  seconds = now - last_time
  metrics["images_per_sec"] = config.batch_size * (step - last_step) / seconds
  metrics["tflops_per_device"] = run.flops / seconds / 1e12
  metrics["mfu"] = run.flops / seconds / run.peak_flops
  metrics["model_mfu"] = run.model_flops / seconds / run.peak_flops
  run.clock, run.flops, run.model_flops = (now, step), 0.0, 0.0
  run.writer.write(step, metrics)
  density = ""
  if "mask_density" in metrics:
    density = f"  mask {metrics['mask_density']:.3f} J {metrics['mask_jaccard']:.2f}"
  left = (config.total_steps - step) * seconds / max(step - last_step, 1)
  log.info(
    "step %d/%d  loss %.4f  lr %.2e%s  %.0f img/s  %.3g TFLOP/s/device  MFU %.1f%% model, "
    "%.1f%% hardware  ETA %s",
    step,
    config.total_steps,
    metrics["loss"],
    metrics["lr"],
    density,
    metrics["images_per_sec"],
    metrics["tflops_per_device"],
    100 * metrics["model_mfu"],
    100 * metrics["mfu"],
    progress.duration(left),
  )


def maybe_abort_nonfinite(run: Run, step: int, metrics: dict) -> None:
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
  if step % run.config.checkpoint_every == 0 or step == run.config.total_steps or force:
    run.checkpointer.save(state, data_stats)
  elif step % run.config.log_every == 0:
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
    skipped = f" ({results['skipped']} unusable skipped)" if results["skipped"] else ""
    report.write_step(
      results,
      step,
      run.workdir,
      run.writer,
      f"held-out {config.data.name}: {results['num_images']} images x 1 full "
      f"caption{skipped}, step {step}, masks off",
    )
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
  log.warning(
    "stopped by %s after step %d of %d; checkpoint saved in %s; rerun the same command to resume",
    reason,
    step,
    run.config.total_steps,
    run.workdir / "checkpoints",
  )


def maybe_evaluate(
  run: Run, step: int, state: step_lib.TrainState, data_stats: pipeline.DataStats
) -> bool:
  """`evaluate` every `eval.every` steps before the last (which always evaluates); False when
  a stop notice ended it, the state then saved at `step` (for the rerun to go on from)."""
  every = run.config.eval.every
  if every and step % every == 0 and step != run.config.total_steps:
    try:
      with run.watchdog.paused():
        evaluate(run, step, state)
    except Interrupted:
      if step % run.config.checkpoint_every:  # else saved before the evaluation began
        run.checkpointer.save(state, data_stats)
      return False
  return True


def write_config(workdir: epath.Path, config: ml_collections.ConfigDict, step: int) -> None:
  """`config.json` is the config of the latest start; one it replaces that differs is kept as
  `config.before_step_<step>.json`."""
  path, text = workdir / "config.json", config.to_json_best_effort(indent=2)
  if path.exists() and (old := path.read_text()) != text:
    (workdir / f"config.before_step_{step}.json").write_text(old)
  path.write_text(text)


def setup(config: ml_collections.ConfigDict, workdir: epath.Path):
  """Everything before the first step: mesh, model, optimizer, data, and the state restored
  from the latest checkpoint or freshly initialised. Checks that can fail do so here."""
  preflight.check(config)  # again for callers that did not come through parse_args
  if config.epochs:
    config.total_steps = pipeline.steps_for_epochs(config)
    log.info("epochs=%g of the training data: total_steps=%d", config.epochs, config.total_steps)
  storage.check_writable(workdir, f".write_check.{jax.process_index()}")
  storage.check_shared(workdir)
  mesh = sharding.make_mesh(config)
  losses.make(config)  # a loss the model cannot train fails now, not at the first compile
  config_lib.check_batch(config, sharding.data_parallel_size(mesh), jax.process_count())
  log.info(
    "mesh %s over %d devices (%s), %d process(es)",
    dict(mesh.shape),
    mesh.devices.size,
    jax.devices()[0].platform,
    jax.process_count(),
  )
  if jax.devices()[0].platform == "cpu" and (line := malloc.hint()):
    log.info(line)
  model, tx = build_model(config), optim.make_optimizer(config)
  abstract, shardings = step_lib.abstract_state(model, tx, config, mesh)
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", config.keep_checkpoints, config)
  if saved := checkpointer.latest_config():
    resume.check(saved[1], config, saved[0], str(workdir))
  if jax.process_index() == 0:
    write_config(workdir, config, saved[0] if saved else 0)
  state, data_stats = checkpointer.restore(abstract, sources.train_labels(config))
  if state is None:
    state = initial_state(config, model, tx, mesh, shardings)
  start = int(jax.device_get(state.step))
  checkpointer.check_space(state, start)
  data_iter = pipeline.train_iterator(config, start_step=start, stats=data_stats)
  resume.check_data(data_stats, start, config)
  log.info(
    "%s model, %.2fM parameters%s, %s at step %d of %d",
    config.loss,
    sum(x.size for x in jax.tree.leaves(state.params)) / 1e6,
    f" ({config.optim.frozen!r} frozen)" if config.optim.frozen else "",
    "resumed" if start else "starting",
    start,
    config.total_steps,
  )
  run = Run(
    config,
    workdir,
    mesh,
    model,
    shardings,
    checkpointer,
    MetricWriter(workdir, config=config),
    start,
    (time.perf_counter(), start),
    flops_lib.mesh_peak(mesh, config.model.dtype),
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
  profile = Profile(
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
      length = text_length(batch["tokens"], config)
      state, metrics = train_step(state, global_batch(batch, run.mesh, length))
      run.flops += train_step.flops
      run.model_flops += (
        flops_lib.model_flops(config, length, run.frozen) * config.batch_size / run.mesh.size
      )
      profile.maybe_stop(step, state)
      stopping = stop.reached(step)
      maybe_log(run, step, metrics, data_stats, force=stopping)
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
