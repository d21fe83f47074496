"""Evaluation sets read from tiny files in each published format, written here."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from smartclip_jax.evals import datasets


def write_image(path, value: int = 128, size=(8, 6)):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.new("RGB", size, (value, value, value)).save(path)
  return os.path.abspath(path)


def write_json(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))
  return str(path)


def test_coco_keeps_five_captions_and_counts_what_it_leaves_out(tmp_path, monkeypatch):
  a = write_image(tmp_path / "val2017" / "000000000001.jpg")
  b = write_image(tmp_path / "val2017" / "000000000002.jpg")
  write_image(tmp_path / "val2017" / "000000000004.jpg")
  seven = [f"Image one, caption {k}." for k in range(7)]
  # Annotation ids fall as the file goes on: the first five are the file's, not the lowest ids.
  annotations = [{"id": 90 - k, "image_id": 1, "caption": c} for k, c in enumerate(seven[:3])]
  annotations += [
    {"id": 20, "image_id": 2, "caption": " A cat on a mat.\n"},
    {"id": 21, "image_id": 2, "caption": "   "},
    {"id": 22, "image_id": 3, "caption": "Its file is gone."},
    {"id": 23, "image_id": 99, "caption": "No such image."},
  ]
  annotations += [{"id": 50 - k, "image_id": 1, "caption": c} for k, c in enumerate(seven[3:])]
  write_json(
    tmp_path / "annotations" / "captions_val2017.json",
    {
      "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3, 4)],
      "annotations": annotations,
    },
  )
  monkeypatch.chdir(tmp_path / "annotations")
  got = datasets.load_retrieval("coco", "captions_val2017.json")  # images in ../val2017
  assert got.name == "coco" and got.images == [a, b]
  assert got.captions == seven[:5] + ["A cat on a mat."]
  assert got.text_to_image.dtype == np.int64
  assert got.text_to_image.tolist() == [0] * 5 + [1]
  # The sixth and seventh captions are the protocol's, not a record left out.
  assert got.skipped == {"empty_caption": 1, "missing_file": 1, "no_caption": 1, "unknown_image": 1}
  assert len(got.examples) == 4
  assert any("000000000003.jpg" in e for e in got.examples)
  assert any("image 4" in e and e.startswith("no_caption") for e in got.examples)


def karpathy_images(with_filepath: bool):
  images = []
  for i, split in enumerate(["train", "test", "val", "restval", "test"]):
    image = {
      "filename": f"im{i}.jpg",
      "split": split,
      "imgid": i,
      "sentences": [{"raw": f"Image {i} sentence {k}.", "tokens": []} for k in range(5)],
    }
    if with_filepath:
      image["filepath"] = "val2014" if split != "train" else "train2014"
    images.append(image)
  return images


def test_karpathy_coco_reads_only_the_test_split(tmp_path):
  for i in range(5):
    write_image(tmp_path / "coco" / ("train2014" if i == 0 else "val2014") / f"im{i}.jpg")
  path = write_json(
    tmp_path / "dataset_coco.json", {"images": karpathy_images(True), "dataset": "coco"}
  )
  got = datasets.load_retrieval("coco_karpathy", path, str(tmp_path / "coco"))
  assert got.images == [
    os.path.abspath(tmp_path / "coco" / "val2014" / f"im{i}.jpg") for i in (1, 4)
  ]
  assert got.captions == [f"Image {i} sentence {k}." for i in (1, 4) for k in range(5)]
  assert got.text_to_image.tolist() == [0] * 5 + [1] * 5
  assert got.skipped == {}


def test_karpathy_flickr_takes_images_from_the_root(tmp_path):
  write_image(tmp_path / "im1.jpg")  # im4.jpg is missing
  path = write_json(
    tmp_path / "dataset_flickr30k.json", {"images": karpathy_images(False), "dataset": "flickr30k"}
  )
  got = datasets.load_retrieval("flickr30k", path)  # root defaults to the JSON's folder
  assert got.images == [os.path.abspath(tmp_path / "im1.jpg")]
  assert got.captions == [f"Image 1 sentence {k}." for k in range(5)]
  assert got.skipped == {"missing_file": 1}
  assert got.examples == [f"missing_file: {tmp_path / 'im4.jpg'}"]


def test_karpathy_coco_keeps_the_first_five_sentences(tmp_path):
  write_image(tmp_path / "val2014" / "im0.jpg")
  seven = [{"raw": f"Sentence {k}.", "tokens": []} for k in range(7)]
  path = write_json(
    tmp_path / "dataset_coco.json",
    {
      "images": [
        {"filename": "im0.jpg", "filepath": "val2014", "split": "test", "sentences": seven}
      ]
    },
  )
  got = datasets.load_retrieval("coco_karpathy", path)
  assert got.captions == [f"Sentence {k}." for k in range(5)]
  assert got.text_to_image.tolist() == [0] * 5 and got.skipped == {}


def write_token_file(path, lines):
  """Flickr30k's `results_20130124.token`: `<image>#<k>\t<caption>` per line."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def test_flickr30k_full_reads_every_image_and_caption(tmp_path):
  b = write_image(tmp_path / "flickr30k-images" / "200.jpg")
  a = write_image(tmp_path / "flickr30k-images" / "100.jpg")
  path = write_token_file(
    tmp_path / "results_20130124.token",
    [
      "200.jpg#1\tB one .",
      "100.jpg#0\tTwo young guys with shaggy hair look at their hands .",
      "200.jpg#0\tB zero .",
      "",
      "300.jpg#0 no tab between the key and the caption .",
      "100.jpg#4\tA four .",
      "300.jpg\tno index .",
      "100.jpg#1\tA one\twith a tab inside .",
      "300.jpg#x\tan index that is not an integer .",
      "999.jpg#0\tIts image is missing .",
      "100.jpg#2\t   ",
      "100.jpg#3\tA three .",
      "200.jpg#10\tB ten .",
    ],
  )
  got = datasets.load_retrieval("flickr30k_full", path)  # images in ./flickr30k-images
  assert got.name == "flickr30k_full"
  assert got.images == [b, a]  # in order of first appearance, not by name
  assert got.captions == [
    "B zero .",
    "B one .",
    "B ten .",
    "Two young guys with shaggy hair look at their hands .",
    "A one\twith a tab inside .",
    "A three .",
    "A four .",
  ]
  assert got.text_to_image.dtype == np.int64
  assert got.text_to_image.tolist() == [0, 0, 0, 1, 1, 1, 1]
  assert got.skipped == {"malformed_line": 3, "missing_file": 1, "empty_caption": 1}
  malformed = [e for e in got.examples if e.startswith("malformed_line: ")]
  assert [e.split(" is not ")[0] for e in malformed] == [
    "malformed_line: line 5",
    "malformed_line: line 7",
    "malformed_line: line 9",
  ]
  assert "no tab between" in malformed[0]
  assert f"missing_file: {tmp_path / 'flickr30k-images' / '999.jpg'}" in got.examples


