"""BLEU / self-BLEU against sacrebleu and by hand, domination, the plot, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from lm.stats.generation import (QualityDiversity, bleu, dominated, evaluate_samples, plot_quality_diversity,
                                self_bleu, tied_with, write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ORDERS = (2, 3, 4, 5)

SAMPLES = [
    "the cat sat on the mat.",
    "a dog sat on the mat, and the cat ran away!",
    "the cat ran on the mat",
    "dogs and cats are friends (sometimes).",
    "the bird sat.",
]
REFERENCES = [
    "the cat sat on the mat.",
    "the dog ran away from the cat!",
    "a bird sat on the mat, and the dog sat on the cat.",
    "cats are friends of dogs (sometimes), they say.",
]


def sacrebleu_score(hypotheses: list[str], streams: list[list[str]], n: int) -> float:
  metric = BLEU(max_ngram_order=n, effective_order=False, smooth_method="none", tokenize="13a")
  return metric.corpus_score(hypotheses, streams).score / 100.0


def random_sentences(count: int, length: int, vocabulary: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(f"w{k}" for k in rng.integers(0, vocabulary, size=length)) for _ in range(count)]


def point(label: str, quality: float, repetition: float, temperature: float | None = None) -> QualityDiversity:
  return QualityDiversity(label=label, bleu={4: quality}, self_bleu={4: repetition}, temperature=temperature)


def test_bleu_identical_sets_is_one():
  got = bleu(REFERENCES, REFERENCES)
  assert sorted(got) == list(ORDERS)
  for n in ORDERS:
    assert got[n] == pytest.approx(1.0)


def test_bleu_matches_sacrebleu_with_every_reference_for_every_sample():
  streams = [[reference] * len(SAMPLES) for reference in REFERENCES]
  got = bleu(SAMPLES, REFERENCES, max_order=5)
  for n in ORDERS:
    expected = sacrebleu_score(SAMPLES, streams, n)
    assert 0.0 < expected < 1.0  # the example exercises partial matches at every order
    assert got[n] == pytest.approx(expected, abs=1e-9)


def test_samples_without_n_grams_of_an_order_score_zero_there():
  # One-word samples (a collapsed generator) hold no bigram: BLEU-2 is 0, not their unigram precision.
  got = bleu(["the", "cat", "the"], REFERENCES, max_order=3)
  assert got[2] == 0.0 and got[3] == 0.0
  assert self_bleu(["the", "the", "the"], max_order=2)[2] == 0.0


def test_bleu_by_hand():
  # Every unigram matches, no bigram does: BLEU-2 = sqrt(1 * 0) = 0 (no smoothing).
  assert bleu(["a b c d"], ["b a d c"], max_order=2)[2] == pytest.approx(0.0, abs=1e-9)
  # All n-grams match but the sample (2 tokens) is shorter than the reference (3):
  # brevity penalty exp(1 - 3/2).
  assert bleu(["the cat"], ["the cat sat"], max_order=2)[2] == pytest.approx(np.exp(-0.5))
  # The closest reference length (2, not 6) is used, so no brevity penalty; the long
  # reference supplies the n-gram matches.
  got = bleu(["the cat sat"], ["the cat sat on the mat", "a dog"], max_order=3)
  assert got[2] == pytest.approx(1.0) and got[3] == pytest.approx(1.0)


def test_self_bleu_identical_samples_is_one():
  got = self_bleu(["the cat sat on the mat ."] * 6)
  for n in ORDERS:
    assert got[n] == pytest.approx(1.0)


def test_self_bleu_distinct_random_samples_near_zero():
  # Leave-one-out: were a sample its own reference, this would be 1.0.
  got = self_bleu(random_sentences(40, 12, 5000, seed=1))
  for n in ORDERS:
    assert got[n] < 0.01


def test_self_bleu_matches_sacrebleu_leave_one_out():
  samples = SAMPLES + REFERENCES
  others = [samples[:i] + samples[i + 1:] for i in range(len(samples))]
  streams = [[others[i][k] for i in range(len(samples))] for k in range(len(samples) - 1)]
  got = self_bleu(samples, max_samples=None)
  for n in ORDERS:
    assert got[n] == pytest.approx(sacrebleu_score(samples, streams, n), abs=1e-9)


def test_self_bleu_one_duplicated_pair_raises_it():
  distinct = random_sentences(20, 10, 5000, seed=2)
  duplicated = distinct[:-1] + [distinct[0]]
  low, high = self_bleu(distinct), self_bleu(duplicated)
  for n in ORDERS:
    assert high[n] > low[n] + 0.05  # 2 of 20 samples now match exactly


def test_self_bleu_subsample_is_deterministic_and_bounded():
  samples = random_sentences(60, 8, 30, seed=3)
  first = self_bleu(samples, max_samples=10, seed=7)
  assert first == self_bleu(samples, max_samples=10, seed=7)
  assert first != self_bleu(samples, max_samples=None)


def test_evaluate_samples_and_json_round_trip():
  result = evaluate_samples("MLE T=0.8", SAMPLES, REFERENCES, temperature=0.8, nll=3.5, max_order=4)
  assert result.bleu == bleu(SAMPLES, REFERENCES, max_order=4)
  assert result.self_bleu == self_bleu(SAMPLES, max_order=4)
  data = json.loads(json.dumps(result.to_json()))
  assert set(data) == {"label", "temperature", "nll", "bleu", "self_bleu"}
  assert QualityDiversity.from_json(data) == result


def test_dominated():
  curve = [point("MLE T=0.7", 0.50, 0.60, 0.7), point("MLE T=1.0", 0.40, 0.30, 1.0)]
  assert dominated(point("GAN worse on both", 0.45, 0.65), curve)
  assert dominated(point("GAN tie on quality", 0.40, 0.35), curve)  # equal BLEU, more repetitive
  assert not dominated(point("GAN better quality", 0.55, 0.60), curve)
  assert not dominated(point("GAN trade-off", 0.45, 0.45), curve)  # between the two curve points
  assert not dominated(point("GAN equal", 0.40, 0.30), curve)  # identical point: no strict gain
  assert not dominated(point("GAN", 0.1, 0.9), [])


def test_ties_are_reported_not_counted_as_wins(tmp_path):
  curve = [point("T=1", 0.0, 0.0, 1.0), point("T=2", 0.1, 0.2, 2.0)]
  gan = point("GAN", 0.0, 0.0)
  assert not dominated(gan, curve) and tied_with(gan, curve) == ["T=1"]
  report = json.loads(open(write_report(curve, [gan], tmp_path)).read())
  assert report["points"][0]["tied_with"] == ["T=1"] and report["dominated"] == []


def test_plot_writes_png(tmp_path):
  curve = [point("MLE T=1.0", 0.40, 0.30, 1.0), point("MLE T=0.7", 0.50, 0.60, 0.7)]
  points = [point("GAN A", 0.45, 0.65), point("GAN B", 0.55, 0.60)]
  path = plot_quality_diversity(curve, points, tmp_path / "plots" / "qd.png")
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert [p.name for p in (tmp_path / "plots").iterdir()] == ["qd.png"]  # no temporary left behind


def test_write_report(tmp_path):
  curve = [point("MLE T=1.0", 0.40, 0.30, 1.0), point("MLE T=0.7", 0.50, 0.60, 0.7)]
  points = [point("GAN A", 0.45, 0.65), point("GAN B", 0.55, 0.60)]
  path = write_report(curve, points, tmp_path)
  with open(path) as f:
    report = json.load(f)
  assert set(report) == {"order", "metric", "curve", "points", "dominated"}
  assert report["order"] == 4
  assert [entry["temperature"] for entry in report["curve"]] == [0.7, 1.0]  # temperature order
  assert [(entry["label"], entry["dominated"]) for entry in report["points"]] == [("GAN A", True),
                                                                                   ("GAN B", False)]
  assert report["dominated"] == ["GAN A"]


@pytest.mark.parametrize("call, message", [
    (lambda: bleu([], REFERENCES), "at least 1"),
    (lambda: bleu(SAMPLES, []), "at least 1"),
    (lambda: bleu("the cat sat", REFERENCES), "single string"),
    (lambda: bleu([[1, 2, 3]], REFERENCES), "not a str"),
    (lambda: bleu(SAMPLES, REFERENCES, max_order=1), "max_order"),
    (lambda: self_bleu(["only one"]), "at least 2"),
    (lambda: self_bleu(SAMPLES, max_samples=1), "max_samples"),
    (lambda: dominated(point("GAN", 0.5, 0.5), [point("MLE", 0.6, 0.4)], order=5), "order-5"),
    (lambda: point("bad", 45.0, 0.5), "outside"),
    (lambda: QualityDiversity("bad", {4: 0.5}, {4: 0.5}, temperature=0.0), "temperature"),
    (lambda: QualityDiversity("bad", {4: 0.5}, {4: 0.5}, nll=float("nan")), "nll"),
    (lambda: write_report([], [], "/nonexistent"), "empty"),
])
def test_bad_input(call, message):
  with pytest.raises(ValueError, match=message):
    call()
