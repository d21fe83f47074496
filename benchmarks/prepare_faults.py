"""The prepare CLI on a generated image folder in which a tenth of the records are broken.

  python benchmarks/prepare_faults.py [--images 1000] [--workers 2]

Writes `--images` demo scenes as JPEGs with one `.txt` caption each into a temporary folder,
breaks every tenth record in one of seven ways (truncated JPEG, zero-byte file, deleted image,
blank caption, invalid UTF-8 caption, 1x1 image, a PNG header claiming 20000x20000), runs
`python -m smartclip_jax.data.prepare --format folder` on it, and prints the summary it wrote
next to the faults that were planted. The last line is the summary as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import PIL.Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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
EXPECTED_REASON = {
  "truncated": "undecodable_image",
  "zero_bytes": "undecodable_image",
  "deleted": "missing_file",
  "blank_caption": "empty_caption",
  "bad_utf8": "invalid_text",
  "one_pixel": "too_small",
  "huge_header": "too_large",
}


def encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
  out = io.BytesIO()
  PIL.Image.fromarray(pixels).save(out, format=fmt)
  return out.getvalue()


def claims_size(png: bytes, width: int, height: int) -> bytes:
  """The PNG with its header rewritten to claim width x height (CRC fixed)."""
  header = struct.pack(">II", width, height) + png[24:29]
  return png[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + png[33:]


def write_folder(root: pathlib.Path, count: int) -> dict[str, int]:
  planted = dict.fromkeys(FAULTS, 0)
  for i in range(count):
    shapes, rng = demo.DemoSource(count, 96, seed=11).scene(i)
    image, caption = encode(demo.render(shapes, 96, rng)), " ".join(s.sentence() for s in shapes)
    caption_bytes = caption.encode()
    if i % 10 == 9:
      fault = FAULTS[(i // 10) % len(FAULTS)]
      planted[fault] += 1
      image = {
        "truncated": image[: len(image) // 3],
        "zero_bytes": b"",
        "one_pixel": encode(np.zeros((1, 1, 3), np.uint8), "PNG"),
        "huge_header": claims_size(encode(np.zeros((8, 8, 3), np.uint8), "PNG"), 20000, 20000),
      }.get(fault, image)
      caption_bytes = {"blank_caption": b"  \n", "bad_utf8": b"caf\xe9 \xff\xfe"}.get(
        fault, caption_bytes
      )
      if fault == "deleted":  # its caption stays, its image is gone
        (root / f"{i:05d}.txt").write_bytes(caption_bytes)
        continue
    suffix = ".png" if image.startswith(b"\x89PNG") else ".jpg"
    (root / f"{i:05d}{suffix}").write_bytes(image)
    (root / f"{i:05d}.txt").write_bytes(caption_bytes)
  return planted


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    folder, out = pathlib.Path(tmp) / "images", pathlib.Path(tmp) / "shards"
    folder.mkdir()
    planted = write_folder(folder, args.images)
    start = time.perf_counter()
    subprocess.run(
      [
        sys.executable,
        "-m",
        "smartclip_jax.data.prepare",
        "--format",
        "folder",
        "--input",
        str(folder),
        "--out",
        str(out),
        "--num-shards",
        "8",
        "--workers",
        str(args.workers),
      ],
      check=True,
      cwd=REPO,
    )
    seconds = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
  print(f"planted faults in {sum(planted.values())} of {args.images} records: {planted}")
  print(
    f"prepare took {seconds:.1f} s; summary.json: written {summary['written']} of "
    f"{summary['records']} listed, skipped {summary['skipped']}"
  )
  expected = {}
  for fault, n in planted.items():
    expected[EXPECTED_REASON[fault]] = expected.get(EXPECTED_REASON[fault], 0) + n
  got = {r: n for r, n in summary["skipped"].items() if n}
  print("skipped counts match the planted faults:", got == expected)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
