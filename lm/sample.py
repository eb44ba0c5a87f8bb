"""Autoregressive decoding with the KV cache: greedy, temperature, top-k, top-p.

The prompt is prefilled in one call, then each new token is one cached step
inside a `lax.scan`, so the whole generation is a single jitted function.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lm.models import TransformerLM


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Masks logits outside the top-k and outside the top-p nucleus. logits: [batch, vocab]."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose mass reaches top_p: a token stays if the
    # mass before it is still below top_p.
    keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def choose_tokens(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Next token ids [batch] from logits [batch, vocab]; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p"))
def generate(model: TransformerLM, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Continues `prompt` [batch, prompt_len] by `max_new_tokens`; returns [batch, max_new_tokens].

  prompt_len + max_new_tokens must not exceed the model's max_len.
  """
  batch = prompt.shape[0]
  cache = model.init_cache(batch)
  logits, variables = model.apply({"params": params, "cache": cache}, prompt, decode=True, mutable=["cache"])
  first = choose_tokens(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k, top_p)

  def step(carry, index):
    cache, token = carry
    logits, variables = model.apply({"params": params, "cache": cache}, token[:, None], decode=True,
                                    mutable=["cache"])
    next_token = choose_tokens(logits[:, -1], jax.random.fold_in(rng, index), temperature, top_k, top_p)
    return (variables["cache"], next_token), token

  (_, last), tokens = jax.lax.scan(step, (variables["cache"], first), jnp.arange(1, max_new_tokens))
  tokens = jnp.concatenate([tokens, last[None]], axis=0) if max_new_tokens > 1 else last[None]
  return tokens.T


def generate_long(model: TransformerLM, params: Any, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Like `generate`, but for outputs longer than the model's context.

  Generates in segments: when the context is full it keeps the last half of
  it as the next segment's prompt (re-prefilled into a fresh cache), as
  nanoGPT crops the context to block_size. Returns [batch, max_new_tokens].
  """
  max_len = model.config.max_len
  keep = max(max_len // 2, 1)
  context = prompt[:, -(max_len - 1):] if prompt.shape[1] >= max_len else prompt
  produced = []
  remaining, segment = max_new_tokens, 0
  while remaining > 0:
    room = max_len - context.shape[1] + 1
    count = min(room, remaining)
    new = generate(model, params, context, jax.random.fold_in(rng, segment), max_new_tokens=count,
                   temperature=temperature, top_k=top_k, top_p=top_p)
    produced.append(new)
    remaining -= count
    segment += 1
    context = jnp.concatenate([context, new], axis=1)[:, -keep:]
  return jnp.concatenate(produced, axis=1)
