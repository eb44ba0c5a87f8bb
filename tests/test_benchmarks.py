"""benchmarks/torch_peer.py and benchmarks/run.py: the PyTorch peer's shape, its CPU run, run.py's flags.
(benchmarks/dpo_sentiment.py's --quick study runs in notebooks/preference_tuning.ipynb, which tests/test_notebooks.py
executes and which checks what it wrote.)

Nothing here runs torch.compile or a GPU; the GPT-2 comparison itself is run by hand
on a GPU machine (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import platform
import sys

import pytest

torch = pytest.importorskip("torch")

from tests.helpers import ROOT, needs_cpp_compiler, tiny_overrides  # pylint: disable=g-import-not-at-top,wrong-import-position

GPT2_PARAMS = 124_475_904  # GPT-2 small with a 50,304-entry vocabulary, tied, positions included
GPT2_SHAPE = dict(vocab_size=50304, num_layers=12, num_heads=12, width=768, max_len=1024)


def _load(name: str):
  """Imports benchmarks/NAME.py (the folder is not a package) under a private module name."""
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses and typing look their module up by name
  spec.loader.exec_module(module)
  return module


peer = _load("torch_peer")
runner = _load("run")


@pytest.fixture(scope="module")
def gpt2_counts():
  """(torch total, torch matmul N, lm total, lm matmul N) of the GPT-2-small shape; nothing is run."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from lm.models.transformer import TransformerConfig, TransformerLM  # pylint: disable=g-import-not-at-top
  from lm.train import perf  # pylint: disable=g-import-not-at-top

  preset = peer.PRESETS["gpt2-124m"]
  model = peer.build_model(preset["vocab"], preset["context"], preset["layers"], preset["heads"], preset["width"],
                           tied=not preset["untied"], bias=preset["bias"], gelu=preset["gelu"])
  config = TransformerConfig(**GPT2_SHAPE, use_bias=True, tie_embeddings=True)
  shapes = jax.eval_shape(lambda: TransformerLM(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  lm_total = sum(int(x.size) for x in jax.tree.leaves(shapes["params"]))
  return (peer.count_params(model), peer.matmul_params(model), lm_total,
          perf.matmul_params(shapes["params"], config))


def test_gpt2_preset_has_the_shape_of_lm_gpt2_small(gpt2_counts):
  preset = peer.PRESETS["gpt2-124m"]
  assert (preset["layers"], preset["heads"], preset["width"], preset["context"], preset["vocab"]) == (
      12, 12, 768, 1024, 50304)
  torch_total, torch_matmul, lm_total, lm_matmul = gpt2_counts
  assert torch_total == lm_total == GPT2_PARAMS
  # N of the MFU formula (all but the 1024 x 768 position table) agrees too.
  assert torch_matmul == lm_matmul == GPT2_PARAMS - 1024 * 768


def test_mfu_arithmetic_matches_lm(gpt2_counts):
  from lm.models.transformer import TransformerConfig  # pylint: disable=g-import-not-at-top
  from lm.train import perf  # pylint: disable=g-import-not-at-top

  _, n, _, _ = gpt2_counts
  flops = peer.flops_per_token(n, 12, 1024, 768)
  # 6 N + 6 L T d by hand: 6 x 123,689,472 + 6 x 12 x 1024 x 768.
  assert flops == 742_136_832 + 56_623_104 == 798_759_936
  config = TransformerConfig(**GPT2_SHAPE, use_bias=True, tie_embeddings=True)
  assert flops == perf.flops_per_token(n, config, 1024)
  # 1,000 tokens/s on a 1 TFLOP/s device.
  assert peer.mfu(flops, 1000.0, 1e12) == pytest.approx(0.798759936)
  assert peer.mfu(flops, 1000.0, None) is None
  assert peer.mfu(flops, 1000.0, float("nan")) is None


@pytest.mark.parametrize("bf16,warmup", [(False, 1), (True, 1), (False, 0)])
def test_tiny_peer_run_on_cpu(bf16, warmup):
  result = peer.run_benchmark(steps=2, warmup=warmup, device="cpu", n_layer=2, n_head=2, n_embd=32, context=16,
                              batch_size=2, vocab_size=64, bias=True, gelu="tanh", bf16=bf16, threads=1,
                              peak_flops=1e11)
  assert math.isfinite(result["final_loss"])
  for key in ("step_time_ms", "tokens_per_sec", "first_step_s", "mfu", "flops_per_token", "params",
              "matmul_params", "peak_memory_bytes", "fused_adamw", "tf32", "compile", "bias", "gelu", "optimizer"):
    assert key in result, key
  assert result["impl"] == "torch-eager" and result["compile"] is False
  assert result["bf16"] is bf16 and result["bias"] is True and result["gelu"] == "tanh"
  # CPU defaults: single-tensor AdamW, no TF32, no CUDA memory figure.
  assert result["fused_adamw"] is False and result["tf32"] is False and result["peak_memory_bytes"] is None
  assert result["tokens_per_sec"] > 0 and result["first_step_s"] > 0
  assert result["matmul_params"] == result["params"] - 16 * 32
  assert result["mfu"] == pytest.approx(result["flops_per_token"] * result["tokens_per_sec"] / 1e11, rel=1e-3)


def test_bias_and_gelu_change_the_model():
  plain = peer.build_model(64, 16, 2, 2, 32)
  gpt2 = peer.build_model(64, 16, 2, 2, 32, bias=True, gelu="tanh")
  # Per layer: qkv 96 + proj 32 + fc 128 + proj 32 + two LayerNorm biases 64; plus the final LayerNorm's 32.
  assert peer.count_params(gpt2) - peer.count_params(plain) == 2 * (96 + 32 + 128 + 32 + 64) + 32
  assert all(not p.detach().any() for name, p in gpt2.named_parameters() if name.endswith(".bias"))
  tokens = torch.randint(0, 64, (2, 16))
  exact, tanh = peer.build_model(64, 16, 2, 2, 32, bias=True), gpt2
  with torch.no_grad():
    assert not torch.equal(exact(tokens), tanh(tokens))  # same weights (same seed), different GELU


def test_cli_defaults_are_the_cpu_peer_and_the_preset_can_be_overridden():
  default = peer.parse_args([])
  assert (default.layers, default.width, default.context, default.batch, default.vocab) == (4, 128, 64, 12, 66)
  assert default.device == "cpu" and not default.compile and not default.bf16 and not default.bias
  assert default.gelu == "exact" and default.adam_b2 == 0.99 and default.fused_adamw is None
  gpt2 = peer.parse_args(["--preset", "gpt2-124m"])
  assert (gpt2.layers, gpt2.heads, gpt2.width, gpt2.context, gpt2.vocab, gpt2.batch) == (12, 12, 768, 1024, 50304, 16)
  assert gpt2.bias and gpt2.gelu == "tanh" and gpt2.adam_b2 == 0.95 and gpt2.bf16 and gpt2.compile
  assert gpt2.device == "auto" and not gpt2.untied
  small = peer.parse_args(["--batch", "1", "--preset", "gpt2-124m", "--no-compile", "--device", "cpu"])
  assert small.batch == 1 and not small.compile and small.device == "cpu" and small.layers == 12


def _gpu_figures(**model_changes):
  model = {"num_layers": 12, "num_heads": 12, "width": 768, "vocab_size": 50304, "max_len": 1024,
           "use_bias": True, "tie_embeddings": True, "gelu_approximate": True, "dtype": "bfloat16",
           "norm": "layernorm", "mlp": "gelu", "position": "learned"}
  model.update(model_changes)
  return {"platform": "gpu", "device": "NVIDIA H100 80GB HBM3 x1", "batch_size": 16, "seq_len": 1024,
          "peak_flops_per_device": 989e12, "model": model}


def test_run_derives_the_gpu_peer_from_the_bench_json():
  args = peer.parse_args(runner.peer_args(_gpu_figures(), optim={"lr": 6e-4, "b2": 0.95}))
  assert args.device == "cuda" and args.compile and args.bf16 and args.bias and args.gelu == "tanh"
  assert (args.layers, args.heads, args.width, args.context, args.batch, args.vocab) == (12, 12, 768, 1024, 16, 50304)
  assert not args.untied and args.adam_b2 == 0.95 and args.lr == 6e-4 and args.peak_flops == 989e12
  assert args.fused_adamw is None  # the peer's default: fused on cuda
  assert not peer.parse_args(runner.peer_args(_gpu_figures(), peer_eager=True)).compile
  # --peer-args come last, so they override the derived flags.
  command = runner.torch_command(runner.peer_args(_gpu_figures()), 50, 10, ["--batch", "8", "--no-fused-adamw"])
  overridden = peer.parse_args(command[2:])
  assert overridden.batch == 8 and overridden.fused_adamw is False and overridden.steps == 50


def test_run_derives_the_cpu_eager_peer():
  figures = {"device": "cpu: AMD EPYC x2 (1 jax devices)", "batch_size": 12, "seq_len": 64,
             "peak_flops_per_device": 3.3e11,
             "model": {"num_layers": 4, "num_heads": 4, "width": 128, "vocab_size": 66, "max_len": 64,
                       "use_bias": False, "tie_embeddings": False, "gelu_approximate": False, "dtype": "float32",
                       "norm": "layernorm", "mlp": "gelu", "position": "learned"}}
  assert runner.platform_of(figures) == "cpu"  # no "platform" key: guessed from the device
  args = peer.parse_args(runner.peer_args(figures))
  assert args.device == "cpu" and not args.compile and not args.bf16 and not args.bias and args.gelu == "exact"
  assert args.untied and (args.layers, args.width, args.context, args.batch, args.vocab) == (4, 128, 64, 12, 66)


@pytest.mark.parametrize("change,reason", [
    ({"norm": "rmsnorm"}, "norm='rmsnorm'"),
    ({"mlp": "swiglu"}, "mlp='swiglu'"),
    ({"position": "rope"}, "position='rope'"),
    ({"num_kv_heads": 4}, "grouped-query"),
    ({"dtype": "float16"}, "float16"),
])
def test_run_refuses_models_without_a_peer(change, reason):
  with pytest.raises(runner.NotComparable, match=reason) as error:
    runner.peer_args(_gpu_figures(**change))
  if "norm" in change:
    assert "GPT-2" in str(error.value)


def test_run_refuses_tpu():
  figures = {**_gpu_figures(), "platform": "tpu"}
  with pytest.raises(runner.NotComparable, match="cpu or cuda"):
    runner.peer_args(figures)


def test_run_summary_ratios():
  lm_rounds = [{"step_time_ms": t, "tokens_per_sec": 16384 / t * 1e3, "mfu": 0.5 * 100 / t, "compile_time_s": 10.0,
                "device": "NVIDIA H100 80GB HBM3 x1", "platform": "gpu", "peak_flops_per_device": 1e15,
                "params": 1000, "jax": "0.10.2", "page_faults_per_step": t / 10} for t in (100.0, 110.0, 90.0)]
  torch_rounds = [{"step_time_ms": t, "tokens_per_sec": 16384 / t * 1e3, "impl": "torch-compile",
                   "flops_per_token": 6e9, "first_step_s": 30.0, "peak_memory_bytes": 5, "matmul_params": 1000,
                   "device": "cuda: NVIDIA H100 80GB HBM3", "torch": "2.13.0"} for t in (125.0, 120.0, 130.0)]
  args = argparse.Namespace(rounds=3, steps=50, warmup=10)
  summary = runner.summarize(lm_rounds, torch_rounds, {"lm": "lm", "torch": "torch"}, args)
  assert summary["lm_step_time_ms"] == 100.0 and summary["torch_step_time_ms"] == 125.0
  assert summary["lm_tokens_per_sec"] == pytest.approx(163840.0)
  assert summary["torch_tokens_per_sec"] == pytest.approx(131072.0)
  assert summary["ratio_tokens_per_sec_lm_over_torch"] == pytest.approx(1.25)
  assert summary["ratio_lm_over_torch"] == pytest.approx(0.8)
  assert summary["lm_mfu"] == pytest.approx(0.5)
  assert summary["lm_page_faults_per_step"] == 10.0 and summary["lm_host_malloc"] is None
  assert summary["torch_mfu"] == pytest.approx(6e9 * 131072.0 / 1e15)
  assert summary["same_params"] and summary["versions"]["torch"] == "2.13.0"


def test_run_falls_back_to_the_config_file_for_an_older_bench_json():
  config = str(ROOT / "experiments" / "shakespeare_char.py")
  figures = {"device": "cpu: x", "vocab_size": 66, "tie_embeddings": True, "batch_size": 12, "seq_len": 64}
  model = runner.model_from_config(config, figures)
  assert (model["num_layers"], model["width"], model["norm"], model["use_bias"]) == (4, 128, "layernorm", False)
  assert model["tie_embeddings"] is True  # the lm run's choice, not the file's
  assert peer.parse_args(runner.peer_args(figures, model)).device == "cpu"
  # --config.* overrides given to run.py are seen too, so a changed architecture is still refused.
  changed = runner.model_from_config(config, figures, ["--config.model.norm=rmsnorm", "--config.model.use_bias=true"])
  assert changed["norm"] == "rmsnorm" and changed["use_bias"] is True
  with pytest.raises(runner.NotComparable, match="rmsnorm"):
    runner.peer_args(figures, changed)
  assert runner.optim_settings(figures, config) == {"lr": 1e-3, "b2": 0.99}
  assert runner.optim_settings(figures, config, ["--config.optim.b2=0.95"])["b2"] == 0.95
  assert runner.optim_settings({"optim": {"lr": 6e-4, "b2": 0.95}}, config) == {"lr": 6e-4, "b2": 0.95}


def test_run_command_line_splits_its_own_flags_from_lm_s():
  args, extra = runner.parse_args(["--rounds", "2", "--peer-args=--no-fused-adamw --batch 8", "--peer-eager",
                                   "--config.batch_size=8"])
  assert args.rounds == 2 and args.peer_eager and extra == ["--config.batch_size=8"]
  assert runner.shlex.split(args.peer_args) == ["--no-fused-adamw", "--batch", "8"]
  assert runner.lm_command("c.py", 50, 10, extra)[-3:] == [
      "--config.bench.steps=50", "--config.bench.warmup_steps=10", "--config.batch_size=8"]



# -- benchmarks/profile_summary.py: device kernels of a trace, by kind ---------------------------------------
summary_lib = _load("profile_summary")


def _jax_like_trace() -> list[dict]:
  """A Perfetto trace as jax.profiler writes it on a GPU: kernels on the "Stream" threads of a /device:GPU
  process, and XLA's op and module lines (same time, other threads) and host events, which are not kernels."""
  meta = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
      {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "python"}},
  ]
  kernels = [("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT", 3000.0), ("cudnn_generated_fort_native_sdpa_sm90_flash"
             "_bprop_wgmma_f16", 1000.0), ("loop_convert_fusion", 400.0), ("input_reduce_fusion", 200.0),
             ("MemcpyD2D", 100.0)]
  events = [{"ph": "X", "name": name, "pid": 1, "tid": 7, "ts": 10.0 * i, "dur": dur}
            for step in range(2) for i, (name, dur) in enumerate(kernels)]
  events += [{"ph": "X", "name": "dot.3", "pid": 1, "tid": 8, "ts": 0.0, "dur": 9999.0},
             {"ph": "X", "name": "train", "pid": 2, "tid": 1, "ts": 0.0, "dur": 99999.0}]
  return meta + events


