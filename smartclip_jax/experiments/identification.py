"""Identification: do SmartCLIP's towers learn an image code aligned with the factors, where
CLIP's do not?

  python -m smartclip_jax.experiments.identification --out results/identification [--quick]

One object per scene (five factors: shape, colour, size, texture, place); a caption names a
non-empty subset of the five factor types ("a red thing.", "a circle at the top left."). An
image's captions come from 1 (the full caption), 4 or all 31 subsets (the caption *variety*).
CLIP and SmartCLIP train on the same batches per seed and variety, from scratch and fine-tuned
from a base CLIP pretrained on full captions. Each run is scored on one fixed test split: DCI
disentanglement of the image embedding against its value under random rotations (the main
metric, ΔDCI), linear probe accuracy per factor, the masks' overlap between factor types
(SmartCLIP), attribute-only retrieval (precision@20) and full-caption R@1. The design, fixed
before any run, is results/identification/README.md. Writes `results.json`, `table.md`,
`dci.png`, `mask_types.png` and `attribute_retrieval.png` to --out.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np

from smartclip_jax.evals import retrieval
from smartclip_jax.experiments import figures, partial_captions, planted, runner, scenes
from smartclip_jax.experiments.figures import plt
from smartclip_jax.experiments.partial_captions import TEST_SEED
from smartclip_jax.experiments.runner import Sizes, Trainer, executor, experiment_main, pin_to_core
from smartclip_jax.tokenizer import tokenize

log = logging.getLogger("smartclip_jax")

FACTORS = scenes.FACTORS
# Every non-empty subset of the factor types, smallest first; the last is the full caption's.
SUBSETS: tuple[tuple[str, ...], ...] = tuple(
  s for k in range(1, len(FACTORS) + 1) for s in itertools.combinations(FACTORS, k)
)
FULL = len(SUBSETS) - 1
VARIETIES = {"V1": 1, "V4": 4, "V31": len(SUBSETS)}  # subsets each image's captions come from
# Each method is config overrides on `partial_captions.base`; the names are the table's rows.
METHODS: dict[str, list[str]] = {
  "clip": ["loss=clip"],
  "smartclip": ["loss=smartclip"],
  "smartclip_s100": ["loss=smartclip", "smartclip.sparsity_weight=100.0"],
}
ONLY = {"smartclip_s100": ("scratch", "V31")}  # methods run at one (start, variety) only
STARTS = ("scratch", "finetune")  # finetune: from the seed's base CLIP (`pretrained` runs)
SEEDS = (0, 1, 2, 3)
ONE_OBJECT = (1, 1)  # objects per scene
RIDGE = 1.0  # the probes' ridge penalty
ROTATIONS = 10  # random rotations the DCI control averages over
ROTATION_SEED = 0
TOP = 20  # attribute retrieval: precision@TOP
# where the design asks the base CLIP's attribute precision to land, above chance (`attr_lift`)
BASE_RANGE = (20.0, 80.0)
MAIN = "delta_dci"
METRICS = (
  MAIN,
  "dci",
  "dci_rotated",
  "probe_acc",
  "attr_p20",
  "attr_lift",
  "full_i2t_r1",
  "full_t2i_r1",
  "mask_jaccard",
  "colour_shape_jaccard",
  *(f"probe_acc_{f}" for f in FACTORS),
  *(f"attr_p20_{f}" for f in FACTORS),
  *(f"mask_dims_{k}" for k in range(1, len(FACTORS) + 1)),
)

QUICK = Sizes(train=256, test=120, pretrain=256, steps=3, pretrain_steps=3, batch=16, layers=1)
QUICK_HELP = "tiny sizes, one seed, CLIP and SmartCLIP only: every output file, for the tests"
QUICK_RUN = dict(sizes=QUICK, seeds=SEEDS[:1], methods=("clip", "smartclip"))
FULL_RUN = dict(sizes=Sizes(test=1000))


def words(thing: scenes.Thing) -> dict[str, str]:
  """The object's value of every factor, as a caption says it."""
  return {f: thing.value(f) for f in FACTORS}


