"""SFT and DPO (lm.tasks.sft, lm.tasks.dpo): the losses, the encoding of records, learning, resume and sharding.

The DPO and IPO losses are checked against the papers' formulas written out
in numpy on hand-made log-probabilities; the task's own loss function (a tiny
TransformerLM) against what DPO must do at its start (log 2 with the policy
equal to the reference, a gradient that raises the chosen response and lowers
the rejected one, none into the frozen reference); SFT's against its mask (a
prompt is read, never learned). The module's runs, trained once in-process
from one tiny language model, learn a toy preference (chosen = body + "z",
rejected = body + "q"), resume exactly from a middle checkpoint, and give the
same figures on 8 devices (fsdp 4 x tensor 2, a fresh CLI process) as on one.
"""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.app import train as train_mode
from lm.config import load_config
from lm.core.errors import DataError
from lm.data import pairs, pipeline
from lm.data.tokenizers import CharTokenizer
from lm.experiment import build_experiment, initial_state, load_trained, open_train_split, token_windows
from lm.models.preference import preference_loss, sequence_logprobs
from lm.train import checkpoint as checkpoint_lib
from lm.train.step import StepContext
from tests.helpers import (ROOT, metric_rows, run_launcher, tiny_overrides, toy_preferences, toy_responses,
                           write_records)

BASELINE = str(ROOT / "experiments" / "shakespeare_char.py")
SHAPES = {"model.vocab_multiple": 8}  # the vocabulary splits over tensor=2 (the 2-process run)
TASK_RUNS = {
    # 20 steps, a checkpoint at 10 (the resume point), one eval at the end with the sampled KL.
    "dpo": {"head": "dpo", "steps": 20, "log_every": 1, "eval_every": 20, "checkpoint_every": 10,
            "dpo.kl_prompts": 8},
    "sft": {"head": "sft", "steps": 8, "log_every": 1, "eval_every": 8, "checkpoint_every": 4, "eval_batches": 2},
}


def overrides(**extra) -> dict:
  return tiny_overrides(**{**SHAPES, **extra})


