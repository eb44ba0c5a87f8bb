"""Prompts for `--mode sample`: a prompts file, stop strings, and many prompts decoded in batches.

The KV cache has one write position for the whole batch (positions continue
from the number of cached tokens, `lm.models.TransformerLM`), so the rows of
one batch must hold prompts of the same token length. `decode_batched`
groups the prompts by length and decodes each group in batches of up to
`rows_per_batch` rows: every row is computed exactly as it would be alone, so
a prompt's greedy (or beam) output does not depend on the other prompts. A
batch that is not full is padded with copies of its first row, so each prompt
length compiles once.

A prompts file (`config.sample.prompts_file`) is either
  * `.txt`: one prompt per line; empty lines are skipped; `\\n`, `\\t` and
    `\\\\` in a line stand for a newline, a tab and a backslash;
  * `.jsonl`: one JSON object per line with a string field "prompt".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lm.core.errors import ConfigError
from lm.inference import sample as sample_lib
from lm.models.transformer import TransformerLM

PROMPT_FILE_TYPES = (".txt", ".jsonl")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: only a .jsonl escape can hold one


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A prompt and where it came from (named in errors: "config.sample.prompt", "prompts.txt line 3")."""

  text: str
  where: str = "config.sample.prompt"


class Sample(str):
  """A generated text, a plain `str` to every caller, that also says which prompt it continues.

  Attributes: prompt_index (position of its prompt in the list decoded),
  prompt (the prompt's text), where (the prompt's origin, e.g. "p.txt line
  2"), score (beam search: the length-penalized log-probability; sampling: None).
  """

  prompt_index: int
  prompt: str
  where: str
  score: float | None

  def __new__(cls, text: str, *, prompt_index: int, prompt: str, where: str, score: float | None = None) -> Sample:
    self = super().__new__(cls, text)
    self.prompt_index, self.prompt, self.where, self.score = prompt_index, prompt, where, score
    return self


# -- the prompts file ----------------------------------------------------------
_FILE_FIX = ('Fix: point config.sample.prompts_file at a .txt file (one prompt per line) or a .jsonl file '
             '(one {"prompt": "..."} object per line).')


def _unescape(line: str) -> str:
  return re.sub(r"\\([nt\\])", lambda match: _ESCAPES[match.group(1)], line)


def read_prompts_file(path: str) -> list[Prompt]:
  """The prompts of a .txt or .jsonl file (module docstring), each with its file and line number.

  Raises:
    ConfigError: the file is missing, of another type, not UTF-8, empty, or a
      .jsonl line is not an object with a string "prompt"; the message names
      the file, the line and the fix.
  """
  name = os.path.basename(path)
  extension = os.path.splitext(path)[1].lower()
  if not os.path.isfile(path):
    raise ConfigError(f"config.sample.prompts_file={path!r} does not exist. {_FILE_FIX}")
  if extension not in PROMPT_FILE_TYPES:
    raise ConfigError(f"config.sample.prompts_file={path!r} is a {extension or 'extensionless'!r} file. {_FILE_FIX}")
  prompts = []
  with open(path, "rb") as file:
    for number, raw in enumerate(file, start=1):
      try:
        line = raw.decode("utf-8").rstrip("\n").removesuffix("\r")
      except UnicodeDecodeError:
        raise ConfigError(f"{path} line {number} is not valid UTF-8. Fix: re-encode the file as UTF-8.") from None
      if number == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark is not part of the first prompt
      where = f"{name} line {number}"
      if extension == ".txt":
        if line:
          prompts.append(Prompt(_unescape(line), where))
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ConfigError(f"{path} line {number} is not valid JSON ({error.msg}, column {error.colno}). Fix: "
                          'write one object per line, e.g. {"prompt": "ROMEO:"}.') from None
      except (ValueError, RecursionError):  # an integer of over 4300 digits; nesting deeper than the stack
        raise ConfigError(f"{path} line {number} is JSON that Python cannot read (a huge number or deep nesting). "
                          'Fix: write one object per line, e.g. {"prompt": "ROMEO:"}.') from None
      if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ConfigError(f'{path} line {number} has no string "prompt" field (got {line[:80]!r}). Fix: write one '
                          'object per line, e.g. {"prompt": "ROMEO:"}.')
      if _SURROGATE.search(record["prompt"]):
        raise ConfigError(f"{path} line {number}: the prompt holds an unpaired surrogate escape (\\ud800-\\udfff), "
                          "which is no character. Fix: write the prompt as UTF-8 text.")
      prompts.append(Prompt(record["prompt"], where))
  if not prompts:
    raise ConfigError(f"config.sample.prompts_file={path!r} holds no prompts (it is empty or blank). {_FILE_FIX}")
  return prompts


