"""lm's XLA:CPU kernels (lm/kernels) against XLA's code: each op alone, and the baseline's train step.

Two measurements, in alternating rounds so that a slow phase of a shared machine hits every variant alike:

* `ops`: each kernel's forward + backward, jitted alone at the baseline's shapes (batch 12, context 64, width
  128, 4 heads, MLP 512: experiments/shakespeare_char.py), against the XLA code it replaces (jax's
  `dot_product_attention`, flax's `LayerNorm`, lm's exact GELU), with the train step's XLA:CPU options;
  median over rounds of the mean of `--calls` calls.
* `step`: `python -m lm.main --config experiments/shakespeare_char.py --mode bench` with no kernel, attention
  only, attention and LayerNorm, and all three (the experiment's own choice), each a fresh process.

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

STEP_VARIANTS = {
    "xla": dict(attention_impl="xla", norm_impl="xla", gelu_impl="xla"),
    "attention": dict(attention_impl="cpu", norm_impl="xla", gelu_impl="xla"),
    "attention+layernorm": dict(attention_impl="cpu", norm_impl="cpu", gelu_impl="xla"),
    "all three": dict(attention_impl="cpu", norm_impl="cpu", gelu_impl="cpu"),
}


def op_functions(batch: int, length: int, width: int, heads: int, mlp: int) -> dict:
  """name -> (XLA's forward + backward, the kernel's, their inputs), jitted with the train step's CPU options."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp

  from lm.kernels import attention, gelu, layernorm
  from lm.models import layers
  from lm.train.config import CPU_FIELDS

  options = {key.split(".", 1)[1]: value for key, value in CPU_FIELDS.items()}
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
  """One `--mode bench` process (run.py's command and runner): its step time and the kernels it settled on."""
  figures = run_lm(lm_command("experiments/shakespeare_char.py", steps, 10, [
      "--workdir", str(workdir), "--config.bench.decode=False",
      *[f"--config.model.{key}={value}" for key, value in variant.items()], *extra]), env=os.environ)
  return {"step_time_ms": figures["step_time_ms"],
          "settled": {key: figures["model"][key] for key in ("attention_impl", "norm_impl", "gelu_impl")}}


def run_steps(rounds: int, steps: int, workdir: Path, extra: list[str]) -> dict:
  times = {name: [] for name in STEP_VARIANTS}
  settled = {}
  for round_ in range(1, rounds + 1):
    for name, variant in STEP_VARIANTS.items():
      run = bench_step(variant, steps, workdir / name.replace(" ", "_").replace("+", "_"), extra)
      times[name].append(run["step_time_ms"])
      settled[name] = run["settled"]
      print(f"round {round_}: step with {name:>19}: {times[name][-1]:.2f} ms", flush=True)
  return {name: {"median_ms": statistics.median(values), "rounds_ms": values, "settled": settled[name]}
          for name, values in times.items()}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--only", choices=("ops", "step"), help="one of the two measurements (default: both)")
  parser.add_argument("--calls", type=int, default=200, help="calls per op and round")
  parser.add_argument("--steps", type=int, default=100, help="timed train steps per bench run")
  parser.add_argument("--workdir", default="/tmp/lm_cpu_kernels", help="the bench runs' workdirs go under it")
  parser.add_argument("--shapes", default="12,64,128,4,512", help="batch,length,width,heads,mlp for `ops`")
  parser.add_argument("--step-args", default="", help="more lm.main flags for the step runs (a tiny model: tests)")
  args = parser.parse_args(argv)
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
    out["step_ms"] = run_steps(args.rounds, args.steps, Path(args.workdir), args.step_args.split())
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