def test_flickr30k_full_image_dir_and_repeated_captions(tmp_path):
  (tmp_path / "flickr30k-images").mkdir()  # the default, empty: the given dir must be used
  image = write_image(tmp_path / "photos" / "1.jpg")
  path = write_token_file(
    tmp_path / "ann" / "results_20130124.token",
    [
      "1.jpg#0\tFirst .",
      "1.jpg#-1\tA negative index .",
      "1.jpg#0\tFirst again .",
      "#1\tNo image name .",
    ],
  )
  got = datasets.load_retrieval("flickr30k_full", path, str(tmp_path / "photos"))
  assert got.images == [image] and got.captions == ["First ."]
  assert got.skipped == {"malformed_line": 2, "duplicate_caption": 1}
  with pytest.raises(ValueError, match="no usable flickr30k_full image"):
    datasets.load_retrieval("flickr30k_full", path)  # default: ann/flickr30k-images, absent


def test_flickr30k_full_rejects_a_file_that_is_not_one(tmp_path):
  binary = tmp_path / "results_20130124.token"
  binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
  with pytest.raises(ValueError, match=f"cannot read annotation file {binary}"):
    datasets.load_retrieval("flickr30k_full", str(binary))
  blank = tmp_path / "blank.token"
  blank.write_text("\n  \n")
  with pytest.raises(ValueError, match=f"{blank} is not a Flickr30k .*it is empty"):
    datasets.load_retrieval("flickr30k_full", str(blank))
  karpathy = write_json(tmp_path / "dataset_flickr30k.json", {"images": karpathy_images(False)})
  with pytest.raises(ValueError, match="is not a Flickr30k .*line 1 is not <image>#<k>"):
    datasets.load_retrieval("flickr30k_full", karpathy)


