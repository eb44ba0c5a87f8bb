"""Classifier evaluation: metrics against scikit-learn, folds, McNemar, the paired bootstrap, the plot."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm
from sklearn.model_selection import StratifiedKFold

from lm.stats.classify import (classification_metrics, confusion_matrix, fold_split, mcnemar,
                              paired_bootstrap_difference, plot_confusion_matrix, stratified_folds)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 3 classes; class 2 occurs but is never predicted (precision 0 by zero_division=0).
LABELS = [0, 0, 0, 1, 1, 1, 1, 2, 2, 0]
PREDICTIONS = [0, 1, 0, 1, 1, 0, 1, 1, 0, 0]


def assert_matches_sklearn(labels, predictions, num_classes):
  result = classification_metrics(labels, predictions, num_classes)
  json.dumps(result, allow_nan=False)  # plain Python numbers only
  classes = list(range(num_classes))
  assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions), abs=1e-12)
  precision, recall, f1, support = skm.precision_recall_fscore_support(
      labels, predictions, labels=classes, average=None, zero_division=0)
  per_class = result["per_class"]
  assert [entry["class"] for entry in per_class] == classes
  np.testing.assert_allclose([entry["precision"] for entry in per_class], precision, atol=1e-12)
  np.testing.assert_allclose([entry["recall"] for entry in per_class], recall, atol=1e-12)
  np.testing.assert_allclose([entry["f1"] for entry in per_class], f1, atol=1e-12)
  assert [entry["support"] for entry in per_class] == support.tolist()
  for average in ("macro", "weighted"):
    p, r, f, _ = skm.precision_recall_fscore_support(labels, predictions, labels=classes, average=average,
                                                     zero_division=0)
    assert result[f"{average}_precision"] == pytest.approx(p, abs=1e-12)
    assert result[f"{average}_recall"] == pytest.approx(r, abs=1e-12)
    assert result[f"{average}_f1"] == pytest.approx(f, abs=1e-12)
  expected = skm.confusion_matrix(labels, predictions, labels=classes)
  assert result["confusion_matrix"] == expected.tolist()
  matrix = confusion_matrix(labels, predictions, num_classes)
  assert matrix.dtype == np.int64 and matrix.shape == (num_classes, num_classes)
  np.testing.assert_array_equal(matrix, expected)
  return result


# ---------------------------------------------------------------------------
# Metrics.


def test_metrics_fixed_example_match_sklearn_and_by_hand():
  result = assert_matches_sklearn(LABELS, PREDICTIONS, 3)
  assert result["accuracy"] == pytest.approx(6 / 10)
  by_class = {entry["class"]: entry for entry in result["per_class"]}
  assert by_class[2] == {"class": 2, "name": "2", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
  assert by_class[0]["precision"] == pytest.approx(3 / 5) and by_class[0]["recall"] == pytest.approx(3 / 4)
  assert result["confusion_matrix"] == [[3, 1, 0], [1, 3, 0], [1, 1, 0]]
  assert result["num_examples"] == 10 and result["num_classes"] == 3


def test_metrics_class_names_and_types():
  result = classification_metrics(np.array(LABELS, np.int32), np.array(PREDICTIONS, np.uint8), 3,
                                  class_names=["neg", "neu", "pos"])
  assert result["class_names"] == ["neg", "neu", "pos"]
  assert [entry["name"] for entry in result["per_class"]] == ["neg", "neu", "pos"]
  for key in ("accuracy", "macro_f1", "weighted_f1"):
    assert type(result[key]) is float
  assert all(type(v) is int for row in result["confusion_matrix"] for v in row)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_random_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  num_classes = 5
  labels = rng.integers(0, num_classes, size=300)
  # Mostly right, and class 4 is never predicted.
  predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, num_classes, size=300))
  predictions = np.where(predictions == 4, 3, predictions)
  assert_matches_sklearn(labels, predictions, num_classes)


def test_metrics_class_absent_everywhere_counts_in_macro():
  # Class 3 neither occurs nor is predicted: it scores 0 and drags the macro mean, as sklearn with labels=range(4).
  result = assert_matches_sklearn(LABELS, PREDICTIONS, 4)
  assert result["per_class"][3]["support"] == 0


@pytest.mark.parametrize("labels, predictions, num_classes, message", [
    ([0, 1], [0], 2, "same examples"),
    ([], [], 2, "No examples"),
    ([0, 3], [0, 1], 3, "num_classes=3"),
    ([0, 1], [0, -1], 2, r"predictions holds class ids in \[-1, 0\]"),
    ([0.0, 1.0], [0, 1], 2, "integer dtype"),
    ([0, 1], [0, 1], 0, "positive integer"),
    ([[0, 1]], [[0, 1]], 2, "argmax"),
])
def test_metrics_bad_inputs(labels, predictions, num_classes, message):
  with pytest.raises(ValueError, match=message):
    classification_metrics(labels, predictions, num_classes)


def test_metrics_class_names_wrong_length():
  with pytest.raises(ValueError, match="one name per class"):
    classification_metrics(LABELS, PREDICTIONS, 3, class_names=["a", "b"])


# ---------------------------------------------------------------------------
# The plot.


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion_matrix_writes_png(tmp_path, normalize):
  matrix = confusion_matrix(LABELS, PREDICTIONS, 3)
  path = plot_confusion_matrix(matrix, tmp_path / "plots" / "cm.png", class_names=["neg", "neu", "pos"],
                               normalize=normalize)
  assert path == os.fspath(tmp_path / "plots" / "cm.png")
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert os.listdir(tmp_path / "plots") == ["cm.png"]  # no temporary left behind


def test_plot_accepts_metrics_nested_list_with_empty_row(tmp_path):
  result = classification_metrics(LABELS, PREDICTIONS, 4)  # class 3: an all-zero row
  path = plot_confusion_matrix(result["confusion_matrix"], tmp_path / "cm.png", normalize=True)
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC


def test_plot_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="square"):
    plot_confusion_matrix(np.zeros((2, 3)), tmp_path / "cm.png")
  with pytest.raises(ValueError, match="non-negative"):
    plot_confusion_matrix(np.array([[1, -1], [0, 2]]), tmp_path / "cm.png")
  with pytest.raises(ValueError, match="one name per class"):
    plot_confusion_matrix(np.eye(2), tmp_path / "cm.png", class_names=["only one"])
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------
# Folds.


def imbalanced_labels(seed=0) -> np.ndarray:
  """103 examples over 4 classes of sizes 50, 30, 20 and 3 (fewer than k), shuffled."""
  labels = np.repeat([0, 1, 2, 3], [50, 30, 20, 3])
  return np.random.default_rng(seed).permutation(labels)


def per_fold_class_counts(labels, folds, num_classes=4) -> np.ndarray:
  return np.array([np.bincount(labels[fold], minlength=num_classes) for fold in folds])


@pytest.mark.filterwarnings("ignore:The least populated class")
@pytest.mark.parametrize("k", [2, 5, 7])
def test_folds_partition_and_stratify(k):
  labels = imbalanced_labels()
  folds = stratified_folds(labels, k, seed=0)
  assert len(folds) == k
  everything = np.concatenate(folds)
  assert np.array_equal(np.sort(everything), np.arange(labels.size))  # disjoint and covering
  for fold in folds:
    assert fold.dtype == np.int64 and np.array_equal(fold, np.sort(fold))
  sizes = [fold.size for fold in folds]
  assert max(sizes) - min(sizes) <= 1
  counts = per_fold_class_counts(labels, folds)
  assert (counts.max(axis=0) - counts.min(axis=0) <= 1).all()
  assert counts[:, 3].sum() == 3 and (counts[:, 3] == 0).sum() == max(k - 3, 0)  # the tiny class misses folds

  # scikit-learn's StratifiedKFold puts (within 1) the same number of each class in each fold.
  sk_counts = np.array([np.bincount(labels[test], minlength=4)
                        for _, test in StratifiedKFold(k, shuffle=True, random_state=0).split(labels, labels)])
  assert (np.abs(np.sort(counts, axis=0) - np.sort(sk_counts, axis=0)) <= 1).all()


def test_folds_deterministic_per_seed():
  labels = imbalanced_labels()
  first = stratified_folds(labels, 5, seed=3)
  again = stratified_folds(labels, 5, seed=3)
  other = stratified_folds(labels, 5, seed=4)
  assert all(np.array_equal(x, y) for x, y in zip(first, again))
  assert not all(np.array_equal(x, y) for x, y in zip(first, other))


def test_folds_string_labels_and_fold_split():
  labels = np.array(["pos", "neg", "neg", "pos", "neu", "neg", "pos", "neu", "neu"])
  folds = stratified_folds(labels, 3, seed=0)
  for i in range(3):
    train, evaluation = fold_split(folds, i)
    assert np.array_equal(evaluation, folds[i])
    assert np.array_equal(train, np.sort(train))
    assert np.intersect1d(train, evaluation).size == 0
    assert np.array_equal(np.union1d(train, evaluation), np.arange(labels.size))
    assert sorted(labels[evaluation]) == ["neg", "neu", "pos"]  # 3 of each class over 3 folds


def test_folds_bad_inputs():
  with pytest.raises(ValueError, match="2 <= k <= num_examples"):
    stratified_folds([0, 1, 0], 1, seed=0)
  with pytest.raises(ValueError, match="2 <= k <= num_examples"):
    stratified_folds([0, 1, 0], 4, seed=0)
  with pytest.raises(ValueError, match="one label per example"):
    stratified_folds(np.zeros((3, 2)), 2, seed=0)
  folds = stratified_folds([0, 1, 0, 1], 2, seed=0)
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    fold_split(folds, 2)


# ---------------------------------------------------------------------------
# McNemar.


def correctness(both_right: int, b01: int, b10: int, both_wrong: int) -> tuple[np.ndarray, np.ndarray]:
  a = np.array([True] * both_right + [False] * b01 + [True] * b10 + [False] * both_wrong)
  b = np.array([True] * both_right + [True] * b01 + [False] * b10 + [False] * both_wrong)
  return a, b


def test_mcnemar_exact_small_case_by_hand():
  a, b = correctness(10, b01=1, b10=7, both_wrong=2)
  result = mcnemar(a, b)
  # P(X <= 1) for X ~ Binomial(8, 1/2) = (1 + 8) / 256; two-sided: 18 / 256.
  assert result == {"b01": 1, "b10": 7, "statistic": 1.0, "p_value": pytest.approx(18 / 256), "method": "exact"}
  assert mcnemar(b, a)["p_value"] == pytest.approx(18 / 256)  # symmetric
  # A balanced split is capped at 1.
  assert mcnemar(*correctness(0, 3, 3, 0))["p_value"] == 1.0


def test_mcnemar_large_case_chi_square():
  a, b = correctness(500, b01=40, b10=20, both_wrong=100)
  result = mcnemar(a.astype(int), b.astype(int))  # 0/1 works too
  statistic = (abs(40 - 20) - 1) ** 2 / 60
  assert result["method"] == "chi2" and (result["b01"], result["b10"]) == (40, 20)
  assert result["statistic"] == pytest.approx(statistic)
  assert result["p_value"] == pytest.approx(stats.chi2.sf(statistic, 1))
  assert result["p_value"] == pytest.approx(0.0141, abs=1e-3)
  # 25 discordant pairs is the first chi-square case; 24 is still exact.
  assert mcnemar(*correctness(5, 20, 5, 0))["method"] == "chi2"
  assert mcnemar(*correctness(5, 19, 5, 0))["method"] == "exact"


def test_mcnemar_agreement_everywhere():
  a = np.array([True, False, True, True, False])
  assert mcnemar(a, a.copy()) == {"b01": 0, "b10": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}


def test_mcnemar_bad_inputs():
  with pytest.raises(ValueError, match="same examples"):
    mcnemar([True, False], [True])
  with pytest.raises(ValueError, match="predictions == labels"):
    mcnemar([0, 2], [1, 1])
  with pytest.raises(ValueError, match="non-empty"):
    mcnemar([], [])


# ---------------------------------------------------------------------------
# Paired bootstrap.


def test_bootstrap_known_difference():
  rng = np.random.default_rng(0)
  a = rng.normal(2.0, 1.0, size=500)
  b = a + 0.3 + rng.normal(0.0, 0.5, size=500)
  result = paired_bootstrap_difference(a, b, samples=2000, seed=1)
  json.dumps(result, allow_nan=False)
  assert result["difference"] == pytest.approx(b.mean() - a.mean())
  assert result["lower"] < 0.3 < result["upper"]
  assert result["lower"] > 0
  assert result["p_value"] < 0.01
  assert result["num_examples"] == 500 and result["samples"] == 2000 and result["confidence"] == 0.95
  # The reverse comparison mirrors it.
  reverse = paired_bootstrap_difference(b, a, samples=2000, seed=1)
  assert reverse["difference"] == pytest.approx(-result["difference"])
  assert reverse["upper"] == pytest.approx(-result["lower"]) and reverse["p_value"] == result["p_value"]


def test_bootstrap_is_paired_and_reproducible():
  # Large shared per-example spread, tiny consistent gain: only a paired resampling sees it.
  rng = np.random.default_rng(2)
  a = rng.normal(0.0, 10.0, size=200)
  b = a + 0.05
  result = paired_bootstrap_difference(a, b, samples=500, seed=0)
  assert result["lower"] == pytest.approx(0.05) and result["upper"] == pytest.approx(0.05)
  assert result["p_value"] == 0.0
  assert paired_bootstrap_difference(a, b, samples=500, seed=0) == result
  same = paired_bootstrap_difference(a, a.copy(), samples=100)
  assert same["difference"] == 0.0 and same["p_value"] == 1.0


def test_bootstrap_accepts_correctness():
  a = np.array([True, False, True, True, False, True, False, True] * 10)
  b = np.array([True, True, True, True, False, True, True, True] * 10)
  result = paired_bootstrap_difference(a, b, samples=300)
  assert result["difference"] == pytest.approx(0.25) and result["mean_a"] == pytest.approx(0.625)
  assert result["p_value"] < 0.05


def test_bootstrap_p_values_roughly_uniform_under_the_null():
  rng = np.random.default_rng(123)
  p_values = []
  for seed in range(200):
    a = rng.normal(1.0, 1.0, size=40)
    b = rng.normal(1.0, 1.0, size=40)
    p_values.append(paired_bootstrap_difference(a, b, samples=300, seed=seed)["p_value"])
  p_values = np.array(p_values)
  assert 0.01 <= (p_values < 0.05).mean() <= 0.12
  assert 0.4 <= p_values.mean() <= 0.6
  # Loose Kolmogorov-Smirnov distance to uniform (the critical value at n=200, alpha=0.01 is about 0.115).
  assert stats.kstest(p_values, "uniform").statistic < 0.15


def test_bootstrap_bad_inputs():
  with pytest.raises(ValueError, match="same examples"):
    paired_bootstrap_difference([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="at least 2 examples"):
    paired_bootstrap_difference([1.0], [2.0])
  with pytest.raises(ValueError, match="Non-finite"):
    paired_bootstrap_difference([1.0, np.nan], [1.0, 2.0])
  with pytest.raises(ValueError, match="not a percentage"):
    paired_bootstrap_difference([1.0, 2.0], [1.0, 2.0], confidence=95)
  with pytest.raises(ValueError, match="samples=0"):
    paired_bootstrap_difference([1.0, 2.0], [1.0, 2.0], samples=0)
