"""The prepare CLI on generated data in which a tenth of the records are broken.

  python benchmarks/prepare_faults.py [--images 1000] [--workers 2] [--format folder|tar|both]

`folder`: `--images` demo scenes as JPEGs with one `.txt` caption each in a temporary folder,
every tenth record broken in one of seven ways (truncated JPEG, zero-byte file, deleted image,
blank caption, invalid UTF-8 caption, 1x1 image, a PNG header claiming 20000x20000), through
`prepare --format folder`. `tar`: the same records as img2dataset's WebDataset shards (8 tars of
`<key>.jpg|png` + `<key>.txt`), every tenth broken in one of nine ways: the seven above (a
deleted image is a sample without its image member), a sample without its `.txt`, and a sample
at the end of a tar cut one byte into it; through `prepare --format webdataset`. Each prints the
summary next to the faults planted; the last line of each is the summary as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

import numpy as np
import PIL.Image

REPO = pathlib.Path(__file__).resolve().parents[1]

from smartclip_jax.data import demo  # noqa: E402

FAULTS = (
  "truncated",
  "zero_bytes",
  "deleted",
  "blank_caption",
  "bad_utf8",
  "one_pixel",
  "huge_header",
)
TAR_FAULTS = (*FAULTS, "no_txt", "cut_tar")
EXPECTED_REASON = {
  "truncated": "undecodable_image",
  "zero_bytes": "undecodable_image",
  "deleted": "missing_file",
  "blank_caption": "empty_caption",
  "bad_utf8": "invalid_text",
  "one_pixel": "too_small",
  "huge_header": "too_large",
}
TAR_REASON = {**EXPECTED_REASON, "deleted": "no_image", "no_txt": "no_caption"}
TAR_REASON["cut_tar"] = "truncated_archive"


def encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format=fmt)
  return out.getvalue()


def claims_size(png: bytes, width: int, height: int) -> bytes:
  """The PNG with its header rewritten to claim width x height (CRC fixed)."""
  header = struct.pack(">II", width, height) + png[24:29]
  return png[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + png[33:]


def records(count: int, faults: tuple[str, ...]):
  """(index, fault or "", {member suffix: bytes}) for each record: image and caption, broken."""
  for i in range(count):
    shapes, rng = demo.DemoSource(count, 96, seed=11).scene(i)
    image, caption = encode(demo.render(shapes, 96, rng)), " ".join(s.sentence() for s in shapes)
    caption_bytes, fault = caption.encode(), ""
    if i % 10 == 9:
      fault = faults[(i // 10) % len(faults)]
      image = {
        "truncated": image[: len(image) // 3],
        "zero_bytes": b"",
        "one_pixel": encode(np.zeros((1, 1, 3), np.uint8), "PNG"),
        "huge_header": claims_size(encode(np.zeros((8, 8, 3), np.uint8), "PNG"), 20000, 20000),
      }.get(fault, image)
      caption_bytes = {"blank_caption": b"  \n", "bad_utf8": b"caf\xe9 \xff\xfe"}.get(
        fault, caption_bytes
      )
    suffix = ".png" if image.startswith(b"\x89PNG") else ".jpg"
    members = {} if fault == "deleted" else {suffix: image}  # its caption stays, its image goes
    if fault != "no_txt":
      members[".txt"] = caption_bytes
    yield i, fault, members


def write_folder(root: pathlib.Path, count: int) -> dict[str, int]:
  planted = dict.fromkeys(FAULTS, 0)
  for i, fault, members in records(count, FAULTS):
    planted[fault] = planted.get(fault, 0) + 1
    for suffix, data in members.items():
      (root / f"{i:05d}{suffix}").write_bytes(data)
  planted.pop("", None)
  return planted


def write_tars(root: pathlib.Path, count: int, shards: int = 8) -> dict[str, int]:
  """img2dataset's layout (each sample's files written, then added to its tar in order); a
  `cut_tar` sample goes last into a tar of its own, which is then cut inside it."""
  planted = dict.fromkeys(TAR_FAULTS, 0)
  staging = root / "samples"
  staging.mkdir()
  tars: dict[str, tarfile.TarFile] = {}
  with contextlib.ExitStack() as stack:
    for i, fault, members in records(count, TAR_FAULTS):
      planted[fault] = planted.get(fault, 0) + 1
      name = f"cut-{i:05d}" if fault == "cut_tar" else f"{i * shards // count:05d}"
      if name not in tars:
        tars[name] = stack.enter_context(tarfile.open(root / f"{name}.tar", "w"))
      for suffix, data in members.items():
        (staging / f"{i:09d}{suffix}").write_bytes(data)
        tars[name].add(staging / f"{i:09d}{suffix}", arcname=f"{i:09d}{suffix}")
    cuts = {n: t.getmembers()[-1].offset_data + 1 for n, t in tars.items() if n.startswith("cut-")}
  for name, cut in cuts.items():
    path = root / f"{name}.tar"
    path.write_bytes(path.read_bytes()[:cut])
  shutil.rmtree(staging)
  planted.pop("", None)
  return planted


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--format", choices=("folder", "tar", "both"), default="both")
  args = parser.parse_args()
  for kind in ("folder", "tar") if args.format == "both" else (args.format,):
    run(kind, args.images, args.workers)


def run(kind: str, images: int, workers: int) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    data, out = pathlib.Path(tmp) / "data", pathlib.Path(tmp) / "shards"
    data.mkdir()
    if kind == "folder":
      planted, reasons = write_folder(data, images), EXPECTED_REASON
      source = ["--format", "folder", "--input", str(data), "--num-shards", "8"]
    else:
      planted, reasons = write_tars(data, images), TAR_REASON
      source = ["--format", "webdataset", "--input", str(data / "*.tar")]
    start = time.perf_counter()
    subprocess.run(
      [sys.executable, "-m", "smartclip_jax.data.prepare", *source, "--out", str(out)]
      + ["--workers", str(workers)],
      check=True,
      cwd=REPO,
    )
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
  print(f"[{kind}] planted faults in {sum(planted.values())} of {images} records: {planted}")
  print(
    f"[{kind}] prepare took {seconds:.1f} s; summary.json: written {summary['written']} of "
    f"{summary['records']} read, skipped {summary['skipped']}"
  )
  expected = {}
  for fault, n in planted.items():
    expected[reasons[fault]] = expected.get(reasons[fault], 0) + n
  got = {r: n for r, n in summary["skipped"].items() if n}
  print(f"[{kind}] skipped counts match the planted faults:", got == expected)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
