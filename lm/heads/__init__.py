"""What is trained on the Transformer backbone: `config.head = "lm" | "vae" | "gan"`.

A head owns what differs between them and nothing else: its Flax module and
parameter initializer, its optimizer (a GAN has one per player, kept side by
side in the train state's `opt_state`), its pure train and eval steps, and
how evaluation sums become metrics. Everything around it is shared: the
mesh and shardings (`lm.train.sharding`), the jitted, donated steps
(`lm.train.step.jit_steps`), the Grain pipeline, Orbax checkpoints and the
training loop (`lm.train.loop`), so a head is sharded, checkpointed and
resumed exactly like the plain LM.

  lm  (`LMHead`):  the language model, on token windows or on sentences.
  vae (`lm.heads.vae.VAEHead`): a sentence VAE (`lm.models.vae`).
  gan (`lm.heads.gan.GANHead`): a text GAN (`lm.models.gan`), started from an
      MLE-trained LM (`gan.kind = "relgan"`) or VAE (`gan.kind = "latent"`).
  classifier (`lm.heads.classifier.ClassifierHead`): a sequence classifier
      (`lm.models.classifier`) on labeled sentences, from scratch or from an LM.

Evaluation: `eval_step(params, batch)` returns float32 sums (added over
batches) and per-row arrays under keys starting with "rows/" (gathered);
`summarize(sums, rows)` turns them into "eval/..." metrics, always with
"eval/loss" (the figure best checkpoints are chosen by).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm.config import ConfigError
from lm.data import pipeline, sentences as sentences_lib, sources
from lm.data.tokenizers import Tokenizer
from lm.models import TransformerConfig, TransformerLM
from lm.train import optim, step as step_lib

ROWS = "rows/"  # prefix of per-row eval outputs


class Head:
  """The plain language model; the base of the other heads (see the module docstring)."""

  name = "lm"
  # Heads whose checkpoints this head may take weights from with config.init_from.
  init_from_heads: tuple[str, ...] = ("lm",)
  # Non-empty: the head cannot start from scratch, and this message says what config.init_from needs.
  requires_init_from = ""
  # Whether lm.train.perf's FLOP count (a decoder-only LM's) is this head's: MFU is reported only then.
  counts_lm_flops = True

  def __init__(self, config: ml_collections.ConfigDict, model_config: TransformerConfig, tokenizer: Tokenizer):
    self.config = config
    self.model_config = model_config
    self.tokenizer = tokenizer
    self.sentences = config.data.format == "sentences"
    self.vocab = sentences_lib.SentenceVocab.for_tokenizer(tokenizer) if self.sentences else None
    self.model = self.build_model()

  # -- model and state -----------------------------------------------------
  def build_model(self) -> nn.Module:
    return TransformerLM(self.model_config)

  @property
  def batch_ranks(self) -> dict[str, int]:
    """The batch's keys and ranks ([batch, length] = 2, [batch] = 1)."""
    if self.sentences:
      return {"inputs": 2, "targets": 2, "mask": 2, "index": 1}
    return dict(step_lib.LM_BATCH_RANKS)

  def example_batch(self, batch_size: int) -> dict[str, jax.Array]:
    """Zeros shaped like a (micro-)batch of `batch_size` rows, for initialization and tracing."""
    length = self.config.seq_len
    return {key: jnp.zeros((batch_size, length)[:rank], jnp.int32) for key, rank in self.batch_ranks.items()}

  def init_params(self, key: jax.Array) -> Any:
    """Parameters (boxed with logical axis names) from an rng key."""
    micro = self.config.batch_size // self.config.grad_accum_steps
    return self.model.init(key, self.example_batch(micro)["inputs"])["params"]

  def make_optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
    return optim.make_optimizer(self.config.optim, self.config.steps)

  def init_from_target(self, abstract_params: Any, source_head: str) -> tuple[Any, Callable[[Any, Any], Any]]:
    """What of this head's params a `source_head` checkpoint fills, and how to put it back.

    Returns (abstract tree to restore, merge(params, restored) -> params).
    """
    del source_head
    return abstract_params, lambda params, restored: restored

  # -- steps ---------------------------------------------------------------
  def make_train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
    return step_lib.make_train_step(self.model, tx, schedule, self.config.grad_accum_steps)

  def make_eval_step(self) -> Callable:
    return step_lib.make_eval_step(self.model)

  # -- data ----------------------------------------------------------------
  def examples(self, source: sources.TextSource, *, train: bool, stride: int | None = None) -> Any:
    """A split as random-access examples: token windows, or sentences (lm.data.sentences)."""
    config = self.config
    if self.sentences:
      examples = sentences_lib.Sentences(source, self.tokenizer, config.seq_len)
      return examples if train else sentences_lib.PaddedToBatches(examples, config.batch_size)
    tokens = pipeline.tokenize_split(source, self.tokenizer)
    return pipeline.Windows(tokens, config.seq_len, stride or config.seq_len, name=source.name)

  # -- evaluation ----------------------------------------------------------
  def selection(self, metrics: Mapping[str, float]) -> float:
    """The figure (lower is better) that picks the best checkpoint(s) kept by config.keep_best."""
    return float(metrics["eval/loss"])

  def metadata(self) -> dict[str, Any]:
    """What beyond the config a checkpoint must record for this head (its classes, ...)."""
    return {}

  def summarize(self, sums: Mapping[str, float], rows: Mapping[str, np.ndarray], chars_per_token: float
                ) -> dict[str, float]:
    """Eval sums (and rows) over a split -> metrics."""
    del rows
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

  def final_report(self, experiment: Any, params: Any) -> dict[str, Any]:
    """Figures computed once after training and by --mode eval, beyond the eval metrics (files in the workdir)."""
    del experiment, params
    return {}

  # -- generation ----------------------------------------------------------
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
      prompts: `lm.prompts.Prompt`s (e.g. `lm.prompts.read_prompts_file`),
        decoded together in batches of prompts of one token length.

    Returns:
      num_samples texts per prompt, prompt by prompt: `lm.prompts.Sample`s,
      strs (the prompt + its continuation) that also carry prompt_index,
      prompt, where and the beam score. On windows, sampling may run past the
      context (re-prefilled segments) while beam search stays within it; on
      sentences, decoding starts after BOS + the prompt's tokens and EOS is a
      stop token. A prompt longer than the context is a ConfigError naming it.
    """
    from lm import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
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
    """A `lm.prompts.Prompt`'s token ids (sentences: BOS first), checked to fit the context."""
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
    from lm import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
    body = prompt_ids[1:] if self.sentences else prompt_ids
    head = self.decode_text(body)
    # Decoding the new ids together with the prompt's keeps what a subword tokenizer drops at the start of a
    # text (SentencePiece's leading space); the prompt's own text is then taken off again.
    full = self.decode_text(np.concatenate([body, new]).astype(np.int32))
    continuation = full[len(head):] if full.startswith(head) else self.decode_text(new)
    return (head if self.sentences else prompt.text) + prompts_lib.cut_at_stop_strings(continuation, stops)

  def decode_text(self, ids: Any) -> str:
    """Generated ids -> text (sentences stop at EOS; specials decode to nothing)."""
    if self.vocab is not None:
      return self.vocab.decode(self.tokenizer, ids)
    return self.tokenizer.decode(np.asarray(ids))


