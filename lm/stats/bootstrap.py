"""The paired bootstrap: one resampler for the A/B test, the online promotion gate and classifier comparisons.

Example indices are drawn with replacement, the same indices for both models,
which is what pairs them (`resampled_means`); `paired_bootstrap_difference`
is the single-statistic test (mean difference B - A, interval, p-value).
"""

from __future__ import annotations

from typing import Any

import numpy as np

RESAMPLE_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MiB of int64)
MIN_CONFIDENCE = 0.5  # below it the "upper" bound would lie under the median
MAX_CONFIDENCE = 1.0  # exclusive: a 100% bound is the worst resample, not a statistic


def resampled_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
  """Bootstrap means of per-example values, the same resampled examples for every row.

  values: [models, num_examples] (or [num_examples]); returns [models, samples]
  (or [samples]). Indices come from numpy's default_rng(seed), drawn
  [chunk, num_examples] at a time, so memory stays bounded for large splits
  and a seed gives the same resamples whatever the number of models.
  """
  values = np.asarray(values, np.float64)
  flat = values.ndim == 1
  values = values[None] if flat else values
  num_examples = values.shape[1]
  rng = np.random.default_rng(seed)
  rows = max(1, RESAMPLE_CHUNK_ELEMENTS // num_examples)
  means = np.empty((values.shape[0], int(samples)), np.float64)
  for start in range(0, int(samples), rows):
    stop = min(int(samples), start + rows)
    indices = rng.integers(0, num_examples, size=(stop - start, num_examples))  # [chunk, num_examples]
    means[:, start:stop] = values[:, indices].mean(axis=2)
  return means[0] if flat else means


def resampled_counts(num_examples: int, samples: int, seed: int) -> np.ndarray:
  """How often each example is drawn in each resample, [samples, num_examples], from the same draws as
  `resampled_means` (for statistics that are not means, such as macro-F1)."""
  rng = np.random.default_rng(seed)
  rows = max(1, RESAMPLE_CHUNK_ELEMENTS // num_examples)
  counts = np.zeros((int(samples), num_examples), np.int32)
  for start in range(0, int(samples), rows):
    stop = min(int(samples), start + rows)
    indices = rng.integers(0, num_examples, size=(stop - start, num_examples))
    for row, drawn in enumerate(indices):
      counts[start + row] = np.bincount(drawn, minlength=num_examples)
  return counts


def shifted_p_value(resampled: np.ndarray, observed: float) -> float:
  """Two-sided bootstrap p-value of "no difference": the resampled statistic shifted to mean 0 stands for
  the null (Berg-Kirkpatrick et al. 2012), doubled; resolution 2 / samples."""
  shifted = resampled - observed
  if observed > 0:
    return float(min(1.0, 2.0 * np.count_nonzero(shifted >= observed) / len(resampled)))
  if observed < 0:
    return float(min(1.0, 2.0 * np.count_nonzero(shifted <= observed) / len(resampled)))
  return 1.0


def percentile_interval(resampled: np.ndarray, confidence: float) -> tuple[float, float]:
  alpha = 1.0 - confidence
  lower, upper = np.quantile(resampled, [alpha / 2.0, 1.0 - alpha / 2.0])
  return float(lower), float(upper)


def check_pair(a: Any, b: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(a)
  b = np.asarray(b)
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(
        f"{what} of A and B have shapes {a.shape} and {b.shape}; pass one value per example [num_examples] "
        "for both models, on the same examples in the same order.")
  if a.shape[0] == 0:
    raise ValueError(f"No examples: the {what} are empty; evaluate both models on a non-empty split.")
  return a, b


def paired_bootstrap_difference(a_values: Any, b_values: Any, *, samples: int = 1000, confidence: float = 0.95,
                                seed: int = 0) -> dict[str, Any]:
  """Mean difference B - A of per-example values on the same examples, with a bootstrap interval and p-value.

  The values can be anything measured per example: correctness 0/1 (the
  difference is then the accuracy difference) or per-sequence losses. With
  d_i = b_i - a_i and D = mean(d), each of `samples` resamples draws n example
  indices with replacement (the same indices for A and B, which is what pairs
  them) and computes the resampled difference m_s = mean(d[indices]).

    * Interval: the two-sided percentile interval, the (1 - confidence) / 2 and
      (1 + confidence) / 2 quantiles of m_s (numpy's default linear interpolation).
    * p-value for "no difference": the bootstrap distribution shifted to mean 0,
      T_s = m_s - D, stands for the null; the p-value is twice the fraction of
      T_s at least as far out as D on D's side, capped at 1:
        D > 0: p = min(1, 2 * #{T_s >= D} / samples)  (= twice the fraction with m_s >= 2 D),
        D < 0: p = min(1, 2 * #{T_s <= D} / samples),
        D = 0: p = 1
      (the shifted test of Berg-Kirkpatrick et al. 2012, "An Empirical
      Investigation of Statistical Significance in NLP", made two-sided by
      doubling). Its resolution is 2 / samples, and p = 0 means p < 2 / samples.

  Args:
    a_values, b_values: [num_examples] per-example values of A and B, same examples in the same order.
    samples: bootstrap resamples.
    confidence: two-sided level of the interval, in (0, 1).
    seed: seeds numpy's default_rng; the result is reproducible for a seed and num_examples.

  Returns:
    {"mean_a", "mean_b", "difference" (B - A), "lower", "upper", "p_value",
     "confidence", "samples", "num_examples"}, plain Python numbers.
  """
  a, b = check_pair(a_values, b_values, "per-example values")
  if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or not (
      np.issubdtype(b.dtype, np.number) or b.dtype == np.bool_):
    raise ValueError(f"Per-example values have dtypes {a.dtype} and {b.dtype}; pass numbers (or booleans).")
  a, b = a.astype(np.float64), b.astype(np.float64)
  num_examples = a.shape[0]
  if num_examples < 2:
    raise ValueError("One example cannot be resampled into a distribution; evaluate on at least 2 examples.")
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise ValueError("Non-finite per-example values; a diverged model cannot be compared, drop or fix it first.")
  if not isinstance(samples, (int, np.integer)) or isinstance(samples, bool) or samples < 1:
    raise ValueError(f"samples={samples!r} must be an integer >= 1; the usual value is 1000.")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence={confidence} must lie in (0, 1); pass a fraction such as 0.95, not a percentage.")
  differences = b - a
  observed = float(differences.mean())
  means = resampled_means(differences, int(samples), seed)  # the same resampler as the online gate
  p_value = shifted_p_value(means, observed)
  lower, upper = percentile_interval(means, confidence)
  return {
      "mean_a": float(a.mean()), "mean_b": float(b.mean()), "difference": observed,
      "lower": float(lower), "upper": float(upper),
      "p_value": float(p_value),
      "confidence": float(confidence), "samples": int(samples), "num_examples": int(num_examples),
  }
