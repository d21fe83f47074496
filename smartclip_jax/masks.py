"""A SmartCLIP model's masks for given captions: does its mask network still tell them apart?

  python -m smartclip_jax.masks --model runs/demo --captions "a red circle." \
      "a blue square at the top left." --out results/masks
  python -m smartclip_jax.masks --model runs/demo --captions_file captions.txt --out results/masks

Writes `masks.png` (captions x image-embedding dimensions, dimensions sorted by use),
`masks.npy` (the masks, float32 [captions, D]) and `masks.md`, the table it prints: per caption
the dimensions on and the mean Jaccard overlap with the other captions' masks; then the mean
pairwise Jaccard and how many dimensions are on for every caption / for none. The same figures
as the trainer's mask diagnostics (docs/training.md, mask diagnostics).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from smartclip_jax import losses, progress
from smartclip_jax.experiments import figures
from smartclip_jax.load import load

LABEL_CHARS = 60  # of a caption, as the heatmap's row label


def mask_table(captions: Sequence[str], masks: np.ndarray) -> str:
  """The markdown table of `masks` [N, D], one row per caption, and the summary under it."""
  on = masks >= losses.MASK_ON
  jaccard = np.asarray(losses.mask_jaccard(masks))
  n, dims = masks.shape
  to_others = [f"{(row.sum() - 1) / (n - 1):.3f}" if n > 1 else "-" for row in jaccard]
  lines = ["| # | caption | dims on | mean Jaccard to the others |", "|---|---|---|---|"]
  for i, caption in enumerate(captions):
    text = " ".join(caption.split()).replace("|", "\\|")
    lines.append(f"| {i} | {text} | {on[i].sum()} of {dims} | {to_others[i]} |")
  window = losses.mask_window([losses.mask_diagnostics(masks)])
  lines += [
    "",
    f"mean pairwise Jaccard {float(losses.mean_pairwise(jaccard)):.3f} over {n} captions; "
    f"always on {window['mask_always_on']:.0f}, never on {window['mask_never_on']:.0f} "
    f"of {dims} dimensions",
  ]
  return "\n".join(lines)


def write(captions: Sequence[str], masks: np.ndarray, out: pathlib.Path, title: str) -> str:
  """`masks.png`, `masks.npy` and `masks.md` under `out`; returns the table."""
  out.mkdir(parents=True, exist_ok=True)
  np.save(out / "masks.npy", masks.astype(np.float32))
  labels = [c if len(c) <= LABEL_CHARS else c[: LABEL_CHARS - 1] + "…" for c in captions]
  figures.mask_heatmap(out / "masks.png", masks.astype(np.float32), labels, title)
  table = mask_table(captions, masks)
  (out / "masks.md").write_text(f"# {title}\n\n{table}\n")
  return table


def arg_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m smartclip_jax.masks",
    description="A SmartCLIP model's masks for given captions: heatmap and table.",
    allow_abbrev=False,
  )
  parser.add_argument("--model", required=True, help="anything smartclip_jax.load reads")
  given = parser.add_mutually_exclusive_group(required=True)
  given.add_argument("--captions", nargs="+", help="the captions")
  given.add_argument("--captions_file", type=pathlib.Path, help="a text file, one caption a line")
  parser.add_argument("--out", required=True, type=pathlib.Path, help="a local directory")
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  parser = arg_parser()
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  progress.log_to_stderr()
  captions = args.captions or [
    line.strip() for line in args.captions_file.read_text().splitlines() if line.strip()
  ]
  if not captions:
    parser.error(f"{args.captions_file} holds no captions")
  model = load(args.model)
  if not model.config.model.mask_net:
    raise SystemExit(
      f"smartclip_jax.masks: {args.model} is not a SmartCLIP model: it has no mask network "
      f"(model.mask_net is false), so it has no masks to show"
    )
  masks = model.encoder().masks(captions)
  print(write(captions, masks, args.out, f"masks of {args.model}"))
  print(f"masks.png, masks.npy and masks.md in {args.out}")


if __name__ == "__main__":
  main()