def test_profile_summary_sums_gpu_stream_kernels_by_kind_per_step(tmp_path):
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": _jax_like_trace()}, f)
  kernels = summary_lib.device_kernels(summary_lib.load_events(str(path)))
  assert len(kernels) == 10  # the XLA Ops line and the host's event are not kernels
  summary = summary_lib.summarize(kernels, steps=2, top=3)
  assert summary["busy_ms_per_step"] == pytest.approx(4.7)
  assert summary["kinds_ms_per_step"] == pytest.approx({"matmul": 3.0, "attention": 1.0, "other": 0.6, "copy": 0.1})
  assert [row["name"] for row in summary["top"]][0].startswith("nvjet") and len(summary["top"]) == 3
  assert summary["top"][0]["calls_per_step"] == 1.0


def test_profile_summary_reads_torch_kernels_and_refuses_a_trace_without_any(tmp_path, capsys):
  torch_trace = [{"ph": "X", "cat": "kernel", "name": "triton_per_fused__to_copy_add_native_layer_norm", "pid": 0,
                  "tid": 7, "ts": 0, "dur": 500.0},
                 {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "pid": 0, "tid": 7,
                  "ts": 0, "dur": 50.0},
                 {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 900.0}]
  (tmp_path / "torch").mkdir()
  with open(tmp_path / "torch" / "torch_trace.json", "w") as f:
    json.dump({"traceEvents": torch_trace}, f)
  summary_lib.main([str(tmp_path / "torch"), "--steps", "1"])  # the folder: its trace is found
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # Inductor's "_to_copy" kernels are fused compute, not copies.
  assert out["kinds_ms_per_step"] == pytest.approx({"other": 0.5, "copy": 0.05})
  assert out["source"] == "device kernels"
  with open(tmp_path / "host.json", "w") as f:
    json.dump({"traceEvents": [{"ph": "X", "name": "train", "pid": 1, "tid": 1, "ts": 0, "dur": 5.0}]}, f)
  with pytest.raises(SystemExit, match="error: .* holds no device kernels and no CPU ops: .* "
                                       "XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true"):
    summary_lib.main([str(tmp_path / "host.json")])
  with pytest.raises(SystemExit, match="error: no trace file"):
    summary_lib.main([str(tmp_path / "empty")])


