"""Real-format sources, bad-record handling and the prepare round trip, on files written here."""

import csv
import io
import json
import struct
import tarfile
import zlib

import numpy as np
import PIL.Image
import pytest

from smartclip_jax.data import decode, pipeline, prepare, sources
from tests.test_faults import featurize


def image_bytes(mode: str = "RGB", size=(40, 30), fmt: str = "JPEG", seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
  pixels = np.repeat(np.repeat(pixels[::8, ::8], 8, 0), 8, 1)[: size[1], : size[0]]  # blocky
  image = PIL.Image.fromarray(pixels)
  if mode == "P":
    image = image.quantize(16)
    image.info["transparency"] = 0
  elif mode != "RGB":
    image = image.convert(mode)
  out = io.BytesIO()
  image.save(out, format=fmt)
  return out.getvalue()


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
  """A PNG whose header claims width x height: no pixel data needs to exist to reject it."""
  data = bytearray(image_bytes(size=(8, 8), fmt="PNG"))
  ihdr = bytearray(data[16:29])
  ihdr[0:8] = struct.pack(">II", width, height)
  data[16:29] = ihdr
  data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
  return bytes(data)


GOOD = {  # name -> (bytes, caption)
  "rgb.jpg": (image_bytes(), "A red fox. It jumps over a log."),
  "gray.png": (image_bytes("L", fmt="PNG", seed=1), "A grey cat."),
  "cmyk.jpg": (image_bytes("CMYK", seed=2), "A printed poster."),
  "palette.png": (image_bytes("P", fmt="PNG", seed=3), "A pixel-art tree."),
  "alpha.png": (image_bytes("RGBA", fmt="PNG", seed=4), "A logo. On white."),
  "photo.webp": (image_bytes(fmt="WEBP", seed=5), "A bird in flight."),
}
BAD = {  # name -> (bytes or None for a missing file, caption, reason)
  "truncated.jpg": (image_bytes(size=(64, 64), seed=6)[:300], "Cut off.", "undecodable_image"),
  "empty.jpg": (b"", "Nothing here.", "undecodable_image"),
  "missing.jpg": (None, "Gone.", "missing_file"),
  "nocaption.jpg": (image_bytes(seed=7), "   ", "empty_caption"),
  "badtext.jpg": (image_bytes(seed=8), b"caf\xe9 \xff", "invalid_text"),
  "tiny.png": (image_bytes(size=(1, 1), fmt="PNG"), "A dot.", "too_small"),
  "huge.png": (huge_png_header(), "A giant.", "too_large"),
}


@pytest.fixture
def folder(tmp_path):
  """An image folder with one .txt caption per image, good and bad records mixed."""
  for name, (data, caption) in GOOD.items():
    (tmp_path / name).write_bytes(data)
    (tmp_path / name).with_suffix(".txt").write_text(caption)
  for name, (data, caption, _) in BAD.items():
    if data is not None:
      (tmp_path / name).write_bytes(data)
    raw = caption if isinstance(caption, bytes) else caption.encode()
    (tmp_path / name).with_suffix(".txt").write_bytes(raw)
  return tmp_path


def test_decode_converts_every_mode_to_rgb():
  for name, (data, _) in GOOD.items():
    image = decode.decode_image(data, min_side=4, max_pixels=10**8)
    assert image.mode == "RGB" and image.size == (40, 30), name
  alpha = np.asarray(decode.decode_image(image_bytes("RGBA", fmt="PNG"), 4, 10**8))
  assert alpha.shape == (30, 40, 3)


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_record_gets_its_reason(name):
  data, caption, reason = BAD[name]
  record = (
    {"id": name, "error": "missing_file"}
    if data is None
    else {"id": name, "image": data, "caption": caption}
  )
  out = featurize(
    record,
    caption_mode="prefix",
    image_size=16,
    context_length=32,
    transform="random_resized_crop",
    min_side=8,
  )
  assert out["error"] == reason, out


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (40, 40), (25, 25), (301, 202)])
def test_training_and_eval_images_get_the_reference_transform(size):
  """By default a training image goes through evaluation's transform (the reference trains
  with it): torchvision's Resize + CenterCrop + Normalize, written out in PyTorch."""
  pytest.importorskip("torch", reason="needs requirements-torch.txt")
  from tests.torch_reference import clip_transform

  pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), np.uint8)
  want = clip_transform(PIL.Image.fromarray(pixels), 24).permute(1, 2, 0).numpy()
  for train in (True, False):
    record = {"id": "x", "image": pixels, "caption": "A cat. A dog."}
    out = featurize(record, train=train, caption_mode="prefix", image_size=24, min_side=8)
    np.testing.assert_allclose(out["image"], want, atol=1e-5)


