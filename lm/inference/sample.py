"""Autoregressive decoding with the KV cache: greedy, temperature, top-k, top-p, beam search.

The prompt is prefilled in one call, then each new token is one cached step
inside a `lax.while_loop`, so the whole generation is a single jitted
function; with stop tokens the loop ends once every row has stopped.

* `generate`: sampling (temperature 0 is greedy), optionally padded after a
  stop token; `truncate_at_stop` cuts the rows on the host.
* `generate_long`: sampling past the model's context, in re-prefilled segments.
* Many prompts of different lengths, a prompts file, stop strings:
  `lm.inference.prompts` (what `--mode sample` runs).
* `beam_search`: beam search over the KV cache, GNMT length penalty.
* `generate_without_cache` and `decode_benchmark`: the no-cache greedy
  baseline (the whole fixed-length buffer recomputed per token) and the
  decode throughput of both (for `--mode bench`).

Lengths: the last new token is returned but never fed back, so a prompt of
`prompt_len` tokens continued by `max_new_tokens` fills
`prompt_len + max_new_tokens - 1` cache positions, at most the model's max_len.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from lm.models.transformer import TransformerLM


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Masks logits outside the top-k and outside the top-p nucleus. logits: [batch, vocab]."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    logits = _nucleus(logits, top_p)
  return logits


def _nucleus(logits: jax.Array, top_p: Any) -> jax.Array:
  """Masks logits [batch, vocab] outside the top-p nucleus; top_p a float or [batch, 1]."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probabilities = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is still below top_p.
  keep_sorted = (jnp.cumsum(probabilities, axis=-1) - probabilities) < top_p
  threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def filter_logits_per_row(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """`filter_logits` with each row's own top_k [batch] (0: off) and top_p [batch] (1: off), as arrays, so rows
  of different requests share one compiled step (the server's continuous batching)."""
  vocab = logits.shape[-1]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  kth = jnp.take_along_axis(sorted_logits, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
  logits = jnp.where(((top_k > 0) & (top_k < vocab))[:, None] & (logits < kth), -jnp.inf, logits)
  return jnp.where((top_p < 1.0)[:, None], _nucleus(logits, top_p[:, None]), logits)


def choose_tokens(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Next token ids [batch] from logits [batch, vocab]; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def choose_tokens_per_row(logits: jax.Array, rngs: jax.Array, temperature: jax.Array, top_k: jax.Array,
                          top_p: jax.Array) -> jax.Array:
  """`choose_tokens` with each row's own settings: logits [batch, vocab], rngs [batch] keys, temperature
  [batch] (0: greedy, the argmax as `choose_tokens` takes it), top_k [batch], top_p [batch] -> ids [batch]."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  filtered = filter_logits_per_row(scaled, top_k, top_p)
  sampled = jax.vmap(lambda rng, row: jax.random.categorical(rng, row))(rngs, filtered).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


# -- argument checks (shapes are static, so these also run at trace time) ---
def _check_lengths(model: TransformerLM, prompt: Any, max_new_tokens: int, caller: str) -> None:
  """Raises ValueError unless prompt is [batch, prompt_len >= 1] and the decode fits in the model's max_len."""
  shape = tuple(np.shape(prompt))
  if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
    raise ValueError(f"{caller}: prompt has shape {shape}; pass token ids [batch, prompt_len] with at least one "
                     "row and one token (e.g. a BOS token).")
  if max_new_tokens < 1:
    raise ValueError(f"{caller}: max_new_tokens={max_new_tokens}; ask for at least 1 new token.")
  prompt_len, max_len = shape[1], model.config.max_len
  if prompt_len + max_new_tokens - 1 > max_len:
    raise ValueError(
        f"{caller}: prompt_len={prompt_len} + max_new_tokens={max_new_tokens} needs "
        f"{prompt_len + max_new_tokens - 1} positions (the last new token is not fed back), beyond the model's "
        f"max_len={max_len}; shorten the prompt, ask for at most {max(max_len - prompt_len + 1, 0)} new tokens, "
        "or use generate_long (sampling only).")


def _check_stop_tokens(model: TransformerLM, stop_tokens: Iterable[int], caller: str) -> tuple[int, ...]:
  """stop_tokens as a tuple of Python ints (a hashable static argument), each a token id of the model's vocab."""
  if isinstance(stop_tokens, (int, np.integer)):
    stop_tokens = (stop_tokens,)
  stops = tuple(int(token) for token in stop_tokens)
  vocab = model.config.vocab_size
  bad = [token for token in stops if not 0 <= token < vocab]
  if bad:
    raise ValueError(f"{caller}: stop_tokens {bad} are not token ids of the vocabulary [0, {vocab}); pass ids "
                     "the model can produce (e.g. the EOS id).")
  return stops


def _pad_after_stop(tokens: jax.Array, stop_tokens: tuple[int, ...], pad_id: int) -> jax.Array:
  """tokens [..., length] with every position after a row's first stop token set to pad_id (the stop kept)."""
  if not stop_tokens:
    return tokens
  is_stop = jnp.isin(tokens, jnp.asarray(stop_tokens, tokens.dtype)).astype(jnp.int32)
  stopped_before = (jnp.cumsum(is_stop, axis=-1) - is_stop) > 0
  return jnp.where(stopped_before, jnp.asarray(pad_id, tokens.dtype), tokens)


def truncate_at_stop(tokens: Any, stop_tokens: Iterable[int]) -> list[np.ndarray]:
  """Host side: each row of tokens [batch, length] up to and including its first stop token.

  Rows without a stop token are returned whole. For beam search's [batch,
  beam_size, length] output pass `tokens.reshape(-1, length)` (or one
  example's beams).
  """
  rows = np.asarray(tokens)
  if rows.ndim != 2:
    raise ValueError(f"truncate_at_stop: tokens has shape {rows.shape}; pass [batch, length] (reshape beam "
                     "search's [batch, beam_size, length] to [batch * beam_size, length]).")
  stops = np.asarray([int(token) for token in stop_tokens], dtype=rows.dtype)
  out = []
  for row in rows:
    hits = np.flatnonzero(np.isin(row, stops)) if stops.size else ()
    out.append(row[:hits[0] + 1].copy() if len(hits) else row.copy())
  return out


# -- sampling ----------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_tokens", "pad_id"))
def _generate(model: TransformerLM, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int,
              temperature: float, top_k: int, top_p: float, stop_tokens: tuple[int, ...], pad_id: int) -> jax.Array:
  batch = prompt.shape[0]
  cache = model.init_cache(batch)
  logits, variables = model.apply({"params": params, "cache": cache}, prompt, decode=True, mutable=["cache"])
  first = choose_tokens(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k, top_p)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

  def is_stop(token):
    if not stop_tokens:
      return jnp.zeros(token.shape, bool)
    return jnp.isin(token, jnp.asarray(stop_tokens, jnp.int32))

  def more(carry):
    _, _, index, _, done = carry
    # With stop tokens the loop ends as soon as every row has stopped, so a
    # batch that stops early does not pay for the rest of max_new_tokens.
    return (index < max_new_tokens) & ~jnp.all(done) if stop_tokens else index < max_new_tokens

  def step(carry):
    cache, token, index, out, done = carry
    logits, variables = model.apply({"params": params, "cache": cache}, token[:, None], decode=True,
                                    mutable=["cache"])
    next_token = choose_tokens(logits[:, -1], jax.random.fold_in(rng, index), temperature, top_k, top_p)
    # A stopped row keeps decoding (the batch shares the loop) but writes pad_id.
    out = jax.lax.dynamic_update_index_in_dim(out, jnp.where(done, pad_id, next_token), index, axis=1)
    return variables["cache"], next_token, index + 1, out, done | is_stop(next_token)

  carry = (variables["cache"], first, jnp.asarray(1, jnp.int32), out, is_stop(first))
  return jax.lax.while_loop(more, step, carry)[3]


def generate(model: TransformerLM, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_tokens: Iterable[int] = (),
             pad_id: int = 0) -> jax.Array:
  """Continues `prompt` [batch, prompt_len] by `max_new_tokens`; returns [batch, max_new_tokens] int32.

  One jitted prefill + a `lax.while_loop` of cached steps (the jitted core
  takes every keyword argument as static). temperature 0 is greedy; top_k 0
  and top_p 1 keep the whole distribution. Once a row has produced one of
  `stop_tokens` (the token itself is kept), every later position of that row
  is `pad_id`, and the loop ends when every row has stopped;
  `truncate_at_stop` cuts the rows there on the host.

  prompt_len + max_new_tokens - 1 must not exceed the model's max_len (the
  last new token is never fed back); `generate_long` goes further.
  """
  _check_lengths(model, prompt, max_new_tokens, "generate")
  stops = _check_stop_tokens(model, stop_tokens, "generate")
  return _generate(model, params, prompt, rng, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, stop_tokens=stops, pad_id=int(pad_id))


def generate_long(model: TransformerLM, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_tokens: Iterable[int] = (),
                  pad_id: int = 0) -> jax.Array:
  """Like `generate`, but for outputs longer than the model's context.

  Generates in segments: when the context is full it keeps the last half of
  it as the next segment's prompt (re-prefilled into a fresh cache), as
  nanoGPT crops the context to block_size; a prompt longer than the context
  keeps its last max_len tokens. Returns [batch, max_new_tokens]; with
  `stop_tokens`, positions after a row's first stop token are `pad_id` and no
  further segment starts once every row has stopped.
  """
  stops = _check_stop_tokens(model, stop_tokens, "generate_long")
  max_len = model.config.max_len
  keep = max(max_len // 2, 1)
  context = prompt[:, -max_len:]
  produced = []
  remaining, segment = max_new_tokens, 0
  while remaining > 0:
    room = max_len - context.shape[1] + 1
    count = min(room, remaining)
    new = generate(model, params, context, jax.random.fold_in(rng, segment), max_new_tokens=count,
                   temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops, pad_id=pad_id)
    produced.append(new)
    remaining -= count
    segment += 1
    if stops and remaining and bool(jnp.all(jnp.any(jnp.isin(jnp.concatenate(produced, axis=1),
                                                             jnp.asarray(stops, jnp.int32)), axis=1))):
      produced.append(jnp.full((prompt.shape[0], remaining), pad_id, jnp.int32))
      break
    # Stopped rows hold pad_id, which need not be a token id: clip it into the vocabulary (those rows are
    # padded in the output anyway).
    context = jnp.concatenate([context, jnp.clip(new, 0, model.config.vocab_size - 1)], axis=1)[:, -keep:]
  # Each segment restarts its own stop tracking; rows stopped in an earlier one are padded here.
  return _pad_after_stop(jnp.concatenate(produced, axis=1), stops, pad_id)


# -- beam search -------------------------------------------------------------
def _cache_batch_axes(model: TransformerLM) -> Any:
  """The batch axis of every cache array (-1: none, e.g. the scalar `position` and the `cache_index` counters).

  Found by comparing the cache's shapes for batch 1 and 2, so it holds for
  the unrolled layers ([batch, max_len, kv_heads, head_dim]) and for
  `scan_layers` ([layers, batch, ...]) alike.
  """
  one = jax.eval_shape(functools.partial(model.init_cache, 1))
  two = jax.eval_shape(functools.partial(model.init_cache, 2))

  def axis(a, b):
    differ = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return differ[0] if differ else -1

  return jax.tree.map(axis, one, two)


def length_penalty_factor(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT's length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 for alpha 0.

  Beam search ranks a hypothesis by log P(tokens) / this factor, with length
  the generated tokens up to and including the stop token. alpha > 0 offsets
  the preference of raw log-probability sums for short outputs.
  """
  if alpha == 0.0:
    return jnp.ones(jnp.shape(length), jnp.float32)
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_new_tokens", "length_penalty",
                                             "stop_tokens", "pad_id"))
def _beam_search(model: TransformerLM, params: Any, prompt: jax.Array, *, beam_size: int, max_new_tokens: int,
                 length_penalty: float, stop_tokens: tuple[int, ...], pad_id: int) -> tuple[jax.Array, jax.Array]:
  batch, beams, steps = prompt.shape[0], beam_size, max_new_tokens
  vocab = model.config.vocab_size
  axes = _cache_batch_axes(model)

  # Prefill once per example, then one copy of the cache per beam: rows
  # b * beam_size + k, as `jnp.repeat` along each array's batch axis lays them.
  logits, variables = model.apply({"params": params, "cache": model.init_cache(batch)}, prompt, decode=True,
                                  mutable=["cache"])
  cache = jax.tree.map(lambda x, axis: x if axis < 0 else jnp.repeat(x, beams, axis=axis), variables["cache"], axes)
  log_probs = jnp.broadcast_to(jax.nn.log_softmax(logits[:, -1])[:, None], (batch, beams, vocab))

  # Only beam 0 starts live, so the first step's candidates are the distinct
  # tokens after the prompt rather than beam_size copies of each.
  state = dict(
      log_prob=jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)[None].repeat(batch, axis=0),  # raw sums [b, k]
      length=jnp.zeros((batch, beams), jnp.int32),  # generated tokens up to and including the stop token
      finished=jnp.zeros((batch, beams), bool),
      tokens=jnp.full((batch, beams, steps), pad_id, jnp.int32),
      score=jnp.zeros((batch, beams), jnp.float32),  # log_prob / length penalty, what the beams are ranked by
  )
  # A finished beam has one continuation, pad at zero cost: candidate 0 of its
  # vocab row (the token written is pad_id whatever the vocab holds).
  only_first = jnp.where(jnp.arange(vocab) == 0, 0.0, -jnp.inf)

  def select(state, log_probs, t):
    """Top beam_size of the beam x vocab candidates; returns the new state, parents [b, k] and tokens [b, k]."""
    finished = state["finished"]
    candidate_log_prob = state["log_prob"][..., None] + jnp.where(finished[..., None], only_first, log_probs)
    candidate_length = state["length"] + (~finished).astype(jnp.int32)
    candidate_score = candidate_log_prob / length_penalty_factor(candidate_length, length_penalty)[..., None]
    score, index = jax.lax.top_k(candidate_score.reshape(batch, beams * vocab), beams)
    parent, token = index // vocab, (index % vocab).astype(jnp.int32)

    def by_parent(x):
      return jnp.take_along_axis(x, parent.reshape(parent.shape + (1,) * (x.ndim - 2)), axis=1)

    parent_finished = by_parent(finished)
    written = jnp.where(parent_finished, pad_id, token)
    now_finished = parent_finished
    if stop_tokens:
      now_finished = now_finished | jnp.isin(written, jnp.asarray(stop_tokens, jnp.int32))
    new_state = dict(
        log_prob=jnp.take_along_axis(candidate_log_prob.reshape(batch, beams * vocab), index, axis=1),
        length=by_parent(candidate_length),
        finished=now_finished,
        tokens=jax.lax.dynamic_update_index_in_dim(by_parent(state["tokens"]), written, t, axis=2),
        score=score,
    )
    return new_state, parent, token

  def more(carry):
    # Once every beam has finished, further steps only append free pad
    # tokens and keep every score, so the search can end there.
    _, state, _, t = carry
    return (t < steps - 1) & ~jnp.all(state["finished"])

  def step(carry):
    cache, state, log_probs, t = carry
    state, parent, token = select(state, log_probs, t)
    rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)
    cache = jax.tree.map(lambda x, axis: x if axis < 0 else jnp.take(x, rows, axis=axis), cache, axes)
    # A finished beam's model output is never used (its continuation is
    # forced), so feeding it any in-vocab token is fine.
    logits, variables = model.apply({"params": params, "cache": cache}, token.reshape(-1, 1), decode=True,
                                    mutable=["cache"])
    log_probs = jax.nn.log_softmax(logits[:, -1]).reshape(batch, beams, vocab)
    return variables["cache"], state, log_probs, t + 1

  _, state, log_probs, _ = jax.lax.while_loop(more, step, (cache, state, log_probs, jnp.asarray(0, jnp.int32)))
  # The last token needs no forward pass after it (nor any step, if every beam has finished).
  state = jax.lax.cond(jnp.all(state["finished"]), lambda state: state,
                       lambda state: select(state, log_probs, steps - 1)[0], state)
  return state["tokens"], state["score"]


def beam_search(model: TransformerLM, params: Any, prompt: jax.Array, *, beam_size: int, max_new_tokens: int,
                length_penalty: float = 1.0, stop_tokens: Iterable[int] = (),
                pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Beam search with the KV cache: the `beam_size` best continuations of each prompt row.

  Args:
    model, params: the language model.
    prompt: [batch, prompt_len] int token ids, prefilled once per row; the
      cache is then copied to batch * beam_size rows and reordered by the
      chosen parent beams at every step.
    beam_size: hypotheses kept per row (>= 1; 1 is greedy decoding).
    max_new_tokens: tokens generated per hypothesis; prompt_len +
      max_new_tokens - 1 must not exceed the model's max_len.
    length_penalty: alpha of GNMT's penalty (Wu et al. 2016): a hypothesis
      ranks by log P(tokens) / ((5 + length) / 6) ** alpha, length the
      generated tokens up to and including its stop token (all of them if it
      has none). 0 ranks by the raw log-probability sum; larger values favour
      longer outputs. Candidates are ranked this way at every step.
    stop_tokens: token ids that finish a hypothesis; a finished hypothesis
      keeps its log-probability and length (so its score is frozen) and
      continues only with `pad_id` at zero cost. The search ends early once
      every hypothesis of every row has finished.
    pad_id: written after a hypothesis's stop token (any int; not fed to the model).

  Returns:
    tokens [batch, beam_size, max_new_tokens] int32 and scores [batch,
    beam_size] float32 (the length-penalized log-probabilities), best beam
    first. With beam_size above the number of distinct hypotheses (e.g.
    more beams than vocab entries after one step) the extra beams score -inf.
  """
  if beam_size < 1:
    raise ValueError(f"beam_search: beam_size={beam_size}; keep at least 1 hypothesis (1 is greedy decoding).")
  _check_lengths(model, prompt, max_new_tokens, "beam_search")
  stops = _check_stop_tokens(model, stop_tokens, "beam_search")
  return _beam_search(model, params, prompt, beam_size=int(beam_size), max_new_tokens=int(max_new_tokens),
                      length_penalty=float(length_penalty), stop_tokens=stops, pad_id=int(pad_id))


# -- the no-cache baseline and the decode benchmark ------------------------
@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate_without_cache(model: TransformerLM, params: Any, prompt: jax.Array, *,
                            max_new_tokens: int) -> jax.Array:
  batch, prompt_len = prompt.shape
  length = prompt_len + max_new_tokens - 1
  buffer = jnp.zeros((batch, length), jnp.int32).at[:, :prompt_len].set(prompt.astype(jnp.int32))

  def body(t, carry):
    buffer, out = carry
    # The model is causal: position prompt_len - 1 + t sees only the tokens
    # written so far, whatever the buffer holds after it.
    logits = model.apply({"params": params}, buffer)
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1 + t, axis=1, keepdims=False)
    token = jnp.argmax(last, axis=-1).astype(jnp.int32)
    out = out.at[:, t].set(token)
    buffer = buffer.at[:, prompt_len + t].set(token, mode="drop")  # the last token is not fed back
    return buffer, out

  _, out = jax.lax.fori_loop(0, max_new_tokens, body, (buffer, jnp.zeros((batch, max_new_tokens), jnp.int32)))
  return out


def generate_without_cache(model: TransformerLM, params: Any, prompt: jax.Array, *,
                           max_new_tokens: int) -> jax.Array:
  """Greedy decoding without a KV cache: prompt [batch, prompt_len] -> [batch, max_new_tokens] int32.

  The baseline the cache is measured against, with static shapes as XLA
  wants them: every new token reruns the forward pass over the whole
  fixed-length buffer [batch, prompt_len + max_new_tokens - 1], the positions
  not yet written included (one jitted `fori_loop`, one compile). That is
  more work than recomputing only the prefix so far: for a 1-token prompt,
  twice as much on average, so the cache's speedup over it is about twice its
  speedup over a prefix-only recompute. It gives the same tokens as
  `generate(..., temperature=0.0)`.
  """
  _check_lengths(model, prompt, max_new_tokens, "generate_without_cache")
  return _generate_without_cache(model, params, prompt, max_new_tokens=int(max_new_tokens))


def decode_benchmark(model: TransformerLM, params: Any, *, batch_size: int, prompt_len: int, new_tokens: int,
                     repeats: int = 3, uncached: bool = True) -> dict[str, Any]:
  """Greedy decode throughput with the KV cache (`generate`) and without (`generate_without_cache`).

  Each is called once to compile (not timed), then `repeats` times, timed
  to `jax.block_until_ready`; the fastest run counts. tokens/s counts new
  tokens only: batch_size * new_tokens / seconds (the prompt's prefill is
  inside the cached run's time). The prompt is random token ids.

  Returns: {"cached_tokens_per_s", "uncached_tokens_per_s", "cached_seconds",
  "uncached_seconds", "speedup" (cached / uncached throughput), "tokens_match"
  (both gave the same greedy tokens), "batch_size", "prompt_len",
  "new_tokens", "repeats"}; with `uncached=False` only the cached run is
  timed, and the "uncached_*", "speedup" and "tokens_match" entries are absent.
  """
  if batch_size < 1 or prompt_len < 1 or new_tokens < 1 or repeats < 1:
    raise ValueError(f"decode_benchmark: batch_size={batch_size}, prompt_len={prompt_len}, "
                     f"new_tokens={new_tokens}, repeats={repeats}; each must be at least 1.")
  prompt = jax.random.randint(jax.random.key(0), (batch_size, prompt_len), 0, model.config.vocab_size, jnp.int32)
  _check_lengths(model, prompt, new_tokens, "decode_benchmark")
  runs = {
      "cached": lambda: generate(model, params, prompt, jax.random.key(1), max_new_tokens=new_tokens,
                                 temperature=0.0),
      "uncached": lambda: generate_without_cache(model, params, prompt, max_new_tokens=new_tokens),
  }
  if not uncached:
    del runs["uncached"]
  result: dict[str, Any] = dict(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
                                repeats=repeats)
  outputs = {}
  for name, run in runs.items():
    outputs[name] = np.asarray(jax.block_until_ready(run()))  # compiles
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(run())
      seconds.append(time.perf_counter() - start)
    result[f"{name}_seconds"] = min(seconds)
    result[f"{name}_tokens_per_s"] = batch_size * new_tokens / min(seconds)
  if not uncached:
    return result
  result["speedup"] = result["cached_tokens_per_s"] / result["uncached_tokens_per_s"]
  result["tokens_match"] = bool(np.array_equal(outputs["cached"], outputs["uncached"]))
  return result
