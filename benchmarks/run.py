"""`make bench`: the JAX train step and its PyTorch eager peer, same shapes, same machine, same run.

Runs `python -m lm.main --mode bench` and `benchmarks/torch_peer.py` in turn,
`--rounds` times each, alternating so that both see the same machine state,
and reports the median of the per-round medians and the ratio of step times
(lm / torch; below 1.0 means lm is faster). The last line is one JSON object.

  python benchmarks/run.py --config experiments/shakespeare_char.py [--rounds 3] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def last_json_line(output: str) -> dict[str, Any]:
  for line in reversed(output.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise RuntimeError(f"no JSON line in output:\n{output[-2000:]}")


def run(command: list[str]) -> dict[str, Any]:
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
  return last_json_line(result.stdout)


def lm_command(config: str, steps: int, extra: list[str]) -> list[str]:
  return [sys.executable, "-m", "lm.main", "--config", config, "--mode", "bench",
          f"--config.bench.steps={steps}", "--config.bench.warmup_steps=10", *extra]


def torch_command(figures: dict[str, Any], steps: int, config: str) -> list[str]:
  # The peer takes the shapes of the config being benchmarked, and the tie choice of the lm run
  # just measured (which sees --config.* overrides that this loader does not).
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  cfg = load_config(config)
  return [sys.executable, str(ROOT / "benchmarks" / "torch_peer.py"), "--steps", str(steps), "--warmup", "10",
          "--layers", str(cfg.model.num_layers), "--heads", str(cfg.model.num_heads), "--width",
          str(cfg.model.width), "--context", str(cfg.seq_len), "--batch", str(cfg.batch_size), "--vocab",
          str(figures.get("vocab_size", 66)), *([] if figures.get("tie_embeddings", True) else ["--untied"])]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/shakespeare_char.py")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--no-torch", action="store_true", help="time lm only")
  args, extra = parser.parse_known_args()
  lm_times, lm_compile_times, torch_times, lm_figures, torch_figures = [], [], [], {}, {}
  for round_index in range(args.rounds):
    lm_figures = run(lm_command(args.config, args.steps, extra))
    lm_times.append(lm_figures["step_time_ms"])
    lm_compile_times.append(lm_figures["compile_time_s"])
    line = f"round {round_index + 1}: lm {lm_figures['step_time_ms']:.2f} ms"
    if not args.no_torch:
      torch_figures = run(torch_command(lm_figures, args.steps, args.config))
      torch_times.append(torch_figures["step_time_ms"])
      line += f", torch eager {torch_figures['step_time_ms']:.2f} ms"
    print(line, flush=True)
  step_time = statistics.median(lm_times)
  # Throughput and MFU of the median step time, not of the last round: both
  # scale with 1 / step time (same FLOPs and peak in every round).
  last_time = lm_figures["step_time_ms"]
  summary = {
      "lm_step_time_ms": step_time,
      "lm_tokens_per_sec": lm_figures["tokens_per_sec"] * last_time / step_time,
      "lm_mfu": lm_figures["mfu"] * last_time / step_time,
      "lm_compile_time_s": statistics.median(lm_compile_times),
      "device": lm_figures["device"],
      "rounds": args.rounds,
      "steps_per_round": args.steps,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  # Decode throughput with and without the KV cache (lm's bench.decode), from the last round.
  summary.update({key: value for key, value in lm_figures.items() if key.startswith("decode/")})
  if torch_times:
    summary["torch_step_time_ms"] = statistics.median(torch_times)
    summary["torch"] = torch_figures.get("torch")
    summary["ratio_lm_over_torch"] = summary["lm_step_time_ms"] / summary["torch_step_time_ms"]
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