def test_folder_sources_in_every_caption_format(folder):
  entries, root = sources.folder_entries(folder)
  by_id = {e[0]: e for e in entries}
  assert set(by_id) == set(GOOD) | set(BAD) - {"missing.jpg"} | {"missing"}
  assert (
    sources.FileListSource(entries, root, "t")[list(by_id).index("missing")]["error"]
    == "missing_file"
  )
  rows = [(name, caption) for name, (_, caption) in GOOD.items()]
  with open(folder / "captions.csv", "w", newline="") as f:
    csv.writer(f).writerows([("filepath", "title"), *rows])
  with open(folder / "captions.tsv", "w", newline="") as f:
    csv.writer(f, delimiter="\t").writerows([("path", "text"), *rows])
  (folder / "captions.jsonl").write_text(
    "\n".join(json.dumps({"image": n, "caption": c}) for n, c in rows)
  )
  for path, keys in (
    ("captions.csv", ()),
    ("captions.tsv", ("path", "text")),
    ("captions.jsonl", ()),
  ):
    entries, root = sources.folder_entries(folder / path, *keys)
    source = sources.FileListSource(entries, root, "test")
    got = {e[1]: e[2] for e in entries}
    assert got == dict(rows), path
    assert source[0]["image"] == GOOD["rgb.jpg"][0]
  with pytest.raises(ValueError, match="no column"):
    sources.folder_entries(folder / "captions.tsv")


def test_sharegpt4v_json_holds_out_the_first_records(tmp_path, monkeypatch):
  items = [
    {
      "id": f"img{i}",
      "image": f"sub/{i}.jpg",
      "conversations": [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": f"Caption {i}. More."},
      ],
    }
    for i in range(12)
  ]
  (tmp_path / "sub").mkdir()
  for i in range(12):
    (tmp_path / "sub" / f"{i}.jpg").write_bytes(image_bytes(seed=i))
  (tmp_path / "share.json").write_text(json.dumps(items))
  train = sources.sharegpt4v_source(str(tmp_path / "share.json"), str(tmp_path), "train", 5)
  held = sources.sharegpt4v_source(str(tmp_path / "share.json"), str(tmp_path), "eval", 5)
  assert (len(train), len(held)) == (7, 5)
  assert train[0]["id"] == "img5" and train[0]["caption"] == "Caption 5. More."
  assert held[4]["image"] == image_bytes(seed=4)
  # With no image_root, every source reads images beside its data file, wherever the run starts.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  beside = sources.sharegpt4v_source(str(tmp_path / "share.json"), "", "train", 5)
  assert beside[0]["image"] == image_bytes(seed=5) and "error" not in beside[0]
  out = tmp_path / "prepared"
  prepare.main(
    ["--format", "sharegpt4v", "--input", str(tmp_path / "share.json")]
    + ["--out", str(out), "--holdout", "5", "--workers", "1"]
  )
  assert json.loads((out / "summary.json").read_text())["written"] == 12


