"""An int8 model through the CLI and the server: --mode eval and --mode sample with int8 weights, the server
quantizing at load and at a swap, an int8 export read back, and the bad values (an error line, exit 2, nothing
written). Here beside the server's tests to share their trained run (`trained_run`, one per pytest worker)."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest

from lm.config import load_config
from lm.core.errors import ConfigError
from lm.models import quantize
from lm.serve import versions
from tests.helpers import ROOT, metric_rows, run_cli, snapshot
from tests.serve.conftest import CONFIG as BASELINE
from tests.serve.conftest import serve_overrides


def tiny_overrides(**extra) -> dict:
  """The trained run's config (the baseline shrunk: an untied GPT-2 without biases, 40 steps)."""
  return serve_overrides(**extra)


def cli_args(**extra) -> list[str]:
  return [f"--config.{key}={value}" for key, value in tiny_overrides(**extra).items()]


@pytest.fixture
def trained(trained_run):
  return trained_run


def _kernels(params):
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=quantize.is_quantized)
          if jax.tree_util.keystr(path).endswith("['kernel']")]


def test_the_server_quantizes_at_load_and_at_a_swap_and_decodes_as_sample_mode_does(trained):
  from lm.app import serve as serve_app  # pylint: disable=g-import-not-at-top
  from lm.app.sample import sample_checkpoint  # pylint: disable=g-import-not-at-top
  from lm.serve import engine as engine_lib  # pylint: disable=g-import-not-at-top
  config = load_config(BASELINE, tiny_overrides(**{
      "serve.quantize": "int8", "serve.warmup": False, "serve.max_batch": 2, "serve.max_n": 2, "serve.watch_interval": 0,
      "sample.quantize": "int8", "sample.temperature": 0.0, "sample.max_tokens": 8}))
  expected = sample_checkpoint(config, str(trained), "ROMEO:")[0]
  service, watcher, exporter = serve_app.build(config, str(trained))
  engine, events, done = service.engine, [], threading.Event()

  def listener(event):
    events.append(event)
    if event.kind in ("done", "error"):
      done.set()

  try:
    assert all(quantize.is_quantized(kernel) for kernel in _kernels(engine.params))
    swapped = watcher.load(versions.Version("run", "train", 20, checkpoint=20))  # what a hot swap hands the engine
    assert _kernels(swapped) and all(quantize.is_quantized(kernel) for kernel in _kernels(swapped))
    assert jax.tree.structure(swapped) == jax.tree.structure(engine.params)  # the layout the engine compiled for
    engine.start()
    engine.submit(engine_lib.Request(service.encode("ROMEO:"), engine_lib.Settings(max_tokens=8, temperature=0.0),
                                     listener))
    assert done.wait(120)
  finally:
    engine.stop()
    exporter.stop()
    service.store.close()
  assert events[-1].kind == "done"
  assert "ROMEO:" + "".join(event.text for event in events if event.kind == "text") == expected


def test_an_int8_model_evaluates_and_samples_through_the_cli(trained):
  # The float model's loss on the same eval batches (eval_batches=4), as training's last evaluation wrote it.
  float_loss = [row for row in metric_rows(trained).values() if "eval/loss" in row][-1]["eval/loss"]
  result = run_cli("--config", BASELINE, "--workdir", str(trained), "--mode", "eval", *cli_args(),
                   "--config.eval.quantize=int8", check=True)
  metrics = json.loads(result.stdout.strip().splitlines()[-1])
  assert metrics["quantize"] == "int8"
  assert metrics["param_bytes"] < 0.4 * metrics["param_bytes_float32"]  # a tiny model: its embeddings are a third
  assert metrics["param_bytes_float32"] == 2 * metrics["param_bytes_bfloat16"]
  int8_loss = metrics["eval_validation_int8/loss"]
  assert int8_loss != float_loss and abs(int8_loss - float_loss) < 0.01 * float_loss
  assert "int8 matmul weights" in result.stderr
  # Both figures are in metrics.jsonl, each under its own name.
  rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
  assert any("eval_validation_int8/loss" in row for row in rows) and any("eval/loss" in row for row in rows)

  result = run_cli("--config", BASELINE, "--workdir", str(trained), "--mode", "sample", *cli_args(),
                   "--config.sample.quantize=int8", "--config.sample.max_tokens=12", "--config.sample.prompt=ROMEO:",
                   check=True)
  assert result.stdout.startswith("--- sample 0 ---\nROMEO:") and len(result.stdout.split("ROMEO:", 1)[1]) > 1
  assert "sample.quantize: int8 matmul weights" in result.stderr


def test_an_int8_export_holds_int8_and_scales_and_reads_back_as_the_int8_model(trained, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from lm import interop  # pylint: disable=g-import-not-at-top
  from lm.app.export import export_checkpoint  # pylint: disable=g-import-not-at-top
  from lm.experiment import load_trained  # pylint: disable=g-import-not-at-top
  out = tmp_path / "int8"
  config = load_config(BASELINE, tiny_overrides(**{"export.dir": str(out), "export.quantize": "int8"}))
  summary = export_checkpoint(config, str(trained))
  assert summary["quantize"] == "int8"
  tensors = load_file(str(out / "model.safetensors"))
  int8 = [name for name, array in tensors.items() if array.dtype == np.int8]
  assert int8 and all(name.endswith(".weight") and name + "_scale" in tensors for name in int8)
  assert tensors["transformer.wte.weight"].dtype == np.float32  # the embeddings stay float
  assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "lm_int8"
  # Read back, the folder's weights are exactly the int8 model's values.
  _, params, _ = load_trained(load_config(BASELINE, tiny_overrides()), str(trained), "eval")
  expected = quantize.dequantize_params(quantize.quantize_params(jax.device_get(params)))
  cfg, loaded = interop.load_model(str(out))
  kernel = loaded["layer_0"]["attn"]["query"]["kernel"]
  np.testing.assert_allclose(kernel, expected["layer_0"]["attn"]["query"]["kernel"], rtol=1e-6, atol=1e-9)
  np.testing.assert_array_equal(loaded["embed"]["embedding"], np.asarray(params["embed"]["embedding"]))
  assert cfg.num_layers == 2


@pytest.mark.parametrize("mode, field", [("eval", "eval.quantize"), ("sample", "sample.quantize"),
                                         ("serve", "serve.quantize"), ("export", "export.quantize")])
def test_an_unsupported_scheme_is_named_before_anything_runs(mode, field):
  from lm.experiment.config import validate  # pylint: disable=g-import-not-at-top
  config = load_config(BASELINE, tiny_overrides(**{field: "int4", "export.dir": "/nonexistent/out"}))
  with pytest.raises(ConfigError, match=rf"config\.{field}='int4' is not one of \('none', 'int8'\).*Fix: "):
    validate(config, mode)


def test_a_task_without_a_language_model_is_refused():
  from lm.experiment.config import validate  # pylint: disable=g-import-not-at-top
  config = load_config(str(ROOT / "experiments" / "sst2_classifier.py"), {"eval.quantize": "int8"})
  with pytest.raises(ConfigError, match=r"config\.eval\.quantize='int8' quantizes a Transformer language model"):
    validate(config, "eval")


def test_bad_quantize_values_exit_2_and_leave_the_run_as_it_was(trained, tmp_path):
  before = snapshot(trained)
  out = tmp_path / "export"
  result = run_cli("--config", BASELINE, "--workdir", str(trained), "--mode", "export", *cli_args(),
                   f"--config.export.dir={out}", "--config.export.quantize=int4")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: config.export.quantize='int4' is not one of")
  assert not out.exists() and snapshot(trained) == before