def caption(values: Mapping[str, str], subset: Sequence[str]) -> str:
  """The caption naming the factor types of `subset`: size, colour, texture, then the shape or
  "thing", then the place; `values` needs only the named types."""
  named = [values[f] for f in ("size", "colour", "texture") if f in subset]
  text = " ".join(["a", *named, values["shape"] if "shape" in subset else "thing"])
  return f"{text} {values['place']}." if "place" in subset else f"{text}."


@functools.cache
def caption_ids(text: str, context_length: int) -> np.ndarray:
  """int32 [context_length], tokenised once per distinct caption (read-only: shared)."""
  ids = tokenize(text, context_length)[0]
  ids.flags.writeable = False
  return ids


def caption_tokens(
  things: Sequence[scenes.Thing], subsets: Sequence[int], context_length: int
) -> np.ndarray:
  """int32 [N, L]: each object's caption naming SUBSETS[subsets[i]]."""
  return np.stack(
    [caption_ids(caption(words(t), SUBSETS[s]), context_length) for t, s in zip(things, subsets)]
  )


def allowed_subsets(n: int, variety: str, seed: int) -> np.ndarray:
  """int [n, k]: the k = VARIETIES[variety] subsets (indices into SUBSETS) each of n images'
  captions come from, drawn without replacement, a pure function of (seed, variety): V1 is the
  full caption alone."""
  k = VARIETIES[variety]
  if k == 1:
    return np.full((n, 1), FULL)
  rng = np.random.default_rng([seed, 11, list(VARIETIES).index(variety)])
  return rng.random((n, len(SUBSETS))).argsort(1)[:, :k]


