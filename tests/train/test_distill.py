"""Distillation (`lm.tasks.distill`): the loss's two limits, a frozen teacher, a run through the CLI, bad input.

The teacher is a tiny 3-layer run trained here (1 step: only its shapes,
tokenizer and that it differs from the student matter); the student is the
2-layer tiny config. The loss: alpha = 0 is the language model's loss and
gradient exactly, at T = 1 and at another T; alpha = 1 with the student as its
own teacher is 0. Engine steps move the student and leave the teacher (loaded
from its run, not initialized) as it was, with no optimizer state. A run
through `python -m lm.main` trains and resumes (with the teacher of its own
checkpoint), and --mode eval reports the student's figures; a head="lm" run
can start from its student, --mode export writes the student, and a distill
run is refused as a teacher. A Hugging Face folder (the teacher exported) is a
teacher computing the same logits as the teacher's run. Each
bad teacher or setting is one user error naming config.distill.* before
anything is written; one of them also through `python -m lm.main` (exit code 2,
one `error:` line).
"""

from __future__ import annotations

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import interop
from lm.app import eval as eval_mode
from lm.app import export as export_mode
from lm.app import train as train_mode
from lm.config import load_config
from lm.core.errors import CheckpointError, ConfigError
from lm.data.tokenizers import CharTokenizer, load_tokenizer
from lm.experiment import TOKENIZER_DIR, build_experiment, initial_state
from lm.tasks.distill import STUDENT, TEACHER, make_distill_loss
from lm.models.transformer import TransformerLM
from lm.tasks.lm import make_loss_fn
from lm.train import checkpoint as checkpoint_lib
from lm.train import step as step_lib
from tests.helpers import ROOT, metric_rows, run_cli, snapshot, tiny_overrides

BASELINE = "experiments/shakespeare_char.py"


def overrides(**extra) -> dict:
  return tiny_overrides(**{"eval_every": 100, **extra})


def distill_settings(teacher, **extra) -> dict:
  # One learning-rate schedule whatever `steps` is: every distill run here (in this process, the CLI's first run and
  # its resumed copy) compiles the same train step, read back from the session's compilation cache after the first.
  return {"head": "distill", "distill.teacher": str(teacher), "optim.decay_steps": 20, **extra}


def config_of(**extra):
  return load_config(str(ROOT / BASELINE), overrides(**extra))


def args_of(**extra) -> list[str]:
  return [f"--config.{key}={value}" for key, value in overrides(**extra).items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """"teacher": a 3-layer tiny LM (1 step); "other_tokenizer": it with another char vocabulary of as many ids."""
  root = tmp_path_factory.mktemp("distill")
  found = {"teacher": root / "teacher", "other_tokenizer": root / "other_tokenizer"}
  train_mode.train(config_of(steps=1, checkpoint_every=1, **{"model.num_layers": 3}), str(found["teacher"]))
  shutil.copytree(found["teacher"], found["other_tokenizer"])
  ours = load_tokenizer(str(found["teacher"] / TOKENIZER_DIR))
  shutil.rmtree(found["other_tokenizer"] / TOKENIZER_DIR)
  CharTokenizer([chr(0x400 + i) for i in range(ours.vocab_size - 1)]).save(
      str(found["other_tokenizer"] / TOKENIZER_DIR))  # Cyrillic: as many ids, other characters
  return found


@pytest.fixture(scope="module")
def built(runs, tmp_path_factory):
  """A distill run built (nothing written) and its initial state: the teacher loaded from its run."""
  experiment, _ = build_experiment(config_of(**distill_settings(runs["teacher"])),
                                   str(tmp_path_factory.mktemp("built") / "work"), "train")
  state, _, how = initial_state(experiment)
  assert f"teacher from {runs['teacher']} step 1" in how
  return experiment, state


def _batch(vocab: int, seed: int = 0) -> dict[str, jax.Array]:
  ids = np.random.default_rng(seed).integers(0, vocab, (8, 33))
  return {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32)}


