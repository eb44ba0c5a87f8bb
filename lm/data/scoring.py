"""What an evaluation scores beyond the training examples: sliding windows over a token stream, bytes per token.

Bits per character and per byte convert the loss per token with the split's
characters (as the training evaluation counts them) and its UTF-8 bytes per
token, both over the whole token stream: bits_per_byte = loss / ln 2 * tokens
/ bytes, the figure that compares models with different tokenizers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lm.data import pipeline, sources
from lm.data import sentences as sentences_lib
from lm.data.tokenizers import Tokenizer


# -- bytes -------------------------------------------------------------------------
def stream_bytes(source: Any, tokenizer: Tokenizer) -> int:
  """UTF-8 bytes of the text `pipeline.tokenize_split` turns `source` into (documents + separators).

  Documents are joined by the paragraph separator, or by the end-of-document
  token of tokenizers that have one, which stands for no text.
  """
  count, total = 0, 0
  for document in source:
    total += len(document.encode("utf-8"))
    count += 1
  if tokenizer.eos_id is None:
    total += max(count - 1, 0) * len(sources.PARAGRAPH_SEPARATOR.encode("utf-8"))
  return total


def bytes_per_token(examples: Any, source: Any, tokenizer: Tokenizer) -> float | None:
  """UTF-8 bytes per scored token of a split's examples; None for examples of another kind.

  Windows: the stream's bytes over its tokens (like `Windows.chars_per_token`).
  Sentences: each sentence's decoded bytes + 1 for its EOS (as bits per
  character counts it) over its tokens + EOS.
  """
  if isinstance(examples, pipeline.Windows):
    return max(stream_bytes(source, tokenizer), 1) / len(examples.tokens)
  sentences = getattr(examples, "sentences", examples)
  if isinstance(sentences, sentences_lib.Sentences):
    total = sum(len(tokenizer.decode(sentences.tokens(index)).encode("utf-8")) for index in range(len(sentences)))
    return (total + len(sentences)) / float(sentences.num_targets)
  return None


def add_bits_per_byte(metrics: dict[str, float], bytes_per_token_value: float | None,
                      prefix: str = "eval/") -> dict[str, float]:
  """metrics + `<prefix>bits_per_byte` (loss / ln 2 / bytes per token) when the ratio is known."""
  if bytes_per_token_value:
    metrics[prefix + "bits_per_byte"] = metrics[prefix + "loss"] / math.log(2) / bytes_per_token_value
  return metrics


# -- the sliding window ------------------------------------------------------------
class SlidingWindows:
  """Windows of seq_len + 1 tokens starting every `stride` tokens, weighted to score each target once.

  Element i is {"inputs": [seq_len], "targets": [seq_len], "mask": [seq_len]}
  (int32); mask is 1 on the targets window i scores (module docstring). The
  windows are followed by zero-weight copies of window 0 up to a multiple of
  `multiple` (the global batch size), so a full pass scores every target.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, stride: int, *, multiple: int = 1, name: str = "tokens"):
    if not 0 < stride <= seq_len:
      raise ValueError(f"stride={stride} must be in (0, seq_len={seq_len}].")
    self.stream = pipeline.Windows(tokens, seq_len, seq_len, name=name)  # checks the length; chars per token
    self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
    last = len(tokens) - seq_len - 1
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
      starts.append(last)  # the tail: aligned to the end, it scores only the targets not yet scored
    self.starts = np.asarray(starts, np.int64)
    # Window k's targets are tokens starts[k] + 1 ... starts[k] + seq_len; those up to the previous
    # window's last target (starts[k - 1] + seq_len) are scored already.
    self.first_scored = np.zeros(len(starts), np.int64)
    self.first_scored[1:] = self.starts[:-1] + seq_len - self.starts[1:]
    self.num_windows = len(starts)
    self._length = -(-self.num_windows // multiple) * multiple

  def __len__(self) -> int:
    return self._length

  @property
  def num_targets(self) -> int:
    """Targets the windows score together: every token but the first."""
    return len(self.tokens) - 1

  def chars_per_token(self, tokenizer: Tokenizer) -> float:
    return self.stream.chars_per_token(tokenizer)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    real = index < self.num_windows
    start = int(self.starts[index if real else 0])
    window = self.tokens[start:start + self.seq_len + 1]
    first = self.first_scored[index] if real else self.seq_len
    mask = (np.arange(self.seq_len) >= first).astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:], "mask": mask}
