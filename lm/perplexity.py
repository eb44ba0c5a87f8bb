"""Perplexity of a trained LM on any split: loss, perplexity, bits per token, character and byte.

`--mode eval` (`lm.run_modes.evaluate_checkpoint`) scores `eval.split` of
`eval.source` (empty: `data.eval_split` of `data.source`), in one of two ways:

* non-overlapping windows (`eval.stride = 0`, what training's evaluation
  does): window i holds tokens [i * seq_len, (i + 1) * seq_len], so the first
  target of every window is predicted from one token of context;
* a sliding window (`0 < eval.stride = S <= seq_len`, head="lm" on
  data.format="windows"): windows start every S tokens and each scores only
  the targets the previous window did not, its last S (the first window
  scores all of them; a last window, aligned to the end of the split, scores
  what is left). Every target after the first token is scored exactly once,
  with at least seq_len - S tokens of context; S = seq_len is the
  non-overlapping evaluation of the whole split. Scoring is a per-target
  weight mask through a jitted eval step sharded like training's, and the
  last batch is filled with zero-weight windows, so no target is dropped.

Bits per character and per byte convert the loss per token with the split's
characters (as the training evaluation counts them) and its UTF-8 bytes per
token, both over the whole token stream: bits_per_byte = loss / ln 2 * tokens
/ bytes, the figure that compares models with different tokenizers.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from lm.data import pipeline, sources
from lm.data import sentences as sentences_lib
from lm.data.tokenizers import Tokenizer
from lm.train import sharding as sharding_lib
from lm.train import step as step_lib
from lm.train.experiment import token_windows
from lm.train.loop import evaluate_params


# -- which split, and the names its metrics go under -------------------------------
def metric_key(text: str) -> str:
  """A name safe inside a metric key: runs of other characters become one "_" ("train[:10%]" -> "train_10")."""
  return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_") or "split"


def source_name(source: str) -> str:
  """A short name of a source string: the TFDS dataset's name, or the local file's stem / folder's name."""
  kind, target, _ = sources.parse_source(source)
  if kind == "tfds":
    return target.split(":", 1)[0]
  path = Path(target).expanduser()
  return path.stem if path.suffix else path.name


def eval_split(config: ml_collections.ConfigDict, split: str | None = None) -> tuple[str, str, str]:
  """(source, split, metrics prefix) that `--mode eval` scores.

  The split is, in order: `split`, config.eval.split, a split written into
  config.eval.source (tfds:NAME:SPLIT, file.txt:SPLIT), the only split of a
  local eval.source that has one (a single file), then config.data.eval_split.
  Metrics go under "eval_<split>/" for data.source and under
  "eval_<source name>_<split>/" when config.eval.source is set.
  """
  source = config.eval.source or config.data.source
  chosen = split or config.eval.split
  if config.eval.source and not chosen:
    kind, _, written = sources.parse_source(source)
    chosen = written
    if not chosen and kind == "local":
      names = sources.list_splits(source)
      chosen = names[0] if len(names) == 1 else None
  chosen = chosen or config.data.eval_split
  prefix = f"eval_{metric_key(source_name(source))}_{metric_key(chosen)}/" if config.eval.source else (
      f"eval_{metric_key(chosen)}/")
  return source, chosen, prefix


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


def _weighted_eval_step(experiment: Any) -> Any:
  """The LM's eval step with a per-target weight ("mask"), jitted on the run's mesh like `jit_steps` does."""
  steps = experiment.steps
  options = step_lib.cpu_compiler_options(experiment.config.xla_cpu_options, steps.mesh)
  return jax.jit(step_lib.make_eval_step(experiment.model),
                 in_shardings=(steps.state_shardings.params, {key: steps.batch_sharding
                                                              for key in ("inputs", "targets", "mask")}),
                 out_shardings=sharding_lib.replicated(steps.mesh), compiler_options=options)


def evaluate_sliding(experiment: Any, params: Any, windows: SlidingWindows,
                     num_batches: int | None = None) -> dict[str, float]:
  """The head's eval metrics over sliding windows (every target once), plus eval/stride.

  num_batches: score only the first this many global batches (None or 0: all).
  """
  batch_size = experiment.config.batch_size
  dataset = pipeline.eval_dataset(windows, global_batch_size=batch_size, num_batches=num_batches or None,
                                  rows=experiment.process_rows)
  eval_step = _weighted_eval_step(experiment)
  sums = {"loss_sum": 0.0, "tokens": 0.0}
  with experiment.steps.context():
    for local in dataset:
      batch = pipeline.to_global_batch(local, experiment.steps.batch_sharding, batch_size)
      out = eval_step(params, batch)
      for key in sums:
        sums[key] += float(out[key])
  metrics = experiment.head.summarize(sums, {}, windows.chars_per_token(experiment.tokenizer))
  metrics["eval/stride"] = float(windows.stride)
  return metrics


def evaluate_split(experiment: Any, params: Any, source: Any, *, stride: int = 0,
                   num_batches: int | None = None) -> dict[str, float]:
  """Eval metrics of a split (`eval/...`), with eval/bits_per_byte for head="lm".

  stride 0: the head's own examples and evaluation (`lm.train.loop.evaluate_params`);
  stride > 0: sliding windows (head="lm", data.format="windows").
  """
  config = experiment.config
  if stride:
    if experiment.head.name != "lm" or config.data.format != "windows":
      raise ValueError("A sliding window (eval.stride > 0) scores a token stream: head='lm', data.format='windows'.")
    tokens = pipeline.tokenize_split(source, experiment.tokenizer)
    examples = SlidingWindows(tokens, config.seq_len, stride, multiple=config.batch_size, name=source.name)
    metrics = evaluate_sliding(experiment, params, examples, num_batches)
    ratio = bytes_per_token(examples.stream, source, experiment.tokenizer)
  else:
    examples = token_windows(experiment, source, config.seq_len)
    metrics = evaluate_params(experiment, params, examples, num_batches)
    ratio = bytes_per_token(examples, source, experiment.tokenizer)
  return add_bits_per_byte(metrics, ratio) if experiment.head.name == "lm" else metrics
