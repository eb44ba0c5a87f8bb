"""Continuous batching (lm.serve.engine) against --mode sample's decoding, without HTTP."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import load_config
from lm.experiment import load_trained
from lm.inference import sample as sample_lib
from lm.serve import engine as engine_lib
from tests.serve.conftest import CONFIG, serve_overrides

PROMPTS = ["ROMEO:", "First Citizen:\nWe are", "a", "KING HENRY:\nThe", "O", "What say you", "To be, or not"]


def test_per_row_choice_is_filter_logits_row_by_row():
  logits = jax.random.normal(jax.random.key(0), (6, 50)) * 3
  top_k = jnp.array([0, 1, 5, 49, 50, 7])
  top_p = jnp.array([1.0, 0.9, 0.5, 1.0, 0.3, 0.05])
  filtered = sample_lib.filter_logits_per_row(logits, top_k, top_p)
  for row in range(6):
    expected = sample_lib.filter_logits(logits[row:row + 1], int(top_k[row]), float(top_p[row]))
    np.testing.assert_array_equal(filtered[row:row + 1], expected)
  zero = jnp.zeros(6)
  greedy = sample_lib.choose_tokens_per_row(logits, jax.random.split(jax.random.key(1), 6), zero, top_k, top_p)
  np.testing.assert_array_equal(greedy, sample_lib.choose_tokens(logits, jax.random.key(2), 0.0, 0, 1.0))


@pytest.fixture(scope="module")
def loaded(trained_run):
  config = load_config(CONFIG, serve_overrides(**{"sample.temperature": 0.0, "sample.max_tokens": 10}))
  experiment, params, _ = load_trained(config, str(trained_run), "serve")
  # A 40-step model continues most prompts with spaces; noise on its weights makes the greedy continuations
  # depend on every token, so a decoding that differs anywhere shows.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  noisy = jax.tree.unflatten(treedef, [leaf + 0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
                                       for leaf, key in zip(leaves, keys)])
  return config, experiment, noisy


def _engine(experiment, params, max_batch, block=4):
  task = experiment.task
  return engine_lib.Engine(task.model, params, "v", max_batch=max_batch, max_queue=64, block=block,
                           text_of=task.continuation_text,
                           token_text=lambda token: task.decode_text(np.asarray([token])),
                           context=experiment.steps.context)


def _decode_all(engine, experiment, prompts, settings):
  texts, done = {}, threading.Semaphore(0)

  def listener(index):
    def on(event):
      if event.kind == "text":
        texts[index] = texts.get(index, "") + event.text
      elif event.kind in ("done", "error"):
        assert event.kind == "done", event.text
        done.release()
    return on

  for index, prompt in enumerate(prompts):
    ids = np.asarray(experiment.task.tokenizer.encode(prompt), np.int32)
    engine.submit(engine_lib.Request(ids, settings, listener(index)))
  for _ in prompts:
    assert done.acquire(timeout=120)
  return [texts.get(index, "") for index in range(len(prompts))]


def test_greedy_continuous_batching_equals_sample_mode_alone_and_among_31_others(loaded):
  max_batch = 32  # alone, a request is decoded over one slot (width 1); among 31 others over 8, 16 or 32
  config, experiment, params = loaded
  prompts = (PROMPTS * 5)[:32]
  with experiment.steps.context():  # what --mode sample runs (test_sample checks sample_checkpoint is this)
    expected = {prompt: experiment.task.sample(params, config.sample, prompt)[0] for prompt in PROMPTS}
  assert len(set(expected.values())) == len(PROMPTS) and len({text[-5:] for text in expected.values()}) > 3
  engine = _engine(experiment, params, max_batch)
  engine.warm_up()
  compiled = engine.slots_model.compile_counts()
  assert compiled["prefill"] == 2 and compiled["choose"] == 1  # buckets 16 and 32 (max_len 32)
  engine.start()
  try:
    texts = _decode_all(engine, experiment, prompts, engine_lib.Settings(max_tokens=10, temperature=0.0))
    alone = _decode_all(engine, experiment, prompts[:1], engine_lib.Settings(max_tokens=10, temperature=0.0))
    sampled = _decode_all(engine, experiment, prompts[:8], engine_lib.Settings(
        max_tokens=12, temperature=0.9, top_k=5, top_p=0.9, n=min(2, max_batch), stop=("\n",)))
    with pytest.raises(ValueError, match="decode slots"):
      engine.submit(engine_lib.Request([np.ones(3, np.int32)] * (max_batch + 1), engine_lib.Settings(), print))
  finally:
    engine.stop()
  assert [prompt + text for prompt, text in zip(prompts, texts)] == [expected[prompt] for prompt in prompts]
  assert prompts[0] + alone[0] == expected[prompts[0]]
  assert all("\n" not in text for text in sampled)
  assert engine.slots_model.compile_counts() == compiled  # nothing compiled after the warm-up


def test_a_held_engine_queues_and_a_full_queue_refuses(loaded):
  _, experiment, params = loaded
  engine = _engine(experiment, params, 2)
  engine.max_queue = 2
  engine.start()
  events = []
  try:
    with engine.hold():
      ids = np.asarray(experiment.task.tokenizer.encode("ROMEO:"), np.int32)
      for _ in range(2):
        engine.submit(engine_lib.Request(ids, engine_lib.Settings(max_tokens=3), events.append))
      with pytest.raises(engine_lib.QueueFullError):
        engine.submit(engine_lib.Request(ids, engine_lib.Settings(max_tokens=3), events.append))
      assert engine.queue_depth == 2 and not events
    for _ in range(1000):
      if sum(event.kind == "done" for event in events) == 2:
        break
      threading.Event().wait(0.01)
  finally:
    engine.stop()
  assert sum(event.kind == "done" for event in events) == 2


def test_a_cancelled_request_frees_its_slots_at_the_next_step(loaded):
  # What the API does when a client goes away mid-stream or a request passes its time limit.
  _, experiment, params = loaded
  engine = _engine(experiment, params, 4, block=1)  # a step per call: the cancel lands mid-sequence
  events = []
  request = None

  def listener(event):
    events.append(event)
    if event.kind == "text":
      request.cancelled = True

  ids = np.asarray(experiment.task.tokenizer.encode("ROMEO:"), np.int32)
  request = engine_lib.Request(ids, engine_lib.Settings(max_tokens=20, temperature=0.0, n=2), listener)
  engine.start()
  try:
    engine.submit(request)
    for _ in range(1000):
      if events and engine.busy_slots == 0:
        break
      threading.Event().wait(0.01)
    assert engine.busy_slots == 0
    texts = [event for event in events if event.kind == "text"]
    assert 1 <= len(texts) <= 2 and not [event for event in events if event.kind in ("finish", "done")]
    done = threading.Event()
    engine.submit(engine_lib.Request(ids, engine_lib.Settings(max_tokens=3),
                                     lambda event: event.kind == "done" and done.set()))
    assert done.wait(60)  # the freed slots serve the next request
  finally:
    engine.stop()
