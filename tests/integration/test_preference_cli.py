"""SFT and DPO from the command line: every bad input is one `error:` line, and a DPO run samples and starts an LM.

Each bad record, reference or setting stops the run before anything is written:
one line naming the file and line (or the field) and the fix, exit code 2, no
workdir, and the runs it names untouched. Every case is checked in-process
(`lm.app.train.train`, what --mode train runs: the message and nothing
written); one case of each kind of error (a record, a reference, a setting:
the missing init_from) also through `python -m lm.main`, for the exit code and
the one line (a process costs seconds). The end-to-end checks: `--mode sample`
on a DPO run, and a head=lm run whose init_from is a DPO run starts from its
policy (not its reference).
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from lm.app import train as train_mode
from lm.config import load_config
from lm.core.errors import CheckpointError, ConfigError, DataError
from lm.data.tokenizers import CharTokenizer, load_tokenizer
from lm.experiment import TOKENIZER_DIR, build_experiment, initial_state, load_trained
from lm.train import checkpoint as checkpoint_lib
from tests.helpers import ROOT, run_cli, snapshot, tiny_overrides, toy_preferences, write_records

BASELINE = "experiments/shakespeare_char.py"
DPO_STEPS = 4


def overrides(**extra) -> dict:
  return tiny_overrides(**{"eval_every": 100, **extra})


def config_of(**extra):
  return load_config(str(ROOT / BASELINE), overrides(**extra))


def args_of(**extra) -> list[str]:
  return [f"--config.{key}={value}" for key, value in overrides(**extra).items()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The module's runs, trained in-process: "base" (the tiny LM), "dpo" (4 steps from it) and "other" (an LM of
  another width, on another corpus: another char vocabulary); "other_tokenizer" is the base run with another
  char vocabulary of as many ids (its weights fit; its ids mean other text); "preferences": good records."""
  root = tmp_path_factory.mktemp("preference_cli")
  found = {"preferences": write_records(root / "preferences", train=toy_preferences(64, seed=0),
                                        validation=toy_preferences(16, seed=1))}
  found["base"] = root / "base"
  train_mode.train(config_of(steps=10, checkpoint_every=10), str(found["base"]))
  corpus = root / "other.txt"
  corpus.write_text("a corpus of other characters, whose vocabulary is not shakespeare's\n" * 20)
  found["other"] = root / "other"
  train_mode.train(config_of(steps=1, checkpoint_every=1, **{"model.width": 16, "data.source": str(corpus),
                                                             "data.eval_split": "train"}), str(found["other"]))
  found["other_tokenizer"] = root / "other_tokenizer"
  shutil.copytree(found["base"], found["other_tokenizer"])
  ours = load_tokenizer(str(found["base"] / TOKENIZER_DIR))
  shutil.rmtree(found["other_tokenizer"] / TOKENIZER_DIR)
  CharTokenizer([chr(0x400 + i) for i in range(ours.vocab_size - 1)]).save(
      str(found["other_tokenizer"] / TOKENIZER_DIR))  # Cyrillic: as many ids, other characters
  found["dpo"] = root / "dpo"
  train_mode.train(dpo_config(found, steps=DPO_STEPS, checkpoint_every=DPO_STEPS), str(found["dpo"]))
  return found


def dpo_settings(runs, **extra) -> dict:
  return {"head": "dpo", "init_from": str(runs["base"]), "data.source": str(runs["preferences"]),
          "dpo.kl_prompts": 0, **extra}


def dpo_config(runs, **extra):
  return config_of(**dpo_settings(runs, **extra))


# -- bad input -------------------------------------------------------------------------------------------------
# Each case below gives (the run's overrides, the error's type, what its message must name).
GOOD = {"prompt": "to be", "chosen": " or not", "rejected": " and so"}


def _records_with(tmp_path, split: str, bad: dict, field_set: str = "preferences") -> tuple[str, str]:
  """A folder of good records but for line 3 of SPLIT.jsonl; (the folder, "SPLIT.jsonl")."""
  good = GOOD if field_set == "preferences" else {"prompt": "to be", "response": " or not"}
  splits = {"train": [good] * 4, "validation": [good] * 4}
  splits[split] = [good, good, bad, good]
  folder = write_records(tmp_path / "bad_records", **splits)
  return str(folder), str(folder / f"{split}.jsonl")


def _missing_field(runs, tmp_path):
  folder, path = _records_with(tmp_path, "train", {"prompt": "to be", "chosen": " or not"})
  return dpo_settings(runs, **{"data.source": folder}), DataError, [f"{path} line 3 has no field", "'rejected'"]


