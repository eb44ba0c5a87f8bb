"""Decoding (lm.sample): stop tokens, beam search with the KV cache, the no-cache baseline and its benchmark."""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sample
from lm.models import TransformerConfig, TransformerLM

VOCAB, MAX_LEN, PROMPT_LEN, NEW = 13, 16, 3, 6


def make(variant: str = "gpt2", vocab: int = VOCAB, **options) -> tuple[TransformerLM, dict]:
  """A tiny model and random parameters: normal(0, 0.3) weights, unit norm scales.

  The parameters are drawn with numpy in the shapes flax's init would give
  (a compiled init costs over a second per model on CPU). The spread is
  larger than training's 0.02, so greedy choices are never near-ties that
  float rounding could flip.
  """
  config = TransformerConfig.from_config(dict(variant=variant, num_layers=2, num_heads=2, width=16, **options),
                                         vocab_size=vocab, max_len=MAX_LEN)
  model = TransformerLM(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, MAX_LEN), jnp.int32))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if path[-1].key == "scale":
      return jnp.ones(leaf.shape, jnp.float32)
    return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), jnp.float32)

  return model, jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))


def prompts(batch: int = 2, vocab: int = VOCAB, seed: int = 1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, PROMPT_LEN), 0, vocab, jnp.int32)


def greedy(model, params, prompt, new=NEW, **options) -> np.ndarray:
  return np.asarray(sample.generate(model, params, prompt, jax.random.key(0), max_new_tokens=new, temperature=0.0,
                                    **options))


@functools.partial(jax.jit, static_argnames=("model", "prompt_len"))
def _token_log_probs(params, tokens, model, prompt_len):
  log_probs = jax.nn.log_softmax(model.apply({"params": params}, tokens[:, :-1]))[:, prompt_len - 1:]
  return jnp.take_along_axis(log_probs, tokens[:, prompt_len:, None], axis=-1)[..., 0]


def log_prob_sums(model, params, prompt, continuations, lengths=None) -> np.ndarray:
  """log P(continuation[:length] | prompt) by a full forward pass.

  prompt [batch, p], continuations [batch, n, new], lengths [batch, n] (default: new) -> [batch, n].
  """
  batch, count, new = continuations.shape
  continuations = np.where(continuations < 0, 0, continuations)  # pad ids past the lengths: any token will do
  tokens = jnp.concatenate([jnp.repeat(prompt, count, axis=0), jnp.asarray(continuations.reshape(batch * count, new))],
                           axis=1)
  picked = np.asarray(_token_log_probs(params, tokens, model, prompt.shape[1])).reshape(batch, count, new)
  lengths = np.full((batch, count), new) if lengths is None else np.asarray(lengths)
  return np.where(np.arange(new) < lengths[..., None], picked, 0.0).sum(-1)


@pytest.fixture(scope="module")
def gpt2():
  return make()


@pytest.mark.parametrize("variant,options", [
    ("gpt2", {}),
    ("gpt2", {"scan_layers": True}),
    ("llama", {"num_kv_heads": 1}),
    ("llama", {"num_kv_heads": 1, "scan_layers": True}),
])
def test_beam_size_one_is_greedy_and_scores_its_log_prob(variant, options):
  model, params = make(variant, **options)
  prompt = prompts()
  tokens, scores = sample.beam_search(model, params, prompt, beam_size=1, max_new_tokens=NEW, length_penalty=0.0)
  assert tokens.shape == (2, 1, NEW) and scores.shape == (2, 1)
  expected = greedy(model, params, prompt)
  np.testing.assert_array_equal(np.asarray(tokens[:, 0]), expected)
  np.testing.assert_allclose(np.asarray(scores), log_prob_sums(model, params, prompt, expected[:, None]),
                             rtol=1e-5, atol=1e-4)


def test_top_k_one_sampling_is_greedy(gpt2):
  model, params = gpt2
  prompt = prompts(batch=4)
  sampled = sample.generate(model, params, prompt, jax.random.key(7), max_new_tokens=NEW, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(sampled), greedy(model, params, prompt))


