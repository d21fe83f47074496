"""The archive formats `prepare` reads, as streams of raw records: WebDataset tars and
img2dataset's Parquet files, local or in a bucket (gs://, through `storage`); and the brace and
wildcard patterns that name them. A raw record is {"id", "image", "caption"}, or a bad one
{"error", "id", "detail"} (`decode.REASONS`), so that one broken sample is counted, not fatal."""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator

from smartclip_jax import storage

PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")


class UnusableParquet(ValueError):
  """A Parquet file without image bytes (URLs to download first) or without the caption column."""


def parquet_columns(path: str, caption_key: str = "") -> tuple[str, str]:
  """(image column, caption column) of an img2dataset Parquet file. A file of URLs without
  image bytes (img2dataset's input, not its output), or one without the caption column, is
  UnusableParquet, saying so."""
  import pyarrow.parquet as pq

  with storage.path(path).open("rb") as f:
    schema = pq.read_schema(f)
  image = next((c for c in PARQUET_IMAGE_COLUMNS if c in schema.names), None)
  if image is None:
    has_urls = "url" in schema.names
    raise UnusableParquet(
      f"{path} has no image bytes (columns {schema.names})"
      + (
        ": it lists image URLs; download them first, e.g. `img2dataset --url_list "
        f"{path} --input_format parquet --output_format parquet`, and prepare its output"
        if has_urls
        else f"; expected one of {PARQUET_IMAGE_COLUMNS}"
      )
    )
  caption = caption_key or next((c for c in ("caption", "txt", "text") if c in schema.names), "")
  if caption not in schema.names:
    raise UnusableParquet(f"{path}: no caption column {caption_key or 'caption'} in {schema.names}")
  return image, caption


def parquet_records(path: str, caption_key: str = "") -> Iterator[dict]:
  """An img2dataset Parquet file's rows as raw records; rows without image bytes (failed
  downloads) or caption are bad records; a file that stops being readable ends with one
  `truncated_archive`."""
  import pyarrow.parquet as pq

  key_col, row = "key", 0
  try:
    image_col, caption_col = parquet_columns(path, caption_key)
    file = pq.ParquetFile(storage.path(path).open("rb"))
    columns = [c for c in (key_col, image_col, caption_col) if c in file.schema_arrow.names]
    for batch in file.iter_batches(columns=columns, batch_size=256):
      data = batch.to_pydict()
      for i in range(batch.num_rows):
        key = str(data[key_col][i]) if key_col in data else f"{path}:{row}"
        image, caption = data[image_col][i], data[caption_col][i]
        if isinstance(image, dict):  # {"bytes": ..., "path": ...}, as datasets writes images
          image = image.get("bytes")
        row += 1
        if image is None:
          yield {"error": "no_image", "id": key, "detail": f"no bytes in column {image_col}"}
        elif caption is None:
          yield {"error": "no_caption", "id": key, "detail": f"no {caption_col}"}
        else:
          yield {"id": key, "image": image, "caption": caption}
  except (OSError, ValueError) as e:  # pyarrow's errors on a cut or corrupt file
    yield {"error": "truncated_archive", "id": f"{path}:{row}", "detail": str(e)}


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def tar_records(path: str, caption_key: str = "") -> Iterator[dict]:
  """A WebDataset tar's samples in order, as raw records ({"id", "image", "caption"}) or bad
  ones ({"error", "id", "detail"}); a tar cut off mid-way ends with one `truncated_archive`."""
  key, parts = None, {}
  try:  # read as a stream, in order: a tar in a bucket is downloaded once, not seeked around
    with storage.path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as archive:
      for member in archive:
        if not member.isfile():
          continue
        folder, base = posixpath.split(member.name)
        stem, _, ext = base.partition(".")
        if posixpath.join(folder, stem) != key:
          if key is not None:
            yield _sample(key, parts, caption_key)
          key, parts = posixpath.join(folder, stem), {}
        parts[ext.lower()] = archive.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError) as e:
    yield {"error": "truncated_archive", "id": f"{path}:{key}", "detail": str(e)}
    return
  if key is not None:
    yield _sample(key, parts, caption_key)


def _sample(key: str, parts: dict[str, bytes], caption_key: str) -> dict:
  image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
  if image is None:
    return {"error": "no_image", "id": key, "detail": f"members {sorted(parts)}"}
  if caption_key:
    try:
      caption = json.loads(parts["json"])[caption_key] if "json" in parts else None
    except (ValueError, TypeError, KeyError):
      caption = None
  else:
    caption = parts.get("txt")
  if caption is None:
    what = f"{key}.json field {caption_key!r}" if caption_key else f"{key}.txt"
    return {"error": "no_caption", "id": key, "detail": f"no {what}"}
  return {"id": key, "image": image, "caption": caption}


def expand(pattern: str) -> list[str]:
  """Files matching `pattern`: brace ranges `{00000..00127}` (zero-padded as written) and lists
  `{a,b}`, then glob wildcards; sorted (names that match no file are left out, as a shard
  img2dataset failed to write). Raises FileNotFoundError when nothing matches."""
  files = _expand(pattern)
  if not files:
    raise FileNotFoundError(f"no file matches {pattern}")
  return files


def _expand(pattern: str) -> list[str]:
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match:
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    options = (
      [str(i).zfill(len(span.group(1))) for i in range(int(span.group(1)), int(span.group(2)) + 1)]
      if span
      else body.split(",")
    )
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return sorted({f for o in options for f in _expand(head + o + tail)})
  if storage.is_remote(pattern):  # gs://: wildcards in the file name only
    folder, name = posixpath.split(pattern)
    found = storage.path(folder).glob(name) if glob.has_magic(name) else [storage.path(pattern)]
    return [str(f) for f in found if f.is_file()]
  files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
  return [f for f in files if os.path.isfile(f)]
