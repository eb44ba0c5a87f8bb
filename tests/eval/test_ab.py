"""The promotion gate: paired bootstrap of per-sequence losses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm.stats import ab

NUM_SEQUENCES = 200
MAX_REGRESSION = 0.02


def losses(n=NUM_SEQUENCES, seed=0) -> np.ndarray:
  """[n] per-sequence losses around 1.9, as a character model's."""
  return np.random.default_rng(seed).uniform(1.5, 2.3, size=n)


def test_identical_models_promote():
  base = losses()
  c = ab.paired_bootstrap(base, base.copy())
  assert c.relative_change == 0 and c.upper == 0 and c.lower == 0
  assert c.num_sequences == NUM_SEQUENCES
  decision = ab.gate({"old": (base, base.copy())}, old_domains=["old"], max_regression=MAX_REGRESSION)
  assert decision.promote and decision.reasons == []


def test_old_domain_ten_percent_worse_is_refused():
  base = losses()
  decision = ab.gate({"tiny_shakespeare": (base, base * 1.1)}, old_domains=["tiny_shakespeare"],
                     max_regression=MAX_REGRESSION)
  assert not decision.promote
  assert len(decision.reasons) == 1
  assert decision.reasons[0].startswith("tiny_shakespeare: loss ")
  assert "+10.0%" in decision.reasons[0] and "allowed +2.0%" in decision.reasons[0]
  assert decision.comparisons["tiny_shakespeare"].relative_change == pytest.approx(0.1)


def test_new_domain_worse_does_not_block():
  old, new = losses(seed=0), losses(seed=1)
  decision = ab.gate({"tiny_shakespeare": (old, old.copy()), "sst2": (new, new * 1.1)},
                     old_domains=["tiny_shakespeare"], max_regression=MAX_REGRESSION)
  assert decision.promote
  assert decision.comparisons["sst2"].relative_change == pytest.approx(0.1)  # still reported


def test_slightly_better_candidate_promotes():
  base = losses()
  candidate = base * 0.99 + np.random.default_rng(5).normal(0, 0.005, NUM_SEQUENCES)
  decision = ab.gate({"old": (base, candidate)}, old_domains=["old"], max_regression=MAX_REGRESSION)
  assert decision.promote
  assert decision.comparisons["old"].upper < 0


def noisy_pair():
  """Few sequences, candidate +1% on average but with a huge per-sequence spread."""
  base = np.full(8, 2.0)
  noise = np.random.default_rng(3).normal(0, 0.5, 8)
  return base, base * 1.01 + (noise - noise.mean())


def test_noisy_candidate_is_refused():
  base, candidate = noisy_pair()
  decision = ab.gate({"old": (base, candidate)}, old_domains=["old"], max_regression=MAX_REGRESSION)
  c = decision.comparisons["old"]
  assert c.relative_change == pytest.approx(0.01)  # the point estimate alone would pass
  assert c.lower < c.relative_change < c.upper
  assert c.upper > MAX_REGRESSION
  assert not decision.promote


def test_same_seed_same_result():
  base, candidate = noisy_pair()
  first = ab.gate({"old": (base, candidate)}, old_domains=["old"], max_regression=MAX_REGRESSION, seed=7)
  again = ab.gate({"old": (base, candidate)}, old_domains=["old"], max_regression=MAX_REGRESSION, seed=7)
  other = ab.paired_bootstrap(base, candidate, seed=8)
  assert first == again
  assert other.upper != first.comparisons["old"].upper
  json.dumps(first.to_json(), allow_nan=False)  # serializable as is


def test_invalid_inputs_raise():
  base = losses()
  with pytest.raises(ValueError, match="shapes"):
    ab.paired_bootstrap(base, base[:-1])
  with pytest.raises(ValueError, match="non-empty"):
    ab.paired_bootstrap(np.zeros(0), np.zeros(0))
  with pytest.raises(ValueError, match="max_regression"):
    ab.gate({"old": (base, base)}, old_domains=["old"], max_regression=-0.01)
  with pytest.raises(ValueError, match="fraction"):
    ab.gate({"old": (base, base)}, old_domains=["old"], max_regression=0.02, confidence=95)
  with pytest.raises(ValueError, match="no losses"):
    ab.gate({}, old_domains=["old"], max_regression=0.02)
