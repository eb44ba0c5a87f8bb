"""Decoding (lm.inference.sample, lm.inference.prompts, LMTask.sample): stop tokens, beam search with the KV cache, many prompts,
prompts files and stop strings, the no-cache baseline and its benchmark (also in --mode bench)."""

from __future__ import annotations

import functools
import itertools
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.inference import prompts as prompts_lib
from lm.inference import sample
from lm.config import ConfigError, apply_overrides, validate
from lm.data.tokenizers import CharTokenizer
from lm.tasks.lm import LMTask
from lm.models import TransformerConfig, TransformerLM
from lm.experiment import model_config_for
from tests.helpers import ROOT, cli_args, run_cli, tiny_overrides

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


# -- many prompts, prompts files, stop strings (lm.inference.prompts, LMTask.sample, --mode sample) -------
def random_params(model, max_len: int = MAX_LEN, seed: int = 0) -> dict:
  """Parameters of `model` drawn as `make` draws them (spread 0.3: no near-ties for greedy choices)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, max_len), jnp.int32))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "scale":
      return jnp.ones(leaf.shape, jnp.float32)
    return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes))


def ragged_prompts(lengths=(3, 1, 3, 2, 3), seed: int = 3) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, length).astype(np.int32) for length in lengths]


def test_prompts_of_different_lengths_decode_as_they_would_alone(gpt2):
  model, params = gpt2
  ids = ragged_prompts()
  # 2 rows per batch: the three 3-token prompts take a full batch and one padded with a copy of its row.
  got = prompts_lib.decode_batched(model, params, ids, count=1, rows_per_batch=2, max_new_tokens=NEW,
                                   temperature=0.0)
  for prompt, (continuation,) in zip(ids, got):
    np.testing.assert_array_equal(continuation.tokens, greedy(model, params, jnp.asarray(prompt[None]))[0])
    assert continuation.score is None
  stops = (int(got[0][0].tokens[1]), int(got[2][0].tokens[0]))
  stopped = prompts_lib.decode_batched(model, params, ids, count=1, rows_per_batch=2, max_new_tokens=NEW,
                                       temperature=0.0, stop_tokens=stops, pad_id=-1)
  for (free,), (continuation,) in zip(got, stopped):  # each cut after its first stop token
    np.testing.assert_array_equal(continuation.tokens, sample.truncate_at_stop(free.tokens[None], stops)[0])
  assert len(stopped[0][0].tokens) <= 2 and stopped[0][0].tokens[-1] in stops


def test_beams_of_many_prompts_are_each_prompts_own_best_beams(gpt2):
  model, params = gpt2
  ids = ragged_prompts((4, 2, 4, 4))
  got = prompts_lib.decode_batched(model, params, ids, count=2, rows_per_batch=6, max_new_tokens=NEW, beam_size=3,
                                   length_penalty=0.6)  # 6 rows = 2 prompts x 3 beams per batch
  for prompt, continuations in zip(ids, got):
    tokens, scores = sample.beam_search(model, params, jnp.asarray(prompt[None]), beam_size=3, max_new_tokens=NEW,
                                        length_penalty=0.6)
    assert len(continuations) == 2
    for beam, continuation in enumerate(continuations):
      np.testing.assert_array_equal(continuation.tokens, np.asarray(tokens)[0, beam])
      assert continuation.score == pytest.approx(float(scores[0, beam]), rel=1e-5, abs=1e-5)
  with pytest.raises(ValueError, match="count=4 beams asked of beam_size=3"):
    prompts_lib.decode_batched(model, params, ids, count=4, rows_per_batch=6, max_new_tokens=NEW, beam_size=3)


def test_generate_long_stops_across_segments(gpt2):
  model, params = gpt2
  prompt, rng, new = prompts(batch=3), jax.random.key(5), MAX_LEN + 4  # two segments: 14 + 6 tokens
  free = np.asarray(sample.generate_long(model, params, prompt, rng, max_new_tokens=new))
  stops = (int(free[0, MAX_LEN - 1]),)  # row 0 stops in the second segment at the latest
  stopped = np.asarray(sample.generate_long(model, params, prompt, rng, max_new_tokens=new, stop_tokens=stops,
                                            pad_id=-1))
  assert stopped.shape == free.shape
  for row_free, row_stopped, prefix in zip(free, stopped, sample.truncate_at_stop(free, stops)):
    np.testing.assert_array_equal(row_stopped[:len(prefix)], prefix)
    assert (row_stopped[len(prefix):] == -1).all()


def test_prompts_files(tmp_path):
  text = tmp_path / "prompts.txt"
  text.write_text("ROMEO:\n\nJULIET:\\nO Romeo\\\\n\n  \n\ufeffend\n", encoding="utf-8")
  read = prompts_lib.read_prompts_file(str(text))
  assert [p.text for p in read] == ["ROMEO:", "JULIET:\nO Romeo\\n", "  ", "\ufeffend"]
  assert [p.where for p in read] == ["prompts.txt line 1", "prompts.txt line 3", "prompts.txt line 4",
                                     "prompts.txt line 5"]
  lines = tmp_path / "prompts.jsonl"
  lines.write_text('{"prompt": "a\\nb", "id": 7}\n\n{"prompt": "c"}\n', encoding="utf-8")
  assert [(p.text, p.where) for p in prompts_lib.read_prompts_file(str(lines))] == [
      ("a\nb", "prompts.jsonl line 1"), ("c", "prompts.jsonl line 3")]
  bad = {
      "missing.txt": (None, "does not exist"),
      "empty.txt": ("\n\n", "holds no prompts"),
      "blank.jsonl": ("  \n", "holds no prompts"),
      "broken.jsonl": ('{"prompt": "a"}\n{"prompt": "b"\n', r"broken.jsonl line 2 is not valid JSON"),
      "field.jsonl": ('{"text": "a"}\n', r'field.jsonl line 1 has no string "prompt" field'),
      "number.jsonl": ('{"prompt": 3}\n', r'number.jsonl line 1 has no string "prompt" field'),
      "prompts.csv": ("a\n", r"'.csv' file"),
  }
  for name, (content, message) in bad.items():
    if content is not None:
      (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message):
      prompts_lib.read_prompts_file(str(tmp_path / name))
  (tmp_path / "latin.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
  with pytest.raises(ConfigError, match="latin.txt line 2 is not valid UTF-8"):
    prompts_lib.read_prompts_file(str(tmp_path / "latin.txt"))


def test_stop_strings():
  assert prompts_lib.cut_at_stop_strings("abc\n\ndef END", ("END", "\n\n")) == "abc"
  assert prompts_lib.cut_at_stop_strings("abc", ("x",)) == "abc"
  assert prompts_lib.cut_at_stop_strings("abc", ()) == "abc"
  tokenizer = CharTokenizer.from_texts(["abc\n"])
  assert prompts_lib.single_token_stops(tokenizer, ("\n", "ab", "c", "z")) == tuple(
      sorted(int(tokenizer.encode(s)[0]) for s in ("\n", "c")))  # "z" is <unk>, which decodes to nothing


def lm_head(tiny_config, **extra):
  """A head="lm" task on a small char vocabulary with random parameters (nothing trained)."""
  config = tiny_config(**{"seq_len": MAX_LEN, "batch_size": 4, **extra})
  tokenizer = CharTokenizer.from_texts(["abcdefgh :\n"])
  head = LMTask(config, model_config_for(config, tokenizer), tokenizer)
  return head, random_params(head.model)


def sample_options(head, **options):
  return apply_overrides(head.config, {f"sample.{key}": value for key, value in options.items()}).sample


def test_head_samples_many_prompts_cut_at_stop_strings(tiny_config):
  head, params = lm_head(tiny_config)
  items = [prompts_lib.Prompt(text, f"p.txt line {n}") for n, text in enumerate(["ab", "h:\nc", "ab", "gg"], 1)]
  # 10 new tokens fit after every prompt: one segment, one compile per batch shape.
  options = sample_options(head, temperature=0.0, max_tokens=10, num_samples=2, stop=("\n", "fa"))
  texts = head.sample(params, options, prompts=items)
  assert len(texts) == 8 and all(isinstance(text, prompts_lib.Sample) for text in texts)
  assert [text.prompt_index for text in texts] == [0, 0, 1, 1, 2, 2, 3, 3]
  for text in texts:
    prompt = items[text.prompt_index]
    assert text.startswith(prompt.text) and text.where == prompt.where and text.score is None
    continuation = text[len(prompt.text):]
    assert "\n" not in continuation and "fa" not in continuation
  assert texts[0] == texts[1] == texts[4]  # greedy: the same prompt, the same text
  for index in (1, 3):  # alone, a prompt gives what it gave among the others
    assert head.sample(params, options, prompts=[items[index]])[0] == texts[2 * index]
  beams = head.sample(params, sample_options(head, beam_size=3, num_samples=2, max_tokens=8, stop=("\n",)),
                      prompts=items[:2])
  assert [text.prompt_index for text in beams] == [0, 0, 1, 1]
  assert beams[0].score >= beams[1].score and all("\n" not in text[len(items[text.prompt_index].text):]
                                                   for text in beams)
  assert beams[0] != beams[1]  # distinct beams


def test_head_refuses_prompts_that_do_not_fit(tiny_config):
  head, params = lm_head(tiny_config)
  options = sample_options(head, temperature=0.0, max_tokens=4)
  with pytest.raises(ConfigError, match=f"p.txt line 2 has {MAX_LEN + 1} tokens, more than the model's context"):
    head.sample(params, options, prompts=[prompts_lib.Prompt("ab", "p.txt line 1"),
                                          prompts_lib.Prompt("a" * (MAX_LEN + 1), "p.txt line 2")])
  with pytest.raises(ConfigError, match="p.txt line 1 encodes to no tokens"):
    head.sample(params, options, prompts=[prompts_lib.Prompt("", "p.txt line 1")])


def test_sentence_heads_stop_at_eos(tiny_config):
  head, params = lm_head(tiny_config, **{"data.format": "sentences"})
  options = sample_options(head, temperature=0.0, max_tokens=40, num_samples=1)
  texts = head.sample(params, options, prompts=[prompts_lib.Prompt("ab"), prompts_lib.Prompt(" cd ")])
  ids = [np.concatenate([[head.vocab.bos], head.tokenizer.encode(text)]) for text in ("ab", "cd")]
  for text, prompt_ids in zip(texts, ids):
    alone = greedy(head.model, params, jnp.asarray(prompt_ids[None]), new=MAX_LEN - len(prompt_ids) + 1)[0]
    assert text == head.decode_text(np.concatenate([prompt_ids[1:], alone]))  # up to EOS, specials dropped
  with pytest.raises(ConfigError, match=f"no room left in seq_len={MAX_LEN}"):
    head.sample(params, options, prompts=[prompts_lib.Prompt("a" * MAX_LEN)])


def test_sample_options_are_validated(tiny_config):
  with pytest.raises(ConfigError, match="num_samples=4 best beams asked of beam_size=2"):
    validate(tiny_config(**{"sample.beam_size": 2, "sample.num_samples": 4}), "sample")
  with pytest.raises(ConfigError, match="beam_size=0"):
    validate(tiny_config(**{"sample.beam_size": 0}), "sample")
  with pytest.raises(ConfigError, match="non-empty strings"):
    validate(tiny_config(**{"sample.stop": ("",)}), "sample")
  with pytest.raises(ConfigError, match="length_penalty=-1"):
    validate(tiny_config(**{"sample.length_penalty": -1.0}), "sample")
  with pytest.raises(ConfigError, match=re.escape(
      "continue prompts with a language model (config.head in ('lm', 'denoise', 'sft', 'dpo', 'distill'), sample.kind='continue')")):
    validate(tiny_config(**{"sample.beam_size": 2, "head": "vae", "data.format": "sentences",
                            "sample.kind": "prior"}), "sample")
  with pytest.raises(ConfigError, match="decode_batches"):
    validate(tiny_config(**{"bench.decode_batches": (2, 0)}), "bench")


# -- decode throughput in --mode bench ------------------------------------------------
def test_bench_reports_decode_throughput_with_and_without_the_cache(tiny_config):
  from lm.app import bench  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"bench.steps": 2, "bench.warmup_steps": 1, "bench.decode_batches": (2, 3),
                          "bench.decode_tokens": 100})
  figures = bench.benchmark(config)
  assert figures["decode/b2/cached_tokens_per_sec"] > 0 and figures["decode/b2/uncached_tokens_per_sec"] > 0
  assert figures["decode/b2/speedup"] == pytest.approx(
      figures["decode/b2/cached_tokens_per_sec"] / figures["decode/b2/uncached_tokens_per_sec"])
  # The uncached baseline runs at the first batch size only.
  assert figures["decode/b3/cached_tokens_per_sec"] > 0 and "decode/b3/uncached_tokens_per_sec" not in figures
  # 100 new tokens do not fit a context of 32: the last 32 positions are decoded, after a 1-token prompt.
  assert (figures["decode/batch_sizes"], figures["decode/new_tokens"], figures["decode/prompt_len"]) == ([2, 3], 32, 1)
  off = types.SimpleNamespace(config=apply_overrides(config, {"bench.decode": False}), task=LMTask)
  assert bench.decode_figures(off, None) == {}
  # On a CPU the figures say how the MFU's peak was derived (lm.train.perf.cpu_peak), shared by the devices.
  if jax.default_backend() == "cpu":
    assert figures["cpu_peak"]["peak_flops"] == pytest.approx(figures["peak_flops_per_device"] * jax.local_device_count())
    assert figures["cpu_peak"]["source"] in ("flags x clock", "calibrated matmul")


# -- --mode sample on the command line --------------------------------------------------
@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny trained run (10 steps of the baseline, shrunk)."""
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  from lm.app.train import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("sample") / "run"
  train(load_config(str(ROOT / "experiments" / "shakespeare_char.py"), tiny_overrides(steps=10)), str(workdir))
  return workdir


