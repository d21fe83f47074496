"""What the masks learned, and the recall bars, for the partial-captions experiment."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import matplotlib
import numpy as np

from smartclip_jax.experiments import scenes
from smartclip_jax.experiments.probes import METRICS, Probes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

MAX_NAMED = 5  # scenes hold 2..5 objects


def mask_analysis(
  masks: Callable[[np.ndarray], np.ndarray], probes: Probes, context_length: int
) -> dict:
  """Masks of the test captions: the mean mask of the one-object sentences with each factor
  value, the mean number of active dimensions of captions naming 1..5 objects, and the Jaccard
  overlap between factor values' masks (a dimension counts for a value when it is on in at least
  half of that value's sentences). `masks`: caption tokens [N, L] -> masks [N, D]."""
  single = masks(probes.single)
  values = scenes.FACTOR_VALUES
  rows = np.stack(
    [single[[t.value(f) == v for _, t in probes.single_things]].mean(0) for f, v in values]
  )
  on = rows >= 0.5
  union = (on[:, None] | on[None]).sum(-1)
  jaccard = np.where(union > 0, (on[:, None] & on[None]).sum(-1) / np.maximum(union, 1), 0.0)
  split = probes.split
  size_by_named = {}
  for k in range(1, MAX_NAMED + 1):
    scenes_k = [ids for ids in split.sentence_ids if len(ids) >= k]
    if scenes_k:
      tokens = np.stack([scenes.caption_tokens(ids[:k], context_length) for ids in scenes_k])
      size_by_named[str(k)] = float(masks(tokens).sum(-1).mean())  # JSON's keys
  return {
    "values": [f"{f}={v}" for f, v in values],
    "mean_mask": rows.tolist(),
    "jaccard": jaccard.tolist(),
    "active_by_objects_named": size_by_named,
    "dims": int(single.shape[-1]),
  }


def write_all(out: pathlib.Path, summary: dict, analysis: dict) -> list[pathlib.Path]:
  return [_recall_bars(out / "recall_bars.png", summary), *mask_figures(out, analysis)]


def mask_figures(out: pathlib.Path, analysis: dict) -> list[pathlib.Path]:
  """Per method of `analysis` (`mask_analysis`'s output): its heatmap and overlap figures, and
  one plot of mask size against objects named for all of them."""
  paths = [_mask_size(out / "mask_size.png", analysis)] if analysis else []
  for method, a in analysis.items():
    paths += [
      _heatmap(out / f"mask_heatmap_{method}.png", a, method),
      _overlap(out / f"mask_overlap_{method}.png", a, method),
    ]
  return paths


def lr_sweep(
  path: pathlib.Path,
  curves: dict[str, tuple[list[float], list[float], list[float]]],
  baseline: float,
  metric: str,
) -> pathlib.Path:
  """`metric` against the towers' learning rate: one line per curve name, (lrs, means, stds),
  with the untouched base model as a horizontal line; lr 0 (frozen) drawn at the left edge."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (lrs, means, stds) in curves.items():
    x = [lr if lr > 0 else 1e-6 for lr in lrs]
    ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=name)
  ax.axhline(baseline, color="grey", linestyle="--", label="base CLIP")
  ax.set_xscale("log")
  ax.set_xlabel("towers' learning rate (1e-6 here: frozen)")
  ax.set_ylabel(f"{metric} (%, mean ± std over seeds)")
  ax.legend(fontsize=7)
  return _save(fig, path)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _recall_bars(path: pathlib.Path, summary: dict) -> pathlib.Path:
  settings = list(summary)
  fig, axes = plt.subplots(len(settings), 1, figsize=(12, 3.2 * len(settings)), squeeze=False)
  for ax, setting in zip(axes[:, 0], settings):
    methods = list(summary[setting])
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
      mean = [summary[setting][method][m][0] for m in METRICS]
      std = [summary[setting][method][m][1] for m in METRICS]
      ax.bar(np.arange(len(METRICS)) + j * width, mean, width, yerr=std, label=method, capsize=2)
    ax.set_xticks(np.arange(len(METRICS)) + 0.4 - width / 2, METRICS, fontsize=8)
    ax.set_ylabel("% (mean ± std)")
    ax.set_ylim(0, 118)  # room above the bars for the legend
    ax.set_title(setting)
    ax.legend(fontsize=7, ncol=len(methods), loc="upper center")
  return _save(fig, path)


def _mask_size(path: pathlib.Path, analysis: dict) -> pathlib.Path:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for method, a in analysis.items():
    named = sorted(a["active_by_objects_named"], key=int)
    ax.plot(
      [int(k) for k in named],
      [a["active_by_objects_named"][k] for k in named],
      marker="o",
      label=method,
    )
  ax.set_xlabel("objects named by the caption")
  ax.set_ylabel("active mask dimensions (mean)")
  ax.legend(fontsize=7)
  return _save(fig, path)


def _heatmap(path: pathlib.Path, a: dict, method: str) -> pathlib.Path:
  title = f"{method}: mean mask of one-object captions, by factor value"
  return mask_heatmap(path, np.asarray(a["mean_mask"]), a["values"], title)


def mask_heatmap(
  path: pathlib.Path, rows: np.ndarray, labels: list[str], title: str
) -> pathlib.Path:
  """Masks (or mean masks) [N, D] in [0, 1] as an N x D heatmap, one labelled row each, the
  dimensions sorted by use (most used first)."""
  order = np.argsort(-rows.mean(0), kind="stable")
  fig, ax = plt.subplots(figsize=(10, 6))
  im = ax.imshow(rows[:, order], aspect="auto", cmap="viridis", vmin=0, vmax=1)
  ax.set_yticks(range(len(labels)), labels, fontsize=6)
  ax.set_xlabel("image-embedding dimension (sorted by use)")
  ax.set_title(title)
  fig.colorbar(im, ax=ax)
  return _save(fig, path)


def _overlap(path: pathlib.Path, a: dict, method: str) -> pathlib.Path:
  title = f"{method}: Jaccard overlap of factor values' masks"
  return overlap(path, np.asarray(a["jaccard"]), a["values"], title)


def overlap(
  path: pathlib.Path, jaccard: np.ndarray, labels: Sequence[str], title: str
) -> pathlib.Path:
  """A Jaccard matrix [n, n] in [0, 1], rows and columns labelled; each cell's value written in
  it when n is at most 10."""
  fig, ax = plt.subplots(figsize=(7.5, 6.5))
  im = ax.imshow(jaccard, cmap="magma", vmin=0, vmax=1)
  small = len(labels) <= 10
  ticks = range(len(labels))
  ax.set_xticks(ticks, labels, fontsize=9 if small else 5, rotation=0 if small else 90)
  ax.set_yticks(ticks, labels, fontsize=9 if small else 5)
  for (i, j), value in np.ndenumerate(jaccard) if small else ():
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="grey", fontsize=9)
  ax.set_title(title)
  fig.colorbar(im, ax=ax)
  return _save(fig, path)