def test_pipeline_replaces_and_counts_bad_records_in_full_batches(folder, demo_config):
  # A caption list names every record, the missing file included; raw bytes keep bad UTF-8.
  lines = [b"filepath\ttitle"]
  for name, (_, caption, *_) in {**GOOD, **BAD}.items():
    lines.append(
      name.encode() + b"\t" + (caption if isinstance(caption, bytes) else caption.encode())
    )
  (folder / "all.tsv").write_bytes(b"\n".join(lines) + b"\n")
  demo_config.data.update(name="folder", path=str(folder / "all.tsv"), eval_path=str(folder))
  demo_config.batch_size = 2
  it = pipeline.train_iterator(demo_config)
  halves = [pipeline.train_iterator(demo_config, p, 2) for p in range(2)]
  stats = pipeline.DataStats()
  for _ in range(9):  # 18 good records: three epochs of the 6 good ones
    batch = next(it)
    assert batch["image"].shape[0] == 2
    stats.update(batch)
    parts = [next(h) for h in halves]  # replacements depend on the step only, not the process
    for key in ("image", "skipped"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  used, skipped = stats.totals()
  assert used == 18
  want = {r: 0 for r in decode.REASONS}
  for _, _, reason in BAD.values():
    want[reason] += 1
  # 18 stream positions cover the first epoch (13 records), so every bad record was met at least
  # once; a bad one was replaced by the record of its slot in a later epoch, maybe bad again.
  counted = dict(zip(decode.REASONS, skipped))
  assert all(want[r] <= counted[r] for r in decode.REASONS), counted
  assert stats.examples and ":" in stats.examples[0]
  with pytest.raises(pipeline.DataError, match="could not be used.*for example"):
    stats.check(max_fraction=0.05, min_seen=10)
  stats.check(max_fraction=0.9, min_seen=10)


def test_prepare_round_trip_keeps_captions_and_pixels(folder, tmp_path, demo_config):
  out = tmp_path / "shards"
  entries, root = sources.folder_entries(folder)
  summary = prepare.prepare(
    entries,
    str(root),
    out,
    holdout=0,
    num_shards=3,
    encoding=prepare.Encoding(max_side=512, min_side=8, max_pixels=10**8, quality=95),
    workers=2,
    progress=False,
  )
  assert summary["written"] == len(GOOD)
  want = {r: 0 for r in decode.REASONS}
  for _, _, reason in BAD.values():
    want[reason] += 1
  assert summary["skipped"] == want
  assert json.loads((out / "summary.json").read_text())["written"] == len(GOOD)
  source = sources.ArrayRecordSource(str(out / "train"))
  records = {r["id"]: r for r in (source[i] for i in range(len(source)))}
  assert set(records) == set(GOOD)
  for name, (data, caption) in GOOD.items():
    assert records[name]["caption"] == caption
    want_px = np.asarray(decode.decode_image(data, 1, 10**8), np.float32)
    got_px = np.asarray(decode.decode_image(records[name]["image"], 1, 10**8), np.float32)
    # JPEG at quality 95 with 4:2:0 chroma, on random colour blocks (its worst case).
    assert np.abs(got_px - want_px).mean() < 10, name
  # A rerun finds every shard done and rewrites nothing.
  stamps = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.array_record")}
  prepare.prepare(
    entries,
    str(root),
    out,
    holdout=0,
    num_shards=3,
    encoding=prepare.Encoding(max_side=512, min_side=8, max_pixels=10**8, quality=95),
    workers=1,
    progress=False,
  )
  assert stamps == {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.array_record")}
  # ...and the shards train: the pipeline reads them like any source.
  demo_config.data.update(
    name="array_record", path=str(out / "train"), eval_path=str(out / "train")
  )
  demo_config.batch_size = 2
  assert next(pipeline.train_iterator(demo_config))["tokens"].shape == (2, 32)


def test_prepare_resumes_an_interrupted_run(folder, tmp_path):
  out = tmp_path / "shards"
  entries, root = sources.folder_entries(folder)
  kwargs = dict(
    holdout=0,
    num_shards=4,
    encoding=prepare.Encoding(max_side=64, min_side=8, max_pixels=10**8, quality=90),
    workers=1,
    progress=False,
  )
  first = prepare.prepare(entries, str(root), out, **kwargs)
  # Interrupted: one shard never finished (no summary), another left a partial .tmp.
  shards = sorted((out / "train").glob("*.array_record"))
  (shards[1].parent / (shards[1].name + ".json")).unlink()
  shards[1].rename(str(shards[1]) + ".tmp")
  untouched = shards[2].stat().st_mtime_ns
  second = prepare.prepare(entries, str(root), out, **kwargs)
  assert second == first
  assert shards[1].exists() and shards[2].stat().st_mtime_ns == untouched


def test_tfds_source_through_the_pipeline(demo_config):
  """A TFDS data set read by `tfds.data_source`, with TFDS's mock examples (no download)."""
  import tensorflow_datasets as tfds

  class TinyCaptions(tfds.core.GeneratorBasedBuilder):  # registered as "tiny_captions"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      raise NotImplementedError("mock data only")

    def _generate_examples(self):
      raise NotImplementedError("mock data only")

  del TinyCaptions
  demo_config.data.update(name="tfds", path="tiny_captions")
  demo_config.data.tfds.train_split = "train"
  demo_config.data.min_image_side = 1
  demo_config.batch_size = 4
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.make_source(demo_config, "train")
    record = source[3]
    assert len(source) == 12 and record["image"].ndim == 3 and record["id"].endswith("/3")
    assert len(record["caption"]) >= 1
    batch = next(pipeline.train_iterator(demo_config))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["tokens"].shape == (4, 32)
  assert (batch["tokens"][:, 0] == 49406).all()


def write_tar(path, members, cut=None):
  """A tar of (name, bytes) members, as img2dataset writes them; `cut` keeps that many bytes."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  path.write_bytes(buffer.getvalue()[:cut])


def test_prepare_reads_webdataset_shards_and_counts_every_bad_sample(tmp_path):
  def sample(key, seed, txt=None, meta=None, image=True):
    out = [(f"{key}.jpg", image_bytes(seed=seed))] if image else []
    out += [(f"{key}.txt", txt.encode())] if txt is not None else []
    out += [(f"{key}.json", json.dumps(meta).encode())] if meta is not None else []
    return out

  shards = tmp_path / "shards"
  shards.mkdir()
  write_tar(
    shards / "00000.tar",
    sample("00000001", 1, "A red fox.", {"recaption": "A red fox jumps. Over a log."})
    + sample("00000002", 2, None, {"recaption": "Only recaptioned."})  # no .txt
    + sample("00000003", 3, "No picture.", image=False)
    + [("00000004.jpg", b"not a jpeg"), ("00000004.txt", b"Broken.")],
  )
  whole = sample("00000005", 5, "A grey cat.") + sample("00000006", 6, "A tree.")
  write_tar(shards / "00001.tar", whole)
  with tarfile.open(shards / "00001.tar") as tar:
    last = tar.getmembers()[-1]  # 00000006.txt: the copy is cut one byte into its data
  write_tar(shards / "00002.tar", whole, cut=last.offset_data + 1)
  out = tmp_path / "out"
  argv = ["--format", "webdataset", "--input", str(shards / "{00000..00003}.tar")]
  summary = prepare.main(argv + ["--out", str(out), "--workers", "2"])
  assert summary["shards"] == 3 and summary["written"] == 1 + 2 + 1
  assert {k: v for k, v in summary["skipped"].items() if v} == {
    "no_caption": 1,
    "no_image": 1,
    "undecodable_image": 1,
    "truncated_archive": 1,
  }
  source = sources.ArrayRecordSource(str(out / "train"))
  captions = {source[i]["id"]: source[i]["caption"] for i in range(len(source))}
  assert captions["00000001"] == "A red fox." and captions["00000006"] == "A tree."
  # A recaptioned set: the caption is a field of the .json; a rerun redoes nothing.
  again = prepare.main(
    argv[:3]
    + [str(shards / "0000[0-1].tar"), "--out", str(tmp_path / "re")]
    + ["--caption-key", "recaption", "--workers", "1"]
  )
  source = sources.ArrayRecordSource(str(tmp_path / "re" / "train"))
  captions = {source[i]["id"]: source[i]["caption"] for i in range(len(source))}
  assert captions == {"00000001": "A red fox jumps. Over a log.", "00000002": "Only recaptioned."}
  assert again["skipped"]["no_caption"] == 3  # 00000004 and both samples of 00001.tar
  (tmp_path / "re" / "summary.json").unlink()
  assert (
    prepare.main(
      argv[:3]
      + [str(shards / "0000[0-1].tar"), "--out", str(tmp_path / "re")]
      + ["--caption-key", "recaption"]
    )["written"]
    == again["written"]
  )


def test_prepare_names_a_pattern_that_matches_nothing(tmp_path, capsys):
  with pytest.raises(SystemExit):
    prepare.main(
      ["--format", "webdataset", "--input", str(tmp_path / "{0..3}.tar")]
      + ["--out", str(tmp_path / "out")]
    )
  assert "no file matches" in capsys.readouterr().err


def test_prepare_reads_img2dataset_parquet_and_refuses_a_list_of_urls(tmp_path, capsys):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rows = {
    "key": ["000000001", "000000002", "000000003", "000000004"],
    "url": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg", "http://a/4.jpg"],
    "caption": ["A red fox.", "A grey cat.", None, "Failed download."],
    "jpg": [image_bytes(seed=1), image_bytes(seed=2), image_bytes(seed=3), None],
    "status": ["success", "success", "success", "failed_to_download"],
  }
  files = tmp_path / "parquet"
  files.mkdir()
  pq.write_table(pa.table(rows), files / "00000.parquet")
  good = (files / "00000.parquet").read_bytes()
  (files / "00001.parquet").write_bytes(good[: len(good) // 2])  # cut off: unreadable
  out = tmp_path / "out"
  summary = prepare.main(
    ["--format", "parquet", "--input", str(files / "*.parquet"), "--out", str(out)]
  )
  assert summary["written"] == 2
  assert {k: v for k, v in summary["skipped"].items() if v} == {
    "no_caption": 1,
    "no_image": 1,
    "truncated_archive": 1,
  }
  source = sources.ArrayRecordSource(str(out / "train"))
  assert {source[i]["id"]: source[i]["caption"] for i in range(2)} == {
    "000000001": "A red fox.",
    "000000002": "A grey cat.",
  }
  pq.write_table(pa.table({k: rows[k] for k in ("url", "caption")}), tmp_path / "urls.parquet")
  with pytest.raises(SystemExit):
    prepare.main(
      ["--format", "parquet", "--input", str(tmp_path / "urls.parquet")]
      + ["--out", str(tmp_path / "none")]
    )
  assert "lists image URLs; download them first" in capsys.readouterr().err


def _records(shards) -> dict:
  source = sources.ArrayRecordSource(str(shards))
  return {r["id"]: (r["caption"], r["image"]) for r in (source[i] for i in range(len(source)))}


def test_prepare_split_over_processes_writes_each_shard_once(folder, tmp_path):
  """Two parts of one prepare (`--process-index 0|1 --process-count 2`, as two hosts would run
  it) write the same shards as one process: each part its own, a rerun of a part nothing, and
  only the part that finds every shard done the summary."""
  argv = ["--format", "folder", "--input", str(folder), "--num-shards", "4", "--workers", "1"]
  whole = prepare.main(argv + ["--out", str(tmp_path / "one")])
  split = tmp_path / "two"
  first = prepare.main(argv + ["--out", str(split), "--process-index", "0", "--process-count", "2"])
  assert first["complete"] is False and first["shards_done"] == 2
  assert not (split / "summary.json").exists()
  assert sorted(p.name[:11] for p in (split / "train").glob("*.array_record")) == [
    "shard-00000",
    "shard-00002",
  ]
  second = prepare.main(
    argv + ["--out", str(split), "--process-index", "1", "--process-count", "2"]
  )
  assert second == json.loads((split / "summary.json").read_text())
  assert second | {"splits": None} == whole | {"splits": None}
  assert _records(split / "train") == _records(tmp_path / "one" / "train")
  with pytest.raises(SystemExit):
    prepare.main(argv + ["--out", str(split), "--process-index", "2", "--process-count", "2"])


def test_prepare_reads_from_and_writes_to_a_bucket(folder, tmp_path, gcs):
  """WebDataset tars and a caption folder in gs://, shards and summary written to gs://, by two
  parts: the shards hold what a local prepare of the same files writes, and a rerun redoes
  nothing."""
  from etils import epath

  tars = tmp_path / "tars"
  tars.mkdir()
  for k in range(3):
    members = []
    for j in range(2):
      members += [(f"{k}{j}.jpg", image_bytes(seed=10 * k + j)), (f"{k}{j}.txt", b"A cat. Grey.")]
    write_tar(tars / f"{k:05d}.tar", members)
  bucket = epath.Path(gcs) / "prepare"
  for source in [*tars.iterdir(), *folder.iterdir()]:
    if source.is_file():
      (bucket / source.parent.name / source.name).write_bytes(source.read_bytes())
  for fmt, src, pattern in (
    ("webdataset", tars, "{00000..00002}.tar"),
    ("folder", folder, ""),
  ):
    local = prepare.main(
      ["--format", fmt, "--input", str(src / pattern), "--workers", "1"]
      + ["--out", str(tmp_path / fmt)]
    )
    remote_in = str(bucket / src.name / pattern) if pattern else str(bucket / src.name)
    out = bucket / f"out_{fmt}"
    argv = ["--format", fmt, "--input", remote_in, "--out", str(out), "--workers", "1"]
    argv += ["--num-shards", "2"] * (fmt == "folder") + ["--process-count", "2"]
    prepare.main(argv + ["--process-index", "1"])
    summary = prepare.main(argv + ["--process-index", "0"])
    assert json.loads((out / "summary.json").read_text())["written"] == local["written"]
    assert summary["skipped"] == local["skipped"], fmt
    got = tmp_path / f"got_{fmt}"
    got.mkdir()
    for shard in (out / "train").glob("*.array_record"):
      (got / shard.name).write_bytes(shard.read_bytes())
    assert _records(got) == _records(tmp_path / fmt / "train")
    stamps = {p.name: p.stat().mtime for p in (out / "train").iterdir()}
    assert len(stamps) == 2 * len(list((out / "train").glob("*.array_record"))) and all(
      stamps.values()
    )
    prepare.main(argv + ["--process-index", "0"])
    assert stamps == {p.name: p.stat().mtime for p in (out / "train").iterdir()}
