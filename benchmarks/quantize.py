r"""int8 weights against float32 and bfloat16: parameter bytes, eval loss and decode tokens/s of a trained run.

  python benchmarks/quantize.py --workdir /tmp/int8/base [--config experiments/shakespeare_char.py]
      [--batches 1 8] [--repeats 5] [--eval_batches 0]

The run's latest checkpoint (train it first: python -m lm.main --config
experiments/shakespeare_char.py --workdir /tmp/int8/base) is measured three ways:

  * float32: the weights as trained;
  * bfloat16: every weight rounded to bfloat16 and stored so (computation stays
    float32, as for int8: both are weight-only formats);
  * int8: `lm.models.quantize` (qwix QArrays: int8 projections, one float32
    scale per output channel; embeddings, positions, norms float32).

For each: the parameter bytes as stored (and the projections' alone), eval loss
on the run's eval split (the whole split with --eval_batches 0, what --mode eval
scores), and greedy KV-cache decode tokens/s (`lm.inference.sample.decode_benchmark`:
a 1-token prompt then max_len new tokens, fastest of --repeats after a compile)
at each --batches size. The decode runs alternate between the three models
repeat by repeat, so a neighbour's load on a shared CPU falls on all three.
Then the bytes of two larger models' shapes (never trained here: bytes depend on
shapes only): GPT-2 124M, whose tied 50,304-row embedding stays float, and the
same 12 x 768 stack on bytes (vocab 256), where the projections dominate.

Prints a Markdown table and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm.app.eval import eval_split, evaluate_split  # noqa: E402
from lm.config import load_config  # noqa: E402
from lm.core.configs import apply_overrides  # noqa: E402
from lm.experiment import load_trained, open_eval_split, quantize_trained  # noqa: E402
from lm.inference import sample as sample_lib  # noqa: E402
from lm.models import TransformerConfig, TransformerLM  # noqa: E402
from lm.models import quantize  # noqa: E402


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
  except Exception:  # pylint: disable=broad-except
    return platform.processor() or "unknown"


def bytes_of(params) -> dict[str, int]:
  kernels, count = quantize.matmul_bytes(params)
  if not count:  # a float tree: its projection kernels as stored
    leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
              if jax.tree_util.keystr(path).endswith("['kernel']")]
    kernels = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
  return {"param_bytes": quantize.param_bytes(params), "matmul_bytes": int(kernels)}


def shape_bytes(cfg: TransformerConfig) -> dict[str, float]:
  """Bytes of a model's parameters in each format, from its shapes alone (nothing is allocated or trained)."""
  model = TransformerLM(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  abstract = jax.tree.map(lambda leaf: getattr(leaf, "value", leaf), abstract,
                          is_leaf=lambda leaf: hasattr(leaf, "value"))
  quantized = jax.eval_shape(quantize.quantize_params, abstract)
  f32 = quantize.param_bytes(abstract)
  matmul, count = quantize.matmul_bytes(quantized)
  return {"float32": f32, "bfloat16": f32 // 2, "int8": quantize.param_bytes(quantized),
          "int8_over_float32": quantize.param_bytes(quantized) / f32, "matmul_int8_over_float32": matmul / (4 * count)}


# Larger models' bytes (shapes only): GPT-2 124M (experiments/gpt2_124m.py: tied 50,304 x 768 embedding, which
# stays float), and the same 12 x 768 stack on bytes (vocab 256, untied), where the projections dominate.
BIGGER = {
    "gpt2_124m": TransformerConfig(vocab_size=50304, num_layers=12, num_heads=12, width=768, max_len=1024),
    "byte_12x768": TransformerConfig(vocab_size=256, num_layers=12, num_heads=12, width=768, max_len=1024,
                                     tie_embeddings=False),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="experiments/shakespeare_char.py")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--eval_batches", type=int, default=0, help="0: the whole eval split")
  args = parser.parse_args()
  started = time.perf_counter()

  config = load_config(args.config, {"eval_batches": args.eval_batches})
  experiment, params, step = load_trained(config, args.workdir, "eval")
  source, split, _ = eval_split(config)
  text = open_eval_split(apply_overrides(config, {"data.source": source}), split)
  q_experiment, q_params, _ = quantize_trained(experiment, params, "int8", "quantize")
  bf16 = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
  models = {"float32": (experiment, params), "bfloat16": (experiment, bf16), "int8": (q_experiment, q_params)}

  rows = {name: bytes_of(tree) for name, (_, tree) in models.items()}
  for name, (exp, tree) in models.items():
    rows[name]["eval_loss"] = evaluate_split(exp, tree, text)["eval/loss"]

  model, max_len = experiment.model, experiment.model_config.max_len
  for batch in args.batches:
    best = {name: float("inf") for name in models}
    with experiment.steps.context():
      for name, (_, tree) in models.items():  # compile each once
        sample_lib.decode_benchmark(model, tree, batch_size=batch, prompt_len=1, new_tokens=max_len, repeats=1,
                                    uncached=False)
      for _ in range(args.repeats):  # alternate: load from neighbours falls on every model alike
        for name, (_, tree) in models.items():
          figures = sample_lib.decode_benchmark(model, tree, batch_size=batch, prompt_len=1, new_tokens=max_len,
                                                repeats=1, uncached=False)
          best[name] = min(best[name], figures["cached_seconds"])
    for name in models:
      rows[name][f"decode_b{batch}_tokens_per_s"] = batch * max_len / best[name]

  base = rows["float32"]
  for row in rows.values():
    row["bytes_vs_float32"] = row["param_bytes"] / base["param_bytes"]
    row["matmul_bytes_vs_float32"] = row["matmul_bytes"] / base["matmul_bytes"]
    row["eval_loss_rel_change"] = (row["eval_loss"] - base["eval_loss"]) / base["eval_loss"]

  header = ["weights", "param bytes", "x float32", "projection bytes", "x float32", "eval loss", "rel. change"]
  header += [f"decode tok/s b{batch}" for batch in args.batches]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for name, row in rows.items():
    cells = [name, f"{row['param_bytes']:,}", f"{row['bytes_vs_float32']:.3f}", f"{row['matmul_bytes']:,}",
             f"{row['matmul_bytes_vs_float32']:.3f}", f"{row['eval_loss']:.4f}", f"{row['eval_loss_rel_change']:+.3%}"]
    cells += [f"{row[f'decode_b{batch}_tokens_per_s']:,.0f}" for batch in args.batches]
    print("| " + " | ".join(cells) + " |")
  big = {name: shape_bytes(cfg) for name, cfg in BIGGER.items()}
  for name, figures in big.items():
    print(f"{name} shapes: float32 {figures['float32']:,} B, bfloat16 {figures['bfloat16']:,} B, int8 "
          f"{figures['int8']:,} B ({figures['int8_over_float32']:.3f}x float32; projections alone "
          f"{figures['matmul_int8_over_float32']:.3f}x)")
  seconds = time.perf_counter() - started
  print(json.dumps({"benchmark": "quantize", "workdir": args.workdir, "step": step, "config": args.config,
                    "cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__,
                    "qwix": __import__("qwix").__version__, "rows": rows, "bigger_models_bytes": big,
                    "seconds": round(seconds, 1)}))


if __name__ == "__main__":
  main()
