"""How far bf16 compute moves a trained model's embeddings and retrieval, against fp32.

  python benchmarks/precision.py --model runs/demo

Loads the model once per compute dtype (`model.dtype`; the parameters stay fp32), embeds the
held-out split of the model's own config with each, and prints, per dtype against fp32: the
largest and the mean |difference| of the L2-normalised image and text embeddings, and the
held-out R@1 both ways. In our bf16 form the residual stream is bf16 too; the reference keeps it
in fp32 (docs/method.md, precision), so these figures bound what that difference can be worth.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import smartclip_jax  # noqa: E402
from smartclip_jax.data import pipeline  # noqa: E402
from smartclip_jax.evals import retrieval  # noqa: E402

DTYPES = ("float32", "bfloat16")


def embed(path: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
  """Normalised image and text embeddings of the model's held-out split, computed in `dtype`."""
  model = smartclip_jax.load(path, dtype=dtype)
  batches, _ = pipeline.eval_batches(model.config)
  images, texts = [], []
  for batch in batches:
    images.append(np.asarray(model.encode_image(batch["image"])))
    texts.append(np.asarray(model.encode_text(batch["tokens"])))
  return retrieval.normalize(np.concatenate(images)), retrieval.normalize(np.concatenate(texts))


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--model",
    required=True,
    help="a workdir whose config has a held-out split (e.g. the README's runs/demo)",
  )
  args = parser.parse_args()
  figures: dict = {"model": args.model}
  ref = None
  print(
    f"{'dtype':<10}{'img max|d|':>12}{'img mean|d|':>13}{'txt max|d|':>12}"
    f"{'txt mean|d|':>13}{'I2T R@1':>9}{'T2I R@1':>9}"
  )
  for dtype in DTYPES:
    img, txt = embed(args.model, dtype)
    ref = ref or (img, txt)
    rank = retrieval.retrieval_ranks(img, txt, np.arange(len(txt)))
    r = retrieval.recalls(rank)
    row = {
      "img_max": float(np.abs(img - ref[0]).max()),
      "img_mean": float(np.abs(img - ref[0]).mean()),
      "txt_max": float(np.abs(txt - ref[1]).max()),
      "txt_mean": float(np.abs(txt - ref[1]).mean()),
      "i2t_r1": r["i2t_r1"],
      "t2i_r1": r["t2i_r1"],
      "images": len(img),
    }
    figures[dtype] = row
    print(
      f"{dtype:<10}{row['img_max']:>12.2e}{row['img_mean']:>13.2e}{row['txt_max']:>12.2e}"
      f"{row['txt_mean']:>13.2e}{row['i2t_r1']:>9.1f}{row['t2i_r1']:>9.1f}"
    )
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
