"""Sentence splitting and the caption samplers of docs/method.md (the recipe).

The splitter ends a sentence at `.`, `!` or `?` (and any closing quotes or brackets) followed by
whitespace, except after a known abbreviation ("Mr.", "e.g.", "approx.") or a single capital
initial ("J. Smith"). Decimals ("3.5 m") never split because no whitespace follows the point.
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


def sample_caption(text: str, mode: str, rng: np.random.Generator) -> str:
  """`prefix`: first k sentences, k ~ U[1, n]; `first`: the first sentence; `full`: all of it."""
  if mode == "full":
    return text.strip()
  sentences = split_sentences(text)
  if not sentences:
    return ""
  if mode == "first":
    return sentences[0]
  if mode == "prefix":
    return " ".join(sentences[: int(rng.integers(1, len(sentences) + 1))])
  raise ValueError(f"unknown caption mode {mode!r}")
