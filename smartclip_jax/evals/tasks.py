"""The evaluation suite's tasks: retrieval sets and zero-shot classification on one model,
with plain (unmasked) embeddings as the paper evaluates (docs/method.md, inference)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath

from smartclip_jax.evals import cache, datasets, retrieval, zeroshot
from smartclip_jax.evals.encoder import Encoder

log = logging.getLogger("smartclip_jax")

ZEROSHOT_TASKS = ("cifar10", "cifar100", "imagenet2012", "imagenet", "folder", "tfds")


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
  """`--tasks` / `eval.tasks`: comma-separated items; unknown names and missing paths raise."""
  tasks = [Task(*item.split(":", 2)) for item in spec.split(",") if item]
  known = datasets.RETRIEVAL_TASKS + ZEROSHOT_TASKS
  for t in tasks:
    if t.name not in known:
      raise ValueError(f"unknown task {t.name!r}: one of {', '.join(known)}")
    if t.name in datasets.RETRIEVAL_TASKS + ("folder", "imagenet", "tfds") and not t.path:
      raise ValueError(f"task {t.name} needs a path: {t.name}:<path>")
  return tasks


def run_tasks(
  encoder: Encoder,
  model_id: str,
  tasks: Sequence[Task],
  out: epath.Path,
  chunk: int = 1024,
  cache_dir: epath.Path | None = None,
  masks: bool = False,
) -> dict[str, dict]:
  """Every task on one model: {task: metrics}; the rank of every query goes to
  `out/ranks/<task>.npz`. With `masks`, retrieval scores each pair with the caption's
  SmartCLIP mask on the image embedding (analysis only: the paper evaluates without; such
  results carry `"masks": true`, and zero-shot tasks are left out)."""
  m = encoder.config.model
  base = {"model": model_id, "image_size": m.vision.image_size, "context": m.text.context_length}
  (out / "ranks").mkdir(parents=True, exist_ok=True)
  results = {}
  for task in tasks:
    if task.name in datasets.RETRIEVAL_TASKS:
      data = datasets.load_retrieval(task.name, task.path, task.image_root)
      emb = cache.cached(
        cache_dir,
        {
          **base,
          "task": task.label,
          "masks": masks,
          "images": cache.fingerprint(data.images),
          "captions": cache.fingerprint(data.captions),
        },
        functools.partial(_embed_pairs, encoder, data, masks),
      )
      data, emb = _without_unreadable(data, emb)
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
      emb = cache.cached(
        cache_dir,
        {
          **base,
          "task": task.label,
          "images": cache.fingerprint(data.images),
          "classes": data.classnames,
          "templates": data.templates,
        },
        functools.partial(_embed_images, encoder, data.images),
      )
      keep = np.ones(len(data.labels), bool)
      keep[emb.get("unreadable", [])] = False
      cls = zeroshot.class_embeddings(encoder, data.classnames, data.templates)
      metrics, ranked = zeroshot.accuracy(emb["img"][keep], cls, data.labels[keep], encoder.mesh)
      metrics["num_images"] = int(keep.sum())
      if not keep.all():
        metrics["skipped"] = {"undecodable_image": int((~keep).sum())}
      rank = {"label": ranked}
    if jax.process_index() == 0:
      with (out / "ranks" / f"{task.label}.npz").open("wb") as f:
        np.savez(f, **rank)
    results[task.label] = metrics
    log.info("%s: %s", task.label, {k: v for k, v in metrics.items() if k != "skipped"})
  return results


def _embed_images(encoder: Encoder, images: Sequence) -> dict:
  unreadable: list[int] = []
  img = encoder.images(images, unreadable)
  return {"img": img, "unreadable": np.asarray(unreadable, np.int64)}


def _without_unreadable(
  data: datasets.RetrievalSet, emb: dict
) -> tuple[datasets.RetrievalSet, dict]:
  """The set and embeddings with undecodable images left out, with their captions, and
  counted in `skipped` (the captions of an image that cannot be seen cannot find it)."""
  if not len(unreadable := emb.get("unreadable", [])):  # none, or a cache from before counting
    return data, emb
  keep = np.ones(len(data.images), bool)
  keep[unreadable] = False
  kept_text = keep[data.text_to_image]
  new_index = np.cumsum(keep) - 1
  skipped = dict(data.skipped)
  skipped["undecodable_image"] = skipped.get("undecodable_image", 0) + int((~keep).sum())
  data = dataclasses.replace(
    data,
    images=[p for p, k in zip(data.images, keep, strict=True) if k],
    captions=[c for c, k in zip(data.captions, kept_text, strict=True) if k],
    text_to_image=new_index[data.text_to_image[kept_text]],
    skipped=skipped,
  )
  emb = {**emb, "img": emb["img"][keep], "txt": emb["txt"][kept_text]}
  if "masks" in emb:
    emb["masks"] = emb["masks"][kept_text]
  return data, emb


def _embed_pairs(encoder: Encoder, data: datasets.RetrievalSet, masks: bool) -> dict:
  txt, truncated = encoder.texts(data.captions)
  if truncated:
    log.info(
      "%d of %d captions truncated to %d tokens",
      truncated,
      len(data.captions),
      encoder.config.model.text.context_length,
    )
  out = {**_embed_images(encoder, data.images), "txt": txt, "truncated": truncated}
  if masks:
    out["masks"] = encoder.masks(data.captions)
  return out