def test_beam_search_with_enough_beams_is_exhaustive_search():
  vocab, new, beams = 5, 3, 25  # 25 = 5 ** (new - 1) beams keep every prefix: the search is exact
  model, params = make(vocab=vocab)
  prompt = prompts(batch=2, vocab=vocab)
  tokens, scores = sample.beam_search(model, params, prompt, beam_size=beams, max_new_tokens=new,
                                      length_penalty=0.0)
  every = np.asarray(list(itertools.product(range(vocab), repeat=new)), np.int32)  # [125, new]
  totals = log_prob_sums(model, params, prompt, np.broadcast_to(every, (2,) + every.shape))
  best_first = np.argsort(-totals, axis=1, kind="stable")[:, :beams]
  np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(totals, best_first, axis=1), rtol=1e-5,
                             atol=1e-4)
  np.testing.assert_array_equal(np.asarray(tokens[:, 0]), every[best_first[:, 0]])  # the exact argmax
  # And each returned beam's score is its own sequence's log-probability.
  np.testing.assert_allclose(np.asarray(scores), log_prob_sums(model, params, prompt, np.asarray(tokens)),
                             rtol=1e-5, atol=1e-4)


def test_beams_are_sorted_distinct_and_beat_greedy(gpt2):
  model, params = gpt2
  prompt = prompts(batch=3)
  tokens, scores = sample.beam_search(model, params, prompt, beam_size=4, max_new_tokens=NEW)  # length_penalty 1
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  assert tokens.shape == (3, 4, NEW) and np.isfinite(scores).all()
  assert (np.diff(scores, axis=1) <= 0).all()  # best first
  for row in tokens:
    assert len({tuple(beam) for beam in row}) == 4  # distinct
  penalty = ((5 + NEW) / 6) ** 1.0  # no stop tokens: every beam has NEW tokens
  np.testing.assert_allclose(scores, log_prob_sums(model, params, prompt, tokens) / penalty, rtol=1e-5, atol=1e-4)
  greedy_sums = log_prob_sums(model, params, prompt, greedy(model, params, prompt)[:, None])[:, 0]
  assert (scores[:, 0] * penalty >= greedy_sums - 1e-4).all()


def test_generate_pads_after_the_first_stop_token(gpt2):
  model, params = gpt2
  prompt, rng = prompts(batch=4), jax.random.key(3)
  free = np.asarray(sample.generate(model, params, prompt, rng, max_new_tokens=NEW + 4))
  stops = (int(free[0, 2]), int(free[1, 4]))  # rows 0 and 1 stop at the latest there
  stopped = np.asarray(sample.generate(model, params, prompt, rng, max_new_tokens=NEW + 4, stop_tokens=stops,
                                       pad_id=-1))
  cut = sample.truncate_at_stop(free, stops)
  assert len(cut[0]) <= 3 and len(cut[1]) <= 5
  for row_free, row_stopped, prefix in zip(free, stopped, cut):
    n = len(prefix)
    np.testing.assert_array_equal(row_stopped[:n], row_free[:n])  # the same samples up to the stop, kept
    assert (row_stopped[n:] == -1).all()
    if n < len(row_free):
      assert prefix[-1] in stops and not np.isin(prefix[:-1], stops).any()
  for got, want in zip(sample.truncate_at_stop(stopped, stops), cut):
    np.testing.assert_array_equal(got, want)


def test_truncate_at_stop_returns_the_prefixes():
  tokens = np.array([[4, 2, 9, 2], [1, 1, 1, 1], [9, 0, 0, 0]])
  got = sample.truncate_at_stop(tokens, (2, 9))
  assert [row.tolist() for row in got] == [[4, 2], [1, 1, 1, 1], [9]]
  assert [row.tolist() for row in sample.truncate_at_stop(tokens, ())] == tokens.tolist()
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    sample.truncate_at_stop(tokens[None], (2,))


