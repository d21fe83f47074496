"""CLIP's byte-level BPE tokenizer: the one place text becomes token ids.

Token-exact with OpenAI CLIP / open_clip's `SimpleTokenizer` (lower-case cleaning) so that
checkpoints trained here and there read the same ids. The merges file ships with this package
(`assets/bpe_simple_vocab_16e6.txt.gz`, OpenAI CLIP, MIT licence; see assets/README.md).
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import pathlib
from collections.abc import Sequence

import numpy as np
import regex

try:  # ftfy repairs mojibake; the ids only differ from it on broken unicode.
  import ftfy
except ImportError:  # pragma: no cover - exercised when ftfy is absent
  ftfy = None

BPE_PATH = pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses this many merges of the file, no more.
CHARS_PER_POSITION = 64  # a caption is read up to this many characters per context position
SOT = "<start_of_text>"
EOT = "<end_of_text>"
# Contractions, letter runs, single digits, other non-space runs; special tokens kept whole.
_PATTERN = regex.compile(
  rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
  regex.IGNORECASE,
)


def _byte_alphabet() -> dict[int, str]:
  """One printable unicode character per byte value; printable bytes map to themselves.

  The dict's order (printable bytes first, then the rest) is the order of CLIP's base vocabulary.
  """
  printable = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  table = {b: chr(b) for b in printable}
  for extra, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + extra)
  return table


def _clean(text: str) -> str:
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).lower()


class Tokenizer:
  """Encodes text to CLIP token ids; `sot_id`/`eot_id` frame every sequence."""

  def __init__(self, bpe_path: pathlib.Path = BPE_PATH):
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    self.byte_chars = _byte_alphabet()
    base = list(self.byte_chars.values())
    vocab = base + [c + "</w>" for c in base]
    vocab += ["".join(m) for m in merges] + [SOT, EOT]
    self.encoder = {tok: i for i, tok in enumerate(vocab)}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
    self.vocab_size = len(vocab)
    self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)

  def _bpe_uncached(self, word: str) -> tuple[str, ...]:
    """CLIP's BPE: the lowest-ranked merge applied until none applies, its occurrences left to
    right. A heap of candidate pairs over a linked list makes it O(n log n) in the word's length
    (CLIP's loop is quadratic: 3 s for an 8,000-letter word). Same result: a merge only makes
    pairs of higher rank than its own (a token is merged after it was made), so all pairs of
    the current rank go first, leftmost first, as in CLIP's pass."""
    parts = [*word[:-1], word[-1] + "</w>"]
    after = [*range(1, len(parts)), -1]
    before = list(range(-1, len(parts) - 1))
    heap: list[tuple[int, int, str, str]] = []

    def consider(i: int) -> None:
      j = after[i]
      if j != -1 and (rank := self.ranks.get((parts[i], parts[j]))) is not None:
        heapq.heappush(heap, (rank, i, parts[i], parts[j]))

    for i in range(len(parts) - 1):
      consider(i)
    while heap:
      _, i, left, right = heapq.heappop(heap)
      j = after[i]
      if parts[i] != left or j == -1 or parts[j] != right:
        continue  # a pair that an earlier merge changed
      parts[i], parts[j] = left + right, ""
      after[i] = after[j]
      if after[j] != -1:
        before[after[j]] = i
      if before[i] != -1:
        consider(before[i])
      consider(i)
    return tuple(p for p in parts if p)

  def encode(self, text: str, max_chars: int | None = None) -> list[int]:
    """Token ids of `text` without start/end tokens; with `max_chars`, of the first that many
    characters of the cleaned text (cleaning can lengthen a text: ftfy writes a ligature as
    its letters, so a cap on the raw text alone does not bound the BPE's work)."""
    ids = []
    for piece in _PATTERN.findall(_clean(text)[:max_chars]):
      if piece in (SOT, EOT):
        ids.append(self.encoder[piece])
        continue
      word = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[p] for p in self._bpe(word))
    return ids

  def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    """int32 [N, context_length]: SOT, ids, EOT, zero padding; EOT stays last when truncated."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      cap = max_chars(context_length)  # before cleaning too, which is linear in the text
      ids = [self.sot_id, *self.encode(text[:cap], cap), self.eot_id]
      if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = self.eot_id
      out[row, : len(ids)] = ids
    return out


def max_chars(context_length: int) -> int:
  """The characters of a caption that are read: more could fill `context_length` positions only
  if the text were mostly whitespace; the rest of a huge caption costs nothing."""
  return CHARS_PER_POSITION * context_length


@functools.cache
def get_tokenizer() -> Tokenizer:
  """The shared tokenizer (reading the merges is slow enough to do once per process)."""
  return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
  """CLIP token ids, int32 [N, context_length]; see `Tokenizer.__call__`."""
  return get_tokenizer()(texts, context_length)
