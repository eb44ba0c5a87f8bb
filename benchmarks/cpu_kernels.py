"""lm's XLA:CPU kernels (lm/kernels) against XLA's code: each op alone, and the baseline's train step.

Two measurements, in alternating rounds so that a slow phase of a shared machine hits every variant alike:

* `ops`: each kernel's forward + backward, jitted alone at the baseline's shapes (batch 12, context 64, width
  128, 4 heads, MLP 512: experiments/shakespeare_char.py), against the XLA code it replaces (jax's
  `dot_product_attention`, flax's `LayerNorm`, lm's exact GELU), with the train step's XLA:CPU options;
  median over rounds of the mean of `--calls` calls.
* `step`: `python -m lm.main --config experiments/shakespeare_char.py --mode bench` with no kernel, attention
  only, attention and LayerNorm, and all three (the experiment's own choice), each a fresh process; and with no
  kernel and with all three under glibc's malloc as it starts (`config.cpu_malloc=default`, lm.core.malloc),
  with the page faults of each step.

Prints one line per round and a JSON summary:

  TFDS_DATA_DIR=../shared/tfds python benchmarks/cpu_kernels.py --rounds 3
  python benchmarks/cpu_kernels.py --rounds 3 --only ops
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from run import lm_command, run as run_lm  # benchmarks/run.py, beside this script


def _kernels(attention: str, norm: str, gelu: str) -> dict[str, str]:
  return {"model.attention_impl": attention, "model.norm_impl": norm, "model.gelu_impl": gelu}


# name -> the config fields of the step's run (the rest: experiments/shakespeare_char.py's).
STEP_VARIANTS = {
    "xla": _kernels("xla", "xla", "xla"),
    "attention": _kernels("cpu", "xla", "xla"),
    "attention+layernorm": _kernels("cpu", "cpu", "xla"),
    "all three": _kernels("cpu", "cpu", "cpu"),
    # glibc's malloc as it starts (config.cpu_malloc=default): XLA:CPU's per-step temporary block, when over
    # 32 MiB, is mapped and faulted in afresh every step (lm.core.malloc).
    "xla (glibc malloc)": {**_kernels("xla", "xla", "xla"), "cpu_malloc": "default"},
    "all three (glibc malloc)": {**_kernels("cpu", "cpu", "cpu"), "cpu_malloc": "default"},
}


def op_functions(batch: int, length: int, width: int, heads: int, mlp: int) -> dict:
  """name -> (XLA's forward + backward, the kernel's, their inputs), jitted with the train step's CPU options."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  from lm.kernels import attention, gelu, layernorm
  from lm.models import layers
  from lm.train.config import CPU_FIELDS

  options = {key.split(".", 1)[1]: value for key, value in CPU_FIELDS.items() if key.startswith("xla_cpu_options.")}
  keys = jax.random.split(jax.random.key(0), 6)
  qkv = [jax.random.normal(k, (batch, length, heads, width // heads)) for k in keys[:3]]
  x = jax.random.normal(keys[3], (batch, length, width))
  hidden = jax.random.normal(keys[4], (batch, length, mlp))
  norm = nn.LayerNorm(epsilon=1e-5, use_bias=False)
  params = norm.init(keys[5], x)

  def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(options), args

  def grad(fn, argnums):
    return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums)
  return {
      "attention": (
          compiled(grad(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), (0, 1, 2)), *qkv),
          compiled(grad(lambda q, k, v: attention.attention(q, k, v, True), (0, 1, 2)), *qkv)),
      "layernorm": (
          compiled(grad(lambda p, x: norm.apply(p, x), (0, 1)), params, x),
          compiled(grad(lambda p, x: layernorm.layer_norm(x, p["params"]["scale"], None, 1e-5), (0, 1)), params, x)),
      "gelu": (compiled(grad(layers.gelu, 0), hidden), compiled(grad(gelu.gelu, 0), hidden)),
  }


def time_call(compiled_args, calls: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  fn, args = compiled_args
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls * 1e3


def run_ops(rounds: int, calls: int, shapes: dict) -> dict:
  functions = op_functions(**shapes)
  times = {name: {"xla": [], "kernel": []} for name in functions}
  for round_ in range(1, rounds + 1):
    for name, (xla, kernel) in functions.items():
      times[name]["xla"].append(time_call(xla, calls))
      times[name]["kernel"].append(time_call(kernel, calls))
      print(f"round {round_}: {name:>9} forward + backward: XLA {times[name]['xla'][-1]:.3f} ms, "
            f"kernel {times[name]['kernel'][-1]:.3f} ms", flush=True)
  return {name: {side: statistics.median(values) for side, values in sides.items()} | {"rounds": sides}
          for name, sides in times.items()}


def bench_step(variant: dict, steps: int, workdir: Path, extra: list[str]) -> dict:
  """One `--mode bench` process (run.py's command and runner): its step time, page faults, the kernels it
  settled on and its malloc setting."""
  figures = run_lm(lm_command("experiments/shakespeare_char.py", steps, 10, [
      "--workdir", str(workdir), "--config.bench.decode=False",
      *[f"--config.{key}={value}" for key, value in variant.items()], *extra]), env=os.environ)
  return {"step_time_ms": figures["step_time_ms"], "page_faults_per_step": figures["page_faults_per_step"],
          "settled": {key: figures["model"][key] for key in ("attention_impl", "norm_impl", "gelu_impl")},
          "host_malloc": figures["host_malloc"]}


def run_steps(names: list[str], rounds: int, steps: int, workdir: Path, extra: list[str]) -> dict:
  runs: dict[str, list[dict]] = {name: [] for name in names}
  for round_ in range(1, rounds + 1):
    for name in names:
      run = bench_step(STEP_VARIANTS[name], steps, workdir / "".join(c if c.isalnum() else "_" for c in name), extra)
      runs[name].append(run)
      print(f"round {round_}: step with {name:>28}: {run['step_time_ms']:.2f} ms, "
            f"{run['page_faults_per_step']:.0f} page faults", flush=True)
  return {name: {"median_ms": statistics.median(run["step_time_ms"] for run in done),
                 "rounds_ms": [run["step_time_ms"] for run in done],
                 "page_faults_per_step": statistics.median(run["page_faults_per_step"] for run in done),
                 "settled": done[-1]["settled"], "host_malloc": done[-1]["host_malloc"]}
          for name, done in runs.items()}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--only", choices=("ops", "step"), help="one of the two measurements (default: both)")
  parser.add_argument("--calls", type=int, default=200, help="calls per op and round")
  parser.add_argument("--steps", type=int, default=100, help="timed train steps per bench run")
  parser.add_argument("--workdir", default="/tmp/lm_cpu_kernels", help="the bench runs' workdirs go under it")
  parser.add_argument("--shapes", default="12,64,128,4,512", help="batch,length,width,heads,mlp for `ops`")
  parser.add_argument("--step-args", default="", help="more lm.main flags for the step runs (a tiny model: tests)")
  parser.add_argument("--variants", default=",".join(STEP_VARIANTS),
                      help=f"the step's variants, comma-separated (default: all: {', '.join(STEP_VARIANTS)})")
  args = parser.parse_args(argv)
  names = [name.strip() for name in args.variants.split(",") if name.strip()]
  unknown = [name for name in names if name not in STEP_VARIANTS]
  if unknown or not names:
    parser.error(f"--variants names {unknown[0] if unknown else 'nothing'!r}, not a variant: pick from "
                 f"{', '.join(STEP_VARIANTS)}")
  try:
    batch, length, width, heads, mlp = (int(v) for v in args.shapes.split(","))
  except ValueError:
    parser.error(f"--shapes={args.shapes!r} is not five integers batch,length,width,heads,mlp")
  if args.rounds < 1:
    parser.error("--rounds must be at least 1")
  out: dict = {"rounds": args.rounds}
  if args.only in (None, "ops"):
    out["ops_ms"] = run_ops(args.rounds, args.calls, dict(batch=batch, length=length, width=width, heads=heads,
                                                          mlp=mlp))
  if args.only in (None, "step"):
    out["step_ms"] = run_steps(names, args.rounds, args.steps, Path(args.workdir), args.step_args.split())
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
