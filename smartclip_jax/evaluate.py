"""Evaluation with plain (unmasked) embeddings, as the paper evaluates (docs/method.md, inference).

  python -m smartclip_jax.evaluate --model runs/demo --tasks urban1k:/data/Urban1k,cifar10 \
      --out results/demo

Prints a table (rows models, columns tasks: I2T/T2I R@1, zero-shot top-1), writes
`results.json` ({task: {"i2t_r1", ..., "t2i_r10", "mean_recall"} or {"top1", "top5"}}, percent),
the rank of every query under `ranks/` and `recall_at_k.png`. The held-out evaluation of a
training run is `evaluate_heldout`. Recall and its tie rule live in `evals/retrieval.py`, data
sets in `evals/datasets.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from smartclip_jax import sharding
from smartclip_jax.data import pipeline
from smartclip_jax.evals import datasets, embed, retrieval, zeroshot
from smartclip_jax.interop.loading import Loaded

log = logging.getLogger("smartclip_jax")


def encoders(model: nn.Module, params, mesh: Mesh) -> tuple[Callable, Callable]:
  """Jitted image and text encoders over fixed params."""
  out = sharding.replicated(mesh)
  image = jax.jit(
    lambda x: model.apply({"params": params}, x, method="encode_image"), out_shardings=out
  )
  text = jax.jit(
    lambda t: model.apply({"params": params}, t, method="encode_text"), out_shardings=out
  )
  return image, text


def evaluate_heldout(
  config: ml_collections.ConfigDict, model: nn.Module, params, mesh: Mesh
) -> dict[str, float]:
  """I2T/T2I R@1/5/10 on the held-out split with full captions, masks off.

  Unusable held-out records are skipped (and reported in `skipped`), never silently.
  """
  encode_image, encode_text = encoders(model, params, mesh)
  bs = config.data.eval_batch_size
  batches, num_records = pipeline.eval_batches(config)
  images, texts = [], []
  for batch in batches:
    images.append(embed.apply_padded(encode_image, batch["image"], bs, mesh))
    texts.append(embed.apply_padded(encode_text, batch["tokens"], bs, mesh))
  img, txt = retrieval.normalize(np.concatenate(images)), retrieval.normalize(np.concatenate(texts))
  rank = retrieval.retrieval_ranks(img, txt, np.arange(len(txt)), mesh)
  return {**retrieval.recalls(rank), "num_images": len(img), "skipped": num_records - len(img)}


def format_table(results: dict[str, float], title: str) -> str:
  """A small fixed-width table: rows I->T and T->I, columns R@K."""
  ks = retrieval.KS
  lines = [title, "        " + "".join(f"{f'R@{k}':>8}" for k in ks)]
  for name, key in (("I->T", "i2t"), ("T->I", "t2i")):
    lines.append(f"  {name:6}" + "".join(f"{results[f'{key}_r{k}']:8.1f}" for k in ks))
  return "\n".join(lines)


# ---- The evaluation suite: python -m smartclip_jax.evaluate --model ... --tasks ... --out ... --


@dataclasses.dataclass(frozen=True)
class Task:
  """One `--tasks` item: `name`, `name:path` or `name:path:image_root`; `tfds:<name>[:<data_dir>]`
  for any TFDS classification set."""

  name: str
  path: str = ""
  image_root: str = ""

  @property
  def label(self) -> str:
    return self.path if self.name == "tfds" else self.name


def parse_tasks(spec: str) -> list[Task]:
  tasks = [Task(*item.split(":", 2)) for item in spec.split(",") if item]
  known = datasets.RETRIEVAL_TASKS + ZEROSHOT_TASKS
  for t in tasks:
    if t.name not in known:
      raise ValueError(f"unknown task {t.name!r}: one of {', '.join(known)}")
    if t.name in datasets.RETRIEVAL_TASKS + ("folder", "tfds") and not t.path:
      raise ValueError(f"task {t.name} needs a path: {t.name}:<path>")
  return tasks


ZEROSHOT_TASKS = ("cifar10", "cifar100", "imagenet2012", "folder", "tfds")


def evaluate_model(
  path: str,
  tasks: Sequence[Task],
  out: pathlib.Path,
  mesh: Mesh | None = None,
  batch_size: int = 256,
  chunk: int = 1024,
  masks: bool = False,
  **overrides,
) -> dict[str, dict]:
  """Every task on the model at `path` (see `evaluate_loaded`), embeddings cached under
  `out/cache/` while the checkpoint and the set stay the same."""
  from smartclip_jax.interop.loading import load

  return evaluate_loaded(
    load(path, **overrides),
    embed.model_key(path),
    tasks,
    out,
    mesh,
    batch_size,
    chunk,
    cache_dir=out / "cache",
    masks=masks,
  )


def evaluate_loaded(
  model: Loaded,
  model_id: str,
  tasks: Sequence[Task],
  out: pathlib.Path,
  mesh: Mesh | None = None,
  batch_size: int = 256,
  chunk: int = 1024,
  cache_dir: pathlib.Path | None = None,
  masks: bool = False,
) -> dict[str, dict]:
  """Every task on one model: {task: metrics}; the rank of every query goes to
  `out/ranks/<task>.npz`. With `masks`, retrieval scores each pair with the caption's
  SmartCLIP mask on the image embedding (analysis only: the paper evaluates without; such
  results carry `"masks": true`, and zero-shot tasks are left out)."""
  encoder = embed.Encoder(model, mesh, batch_size)
  base = {
    "model": model_id,
    "image_size": model.config.model.vision.image_size,
    "context": model.config.model.text.context_length,
  }
  (out / "ranks").mkdir(parents=True, exist_ok=True)
  results = {}
  for task in tasks:
    if task.name in datasets.RETRIEVAL_TASKS:
      data = datasets.load_retrieval(task.name, task.path, task.image_root)
      emb = embed.cached(
        cache_dir,
        {
          **base,
          "task": task.label,
          "masks": masks,
          "images": _fingerprint(data.images),
          "captions": _fingerprint(data.captions),
        },
        lambda: _embed_pairs(encoder, data, masks),
      )
      rank = retrieval.retrieval_ranks(
        retrieval.normalize(emb["img"]),
        retrieval.normalize(emb["txt"]),
        data.text_to_image,
        encoder.mesh,
        chunk,
        emb.get("masks"),
      )
      metrics = {
        **retrieval.recalls(rank),
        "num_images": len(data.images),
        "num_captions": len(data.captions),
        "truncated_captions": int(emb["truncated"]),
        "skipped": data.skipped,
        **({"masks": True} if masks else {}),
      }
    elif masks:
      log.info("%s: zero-shot has no captions to mask; left out with --masks", task.label)
      continue
    else:
      data = (
        datasets.load_classification(f"tfds:{task.path}", task.image_root)
        if task.name == "tfds"
        else datasets.load_classification(task.name, task.path)
      )
      emb = embed.cached(
        cache_dir,
        {
          **base,
          "task": task.label,
          "images": _fingerprint(data.images),
          "classes": data.classnames,
          "templates": data.templates,
        },
        lambda: {"img": encoder.images(data.images)},
      )
      cls = zeroshot.class_embeddings(encoder, data.classnames, data.templates)
      metrics, ranked = zeroshot.accuracy(emb["img"], cls, data.labels, encoder.mesh)
      metrics["num_images"] = len(data.labels)
      rank = {"label": ranked}
    if jax.process_index() == 0:
      np.savez(out / "ranks" / f"{task.label}.npz", **rank)
    results[task.label] = metrics
    log.info("%s: %s", task.label, {k: v for k, v in metrics.items() if k != "skipped"})
  return results


def _embed_pairs(encoder: embed.Encoder, data: datasets.RetrievalSet, masks: bool) -> dict:
  txt, truncated = encoder.texts(data.captions)
  if truncated:
    log.info(
      "%d of %d captions truncated to %d tokens",
      truncated,
      len(data.captions),
      encoder.model.config.model.text.context_length,
    )
  out = {"img": encoder.images(data.images), "txt": txt, "truncated": truncated}
  if masks:
    out["masks"] = encoder.masks(data.captions)
  return out


def _fingerprint(items: Sequence) -> str:
  first = items[0] if len(items) and isinstance(items[0], str) else ""
  last = items[-1] if len(items) and isinstance(items[-1], str) else ""
  return f"{len(items)}|{first}|{last}"


def results_table(results: dict[str, dict[str, dict]]) -> str:
  """Rows models, columns tasks: retrieval as I2T/T2I R@1, zero-shot as top-1 (percent)."""
  tasks = list(dict.fromkeys(t for r in results.values() for t in r))
  cell = lambda m: f"{m['i2t_r1']:.1f}/{m['t2i_r1']:.1f}" if "i2t_r1" in m else f"{m['top1']:.1f}"
  width = max([len(t) for t in tasks] + [11])
  name_w = max(len(n) for n in results) if results else 5
  lines = [" " * name_w + "".join(f"  {t:>{width}}" for t in tasks)]
  for name, r in results.items():
    lines.append(
      f"{name:<{name_w}}" + "".join(f"  {cell(r[t]) if t in r else '-':>{width}}" for t in tasks)
    )
  return "\n".join(lines + ["(retrieval: I2T/T2I R@1; zero-shot: top-1; percent)"])


def plot_recall(out: pathlib.Path, labels: Sequence[str], max_k: int = 50) -> pathlib.Path:
  """recall_at_k.png: R@K for K = 1..max_k, one panel per retrieval task, a line per model and
  direction, from the saved ranks."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = {label: out / label / "ranks" if len(labels) > 1 else out / "ranks" for label in labels}
  tasks = sorted(
    {p.stem for d in runs.values() for p in d.glob("*.npz") if "i2t" in np.load(p).files}
  )
  fig, axes = plt.subplots(
    1, max(len(tasks), 1), figsize=(4.5 * max(len(tasks), 1), 3.6), squeeze=False
  )
  ks = np.arange(1, max_k + 1)
  for ax, task in zip(axes[0], tasks):
    for label, directory in runs.items():
      if (directory / f"{task}.npz").is_file():
        with np.load(directory / f"{task}.npz") as r:
          for d, style in (("i2t", "-"), ("t2i", "--")):
            ax.plot(
              ks,
              [100 * np.mean(r[d] < k) for k in ks],
              style,
              label=f"{label} {d.upper().replace('2', '→')}",
            )
    ax.set(title=task, xlabel="K", ylabel="recall@K (%)", xscale="log", ylim=(0, 100))
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = out / "recall_at_k.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> None:
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
  parser.add_argument("--out", required=True, type=pathlib.Path)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--chunk", type=int, default=1024, help="queries per similarity block")
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
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(
    level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
  )
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    tasks = parse_tasks(args.tasks)
  except ValueError as e:
    parser.error(str(e))
  overrides = {"activation": args.activation} if args.activation else {}
  labels = [pathlib.Path(m).name or m for m in args.model]
  if len(set(labels)) < len(labels):
    labels = [f"{i}:{label}" for i, label in enumerate(labels)]
  results = {}
  for label, path in zip(labels, args.model):
    out = args.out / label if len(args.model) > 1 else args.out
    results[label] = evaluate_model(
      path, tasks, out, batch_size=args.batch_size, chunk=args.chunk, masks=args.masks, **overrides
    )
    (out / "results.json").write_text(json.dumps(results[label], indent=2))
  if args.masks:
    print(
      "MASKS ON: each caption's SmartCLIP mask applied to the image embedding (analysis; "
      "the paper's numbers are with masks off)"
    )
  print(results_table(results))
  print(f"results.json and recall@K plot {plot_recall(args.out, labels)} in {args.out}")


if __name__ == "__main__":
  main()
