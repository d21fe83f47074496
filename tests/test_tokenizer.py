"""Token ids against open_clip.

The expected ids were recorded on 2026-11-23 with open_clip_torch 3.3.0's
`open_clip.tokenizer.SimpleTokenizer()` (default `clean='lower'`, ftfy 6.3.1): `.encode(text)`
for each caption, and `tokenizer(long, context_length=248)` for the truncation case.
"""

import numpy as np

from smartclip_jax import tokenizer
from smartclip_jax.tokenizer import get_tokenizer, tokenize

OPEN_CLIP_IDS = {
  "a photo of a cat.": [320, 1125, 539, 320, 2368, 269],
  "A large red circle at the top left. A small blue square near the center!": [
    320,
    3638,
    736,
    7117,
    536,
    518,
    1253,
    1823,
    269,
    320,
    2442,
    1746,
    3999,
    2252,
    518,
    2119,
    256,
  ],
  "Two dogs playing in the snow, one wearing a bright-orange collar; it's 3:45 pm.": [
    1237,
    3255,
    1629,
    530,
    518,
    2583,
    267,
    637,
    3309,
    320,
    4852,
    268,
    4287,
    13497,
    282,
    585,
    568,
    274,
    281,
    275,
    276,
    990,
    269,
  ],
  "The café's menu lists crème brûlée for $7.50 &amp; espresso.": [
    518,
    15304,
    568,
    6225,
    12281,
    1075,
    12138,
    614,
    711,
    127,
    119,
    75,
    13489,
    556,
    259,
    278,
    269,
    276,
    271,
    261,
    17098,
    269,
  ],
  "An aerial view of New York City's skyline at dusk, with the Empire State Building lit up.": [
    550,
    12440,
    1093,
    539,
    686,
    2705,
    1305,
    568,
    14606,
    536,
    19708,
    267,
    593,
    518,
    7614,
    1295,
    2307,
    4350,
    705,
    269,
  ],
  "  Multiple   spaces\tand\nnewlines  ": [6470, 9006, 537, 1218, 3418],
  "": [],
}
LONG = " ".join(["A green triangle sits beside a yellow star."] * 40)


def test_encode_matches_open_clip():
  tok = get_tokenizer()
  for text, ids in OPEN_CLIP_IDS.items():
    assert tok.encode(text) == ids, text
  assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id) == (49406, 49407)


def test_tokenize_frames_and_pads():
  out = tokenize(list(OPEN_CLIP_IDS)[:2], context_length=77)
  assert out.shape == (2, 77) and out.dtype == np.int32
  ids = OPEN_CLIP_IDS["a photo of a cat."]
  np.testing.assert_array_equal(out[0, : len(ids) + 2], [49406, *ids, 49407])
  np.testing.assert_array_equal(out[0, len(ids) + 2 :], 0)


def test_truncation_to_248_keeps_end_of_text_last():
  assert len(get_tokenizer().encode(LONG)) == 360
  out = tokenize(LONG, context_length=248)[0]
  assert out.shape == (248,)
  np.testing.assert_array_equal(out[-5:], [269, 320, 1901, 14615, 49407])  # open_clip's tail
  assert out[0] == 49406 and np.argmax(out) == 247


def clip_bpe(ranks: dict, word: str) -> tuple[str, ...]:
  """CLIP's own BPE loop (quadratic), the reference for ours."""
  parts = [*word[:-1], word[-1] + "</w>"]
  while len(parts) > 1:
    pairs = set(zip(parts, parts[1:]))
    best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if best not in ranks:
      break
    merged, i = [], 0
    while i < len(parts):
      if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
        merged.append(parts[i] + parts[i + 1])
        i += 2
      else:
        merged.append(parts[i])
        i += 1
    parts = merged
  return tuple(parts)


def test_bpe_is_clips_on_real_and_adversarial_words():
  tok = tokenizer.get_tokenizer()
  rng = np.random.default_rng(0)
  letters = list("abcdefghijklmnopqrstuvwxyz") + [tok.byte_chars[b] for b in "éü!0".encode()]
  words = ["photograph", "aaaaaaaaaaa", "abababababab", "mississippi", "zzzzzzzz", "lllllll"]
  words += ["".join(rng.choice(letters, rng.integers(1, 40))) for _ in range(300)]
  words += ["".join(rng.choice(list("ab"), 60)) for _ in range(20)]  # many equal-rank pairs
  for word in words:
    assert tok._bpe_uncached(word) == clip_bpe(tok.ranks, word), word


def test_the_cap_holds_for_the_cleaned_text_too(monkeypatch):
  """ftfy writes the ligature U+FB03 as "ffi": a capped caption of them cleans to three times
  the cap, one word the BPE would read whole."""
  tok = get_tokenizer()
  cap = tokenizer.max_chars(77)
  words = []
  bpe = tok._bpe
  monkeypatch.setattr(tok, "_bpe", lambda word: words.append(word) or bpe(word))
  out = tok("\ufb03" * cap, 77)
  assert sum(map(len, words)) <= cap
  np.testing.assert_array_equal(out, tok(("ffi" * cap)[:cap], 77))


def test_a_huge_caption_is_read_up_to_its_cap():
  long = "a" * 200_000  # one 200,000-letter word: CLIP's loop would take about half an hour
  cap = tokenizer.max_chars(248)
  np.testing.assert_array_equal(tokenizer.tokenize(long, 248), tokenizer.tokenize(long[:cap], 248))
  assert tokenizer.tokenize(long, 248)[0, 0] == tokenizer.get_tokenizer().sot_id
