"""Cleaning incoming text before training: normalization, length filters, deduplication.

Every chunk of text is put in one normal form (`normalize`), filtered by
length, and checked against everything trained on before; `Cleaner` does all
three and records what it keeps. The deduplication itself (exact hashes,
MinHash signatures, LSH buckets and the saved `DedupIndex`) lives in
`lm.data.dedup`, together with `CleanConfig`, which the index is built from;
both are re-exported here, so `lm.data.clean.CleanConfig` and
`lm.data.clean.DedupIndex` keep working.
"""

from __future__ import annotations

import collections
import functools
import itertools
import re
import sys
import unicodedata
from collections.abc import Iterable
from typing import Any

from lm.data.dedup import (INDEX_FORMAT_VERSION, INDEX_KEYS, NORMALIZATIONS, UNIVERSAL_HASH_PRIME,
                           CleanConfig, DedupIndex, exact_hash, shingle_text)
from lm.core.errors import DataError

__all__ = [
    "INDEX_FIELDS", "INDEX_FORMAT_VERSION", "INDEX_KEYS", "NORMALIZATIONS", "REASONS",
    "UNIVERSAL_HASH_PRIME", "CleanConfig", "Cleaner", "DedupIndex", "exact_hash", "normalize",
    "shingle_text",
]

REASONS = ("empty", "too_short", "too_long", "exact_duplicate", "near_duplicate")
# Config fields that decide what the index holds and how it matches; a Cleaner and its
# index must agree on them (the length filters may change between chunks).
INDEX_FIELDS = ("normalization", "exact_dedup", "near_dup_threshold", "shingle_size", "num_perm",
                "bands", "seed")

# Documents per signature batch: large enough to amortize numpy call overhead, small
# enough that a generator of documents is not read far ahead.
_BATCH_DOCUMENTS = 2048

_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_TRAILING_SPACE = re.compile(r"[^\S\n]+(?=\n|$)")
_BLANK_LINES = re.compile(r"\n{3,}")


@functools.lru_cache(maxsize=None)
def _removed_characters() -> re.Pattern[str]:
  """Control/format characters (Cc, Cf) and lone surrogates (Cs), except newline and tab.

  Built once from this Python's Unicode database (~0.3 s), not at import.
  """
  codes = [code for code in range(sys.maxunicode + 1)
           if unicodedata.category(chr(code)) in ("Cc", "Cf", "Cs") and chr(code) not in "\n\t"]
  ranges = []
  for _, run in itertools.groupby(enumerate(codes), key=lambda pair: pair[1] - pair[0]):
    run = [code for _, code in run]
    ranges.append(f"\\U{run[0]:08x}-\\U{run[-1]:08x}" if len(run) > 1 else f"\\U{run[0]:08x}")
  return re.compile(f"[{''.join(ranges)}]+")


def normalize(text: str, form: str = "NFC") -> str:
  """Puts a document in the one form that is trained on, hashed and compared.

  Unicode normalization `form` ("NFC", "NFKC" or "none"), then: "\\r\\n" and
  "\\r" become "\\n"; control and format characters (categories Cc, Cf) are
  removed except "\\n" and "\\t", and so are lone surrogates (they cannot be
  encoded as UTF-8); each run of horizontal whitespace (tabs, spaces, other
  Unicode spaces) becomes one space; trailing whitespace of each line is
  stripped; 3+ newlines become 2 (one blank line, the paragraph separator);
  the whole text is stripped.
  """
  if not isinstance(text, str):
    raise DataError(
        f"normalize expects a str, got {type(text).__name__}. Fix: decode bytes as UTF-8 first.")
  if form not in NORMALIZATIONS:
    raise DataError(f"Unknown normalization {form!r}. Fix: use one of {list(NORMALIZATIONS)}.")
  if form != "none":
    text = unicodedata.normalize(form, text)
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  text = _removed_characters().sub("", text)
  text = _HORIZONTAL_SPACE.sub(" ", text)
  text = _TRAILING_SPACE.sub("", text)
  text = _BLANK_LINES.sub("\n\n", text)
  return text.strip()


class Cleaner:
  """Normalizes, filters and deduplicates documents against `index` (everything seen)."""

  def __init__(self, config: CleanConfig, index: DedupIndex | None = None):
    if not isinstance(config, CleanConfig):
      raise DataError(f"Cleaner needs a CleanConfig, got {type(config).__name__}. Fix: pass "
                      "CleanConfig.from_mapping(...).")
    if index is None:
      index = DedupIndex(config)
    differing = [name for name in INDEX_FIELDS
                 if getattr(index.config, name) != getattr(config, name)]
    if differing:
      pairs = ", ".join(f"{name}: index {getattr(index.config, name)!r} vs {getattr(config, name)!r}"
                        for name in differing)
      raise DataError(
          f"The dedup index was built with other settings ({pairs}), so its hashes cannot be "
          "compared with this config's. Fix: use the index's settings (DedupIndex.config), or start "
          "a fresh index.")
    self.config = config
    self.index = index

  def clean(self, documents: Iterable[str], *,
            add: bool = True) -> tuple[list[str], collections.Counter]:
    """Normalizes each document and keeps it or drops it with a reason from REASONS.

    Duplicates are checked against the index and against earlier kept
    documents of the same call (also when `add=False`). Kept documents are
    added to the index when `add`; if a document raises, the index is left as
    it was before the call.

    Returns:
      (kept normalized documents in input order, Counter of dropped documents per reason).
    """
    if isinstance(documents, (str, bytes)):
      raise DataError("Cleaner.clean expects an iterable of documents, got a single string. Fix: "
                      "pass a list, e.g. cleaner.clean([text]).")
    kept: list[str] = []
    dropped: collections.Counter = collections.Counter()
    state = self.index._state()
    try:
      iterator = iter(documents)
      position = 0
      while batch := list(itertools.islice(iterator, _BATCH_DOCUMENTS)):
        self._clean_batch(batch, position, kept, dropped)
        position += len(batch)
    except BaseException:
      self.index._restore(state)
      raise
    if not add:
      self.index._restore(state)
    return kept, dropped

  def _clean_batch(self, batch: list[Any], position: int, kept: list[str],
                   dropped: collections.Counter) -> None:
    config = self.config
    candidates = []
    for offset, document in enumerate(batch):
      if not isinstance(document, str):
        raise DataError(f"Document {position + offset} is a {type(document).__name__}, not a str. "
                        "Fix: decode documents to str (UTF-8) before cleaning.")
      text = normalize(document, config.normalization)
      if not text:
        dropped["empty"] += 1
      elif len(text) < config.min_chars:
        dropped["too_short"] += 1
      elif config.max_chars and len(text) > config.max_chars:
        dropped["too_long"] += 1
      else:
        candidates.append(text)
    hashes = [exact_hash(text) for text in candidates]
    if config.exact_dedup:
      # Seen before this batch: no signature needed (the index only grows during a call).
      seen = [hashed in self.index._exact for hashed in hashes]
      if any(seen):
        dropped["exact_duplicate"] += sum(seen)
      candidates = [text for text, old in zip(candidates, seen) if not old]
      hashes = [hashed for hashed, old in zip(hashes, seen) if not old]
    if not candidates:
      return
    # Sequential, so a document is also compared with the documents kept before it.
    for text, entry in zip(candidates, self.index._entries(candidates, hashes)):
      reason = self.index._find(*entry)
      if reason is None:
        self.index._add(*entry)
        kept.append(text)
      else:
        dropped[reason] += 1
