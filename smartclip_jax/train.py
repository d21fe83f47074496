"""The train loop and its command line.

  python -m smartclip_jax.train --config configs/demo.py --workdir runs/demo [--config.a.b=v ...]

Writes `config.json`, `metrics.jsonl`, TensorBoard events, Orbax checkpoints under
`checkpoints/` and `eval/step_<N>.json`; rerunning the same command resumes from the latest
checkpoint.
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
from jax.sharding import Mesh

from smartclip_jax import config as config_lib
from smartclip_jax import evaluate, optim, sharding, step as step_lib
from smartclip_jax.checkpoint import Checkpointer
from smartclip_jax.data import pipeline
from smartclip_jax.models.clip import build_model
from smartclip_jax.writer import MetricWriter

log = logging.getLogger("smartclip_jax")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice into arrays sharded over the mesh's batch axes
  (the host-side bookkeeping fields stay behind)."""
  target = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(target, v) for k, v in local.items()
          if k not in pipeline.HOST_FIELDS}


def run_eval(config: ml_collections.ConfigDict, model: nn.Module, params, mesh: Mesh, step: int,
             workdir: pathlib.Path, writer: MetricWriter) -> dict[str, float]:
  """Held-out retrieval: eval/step_<N>.json, TensorBoard `eval/*`, a printed table."""
  results = evaluate.evaluate_heldout(config, model, params, mesh)
  if jax.process_index() == 0:
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / f"step_{step}.json").write_text(json.dumps({"step": step, **results},
                                                                   indent=2))
    writer.write(step, results, prefix="eval/")
    skipped = f" ({results['skipped']} unusable skipped)" if results["skipped"] else ""
    title = (f"held-out {config.data.name}: {results['num_images']} images x 1 full caption"
             f"{skipped}, step {step}, masks off")
    print(evaluate.format_table(results, title), flush=True)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | pathlib.Path) -> dict[str, float]:
  """Trains to `config.total_steps` (resuming if checkpoints exist), then evaluates."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config)
  config_lib.check_batch(config, sharding.data_parallel_size(mesh), jax.process_count())
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  log.info("mesh %s over %d devices (%s), %d process(es)", dict(mesh.shape),
           mesh.devices.size, jax.devices()[0].platform, jax.process_count())

  model, tx = build_model(config), optim.make_optimizer(config)
  shardings = step_lib.state_shardings(model, tx, config, mesh)
  data_iter = pipeline.train_iterator(config)
  checkpointer = Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
  state, data_stats = checkpointer.restore(shardings, step_lib.abstract_state(model, tx, config),
                                           data_iter)
  if state is None:
    state = step_lib.init_state(model, tx, config, mesh, shardings)
  start = int(jax.device_get(state.step))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("%s model, %.2fM parameters, %s at step %d of %d", config.loss, n_params / 1e6,
           "resumed" if start else "starting", start, config.total_steps)

  writer = MetricWriter(workdir)
  writer.truncate_after(start)
  train_step = step_lib.make_train_step(model, tx, config, mesh, shardings)
  last_time, last_step = time.perf_counter(), start
  for step in range(start + 1, config.total_steps + 1):
    batch = next(data_iter)
    data_stats.update(batch)
    state, metrics = train_step(state, global_batch(batch, mesh))
    if step % config.log_every == 0 or step == config.total_steps:
      metrics = {**jax.device_get(metrics), **data_stats.metrics()}  # host waits only here
      data_stats.check(config.data.max_bad_fraction)
      if metrics["max_skip_streak"] >= config.max_nonfinite_steps:
        checkpointer.close()  # finishes pending saves; every saved state has finite params
        raise FloatingPointError(
            f"loss or gradients were non-finite for {int(metrics['max_skip_streak'])} steps in "
            f"a row by step {step} (max_nonfinite_steps={config.max_nonfinite_steps}); those "
            f"steps were not applied. Checkpoints (all with finite parameters) are in "
            f"{workdir / 'checkpoints'}")
      now = time.perf_counter()
      metrics["images_per_sec"] = config.batch_size * (step - last_step) / (now - last_time)
      last_time, last_step = now, step
      writer.write(step, metrics)
      density = f"  mask {metrics['mask_density']:.3f}" if "mask_density" in metrics else ""
      log.info("step %d/%d  loss %.4f  lr %.2e%s  %.0f img/s", step, config.total_steps,
               metrics["loss"], metrics["lr"], density, metrics["images_per_sec"])
    if step == start + 1:  # later throughput figures leave compilation out
      jax.block_until_ready(metrics)
      last_time, last_step = time.perf_counter(), step
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      checkpointer.save(state, data_iter, data_stats)
    if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
      run_eval(config, model, state.params, mesh, step, workdir, writer)
  results = run_eval(config, model, state.params, mesh, config.total_steps, workdir, writer)
  checkpointer.close()
  writer.close()
  return results


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
  """`--config FILE --workdir DIR` plus any number of `--config.a.b=value` overrides."""
  parser = argparse.ArgumentParser(prog="python -m smartclip_jax.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False)
  parser.add_argument("--config", required=True, help="a configs/*.py file with get_config()")
  parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognised argument {item!r} (overrides look like --config.a.b=value)")
    overrides.append(item[len("--config."):])
  try:
    return config_lib.load(args.config, overrides), args.workdir
  except config_lib.ConfigError as e:
    parser.error(str(e))


def main(argv: Sequence[str] | None = None) -> None:
  config, workdir = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                      format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
  start = time.perf_counter()
  train_and_evaluate(config, workdir)
  log.info("done in %.0f s; outputs in %s", time.perf_counter() - start, workdir)


if __name__ == "__main__":
  main()
