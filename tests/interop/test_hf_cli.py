"""`--config.init_from=hf:DIR` and `--mode export` through the command line, end to end.

A random Hugging Face GPT-2 (no tokenizer files, vocabulary >= the byte
tokenizer's) is evaluated, trained, sampled, evaluated again, exported and
re-imported with experiments/shakespeare_byte.py, each in a fresh process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm.data import pipeline, tokenizers  # noqa: E402
from tests.helpers import run_cli  # noqa: E402

pytestmark = pytest.mark.slow
CONFIG = "experiments/shakespeare_byte.py"
SEQ_LEN, BATCH, EVAL_BATCHES = 32, 4, 2
ARGS = [f"--config.{key}={value}" for key, value in {
    "steps": 2, "seq_len": SEQ_LEN, "batch_size": BATCH, "eval_batches": EVAL_BATCHES, "log_every": 1,
    "eval_every": 2, "checkpoint_every": 2, "async_checkpointing": False, "sample.max_tokens": 20}.items()]


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
  """(directory, model): a random GPT-2 saved with save_pretrained, no tokenizer files."""
  vocab = 300
  assert vocab >= tokenizers.ByteTokenizer.vocab_size
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=2, n_head=4, n_embd=64, vocab_size=vocab, n_positions=64, bos_token_id=256, eos_token_id=256)).eval()
  directory = tmp_path_factory.mktemp("hf") / "gpt2"
  model.save_pretrained(directory, safe_serialization=True)
  assert not list(directory.glob("tokenizer*"))
  return directory, model


def _json_line(result) -> dict:
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _hf_eval_loss(model) -> float:
  """The HF model's mean token loss on the windows `--mode eval` reads: the first EVAL_BATCHES batches of
  non-overlapping SEQ_LEN windows of the byte-tokenized validation split."""
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  from lm.experiment import open_eval_split  # pylint: disable=g-import-not-at-top
  config = load_config(CONFIG)
  tokens = pipeline.tokenize_split(open_eval_split(config), tokenizers.ByteTokenizer())
  windows = pipeline.Windows(tokens, SEQ_LEN, SEQ_LEN)
  batch = torch.tensor(np.stack([windows[i] for i in range(EVAL_BATCHES * BATCH)]), dtype=torch.long)
  with torch.no_grad():
    logits = model(batch[:, :-1]).logits
  return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))


def test_imported_weights_evaluate_as_in_transformers(hf_gpt2, tmp_path):
  directory, model = hf_gpt2
  metrics = _json_line(run_cli("--config", CONFIG, "--workdir", str(tmp_path / "fresh"), "--mode", "eval",
                               f"--config.init_from=hf:{directory}", *ARGS))
  assert metrics["step"] == 0 and metrics["eval_validation/tokens"] == EVAL_BATCHES * BATCH * SEQ_LEN
  assert metrics["eval_validation/loss"] == pytest.approx(_hf_eval_loss(model), rel=1e-5)


def test_train_sample_eval_export_and_import_again(hf_gpt2, tmp_path):
  directory, model = hf_gpt2
  workdir = tmp_path / "run"
  common = ["--config", CONFIG, "--workdir", str(workdir), f"--config.init_from=hf:{directory}", *ARGS]
  summary = _json_line(run_cli(*common))
  assert summary["step"] == 2
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["width"] == 64 and saved["model"]["vocab_size"] == 300  # shapes came from the HF config
  assert saved["tokenizer"]["kind"] == "byte"

  sampled = run_cli(*common, "--mode", "sample")
  assert sampled.returncode == 0 and "--- sample 0 ---" in sampled.stdout, sampled.stderr[-3000:]
  evaluated = _json_line(run_cli(*common, "--mode", "eval"))
  assert evaluated["step"] == 2

  export_dir = tmp_path / "exported"
  exported = _json_line(run_cli(*common, "--mode", "export", f"--config.export.dir={export_dir}"))
  assert exported["step"] == 2 and exported["model_type"] == "gpt2"
  assert exported["files"] == ["config.json", "model.safetensors", "lm_tokenizer/"]
  assert (export_dir / "lm_tokenizer" / "tokenizer.json").is_file()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()  # a valid HF directory
  assert not torch.equal(reloaded.transformer.wte.weight, model.transformer.wte.weight)  # it holds the trained weights

  # Imported again in a new run, the exported model evaluates exactly as the trained checkpoint did.
  again = _json_line(run_cli("--config", CONFIG, "--workdir", str(tmp_path / "again"), "--mode", "eval",
                             f"--config.init_from=hf:{export_dir}", *ARGS))
  assert again["step"] == 0
  assert again["eval_validation/loss"] == pytest.approx(evaluated["eval_validation/loss"], rel=1e-6)

  refused = run_cli(*common, "--mode", "export", f"--config.export.dir={export_dir}")
  assert refused.returncode == 2 and "is not empty" in refused.stderr


def test_a_bad_hf_directory_is_a_user_error(tmp_path):
  workdir = tmp_path / "run"
  result = run_cli("--config", CONFIG, "--workdir", str(workdir), f"--config.init_from=hf:{tmp_path / 'missing'}",
                   *ARGS)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors and "missing' does not exist" in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()