def _empty_chosen(runs, tmp_path):
  folder, path = _records_with(tmp_path, "train", dict(GOOD, chosen=""))
  return dpo_settings(runs, **{"data.source": folder}), DataError, [f"{path}:3: field 'chosen' is empty"]


def _empty_rejected(runs, tmp_path):
  folder, path = _records_with(tmp_path, "validation", dict(GOOD, rejected=" "))
  return dpo_settings(runs, **{"data.source": folder}), DataError, [f"{path}:3: field 'rejected' is empty"]


def _same_text(runs, tmp_path):
  folder, path = _records_with(tmp_path, "train", dict(GOOD, rejected=GOOD["chosen"]))
  return dpo_settings(runs, **{"data.source": folder}), DataError, [
      f"{path}:3: 'chosen' and 'rejected' are the same text"]


def _long_prompt(runs, tmp_path):
  folder, path = _records_with(tmp_path, "validation", dict(GOOD, prompt="x" * 33))  # seq_len 32
  return dpo_settings(runs, **{"data.source": folder}), DataError, [
      f"{path}:3: the prompt has 33 tokens", "seq_len=32"]


def _not_a_string(runs, tmp_path):
  folder, path = _records_with(tmp_path, "train", dict(GOOD, chosen=["or", "not"]))
  return dpo_settings(runs, **{"data.source": folder}), DataError, [f"{path} line 3: field 'chosen' is list"]


def _tfds_source(runs, tmp_path):
  del tmp_path
  return dpo_settings(runs, **{"data.source": "tfds:tiny_shakespeare"}), DataError, [
      "tfds:tiny_shakespeare:train is not a split of local files", ".jsonl"]


def _cleaning(runs, tmp_path):
  del tmp_path
  return dpo_settings(runs, **{"data.clean_train": True}), ConfigError, ["--config.data.clean_train=False"]


def _sft_missing_response(runs, tmp_path):
  folder, path = _records_with(tmp_path, "train", {"prompt": "to be"}, field_set="responses")
  return {"head": "sft", "init_from": str(runs["base"]), "data.source": folder}, DataError, [
      f"{path} line 3 has no field", "'response'"]


def _reference_of_another_tokenizer(runs, tmp_path):
  del tmp_path
  return dpo_settings(runs, **{"dpo.reference": str(runs["other_tokenizer"])}), CheckpointError, [
      repr(str(runs["other_tokenizer"])), "another tokenizer"]


def _reference_of_another_shape(runs, tmp_path):
  del tmp_path
  return dpo_settings(runs, **{"dpo.reference": str(runs["other"])}), CheckpointError, [
      str(runs["other"]), "different model", "width: checkpoint 16, config 32"]


def _reference_of_another_task(runs, tmp_path):
  del tmp_path
  return dpo_settings(runs, **{"dpo.reference": str(runs["dpo"])}), CheckpointError, [
      "config.dpo.reference=", "written by a head='dpo' run", "head lm or sft"]


def _reference_without_checkpoint(runs, tmp_path):
  return dpo_settings(runs, **{"dpo.reference": str(tmp_path)}), CheckpointError, [
      repr(str(tmp_path)), "holds no checkpoint"]


def _beta_zero(runs, tmp_path):
  del tmp_path
  return dpo_settings(runs, **{"dpo.beta": 0.0}), ConfigError, ["config.dpo.beta=0.0 must be > 0"]


def _beta_negative(runs, tmp_path):
  del tmp_path
  return dpo_settings(runs, **{"dpo.beta": -0.1}), ConfigError, ["config.dpo.beta=-0.1 must be > 0"]


def _label_smoothing_half(runs, tmp_path):
  del tmp_path
  return dpo_settings(runs, **{"dpo.label_smoothing": 0.5}), ConfigError, ["label_smoothing=0.5 must be in [0, 0.5)"]


def _dpo_without_init_from(runs, tmp_path):
  del tmp_path
  settings = dpo_settings(runs)
  del settings["init_from"]
  # Not the records' missing "text" field: the tokenizer would be built from them without init_from.
  return settings, ConfigError, ["config.head='dpo' tunes a language model: set config.init_from"]


BAD = {case.__name__[1:]: case for case in (
    _missing_field, _empty_chosen, _empty_rejected, _same_text, _long_prompt, _not_a_string, _tfds_source,
    _cleaning, _sft_missing_response,
    _reference_of_another_tokenizer, _reference_of_another_shape, _reference_of_another_task,
    _reference_without_checkpoint, _beta_zero, _beta_negative, _label_smoothing_half, _dpo_without_init_from)}
