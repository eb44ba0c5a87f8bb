"""`config.head = "lm"`: the language model, on token windows or on sentences.

Loss: the mean token cross-entropy over the global batch's targets (fused
with the output projection when the model's `loss_impl` says so,
`lm.models.losses`). Eval: summed token losses and, per row, each example's
loss and tokens (what `--mode ab` pairs), turned into loss, perplexity and
bits per token / character. Generation: prompts continued with the KV cache
(`lm.inference`): sampling, beam search, stop strings, prompts files.

With `data.document_mask` (windows), a window that spans several documents
scores each as if it were alone: its batches also carry "mask" (no loss on a
document's first token, predicted from the previous document),
"segment_ids" and "positions", which the model takes (`lm.models.losses`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.core.errors import ConfigError
from lm.data import pipeline, prepare
from lm.data import sentences as sentences_lib
from lm.inference import prompts as prompts_lib
from lm.inference import sample as sample_lib
from lm.models.losses import cross_entropy, document_args, lm_loss_sum, lm_token_losses
from lm.models.transformer import TransformerLM
from lm.stats import ab as ab_stats
from lm.tasks.base import Task
from lm.train import step as step_lib
from lm.train.evaluate import ROWS

WINDOW_BATCH_RANKS = {"inputs": 2, "targets": 2}
# What windows add with data.document_mask (`lm.data.pipeline`): the scored targets, each token's document and
# its position within it, all [batch, length].
DOCUMENT_BATCH_RANKS = {"mask": 2, "segment_ids": 2, "positions": 2}


def loss_totals(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The batch's target tokens: its mask's sum (sentences, document-masked windows), else every position."""
  mask = batch.get("mask")
  if mask is None:
    return {"tokens": jnp.asarray(batch["targets"].size, jnp.float32)}
  return {"tokens": jnp.sum(mask.astype(jnp.float32))}


def make_loss_fn(model: TransformerLM) -> step_lib.LossFn:
  """The mean token cross-entropy over the global batch's targets, as the engine's loss contribution."""
  deterministic = model.config.dropout == 0.0

  def loss_fn(params: Any, batch: Mapping[str, jax.Array], ctx: step_lib.StepContext) -> tuple[jax.Array, dict]:
    loss_sum, _ = lm_loss_sum(model, params, batch, deterministic=deterministic, rng=ctx.rng)
    return ctx.mean(loss_sum, "tokens"), {}

  return loss_fn


