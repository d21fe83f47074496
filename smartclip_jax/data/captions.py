"""Sentence splitting and the caption samplers of docs/method.md (the recipe).

Two splitters (`data.sentence_split`). `ours`, the default, ends a sentence at `.`, `!` or `?`
(and any closing quotes or brackets) followed by whitespace, except after a known abbreviation
("Mr.", "e.g.", "approx.") or a single capital initial ("J. Smith"). Decimals ("3.5 m") never
split because no whitespace follows the point. `reference` is the reference implementation's
rule: the caption is cut at every literal ". " and a prefix is its first k pieces joined again
with ". ", so "e.g. a" splits and a prefix short of the whole caption has no final period.
"""

from __future__ import annotations

import re

import numpy as np

ABBREVIATIONS = frozenset(
  [
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "sr",
    "jr",
    "st",
    "mt",
    "ft",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "approx",
    "no",
    "fig",
    "al",
    "inc",
    "ltd",
    "co",
    "dept",
    "est",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
  ]
)
_END = re.compile(r"""[.!?]+["')\]]*(?=\s+)""")
_WORD = re.compile(r"\S+")


def split_sentences(text: str) -> list[str]:
  """Sentences of `text`, stripped, in order; empty text gives []. Linear in the text, however
  many abbreviations and initials it has (a whole caption is split, however long)."""
  sentences, start = [], 0
  words = _WORD.finditer(text)
  word, after = None, next(words, None)
  for match in _END.finditer(text):
    while after is not None and after.start() < match.start():  # the last word before the end
      word, after = after, next(words, None)
    in_sentence = word is not None and word.start() >= start
    last_word = text[word.start() : min(word.end(), match.start())] if in_sentence else ""
    last_word = last_word.lower().rstrip(".")
    if match.group().startswith(".") and (
      last_word in ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha())
    ):
      continue
    sentences.append(text[start : match.end()].strip())
    start = match.end()
  tail = text[start:].strip()
  if tail:
    sentences.append(tail)
  return [s for s in sentences if s]


REFERENCE_SEPARATOR = ". "  # the reference cuts at, and rejoins with, exactly this


def sample_caption(text: str, mode: str, rng: np.random.Generator, split: str = "ours") -> str:
  """`prefix`: first k sentences, k ~ U[1, n]; `first`: the first sentence; `full`: all of it.

  `split` picks the splitter (`data.sentence_split`): `ours` rejoins sentences with a space,
  `reference` cuts at and rejoins with `REFERENCE_SEPARATOR`, leaving the text unstripped.
  """
  if mode == "full":
    return text.strip()
  if split == "reference":
    sentences, joiner = text.split(REFERENCE_SEPARATOR), REFERENCE_SEPARATOR
  elif split == "ours":
    sentences, joiner = split_sentences(text), " "
  else:
    raise ValueError(f"unknown sentence split {split!r}")
  if not sentences:
    return ""
  if mode == "first":
    return sentences[0]
  if mode == "prefix":
    return joiner.join(sentences[: int(rng.integers(1, len(sentences) + 1))])
  raise ValueError(f"unknown caption mode {mode!r}")
