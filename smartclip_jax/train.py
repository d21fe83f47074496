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
import json
import logging
import pathlib
import sys
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from smartclip_jax import checkpoint, distributed, evaluate, optim, preemption, sharding
from smartclip_jax import config as config_lib
from smartclip_jax import step as step_lib
from smartclip_jax.data import pipeline
from smartclip_jax.interop import loading
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
  if jax.process_count() > 1:
    longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
  return min(context, -(-longest // multiple) * multiple)


def run_eval(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  state: step_lib.TrainState,
  mesh: Mesh,
  step: int,
  workdir: pathlib.Path,
  writer: MetricWriter,
  checkpointer: checkpoint.Checkpointer,
) -> dict:
  """Held-out retrieval and the `eval.tasks`: eval/step_<N>.json, TensorBoard `eval/*`,
  printed tables, and the best checkpoint by `eval.best_metric`."""
  results = evaluate.evaluate_heldout(config, model, state.params, mesh)
  if config.eval.tasks:
    results["tasks"] = evaluate.evaluate_loaded(
      loading.Loaded(config, state.params, model),
      f"{workdir}@{step}",
      evaluate.parse_tasks(config.eval.tasks),
      workdir / "eval" / f"step_{step}",
      mesh,
      batch_size=config.data.eval_batch_size,
    )
  if jax.process_index() == 0:
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / f"step_{step}.json").write_text(
      json.dumps({"step": step, **results}, indent=2)
    )
    writer.write(step, {k: v for k, v in results.items() if k != "tasks"}, prefix="eval/")
    for task, metrics in results.get("tasks", {}).items():
      writer.write(
        step, {k: v for k, v in metrics.items() if not isinstance(v, dict)}, prefix=f"eval/{task}/"
      )
    skipped = f" ({results['skipped']} unusable skipped)" if results["skipped"] else ""
    title = (
      f"held-out {config.data.name}: {results['num_images']} images x 1 full caption"
      f"{skipped}, step {step}, masks off"
    )
    print(evaluate.format_table(results, title), flush=True)
    if "tasks" in results:
      print(evaluate.results_table({f"step {step}": results["tasks"]}), flush=True)
  summary = [f"held-out {results['i2t_r1']:.1f}/{results['t2i_r1']:.1f}"] + [
    f"{t} " + (f"{m['i2t_r1']:.1f}/{m['t2i_r1']:.1f}" if "i2t_r1" in m else f"{m['top1']:.1f}")
    for t, m in results.get("tasks", {}).items()
  ]
  log.info("eval at step %d (I2T/T2I R@1, zero-shot top-1): %s", step, "; ".join(summary))
  if config.eval.best_metric:
    checkpointer.save_best(
      state, config.eval.best_metric, metric_value(results, config.eval.best_metric)
    )
  return results


def metric_value(results: dict, name: str) -> float:
  """`i2t_r1` of the held-out split, or `<task>/<metric>` of an `eval.tasks` task."""
  task, _, metric = name.rpartition("/")
  values = results.get("tasks", {}).get(task, {}) if task else results
  if metric not in values:
    raise KeyError(f"eval.best_metric={name!r} is not among this evaluation's metrics")
  return float(values[metric])


def initial_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  shardings: step_lib.TrainState,
) -> step_lib.TrainState:
  """A fresh state, with parameters from `config.init_from` when it names a checkpoint."""
  state = step_lib.init_state(model, tx, config, mesh, shardings)
  if not config.init_from:
    return state
  if loading.is_torch_path(config.init_from):
    params, fresh, unused = loading.params_from_torch(config.init_from, state.params)
  else:
    params, fresh, unused = checkpoint.load_params(config.init_from, state.params)
  log.info(
    "parameters from %s; kept at initialisation: %s; not used from there: %s",
    config.init_from,
    checkpoint.describe(fresh),
    checkpoint.describe(unused),
  )
  return state.replace(params=params)  # AdamW's initial moments do not depend on the values


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> dict[str, float] | None:
  """Trains to `config.total_steps` (resuming if checkpoints exist), then evaluates; returns
  the evaluation, or None when a stop notice (SIGTERM, Ctrl-C) ended the run early."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config)
  evaluate.parse_tasks(config.eval.tasks)  # a mistyped task fails now, not at the first eval
  config_lib.check_batch(config, sharding.data_parallel_size(mesh), jax.process_count())
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  log.info(
    "mesh %s over %d devices (%s), %d process(es)",
    dict(mesh.shape),
    mesh.devices.size,
    jax.devices()[0].platform,
    jax.process_count(),
  )

  model, tx = build_model(config), optim.make_optimizer(config)
  shardings = step_lib.state_shardings(model, tx, config, mesh)
  data_iter = pipeline.train_iterator(config)
  checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", config.keep_checkpoints, config)
  state, data_stats = checkpointer.restore(
    shardings, step_lib.abstract_state(model, tx, config), data_iter
  )
  if state is None:
    state = initial_state(config, model, tx, mesh, shardings)
  start = int(jax.device_get(state.step))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info(
    "%s model, %.2fM parameters, %s at step %d of %d",
    config.loss,
    n_params / 1e6,
    "resumed" if start else "starting",
    start,
    config.total_steps,
  )

  writer = MetricWriter(workdir)
  writer.truncate_after(start)
  train_step = step_lib.make_train_step(model, tx, config, mesh, shardings)
  last_time, last_step = time.perf_counter(), start
  stop = preemption.StopRequest()
  if distributed.detect() == "tpu":
    stop.watch_maintenance()
  # A trace of `profile_steps` steps after the first (compiling) one, beside the TensorBoard
  # scalars: `tensorboard --logdir WORKDIR/tensorboard`, Profile tab.
  profile = range(start + 2, min(start + 2 + config.profile_steps, config.total_steps + 1))
  tracing = False
  try:
    for step in range(start + 1, config.total_steps + 1):
      if step == profile.start and len(profile):
        jax.profiler.start_trace(str(workdir / "tensorboard"))
        tracing = True
      batch = next(data_iter)
      data_stats.update(batch)
      state, metrics = train_step(
        state, global_batch(batch, mesh, text_length(batch["tokens"], config))
      )
      if tracing and step == profile[-1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
        log.info(
          "profile of steps %d-%d written under %s (tensorboard --logdir %s, Profile tab)",
          profile.start,
          step,
          workdir / "tensorboard/plugins/profile",
          workdir / "tensorboard",
        )
      stopping = stop.reached(step)
      if step % config.log_every == 0 or step == config.total_steps or stopping:
        metrics = {**jax.device_get(metrics), **data_stats.metrics()}  # host waits only here
        data_stats.check(config.data.max_bad_fraction)
        if metrics["max_skip_streak"] >= config.max_nonfinite_steps:
          checkpointer.close()  # finishes pending saves; every saved state has finite params
          raise FloatingPointError(
            f"loss or gradients were non-finite for {int(metrics['max_skip_streak'])} steps "
            f"in a row by step {step} (max_nonfinite_steps={config.max_nonfinite_steps}); "
            f"those steps were not applied. Checkpoints (all with finite parameters) are in "
            f"{workdir / 'checkpoints'}"
          )
        now = time.perf_counter()
        metrics["images_per_sec"] = config.batch_size * (step - last_step) / (now - last_time)
        last_time, last_step = now, step
        writer.write(step, metrics)
        density = f"  mask {metrics['mask_density']:.3f}" if "mask_density" in metrics else ""
        log.info(
          "step %d/%d  loss %.4f  lr %.2e%s  %.0f img/s",
          step,
          config.total_steps,
          metrics["loss"],
          metrics["lr"],
          density,
          metrics["images_per_sec"],
        )
      if step == start + 1:  # later throughput figures leave compilation out
        jax.block_until_ready(metrics)
        last_time, last_step = time.perf_counter(), step
      if step % config.checkpoint_every == 0 or step == config.total_steps or stopping:
        checkpointer.save(state, data_iter, data_stats)
      if stopping:
        checkpointer.close()
        writer.close()
        log.warning(
          "stopped by %s after step %d of %d; checkpoint saved in %s; rerun the same "
          "command to resume",
          stop.reason,
          step,
          config.total_steps,
          workdir / "checkpoints",
        )
        return None
      if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
        run_eval(config, model, state, mesh, step, workdir, writer, checkpointer)
  finally:
    stop.close()
    if tracing:
      jax.profiler.stop_trace()
  results = run_eval(config, model, state, mesh, config.total_steps, workdir, writer, checkpointer)
  checkpointer.close()
  writer.close()
  return results


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
  """`--config FILE --workdir DIR`, the multi-process flags, and any number of
  `--config.a.b=value` overrides."""
  parser = argparse.ArgumentParser(
    prog="python -m smartclip_jax.train",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )
  parser.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
  parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  group = parser.add_argument_group(
    "multi-process (all three, or none: SLURM and Cloud TPU are detected)"
  )
  group.add_argument("--coordinator_address", help="HOST:PORT of process 0")
  group.add_argument("--num_processes", type=int)
  group.add_argument("--process_id", type=int)
  args, rest = parser.parse_known_args(argv)
  if "://" in args.workdir:
    parser.error(
      f"--workdir {args.workdir}: give a file system path that every process sees "
      "(on Cloud TPU, mount the bucket with gcsfuse)"
    )
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognised argument {item!r} (overrides look like --config.a.b=value)")
    overrides.append(item[len("--config.") :])
  try:
    return config_lib.load(args.config, overrides), args
  except config_lib.ConfigError as e:
    parser.error(str(e))


def main(argv: Sequence[str] | None = None) -> None:
  config, args = parse_args(sys.argv[1:] if argv is None else argv)
  how = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  logging.basicConfig(
    level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
    format="%(asctime)s %(message)s",
    datefmt="%H:%M:%S",
    force=True,
  )
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
  if how != "single":
    log.info("process %d of %d (%s)", jax.process_index(), jax.process_count(), how)
  start = time.perf_counter()
  if train_and_evaluate(config, args.workdir) is not None:
    log.info("done in %.0f s; outputs in %s", time.perf_counter() - start, args.workdir)


if __name__ == "__main__":
  main()
