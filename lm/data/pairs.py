"""Prompt-response records (SFT) and preference records (DPO), as random-access examples for the engine.

Records come from the local `.jsonl` files of a split (one object per line) or
`.tsv` files (a header naming the fields):

  SFT          {"prompt": ..., "response": ...}
  preferences  {"prompt": ..., "chosen": ..., "rejected": ...}   (what lm.serve.feedback exports)

A sequence is the prompt's tokens followed by a response's, encoded as the
language model it continues was trained (`data.format`):

  sentences  BOS p_1 .. p_m r_1 .. r_n EOS   (the response's EOS is learned too)
  windows    p_1 .. p_m r_1 .. r_n           (no specials: a prompt needs at least one token)

  inputs  = the sequence without its last token, targets = without its first,
  mask    = 1 on the targets that are the response's (and its EOS): the loss
            and the log-probabilities count only those, never the prompt's.

All [seq_len] int32, padded (PAD for sentences, 0 for windows; mask 0). A
response that does not fit after its prompt is cropped (counted); a prompt
that leaves no room for one response token is refused with the file and line,
as are a missing or empty field and a pair whose chosen and rejected are the
same text. Prompt and response are tokenized separately, so the boundary
between them is a token boundary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from absl import logging

from lm.core.errors import DataError
from lm.data import local_files
from lm.data.sentences import SentenceVocab
from lm.data.tokenizers import Tokenizer

SFT_FIELDS = ("prompt", "response")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
SEQUENCE_KEYS = ("inputs", "targets", "mask")  # lm.models.preference.SEQUENCE_KEYS
SFT_BATCH_RANKS = {"inputs": 2, "targets": 2, "mask": 2, "index": 1}
PREFERENCE_BATCH_RANKS = {f"{side}_{key}": 2 for side in ("chosen", "rejected") for key in SEQUENCE_KEYS} | {"index": 1}


def split_files(split: Any) -> list[Path]:
  """The local files of a split (`lm.data.corpus.Split`); DataError for a TFDS dataset or a sliced split."""
  files = split.files() if hasattr(split, "files") else None
  if not files:
    raise DataError(f"{getattr(split, 'name', split)} is not a split of local files: SFT and preference records are "
                    "read from .jsonl (or .tsv) files. Fix: point config.data.source at a folder holding train.jsonl "
                    "and validation.jsonl, and name whole splits (no slicing).")
  return list(files)


def read_records(files: Iterable[Path], fields: Sequence[str]) -> list[tuple[dict[str, str], str]]:
  """Every (record, "file:line") of the files, checked: each field present, a string, and (but the prompt)
  not blank; preferences: chosen differs from rejected."""
  records = []
  for path in files:
    for record, where in local_files.read_records(path, tuple(fields)):
      for field in fields[1:]:
        if not record[field].strip():
          raise DataError(f"{where}: field {field!r} is empty. Fix: give every record a non-empty {field!r}, or "
                          "drop the record.")
      if "chosen" in record and record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text, which prefers nothing. Fix: drop the "
                        "record, or make them differ.")
      records.append((record, where))
  if not records:
    raise DataError(f"{', '.join(map(str, files))} hold(s) no records with fields {tuple(fields)}. Fix: add records.")
  return records


class SequenceEncoder:
  """Encodes (prompt, response) as one training sequence (module doc) for a model of `seq_len` positions."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, sentences: bool):
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.vocab = SentenceVocab.for_tokenizer(tokenizer) if sentences else None
    self.pad = self.vocab.pad if self.vocab is not None else 0
    self.cropped = 0

  def prompt_ids(self, prompt: str, where: str) -> np.ndarray:
    """The prompt's ids as decoding starts from them (sentences: BOS first), checked to leave room."""
    ids = np.asarray(self.tokenizer.encode(prompt), np.int32).reshape(-1)
    if self.vocab is not None:
      ids = np.concatenate([[self.vocab.bos], ids]).astype(np.int32)
    elif len(ids) == 0:
      raise DataError(f"{where}: the prompt encodes to no tokens, and a model trained on token windows predicts a "
                      "response's first token from the prompt's last. Fix: give the prompt at least one character.")
    if len(ids) > self.seq_len:
      longest = self.seq_len - 1 if self.vocab is not None else self.seq_len  # BOS takes a position
      raise DataError(f"{where}: the prompt has {len(ids)} tokens{' with BOS' if self.vocab is not None else ''}, "
                      f"leaving no room for a response in the model's context (seq_len={self.seq_len}). Fix: shorten "
                      f"the prompt to at most {longest} tokens, or drop the record.")
    return ids

  def encode(self, prompt_ids: np.ndarray, response: str) -> dict[str, np.ndarray]:
    """{inputs, targets, mask} [seq_len] of a prompt's ids and a response's text."""
    response_ids = np.asarray(self.tokenizer.encode(response), np.int32).reshape(-1)
    if self.vocab is not None:
      response_ids = np.concatenate([response_ids, [self.vocab.eos]]).astype(np.int32)
    return self.encode_ids(prompt_ids, response_ids)

  def encode_ids(self, prompt_ids: np.ndarray, response_ids: np.ndarray) -> dict[str, np.ndarray]:
    """{inputs, targets, mask} [seq_len] of a prompt's and a response's ids (with its EOS, if it has one)."""
    response_ids = np.asarray(response_ids, np.int32).reshape(-1)
    room = self.seq_len + 1 - len(prompt_ids)  # a sequence of seq_len + 1 tokens gives seq_len targets
    if len(response_ids) > room:
      self.cropped += 1
      response_ids = response_ids[:room]
    sequence = np.concatenate([prompt_ids, response_ids])
    n = len(sequence) - 1
    inputs = np.full(self.seq_len, self.pad, np.int32)
    targets = np.full(self.seq_len, self.pad, np.int32)
    mask = np.zeros(self.seq_len, np.int32)
    inputs[:n], targets[:n] = sequence[:-1], sequence[1:]
    mask[len(prompt_ids) - 1:n] = 1
    return {"inputs": inputs, "targets": targets, "mask": mask}

  def empty(self) -> dict[str, np.ndarray]:
    pad = np.full(self.seq_len, self.pad, np.int32)
    return {"inputs": pad, "targets": pad.copy(), "mask": np.zeros(self.seq_len, np.int32)}