def test_prompts_file_beam_search_and_stop_strings_on_the_command_line(trained_workdir, tmp_path):
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text('{"prompt": "ROMEO:"}\n\n{"prompt": "KING:"}\n{"prompt": "To be"}\n')
  result = run_cli("--config", "experiments/shakespeare_char.py", "--workdir", str(trained_workdir), "--mode", "sample",
                   *cli_args(steps=10, **{"sample.prompts_file": prompts_file, "sample.beam_size": 3,
                                          "sample.num_samples": 2, "sample.max_tokens": 12}),
                   "--config.sample.stop=('\\n', 'e ')", check=True)
  headers = [line for line in result.stdout.splitlines() if line.startswith("--- sample")]
  assert len(headers) == 6
  for index, (header, (prompt, line)) in enumerate(zip(headers, [("ROMEO:", 1)] * 2 + [("KING:", 3)] * 2 +
                                                                  [("To be", 4)] * 2)):
    assert header.startswith(f"--- sample {index} (prompt {index // 2}, prompts.jsonl line {line}; score -")
  texts = result.stdout.split("--- sample")[1:]
  for text, prompt in zip(texts, ["ROMEO:"] * 2 + ["KING:"] * 2 + ["To be"] * 2):
    body = text.split("---\n", 1)[1].rstrip("\n")  # print() ends each sample with one newline
    assert body.startswith(prompt) and "\n" not in body and "e " not in body[len(prompt):]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ROMEO:"}\n{"prompt": ROMEO}\n')
  result = run_cli("--config", "experiments/shakespeare_char.py", "--workdir", str(trained_workdir), "--mode", "sample",
                   *cli_args(steps=10, **{"sample.prompts_file": bad}))
  assert result.returncode == 2 and "error:" in result.stderr and "bad.jsonl line 2 is not valid JSON" in result.stderr
