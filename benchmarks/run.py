"""lm's train step against its PyTorch peer: same shapes, same device, same invocation.

Runs `python -m lm.main --mode bench` (the jitted train step of `--config`) and
`benchmarks/torch_peer.py` (the same GPT in PyTorch) as subprocesses, in turn,
`--rounds` times each. Alternating lets both see the same machine state, and one
process per run means the GPU memory of one (JAX preallocates 75 % of it) is
freed before the other starts. The peer's flags are derived from the lm bench
JSON itself (its `model`, `batch_size`, `seq_len` and `platform`), so `--config.*`
overrides given here reach both sides:

  lm on a GPU  -> peer on cuda: torch.compile, bf16 autocast when lm computes in
                  bf16, fused AdamW, TF32, SDPA flash attention (`--peer-eager`:
                  no compile)
  lm on a CPU  -> peer on cpu: plain eager PyTorch (`make bench`)

Only GPT-2-family models have a peer (LayerNorm, GELU MLP, learned positions);
others are refused with the reason. Reported: the median over rounds of each
side's median step time, tokens/s and MFU (same FLOP formula, lm.train.perf's,
and the same peak), and `ratio_tokens_per_sec_lm_over_torch` (above 1.0: lm is
faster). The last line is one JSON object.

  python benchmarks/run.py --config experiments/shakespeare_char.py [--rounds 3] [--steps 100]
  python benchmarks/run.py --config experiments/gpt2_124m.py --rounds 3 --steps 50   # on a GPU
  python benchmarks/run.py ... --config.batch_size=8 --peer-args="--no-fused-adamw"

Arguments this script does not know are passed on to lm.main.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform as platform_lib
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "torch_peer.py"
# What torch_peer.py implements: GPT-2's architecture. Any other choice has no peer.
PEER_ARCHITECTURE = {"norm": "layernorm", "mlp": "gelu", "position": "learned"}
PEER_DTYPES = {"float32": "--no-bf16", "bfloat16": "--bf16"}  # lm compute dtype -> peer autocast
PEER_DEVICES = {"cpu": "cpu", "gpu": "cuda"}  # lm platform -> peer device


class NotComparable(ValueError):
  """The lm run has no PyTorch peer (another architecture, dtype or platform)."""


def last_json_line(output: str) -> dict[str, Any]:
  for line in reversed(output.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise RuntimeError(f"no JSON line in output:\n{output[-2000:]}")


def run(command: list[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Runs `command` in the repository root (with `env`, default this process's) -> its last JSON line."""
  result = subprocess.run(command, cwd=ROOT, env=None if env is None else dict(env), capture_output=True, text=True,
                          check=False)
  if result.returncode:
    raise RuntimeError(f"{shlex.join(command)} failed (exit {result.returncode}):\n"
                       f"{result.stdout[-1500:]}\n{result.stderr[-3000:]}")
  return last_json_line(result.stdout)


def bench_command(config: str, *args: str) -> list[str]:
  """`python -m lm.main --config CONFIG --mode bench ARGS`."""
  return [sys.executable, "-m", "lm.main", "--config", config, "--mode", "bench", *args]


def lm_command(config: str, steps: int, warmup: int, extra: Sequence[str]) -> list[str]:
  return bench_command(config, f"--config.bench.steps={steps}", f"--config.bench.warmup_steps={warmup}", *extra)


def platform_of(figures: Mapping[str, Any]) -> str:
  """lm's platform ("cpu" | "gpu" | "tpu"): the bench JSON's `platform`, else guessed from `device`."""
  if figures.get("platform"):
    return str(figures["platform"])
  device = str(figures.get("device", "cpu")).lower()
  if device.startswith("cpu"):
    return "cpu"
  return "tpu" if "tpu" in device else "gpu"


