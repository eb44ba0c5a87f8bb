"""Gradient accumulation is the engine's, for every task: k micro-batches give the step of one global batch.

Each task's loss is run through the engine's one `make_train_step` with
grad_accum_steps 1 and 2 on the same batch, from the same
parameters, with an SGD that also keeps the gradient it was given in its
state: the gradients of every update (a GAN's last critic update and its
generator's too) and every reported metric agree to a relative 1e-5 in
float32. The cases use what makes a mean of micro-batch means wrong
(sentences of different lengths, class weights) and per-row randomness
(word and token dropout, a VAE's latent sample, a GAN's noise), all of which
accumulation must not change. Model dropout is off: its masks are drawn per
micro-batch by design (lm.train.step). SFT and DPO start from a language model
(a 1-step run of the module) and read records: SFT's responses differ in
length; DPO's loss is normalized by pairs and its reference differs from its
policy (rewards and accuracy that are not all zero). Distillation's teacher is that language model's run (its
frozen weights are those init_state draws, unlike the student's): the hard and soft terms both accumulate.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from lm.app import train as train_mode
from lm.config import load_config
from lm.data import pipeline
from lm.experiment import build_experiment, open_train_split, token_windows
from lm.online.step import Regularization, make_online_step
from lm.train import optim
from lm.train import step as step_lib
from lm.train.state import TrainState
from tests.helpers import ROOT, SHARED, tiny_overrides, toy_preferences, toy_responses, write_records

LR = 1e-3  # small: a GAN's second critic update starts from the first's parameters
SENTENCES = {
    "data.source": str(SHARED / "data" / "sst2"), "data.text_field": "sentence", "data.format": "sentences",
    "data.train_split": "dev", "data.eval_split": "dev", "data.tokenizer": "char", "seq_len": 32,
}
CASES = {
    "lm_windows": {},
    "lm_sentences": {**SENTENCES},
    "vae": {**SENTENCES, "head": "vae", "vae.word_dropout": 0.3, "vae.latent_size": 8},
    "relgan": {**SENTENCES, "head": "gan", "gan.kind": "relgan", "gan.critic_steps": 2, "gan.mle_weight": 0.5},
    "latent": {**SENTENCES, "head": "gan", "gan.kind": "latent", "gan.critic_steps": 2, "vae.latent_size": 8,
               "gan.hidden_size": 16, "gan.noise_size": 8},
    "denoise": {**SENTENCES, "head": "denoise", "denoise.rate": 0.3},
    "classifier": {**SENTENCES, "head": "classifier", "data.label_field": "label",
                   "classifier.class_weights": "balanced", "classifier.label_smoothing": 0.1,
                   "classifier.token_dropout": 0.2},
    # data.source and init_from: the module's records and language model (`tuning`)
    "sft": {"head": "sft"},
    "dpo": {"head": "dpo", "dpo.beta": 0.5, "dpo.label_smoothing": 0.1},
    # distill.teacher: the module's language model (`tuning`); init_state leaves the teacher unlike the student
    "distill": {"head": "distill", "distill.temperature": 2.0, "distill.alpha": 0.3},
}


@pytest.fixture(scope="module")
def tuning(tmp_path_factory):
  """{"sft"/"dpo"/"distill": overrides}: the records and the language model (trained 1 step; `_run` starts from
  init_state, so only its shapes and tokenizer matter) of the tasks that tune one."""
  root = tmp_path_factory.mktemp("tuning")
  config = load_config(str(ROOT / "experiments" / "shakespeare_char.py"),
                       tiny_overrides(**{"model.dropout": 0.0, "steps": 1, "eval_every": 100, "checkpoint_every": 1}))
  train_mode.train(config, str(root / "lm"))
  records = {"sft": write_records(root / "sft", train=toy_responses(32, seed=0), validation=toy_responses(8, seed=1)),
             "dpo": write_records(root / "dpo", train=toy_preferences(32, seed=0),
                                  validation=toy_preferences(8, seed=1))}
  return {**{name: {"init_from": str(root / "lm"), "data.source": str(folder)} for name, folder in records.items()},
          "distill": {"distill.teacher": str(root / "lm")}}


def _build(tmp_path, case: str, extra: dict | None = None):
  config = load_config(str(ROOT / "experiments" / "shakespeare_char.py"),
                       tiny_overrides(**{"model.dropout": 0.0, **CASES[case], **(extra or {})}))
  experiment, _ = build_experiment(config, str(tmp_path / case), "train")
  examples = token_windows(experiment, open_train_split(config), config.data.train_stride, train=True)
  dataset = pipeline.train_dataset(examples, seed=config.seed, global_batch_size=config.batch_size,
                                   rows=experiment.process_rows)
  batch = pipeline.to_global_batch(dataset[0], experiment.steps.batch_shardings, config.batch_size)
  return experiment, batch


def _recording_sgd() -> optax.GradientTransformation:
  """SGD whose state is the gradient of its last update: the accumulated gradient itself, to compare."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jax.numpy.zeros_like, params),
                                      lambda grads, state, params=None: (jax.tree.map(lambda g: -LR * g, grads), grads))


