"""The evaluation suite's command line (the library is `smartclip_jax/evals/`).

  python -m smartclip_jax.evaluate --model runs/demo --tasks urban1k:/data/Urban1k,cifar10 \
      --out results/demo

Prints a table (rows models, columns tasks: I2T/T2I R@1, zero-shot top-1), writes
`results.json` ({task: {"i2t_r1", ..., "t2i_r10", "mean_recall"} or {"top1", "top5"}}, percent),
the rank of every query under `ranks/` and `recall_at_k.png`. Embeddings are cached under
`cache/` while the checkpoint and the set stay the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from etils import epath

from smartclip_jax import checkpoint, malloc, progress, storage
from smartclip_jax.evals import datasets, report, tasks as tasks_lib
from smartclip_jax.interop import torch_files
from smartclip_jax.load import load

log = logging.getLogger("smartclip_jax")


def model_key(path: str | os.PathLike) -> str:
  """What identifies a model's weights: the resolved checkpoint step, or file size + mtime."""
  path = torch_files.resolve(path)
  if torch_files.is_torch_path(path):
    files = [path] if path.is_file() else sorted(path.iterdir())
    return f"{path}|" + ",".join(f"{f.name}:{f.stat().length}:{f.stat().mtime}" for f in files)
  return str(checkpoint.resolve_step_dir(path))


def evaluate_model(
  path: str,
  tasks: Sequence[tasks_lib.Task],
  out: epath.Path,
  batch_size: int = 256,
  chunk: int = 1024,
  masks: bool = False,
  workers: int = 0,
  **overrides,
) -> dict[str, dict]:
  """Every task on the model at `path` (`tasks.run_tasks`), embeddings cached under
  `out/cache/`; `workers` Grain processes decode the images (0: threads)."""
  model = load(path, **overrides)
  return tasks_lib.run_tasks(
    model.encoder(batch_size, workers),
    model_key(path),
    tasks,
    out,
    chunk,
    cache_dir=out / "cache",
    masks=masks,
  )


def arg_parser() -> argparse.ArgumentParser:
  """The command line, apart so that tools (and the README's test) can check arguments."""
  parser = argparse.ArgumentParser(
    prog="python -m smartclip_jax.evaluate",
    description=(
      "Retrieval (I2T/T2I R@1/5/10) and zero-shot top-1/5 of one or more models, masks off."
    ),
    allow_abbrev=False,
  )
  parser.add_argument(
    "--model",
    action="append",
    required=True,
    help="anything smartclip_jax.load reads; repeat for several models",
  )
  parser.add_argument(
    "--tasks",
    required=True,
    help=(
      f"comma-separated: retrieval {'/'.join(datasets.RETRIEVAL_TASKS)} as name:<path>"
      f"[:<image_root>]; zero-shot cifar10, cifar100, imagenet2012[:<tfds data_dir>], "
      "folder:<dir>, tfds:<name>"
    ),
  )
  parser.add_argument("--out", required=True, type=storage.path, help="a path or gs://BUCKET/PATH")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--chunk", type=int, default=1024, help="queries per similarity block")
  parser.add_argument(
    "--workers",
    type=int,
    default=0,
    help="Grain worker processes decoding images ahead of the device (0: threads in this one)",
  )
  parser.add_argument(
    "--masks",
    action="store_true",
    help=(
      "analysis: score retrieval pairs with the caption's SmartCLIP mask on the image "
      "embedding (the paper evaluates without)"
    ),
  )
  parser.add_argument(
    "--activation",
    choices=("quick_gelu", "gelu"),
    help="for state_dicts that do not say (default QuickGELU)",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  if argv is None:  # the command itself (callers with argv keep their process)
    malloc.use(malloc.chosen())  # tcmalloc where installed: a CPU step's speed (malloc.py)
  parser = arg_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  progress.log_to_stderr()
  try:
    tasks = tasks_lib.parse_tasks(args.tasks)
  except ValueError as e:
    parser.error(str(e))
  overrides = {"activation": args.activation} if args.activation else {}
  labels = [m.rstrip("/").rsplit("/", 1)[-1] or m for m in args.model]  # paths, gs://, hf-hub:
  if len(set(labels)) < len(labels):
    labels = [f"{i}:{label}" for i, label in enumerate(labels)]
  results = {}
  for label, path in zip(labels, args.model):
    out = args.out / label if len(args.model) > 1 else args.out
    results[label] = evaluate_model(
      path,
      tasks,
      out,
      batch_size=args.batch_size,
      chunk=args.chunk,
      masks=args.masks,
      workers=args.workers,
      **overrides,
    )
    (out / "results.json").write_text(json.dumps(results[label], indent=2))
  if args.masks:
    print(
      "MASKS ON: each caption's SmartCLIP mask applied to the image embedding (analysis; "
      "the paper's numbers are with masks off)"
    )
  print(report.results_table(results))
  print(f"results.json and recall@K plot {report.plot_recall(args.out, labels)} in {args.out}")


if __name__ == "__main__":
  main()
