"""Document masking (data.document_mask): a window that packs several documents scores each as if it were alone.

Real models on CPU (2 layers, width 32, float32): each document's logits in a
packed window equal its logits run alone, for learned positions (GPT-2) and
RoPE (Llama, grouped-query), unrolled and scanned; without segment ids and
positions nothing changes; the loss skips exactly the targets that begin a
new document, through the full logits and fused with the output projection;
cuDNN's fallback on CPU; gradient accumulation; the LM task's batch keys.
"""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lm.data.tokenizers import CharTokenizer
from lm.models import TransformerConfig, TransformerLM, layers, losses
from lm.tasks import lm as lm_task
from lm.train import step as step_lib
from lm.train.state import TrainState

VOCAB, LENGTH = 50, 24
# Document lengths per row of the packed window (LENGTH + 1 tokens: inputs and targets are the window shifted by
# one). Row 0's first document began before the window; every row has three documents, cut at different places.
ROWS = ((8, 10, 7), (12, 5, 8), (3, 14, 8), (6, 6, 13))


# Options that change how the model computes, not its parameters.
NOT_IN_PARAMS = ("loss_impl", "loss_chunk_len", "attention_impl", "remat_policy")


def _config(variant: str, options: dict) -> TransformerConfig:
  return TransformerConfig.from_config(dict(variant=variant, num_layers=2, num_heads=4, width=32, **options),
                                       vocab_size=VOCAB, max_len=LENGTH)


def make(variant: str = "gpt2", **options) -> tuple[TransformerLM, dict]:
  """A tiny model and its parameters (from key 0: the same for every loss_impl, attention_impl and remat)."""
  shape = tuple(sorted((key, value) for key, value in options.items() if key not in NOT_IN_PARAMS))
  return TransformerLM(_config(variant, options)), _params(variant, shape)


@functools.lru_cache(maxsize=None)
def _params(variant: str, options: tuple) -> dict:
  model = TransformerLM(_config(variant, dict(options)))
  # Initialized under jit: one compilation instead of an op-by-op dispatch (seconds on a 2-core CPU).
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, LENGTH), jnp.int32))["params"])


def packed_batch(rows=ROWS, seed: int = 1) -> tuple[dict, np.ndarray, np.ndarray]:
  """A document-masked batch as the pipeline delivers it, and its raw windows and document ids [rows, LENGTH + 1].

  inputs/targets: the window shifted by one; mask: 0 where the target begins
  a new document; segment_ids: each input's document; positions: each
  input's place in its document (0 at the window start for the first one).
  """
  rng = np.random.default_rng(seed)
  windows = rng.integers(0, VOCAB, (len(rows), LENGTH + 1)).astype(np.int32)
  documents = np.stack([np.repeat(np.arange(len(lengths)), lengths) for lengths in rows]).astype(np.int32)
  assert documents.shape == windows.shape
  starts = np.concatenate([np.ones((len(rows), 1), bool), documents[:, 1:] != documents[:, :-1]], axis=1)
  index = np.broadcast_to(np.arange(LENGTH + 1), windows.shape)
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  batch = {"inputs": windows[:, :-1], "targets": windows[:, 1:],
           "mask": (documents[:, 1:] == documents[:, :-1]).astype(np.int32),
           "segment_ids": documents[:, :-1], "positions": positions[:, :-1].astype(np.int32)}
  return {key: jnp.asarray(value) for key, value in batch.items()}, windows, documents


def documents_of(row: int, windows: np.ndarray, documents: np.ndarray):
  """(start, tokens) of each document of a row's inputs."""
  inputs, ids = windows[row, :-1], documents[row, :-1]
  for doc in np.unique(ids):
    where = np.flatnonzero(ids == doc)
    yield where[0], inputs[where]


@functools.partial(jax.jit, static_argnums=0)
def logits(model, params, tokens, positions=None, segment_ids=None) -> jax.Array:
  return model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)


def alone(model, params, docs: list[np.ndarray]) -> list[jax.Array]:
  """Each document's logits [len, vocab] run alone, padded on the right to LENGTH (causal: padding unseen)."""
  padded = np.zeros((len(docs), LENGTH), np.int32)
  for row, document in enumerate(docs):
    padded[row, :len(document)] = document
  out = logits(model, params, jnp.asarray(padded))
  return [out[row, :len(document)] for row, document in enumerate(docs)]


def packed_logits(model, params, batch) -> jax.Array:
  return logits(model, params, batch["inputs"], batch["positions"], batch["segment_ids"])