# -- stop strings ------------------------------------------------------------
def cut_at_stop_strings(text: str, stops: Sequence[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any stop string; whole if none occurs."""
  cut = min((index for index in (text.find(stop) for stop in stops if stop) if index >= 0), default=len(text))
  return text[:cut]


def single_token_stops(tokenizer: Any, stops: Sequence[str]) -> tuple[int, ...]:
  """The ids of the stop strings that are exactly one token (they can stop decoding early).

  A longer stop string can only be found in the decoded text, so it ends the
  text but not the decoding.
  """
  ids = []
  for stop in stops:
    encoded = np.asarray(tokenizer.encode(stop)).reshape(-1)
    if len(encoded) == 1 and tokenizer.decode(encoded) == stop:
      ids.append(int(encoded[0]))
  return tuple(sorted(set(ids)))


# -- batched decoding ------------------------------------------------------------
class Continuation(NamedTuple):
  """The new token ids of one sample, up to and including its stop token, and its beam score (None: sampled)."""

  tokens: np.ndarray
  score: float | None


def host_array(array: jax.Array) -> np.ndarray:
  """A (possibly sharded) jax.Array on this host: on several processes, one that spans other processes'
  devices (parameters sharded over them) is gathered, so every process reads all of it."""
  if jax.process_count() > 1 and not array.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


def decode_batched(model: TransformerLM, params: Any, prompts: Sequence[np.ndarray], *, count: int,
                   rows_per_batch: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, beam_size: int = 1, length_penalty: float = 0.6,
                   stop_tokens: Sequence[int] = (), pad_id: int = 0, seed: int = 0,
                   beyond_context: bool = False) -> list[list[Continuation]]:
  """Continues every prompt `count` times, in batches of prompts of one token length; call under the mesh context.

  Args:
    model, params: the language model.
    prompts: token ids [prompt_len_i] per prompt, each 1 <= prompt_len_i <= max_len.
    count: continuations per prompt: samples, or with beam_size > 1 the
      `count` best beams (count <= beam_size), best first.
    rows_per_batch: at most this many rows decode together (beam search:
      rows_per_batch // beam_size prompts, each with beam_size beams).
    max_new_tokens: new tokens per continuation. With `beyond_context`,
      sampling goes past the context (`lm.inference.sample.generate_long`); otherwise
      (and always for beam search) it is capped at what fits after the prompt.
    temperature, top_k, top_p, seed: sampling (temperature 0 is greedy); batch
      `b` of the run draws from fold_in(key(seed), b).
    beam_size, length_penalty: beam search when beam_size > 1 (deterministic).
    stop_tokens, pad_id: a continuation ends at (and keeps) its first stop token.

  Returns:
    For each prompt, in order, its `count` continuations.
  """
  if beam_size > 1 and count > beam_size:
    raise ValueError(f"decode_batched: count={count} beams asked of beam_size={beam_size}; ask at most beam_size.")
  max_len = model.config.max_len
  stops = tuple(int(token) for token in stop_tokens)
  by_length: dict[int, list[int]] = {}
  for index, ids in enumerate(prompts):
    if not 1 <= len(ids) <= max_len:
      raise ValueError(f"decode_batched: prompt {index} has {len(ids)} tokens; each needs 1 to max_len={max_len}.")
    by_length.setdefault(len(ids), []).append(index)
  results: list[list[Continuation]] = [[] for _ in prompts]
  batch_number = 0
  for length in sorted(by_length):
    members = by_length[length]
    # A beam row is one prompt (its beams are rows inside beam_search); a sampling row is one sample.
    rows = members if beam_size > 1 else [index for index in members for _ in range(count)]
    size = min(len(rows), max(1, rows_per_batch // beam_size))
    new_tokens = max_new_tokens if beyond_context and beam_size == 1 else min(max_new_tokens, max_len - length + 1)
    if beyond_context and new_tokens < max_new_tokens:
      logging.warning("Beam search stays within the context: %d new tokens after the %d-token prompt(s), not %d "
                      "(max_len=%d).", new_tokens, length, max_new_tokens, max_len)
    for start in range(0, len(rows), size):
      chunk = rows[start:start + size]
      filled = chunk + chunk[:1] * (size - len(chunk))
      batch = jnp.asarray(np.stack([np.asarray(prompts[index], np.int32) for index in filled]))
      if beam_size > 1:
        tokens, scores = sample_lib.beam_search(model, params, batch, beam_size=beam_size, max_new_tokens=new_tokens,
                                                length_penalty=length_penalty, stop_tokens=stops, pad_id=pad_id)
        tokens, scores = host_array(tokens), host_array(scores)
        for row, index in enumerate(chunk):
          results[index].extend(Continuation(sample_lib.truncate_at_stop(tokens[row, beam][None], stops)[0],
                                             float(scores[row, beam])) for beam in range(count))
      else:
        decode = sample_lib.generate_long if beyond_context else sample_lib.generate
        tokens = host_array(decode(model, params, batch, jax.random.fold_in(jax.random.key(seed), batch_number),
                                   max_new_tokens=new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   stop_tokens=stops, pad_id=pad_id))
        for row, index in enumerate(chunk):
          results[index].append(Continuation(sample_lib.truncate_at_stop(tokens[row][None], stops)[0], None))
      batch_number += 1
  return results