def test_urban1k_counts_orphan_images_and_captions(tmp_path):
  a = write_image(tmp_path / "image" / "a.jpg")
  c = write_image(tmp_path / "image" / "c.jpg")
  write_image(tmp_path / "image" / "b.jpg")  # no caption file
  (tmp_path / "caption").mkdir()
  (tmp_path / "caption" / "a.txt").write_text("A long street at dusk. Cars wait.\nsecond line\n")
  (tmp_path / "caption" / "c.txt").write_text("A market square.")
  (tmp_path / "caption" / "d.txt").write_text("An image that is not there.")
  got = datasets.load_retrieval("urban1k", str(tmp_path))
  assert got.images == [a, c]
  assert got.captions == ["A long street at dusk. Cars wait.", "A market square."]
  assert got.text_to_image.tolist() == [0, 1]
  assert got.skipped == {"no_caption": 1, "missing_file": 1}
  assert got.examples == [
    f"no_caption: {tmp_path / 'image' / 'b.jpg'} has no caption file",
    f"missing_file: {tmp_path / 'image' / 'd.jpg'}",
  ]


def test_sharegpt4v_1k_is_the_held_out_first_thousand(tmp_path):
  records = []
  for i in range(1003):
    turns = [{"from": "human", "value": "<image>\nDescribe it."}]
    if i != 1:
      turns.append({"from": "gpt", "value": f"Record {i}. A long description."})
    records.append({"id": f"r{i}", "image": f"sam/{i}.jpg", "conversations": turns})
  for i in (0, 1, 999, 1000, 1001):
    write_image(tmp_path / "images" / "sam" / f"{i}.jpg")
  path = write_json(tmp_path / "share-captioner.json", records)
  got = datasets.load_retrieval("sharegpt4v_1k", path, str(tmp_path / "images"))
  assert got.images == [os.path.abspath(tmp_path / "images" / "sam" / f"{i}.jpg") for i in (0, 999)]
  assert got.captions == ["Record 0. A long description.", "Record 999. A long description."]
  assert got.skipped == {"missing_file": 997, "no_caption": 1}
  assert len(got.examples) == datasets.MAX_EXAMPLES


def test_dci_pairs_each_photo_with_its_extended_caption(tmp_path):
  root = tmp_path / "densely_captioned_images"
  photo = write_image(root / "photos" / "sa_1.jpg")
  mask = {
    "0": {
      "label": "a dog",
      "caption": "Brown, sitting.",
      "idx": 0,
      "parent": -1,
      "requirements": [],
      "mask_quality": 0,
    }
  }
  write_json(
    root / "annotations" / "sa_1.json",
    {
      "image": "sa_1.jpg",
      "short_caption": "A dog in a park.",
      "extra_caption": "The grass is wet. A bench stands behind.",
      "mask_data": mask,
      "mask_keys": ["0"],
    },
  )
  write_json(
    root / "annotations" / "sa_2.json",
    {
      "image": "sa_2.jpg",
      "short_caption": "Gone.",
      "extra_caption": "",
      "mask_data": {},
      "mask_keys": [],
    },
  )
  got = datasets.load_retrieval("dci", str(root))
  assert got.images == [photo]
  assert got.captions == ["A dog in a park.\nThe grass is wet. A bench stands behind."]
  assert got.skipped == {"missing_file": 1}


def test_docci_reads_the_test_records(tmp_path):
  for name in ("test_01.jpg", "train_01.jpg", "qual_test_01.jpg"):
    write_image(tmp_path / "images" / name)
  lines = [
    {
      "example_id": "train_01",
      "split": "train",
      "image_file": "train_01.jpg",
      "description": "Train.",
    },
    {
      "example_id": "test_01",
      "split": "test",
      "image_file": "test_01.jpg",
      "description": "A red mug on a desk. Light comes from the left.",
    },
    {
      "example_id": "qual_test_01",
      "split": "qual_test",
      "image_file": "qual_test_01.jpg",
      "description": "Qual.",
    },
    {
      "example_id": "test_02",
      "split": "test",
      "image_file": "test_02.jpg",
      "description": "Missing.",
    },
  ]
  path = tmp_path / "docci_descriptions.jsonlines"
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
  got = datasets.load_retrieval("docci", str(path))
  assert got.images == [os.path.abspath(tmp_path / "images" / "test_01.jpg")]
  assert got.captions == ["A red mug on a desk. Light comes from the left."]
  assert got.text_to_image.tolist() == [0]
  assert got.skipped == {"missing_file": 1}


