r"""The cost of DPO's reference in the step: log-probabilities computed in the step vs precomputed once.

  python benchmarks/dpo_step.py [--rounds 3] [--steps 30] [--pairs 4096]

`config.head="dpo"` keeps the frozen reference in the train state and runs its
forward pass in every step (`lm/tasks/dpo.py`). The alternative is to compute
the reference's log-probabilities once, before training, into the data. This
times, on one model (the SST-2 sentence LM of experiments/dpo_sentiment.py:
2 layers, width 128, 64 positions, a 2,000-piece vocabulary; batch 64 pairs):

  in_step      the jitted AdamW step of the DPO loss with the reference's forward pass inside (what lm does);
  precomputed  the same step taking the reference's log-probabilities from the batch;
  precompute   the one pass over `--pairs` pairs that the second needs before training (its cost per pair).

Alternating rounds, median step time of each. Prints one JSON line with the
figures, the machine (lscpu's model name) and the versions.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.models.config import TransformerConfig
from lm.models.preference import pair_logprobs, preference_loss
from lm.models.transformer import TransformerLM

BATCH, SEQ_LEN, VOCAB = 64, 64, 2048


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
  except Exception:  # pylint: disable=broad-except
    return platform.processor() or "unknown"


def make_batch(rng: np.random.Generator) -> dict[str, jnp.ndarray]:
  batch = {}
  for side in ("chosen", "rejected"):
    tokens = rng.integers(0, VOCAB - 4, size=(BATCH, SEQ_LEN + 1)).astype(np.int32)
    mask = np.zeros((BATCH, SEQ_LEN), np.int32)
    lengths = rng.integers(8, SEQ_LEN, size=BATCH)
    for row, length in enumerate(lengths):
      mask[row, 3:length] = 1  # a 3-token prompt, then the response
    batch.update({f"{side}_inputs": jnp.asarray(tokens[:, :-1]), f"{side}_targets": jnp.asarray(tokens[:, 1:]),
                  f"{side}_mask": jnp.asarray(mask)})
  return batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--pairs", type=int, default=4096)
  args = parser.parse_args()

  config = TransformerConfig(vocab_size=VOCAB, num_layers=2, num_heads=4, width=128, max_len=SEQ_LEN)
  model = TransformerLM(config)
  policy = model.init(jax.random.key(0), jnp.zeros((BATCH, SEQ_LEN), jnp.int32))["params"]
  reference = jax.tree.map(lambda x: x.copy(), policy)
  tx = optax.adamw(1e-4)
  batch = make_batch(np.random.default_rng(0))

  def dpo(params, batch, reference_logprobs):
    chosen, rejected = pair_logprobs(model, params, batch)
    losses, _ = preference_loss(chosen, rejected, *reference_logprobs, beta=0.1)
    return jnp.mean(losses)

  def update(params, opt_state, grads):
    changes, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, changes), opt_state

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def in_step(params, opt_state, reference, batch):
    reference_logprobs = jax.lax.stop_gradient(pair_logprobs(model, reference, batch))
    grads = jax.grad(dpo)(params, batch, reference_logprobs)
    return update(params, opt_state, grads)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def precomputed(params, opt_state, batch, reference_logprobs):
    grads = jax.grad(dpo)(params, batch, reference_logprobs)
    return update(params, opt_state, grads)

  logprobs = jax.jit(lambda params, batch: pair_logprobs(model, params, batch))
  ref_logprobs = logprobs(reference, batch)

  def run(kind: str) -> float:
    params, opt_state = jax.tree.map(lambda x: x.copy(), policy), tx.init(policy)
    call = ((lambda p, o: in_step(p, o, reference, batch)) if kind == "in_step" else
            (lambda p, o: precomputed(p, o, batch, ref_logprobs)))
    params, opt_state = call(params, opt_state)  # compile and warm up
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(args.steps):
      params, opt_state = call(params, opt_state)
    jax.block_until_ready(params)
    return (time.perf_counter() - start) / args.steps * 1000

  def precompute_ms_per_pair() -> float:
    jax.block_until_ready(logprobs(reference, batch))
    start = time.perf_counter()
    calls = max(1, args.pairs // BATCH)
    for _ in range(calls):
      out = logprobs(reference, batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / (calls * BATCH) * 1000

  times: dict[str, list[float]] = {"in_step": [], "precomputed": []}
  for _ in range(args.rounds):
    for kind in times:
      times[kind].append(run(kind))
  in_step_ms, precomputed_ms = (statistics.median(times[kind]) for kind in ("in_step", "precomputed"))
  per_pair = precompute_ms_per_pair()
  print(json.dumps({
      "machine": cpu_model(), "devices": jax.device_count(), "jax": jax.__version__,
      "batch_pairs": BATCH, "seq_len": SEQ_LEN, "rounds": times,
      "in_step_ms": round(in_step_ms, 2), "precomputed_ms": round(precomputed_ms, 2),
      "in_step_over_precomputed": round(in_step_ms / precomputed_ms, 3),
      "precompute_ms_per_pair": round(per_pair, 4),
      # Steps after which precomputing (one pass over the pairs) has cost as much as the in-step passes saved.
      "break_even_steps_per_1000_pairs": round(1000 * per_pair / max(in_step_ms - precomputed_ms, 1e-9), 1),
  }))


if __name__ == "__main__":
  main()