def test_finished_beams_are_padded_and_keep_their_score(gpt2):
  model, params = gpt2
  prompt = prompts(batch=2)
  logits = model.apply({"params": params}, prompt)[:, -1]
  first_log_probs = np.asarray(jax.nn.log_softmax(logits))
  stop = int(np.argmax(first_log_probs[0]))  # row 0's most likely first token ends a beam at once
  for alpha in (0.0, 1.0):
    tokens, scores = sample.beam_search(model, params, prompt, beam_size=4, max_new_tokens=NEW, stop_tokens=(stop,),
                                        pad_id=-1, length_penalty=alpha)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert (np.diff(scores, axis=1) <= 0).all()
    is_stop = tokens == stop
    lengths = np.where(is_stop.any(-1), is_stop.argmax(-1) + 1, NEW)
    for beam, length in zip(tokens.reshape(-1, NEW), lengths.reshape(-1)):
      assert (beam[length:] == -1).all()
    # Finished: the score is the prefix's log-probability, no cost added after the stop.
    totals = log_prob_sums(model, params, prompt, tokens, lengths)
    np.testing.assert_allclose(scores, totals / ((5 + lengths) / 6) ** alpha, rtol=1e-5, atol=1e-4)
    assert tokens[0, :, 0].tolist().count(stop) == 1
    if alpha == 0.0:  # nothing can beat stopping on the best first token: later tokens only cost
      np.testing.assert_array_equal(tokens[0, 0], [stop] + [-1] * (NEW - 1))
      np.testing.assert_allclose(scores[0, 0], first_log_probs[0, stop], rtol=1e-5, atol=1e-5)


def test_beam_size_one_with_stop_tokens_is_greedy_with_stop_tokens(gpt2):
  model, params = gpt2
  prompt = prompts(batch=3)
  stops = (int(greedy(model, params, prompt)[0, 1]),)
  tokens, _ = sample.beam_search(model, params, prompt, beam_size=1, max_new_tokens=NEW, stop_tokens=stops, pad_id=0)
  np.testing.assert_array_equal(np.asarray(tokens[:, 0]), greedy(model, params, prompt, stop_tokens=stops))


def test_decoding_without_cache_matches_and_is_benchmarked(gpt2):
  model, params = gpt2
  prompt = prompts(batch=3)
  full = sample.generate_without_cache(model, params, prompt, max_new_tokens=MAX_LEN - PROMPT_LEN + 1)
  np.testing.assert_array_equal(np.asarray(full), greedy(model, params, prompt, new=MAX_LEN - PROMPT_LEN + 1))
  figures = sample.decode_benchmark(model, params, batch_size=2, prompt_len=PROMPT_LEN, new_tokens=NEW, repeats=2)
  assert figures["cached_tokens_per_s"] > 0 and figures["uncached_tokens_per_s"] > 0
  assert figures["tokens_match"] and figures["speedup"] > 0


def test_bad_inputs_are_rejected_with_the_fix(gpt2):
  model, params = gpt2
  prompt = prompts()
  with pytest.raises(ValueError, match="beam_size=0"):
    sample.beam_search(model, params, prompt, beam_size=0, max_new_tokens=2)
  too_many = MAX_LEN - PROMPT_LEN + 2
  with pytest.raises(ValueError, match=f"max_len={MAX_LEN}.*at most {too_many - 1} new tokens"):
    sample.beam_search(model, params, prompt, beam_size=2, max_new_tokens=too_many)
  with pytest.raises(ValueError, match="max_len"):
    sample.generate(model, params, prompt, jax.random.key(0), max_new_tokens=too_many)
  with pytest.raises(ValueError, match="max_len"):
    sample.generate_without_cache(model, params, prompt, max_new_tokens=too_many)
  with pytest.raises(ValueError, match="max_len"):
    sample.decode_benchmark(model, params, batch_size=1, prompt_len=MAX_LEN, new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    sample.beam_search(model, params, prompt, beam_size=2, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"stop_tokens \[13\]"):
    sample.generate(model, params, prompt, jax.random.key(0), max_new_tokens=2, stop_tokens=(13,))
  with pytest.raises(ValueError, match=r"\[batch, prompt_len\]"):
    sample.beam_search(model, params, prompt[0], beam_size=2, max_new_tokens=2)
