"""Evaluation results for people and tools: fixed-width tables, the recall@K plot, the
per-step JSON and TensorBoard scalars of a training run, and the best-metric lookup."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from etils import epath

from smartclip_jax.evals import retrieval
from smartclip_jax.writer import MetricWriter


def format_table(results: dict[str, float], title: str) -> str:
  """A small fixed-width table: rows I->T and T->I, columns R@K."""
  ks = retrieval.KS
  lines = [title, "        " + "".join(f"{f'R@{k}':>8}" for k in ks)]
  rows = (("I->T", "i2t"), ("T->I", "t2i"), ("1st->I", "first_t2i"))
  for name, key in rows:
    if f"{key}_r1" in results:
      lines.append(f"  {name:6}" + "".join(f"{results[f'{key}_r{k}']:8.1f}" for k in ks))
  if "first_t2i_r1" in results:
    lines.append("  (1st->I: each image retrieved from its caption's first sentence alone)")
  return "\n".join(lines)


def results_table(results: dict[str, dict[str, dict]]) -> str:
  """Rows models, columns tasks: retrieval as I2T/T2I R@1, zero-shot as top-1 (percent)."""
  tasks = list(dict.fromkeys(t for r in results.values() for t in r))
  width = max([len(t) for t in tasks] + [11])
  name_w = max(len(n) for n in results) if results else 5
  lines = [" " * name_w + "".join(f"  {t:>{width}}" for t in tasks)]
  for name, r in results.items():
    lines.append(
      f"{name:<{name_w}}" + "".join(f"  {_cell(r[t]) if t in r else '-':>{width}}" for t in tasks)
    )
  return "\n".join(lines + ["(retrieval: I2T/T2I R@1; zero-shot: top-1; percent)"])


def _cell(metrics: dict) -> str:
  if "i2t_r1" in metrics:
    return f"{metrics['i2t_r1']:.1f}/{metrics['t2i_r1']:.1f}"
  return f"{metrics['top1']:.1f}"


def summary(results: dict) -> str:
  """One log line: held-out and every task's I2T/T2I R@1 (zero-shot: top-1)."""
  first = ""
  if "first_t2i_r1" in results:
    first = f" (first sentence T2I {results['first_t2i_r1']:.1f})"
  parts = [f"held-out {_cell(results)}{first}"]
  parts += [f"{task} {_cell(m)}" for task, m in results.get("tasks", {}).items()]
  return "; ".join(parts)


def write_step(
  results: dict, step: int, workdir: epath.Path, writer: MetricWriter, data_name: str
) -> None:
  """A training run's evaluation at `step` (of its held-out `data_name` split and tasks):
  `eval/step_<N>.json`, TensorBoard `eval/*` and `eval/<task>/*`, and the printed tables
  (call on process 0)."""
  skipped = f" ({results['skipped']} unusable skipped)" if results["skipped"] else ""
  title = (
    f"held-out {data_name}: {results['num_images']} images x 1 full caption{skipped}, "
    f"step {step}, masks off"
  )
  (workdir / "eval").mkdir(exist_ok=True)
  (workdir / "eval" / f"step_{step}.json").write_text(
    json.dumps({"step": step, **results}, indent=2)
  )
  writer.write(step, {k: v for k, v in results.items() if k != "tasks"}, prefix="eval/")
  for task, metrics in results.get("tasks", {}).items():
    writer.write(
      step, {k: v for k, v in metrics.items() if not isinstance(v, dict)}, prefix=f"eval/{task}/"
    )
  print(format_table(results, title), flush=True)
  if "tasks" in results:
    print(results_table({f"step {step}": results["tasks"]}), flush=True)


def metric_value(results: dict, name: str) -> float:
  """`i2t_r1` of the held-out split, or `<task>/<metric>` of an `eval.tasks` task."""
  task, _, metric = name.rpartition("/")
  values = results.get("tasks", {}).get(task, {}) if task else results
  if metric not in values:
    raise KeyError(f"eval.best_metric={name!r} is not among this evaluation's metrics")
  return float(values[metric])


def plot_recall(out: epath.Path, labels: Sequence[str], max_k: int = 50) -> epath.Path:
  """recall_at_k.png: R@K for K = 1..max_k, one panel per retrieval task, a line per model and
  direction, from the saved ranks."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = {label: out / label / "ranks" if len(labels) > 1 else out / "ranks" for label in labels}
  tasks = sorted({p.stem for d in runs.values() for p in d.glob("*.npz") if "i2t" in _load(p)})
  fig, axes = plt.subplots(
    1, max(len(tasks), 1), figsize=(4.5 * max(len(tasks), 1), 3.6), squeeze=False
  )
  ks = np.arange(1, max_k + 1)
  for ax, task in zip(axes[0], tasks):
    for label, directory in runs.items():
      if (directory / f"{task}.npz").is_file():
        r = _load(directory / f"{task}.npz")
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
  with path.open("wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)
  return path


def _load(path: epath.Path) -> dict[str, np.ndarray]:
  with path.open("rb") as file, np.load(file) as f:
    return {k: f[k] for k in f.files}