def config_of(**extra):
  return load_config(BASELINE, overrides(**extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{"base": the tiny LM's workdir, "sft"/"dpo": (workdir, metrics, overrides)}: each trained once, in-process."""
  root = tmp_path_factory.mktemp("preference")
  base = root / "base"
  train_mode.train(config_of(steps=10, eval_every=100, checkpoint_every=10), str(base))
  data = {"dpo": write_records(root / "preferences", train=toy_preferences(256, seed=0),
                               validation=toy_preferences(64, seed=1)),
          "sft": write_records(root / "responses", train=toy_responses(128, seed=0),
                               validation=toy_responses(32, seed=1))}
  done = {"base": base}
  for name, settings in TASK_RUNS.items():
    extra = {**settings, "init_from": str(base), "data.source": str(data[name])}
    train_mode.train(config_of(**extra), str(root / name))
    done[name] = (root / name, metric_rows(root / name), extra)
  return done


# -- the losses ------------------------------------------------------------------------------------------------
def _log_sigmoid(x: np.ndarray) -> np.ndarray:
  return -np.logaddexp(0.0, -x)


def test_the_dpo_and_ipo_losses_are_the_papers_formulas():
  """preference_loss on hand-made sequence log-probabilities against Rafailov et al.'s eq. 7 (with conservative
  DPO's label smoothing) and Azar et al.'s IPO, in float64 numpy; the rewards, margin and `correct` too. The
  margins include h = 0 (log 2, not correct) and |beta h| of hundreds, where a naive log(sigmoid) overflows."""
  rng = np.random.default_rng(0)
  pw, pl, rw, rl = (rng.normal(-30.0, 8.0, 64).astype(np.float32) for _ in range(4))
  pw[0], pl[0] = rw[0], rl[0]  # policy = reference on this pair: h = 0
  pw[1], pw[2] = rw[1] + 3000.0, rw[2] - 3000.0  # beta h of +-300 at beta 0.1
  w, l, refw, refl = (x.astype(np.float64) for x in (pw, pl, rw, rl))
  h = (w - refw) - (l - refl)
  args = [jnp.asarray(x) for x in (pw, pl, rw, rl)]
  for beta in (0.1, 0.5):
    for eps in (0.0, 0.1, 0.3):
      losses, figures = preference_loss(*args, beta=beta, label_smoothing=eps, kind="sigmoid")
      expected = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
      np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5, atol=1e-4, err_msg=f"{beta} {eps}")
      assert float(losses[0]) == pytest.approx(math.log(2), abs=1e-6)
      np.testing.assert_allclose(np.asarray(figures["chosen_reward"]), beta * (w - refw), rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(np.asarray(figures["rejected_reward"]), beta * (l - refl), rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(np.asarray(figures["margin"]), beta * h, rtol=1e-5, atol=1e-4)
      np.testing.assert_array_equal(np.asarray(figures["correct"]), (h > 0).astype(np.float32))
    ipo, _ = preference_loss(*args, beta=beta, kind="ipo")
    np.testing.assert_allclose(np.asarray(ipo), (h - 1 / (2 * beta)) ** 2, rtol=1e-5, atol=1e-3, err_msg=str(beta))
    assert float(ipo[0]) == pytest.approx(1 / (2 * beta) ** 2, rel=1e-6)  # IPO pulls h towards 1/(2 beta), not 0
  with pytest.raises(ValueError, match="not one of"):
    preference_loss(*args, beta=0.1, kind="hinge")


def _built(runs, name: str, tmp_path):
  """A task's experiment (built as its run was, in a fresh workdir), its first train batch and its params as
  `initial_state` starts them: the base LM's weights (DPO: in both the policy and the reference)."""
  _, _, extra = runs[name]
  config = config_of(**extra)
  experiment, _ = build_experiment(config, str(tmp_path / name), "train")
  examples = token_windows(experiment, open_train_split(config), config.data.train_stride, train=True)
  dataset = pipeline.train_dataset(examples, seed=config.seed, global_batch_size=config.batch_size,
                                   rows=experiment.process_rows)
  batch = pipeline.to_global_batch(dataset[0], experiment.steps.batch_shardings, config.batch_size)
  state, _, _ = initial_state(experiment)
  return experiment, batch, state.params


def _context(task, batch, params) -> StepContext:
  """The engine's context of a whole-batch step (no accumulation) at step 0."""
  key = jax.random.PRNGKey(0)
  rows = batch[next(iter(batch))].shape[0]
  totals = {"rows": jnp.asarray(rows, jnp.float32), **task.loss_totals(batch)}
  return StepContext(step=jnp.int32(0), rng=key, step_rng=key, rows=jnp.arange(rows), repeat=jnp.int32(0),
                     totals=totals, params=params)


def test_dpo_starts_at_log_2_and_its_gradient_prefers_the_chosen_response(runs, tmp_path):
  """The DPO task's loss function (through a tiny TransformerLM's sequence_logprobs) with the policy equal to
  the reference, as a run starts: loss log 2, no pair correct, zero rewards. One SGD step along its gradient
  raises log pi(chosen) and lowers log pi(rejected) of every pair, and the loss; the frozen reference gets no
  gradient at all (stop_gradient)."""
  experiment, batch, params = _built(runs, "dpo", tmp_path)
  task, model = experiment.task, experiment.task.model
  (update,) = task.updates()
  assert update.part == "policy"
  policy, reference = params["policy"], params["reference"]
  for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def loss(policy, reference):
    return update.loss_fn(policy, batch, _context(task, batch, {"policy": policy, "reference": reference}))

  def logprobs(policy):
    return tuple(sequence_logprobs(model, policy, batch[f"{side}_inputs"], batch[f"{side}_targets"],
                                   batch[f"{side}_mask"]) for side in ("chosen", "rejected"))

  with experiment.steps.context():
    value, metrics = jax.jit(loss)(policy, reference)
    assert float(value) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["accuracy"]) == 0.0 and float(metrics["margin"]) == 0.0
    assert float(metrics["chosen_reward"]) == 0.0 and float(metrics["rejected_reward"]) == 0.0
    grads, reference_grads = jax.jit(jax.grad(lambda p, r: loss(p, r)[0], argnums=(0, 1)))(policy, reference)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(reference_grads))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, policy, grads)  # SGD, learning rate 0.5
    chosen, rejected = jax.jit(logprobs)(policy)
    chosen_after, rejected_after = jax.jit(logprobs)(stepped)
    after, after_metrics = jax.jit(loss)(stepped, reference)
  # Every pair prefers the same last token, so the step helps each (by 0.4 to 0.9 nats here).
  assert np.all(np.asarray(chosen_after) > np.asarray(chosen) + 0.1)
  assert np.all(np.asarray(rejected_after) < np.asarray(rejected) - 0.1)
  assert float(after) < math.log(2) and float(after_metrics["accuracy"]) == 1.0


def test_the_sft_loss_reads_the_prompt_and_learns_only_the_response(runs, tmp_path):
  """The SFT task's loss function on a batch of encoded records: changing the target of a prompt token changes
  nothing (the mask), changing the target of a response token changes the loss; the normalizer counts the
  response tokens only."""
  experiment, batch, params = _built(runs, "sft", tmp_path)
  task = experiment.task
  (update,) = task.updates()
  mask, targets = np.asarray(batch["mask"]), np.asarray(batch["targets"])
  assert float(task.loss_totals(batch)["tokens"]) == mask.sum()
  row = int(np.argmax([np.argmax(m) for m in mask]))  # the row with the longest prompt
  first = int(np.argmax(mask[row]))  # the first response target (at the last prompt token's position)
  assert first >= 2

  def loss(targets):
    changed = dict(batch, targets=targets)
    return update.loss_fn(params, changed, _context(task, changed, params))[0]

  def with_target(position: int) -> jax.Array:
    new = targets.copy()
    new[row, position] = (new[row, position] + 1) % task.tokenizer.vocab_size
    return jnp.asarray(new)

  with experiment.steps.context():
    compiled = jax.jit(loss)
    original = float(compiled(jnp.asarray(targets)))
    for position in range(first):  # every prompt target of the row
      assert float(compiled(with_target(position))) == original, position
    assert float(compiled(with_target(first))) != original
    assert float(compiled(with_target(int(mask[row].sum()) + first - 1))) != original  # the last response target


# -- the encoding of records -----------------------------------------------------------------------------------
TOKENIZER = CharTokenizer("abcdefgh ")


def _text(ids) -> str:
  return TOKENIZER.decode(np.asarray(ids))


def test_sentences_mask_exactly_the_response_and_its_eos():
  """data.format=sentences: BOS prompt response EOS, shifted by one; the mask is 1 on exactly the targets that
  are the response's tokens and its EOS (from the last prompt token's position), padded with PAD."""
  encoder = pairs.SequenceEncoder(TOKENIZER, 10, sentences=True)
  vocab = encoder.vocab
  prompt = encoder.prompt_ids("ab", "f:1")
  np.testing.assert_array_equal(prompt, [vocab.bos, *TOKENIZER.encode("ab")])
  row = encoder.encode(prompt, "cde")
  a, b, c, d, e = TOKENIZER.encode("abcde")
  pad = vocab.pad
  np.testing.assert_array_equal(row["inputs"], [vocab.bos, a, b, c, d, e, pad, pad, pad, pad])
  np.testing.assert_array_equal(row["targets"], [a, b, c, d, e, vocab.eos, pad, pad, pad, pad])
  np.testing.assert_array_equal(row["mask"], [0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
  assert row["inputs"][np.argmax(row["mask"])] == b  # the mask starts at the last prompt token
  np.testing.assert_array_equal(row["targets"][row["mask"] == 1], [c, d, e, vocab.eos])
  # A prompt may be empty (BOS alone predicts the response); one that leaves no room is refused.
  np.testing.assert_array_equal(encoder.encode(encoder.prompt_ids("", "f:2"), "a")["mask"][:3], [1, 1, 0])
  with pytest.raises(DataError, match=r"f:3: the prompt has 11 tokens with BOS.*seq_len=10"):
    encoder.prompt_ids("abcdefghab", "f:3")


def test_windows_mask_from_the_last_prompt_token_and_crop_long_responses():
  """data.format=windows: no specials, padded with 0; the mask starts at the last prompt token's position. A
  response that does not fit is cropped (counted); a prompt of seq_len tokens still predicts one response
  token; longer, or empty, it is refused with its file and line."""
  encoder = pairs.SequenceEncoder(TOKENIZER, 6, sentences=False)
  prompt = encoder.prompt_ids("ab", "f:1")
  row = encoder.encode(prompt, "cde")
  assert _text(row["inputs"][:4]) == "abcd" and _text(row["targets"][:4]) == "bcde"
  np.testing.assert_array_equal(row["mask"], [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(row["inputs"][4:], [0, 0])
  assert _text(row["targets"][row["mask"] == 1]) == "cde" and encoder.cropped == 0
  long = encoder.encode(prompt, "cdefgh a")  # 7 targets after the prompt's 2 tokens; room for 5
  assert _text(long["targets"][long["mask"] == 1]) == "cdefg" and long["mask"].sum() == 5 and encoder.cropped == 1
  full = encoder.encode(encoder.prompt_ids("abcdef", "f:2"), "gh")
  np.testing.assert_array_equal(full["mask"], [0, 0, 0, 0, 0, 1])
  assert _text(full["targets"][-1:]) == "g" and encoder.cropped == 2
  with pytest.raises(DataError, match="f:3: the prompt has 7 tokens, leaving no room"):
    encoder.prompt_ids("abcdefg", "f:3")
  with pytest.raises(DataError, match="f:4: the prompt encodes to no tokens"):
    encoder.prompt_ids("", "f:4")


def test_preference_examples_encode_both_responses_of_a_prompt(tmp_path):
  """A preference record is two rows of the same prompt: chosen_* and rejected_*, each masked on its own
  response; padding rows (the eval split's last batch) have no mask, so they count as no pair."""
  folder = write_records(tmp_path / "records", train=[{"prompt": "ab", "chosen": "cd", "rejected": "efg"}])
  examples = pairs.PreferenceExamples(pairs.read_records([folder / "train.jsonl"], pairs.PREFERENCE_FIELDS),
                                      TOKENIZER, 8, sentences=False)
  row = examples[0]
  assert set(row) == set(pairs.PREFERENCE_BATCH_RANKS) and int(row["index"]) == 0
  assert _text(row["chosen_targets"][row["chosen_mask"] == 1]) == "cd"
  assert _text(row["rejected_targets"][row["rejected_mask"] == 1]) == "efg"
  np.testing.assert_array_equal(row["chosen_inputs"][:1], row["rejected_inputs"][:1])
  empty = examples.empty_example(3)
  assert not empty["chosen_mask"].any() and not empty["rejected_mask"].any() and int(empty["index"]) == 3


@pytest.mark.parametrize("suffix", ["jsonl", "tsv"])
def test_records_are_read_with_their_file_and_line(tmp_path, suffix):
  """Good records of .jsonl and .tsv files come with "file:line" (blank lines counted); each bad one is refused
  with its file, its line and the field: missing, not a string, empty, or chosen == rejected."""
  def write(*records) -> str:
    path = tmp_path / f"train.{suffix}"
    if suffix == "jsonl":
      path.write_text("\n".join("" if record is None else json.dumps(record) for record in records) + "\n")
    else:
      lines = ["prompt\tchosen\trejected"]
      lines += ["" if record is None else "\t".join(record[field] for field in pairs.PREFERENCE_FIELDS)
                for record in records]
      path.write_text("\n".join(lines) + "\n")
    return str(path)

  good = {"prompt": "p", "chosen": "yes", "rejected": "no"}
  path = write(good, None, dict(good, prompt=""))
  records = pairs.read_records([path], pairs.PREFERENCE_FIELDS)
  first_line = 1 if suffix == "jsonl" else 2  # a .tsv's first line is its header
  assert [where for _, where in records] == [f"{path}:{first_line}", f"{path}:{first_line + 2}"]
  assert records[1][0] == dict(good, prompt="")  # an empty prompt is a record (sentences: BOS alone)
  bad_line = first_line + 1
  cases = [(dict(good, chosen=""), f"{path}:{bad_line}: field 'chosen' is empty"),
           (dict(good, rejected="  "), f"{path}:{bad_line}: field 'rejected' is empty"),
           (dict(good, rejected="yes"), f"{path}:{bad_line}: 'chosen' and 'rejected' are the same text")]
  if suffix == "jsonl":
    cases += [({"prompt": "p", "chosen": "yes"}, f"{path} line {bad_line} has no field"),
              (dict(good, chosen=3), f"{path} line {bad_line}: field 'chosen' is int, not a string")]
  for record, message in cases:
    with pytest.raises(DataError) as error:
      pairs.read_records([write(good, record)], pairs.PREFERENCE_FIELDS)
    assert message in str(error.value), (record, str(error.value))
  if suffix == "tsv":
    (tmp_path / "train.tsv").write_text("prompt\tchosen\n")
    with pytest.raises(DataError, match="has no column 'rejected'"):
      pairs.read_records([tmp_path / "train.tsv"], pairs.PREFERENCE_FIELDS)


# -- runs ------------------------------------------------------------------------------------------------------
def test_dpo_learns_a_toy_preference_and_keeps_its_reference(runs):
  """20 DPO steps on pairs that always prefer the body ending in "z" to the same body ending in "q": the first
  step's loss is log 2 (the policy starts as the reference), the eval split's reward accuracy ends above
  0.95, and every eval reports the sampled KL. The reference is the base LM's weights, unchanged (no optimizer,
  no weight decay), while the policy moved."""
  workdir, rows, extra = runs["dpo"]
  assert rows[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[1]["train/accuracy"] == 0.0
  final = rows[20]
  assert final["eval/accuracy"] > 0.95 and final["eval/margin"] > 0 and final["eval/pairs"] == 32
  assert final["eval/chosen_reward"] > final["eval/rejected_reward"]
  assert final["eval/loss"] < math.log(2) and final["train/loss"] < rows[1]["train/loss"]
  assert np.isfinite(final["eval/kl"]) and final["eval/kl_stderr"] >= 0
  experiment, params, step = load_trained(config_of(**extra), str(workdir), "eval")
  assert step == 20
  base, _ = checkpoint_lib.restore_params(str(runs["base"]), experiment.abstract_state.params["policy"])
  for ours, theirs in zip(jax.tree.leaves(params["reference"]), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(params["policy"]), jax.tree.leaves(base)))


def test_sft_lowers_the_response_loss(runs):
  """8 SFT steps on prompt-response records: the training loss falls, and eval reports the response tokens'
  loss and the mean NLL per response over the evaluated records."""
  _, rows, _ = runs["sft"]
  assert rows[8]["train/loss"] < rows[1]["train/loss"]
  final = rows[8]
  assert np.isfinite(final["eval/loss"]) and final["eval/sentences"] == 16  # eval_batches 2 x batch 8
  assert final["eval/nll_per_sentence"] == pytest.approx(final["eval/loss"] * final["eval/tokens"] / 16, rel=1e-5)


def _rewound(workdir, to: str):
  """A copy of a run without its last checkpoint and its metrics, to train again from the one before."""
  copy = workdir.parent / to
  shutil.copytree(workdir, copy)
  last = max(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
  shutil.rmtree(copy / "checkpoints" / str(last))
  (copy / "metrics.jsonl").write_text("")
  return copy, last


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_each_task_resumes_exactly(runs, name):
  """Rewound to its middle checkpoint and trained again (in-process, one device): every train figure of the
  steps after it and every eval figure (DPO's sampled KL too) come out the same. DPO's state holds the
  reference beside the policy: it is restored with it."""
  workdir, full, extra = runs[name]
  resumed, last = _rewound(workdir, f"{name}_resumed")
  train_mode.train(config_of(**extra), str(resumed))
  again = metric_rows(resumed)
  middle = TASK_RUNS[name]["checkpoint_every"]
  assert sorted(again) == list(range(middle + 1, last + 1))
  for step in again:
    for key, value in full[step].items():
      if key.startswith(("train/", "eval/")) and key != "train/lr":
        assert again[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, step, key)


def test_dpo_on_two_processes_of_four_devices_gives_the_single_device_figures(runs, tmp_path):
  """The DPO run through `lm.launch_local` on 2 processes of 4 devices (fsdp 4 x tensor 2): the params, the
  reference and the preference batches sharded over both processes; every train and eval figure as on one
  device (rel 1e-5). It names its reference with dpo.reference (the same base LM's weights, restored into the
  mesh by another path than init_from): nothing may change. The sampled KL draws the same samples (to a
  rounding of its log-ratios), each process reading all of them. (SFT's step is the language model's, whose
  sharded runs tests/train/test_heads.py checks.)"""
  name = "dpo"
  _, single, extra = runs[name]
  extra = {**extra, "dpo.reference": str(runs["base"])}
  workdir = tmp_path / name
  args = [f"--config.{key}={value}" for key, value in overrides(**extra, **{"mesh.preset": "fsdp_tp"}).items()]
  result = run_launcher(2, 4, "--config", BASELINE, "--workdir", str(workdir), *args, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["head"] == name and saved["mesh"]["shape"] == {"data": 1, "fsdp": 4, "tensor": 2}
  sharded = metric_rows(workdir)
  assert sorted(sharded) == sorted(single)
  for step, row in single.items():
    for key, value in row.items():
      if key.startswith(("train/", "eval/")) and not key.startswith("eval/kl"):
        # The toy pairs share all but their last token, whose gradients cancel exactly: Adam turns the rounding
        # left of them into updates, so the shared tokens' log-probabilities (in both rewards, not in their
        # margin) wander off by ~1e-4 nats between meshes.
        error = 2e-4 if key.endswith(("chosen_reward", "rejected_reward")) else 1e-6
        assert sharded[step][key] == pytest.approx(value, rel=1e-5, abs=error), (name, step, key)
  # The same samples, to a rounding of their log-ratios (one other sample would move it far more).
  assert sharded[20]["eval/kl"] == pytest.approx(single[20]["eval/kl"], rel=1e-2)
