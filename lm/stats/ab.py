"""Paired comparisons of two models on the same examples: the A/B test and the online promotion gate.

One resampler serves both (`lm.stats.bootstrap.resampled_means`): example
indices drawn with replacement, the same indices for both models, which is
what pairs them.

  * `compare_language_models` / `compare_classifiers` (`--mode ab`): the
    difference B - A of per-example losses, or of accuracy and macro-F1, with a
    paired-bootstrap interval and p-value (lm.stats.bootstrap has the single-
    statistic test), McNemar's test for accuracy.
  * `paired_bootstrap` / `gate` (the online loop): the relative loss change
    per domain and the promotion decision, described next.

Promotion gate: promote a candidate model only if no old domain got worse.

After online training, a candidate model replaces the serving (baseline)
model only when we are confident that it did not regress on the domains the
baseline already knew. Comparing two mean losses is not enough: with few
held-out sequences a noisy candidate can look fine by chance. So both models
are evaluated on the SAME sequences and the per-sequence losses are compared
with a paired bootstrap: resample sequence indices with replacement, recompute

  relative change = (mean candidate loss - mean baseline loss) / mean baseline loss

(positive = the candidate is worse), and take the one-sided upper bound at
`confidence` (the `confidence` percentile of the resampled changes). An old
domain blocks promotion when that upper bound exceeds `max_regression`: the
gate errs towards keeping the baseline, so an uncertain comparison refuses.
Pairing removes the per-sequence difficulty shared by both models, which makes
the bound far tighter than resampling the two models independently.

New domains (the ones the candidate was just trained on) are compared and
reported but never block: the baseline was not expected to know them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lm.core.configs import ConfigPart, require
from lm.stats import classify
from lm.stats.bootstrap import (MAX_CONFIDENCE, MIN_CONFIDENCE, paired_bootstrap_difference, percentile_interval,
                                resampled_counts, resampled_means, shifted_p_value)

def compare_language_models(loss_a: np.ndarray, loss_b: np.ndarray, *, confidence: float = 0.95,
                            samples: int = 1000, seed: int = 0) -> dict[str, Any]:
  """B - A of per-example losses [num_examples] (each example's mean token loss), paired bootstrap.

  Returns {"metric": "loss", "a", "b", "difference", "lower", "upper", "p_value",
  "relative_change", "relative_lower", "relative_upper", ...}: a negative
  difference means B is better. The relative figures are the gate's statistic.
  """
  result = paired_bootstrap_difference(loss_a, loss_b, samples=samples, confidence=confidence, seed=seed)
  relative = paired_bootstrap(loss_a, loss_b, confidence=0.5 + confidence / 2.0, num_samples=samples, seed=seed)
  return {"metric": "loss", "a": result["mean_a"], "b": result["mean_b"], "difference": result["difference"],
          "lower": result["lower"], "upper": result["upper"], "p_value": result["p_value"],
          "relative_change": relative.relative_change, "relative_lower": relative.lower,
          "relative_upper": relative.upper, "confidence": confidence, "samples": samples,
          "num_examples": result["num_examples"]}


def _macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int, weights: np.ndarray) -> np.ndarray:
  """Macro-F1 for each row of example weights [samples, num_examples] -> [samples]."""
  cell = labels * num_classes + predictions  # [num_examples]
  one_hot = np.zeros((len(cell), num_classes * num_classes), np.float64)
  one_hot[np.arange(len(cell)), cell] = 1.0
  matrices = (weights @ one_hot).reshape(-1, num_classes, num_classes)  # [samples, true, predicted]
  tp = np.diagonal(matrices, axis1=1, axis2=2)
  denominator = matrices.sum(axis=2) + matrices.sum(axis=1)  # support + predicted = 2tp + fp + fn
  f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
  return f1.mean(axis=1)


def compare_classifiers(labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray,
                        num_classes: int, *, confidence: float = 0.95, samples: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
  """Accuracy and macro-F1 of B - A on the same examples: paired-bootstrap intervals and p-values, McNemar.

  labels, predictions_a, predictions_b: [num_examples] class ids. Returns
  {"accuracy": {...}, "macro_f1": {...}, "mcnemar": {...}}, each difference B - A
  (positive: B is better).
  """
  labels, predictions_a, predictions_b = (np.asarray(x, np.int64) for x in (labels, predictions_a, predictions_b))
  correct_a, correct_b = predictions_a == labels, predictions_b == labels
  accuracy = paired_bootstrap_difference(correct_a, correct_b, samples=samples, confidence=confidence,
                                                  seed=seed)
  counts = resampled_counts(len(labels), samples, seed).astype(np.float64)
  full = np.ones((1, len(labels)))
  f1_a, f1_b = (_macro_f1(labels, p, num_classes, full)[0] for p in (predictions_a, predictions_b))
  resampled = _macro_f1(labels, predictions_b, num_classes, counts) - _macro_f1(labels, predictions_a, num_classes,
                                                                                counts)
  lower, upper = percentile_interval(resampled, confidence)
  return {
      "accuracy": {"a": accuracy["mean_a"], "b": accuracy["mean_b"], "difference": accuracy["difference"],
                   "lower": accuracy["lower"], "upper": accuracy["upper"], "p_value": accuracy["p_value"]},
      "macro_f1": {"a": float(f1_a), "b": float(f1_b), "difference": float(f1_b - f1_a), "lower": lower,
                   "upper": upper, "p_value": shifted_p_value(resampled, float(f1_b - f1_a))},
      "mcnemar": classify.mcnemar(correct_a, correct_b),
      "confidence": confidence, "samples": samples, "num_examples": int(len(labels)),
  }


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One domain's baseline-vs-candidate comparison."""
  domain: str
  baseline_loss: float  # mean of baseline per-sequence losses
  candidate_loss: float
  relative_change: float  # (candidate - baseline) / baseline; positive = candidate is worse
  upper: float  # one-sided upper confidence bound of relative_change (bootstrap percentile at `confidence`)
  lower: float  # one-sided lower bound (percentile at 1 - confidence)
  num_sequences: int


def _check_confidence(confidence: float) -> None:
  if not MIN_CONFIDENCE <= confidence < MAX_CONFIDENCE:
    raise ValueError(
        f"confidence={confidence} must lie in [{MIN_CONFIDENCE}, {MAX_CONFIDENCE}); "
        "pass a fraction such as 0.95, not a percentage.")


def paired_bootstrap(baseline: np.ndarray, candidate: np.ndarray, *, domain: str = "",
                     confidence: float = 0.95, num_samples: int = 1000, seed: int = 0) -> Comparison:
  """Compares two models' per-sequence losses on the same sequences.

  Args:
    baseline: [num_sequences] the baseline's mean loss on each sequence.
    candidate: [num_sequences] the candidate's mean loss on the same sequences, in the same order.
    domain: the name reported in the result.
    confidence: the one-sided level of `upper` (and of `lower`, at 1 - confidence).
    num_samples: bootstrap resamples.
    seed: seeds numpy's default_rng, so a decision can be reproduced.

  Returns:
    A Comparison whose relative_change is the full-sample estimate and whose
    upper / lower are bootstrap percentiles.
  """
  _check_confidence(confidence)
  baseline = np.asarray(baseline, np.float64)
  candidate = np.asarray(candidate, np.float64)
  label = f" for domain {domain!r}" if domain else ""
  if baseline.ndim != 1 or baseline.shape != candidate.shape:
    raise ValueError(
        f"Baseline and candidate losses{label} have shapes {baseline.shape} and {candidate.shape}; "
        "pass one loss per sequence [num_sequences], for the same sequences in the same order.")
  num_sequences = baseline.shape[0]
  if num_sequences == 0:
    raise ValueError(f"No sequences{label}; evaluate both models on a non-empty held-out split.")
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1; the usual value is 1000.")
  if not (np.isfinite(baseline).all() and np.isfinite(candidate).all()):
    raise ValueError(f"Non-finite per-sequence losses{label}; a diverged model cannot be compared, keep the baseline.")
  if (baseline <= 0).any():
    raise ValueError(
        f"Baseline losses{label} must be positive (they divide the relative change); "
        "pass per-sequence cross-entropies, not log-likelihoods or differences.")
  # The same resampled sequences for both models is what makes the bootstrap paired.
  base_means, candidate_means = resampled_means(np.stack([baseline, candidate]), num_samples, seed)
  changes = (candidate_means - base_means) / base_means  # [num_samples]
  baseline_loss = float(baseline.mean())
  candidate_loss = float(candidate.mean())
  return Comparison(
      domain=domain, baseline_loss=baseline_loss, candidate_loss=candidate_loss,
      relative_change=(candidate_loss - baseline_loss) / baseline_loss,
      upper=float(np.quantile(changes, confidence)), lower=float(np.quantile(changes, 1.0 - confidence)),
      num_sequences=int(num_sequences))


@dataclasses.dataclass(frozen=True)
class GateDecision:
  """Whether to promote the candidate, and why not."""
  promote: bool
  reasons: list[str]  # one human-readable line per failing domain; empty when promoted
  comparisons: dict[str, Comparison]

  def to_json(self) -> dict[str, Any]:
    return {"promote": self.promote, "reasons": list(self.reasons),
            "comparisons": {d: dataclasses.asdict(c) for d, c in self.comparisons.items()}}


def gate(per_domain: dict[str, tuple[np.ndarray, np.ndarray]], *, old_domains: list[str],
         max_regression: float, confidence: float = 0.95, num_samples: int = 1000,
         seed: int = 0) -> GateDecision:
  """Decides promotion: refuses if any old domain may have regressed by more than max_regression.

  Args:
    per_domain: {domain: (baseline_losses [n_d], candidate_losses [n_d])}, per-sequence losses.
    old_domains: the domains the baseline already served; only these can block.
    max_regression: the tolerated relative loss increase (0.02 = +2%).
    confidence: the level of the one-sided upper bound compared with max_regression.
    num_samples, seed: bootstrap resamples and seed (see paired_bootstrap).
  """
  if not max_regression >= 0:
    raise ValueError(
        f"max_regression={max_regression} must be >= 0: it is the tolerated relative increase "
        "of an old domain's loss, e.g. 0.02 for +2%.")
  _check_confidence(confidence)
  missing = [d for d in old_domains if d not in per_domain]
  if missing:
    # Promoting without evidence on an old domain would defeat the gate.
    raise ValueError(
        f"Old domains {missing} have no losses; evaluate the baseline and the candidate on "
        "their held-out splits and pass them in per_domain.")
  comparisons = {
      domain: paired_bootstrap(baseline, candidate, domain=domain, confidence=confidence,
                               num_samples=num_samples, seed=seed)
      for domain, (baseline, candidate) in per_domain.items()}
  old = set(old_domains)
  reasons = [
      f"{c.domain}: loss {c.candidate_loss:.3f} vs {c.baseline_loss:.3f} ({c.relative_change:+.1%}, "
      f"upper bound {c.upper:+.1%} at {confidence * 100:g}% > allowed {max_regression:+.1%})"
      for domain, c in comparisons.items() if domain in old and c.upper > max_regression]
  return GateDecision(promote=not reasons, reasons=reasons, comparisons=comparisons)


# -- the `ab` part of the run config (--mode ab: two runs on the same examples) ------------------------------
CONFIG_FIELDS = {
    "ab.a": "",  # workdir or checkpoints folder of model A (the baseline)
    "ab.b": "",  # of model B (the candidate); B - A is reported
    "ab.confidence": 0.95,  # two-sided interval level
    "ab.bootstrap_samples": 1000,
    "ab.seed": 0,
}


def validate_config(config: Any, mode: str) -> None:
  ab = config.ab
  require(mode != "ab" or (bool(ab.a) and bool(ab.b)), "--mode ab compares two runs: set --config.ab.a=WORKDIR_A "
          "and --config.ab.b=WORKDIR_B (workdirs or checkpoints folders of trained runs).")
  require(0 < ab.confidence < 1 and ab.bootstrap_samples >= 1,
          f"config.ab.confidence={ab.confidence} must be in (0, 1) (e.g. 0.95) and ab.bootstrap_samples >= 1.")


CONFIG = ConfigPart("lm.stats.ab", CONFIG_FIELDS, validate_config)


def preference_gate(candidate_margins: np.ndarray, current_margins: np.ndarray, *, max_drop: float
                    ) -> dict[str, Any]:
  """The online gate's preference check: refuses a candidate whose accuracy on held-out preference pairs (the
  share of pairs whose chosen response it finds likelier: margin log p(chosen) - log p(rejected) > 0) is below
  the current model's by more than `max_drop`.

  Returns {"passed", "candidate_accuracy", "current_accuracy", "pairs", "reason"} (reason: why it would fail).
  """
  candidate_margins, current_margins = np.asarray(candidate_margins), np.asarray(current_margins)
  if candidate_margins.shape != current_margins.shape or not len(candidate_margins):
    raise ValueError(f"preference_gate needs the margins of the same non-empty set of pairs; got "
                     f"{candidate_margins.shape} and {current_margins.shape}.")
  if not 0 <= max_drop <= 1:
    raise ValueError(f"max_drop={max_drop} must be in [0, 1]: a fall of an accuracy.")
  candidate = float(np.mean(candidate_margins > 0))
  current = float(np.mean(current_margins > 0))
  return {"passed": candidate >= current - max_drop, "candidate_accuracy": candidate, "current_accuracy": current,
          "pairs": int(len(candidate_margins)),
          "reason": (f"held-out preference accuracy fell from {current:.3f} to {candidate:.3f} (allowed drop "
                     f"{max_drop:g}) on {len(candidate_margins)} pairs")}