def _context(params) -> step_lib.StepContext:
  key = jax.random.key(0)
  return step_lib.StepContext(step=jnp.int32(0), rng=key, step_rng=key, rows=jnp.arange(8), repeat=jnp.int32(0),
                              totals={"rows": jnp.float32(8), "tokens": jnp.float32(8 * 32)}, params=params)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_logits(model, params, tokens):
  return model.apply({"params": params}, tokens)


def _logits(model, params, tokens) -> np.ndarray:
  return np.asarray(_jitted_logits(model, params, tokens))


def _value_and_grad(loss_fn, trainable, batch, ctx_params, context):
  with context():
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, _context(ctx_params)), has_aux=True))(trainable)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_alpha_zero_is_the_hard_loss(built, temperature):
  """alpha = 0: the language model's loss and gradient (float32, to 1e-6), though the teacher disagrees."""
  experiment, state = built
  task = experiment.task
  batch = _batch(task.model_config.vocab_size)
  distill = make_distill_loss(task.model, task.teacher, temperature=temperature, alpha=0.0,
                              teacher_of=lambda ctx: ctx.params[TEACHER])
  (loss, aux), grads = _value_and_grad(distill, state.params[STUDENT], batch, state.params, experiment.steps.context)
  (hard, _), hard_grads = _value_and_grad(make_loss_fn(task.model), state.params[STUDENT], batch, state.params,
                                          experiment.steps.context)
  assert float(loss) == pytest.approx(float(hard), rel=1e-6) and float(aux["hard_loss"]) == pytest.approx(float(hard),
                                                                                                       rel=1e-6)
  assert float(aux["soft_loss"]) > 1e-4  # a real soft term, weighted out
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(hard_grads)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)


def test_alpha_one_with_the_student_as_its_own_teacher_is_zero(built):
  experiment, state = built
  task = experiment.task
  student = state.params[STUDENT]
  distill = make_distill_loss(task.model, task.model, temperature=2.0, alpha=1.0,
                              teacher_of=lambda ctx: ctx.params[STUDENT])
  (loss, aux), grads = _value_and_grad(distill, student, _batch(task.model_config.vocab_size), {STUDENT: student},
                                       experiment.steps.context)
  assert abs(float(loss)) < 1e-6 and abs(float(aux["soft_loss"])) < 1e-6
  assert float(aux["hard_loss"]) > 1.0  # the hard loss is there, weighted out
  assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(grads)) < 1e-5


def test_a_step_trains_the_student_and_leaves_the_teacher(built, runs):
  """The teacher is the teacher run's weights, has no optimizer state and is bit for bit the same after steps
  that move every leaf of the student."""
  experiment, state = built
  state = jax.tree.map(lambda leaf: leaf.copy(), state)  # the step donates its state; the fixture's stays
  assert set(state.opt_state) == {STUDENT}
  teacher_run, _ = checkpoint_lib.restore_params(str(runs["teacher"]), experiment.abstract_state.params[TEACHER])
  before = jax.tree.map(lambda leaf: np.array(leaf, copy=True), state.params)  # not views of donated buffers
  for got, want in zip(jax.tree.leaves(before[TEACHER]), jax.tree.leaves(jax.device_get(teacher_run))):
    np.testing.assert_array_equal(got, want)
  with experiment.steps.context():  # two steps: the warm-up's first has learning rate 0
    for seed in (0, 1):
      state, metrics = experiment.steps.train_step(state, _batch(experiment.task.model_config.vocab_size, seed))
  new_state = state
  after = jax.device_get(new_state.params)
  for got, want in zip(jax.tree.leaves(after[TEACHER]), jax.tree.leaves(before[TEACHER])):
    np.testing.assert_array_equal(got, want)
  changed = [not np.array_equal(got, want) for got, want in zip(jax.tree.leaves(after[STUDENT]),
                                                               jax.tree.leaves(before[STUDENT]))]
  assert all(changed) and float(metrics["train/grad_norm"]) > 0, changed
  hard, soft = float(metrics["train/hard_loss"]), float(metrics["train/soft_loss"])
  assert float(metrics["train/loss"]) == pytest.approx(0.5 * hard + 0.5 * soft, rel=1e-6) and soft > 0