def test_profile_summary_counts_nested_torch_cpu_operators_once_by_self_time():
  """aten::linear calls aten::t and aten::addmm, which calls aten::copy_: each gets its own time only."""
  ops = [("aten::linear", 0, 100), ("aten::t", 5, 5), ("aten::addmm", 10, 80), ("aten::copy_", 20, 10),
         ("aten::gelu", 110, 40)]
  events = [{"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur}
            for name, ts, dur in ops]
  events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 2, "ts": 0, "dur": 50})  # 2nd thread
  found, source = summary_lib.cpu_ops(events)
  assert source.startswith("PyTorch") and dict(found) == {"aten::linear": 15.0, "aten::t": 5.0, "aten::addmm": 70.0,
                                                          "aten::copy_": 10.0, "aten::gelu": 40.0, "aten::mm": 50.0}
  summary = summary_lib.summarize(found, steps=1, top=2, kinds=summary_lib.CPU_KINDS)
  assert summary["kinds_ms_per_step"] == pytest.approx({"matmul": 0.12, "elementwise": 0.055, "layout": 0.015})


def test_profile_summary_sums_xla_cpu_ops_of_a_real_trace(tmp_path, capsys):
  """A jitted matmul + GELU, and lm's attention kernel in an `attn` scope as the model names it, profiled on the
  CPU with XLA's per-op trace events: the busiest module's ops."""
  import subprocess  # pylint: disable=g-import-not-at-top
  needs_cpp_compiler()
  program = ("import jax, jax.numpy as jnp\n"
             "from lm.kernels import attention\n"
             "def g(a, b, q):\n"
             "  with jax.named_scope('attn'):\n"
             "    o = attention.attention(q, q, q)\n"
             "  return jax.nn.gelu(a @ b).sum() + o.sum()\n"
             "f = jax.jit(g)\n"
             "a = jnp.ones((256, 256)); q = jnp.ones((2, 16, 2, 16)); f(a, a, q).block_until_ready()\n"
             f"with jax.profiler.trace({str(tmp_path)!r}, create_perfetto_trace=True):\n"
             "  [f(a, a, q).block_until_ready() for _ in range(2)]\n")
  flags = f" --xla_cpu_enable_xprof_traceme=true --xla_dump_to={tmp_path / 'hlo'} --xla_dump_hlo_as_text"
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + flags, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", program], check=True, env=env, timeout=120, capture_output=True)
  summary_lib.main([str(tmp_path), "--steps", "2", "--hlo", str(tmp_path / "hlo")])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["source"] == "XLA:CPU ops of jit_g" and out["kernels_per_step"] >= 1, out
  assert out["kinds_ms_per_step"]["matmul"] > 0 and out["kinds_ms_per_step"]["lm kernel"] > 0
  assert set(out["kinds_ms_per_step"]) <= {"matmul", "lm kernel", "elementwise", "reduce", "layout"}
  # By part, from the dump's op_name metadata: the matmul is a projection's here (not attention's), and the
  # FFI call in the `attn` scope is the fused attention.
  assert out["parts_ms_per_step"]["matmul: projections"] > 0
  assert out["parts_ms_per_step"]["attention: lm's fused kernel (forward and backward)"] > 0
  assert sum(out["parts_ms_per_step"].values()) == pytest.approx(out["busy_ms_per_step"])
  with pytest.raises(SystemExit, match="error: the trace has no XLA module 'jit_train_step'; its modules: "):
    summary_lib.main([str(tmp_path), "--module", "jit_train_step"])


