"""The evaluation sets of the paper's protocol, read from the files their authors publish.

A retrieval set is image paths, every caption, and the image each caption describes; a
classification set is images, labels, class names and prompt templates. Nothing is decoded
here: an image file is only checked to exist, and a TFDS image is decoded when it is indexed.
A record that cannot be used is left out and counted per reason, with examples, never dropped
silently: a score on a quietly shrunken set is not comparable with a published one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from smartclip_jax import config as config_lib
from smartclip_jax.data.sources import IMAGE_SUFFIXES, sharegpt4v_entries

RETRIEVAL_TASKS = (
  "coco",
  "coco_karpathy",
  "flickr30k",
  "flickr30k_full",
  "urban1k",
  "sharegpt4v_1k",
  "dci",
  "docci",
)
# Class-name and prompt lists (see assets/README.md for where each comes from).
ZEROSHOT_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "zeroshot"
# Captions per COCO image in the paper's protocol (25,000 for 5,000 images); a few images have 6
# or 7, and the ones past the fifth are not evaluated.
COCO_CAPTIONS = 5
MAX_EXAMPLES = 5
# TFDS sets whose class names are OpenAI's/the data set's readable ones, not TFDS's ids.
_TFDS_CLASSNAMES = {
  "cifar10": "cifar10_classes.txt",
  "cifar100": "cifar100_classes.txt",
  "imagenet2012": "imagenet_classes.txt",
}


@dataclasses.dataclass
class RetrievalSet:
  """A retrieval benchmark: caption i describes image `text_to_image[i]`."""

  name: str
  images: list[str]  # absolute image file paths, one per image
  captions: list[str]  # every evaluated caption, flattened
  text_to_image: np.ndarray  # int64 [len(captions)]: the image index of each caption
  skipped: dict[str, int]  # reason -> count of records left out
  examples: list[str]  # up to MAX_EXAMPLES readable examples of what was left out


@dataclasses.dataclass
class ClassificationSet:
  """A zero-shot classification benchmark."""

  name: str
  images: Sequence  # file paths, or uint8 [H, W, 3] arrays (from TFDS)
  labels: np.ndarray  # int64 [N]
  classnames: list[str]
  templates: list[str]  # prompt templates with "{}" for the class name


def load_retrieval(task: str, path: str, image_root: str = "") -> RetrievalSet:
  """The retrieval benchmark `task` (one of RETRIEVAL_TASKS) from its annotations at `path`.

  Images are looked up under `image_root`, which defaults to where each data set's archive
  puts them. An annotation file that is missing, empty, not JSON or not in the task's format
  raises a ValueError naming it, as does a set left with no usable image.
  """
  loaders = {
    "coco": _coco,
    "coco_karpathy": _karpathy,
    "flickr30k": _karpathy,
    "flickr30k_full": _flickr30k_full,
    "urban1k": _urban1k,
    "sharegpt4v_1k": _sharegpt4v_1k,
    "dci": _dci,
    "docci": _docci,
  }
  if task not in loaders:
    raise ValueError(f"unknown retrieval task {task!r}; choose one of {RETRIEVAL_TASKS}")
  out = _Collector(task, path)
  with _format_errors(path, f"a {task} annotation file"):
    loaders[task](out, pathlib.Path(os.path.abspath(path)), image_root)
  return out.result()


class _Collector:
  """Gathers (image, captions) pairs, leaving out and counting what retrieval cannot use.

  An image is left out when its file is missing (`missing_file`) or it has no non-blank caption
  (`no_caption`); a blank caption of an image that has others is left out alone
  (`empty_caption`). Everything left out is counted once, under one reason.
  """

  def __init__(self, task: str, source: str):
    self.task, self.source = task, source
    self.images: list[str] = []
    self.captions: list[str] = []
    self.text_to_image: list[int] = []
    self.skipped: collections.Counter = collections.Counter()
    self.examples: list[str] = []

  def skip(self, reason: str, detail: str) -> None:
    self.skipped[reason] += 1
    if len(self.examples) < MAX_EXAMPLES:
      self.examples.append(f"{reason}: {detail}")

  def add(self, image: pathlib.Path, captions: Iterable[str | None], record: str) -> None:
    if not image.is_file():
      self.skip("missing_file", str(image))
      return
    captions = [(caption or "").strip() for caption in captions]
    kept = [caption for caption in captions if caption]
    if not kept:
      self.skip("no_caption", f"{record} has no caption")
      return
    for _ in range(len(captions) - len(kept)):
      self.skip("empty_caption", f"a blank caption of {record}")
    self.text_to_image += [len(self.images)] * len(kept)
    self.images.append(os.path.abspath(image))
    self.captions += kept

  def result(self) -> RetrievalSet:
    if not self.images:
      why = (
        f"left out: {dict(self.skipped)}, e.g. {self.examples}"
        if self.skipped
        else "it lists no image of the evaluated split"
      )
      raise ValueError(f"{self.source}: no usable {self.task} image ({why})")
    return RetrievalSet(
      self.task,
      self.images,
      self.captions,
      np.asarray(self.text_to_image, np.int64),
      dict(self.skipped),
      self.examples,
    )


def _coco(out: _Collector, path: pathlib.Path, image_root: str) -> None:
  """COCO 2017 `captions_val2017.json`: the first five captions of each image in annotation
  order, as the paper measured (25,000 for 5,000 images; the sixth and seventh that a few images
  have are left out by the protocol, not counted in `skipped`). A blank one among the five is
  counted, not replaced by a sixth. Images default to `val2017/` beside the `annotations/`
  folder."""
  data = _read_json(path)
  root = pathlib.Path(image_root) if image_root else path.parent.parent / "val2017"
  captions = {image["id"]: [] for image in data["images"]}
  for annotation in data["annotations"]:
    if annotation["image_id"] in captions:
      captions[annotation["image_id"]].append(annotation["caption"])
    else:
      out.skip(
        "unknown_image",
        f"caption {annotation.get('id')} is of image "
        f"{annotation['image_id']}, which the file does not list",
      )
  for image in data["images"]:
    out.add(
      root / image["file_name"], captions[image["id"]][:COCO_CAPTIONS], f"image {image['id']}"
    )


def _karpathy(out: _Collector, path: pathlib.Path, image_root: str) -> None:
  """Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`: the `test` split only (5,000
  COCO or 1,000 Flickr30k images, each with its `sentences`). A COCO image keeps its first five
  sentences, as `coco` does (a few of Karpathy's have 6 or 7; the rest are left out by the
  protocol, not counted in `skipped`); a Flickr30k image has exactly five. A COCO image lies
  under its `filepath` (`val2014/`), a Flickr30k one directly under the root, by default the
  JSON's folder."""
  data = _read_json(path)
  root = pathlib.Path(image_root or path.parent)
  for image in data["images"]:
    if image["split"] != "test":
      continue
    file = (
      pathlib.Path(image["filepath"], image["filename"])
      if out.task == "coco_karpathy"
      else pathlib.Path(image["filename"])
    )
    sentences = [sentence["raw"] for sentence in image["sentences"]]
    if out.task == "coco_karpathy":
      sentences = sentences[:COCO_CAPTIONS]
    out.add(root / file, sentences, image["filename"])


def _flickr30k_full(out: _Collector, path: pathlib.Path, image_root: str) -> None:
  """Flickr30k's own `results_20130124.token`, whole, as the paper measured Flickr30k: every
  image and caption (31,783 images, 158,915 captions), not Karpathy's 1k test split.

  Each line is `<image file>#<k><TAB><caption>`. Images come in order of first appearance, each
  with its captions ordered by `k`; blank lines are ignored. A line not of that form is counted
  as `malformed_line`, a repeated `<image file>#<k>` as `duplicate_caption` (the first is
  kept). Images default to `flickr30k-images/` beside the file, as the archive unpacks.
  """
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, ValueError) as e:  # ValueError: not UTF-8
    raise ValueError(f"cannot read annotation file {path}: {e}") from e
  root = pathlib.Path(image_root) if image_root else path.parent / "flickr30k-images"
  captions: dict[str, dict[int, str]] = {}
  first_malformed = ""
  for number, line in enumerate(lines, 1):
    line = line.rstrip("\n")
    if not line.strip():
      continue
    key, tab, caption = line.partition("\t")
    name, _, index = key.strip().rpartition("#")
    if not (tab and name and index.isascii() and index.isdigit()):
      detail = f"line {number} is not <image>#<k><tab><caption>: {line[:100]!r}"
      first_malformed = first_malformed or detail
      out.skip("malformed_line", detail)
      continue
    by_index = captions.setdefault(name, {})
    if int(index) in by_index:
      out.skip("duplicate_caption", f"line {number} repeats {key.strip()}")
      continue
    by_index[int(index)] = caption
  if not captions:  # a wrong file, not a set with nothing usable
    raise ValueError(
      f"{path} is not a Flickr30k results_20130124.token file ({first_malformed or 'it is empty'})"
    )
  for name, by_index in captions.items():
    out.add(root / name, [by_index[k] for k in sorted(by_index)], name)


def _urban1k(out: _Collector, path: pathlib.Path, image_root: str) -> None:
  """Urban1k: `path/image/<stem>.jpg` and `path/caption/<stem>.txt`, one caption per image (the
  file's first line, as Long-CLIP reads it). An image without a caption file is left out as
  `no_caption`, a caption without an image as `missing_file`."""
  image_dir = pathlib.Path(image_root) if image_root else path / "image"
  caption_dir = path / "caption"
  if not image_dir.is_dir() or not caption_dir.is_dir():
    raise ValueError(f"{path}: expected Urban1k's image/ and caption/ folders")
  images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
  captions = {p.stem: p for p in caption_dir.glob("*.txt")}
  for stem in sorted(images.keys() | captions.keys()):
    if stem not in captions:
      out.skip("no_caption", f"{images[stem]} has no caption file")
      continue
    try:
      lines = captions[stem].read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
      out.skip("invalid_text", f"{captions[stem]}: {e}")
      continue
    out.add(images.get(stem, image_dir / f"{stem}.jpg"), lines[:1], captions[stem].name)


def _sharegpt4v_1k(out: _Collector, path: pathlib.Path, image_root: str) -> None:
  """ShareGPT4V-1k: the first 1,000 records of the ShareGPT4V captioner JSON, parsed as training
  parses it, so that the set is exactly the one training holds out. Images default to the
  JSON's folder."""
  try:
    entries, root = sharegpt4v_entries(path)
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
    raise ValueError(f"cannot read annotation file {path}: {e}") from e
  root = pathlib.Path(image_root) if image_root else root
  for record_id, image, caption in entries[: config_lib.SHAREGPT4V_HOLDOUT]:
    out.add(root / image, [caption], f"record {record_id}")


def _dci(out: _Collector, path: pathlib.Path, image_root: str) -> None:
  """DCI, `path` = its `densely_captioned_images/` folder: one JSON per image in `annotations/`,
  naming the photo in `image`; photos default to `photos/`.

  The caption is DCI's own "extended caption", `short_caption` + newline + `extra_caption`:
  the annotator's description of the whole image, which is what long-caption retrieval on DCI
  (LoTLIP and the Long-CLIP follow-ups) pairs with each of the 7,805 images. The per-mask
  captions in `mask_data` are left out: they describe crops, not the image.
  """
  annotation_dir = path / "annotations"
  if not annotation_dir.is_dir():
    raise ValueError(f"{path}: expected DCI's annotations/ folder")
  root = pathlib.Path(image_root) if image_root else path / "photos"
  for file in sorted(annotation_dir.glob("*.json")):
    with _format_errors(file, "a DCI annotation file"):
      annotation = _read_json(file)
      caption = f"{annotation['short_caption']}\n{annotation['extra_caption']}"
      out.add(root / annotation["image"], [caption], file.name)


def _docci(out: _Collector, path: pathlib.Path, image_root: str) -> None:
  """DOCCI `docci_descriptions.jsonlines`: the 5,000 `test` records, one long `description` per
  `image_file`. Images default to `images/` beside the file."""
  root = pathlib.Path(image_root) if image_root else path.parent / "images"
  for record in _read_jsonl(path):
    if record["split"] == "test":
      out.add(root / record["image_file"], [record["description"]], record["image_file"])


def _read_json(path: pathlib.Path) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
    raise ValueError(f"cannot read annotation file {path}: {e}") from e


def _read_jsonl(path: pathlib.Path) -> Iterator[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read annotation file {path}: {e}") from e
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        yield json.loads(line)
      except ValueError as e:
        raise ValueError(f"{path}, line {number}: not JSON ({e})") from e


@contextlib.contextmanager
def _format_errors(path: str | pathlib.Path, what: str) -> Iterator[None]:
  """A record without an expected field means the file is not what it should be: say which."""
  try:
    yield
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path} is not {what} ({type(e).__name__}: {e})") from e


def load_classification(task: str, path: str = "", split: str = "test") -> ClassificationSet:
  """The zero-shot set `task`: `folder`, `imagenet`, `cifar10`, `cifar100`, `imagenet2012` or
  `tfds:<name>`.

  `folder`: `path` holds one subfolder of images per class, named after it (`_` for spaces),
  prompted with the short generic templates. `imagenet`: an ImageNet validation folder
  (`_imagenet_folder`), with OpenAI's class names and 80 templates. The others are read from
  TFDS (`path` = its data_dir, default TFDS's) and prompted with OpenAI's 80 ImageNet
  templates, as Long-CLIP does for CIFAR too. ImageNet's `test` split has no labels, so
  `test` reads `validation`.
  """
  if task == "folder":
    return _folder(pathlib.Path(path))
  if task == "imagenet":
    return _imagenet_folder(pathlib.Path(path))
  if task in _TFDS_CLASSNAMES:
    name, classnames = task, _lines(_TFDS_CLASSNAMES[task])
  elif task.startswith("tfds:"):
    name, classnames = task.removeprefix("tfds:"), None
  else:
    raise ValueError(
      f"unknown classification task {task!r}; choose folder, imagenet, cifar10, cifar100, "
      "imagenet2012 or tfds:<name>"
    )
  if name == "imagenet2012" and split == "test":
    split = "validation"
  return _tfds(name, path, split, classnames)


def _folder(root: pathlib.Path) -> ClassificationSet:
  classes = (
    sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if root.is_dir()
    else []
  )
  if not classes:
    raise ValueError(f"{root}: expected one subfolder of images per class")
  images, labels = [], []
  for label, folder in enumerate(classes):
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
      images.append(os.path.abspath(image))
      labels.append(label)
  if not images:
    raise ValueError(f"{root}: its class folders hold no images")
  return ClassificationSet(
    root.name,
    images,
    np.asarray(labels, np.int64),
    [folder.name.replace("_", " ") for folder in classes],
    _lines("generic_templates.txt"),
  )


DEVKIT_LABELS = "ILSVRC2012_validation_ground_truth.txt"


def _imagenet_folder(root: pathlib.Path) -> ClassificationSet:
  """ImageNet-1k validation images laid out as `root/<wnid>/*.JPEG` (synset subfolders, some
  or all of the 1,000), or flat (`root/ILSVRC2012_val_*.JPEG`) with the devkit beside them:
  its `ILSVRC2012_validation_ground_truth.txt` (a devkit ID per image, in file-name order)
  and `meta.mat` (ID to wnid), found anywhere under `root`. Classes are indexed as the
  1,000 wnids sorted (the order of OpenAI's class names), whatever the folder holds."""
  wnids = _lines("imagenet_wnids.txt")
  index = {w: i for i, w in enumerate(wnids)}
  listed = sorted(root.iterdir()) if root.is_dir() else []
  folders = [p for p in listed if p.is_dir() and p.name in index]
  images, labels = [], []
  for folder in folders:
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
      images.append(os.path.abspath(image))
      labels.append(index[folder.name])
  if not folders:
    truth = next(root.rglob(DEVKIT_LABELS), None) if root.is_dir() else None
    meta = next(root.rglob("meta.mat"), None) if truth else None
    flat = sorted(p for p in root.glob("ILSVRC2012_val_*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not (truth and meta and flat):
      raise ValueError(
        f"{root}: expected ImageNet validation images in synset folders (<wnid>/*.JPEG) or "
        f"flat (ILSVRC2012_val_*.JPEG) with the devkit's {DEVKIT_LABELS} and meta.mat"
      )
    ids = [int(line) for line in truth.read_text().split()]
    by_id = _devkit_wnids(meta)
    numbered = {int(p.stem.rsplit("_", 1)[1]): p for p in flat}  # ILSVRC2012_val_00000001
    for n, image in sorted(numbered.items()):
      if not 1 <= n <= len(ids):
        raise ValueError(f"{image} has no line in {truth} ({len(ids)} labels)")
      images.append(os.path.abspath(image))
      labels.append(index[by_id[ids[n - 1]]])
  if not images:
    raise ValueError(f"{root}: its synset folders hold no images")
  return ClassificationSet(
    "imagenet",
    images,
    np.asarray(labels, np.int64),
    _lines("imagenet_classes.txt"),
    _lines("imagenet_templates.txt"),
  )


def _devkit_wnids(meta: pathlib.Path) -> dict[int, str]:
  """The devkit's `meta.mat`: ILSVRC2012_ID -> WNID of the 1,000 leaf classes."""
  import scipy.io

  synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
  return {
    int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["ILSVRC2012_ID"]) <= 1000
  }


def _tfds(name: str, data_dir: str, split: str, classnames: list[str] | None) -> ClassificationSet:
  import tensorflow_datasets as tfds  # deferred: heavy, and only these sets need it

  data_dir = data_dir or None
  builder = tfds.builder(name, data_dir=data_dir)
  features = builder.info.features
  if not {"image", "label"} <= set(features.keys()):
    raise ValueError(f"TFDS {name} has no `image` and `label` features: not a classification set")
  if name == "imagenet2012" and not builder.is_prepared():
    raise FileNotFoundError(
      f"imagenet2012 is not prepared under {builder.data_dir}. TFDS cannot download it: put "
      "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in a folder, "
      "run `tfds build imagenet2012 --manual_dir=<that folder> --data_dir=<data dir> "
      "--file_format=array_record`, and pass the data dir as `path`"
    )
  images = tfds.data_source(name, split=split, data_dir=data_dir)
  # Labels without decoding a single image (ImageNet's 50,000 would take minutes).
  encoded = tfds.data_source(
    name, split=split, data_dir=data_dir, decoders={"image": tfds.decode.SkipDecoding()}
  )
  labels = np.asarray([example["label"] for example in encoded], np.int64)
  if classnames is None:
    classnames = [label.replace("_", " ") for label in features["label"].names]
  if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
    raise ValueError(
      f"TFDS {name}/{split} has labels outside 0..{len(classnames) - 1}; is it an unlabelled split?"
    )
  return ClassificationSet(
    name, _TfdsImages(images), labels, classnames, _lines("imagenet_templates.txt")
  )


class _TfdsImages(Sequence):
  """A TFDS split's images as uint8 [H, W, 3], decoded when indexed: ImageNet's validation
  set decoded at once would take tens of GB."""

  def __init__(self, source: Sequence):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> np.ndarray:
    if not -len(self) <= index < len(self):
      raise IndexError(f"image {index} of {len(self)}")
    image = np.asarray(self.source[index % len(self)]["image"])
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _lines(name: str) -> list[str]:
  return (ZEROSHOT_DIR / name).read_text(encoding="utf-8").splitlines()