def make_eval_step(model: TransformerLM):
  """`eval_step(params, batch) -> {'loss_sum', 'tokens', 'rows/loss_sum', 'rows/tokens'}` (+ 'sentences').

  The sums add up over batches; the "rows/" values are per row [batch]. A
  batch with a 'mask' (sentences, sliding windows, document-masked windows)
  scores only its targets; the model takes its 'positions' and
  'segment_ids' where it has them. Sentence (and sliding-window) batches also
  count 'sentences', the rows with a target; document-masked windows do not
  (their rows are windows, not sentences).
  """

  def eval_step(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    mask = batch.get("mask")
    losses = lm_token_losses(model, params, batch["inputs"], batch["targets"],
                             **document_args(batch))  # [batch, length]
    weights = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    row_loss, row_tokens = jnp.sum(losses * weights, axis=-1), jnp.sum(weights, axis=-1)
    out = {"loss_sum": jnp.sum(row_loss), "tokens": jnp.sum(row_tokens), ROWS + "loss_sum": row_loss,
           ROWS + "tokens": row_tokens}
    if mask is not None and "segment_ids" not in batch:
      out["sentences"] = jnp.sum(jnp.any(mask > 0, axis=-1).astype(jnp.float32))
    return out

  return eval_step


def summarize_loss(sums: Mapping[str, float], chars_per_token: float) -> dict[str, float]:
  """Token-loss sums -> eval/loss, perplexity, bits per token and per character (and per sentence)."""
  loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
  metrics = {
      "eval/loss": loss,
      "eval/perplexity": math.exp(min(loss, 50.0)),
      "eval/bits_per_token": loss / math.log(2),
      "eval/bits_per_char": loss / math.log(2) / chars_per_token,
      "eval/tokens": sums["tokens"],
  }
  if "sentences" in sums:
    metrics["eval/nll_per_sentence"] = sums["loss_sum"] / max(sums["sentences"], 1.0)
    metrics["eval/sentences"] = sums["sentences"]
  return metrics


class LMTask(Task):
  """The plain language model (module doc)."""

  name = "lm"
  data_formats = ("windows", "sentences")
  # A tuned or distilled model's weights are a language model's (a DPO run's policy, a distill run's student).
  init_from_tasks = ("lm", "sft", "dpo", "distill")
  counts_lm_flops = True
  supports_online = True
  supports_privacy = True
  continues_prompts = True
  sliding_eval = True
  exports_hf = True
  synthetic_data = True
  language_model = True
  ab_comparable = True


  def check_privacy(self, online: bool = False) -> None:
    """An example of DP-SGD is a training window: windows must not overlap, or one token is in many (the online
    loop cuts its chunks' windows without overlap itself)."""
    super().check_privacy(online)
    if online:
      return
    if self.config.data.format != "sentences" and self.config.data.train_stride < self.config.seq_len:
      raise ConfigError(f"config.privacy.enabled=True with config.data.train_stride={self.config.data.train_stride} "
                        f"< seq_len={self.config.seq_len}: overlapping windows put each token in up to "
                        f"{-(-self.config.seq_len // self.config.data.train_stride)} examples, which DP-SGD's "
                        "accountant (one example, one window) does not cover. Fix: "
                        f"--config.data.train_stride={self.config.seq_len}.")
  def build_model(self) -> TransformerLM:
    return TransformerLM(self.model_config)

  @property
  def document_mask(self) -> bool:
    """Whether windows mask attention, positions and loss by document (data.document_mask; sentences: never,
    each row is one sentence already)."""
    return not self.sentences and bool(self.config.data.get("document_mask", False))

  @property
  def batch_ranks(self) -> dict[str, int]:
    if self.sentences:
      return super().batch_ranks
    return {**WINDOW_BATCH_RANKS, **DOCUMENT_BATCH_RANKS} if self.document_mask else dict(WINDOW_BATCH_RANKS)

  def init_params(self, key: jax.Array) -> Any:
    micro = self.config.batch_size // self.config.grad_accum_steps
    return self.model.init(key, self.example_batch(micro)["inputs"])["params"]

  def updates(self) -> Sequence[step_lib.Update]:
    return (step_lib.Update(make_loss_fn(self.model)),)

  def loss_totals(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return loss_totals(batch)

  def make_eval_step(self):
    return make_eval_step(self.model)

  def examples(self, source: Any, *, train: bool, stride: int | None = None) -> Any:
    """Token windows over the split's stream (every `stride` tokens), or its sentences.

    A split named by the run (`lm.data.corpus.Split`, or a mixture of them) is read through its token cache,
    prepared first on this machine if it must be (`lm.data.prepare`; --mode prepare runs data.beam_options'
    runner); documents handed over as such (cleaned, folds) are tokenized in memory.
    """
    if self.sentences:
      return super().examples(source, train=train)
    return pipeline.window_examples(source, self.tokenizer, self.config.seq_len, stride or self.config.seq_len,
                                    options=prepare.PrepareOptions.from_config(self.config.data).local(),
                                    document_mask=self.document_mask)

  def summarize(self, sums: Mapping[str, float], rows: Mapping[str, np.ndarray], chars_per_token: float
                ) -> dict[str, float]:
    del rows
    return summarize_loss(sums, chars_per_token)

  # -- --mode ab -------------------------------------------------------------------------------------
  def compare(self, rows_a, rows_b, other, *, confidence, samples, seed):
    """Per-example loss (each sequence's or sentence's mean token loss): B - A, interval, p-value."""
    del other
    losses = []
    for rows in (rows_a, rows_b):
      keep = rows[ROWS + "tokens"] > 0  # padding rows of sentence splits
      losses.append(rows[ROWS + "loss_sum"][keep] / rows[ROWS + "tokens"][keep])
    comparison = ab_stats.compare_language_models(*losses, confidence=confidence, samples=samples, seed=seed)
    headline = {f"ab/loss/{key}": comparison[key] for key in ("a", "b", "difference", "lower", "upper", "p_value",
                                                              "relative_change")}
    return comparison, headline

  # -- generation ----------------------------------------------------------------------------------
  def sample(self, params: Any, options: ml_collections.ConfigDict, prompt: str | None = None, *,
             prompts: Sequence[Any] | None = None) -> list[str]:
    """Continuations of prompts (sample.kind="continue"); call under the mesh context.

    Args:
      params: the LM's parameters.
      options: config.sample: num_samples, max_tokens, temperature, top_k,
        top_p, seed; beam_size > 1 for beam search (deterministic; its
        num_samples best beams, num_samples <= beam_size) with length_penalty;
        stop, strings that end a continuation (cut before the first one; a
        stop string that is one token also stops decoding early).
      prompt: the one prompt to continue (default options.prompt) when
        `prompts` is not given.
      prompts: `lm.inference.prompts.Prompt`s (e.g. `read_prompts_file`),
        decoded together in batches of prompts of one token length.

    Returns:
      num_samples texts per prompt, prompt by prompt: `lm.inference.prompts.Sample`s,
      strs (the prompt + its continuation) that also carry prompt_index,
      prompt, where and the beam score. On windows, sampling may run past the
      context (re-prefilled segments) while beam search stays within it; on
      sentences, decoding starts after BOS + the prompt's tokens and EOS is a
      stop token. A prompt longer than the context is a ConfigError naming it.
    """
    if prompts is None:
      prompts = [prompts_lib.Prompt(options.prompt if prompt is None else prompt)]
    stops = tuple(options.stop)
    stop_tokens = prompts_lib.single_token_stops(self.tokenizer, stops)
    if self.sentences:
      stop_tokens = (self.vocab.eos,) + stop_tokens
    ids = [self._prompt_ids(item) for item in prompts]
    continuations = prompts_lib.decode_batched(
        self.model, params, ids, count=int(options.num_samples), rows_per_batch=int(self.config.batch_size),
        max_new_tokens=int(options.max_tokens), temperature=float(options.temperature), top_k=int(options.top_k),
        top_p=float(options.top_p), beam_size=int(options.beam_size), length_penalty=float(options.length_penalty),
        stop_tokens=stop_tokens, pad_id=self.vocab.pad if self.sentences else 0, seed=int(options.seed),
        beyond_context=not self.sentences)
    return [prompts_lib.Sample(self._sample_text(item, prompt_ids, continuation.tokens, stops), prompt_index=index,
                               prompt=item.text, where=item.where, score=continuation.score)
            for index, (item, prompt_ids, outs) in enumerate(zip(prompts, ids, continuations))
            for continuation in outs]

  def _prompt_ids(self, prompt: Any) -> np.ndarray:
    """A `Prompt`'s token ids (sentences: BOS first), checked to fit the context."""
    max_len = self.model_config.max_len
    if self.sentences:
      ids = np.concatenate([[self.vocab.bos], self.tokenizer.encode(prompt.text.strip())]).astype(np.int32)
      if len(ids) > max_len:
        raise ConfigError(f"{prompt.where} has {len(ids) - 1} tokens, no room left in seq_len={max_len} after BOS; "
                          f"shorten it to at most {max_len - 1} tokens.")
      return ids
    ids = np.asarray(self.tokenizer.encode(prompt.text), np.int32).reshape(-1)
    if len(ids) == 0:
      raise ConfigError(f"{prompt.where} encodes to no tokens; give at least one character.")
    if len(ids) > max_len:
      raise ConfigError(f"{prompt.where} has {len(ids)} tokens, more than the model's context (max_len={max_len}); "
                        f"shorten it to at most {max_len} tokens.")
    return ids

  def _sample_text(self, prompt: Any, prompt_ids: np.ndarray, new: np.ndarray, stops: Sequence[str]) -> str:
    """The prompt + its continuation's text, cut before the first stop string (looked for in the continuation)."""
    body = prompt_ids[1:] if self.sentences else prompt_ids
    continuation = self.continuation_text(body, new)
    return (self.decode_text(body) if self.sentences else prompt.text) + prompts_lib.cut_at_stop_strings(
        continuation, stops)

  def continuation_text(self, prompt_ids: np.ndarray, new: np.ndarray) -> str:
    """The text of new ids [n] after prompt ids [p] (what `--mode sample` and the server append to a prompt)."""
    head = self.decode_text(prompt_ids)
    # Decoding the new ids together with the prompt's keeps what a subword tokenizer drops at the start of a
    # text (SentencePiece's leading space); the prompt's own text is then taken off again.
    full = self.decode_text(np.concatenate([prompt_ids, new]).astype(np.int32))
    return full[len(head):] if full.startswith(head) else self.decode_text(new)

  # -- sentences, for the reports of the tasks built on an LM (a GAN's MLE baseline and judge) -----------
  def sample_sentences(self, params: Any, count: int, *, seed: int, temperature: float) -> list[str]:
    """`count` sentences sampled after BOS at `temperature` (0: greedy), cut at EOS. Call under the mesh context."""
    if self.vocab is None:
      raise ConfigError("Sampling whole sentences needs a language model trained on data.format='sentences'.")
    return sample_sentences(self.model, params, self.vocab, self.tokenizer, count, length=self.config.seq_len,
                            seed=seed, temperature=temperature)

  def mean_sentence_nll(self, params: Any, texts: list[str]) -> float:
    """Mean NLL per sentence (nats, EOS included) of texts under this sentence model; call under the mesh context."""
    kept = [text for text in texts if text.strip() and len(self.tokenizer.encode(text))]
    if not kept:
      return math.nan
    examples = sentences_lib.examples_for_texts(self.tokenizer, self.config.seq_len, kept)
    total = 0.0
    for start in range(0, len(kept), 256):
      chunk = {key: jnp.asarray(value[start:start + 256]) for key, value in examples.items() if key != "index"}
      total += float(_nll_sum(self.model, params, chunk))
    return total / len(kept)


def sample_sentences(model: TransformerLM, params: Any, vocab: sentences_lib.SentenceVocab, tokenizer: Any,
                     count: int, *, length: int, seed: int, temperature: float, batch_size: int = 256) -> list[str]:
  """`count` sentences sampled after BOS at `temperature` (0: greedy), cut at EOS. Call under the mesh context."""
  texts = []
  for start in range(0, count, batch_size):
    rows = min(batch_size, count - start)
    prompt = jnp.full((rows, 1), vocab.bos, jnp.int32)
    ids = sample_lib.generate(model, params, prompt, jax.random.key(seed * 100_003 + start),
                              max_new_tokens=length, temperature=float(temperature))
    texts.extend(vocab.decode(tokenizer, row) for row in np.asarray(ids))
  return texts


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(model: TransformerLM, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Summed NLL of a sentence batch's targets (mask) under an LM."""
  logits = model.apply({"params": params}, batch["inputs"])
  return cross_entropy(logits, batch["targets"], batch["mask"])[0]