class _Examples:
  """The shared parts of the record examples: tokenized once, up front; random access."""

  fields: tuple[str, ...] = ()

  def __init__(self, records: Sequence[tuple[dict[str, str], str]], tokenizer: Tokenizer, seq_len: int, *,
               sentences: bool, name: str = "records"):
    self.name = name
    self.encoder = SequenceEncoder(tokenizer, seq_len, sentences)
    self.records = [record for record, _ in records]
    self.where = [where for _, where in records]
    self.prompts = [self.encoder.prompt_ids(record["prompt"], where) for record, where in records]
    self.rows = [self._encode(record, prompt) for record, prompt in zip(self.records, self.prompts)]
    self.cropped = self.encoder.cropped
    if self.cropped:
      logging.warning("%s: %d response(s) cropped to fit the context (seq_len=%d) after their prompts.", self.name,
                      self.cropped, seq_len)
    self._check()

  def _check(self) -> None:
    """Warnings about rows that train nothing useful (a subclass's)."""

  def _encode(self, record: dict[str, str], prompt: np.ndarray) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    return {**self.rows[index], "index": np.asarray(index, np.int32)}

  def chars_per_token(self, tokenizer: Tokenizer) -> float:  # pylint: disable=unused-argument
    return 1.0  # responses are scored per token; bits per character are not reported


class SFTExamples(_Examples):
  """Prompt-response examples: {inputs, targets, mask, index}, the mask on the response (module doc)."""

  fields = SFT_FIELDS

  def _encode(self, record, prompt):
    return self.encoder.encode(prompt, record["response"])

  def empty_example(self, index: int) -> dict[str, np.ndarray]:
    return {**self.encoder.empty(), "index": np.asarray(index, np.int32)}


class PreferenceExamples(_Examples):
  """Preference examples: chosen_{inputs,targets,mask}, rejected_{...} and index (module doc)."""

  fields = PREFERENCE_FIELDS

  def _encode(self, record, prompt):
    return {f"{side}_{key}": value for side in ("chosen", "rejected")
            for key, value in self.encoder.encode(prompt, record[side]).items()}

  def _check(self) -> None:
    same = sum(bool(np.array_equal(row["chosen_targets"][row["chosen_mask"] > 0],
                                   row["rejected_targets"][row["rejected_mask"] > 0])) for row in self.rows)
    if same:
      logging.warning("%s: %d pair(s) have the same tokens once cropped to the context (they differ only after "
                      "seq_len=%d): they teach nothing. Raise seq_len or shorten their prompts.", self.name, same,
                      self.encoder.seq_len)

  def empty_example(self, index: int) -> dict[str, np.ndarray]:
    empty = self.encoder.empty()
    return {**{f"{side}_{key}": value.copy() for side in ("chosen", "rejected") for key, value in empty.items()},
            "index": np.asarray(index, np.int32)}


def sft_examples(split: Any, tokenizer: Tokenizer, seq_len: int, *, sentences: bool) -> SFTExamples:
  return SFTExamples(read_records(split_files(split), SFT_FIELDS), tokenizer, seq_len, sentences=sentences,
                     name=getattr(split, "name", "records"))


def preference_examples(split: Any, tokenizer: Tokenizer, seq_len: int, *, sentences: bool) -> PreferenceExamples:
  return PreferenceExamples(read_records(split_files(split), PREFERENCE_FIELDS), tokenizer, seq_len,
                            sentences=sentences, name=getattr(split, "name", "records"))