def schedule(
  split: scenes.Split, steps: int, batch: int, variety: str, seed: int, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """Image indices [steps, batch] (`runner.data_order`) and caption tokens [steps, batch, L],
  each caption's subset drawn uniformly from its image's `allowed_subsets`: one data order and
  caption draw per (seed, variety), the same for every method."""
  rng = np.random.default_rng([seed, 13, list(VARIETIES).index(variety)])
  index = runner.data_order(rng, len(split.scenes), steps, batch)
  allowed = allowed_subsets(len(split.scenes), variety, seed)
  pick = allowed[index, rng.integers(allowed.shape[1], size=index.shape)]
  things = [split.scenes[i][0] for i in index.reshape(-1)]
  tokens = caption_tokens(things, pick.reshape(-1), context_length)
  return index, tokens.reshape(steps, batch, context_length)


def labels_of(things: Sequence[scenes.Thing]) -> np.ndarray:
  """int [N, 5]: each object's value index of every factor (`scenes.VALUES`)."""
  return np.array([[scenes.VALUES[f].index(t.value(f)) for f in FACTORS] for t in things])


# ---- measures ----


def standardise(x: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
  """Each column to zero mean and unit std (of `like`'s columns when given)."""
  like = x if like is None else like
  std = like.std(0)
  return (x - like.mean(0)) / np.where(std > 0, std, 1.0)


def ridge(x: np.ndarray, y: np.ndarray, lam: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
  """Closed-form ridge regression of y [N, K] on x [N, D] with an unpenalised intercept:
  (coefficients [D, K], intercept [K])."""
  mx, my = x.mean(0), y.mean(0)
  xc = x - mx
  coef = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - my))
  return coef, my - mx @ coef


def one_hot(labels: np.ndarray, factor: int) -> np.ndarray:
  return np.eye(len(scenes.VALUES[FACTORS[factor]]))[labels[:, factor]]


def importances(code: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """R [D, factors]: the summed squared ridge coefficient of each standardised dimension over
  each factor's one-hot values (squared, not absolute: standardising blows dimensions of pure
  noise up to unit variance, and their small leaks, summed as |.|, held an aligned code with
  noise 0.05 to DCI 0.68; squared, 0.98; results/identification/README.md, changes)."""
  z = standardise(code)
  return np.stack(
    [np.square(ridge(z, one_hot(labels, f))[0]).sum(1) for f in range(labels.shape[1])], 1
  )


def disentanglement(r: np.ndarray) -> float:
  """DCI disentanglement of importances R [D, K]: Σ_d ρ_d (1 − H_K(P_d))."""
  total = r.sum(1)
  p = r / np.maximum(total, 1e-300)[:, None]
  logs = np.log(np.where(p > 0, p, 1.0))
  entropy = -(p * logs).sum(1) / math.log(r.shape[1])
  return float((total / total.sum() * (1 - entropy)).sum())


def dci(code: np.ndarray, labels: np.ndarray) -> float:
  return disentanglement(importances(code, labels))


def rotations(dims: int, count: int = ROTATIONS, seed: int = ROTATION_SEED) -> list[np.ndarray]:
  """`count` random orthogonal [dims, dims] matrices (QR of Gaussians, Haar-distributed)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    q, r = np.linalg.qr(rng.normal(size=(dims, dims)))
    out.append(q * np.sign(np.diag(r)))
  return out


def dci_scores(code: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """DCI, its mean over `rotations` of the code, and their difference."""
  value = dci(code, labels)
  rotated = float(np.mean([dci(code @ q, labels) for q in rotations(code.shape[1])]))
  return {MAIN: value - rotated, "dci": value, "dci_rotated": rotated}


def probe_accuracy(code: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Per factor, the accuracy (%) of the argmax of a ridge probe fitted on the first half of
  the code's rows (standardised by that half) on the second half."""
  half = len(code) // 2
  fit, held = standardise(code[:half]), standardise(code[half:], like=code[:half])
  acc = []
  for f in range(labels.shape[1]):
    coef, intercept = ridge(fit, one_hot(labels[:half], f))
    acc.append(100 * np.mean((held @ coef + intercept).argmax(1) == labels[half:, f]))
  return np.array(acc)


def precision_at(scores: np.ndarray, relevant: np.ndarray, k: int = TOP) -> np.ndarray:
  """[Q]: the share of relevant items among each query's top k (scores, relevant: [items, Q])."""
  top = np.argsort(-scores, axis=0, kind="stable")[:k]
  return np.take_along_axis(relevant, top, 0).mean(0)


# ---- the test split ----


@dataclasses.dataclass
class TestSet:
  """The single-object test scenes and every caption set the measures read."""

  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # [N, 5] value indices (`labels_of`)
  full: np.ndarray  # [N, L] full captions
  attributes: np.ndarray  # [26, L] single-attribute captions, `scenes.FACTOR_VALUES` order
  relevant: np.ndarray  # bool [N, 26]: the object has the attribute
  single_type: np.ndarray  # [5, N, L] each object's caption naming one type (FACTORS order)
  by_count: np.ndarray  # [5, N, L] each object's caption of a random subset of k + 1 types


def make_test(split: scenes.Split, context_length: int) -> TestSet:
  things = [s[0] for s in split.scenes]
  n = len(things)
  rng = np.random.default_rng([TEST_SEED, 29])  # the subsets of `by_count`
  by_count = []
  for k in range(1, len(FACTORS) + 1):
    named = rng.random((n, len(FACTORS))).argsort(1)[:, :k]
    subsets = [SUBSETS.index(tuple(FACTORS[i] for i in sorted(row))) for row in named]
    by_count.append(caption_tokens(things, subsets, context_length))
  return TestSet(
    split.images,
    labels_of(things),
    caption_tokens(things, [FULL] * n, context_length),
    np.stack([caption_ids(caption({f: v}, (f,)), context_length) for f, v in scenes.FACTOR_VALUES]),
    np.array([[t.value(f) == v for f, v in scenes.FACTOR_VALUES] for t in things]),
    np.stack([caption_tokens(things, [SUBSETS.index((f,))] * n, context_length) for f in FACTORS]),
    np.stack(by_count),
  )


def score(encode_image, encode_text, test: TestSet, text_masks=None) -> dict:
  """Every measure of one model, from unnormalised embedding functions; with `text_masks`
  (SmartCLIP) the mask measures too."""
  img = retrieval.normalize(encode_image(test.images))
  out = dci_scores(img, test.labels)
  probe = probe_accuracy(img, test.labels)
  out["probe_acc"] = float(probe.mean())
  out.update({f"probe_acc_{f}": float(a) for f, a in zip(FACTORS, probe)})
  attributes = retrieval.normalize(encode_text(test.attributes))
  precision = 100 * precision_at(img @ attributes.T, test.relevant)
  factor = np.array([f for f, _ in scenes.FACTOR_VALUES])
  by_factor = {f: float(precision[factor == f].mean()) for f in FACTORS}
  out["attr_p20"] = float(np.mean(list(by_factor.values())))
  # above chance (1 / the factor's values) as a share of what is left above it: 0 for a model
  # that retrieves at random, which raw precision puts at 26 %
  chance = {f: 100 / len(scenes.VALUES[f]) for f in FACTORS}
  out["attr_lift"] = float(
    np.mean([100 * (by_factor[f] - chance[f]) / (100 - chance[f]) for f in FACTORS])
  )
  out.update({f"attr_p20_{f}": p for f, p in by_factor.items()})
  # A hit is an item that describes the same object: single-object scenes repeat objects.
  sims = img @ retrieval.normalize(encode_text(test.full)).T
  same = (test.labels[:, None] == test.labels[None]).all(-1)
  rows = np.arange(len(sims))
  out["full_i2t_r1"] = 100 * float(same[rows, sims.argmax(1)].mean())
  out["full_t2i_r1"] = 100 * float(same[sims.argmax(0), rows].mean())
  if text_masks is not None:
    out.update(mask_scores(text_masks, test))
  return out


def mask_scores(text_masks, test: TestSet) -> dict:
  """Per factor type, the dimensions on in at least half of its single-type captions' masks;
  the Jaccard matrix of those sets, its mean off the diagonal, colour against shape; and the
  mean number of dimensions on by number of types named."""
  types, n, length = test.single_type.shape
  on = text_masks(test.single_type.reshape(-1, length)).reshape(types, n, -1) > 0.5
  jaccard = planted.jaccard(on.mean(1) >= 0.5)
  out = {
    "mask_jaccard": float(jaccard[np.triu_indices(types, 1)].mean()),
    "colour_shape_jaccard": float(jaccard[FACTORS.index("colour"), FACTORS.index("shape")]),
    "mask_type_jaccard": jaccard.tolist(),
    "mask_type_dims": (on.mean(1) >= 0.5).sum(1).tolist(),
  }
  for k, tokens in enumerate(test.by_count, 1):
    out[f"mask_dims_{k}"] = float((text_masks(tokens) > 0.5).sum(1).mean())
  return out


# ---- runs ----


@dataclasses.dataclass
class Data:
  """Every split a run reads, generated once per process."""

  train: scenes.Split
  pretrain: scenes.Split
  test: TestSet


def context_length(sizes: Sizes) -> int:
  return partial_captions.base(sizes).model.text.context_length


def make_data(sizes: Sizes) -> Data:
  size = partial_captions.base(sizes).model.vision.image_size
  split = lambda n, seed, name: scenes.make_split(n, size, seed, name, ONE_OBJECT)
  return Data(
    split(sizes.train, 0, "train"),
    split(sizes.pretrain, 0, "pretrain"),
    make_test(split(sizes.test, TEST_SEED, "test"), context_length(sizes)),
  )


_PROCESS: dict[str, Any] = {}  # this process's sizes, Data and Trainer (`start_process`)


def start_process(sizes: Sizes, cores: Any = None) -> None:
  """Makes this process ready to run tasks (`pin_to_core` for a pool worker)."""
  if cores is not None:
    pin_to_core(cores)
  configure = lambda method: partial_captions.method_config(method, sizes, METHODS)
  _PROCESS.update(sizes=sizes, data=make_data(sizes), trainer=Trainer(configure))


def run_task(
  seed: int, start: str, variety: str, method: str, pretrained: Any = None
) -> tuple[dict, Any]:
  """One training run and its scores, in a process readied by `start_process`; `start` is
  "pretrained" for a seed's base CLIP (full captions of the pretrain split). Returns (its
  record, the towers of a pretrained run or None)."""
  sizes, data, trainer = _PROCESS["sizes"], _PROCESS["data"], _PROCESS["trainer"]
  t0 = time.perf_counter()
  if start == "pretrained":
    split, steps = data.pretrain, sizes.pretrain_steps
  else:
    split, steps = data.train, sizes.steps
  index, tokens = schedule(split, steps, sizes.batch, variety, seed, context_length(sizes))
  parts, params, loss = trainer.train(method, seed, split, index, tokens, pretrained)
  t1 = time.perf_counter()
  masks = parts.batched("text_masks", params) if parts.config.model.mask_net else None
  scores = score(*parts.encoders(params), data.test, masks)
  t2 = time.perf_counter()
  record = {
    "setting": start if start == "pretrained" else f"{start}/{variety}",
    "start": start,
    "variety": variety,
    "method": method,
    "seed": seed,
    "loss": loss,
    **scores,
    "train_seconds": t1 - t0,
    "score_seconds": t2 - t1,
    "seconds": t2 - t0,
  }
  towers = {k: params[k] for k in ("visual", "text")} if start == "pretrained" else None
  return record, towers


def cells(
  starts: Sequence[str], varieties: Sequence[str], methods: Sequence[str]
) -> list[tuple[str, str, str]]:
  """Every (start, variety, method) run of a seed, `ONLY` kept to its one cell."""
  return [
    (s, v, m) for s in starts for v in varieties for m in methods if ONLY.get(m, (s, v)) == (s, v)
  ]


def run(
  out: pathlib.Path,
  sizes: Sizes,
  seeds: Sequence[int] = SEEDS,
  methods: Sequence[str] = tuple(METHODS),
  starts: Sequence[str] = STARTS,
  varieties: Sequence[str] = tuple(VARIETIES),
  workers: int = 1,
) -> dict:
  """Every run on `workers` processes; a seed's fine-tuning runs start when its base CLIP is
  trained. Writes the outputs to `out`."""
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  todo = cells(starts, varieties, methods)
  finetune = "finetune" in starts
  total = len(seeds) * (len(todo) + finetune)
  runs: list[dict] = []
  log.info("%d runs on %d process(es); %s", total, workers, sizes)
  with executor(workers, start_process, sizes) as pool:
    submit = runner.tracked(pool, total, start, runs, _brief)
    pretraining = {s: submit(run_task, s, "pretrained", "V1", "clip") for s in seeds if finetune}
    jobs = [submit(run_task, seed, s, v, m) for seed in seeds for s, v, m in todo if s == "scratch"]
    for seed, future in pretraining.items():
      towers = future.result()[1]
      jobs += [submit(run_task, seed, s, v, m, towers) for s, v, m in todo if s == "finetune"]
    for job in futures.as_completed(jobs):
      job.result()  # a failed run stops the experiment with its error
  order = ["pretrained", *(f"{s}/{v}" for s in starts for v in varieties)]
  rank = {m: i for i, m in enumerate(methods)}
  runs.sort(key=lambda r: (order.index(r["setting"]), rank[r["method"]], r["seed"]))
  base = [r["attr_lift"] for r in runs if r["setting"] == "pretrained"]
  if base and not BASE_RANGE[0] <= np.mean(base) <= BASE_RANGE[1]:
    log.warning(
      "the base CLIP's attribute precision@%d above chance is %.1f %%, outside the design's %s",
      TOP,
      np.mean(base),
      BASE_RANGE,
    )
  results = {
    "sizes": dataclasses.asdict(sizes),
    "seeds": list(seeds),
    "methods": {m: METHODS[m] for m in methods},
    "only": ONLY,
    "starts": list(starts),
    "varieties": {v: VARIETIES[v] for v in varieties},
    "settings": order,
    "test_seed": TEST_SEED,
    "rotations": ROTATIONS,
    "ridge": RIDGE,
    "top": TOP,
    "base_range": BASE_RANGE,
    "workers": workers,
    "runs": runs,
    "summary": partial_captions.summarize(runs, METRICS),
    "paired": paired(runs, order),
  }
  return runner.finish(out, results, start, write_outputs)


def paired(runs: list[dict], settings: Sequence[str], metric: str = MAIN) -> list[dict]:
  """Per setting, each other method minus CLIP on `metric`, paired by seed: the differences,
  their mean, sample std and t statistic (df = seeds − 1)."""
  value = {(r["setting"], r["method"], r["seed"]): r[metric] for r in runs}
  methods = list(dict.fromkeys(r["method"] for r in runs))
  out = []
  for setting, method in itertools.product(settings, methods):
    seeds = sorted(
      s for (st, m, s) in value if (st, m) == (setting, method) and (setting, "clip", s) in value
    )
    if method == "clip" or not seeds:
      continue
    d = np.array([value[(setting, method, s)] - value[(setting, "clip", s)] for s in seeds])
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    t = float(d.mean() / (sd / math.sqrt(len(d)))) if sd > 0 else float("nan")
    out.append(
      {
        "setting": setting,
        "comparison": f"{method} − clip",
        "metric": metric,
        "seeds": seeds,
        "differences": d.tolist(),
        "mean": float(d.mean()),
        "sd": sd,
        "t": t,
      }
    )
  return out


# ---- outputs ----

COLUMNS = {  # table column: (metric, format)
  "ΔDCI": (MAIN, ".3f"),
  "DCI": ("dci", ".3f"),
  "DCI rotated": ("dci_rotated", ".3f"),
  "probe acc %": ("probe_acc", ".1f"),
  f"attr P@{TOP} %": ("attr_p20", ".1f"),
  "attr above chance %": ("attr_lift", ".1f"),
  "full R@1 I→T %": ("full_i2t_r1", ".1f"),
  "full R@1 T→I %": ("full_t2i_r1", ".1f"),
  "mask type Jaccard": ("mask_jaccard", ".3f"),
  "colour–shape Jaccard": ("colour_shape_jaccard", ".3f"),
}


def _cell(metrics: dict, metric: str, fmt: str) -> str:
  if metric not in metrics:
    return "–"
  mean, std = metrics[metric]
  return f"{mean:{fmt}} ± {std:{fmt}}"


def _rows(summary: dict, columns: dict[str, tuple[str, str]]) -> list[str]:
  """Markdown table rows: one per setting and method of `summary`, the `columns`' cells."""
  lines = [
    "| setting | method | " + " | ".join(columns) + " |",
    "|---" * (len(columns) + 2) + "|",
  ]
  for setting, by_method in summary.items():
    for method, metrics in by_method.items():
      cells = " | ".join(_cell(metrics, m, fmt) for m, fmt in columns.values())
      lines.append(f"| {setting} | {method} | {cells} |")
  return lines


def table(results: dict) -> str:
  summary, seeds = results["summary"], results["seeds"]
  lines = [
    f"Mean ± std over seeds {seeds}; test split of {results['sizes']['test']} single-object "
    f"scenes. ΔDCI = DCI − DCI after a random rotation (mean of {results['rotations']}). "
    "`pretrained`: the base CLIP each seed's fine-tuning starts from.",
    "",
    *_rows(summary, COLUMNS),
  ]
  base = summary.get("pretrained", {}).get("clip")
  if base:
    low, high = results["base_range"]
    inside = low <= base["attr_lift"][0] <= high
    lines += [
      "",
      f"Base CLIP attribute precision@{results['top']}: {base['attr_p20'][0]:.1f} %, "
      f"{base['attr_lift'][0]:.1f} % above chance ({'within' if inside else 'OUTSIDE'} the "
      f"design's {low:.0f}–{high:.0f} %).",
    ]
  lines += [
    "",
    "### Paired differences of ΔDCI, by seed",
    "",
    "| setting | comparison | per seed | mean | std (n − 1) | t (df = n − 1) |",
    "|---|---|---|---|---|---|",
  ]
  for p in results["paired"]:
    per_seed = ", ".join(f"{d:+.3f}" for d in p["differences"])
    lines.append(
      f"| {p['setting']} | {p['comparison']} | {per_seed} | {p['mean']:+.3f} | {p['sd']:.3f} | "
      f"{p['t']:.2f} |"
    )
  per_factor = {
    **{f"probe {f} %": (f"probe_acc_{f}", ".1f") for f in FACTORS},
    **{f"P@{TOP} {f} %": (f"attr_p20_{f}", ".1f") for f in FACTORS},
  }
  masks = {f"{k} named": (f"mask_dims_{k}", ".1f") for k in range(1, len(FACTORS) + 1)}
  with_masks = {
    setting: {m: v for m, v in by_method.items() if "mask_dims_1" in v}
    for setting, by_method in summary.items()
  }
  lines += [
    "",
    "### Per factor: probe accuracy and attribute precision",
    "",
    *_rows(summary, per_factor),
    "",
    "### Mask dimensions on (of 64), by number of factor types named",
    "",
    *_rows({s: by_method for s, by_method in with_masks.items() if by_method}, masks),
  ]
  return "\n".join(lines) + "\n"


def write_outputs(out: pathlib.Path, results: dict) -> None:
  """table.md and the figures, from what results.json holds."""
  (out / "table.md").write_text(table(results))
  _dci_figure(out / "dci.png", results)
  _attribute_figure(out / "attribute_retrieval.png", results)
  first = results["seeds"][0]
  shown = [
    r
    for r in results["runs"]
    if (r["setting"], r["method"], r["seed"]) == ("scratch/V31", "smartclip", first)
  ]
  if shown:
    figures.overlap(
      out / "mask_types.png",
      np.asarray(shown[0]["mask_type_jaccard"]),
      FACTORS,
      f"smartclip, scratch, V31, seed {first}: Jaccard of the types' masks",
    )


def _dci_figure(path: pathlib.Path, results: dict) -> pathlib.Path:
  """ΔDCI by variety, a panel per start, a line per method (its mean) over its seeds' points."""
  starts, varieties, methods = results["starts"], list(results["varieties"]), results["methods"]
  fig, axes = plt.subplots(1, len(starts), figsize=(5.5 * len(starts), 4), squeeze=False)
  for ax, start in zip(axes[0], starts):
    for j, method in enumerate(methods):
      shift = (j - (len(methods) - 1) / 2) * 0.06
      xs, means = [], []
      for i, variety in enumerate(varieties):
        got = [
          r[MAIN]
          for r in results["runs"]
          if (r["setting"], r["method"]) == (f"{start}/{variety}", method)
        ]
        if got:
          ax.scatter([i + shift] * len(got), got, s=12, alpha=0.5, color=f"C{j}")
          xs.append(i + shift)
          means.append(np.mean(got))
      ax.plot(xs, means, marker="o", color=f"C{j}", label=method)
    ax.axhline(0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(varieties)), varieties)
    ax.set_xlabel("caption variety (subsets per image)")
    ax.set_title(start)
    ax.legend(fontsize=7)
  axes[0, 0].set_ylabel("ΔDCI = DCI − DCI(rotated); points: seeds")
  return figures._save(fig, path)


def _attribute_figure(path: pathlib.Path, results: dict) -> pathlib.Path:
  """Attribute precision@20 per factor and their mean, a panel per start and variety, a bar per
  method (mean ± std over seeds); the base CLIP among the fine-tuned panels' bars."""
  summary, starts, varieties = results["summary"], results["starts"], list(results["varieties"])
  keys = [*(f"attr_p20_{f}" for f in FACTORS), "attr_p20"]
  fig, axes = plt.subplots(
    len(starts), len(varieties), figsize=(4.5 * len(varieties), 3.2 * len(starts)), squeeze=False
  )
  for (i, start), (j, variety) in itertools.product(enumerate(starts), enumerate(varieties)):
    ax, bars = axes[i, j], dict(summary.get(f"{start}/{variety}", {}))
    if start == "finetune" and "pretrained" in summary:
      bars = {"base CLIP": summary["pretrained"]["clip"], **bars}
    width = 0.8 / max(len(bars), 1)
    for k, (name, metrics) in enumerate(bars.items()):
      mean, std = zip(*(metrics[m] for m in keys))
      ax.bar(np.arange(len(keys)) + k * width, mean, width, yerr=std, capsize=2, label=name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [*FACTORS, "mean"], fontsize=7)
    ax.set_ylim(0, 118)
    ax.set_title(f"{start}, {variety}")
    ax.legend(fontsize=6, ncol=2, loc="upper center")
  for ax in axes[:, 0]:
    ax.set_ylabel(f"precision@{TOP} (%)")
  return figures._save(fig, path)


def _brief(record: dict) -> str:
  return (
    f"ΔDCI {record[MAIN]:.3f} (DCI {record['dci']:.3f}, rotated {record['dci_rotated']:.3f}) "
    f"probe {record['probe_acc']:.1f} P@{TOP} {record['attr_p20']:.1f} "
    f"R@1 {record['full_i2t_r1']:.1f}/{record['full_t2i_r1']:.1f}"
    + (f" J {record['mask_jaccard']:.2f}" if "mask_jaccard" in record else "")
  )


def main(argv: Sequence[str] | None = None) -> None:
  experiment_main(argv, sys.modules[__name__])


if __name__ == "__main__":
  main()