def test_the_packed_batch_is_what_the_pipeline_delivers():
  batch, _, _ = packed_batch()
  np.testing.assert_array_equal(batch["positions"][0, :10], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1])
  np.testing.assert_array_equal(batch["segment_ids"][1, 10:14], [0, 0, 1, 1])
  # The target at input 11 is the second document's first token: not scored.
  assert int(batch["mask"][1, 11]) == 0 and int(batch["mask"].sum()) == len(ROWS) * (LENGTH - 2)


@pytest.mark.parametrize("variant, options", [
    ("gpt2", {}), ("llama", {"num_kv_heads": 2}),
    ("gpt2", {"scan_layers": True, "remat_policy": "full"}), ("llama", {"num_kv_heads": 2, "scan_layers": True})],
                         ids=["gpt2", "llama", "gpt2-scan-remat", "llama-scan"])
def test_each_packed_document_gets_the_logits_it_gets_alone(variant, options):
  model, params = make(variant, **options)
  batch, windows, documents = packed_batch(ROWS[:2])
  packed = packed_logits(model, params, batch)
  found = [(row, start, document) for row in range(2) for start, document in documents_of(row, windows, documents)]
  for (row, start, document), expected in zip(found, alone(model, params, [doc for _, _, doc in found])):
    np.testing.assert_allclose(packed[row, start:start + len(document)], expected, atol=1e-5,
                               err_msg=f"row {row}, document at {start}")
  # Without the mask the later documents see the earlier ones: the test would notice.
  plain = logits(model, params, batch["inputs"], batch["positions"])
  assert not np.allclose(plain[0, 8:], packed[0, 8:], atol=1e-3)


@pytest.mark.parametrize("variant, options", [("gpt2", {}), ("llama", {"num_kv_heads": 2})], ids=["gpt2", "llama"])
def test_one_document_from_position_zero_is_the_plain_forward(variant, options):
  model, params = make(variant, **options)
  tokens = packed_batch()[0]["inputs"]
  plain = logits(model, params, tokens)
  one = logits(model, params, tokens, jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), tokens.shape),
               jnp.zeros_like(tokens))
  np.testing.assert_array_equal(np.asarray(one), np.asarray(plain))


def test_decoding_and_wrong_shapes_are_refused():
  model, params = make()
  tokens = jnp.zeros((2, LENGTH), jnp.int32)
  with pytest.raises(ValueError, match="decode=True.*segment_ids"):
    model.apply({"params": params, "cache": model.init_cache(2)}, tokens[:, :4], decode=True,
                segment_ids=jnp.zeros((2, 4), jnp.int32), mutable=["cache"])
  with pytest.raises(ValueError, match="positions has shape"):
    model.apply({"params": params}, tokens, positions=jnp.zeros((2, 5), jnp.int32))


def cross_entropy(logits, targets) -> np.ndarray:
  """Per-token cross-entropy [..., length] in float64 numpy (no compilation per shape)."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  return log_z - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]


def _token_losses(model, params, batch) -> np.ndarray:
  return cross_entropy(packed_logits(model, params, batch), batch["targets"])


def test_the_loss_skips_exactly_the_first_token_of_each_document():
  model, params = make("llama", num_kv_heads=2, loss_impl="logits")
  batch, windows, documents = packed_batch()
  loss_sum, count = jax.jit(losses.lm_loss_sum, static_argnums=0)(model, params, batch)
  per_token = _token_losses(model, params, batch)
  scored = documents[:, 1:] == documents[:, :-1]
  assert float(count) == scored.sum() == len(ROWS) * (LENGTH - 2)
  np.testing.assert_allclose(float(loss_sum), per_token[scored].sum(), rtol=1e-6)
  # The same as the documents' own losses, each document run alone (its next-token predictions in the window).
  found = [(row, start, document) for row in range(len(ROWS))
           for start, document in documents_of(row, windows, documents)]
  total = 0.0
  for (row, start, document), doc_logits in zip(found, alone(model, params, [doc for _, _, doc in found])):
    # A document's last input predicts the next document's first token (not scored), except the window's last
    # document, whose next token is the window's extra one.
    n = len(document) if start + len(document) == LENGTH else len(document) - 1
    total += cross_entropy(doc_logits[:n], windows[row, start + 1:start + 1 + n]).sum()
  np.testing.assert_allclose(float(loss_sum), total, rtol=1e-5)


def _loss_and_grads(model, params, batch):
  def loss(p):
    loss_sum, count = losses.lm_loss_sum(model, p, batch)
    return loss_sum / count

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("variant, options", [("gpt2", {}), ("llama", {"num_kv_heads": 2})], ids=["tied", "untied"])
def test_the_fused_loss_equals_the_logits_loss_on_packed_documents(variant, options):
  model, params = make(variant, loss_impl="logits", **options)
  fused, _ = make(variant, loss_impl="fused", loss_chunk_len=8, **options)
  batch, _, _ = packed_batch()
  value, grads = _loss_and_grads(model, params, batch)
  fused_value, fused_grads = _loss_and_grads(fused, params, batch)
  np.testing.assert_allclose(fused_value, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), fused_grads, grads)
  # The eval step takes the same keys, through either path, and counts no "sentences" in windows.
  plain_eval = jax.jit(lm_task.make_eval_step(model))(params, batch)
  fused_eval = jax.jit(lm_task.make_eval_step(fused))(params, batch)
  assert "sentences" not in plain_eval and float(plain_eval["tokens"]) == len(ROWS) * (LENGTH - 2)
  per_token = _token_losses(model, params, batch)
  np.testing.assert_allclose(plain_eval["rows/loss_sum"], (per_token * np.asarray(batch["mask"])).sum(-1), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fused_eval, plain_eval)


@pytest.mark.parametrize("length", [LENGTH, LENGTH - 1], ids=["even", "odd"])
def test_cudnn_on_cpu_falls_back_to_the_same_logits(caplog, length):
  model, params = make()
  cudnn_model, _ = make(attention_impl="cudnn")
  batch = {key: value[:, :length] for key, value in packed_batch(ROWS[:2])[0].items()}
  layers._WARNED.clear()  # pylint: disable=protected-access  # the fallback warns once per message and process
  with caplog.at_level(logging.WARNING):
    out = packed_logits(cudnn_model, params, batch)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(packed_logits(model, params, batch)))
  warning = [r.getMessage() for r in caplog.records if "document mask" in r.getMessage()]
  assert warning and "using XLA's attention" in warning[0], caplog.text
  if length % 2:
    assert "even sequence length" in warning[0]


def _recording_sgd() -> optax.GradientTransformation:
  """SGD whose state is the gradient it was given (the accumulated gradient, to compare)."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda grads, state, params=None: (jax.tree.map(lambda g: -1e-3 * g, grads),
                                                                         grads))


