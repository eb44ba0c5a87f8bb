"""`evaluate`: an eval step over a split, its sums added and its per-row outputs gathered.

An eval step (a task's `make_eval_step`, jitted by `lm.train.step.jit_steps`)
maps (params, batch) to float32 sums, which add up over batches, and to
per-row arrays under keys starting with `ROWS`, which are gathered in example
order; a task's `summarize(sums, rows, chars_per_token)` turns them into
`eval/...` metrics. The evaluator is handed the compiled steps, never the
run: the same function scores training's eval split, `--mode eval`'s split
and both sides of an A/B test.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lm.core import faults
from lm.core.errors import DataError
from lm.data import pipeline
from lm.train.step import CompiledSteps

ROWS = "rows/"  # prefix of per-row eval outputs


def evaluate(steps: CompiledSteps, params: Any, examples: Any, *, num_batches: int | None = None,
             eval_step: Callable | None = None, batch_shardings: Any = None
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """(summed outputs, gathered per-row outputs) of an eval step over eval examples.

  examples: random-access eval examples (windows, padded sentences, ...);
  num_batches: only the first this many global batches (None or 0: all).
  eval_step / batch_shardings: another jitted eval step (`CompiledSteps.jit_eval`)
  and the sharding of its batch (default: the run's eval step and batch).
  """
  batch_size = steps.global_batch_size
  dataset = pipeline.eval_dataset(examples, global_batch_size=batch_size, num_batches=num_batches or None,
                                  rows=steps.process_rows)
  if len(dataset) == 0:
    raise DataError(f"The eval split has {len(examples)} examples, fewer than one batch of {batch_size}; lower "
                    "batch_size or use a larger eval split.")
  eval_step = eval_step or steps.eval_step
  shardings = batch_shardings if batch_shardings is not None else steps.batch_shardings
  sums: dict[str, float] = {}
  rows: dict[str, list[np.ndarray]] = {}
  with steps.context():
    for index, local in enumerate(dataset):
      batch = pipeline.to_global_batch(local, shardings, batch_size)
      for key, value in eval_step(params, batch).items():
        if key.startswith(ROWS):
          rows.setdefault(key, []).append(np.asarray(value))
        else:
          sums[key] = sums.get(key, 0.0) + float(value)
      if index == 0:
        faults.point("train/eval")  # the n-th evaluation of this process, its first batch done
  return sums, {key: np.concatenate(values) for key, values in rows.items()}
