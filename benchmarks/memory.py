r"""Memory per device of a config's train step under each sharding preset.

  python benchmarks/memory.py [--config experiments/gpt2_small.py] [--devices 8] [--batch_size 8]

Each preset is compiled (not run) in a fresh process with `--devices`
simulated CPU devices, through `python -m lm.main --mode bench
--config.bench.compile_only=True`; parameters and optimizer state per device
come from the shardings, arguments and temporaries from XLA's
`memory_analysis()`. Prints a Markdown table and the JSON of every run.
"""

from __future__ import annotations

import argparse
import json
import os

from run import bench_command, run as run_lm  # benchmarks/run.py, beside this script
PRESETS = ("dp", "fsdp", "fsdp_tp")


def measure(config: str, preset: str, devices: int, extra: list[str]) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  return run_lm(bench_command(config, "--config.bench.compile_only=True", f"--config.mesh.preset={preset}", *extra), env)


def megabytes(value: int | None) -> str:
  return "n/a" if value is None else f"{value / 1e6:,.1f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="experiments/gpt2_small.py")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("extra", nargs="*", help="more --config.KEY=VALUE overrides (after --)")
  args = parser.parse_args()
  extra = [f"--config.batch_size={args.batch_size}", *args.extra]
  runs = {preset: measure(args.config, preset, args.devices, extra) for preset in PRESETS}
  base = runs["dp"]["memory_per_device"]["state_bytes"]
  first = runs["dp"]
  print(f"{args.config}: {first['params']:,} parameters, batch {first['batch_size']} x {first['seq_len']}, "
        f"{args.devices} devices ({first['device']}, jax {first['jax']})\n")
  print("| preset | mesh (data, fsdp, tensor) | params MB | optimizer MB | state MB | state vs dp | "
        "temporaries MB | peak MB |")
  print("|---|---|---|---|---|---|---|---|")
  for preset, run in runs.items():
    memory, mesh = run["memory_per_device"], run["mesh"]
    print(f"| {preset} | {mesh['data']} x {mesh['fsdp']} x {mesh['tensor']} | {megabytes(memory['params_bytes'])} | "
          f"{megabytes(memory['optimizer_bytes'])} | {megabytes(memory['state_bytes'])} | "
          f"1/{base / memory['state_bytes']:.2f} | {megabytes(memory.get('temp_bytes'))} | "
          f"{megabytes(memory.get('peak_bytes'))} |")
  print()
  for preset, run in runs.items():
    print(preset, json.dumps(run))


if __name__ == "__main__":
  main()