def _finite_positive(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def peer_args(figures: Mapping[str, Any], model: Mapping[str, Any] | None = None, *, peer_eager: bool = False,
              optim: Mapping[str, Any] | None = None) -> list[str]:
  """torch_peer.py's flags for the lm run described by its bench JSON `figures`.

  `model` defaults to `figures["model"]` (num_layers, num_heads, width, vocab_size,
  use_bias, tie_embeddings, gelu_approximate, dtype, norm, mlp, position);
  `optim` may carry lr and b2. Raises NotComparable naming the reason when the
  peer (GPT-2 in PyTorch, on cpu or cuda) cannot run the same model.
  """
  model = dict(figures["model"] if model is None else model)
  for key, needed in PEER_ARCHITECTURE.items():
    if model.get(key, needed) != needed:
      raise NotComparable(
          f"the lm model has {key}={model[key]!r}; the torch peer implements GPT-2 only "
          f"({', '.join(f'{k}={v}' for k, v in PEER_ARCHITECTURE.items())}), so there is nothing to compare "
          f"(use --no-torch to time lm alone)")
  kv_heads = model.get("num_kv_heads")
  if kv_heads not in (None, model["num_heads"]):
    raise NotComparable(f"the lm model uses grouped-query attention (num_kv_heads={kv_heads}, num_heads="
                        f"{model['num_heads']}); the torch peer has full multi-head attention only")
  mlp_dim = model.get("mlp_dim")
  if mlp_dim not in (None, 4 * model["width"]):
    raise NotComparable(f"the lm model has mlp_dim={mlp_dim}; the torch peer's MLP is 4 x width "
                        f"({4 * model['width']})")
  dtype = model.get("dtype", "float32")
  if dtype not in PEER_DTYPES:
    raise NotComparable(f"the lm model computes in {dtype}; the torch peer runs float32 or bf16 autocast only")
  platform = platform_of(figures)
  if platform not in PEER_DEVICES:
    raise NotComparable(f"lm ran on {platform}; the torch peer runs on cpu or cuda only")
  on_gpu = platform == "gpu"
  args = [
      "--device", PEER_DEVICES[platform],
      "--layers", str(model["num_layers"]), "--heads", str(model["num_heads"]), "--width", str(model["width"]),
      # The peer's context is the sequence length of the batch (and its position table).
      "--context", str(figures["seq_len"]), "--batch", str(figures["batch_size"]),
      "--vocab", str(model["vocab_size"]),
      "--bias" if model.get("use_bias") else "--no-bias",
      "--gelu", "tanh" if model.get("gelu_approximate") else "exact",
      PEER_DTYPES[dtype],
      "--no-untied" if model.get("tie_embeddings", True) else "--untied",
      # A GPU peer is what nanoGPT runs there (compiled); the CPU peer is plain eager PyTorch.
      "--compile" if on_gpu and not peer_eager else "--no-compile",
  ]
  optim = optim or {}
  if optim.get("lr") is not None:
    args += ["--lr", repr(float(optim["lr"]))]
  if optim.get("b2") is not None:
    args += ["--adam-b2", repr(float(optim["b2"]))]
  # The same peak as lm's MFU, so both MFUs are of the same device figure.
  if _finite_positive(figures.get("peak_flops_per_device")):
    args += ["--peak-flops", repr(float(figures["peak_flops_per_device"]))]
  return args


def config_overrides(extra: Sequence[str]) -> dict[str, Any]:
  """`--config.KEY=VALUE` arguments among lm's extra arguments, as load_config overrides (last one wins)."""
  overrides: dict[str, Any] = {}
  for arg in extra:
    if not arg.startswith("--config.") or "=" not in arg:
      continue
    key, text = arg[len("--config."):].split("=", 1)
    if text.lower() in ("true", "false"):
      value: Any = text.lower() == "true"
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text  # a bare string, e.g. rmsnorm
    overrides[key] = value
  return overrides


def _load_config(config: str, extra: Sequence[str]) -> Any:
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  try:
    return load_config(config, config_overrides(extra))
  except Exception:  # pylint: disable=broad-except  # an override this parser misreads: the file alone
    return load_config(config)


def model_from_config(config: str, figures: Mapping[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
  """The `model` record for a bench JSON without one (older lm): from the config file and `--config.*` overrides.

  The vocabulary and the tie choice come from the bench JSON, which the older lm already reports.
  """
  from lm.models.transformer import TransformerConfig  # pylint: disable=g-import-not-at-top
  cfg = _load_config(config, extra)
  model = TransformerConfig.from_config(cfg.model.to_dict(), vocab_size=figures.get("vocab_size", 66),
                                        max_len=cfg.model.get("max_len") or cfg.seq_len)
  record = {key: getattr(model, key) for key in (
      "num_layers", "num_heads", "num_kv_heads", "width", "vocab_size", "max_len", "use_bias",
      "tie_embeddings", "gelu_approximate", "dtype", "norm", "mlp", "position", "mlp_dim")}
  record["tie_embeddings"] = figures.get("tie_embeddings", record["tie_embeddings"])
  return record


def optim_settings(figures: Mapping[str, Any], config: str, extra: Sequence[str] = ()) -> dict[str, Any]:
  """lr and b2 of the lm run: the bench JSON's `optim` if it has one, else the config file and overrides.

  They do not change the time of a step; they are passed so both sides run the same optimizer.
  """
  if isinstance(figures.get("optim"), Mapping):
    return {key: figures["optim"].get(key) for key in ("lr", "b2")}
  try:
    optim = _load_config(config, extra).optim
  except Exception:  # pylint: disable=broad-except  # best effort: the peer's defaults time the same
    return {}
  return {"lr": optim.get("lr"), "b2": optim.get("b2")}


def torch_command(args: Sequence[str], steps: int, warmup: int, peer_extra: Sequence[str] = ()) -> list[str]:
  return [sys.executable, str(PEER), "--steps", str(steps), "--warmup", str(warmup), *args, *peer_extra]


def _scaled(value: float | None, last_time: float, median_time: float) -> float | None:
  # Throughput and MFU of the median step time, not of the last round: both
  # scale with 1 / step time (same FLOPs and peak in every round).
  return None if value is None else value * last_time / median_time


def summarize(lm_rounds: list[dict[str, Any]], torch_rounds: list[dict[str, Any]],
              commands: Mapping[str, str], args: argparse.Namespace) -> dict[str, Any]:
  """The final JSON record from the per-round figures of both sides."""
  lm_last = lm_rounds[-1]
  lm_times = [r["step_time_ms"] for r in lm_rounds]
  step_time = statistics.median(lm_times)
  peak = lm_last.get("peak_flops_per_device")
  summary: dict[str, Any] = {
      "lm_step_time_ms": step_time,
      "lm_tokens_per_sec": _scaled(lm_last["tokens_per_sec"], lm_last["step_time_ms"], step_time),
      "lm_mfu": _scaled(lm_last.get("mfu"), lm_last["step_time_ms"], step_time),
      "lm_compile_time_s": statistics.median(r["compile_time_s"] for r in lm_rounds),
      "lm_step_times_ms": lm_times,
      "lm_peak_bytes_per_device": lm_last.get("memory_per_device", {}).get("peak_bytes"),
      # Minor page faults per timed step, median of rounds (thousands: host memory faulted in afresh every step).
      "lm_page_faults_per_step": (statistics.median(r["page_faults_per_step"] for r in lm_rounds)
                                  if all("page_faults_per_step" in r for r in lm_rounds) else None),
      "lm_host_malloc": lm_last.get("host_malloc"),
      "lm_params": lm_last.get("params"),
      "device": lm_last["device"],
      "platform": platform_of(lm_last),
      "batch_size": lm_last.get("batch_size"),
      "seq_len": lm_last.get("seq_len"),
      "peak_flops_per_device": peak,
      "rounds": args.rounds,
      "steps_per_round": args.steps,
      "warmup_steps": args.warmup,
      "xla_flags": lm_last.get("xla_flags", os.environ.get("XLA_FLAGS", "")),
      "versions": {"python": platform_lib.python_version(), "jax": lm_last.get("jax")},
      "commands": dict(commands),
  }
  if torch_rounds:
    torch_last = torch_rounds[-1]
    torch_times = [r["step_time_ms"] for r in torch_rounds]
    torch_time = statistics.median(torch_times)
    torch_tps = _scaled(torch_last["tokens_per_sec"], torch_last["step_time_ms"], torch_time)
    summary.update({
        "torch_impl": torch_last["impl"],
        "torch_step_time_ms": torch_time,
        "torch_tokens_per_sec": torch_tps,
        # lm.train.perf's formula on the peer's own parameter count, over the same peak.
        "torch_mfu": (torch_last["flops_per_token"] * torch_tps / peak) if _finite_positive(peak) else None,
        "torch_first_step_s": statistics.median(r["first_step_s"] for r in torch_rounds),
        "torch_step_times_ms": torch_times,
        "torch_peak_memory_bytes": max((r.get("peak_memory_bytes") or 0) for r in torch_rounds) or None,
        "torch_matmul_params": torch_last.get("matmul_params"),
        "torch_device": torch_last["device"],
        "torch_flags": {key: torch_last.get(key) for key in ("compile", "compile_mode", "bf16", "bias", "gelu",
                                                             "fused_adamw", "tf32", "optimizer")},
        # The figure: above 1.0, lm trains more tokens per second.
        "ratio_tokens_per_sec_lm_over_torch": summary["lm_tokens_per_sec"] / torch_tps,
        # Step-time ratio, as the CPU section of BENCHMARKS.md quotes it: below 1.0, lm is faster.
        "ratio_lm_over_torch": step_time / torch_time,
        "same_params": lm_last.get("params") == torch_last.get("matmul_params"),
    })
    summary["versions"]["torch"] = summary["torch"] = torch_last.get("torch")  # "torch": the key before versions
  # Decode throughput with and without the KV cache (lm's bench.decode), from the last round.
  summary.update({key: value for key, value in lm_last.items() if key.startswith("decode/")})
  return summary


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   epilog="Arguments not listed here are passed on to lm.main "
                                          "(e.g. --config.batch_size=8).")
  parser.add_argument("--config", default="experiments/shakespeare_char.py")
  parser.add_argument("--rounds", type=int, default=3, help="lm and torch runs each, alternating")
  parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
  parser.add_argument("--warmup", type=int, default=10, help="untimed steps per run, after compilation")
  parser.add_argument("--no-torch", action="store_true", help="time lm only")
  parser.add_argument("--peer-eager", action="store_true", help="on a GPU, run the peer without torch.compile")
  parser.add_argument("--peer-args", default="",
                      help='extra torch_peer.py flags, one shell-quoted string given with "=", '
                           'e.g. --peer-args="--no-fused-adamw --batch 8"')
  return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args, extra = parse_args(argv)
  if args.rounds < 1:
    sys.exit(f"run.py: --rounds must be at least 1, got {args.rounds}")
  peer_extra = shlex.split(args.peer_args)
  lm_cmd = lm_command(args.config, args.steps, args.warmup, extra)
  torch_cmd: list[str] | None = None
  lm_rounds: list[dict[str, Any]] = []
  torch_rounds: list[dict[str, Any]] = []
  for round_index in range(args.rounds):
    lm_figures = run(lm_cmd)
    lm_rounds.append(lm_figures)
    line = (f"round {round_index + 1}: lm {lm_figures['step_time_ms']:.2f} ms "
            f"({lm_figures['tokens_per_sec']:,.0f} tok/s)")
    if not args.no_torch:
      if torch_cmd is None:
        model = lm_figures.get("model") or model_from_config(args.config, lm_figures, extra)
        try:
          flags = peer_args(lm_figures, model, peer_eager=args.peer_eager,
                            optim=optim_settings(lm_figures, args.config, extra))
        except NotComparable as error:
          sys.exit(f"run.py: no PyTorch peer for this run: {error}")
        torch_cmd = torch_command(flags, args.steps, args.warmup, peer_extra)
      torch_figures = run(torch_cmd)
      torch_rounds.append(torch_figures)
      if round_index == 0 and lm_figures.get("params") != torch_figures.get("matmul_params"):
        print(f"warning: lm has {lm_figures.get('params')} matmul parameters, the torch peer "
              f"{torch_figures.get('matmul_params')}: the two models differ", file=sys.stderr, flush=True)
      line += (f", {torch_figures['impl']} {torch_figures['step_time_ms']:.2f} ms "
               f"({torch_figures['tokens_per_sec']:,.0f} tok/s), "
               f"lm/torch tokens/s {lm_figures['tokens_per_sec'] / torch_figures['tokens_per_sec']:.3f}")
    print(line, flush=True)
  if lm_rounds[-1].get("devices", 1) > 1 and torch_rounds:
    print(f"warning: lm ran on {lm_rounds[-1]['devices']} devices, the torch peer on one; "
          "tokens/s are not comparable", file=sys.stderr, flush=True)
  commands = {"lm": shlex.join(lm_cmd)}
  if torch_cmd:
    commands["torch"] = shlex.join(torch_cmd)
  print(json.dumps(summarize(lm_rounds, torch_rounds, commands, args)), flush=True)


if __name__ == "__main__":
  main()