def test_tiny_peer_run_writes_its_profile(tmp_path):
  result = peer.run_benchmark(steps=1, warmup=0, device="cpu", n_layer=1, n_head=2, n_embd=16, context=8,
                              batch_size=1, vocab_size=32, threads=1, profile_dir=str(tmp_path), profile_steps=1)
  assert result["profile"] == str(tmp_path / "torch_trace.json.gz")
  events = summary_lib.load_events(result["profile"])
  assert any(e.get("name") == "aten::mm" or str(e.get("name", "")).startswith("aten::") for e in events)


def test_fast_path_refuses_an_unknown_variant():
  import subprocess  # pylint: disable=g-import-not-at-top
  result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fast_path.py"), "--variants", "fused loss,nope"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert result.returncode == 2
  assert result.stderr.startswith("error: --variants names 'nope', not a variant: pick from logits loss")


def test_privacy_clip_measures_the_clipping_of_a_tiny_lm():
  privacy_clip = _load("privacy_clip")
  result = privacy_clip.measure(str(ROOT / "experiments" / "shakespeare_char.py"), [1e-6, 1e6], batch=8, micro=4,
                                overrides=tiny_overrides(**{"data.train_stride": 32, "model.dropout": 0.0}))
  tiny, huge = result["clips"]
  assert tiny["clip_fraction"] == 1.0 and tiny["clipped_mean_norm"] <= 1e-6 * (1 + 1e-5)
  assert huge["clip_fraction"] == 0.0 and huge["cosine_with_mean_gradient"] == pytest.approx(1.0, abs=1e-5)
  assert huge["clipped_mean_norm"] == pytest.approx(result["mean_gradient_norm"], rel=1e-5)
  q = result["example_norm_quantiles"]
  assert result["examples_for_quantiles"] == 8 and 0 < q["p10"] <= q["p50"] <= q["p90"]


