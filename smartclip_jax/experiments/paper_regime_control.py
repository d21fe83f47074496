"""The control for the paper-regime gain: SmartCLIP, CLIP fine-tuned, and CLIP on a fixed random
18 of the image dimensions at SmartCLIP's τ, run together at one commit.

  python -m smartclip_jax.experiments.paper_regime_control --out results/paper_regime/control

SmartCLIP beat CLIP fine-tuned by 1.7 to 2.7 points on partial captions with masks that kept
about the same 18 dimensions for every caption. If a mask that never depends on the caption
(`clip_subset`: `clip.subset_dims`) gains as much, the gain is the towers drifting less, not
per-caption selection. The same base, schedule, scoring and tables as `paper_regime`, whose
runner this is; numbers from different commits do not compare (results/paper_regime/README.md,
follow-up), hence one run of all three.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from smartclip_jax.experiments import paper_regime, runner

RUNS = tuple((mode, loss, "small") for mode in ("prefix", "subset") for loss in paper_regime.LOSSES)
QUICK_HELP = "tiny sizes, two seeds, the three prefix runs: every output file, for the tests"
QUICK_RUN = dict(
  sizes=paper_regime.QUICK, seeds=paper_regime.SEEDS[:2], runs=RUNS[: len(paper_regime.LOSSES)]
)
FULL_RUN = dict(sizes=paper_regime.default_sizes(), runs=RUNS)
run = paper_regime.run
write_outputs = paper_regime.write_outputs


def main(argv: Sequence[str] | None = None) -> None:
  runner.experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
  main()