@pytest.mark.parametrize(
  "task,name",
  [
    ("coco", "captions_val2017.json"),
    ("coco_karpathy", "dataset_coco.json"),
    ("flickr30k", "dataset_flickr30k.json"),
    ("flickr30k_full", "results_20130124.token"),
    ("sharegpt4v_1k", "share-captioner.json"),
    ("docci", "docci_descriptions.jsonlines"),
  ],
)
@pytest.mark.parametrize("content", ["", "{not json", '{"unexpected": []}', "[1, 2]", None])
def test_bad_annotation_files_name_the_file(tmp_path, task, name, content):
  path = tmp_path / name
  if content is not None:  # None: the file does not exist
    path.write_text(content)
  with pytest.raises(ValueError, match=str(path)):
    datasets.load_retrieval(task, str(path))


def test_bad_annotation_folders_name_the_file(tmp_path):
  with pytest.raises(ValueError, match="image/ and caption/"):
    datasets.load_retrieval("urban1k", str(tmp_path))
  with pytest.raises(ValueError, match="annotations/"):
    datasets.load_retrieval("dci", str(tmp_path))
  (tmp_path / "annotations").mkdir()
  (tmp_path / "annotations" / "sa_7.json").write_text('{"image": "sa_7.jpg"}')
  with pytest.raises(ValueError, match="sa_7.json is not a DCI annotation file"):
    datasets.load_retrieval("dci", str(tmp_path))
  docci = tmp_path / "docci_descriptions.jsonlines"
  docci.write_text('{"split": "train"}\n{oops\n')
  with pytest.raises(ValueError, match=f"{docci}, line 2"):
    datasets.load_retrieval("docci", str(docci))


def test_a_set_with_nothing_usable_is_an_error(tmp_path):
  images = [image for image in karpathy_images(False) if image["split"] != "test"]
  path = write_json(tmp_path / "dataset_flickr30k.json", {"images": images})
  with pytest.raises(ValueError, match="no usable flickr30k image"):
    datasets.load_retrieval("flickr30k", path)
  with pytest.raises(ValueError, match="unknown retrieval task"):
    datasets.load_retrieval("coco2014", path)
  assert set(datasets.RETRIEVAL_TASKS) == {
    "coco",
    "coco_karpathy",
    "flickr30k",
    "flickr30k_full",
    "urban1k",
    "sharegpt4v_1k",
    "dci",
    "docci",
  }


def test_folder_zero_shot(tmp_path):
  dog = [write_image(tmp_path / "golden_retriever" / f"{i}.png") for i in range(2)]
  cat = write_image(tmp_path / "cat" / "sub" / "0.jpg")
  write_image(tmp_path / ".cache" / "x.jpg")
  (tmp_path / "cat" / "notes.txt").write_text("not an image")
  got = datasets.load_classification("folder", str(tmp_path))
  assert got.classnames == ["cat", "golden retriever"]
  assert got.images == [cat] + dog
  assert got.labels.dtype == np.int64 and got.labels.tolist() == [0, 1, 1]
  assert got.templates[0] == "a photo of a {}."
  with pytest.raises(ValueError, match="one subfolder of images per class"):
    datasets.load_classification("folder", str(tmp_path / "cat" / "sub"))


# Real synset ids and their indices among the 1,000 sorted ones (tench 0, goldfish 1, ...).
TENCH, GOLDFISH, TOILET_TISSUE = "n01440764", "n01443537", "n15075141"


def test_an_imagenet_folder_of_synsets_uses_openais_class_names_and_templates(tmp_path):
  fish = write_image(tmp_path / GOLDFISH / "ILSVRC2012_val_00000002.JPEG")
  roll = write_image(tmp_path / TOILET_TISSUE / "ILSVRC2012_val_00000001.JPEG")
  (tmp_path / "LOC_synset_mapping.txt").write_text("not a class folder")
  got = datasets.load_classification("imagenet", str(tmp_path))
  assert got.images == [fish, roll] and got.labels.tolist() == [1, 999]
  assert len(got.classnames) == 1000 and got.classnames[1] == "goldfish"
  assert got.classnames[999] == "toilet paper"
  assert len(got.templates) == 80 and got.templates[0] == "a bad photo of a {}."


def test_a_flat_imagenet_folder_is_labelled_by_the_devkit(tmp_path):
  import scipy.io

  images = [write_image(tmp_path / f"ILSVRC2012_val_{n:08d}.JPEG") for n in (1, 2, 3)]
  data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
  data.mkdir(parents=True)
  # The devkit numbers classes its own way (not by sorted wnid); 1001+ are inner nodes.
  synsets = np.array(
    [(7, GOLDFISH), (3, TENCH), (500, TOILET_TISSUE), (1001, "n00001740")],
    dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")],
  )
  scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
  (data / datasets.DEVKIT_LABELS).write_text("3\n500\n7\n")
  got = datasets.load_classification("imagenet", str(tmp_path))
  assert got.images == images and got.labels.tolist() == [0, 999, 1]
  with pytest.raises(ValueError, match="synset folders .* or flat"):
    datasets.load_classification("imagenet", str(data))