def test_a_distill_run_trains_resumes_and_evaluates_through_the_cli(runs, tmp_path):
  """4 steps, then resumed to 6 (the teacher of its checkpoint), through `python -m lm.main`; then what --mode eval
  runs (`lm.app.eval.run`, in this process: a third process would cost seconds): the student's figures."""
  workdir = tmp_path / "distilled"
  settings = distill_settings(runs["teacher"], eval_every=2, checkpoint_every=2, log_every=2)
  first = run_cli("--config", BASELINE, "--workdir", str(workdir), *args_of(**settings, steps=4))
  assert first.returncode == 0, first.stderr[-3000:]
  teacher = snapshot(runs["teacher"])
  second = run_cli("--config", BASELINE, "--workdir", str(workdir), *args_of(**settings, steps=6))
  assert second.returncode == 0 and "resumed from step 4" in second.stderr, second.stderr[-3000:]
  assert snapshot(runs["teacher"]) == teacher
  rows = metric_rows(workdir)
  assert sorted(step for step, row in rows.items() if "eval/loss" in row) == [2, 4, 6]
  for key in ("train/loss", "train/hard_loss", "train/soft_loss", "eval/soft_loss", "eval/teacher_loss"):
    assert np.isfinite(rows[6][key]), key
  assert rows[6]["train/soft_loss"] > 0 and rows[6]["eval/teacher_loss"] == pytest.approx(rows[2]["eval/teacher_loss"])
  printed = []
  assert eval_mode.run(config_of(**settings, steps=6), str(workdir), report=printed.append) == 0
  figures = json.loads(printed[-1])
  assert figures["step"] == 6
  assert figures["eval_validation/loss"] == pytest.approx(rows[6]["eval/loss"], rel=1e-5)  # the student's LM loss

  # A language model can start from the distilled student (and only it is read).
  lm_run, _ = build_experiment(config_of(init_from=str(workdir)), str(tmp_path / "lm"), "train")
  state, _, how = initial_state(lm_run)
  assert "a head='distill' run" in how
  saved, _ = checkpoint_lib.restore_params(str(workdir), {STUDENT: lm_run.abstract_state.params})
  for got, want in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(saved))):
    np.testing.assert_array_equal(got, want)

  # --mode export writes the student: the exported model computes the student's logits.
  export_mode.export_checkpoint(config_of(**settings, **{"export.dir": str(tmp_path / "hf")}), str(workdir))
  hf_config, hf_params = interop.load_model(tmp_path / "hf")
  tokens = _batch(lm_run.model_config.vocab_size)["inputs"]
  with lm_run.steps.context():
    np.testing.assert_allclose(_logits(TransformerLM(hf_config), hf_params, tokens),
                               _logits(lm_run.model, saved[STUDENT], tokens), rtol=1e-5, atol=1e-5)

  # But it is no teacher (a head='distill' run's params are not a language model's): refused, nothing written.
  before = snapshot(workdir)
  with pytest.raises(CheckpointError) as error:
    train_mode.train(config_of(**distill_settings(workdir)), str(tmp_path / "work"))
  assert "written by a head='distill' run" in str(error.value) and "head lm or sft" in str(error.value)
  assert not (tmp_path / "work").exists() and snapshot(workdir) == before


