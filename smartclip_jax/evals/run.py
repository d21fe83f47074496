"""What a training run evaluates: its held-out split with full captions, masks off, and the
`eval.tasks` of the evaluation suite (docs/method.md, evaluation protocols)."""

from __future__ import annotations

import ml_collections
import numpy as np
from etils import epath

from smartclip_jax.data import pipeline
from smartclip_jax.evals import retrieval, tasks as tasks_lib
from smartclip_jax.evals.encoder import Encoder
from smartclip_jax.progress import Progress


def evaluate_heldout(config: ml_collections.ConfigDict, encoder: Encoder) -> dict[str, float]:
  """I2T/T2I R@1/5/10 on the held-out split with full captions, masks off; and T2I R@K from
  each caption's first sentence alone (`first_t2i_r*`), a partial caption, where SmartCLIP
  and CLIP part ways in the experiments (docs/experiments.md).

  Unusable held-out records are skipped (and reported in `skipped`), never silently.
  """
  batches, num_records = pipeline.eval_batches(config)
  images, texts, firsts = [], [], []
  progress = Progress(f"held-out {config.data.name}", num_records, "records")
  for batch in batches:
    images.append(encoder.apply("encode_image", batch["image"]))
    texts.append(encoder.apply("encode_text", batch["tokens"]))
    if "first_tokens" in batch:
      firsts.append(encoder.apply("encode_text", batch["first_tokens"]))
    progress.update(sum(len(x) for x in images))
  progress.update(num_records)  # every record read, the unusable ones skipped
  img, txt = retrieval.normalize(np.concatenate(images)), retrieval.normalize(np.concatenate(texts))
  targets = np.arange(len(txt))
  results = retrieval.recalls(retrieval.retrieval_ranks(img, txt, targets, encoder.mesh))
  if firsts:
    first = retrieval.normalize(np.concatenate(firsts))
    ranks = retrieval.retrieval_ranks(img, first, targets, encoder.mesh)
    recalls = retrieval.recalls(ranks).items()
    results.update({f"first_{k}": v for k, v in recalls if k.startswith("t2i")})
  return {**results, "num_images": len(img), "skipped": num_records - len(img)}


def run_eval(
  config: ml_collections.ConfigDict, encoder: Encoder, model_id: str, out: epath.Path
) -> dict:
  """The held-out metrics, with `tasks` ({task: metrics}) when `eval.tasks` names any; the
  tasks' per-query ranks go under `out/ranks/`."""
  results = evaluate_heldout(config, encoder)
  if config.eval.tasks:
    results["tasks"] = tasks_lib.run_tasks(
      encoder, model_id, tasks_lib.parse_tasks(config.eval.tasks), out
    )
  return results