def test_tfds_cifar10_zero_shot_mocked():
  """CIFAR-10 through `tfds.data_source`, mocked: the labels come from a pass that skips image
  decoding (the mock returns bytes there), the images from the decoding source."""
  import tensorflow_datasets as tfds

  pixels = [np.full((32, 32, 3), 10 * i, np.uint8) for i in range(4)]
  labels = [3, 9, 0, 3]
  calls = []

  def as_data_source(builder, split, decoders=None, **kwargs):
    calls.append((builder.name, split, decoders))
    skip = decoders is not None and isinstance(decoders["image"], tfds.decode.SkipDecoding)
    return [
      {
        "id": f"test_{i}",
        "image": b"\xff\xd8 not decoded" if skip else pixels[i],
        "label": np.int64(labels[i]),
      }
      for i in range(4)
    ]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    got = datasets.load_classification("cifar10")
    assert got.name == "cifar10" and len(got.images) == 4
    assert got.labels.dtype == np.int64 and got.labels.tolist() == labels
    assert [image[0, 0, 0] for image in got.images] == [0, 10, 20, 30]
    assert got.images[-1].shape == (32, 32, 3)
  assert [(name, split) for name, split, _ in calls] == [("cifar10", "test")] * 2
  assert got.classnames[:3] == ["airplane", "automobile", "bird"] and len(got.classnames) == 10
  assert len(got.templates) == 80 and got.templates[0] == "a bad photo of a {}."
  with pytest.raises(IndexError):
    got.images[4]


def test_tfds_by_name_reads_a_prepared_array_record_set(tmp_path):
  """Any TFDS classification set: class names from its `label` feature, labels without decoding,
  images (here grayscale) decoded to uint8 [H, W, 3] on access."""
  import io

  import tensorflow_datasets as tfds

  def png(value: int) -> bytes:
    out = io.BytesIO()
    PIL.Image.new("L", (5, 4), value).save(out, format="PNG")
    return out.getvalue()

  class EvalTinyClasses(tfds.core.GeneratorBasedBuilder):  # registered as "eval_tiny_classes"
    VERSION = tfds.core.Version("1.0.0")
    # No checksums to look up beside the code (TFDS would need importlib_resources to look).
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(names=["red_fox", "cat", "sea_lion"]),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, label in enumerate([2, 0, 1, 2, 1]):
        yield i, {"image": png(40 + 50 * label), "label": label}

  EvalTinyClasses(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  got = datasets.load_classification("tfds:eval_tiny_classes", str(tmp_path))
  assert got.name == "eval_tiny_classes"
  assert got.classnames == ["red fox", "cat", "sea lion"]
  assert sorted(got.labels.tolist()) == [0, 1, 1, 2, 2]
  for image, label in zip(got.images, got.labels):  # TFDS shuffles the order on writing
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    assert (image == 40 + 50 * label).all()
  with pytest.raises(ValueError, match="unknown classification task"):
    datasets.load_classification("mnist")


def test_imagenet_not_prepared_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build imagenet2012 --manual_dir="):
    datasets.load_classification("imagenet2012", str(tmp_path))


def test_class_name_and_template_files():
  def lines(name):
    return (datasets.ZEROSHOT_DIR / name).read_text(encoding="utf-8").splitlines()

  imagenet, templates = lines("imagenet_classes.txt"), lines("imagenet_templates.txt")
  assert len(imagenet) == 1000 and imagenet[:2] == ["tench", "goldfish"]
  assert imagenet[-1] == "toilet paper"
  assert len(templates) == 80 and templates[0] == "a bad photo of a {}."
  cifar10, cifar100 = lines("cifar10_classes.txt"), lines("cifar100_classes.txt")
  assert len(cifar10) == 10 and cifar10[0] == "airplane" and cifar10[-1] == "truck"
  assert len(cifar100) == 100 and cifar100[:2] == ["apple", "aquarium fish"]
  assert cifar100[-1] == "worm" and "_" not in "".join(cifar100)
  generic = lines("generic_templates.txt")
  for template in templates + generic:
    assert template.count("{}") == 1, template
  assert all(name.strip() == name and name for name in imagenet + cifar10 + cifar100)