def test_a_hugging_face_folder_can_be_the_teacher(runs, built, tmp_path):
  """hf:DIR: the teacher's run exported (what --mode export writes), then named as the teacher: its weights."""
  hf_dir = tmp_path / "hf_teacher"
  export_mode.export_checkpoint(config_of(**{"model.num_layers": 3, "export.dir": str(hf_dir)}), str(runs["teacher"]))
  experiment, _ = build_experiment(config_of(**distill_settings(f"hf:{hf_dir}")), str(tmp_path / "work"), "train")
  assert experiment.task.teacher_config.num_layers == 3
  state, _, how = initial_state(experiment)
  assert f"teacher from hf:{hf_dir}" in how
  # The same function as the teacher read from its run (GPT-2's folder adds zero biases: other leaves, same logits).
  from_run, from_run_state = built
  tokens = _batch(experiment.task.model_config.vocab_size)["inputs"]
  with experiment.steps.context():
    np.testing.assert_allclose(_logits(experiment.task.teacher, state.params[TEACHER], tokens),
                               _logits(from_run.task.teacher, from_run_state.params[TEACHER], tokens),
                               rtol=1e-5, atol=1e-5)
  assert not (tmp_path / "work").exists()


# -- bad input -------------------------------------------------------------------------------------------------
def _another_tokenizer(runs, tmp_path):
  del tmp_path
  return distill_settings(runs["other_tokenizer"]), CheckpointError, [
      f"config.distill.teacher={str(runs['other_tokenizer'])!r}", "another tokenizer", "config.data.tokenizer"]


def _no_checkpoint(runs, tmp_path):
  del runs
  return distill_settings(tmp_path), CheckpointError, [f"config.distill.teacher={str(tmp_path)!r} holds no checkpoint"]


def _no_such_folder(runs, tmp_path):
  del runs
  return distill_settings(tmp_path / "nowhere"), CheckpointError, ["does not exist", "--mode train --workdir"]


def _no_teacher(runs, tmp_path):
  del runs, tmp_path
  return {"head": "distill"}, ConfigError, ["set --config.distill.teacher"]


def _another_vocabulary(runs, tmp_path):
  del tmp_path
  return distill_settings(runs["teacher"], **{"model.vocab_size": 96}), ConfigError, [
      "predicts over 66 ids", "this run's model over 96", "--config.model.vocab_size=66"]


def _longer_context(runs, tmp_path):
  del tmp_path
  return distill_settings(runs["teacher"], seq_len=48), ConfigError, ["config.seq_len=48", "32 positions"]


def _temperature(value):
  def case(runs, tmp_path):
    del tmp_path
    return distill_settings(runs["teacher"], **{"distill.temperature": value}), ConfigError, [
        f"config.distill.temperature={value} must be > 0"]
  return case


def _alpha(value):
  def case(runs, tmp_path):
    del tmp_path
    return distill_settings(runs["teacher"], **{"distill.alpha": value}), ConfigError, [
        f"config.distill.alpha={value} must be in [0, 1]"]
  return case


BAD = {"another_tokenizer": _another_tokenizer, "no_checkpoint": _no_checkpoint, "no_such_folder": _no_such_folder,
       "no_teacher": _no_teacher, "another_vocabulary": _another_vocabulary, "longer_context": _longer_context,
       "temperature_zero": _temperature(0.0), "temperature_negative": _temperature(-1.0),
       "alpha_negative": _alpha(-0.1), "alpha_above_one": _alpha(1.5)}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_anything_is_written(runs, tmp_path, case):
  settings, error_type, parts = BAD[case](runs, tmp_path)
  named = {name: snapshot(path) for name, path in runs.items()}
  workdir = tmp_path / "work"
  with pytest.raises(error_type) as error:  # a UserError: lm.main prints it as one `error:` line, exit code 2
    train_mode.train(config_of(**settings), str(workdir))
  message = str(error.value)
  for part in parts:
    assert part in message, (part, message)
  assert "\n" not in message and not workdir.exists()
  assert {name: snapshot(path) for name, path in runs.items()} == named


def test_another_tokenizer_on_the_command_line_is_one_error_line(runs, tmp_path):
  workdir = tmp_path / "work"
  result = run_cli("--config", BASELINE, "--workdir", str(workdir), *args_of(**distill_settings(runs["other_tokenizer"])))
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert "config.distill.teacher=" in errors[0] and "another tokenizer" in errors[0]
  assert "Traceback" not in result.stderr and not workdir.exists()