# One of each kind: a DataError (a record), a CheckpointError (a reference), a ConfigError (a setting).
ON_THE_COMMAND_LINE = ("missing_field", "reference_of_another_shape", "dpo_without_init_from")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_anything_is_written(runs, tmp_path, case):
  """Each bad record, reference or setting raises a user error (no traceback on the CLI) whose message names
  the file and line, the run, or the field; no workdir, and the runs it named unchanged."""
  settings, error_type, parts = BAD[case](runs, tmp_path)
  named = {name: snapshot(runs[name]) for name in ("base", "dpo", "other", "other_tokenizer")}
  workdir = tmp_path / "work"
  with pytest.raises(error_type) as error:  # a UserError: lm.main prints it as one `error:` line, exit code 2
    train_mode.train(config_of(**settings), str(workdir))
  message = str(error.value)
  for part in parts:
    assert part in message, (part, message)
  assert "\n" not in message and not workdir.exists()
  assert {name: snapshot(runs[name]) for name in named} == named


@pytest.mark.parametrize("case", ON_THE_COMMAND_LINE)
def test_bad_input_on_the_command_line_is_one_error_line(runs, tmp_path, case):
  """The same through `python -m lm.main`: exit code 2, exactly one `error:` line (the message above), no
  traceback, no workdir."""
  settings, _, parts = BAD[case](runs, tmp_path)
  workdir = tmp_path / "work"
  result = run_cli("--config", BASELINE, "--workdir", str(workdir), *args_of(**settings))
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  for part in parts:
    assert part in errors[0], (part, errors[0])
  assert "Traceback" not in result.stderr and not workdir.exists()


def test_a_dpo_run_resumes_without_init_from(runs):
  """The early refusal of a missing init_from (before the tokenizer is built from the records) is only for a run
  that starts: a DPO workdir with a checkpoint resumes from it without init_from, as `initial_state` does."""
  settings = dpo_settings(runs)
  del settings["init_from"]
  before = snapshot(runs["dpo"])
  experiment, tokenizer_is_new = build_experiment(config_of(**settings), str(runs["dpo"]), "train")
  assert experiment.task.name == "dpo" and not tokenizer_is_new
  with pytest.raises(ConfigError, match="set config.init_from"):
    build_experiment(config_of(**settings, resume=False), str(runs["dpo"]), "train")
  assert snapshot(runs["dpo"]) == before


# -- end to end ------------------------------------------------------------------------------------------------
def test_sample_mode_on_a_dpo_run(runs):
  """--mode sample on a DPO run continues the prompt with its policy (the run's config as it was trained)."""
  result = run_cli("--config", BASELINE, "--workdir", str(runs["dpo"]), "--mode", "sample",
                   *args_of(**dpo_settings(runs, **{"sample.prompt": "to be", "sample.max_tokens": 12,
                                                    "sample.num_samples": 2})))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("--- sample") == 2 and "to be" in result.stdout


def test_a_run_from_a_dpo_run_starts_from_its_policy(runs, tmp_path):
  """init_from a DPO run: a head=lm run's parameters are the DPO policy's (not its reference's), and another
  DPO round starts with that policy as both its policy and its reference. Then a head=lm run through the CLI
  trains from it."""
  _, dpo_params, _ = load_trained(dpo_config(runs), str(runs["dpo"]), "eval")
  policy, reference = jax.tree.leaves(dpo_params["policy"]), jax.tree.leaves(dpo_params["reference"])
  assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(policy, reference))

  def same(tree, leaves):
    tree = jax.tree.leaves(tree)
    return len(tree) == len(leaves) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(tree, leaves))

  experiment, _ = build_experiment(config_of(init_from=str(runs["dpo"])), str(tmp_path / "lm"), "train")
  state, _, how = initial_state(experiment)
  assert same(state.params, policy) and "(a head='dpo' run)" in how
  experiment, _ = build_experiment(dpo_config(runs, init_from=str(runs["dpo"])), str(tmp_path / "again"), "train")
  state, _, _ = initial_state(experiment)
  assert same(state.params["policy"], policy) and same(state.params["reference"], policy)

  workdir = tmp_path / "lm_cli"
  result = run_cli("--config", BASELINE, "--workdir", str(workdir), "--config.head=lm",
                   f"--config.init_from={runs['dpo']}", *args_of(steps=2, log_every=1, checkpoint_every=2))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"initialized weights from {runs['dpo']} step {DPO_STEPS} (a head='dpo' run)" in result.stderr
  assert checkpoint_lib.latest_step(str(workdir)) == 2
  assert json.loads((workdir / "config.json").read_text())["head"] == "lm"