sys.modules.setdefault("run", runner)  # cpu_kernels.py imports run.py as `run`, the script's neighbour
cpu_kernels_lib = _load("cpu_kernels")


def test_cpu_kernels_times_each_op_and_the_step_with_the_kernels_added_one_by_one(tmp_path, capsys):
  needs_cpp_compiler()
  step_args = " ".join(f"--config.{key}={value}" for key, value in tiny_overrides(steps=1).items())
  # Three of the six step variants (each a process): the rest differ only in their fields.
  out = cpu_kernels_lib.main(["--rounds", "1", "--calls", "2", "--steps", "2", "--shapes", "2,8,16,2,32",
                              "--workdir", str(tmp_path), "--step-args", step_args,
                              "--variants", "xla,attention,all three (glibc malloc)"])
  assert set(out["ops_ms"]) == {"attention", "layernorm", "gelu"}
  assert all(op["xla"] > 0 and op["kernel"] > 0 and len(op["rounds"]["kernel"]) == 1 for op in out["ops_ms"].values())
  assert list(out["step_ms"]) == ["xla", "attention", "all three (glibc malloc)"]
  assert all(variant["median_ms"] > 0 and variant["page_faults_per_step"] >= 0 for variant in out["step_ms"].values())
  # Each variant's run really ran what it names (bench's JSON carries the settled model fields and malloc setting).
  steps = out["step_ms"]
  assert steps["xla"]["settled"] == {"attention_impl": "xla", "norm_impl": "xla", "gelu_impl": "xla"}
  assert steps["attention"]["settled"] == {"attention_impl": "cpu", "norm_impl": "xla", "gelu_impl": "xla"}
  assert steps["all three (glibc malloc)"]["settled"] == {"attention_impl": "cpu", "norm_impl": "cpu", "gelu_impl": "cpu"}
  if platform.libc_ver()[0] == "glibc":
    assert steps["xla"]["host_malloc"].startswith("glibc malloc keeps freed memory")
  assert steps["all three (glibc malloc)"]["host_malloc"] == ""  # never changed in that process
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rounds"] == 1
  with pytest.raises(SystemExit):
    cpu_kernels_lib.main(["--shapes", "2,8"])
  assert "is not five integers" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cpu_kernels_lib.main(["--variants", "xla,nope"])
  assert "--variants names 'nope', not a variant: pick from xla, attention" in capsys.readouterr().err