class MultiOptimizer:
  """One optax optimizer per top-level part of the params (a GAN's players).

  `as_transformation()` is what the train state is built with: its state is
  {part: that part's optimizer state}, so Orbax saves and restores all of
  them, sharded like their parameters. A step updates one part at a time with
  `update(part, grads, opt_state, params)`.
  """

  def __init__(self, parts: Mapping[str, optax.GradientTransformation]):
    self.parts = dict(parts)

  def init(self, params: Mapping[str, Any]) -> dict[str, Any]:
    missing = set(self.parts) - set(params)
    if missing:
      raise ValueError(f"The params have no part(s) {sorted(missing)} for their optimizers.")
    return {name: tx.init(params[name]) for name, tx in self.parts.items()}

  def update(self, part: str, grads: Any, opt_state: dict[str, Any], params: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Updates `params[part]` with `grads` (of that part); returns (params, opt_state)."""
    updates, new_part_state = self.parts[part].update(grads, opt_state[part], params[part])
    params = dict(params, **{part: optax.apply_updates(params[part], updates)})
    return params, dict(opt_state, **{part: new_part_state})

  def as_transformation(self) -> optax.GradientTransformation:
    def update_all(grads, state, params=None):
      updates, new_state = {}, {}
      for name, tx in self.parts.items():
        updates[name], new_state[name] = tx.update(grads[name], state[name], None if params is None else params[name])
      return updates, new_state
    return optax.GradientTransformation(self.init, update_all)


def make_head(config: ml_collections.ConfigDict, model_config: TransformerConfig, tokenizer: Tokenizer) -> Head:
  """The head `config.head` names."""
  if config.head == "vae":
    from lm.heads.vae import VAEHead  # pylint: disable=g-import-not-at-top
    return VAEHead(config, model_config, tokenizer)
  if config.head == "gan":
    from lm.heads.gan import GANHead  # pylint: disable=g-import-not-at-top
    return GANHead(config, model_config, tokenizer)
  if config.head == "classifier":
    from lm.heads.classifier import ClassifierHead  # pylint: disable=g-import-not-at-top
    return ClassifierHead(config, model_config, tokenizer)
  return Head(config, model_config, tokenizer)