def _sgd_like(tx):
  """The recording SGD with the task's optimizer's structure (one per GAN player)."""
  if isinstance(tx, optim.MultiOptimizer):
    return optim.MultiOptimizer({part: _recording_sgd() for part in tx.parts})
  return _recording_sgd()


def _run(experiment, make_step, batch, ks, inputs=None):
  """{k: (the step's gradients, metrics)} from the same initial parameters (a DPO reference moved off its
  policy, which init_state makes equal)."""
  initial = experiment.init_state()
  if "reference" in initial.params:
    initial = initial.replace(params={**initial.params,
                                      "reference": jax.tree.map(lambda x: x * 0.9, initial.params["reference"])})
  sgd = _sgd_like(experiment.tx)
  out = {}
  with experiment.steps.context():
    for k in ks:
      state = TrainState(step=initial.step, params=initial.params, opt_state=sgd.init(initial.params),
                         rng=initial.rng)
      step = jax.jit(make_step(sgd, k))
      new_state, metrics = step(state, batch) if inputs is None else step(state, batch, inputs)
      out[k] = (jax.device_get(new_state.opt_state), {name: float(value) for name, value in metrics.items()})
  return out


def _assert_same_step(results):
  reference_grads, reference_metrics = results[1]
  assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(reference_grads))
  for k, (grads, metrics) in results.items():
    # Relative to each parameter's largest gradient entry, so its small entries cannot hide a wrong one.
    for (path, expected), got in zip(jax.tree_util.tree_leaves_with_path(reference_grads), jax.tree.leaves(grads)):
      scale = np.max(np.abs(np.asarray(expected)))
      error = np.max(np.abs(np.asarray(got) - np.asarray(expected)))
      assert error <= 1e-5 * scale + 1e-12, (k, jax.tree_util.keystr(path), error, scale)
    assert metrics.keys() == reference_metrics.keys()
    for name, value in metrics.items():
      assert value == pytest.approx(reference_metrics[name], rel=1e-5, abs=1e-7), (k, name)


@pytest.mark.parametrize("case", list(CASES))
def test_every_task_accumulates_to_the_step_of_the_whole_batch(tmp_path, case, request):
  extra = request.getfixturevalue("tuning")[case] if case in ("sft", "dpo", "distill") else None  # trained if asked
  experiment, batch = _build(tmp_path, case, extra)
  task = experiment.task

  def make_step(tx, k):
    return step_lib.make_train_step(task.updates(), tx, grad_accum_steps=k, loss_totals=task.loss_totals,
                                    prepare=task.prepare, step_metrics=task.step_metrics)

  _assert_same_step(_run(experiment, make_step, batch, (1, 2)))
  halves = [task.loss_totals(jax.tree.map(lambda x, i=i: x[4 * i:4 * i + 4], batch)) for i in (0, 1)]
  if "mask" in batch or "label" in batch:
    # The two halves' normalizers differ (tokens, class weights): a mean of micro-batch means would not do.
    assert any(float(halves[0][key]) != float(halves[1][key]) for key in halves[0]), halves


def test_the_online_loss_accumulates_too(tmp_path):
  """The online step (l2-init, EWC, distillation on replayed rows) is the engine's step with another loss."""
  experiment, batch = _build(tmp_path, "lm_windows")
  is_replay = np.zeros(batch["inputs"].shape[0], bool)
  is_replay[[1, 2, 3, 6]] = True  # 3 replayed rows in the first half, 1 in the second: unequal distill weights
  batch = dict(batch, is_replay=jax.numpy.asarray(is_replay))
  params = experiment.init_state().params
  anchor = jax.tree.map(lambda x: x * 0.9, params)  # a pull towards somewhere else, and a teacher that differs
  fisher = jax.tree.map(lambda x: jax.numpy.ones_like(x) * 2.0, params)
  reg = Regularization(l2_init=0.1, ewc=0.05, distill=0.5, distill_temperature=2.0)

  def make_step(tx, k):
    return make_online_step(experiment.model, tx, reg, grad_accum_steps=k)  # its direction: the recording SGD

  inputs = {"lr": np.float32(1.0), "anchor": anchor, "fisher": fisher}
  results = _run(experiment, make_step, batch, (1, 2), inputs=inputs)
  _assert_same_step(results)
  assert results[1][1]["train/distill"] > 0 and results[1][1]["train/replay_rows"] == 4
