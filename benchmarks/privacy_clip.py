r"""Choosing DP-SGD's clip norm: per-example gradient norms at initialization, and what clipping does to the step.

  python benchmarks/privacy_clip.py --config experiments/sst2_private.py:8 [--clips 1,10,25,50] [--batch 256]

Builds the run of `--config` (its model, data and task; nothing is written but the tokenizer's cache), draws one
batch of `--batch` training examples, and prints the quantiles of the examples' gradient norms at initialization
and, for each clip norm C, the share of examples clipped, the norm of the mean clipped gradient, and its cosine
with the mean unclipped gradient (the ordinary step's direction). Clipping every example rescales each by
C / |g_i|, so examples with small gradients weigh more: when all are clipped the mean can stop being a descent
direction at all (cosine <= 0), whatever the noise. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.config import load_config  # noqa: E402  pylint: disable=g-import-not-at-top
from lm.data import pipeline  # noqa: E402
from lm.experiment import build_experiment, open_train_split, token_windows  # noqa: E402
from lm.train import privacy  # noqa: E402
from lm.train import step as step_lib  # noqa: E402
from lm.train.state import TrainState  # noqa: E402


def _recorder() -> optax.GradientTransformation:
  """An 'optimizer' whose state is the gradient it was given and which leaves the params alone."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def measure(config_path: str, clips: list[float], batch: int, micro: int = 32, overrides: dict | None = None) -> dict:
  """The figures the script prints (module doc), of `config_path` with `overrides` (config keys) applied."""
  overrides = {**(overrides or {}), "batch_size": batch, "grad_accum_steps": max(batch // micro, 1),
               "privacy.enabled": False}
  config = load_config(config_path, overrides)
  with tempfile.TemporaryDirectory() as workdir:
    experiment, _ = build_experiment(config, workdir, "train")
    examples = token_windows(experiment, open_train_split(config), config.data.train_stride, train=True)
    dataset = pipeline.private_train_dataset(examples, seed=config.seed, global_batch_size=batch)
    data = pipeline.to_global_batch(dataset[0], experiment.steps.batch_shardings, batch)
    task, initial, recorder = experiment.task, experiment.init_state(), _recorder()
    state = TrainState(step=initial.step, params=initial.params, opt_state=recorder.init(initial.params),
                       rng=initial.rng)

    def gradient(dp: privacy.DpSgd) -> tuple[np.ndarray, dict]:
      step = jax.jit(step_lib.make_train_step(task.updates(), recorder, grad_accum_steps=config.grad_accum_steps,
                                              loss_totals=task.loss_totals, prepare=task.prepare, privacy=dp))
      with experiment.steps.context():
        new, metrics = step(state, data)
      flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(jax.device_get(new.opt_state))])
      return flat, {key: float(value) for key, value in metrics.items()}

    # The mean gradient, and each example's norm: a clip far above every norm leaves them whole.
    mean, _ = gradient(privacy.DpSgd(clip_norm=math.inf, noise_multiplier=0.0))
    update, key = task.updates()[0], jax.random.fold_in(state.key, state.step)

    def one(params, single, row):  # one example's loss, as the private step sees it
      totals = {"rows": jnp.float32(1.0), **(task.loss_totals(single) if task.loss_totals else {})}
      return update.loss_fn(params, single, step_lib.StepContext(
          step=state.step, rng=jax.random.fold_in(key, row[0]), step_rng=key, rows=row, repeat=jnp.int32(0),
          totals=totals, params=params))

    count = min(batch, 64)  # enough examples for the quantiles, one vmap
    _, (_, norms, _) = jax.jit(privacy.clipped_gradient_sum(one, math.inf))(
        state.params, jax.tree.map(lambda x: x[:count], data), jnp.arange(count))
    norms = np.asarray(norms)
    rows = []
    for clip in clips:
      got, metrics = gradient(privacy.DpSgd(clip_norm=clip, noise_multiplier=0.0))
      rows.append({"clip_norm": clip, "clip_fraction": metrics["train/clip_fraction"],
                   "clipped_mean_norm": float(np.linalg.norm(got)),
                   "cosine_with_mean_gradient": float(got @ mean / (np.linalg.norm(got) * np.linalg.norm(mean)))})
  quantiles = {f"p{q}": float(np.percentile(norms, q)) for q in (10, 50, 90)}
  return {"config": config_path, "batch": batch, "parameters": int(mean.size),
          "mean_gradient_norm": float(np.linalg.norm(mean)), "example_norm_quantiles": quantiles,
          "examples_for_quantiles": len(norms), "clips": rows}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="a config file[:variant], e.g. experiments/sst2_private.py:8")
  parser.add_argument("--clips", default="1,10,25,50", help="comma-separated clip norms")
  parser.add_argument("--batch", type=int, default=256, help="examples in the batch")
  args = parser.parse_args()
  result = measure(args.config, [float(c) for c in args.clips.split(",")], args.batch)
  q = result["example_norm_quantiles"]
  print(f"{result['config']}: {result['parameters']:,} parameters; per-example gradient norms at initialization "
        f"p10 {q['p10']:.3g}, median {q['p50']:.3g}, p90 {q['p90']:.3g} ({result['examples_for_quantiles']} examples); "
        f"mean gradient norm {result['mean_gradient_norm']:.3g} (batch {result['batch']})")
  print("\n| clip norm | clipped | mean clipped gradient norm | cosine with the mean gradient |")
  print("|---|---|---|---|")
  for row in result["clips"]:
    print(f"| {row['clip_norm']:g} | {row['clip_fraction']:.0%} | {row['clipped_mean_norm']:.3g} | "
          f"{row['cosine_with_mean_gradient']:.3f} |")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
