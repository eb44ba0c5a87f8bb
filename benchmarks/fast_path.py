r"""What each fast-path option does to a config's train step: memory per device and compile time.

  python benchmarks/fast_path.py [--config experiments/gpt2_124m.py] [--batch_size 32] [--platform cpu]
      [--variants "fused loss,fused + scan"]

Each variant is compiled (not run, nothing allocated: `--config.bench.compile_only=True`) in a fresh
`python -m lm.main --mode bench` process on one device of `--platform`, so the figures are XLA's
`memory_analysis()` of the real step: the temporaries (activations and other buffers live during the step)
and the peak (arguments + temporaries). On a GPU add `--time` to also run and time each variant
(tokens/s, MFU). Prints each run's JSON as it is measured, then a Markdown table.

Variants (on top of the config): the fused loss on and off, the remat policies, scan over layers.
"""

from __future__ import annotations

import argparse
import json
import os

from run import bench_command, run as run_lm  # benchmarks/run.py, beside this script

VARIANTS = {
    "logits loss": ["--config.model.loss_impl=logits"],
    "fused loss": ["--config.model.loss_impl=fused"],
    "fused + remat minimal": ["--config.model.loss_impl=fused", "--config.model.remat_policy=minimal"],
    "fused + remat full": ["--config.model.loss_impl=fused", "--config.model.remat_policy=nothing_saveable"],
    "fused + scan": ["--config.model.loss_impl=fused", "--config.model.scan_layers=True"],
    "fused + scan + remat minimal": ["--config.model.loss_impl=fused", "--config.model.scan_layers=True",
                                     "--config.model.remat_policy=minimal"],
    "fused + scan + remat qkv_proj": ["--config.model.loss_impl=fused", "--config.model.scan_layers=True",
                                      "--config.model.remat_policy=qkv_proj"],
    "fused + scan + remat full": ["--config.model.loss_impl=fused", "--config.model.scan_layers=True",
                                  "--config.model.remat_policy=nothing_saveable"],
}


def measure(config: str, overrides: list[str], platform: str, time_it: bool) -> dict:
  mode = "--config.bench.decode=False" if time_it else "--config.bench.compile_only=True"
  return run_lm(bench_command(config, mode, *overrides), dict(os.environ, JAX_PLATFORMS=platform))


def gigabytes(value: int | None) -> str:
  return "n/a" if value is None else f"{value / 1e9:,.2f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="experiments/gpt2_124m.py")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the runs (cpu, cuda, tpu)")
  parser.add_argument("--time", action="store_true", help="run and time each variant too (on an accelerator)")
  parser.add_argument("--variants", default="",
                      help="comma-separated variant names to run, in this order (default: all): "
                           + ", ".join(VARIANTS))
  parser.add_argument("extra", nargs="*", help="more --config.KEY=VALUE overrides (after --)")
  args = parser.parse_args()
  names = [name.strip() for name in args.variants.split(",") if name.strip()] or list(VARIANTS)
  unknown = [name for name in names if name not in VARIANTS]
  if unknown:
    parser.exit(2, f"error: --variants names {', '.join(map(repr, unknown))}, not a variant: pick from "
                   f"{', '.join(VARIANTS)}\n")
  base = [f"--config.batch_size={args.batch_size}", *args.extra]
  runs = {}
  for name in names:  # each run's JSON as soon as it is measured, so a run cut short keeps the ones done
    runs[name] = measure(args.config, [*base, *VARIANTS[name]], args.platform, args.time)
    print(name, json.dumps(runs[name]), flush=True)
  first = next(iter(runs.values()))
  print(f"{args.config}: {first['params']:,} parameters, batch {first['batch_size']} x {first['seq_len']}, "
        f"{first['device']}, jax {first['jax']}, {first['model']['dtype']} compute\n")
  timed = " tokens/s | MFU |" if args.time else ""
  print(f"| variant | temporaries GB | peak GB | compile s |{timed}")
  print(f"|---|---|---|---|{'---|---|' if args.time else ''}")
  for name, run in runs.items():
    memory = run["memory_per_device"]
    row = f"| {name} | {gigabytes(memory.get('temp_bytes'))} | {gigabytes(memory.get('peak_bytes'))} | " \
          f"{run['compile_time_s']:.1f} |"
    if args.time:
      row += f" {run['tokens_per_sec']:,.0f} | {run['mfu']:.1%} |"
    print(row)


if __name__ == "__main__":
  main()