def test_two_micro_batches_give_the_step_of_the_whole_batch():
  model, params = make("llama", num_kv_heads=2)
  batch, _, _ = packed_batch()
  # The halves score different numbers of targets: a mean of the micro-batches' means would be wrong.
  batch["mask"] = batch["mask"].at[0, 3:9].set(0)
  assert int(batch["mask"][:2].sum()) != int(batch["mask"][2:].sum())
  sgd = _recording_sgd()
  results = {}
  for k in (1, 2):
    step = step_lib.make_train_step(lm_task.make_loss_fn(model), sgd, grad_accum_steps=k,
                                    loss_totals=lm_task.loss_totals)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=sgd.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    new_state, metrics = jax.jit(step)(state, batch)
    results[k] = new_state.opt_state, metrics
  (grads_1, metrics_1), (grads_2, metrics_2) = results[1], results[2]
  for (path, expected), got in zip(jax.tree_util.tree_leaves_with_path(grads_1), jax.tree.leaves(grads_2)):
    scale = float(np.max(np.abs(expected)))
    assert float(np.max(np.abs(got - expected))) <= 1e-5 * scale + 1e-12, jax.tree_util.keystr(path)
  for name, value in metrics_1.items():
    assert float(metrics_2[name]) == pytest.approx(float(value), rel=1e-5), name
  expected_loss = _token_losses(model, params, batch)[np.asarray(batch["mask"]) > 0].mean()
  assert float(metrics_1["train/loss"]) == pytest.approx(expected_loss, rel=1e-5)


def _task(data_format: str, document_mask: bool) -> lm_task.LMTask:
  config = ml_collections.ConfigDict({"data": {"format": data_format, "document_mask": document_mask},
                                      "seq_len": LENGTH, "batch_size": 4, "grad_accum_steps": 1})
  model_config = TransformerConfig(vocab_size=VOCAB, num_layers=1, num_heads=2, width=16, max_len=LENGTH)
  return lm_task.LMTask(config, model_config, CharTokenizer("abc"))


def test_the_task_asks_for_the_document_keys_only_on_masked_windows():
  masked = _task("windows", True)
  assert masked.batch_ranks == {"inputs": 2, "targets": 2, "mask": 2, "segment_ids": 2, "positions": 2}
  example = masked.example_batch(2)
  assert {key: value.shape for key, value in example.items()} == {key: (2, LENGTH) for key in masked.batch_ranks}
  assert _task("windows", False).batch_ranks == {"inputs": 2, "targets": 2}
  # Sentences are one document a row already: the flag changes nothing there.
  assert _task("sentences", True).batch_ranks == _task("sentences", False).batch_ranks
  # The engine's totals come from the mask: the targets scored.
  batch, _, _ = packed_batch()
  assert float(masked.loss_totals(batch)["tokens"]) == len(ROWS) * (LENGTH - 2)
