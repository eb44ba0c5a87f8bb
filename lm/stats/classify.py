"""Evaluation of a sequence classifier: metrics, confusion matrix, stratified folds, paired tests.

Everything here is plain numpy on integer class ids (the model lives
elsewhere): pass `labels` (the true classes) and `predictions` (e.g. the argmax
of the logits), one per example.

  * classification_metrics: accuracy, per-class precision / recall / F1 /
    support, macro and support-weighted averages and the confusion matrix, as a
    JSON-serializable dict. The numbers equal scikit-learn's
    `precision_recall_fscore_support(labels, predictions, labels=range(num_classes),
    zero_division=0)`: a class that is never predicted has precision 0, a class
    that never occurs has recall 0, and such zeros count in the macro average.
  * confusion_matrix / plot_confusion_matrix: counts [true, predicted] and a PNG of them.
  * stratified_folds / fold_split: k-fold cross-validation folds in which every
    class is spread over the folds as evenly as possible.
  * mcnemar: whether two classifiers evaluated on the same examples differ in
    accuracy, from the examples on which exactly one of them is right.
  * paired_bootstrap_difference: mean difference of any per-example value
    (correctness, loss) of two models on the same examples, with a percentile
    confidence interval and a bootstrap p-value.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from lm.core import files
from lm.stats.bootstrap import check_pair, paired_bootstrap_difference  # noqa: F401  (part of this API)

EXACT_BELOW = 25  # mcnemar: exact binomial test below this many discordant pairs, chi-square from it on
MAX_ANNOTATED_CLASSES = 30  # beyond this the confusion-matrix cells are too small to write counts in
FIGURE_DPI = 100


# ---------------------------------------------------------------------------
# Metrics.


def _check_num_classes(num_classes: int) -> int:
  if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(
        f"num_classes={num_classes!r} must be a positive integer: the number of classes the "
        "classifier chooses between (the width of its logits).")
  return int(num_classes)


def _check_class_ids(labels: Any, predictions: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
  num_classes = _check_num_classes(num_classes)
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.ndim != 1:
      raise ValueError(
          f"{name} has shape {values.shape}; pass one class id per example [num_examples] "
          "(for logits, take .argmax(-1) first).")
  if labels.shape != predictions.shape:
    raise ValueError(
        f"labels has {labels.shape[0]} examples but predictions has {predictions.shape[0]}; pass the "
        "predictions for the same examples, in the same order.")
  if labels.shape[0] == 0:
    raise ValueError("No examples: labels and predictions are empty; evaluate on a non-empty split.")
  for name, values in (("labels", labels), ("predictions", predictions)):
    if not np.issubdtype(values.dtype, np.integer):
      raise ValueError(
          f"{name} has dtype {values.dtype}, not an integer dtype; pass class ids "
          "(e.g. logits.argmax(-1), or values.astype(np.int64) after checking they are whole numbers).")
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
      raise ValueError(
          f"{name} holds class ids in [{low}, {high}] but num_classes={num_classes} allows only "
          f"[0, {num_classes - 1}]; pass the right num_classes or map the classes to 0..num_classes-1.")
  return labels.astype(np.int64), predictions.astype(np.int64), num_classes


def _check_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
  if class_names is None:
    return [str(c) for c in range(num_classes)]
  if isinstance(class_names, (str, bytes)):
    raise ValueError(f"class_names is a single string {class_names!r}; pass one name per class, e.g. ['neg', 'pos'].")
  names = [str(name) for name in class_names]
  if len(names) != num_classes:
    raise ValueError(
        f"class_names has {len(names)} names but there are {num_classes} classes; pass one name per "
        "class, in class-id order.")
  return names


def _confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  counts = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix(labels: Any, predictions: Any, num_classes: int) -> np.ndarray:
  """Counts [num_classes (true), num_classes (predicted)] int64: entry [t, p] = examples of class t predicted p.

  Equals `sklearn.metrics.confusion_matrix(labels, predictions, labels=range(num_classes))`.
  """
  labels, predictions, num_classes = _check_class_ids(labels, predictions, num_classes)
  return _confusion(labels, predictions, num_classes)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
  numerator = numerator.astype(np.float64)
  denominator = denominator.astype(np.float64)
  result = np.zeros_like(numerator)
  np.divide(numerator, denominator, out=result, where=denominator != 0)
  return result


def classification_metrics(labels: Any, predictions: Any, num_classes: int,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Accuracy, per-class and averaged precision / recall / F1, and the confusion matrix.

  With tp, fp, fn the true positives, false positives and false negatives of a class:
  precision = tp / (tp + fp), recall = tp / (tp + fn), F1 = 2 tp / (2 tp + fp + fn),
  each 0 when its denominator is 0 (a class never predicted has precision 0, a
  class absent from the labels has recall 0). These match scikit-learn's
  `precision_recall_fscore_support(..., labels=range(num_classes), zero_division=0)`.
  Macro averages are the unweighted means over ALL num_classes classes (a class
  absent from both labels and predictions counts as 0); weighted averages weight
  each class by its support (its number of true examples).

  Args:
    labels: [num_examples] integer true class ids in [0, num_classes).
    predictions: [num_examples] integer predicted class ids, for the same examples.
    num_classes: the number of classes.
    class_names: optional display names, one per class in class-id order; default "0", "1", ...

  Returns:
    A JSON-serializable dict of plain Python numbers:
      "num_examples", "num_classes", "class_names",
      "accuracy",
      "per_class": [{"class": id, "name", "precision", "recall", "f1", "support"}] in class-id order,
      "macro_precision", "macro_recall", "macro_f1",
      "weighted_precision", "weighted_recall", "weighted_f1",
      "confusion_matrix": nested list [true][predicted] of counts.
  """
  labels, predictions, num_classes = _check_class_ids(labels, predictions, num_classes)
  names = _check_class_names(class_names, num_classes)
  matrix = _confusion(labels, predictions, num_classes)
  tp = np.diag(matrix)
  support = matrix.sum(axis=1)  # true examples of each class
  predicted = matrix.sum(axis=0)  # examples predicted as each class
  precision = _divide(tp, predicted)
  recall = _divide(tp, support)
  f1 = _divide(2 * tp, support + predicted)  # 2tp + fp + fn = support + predicted
  weights = support / support.sum()
  per_class = [
      {"class": c, "name": names[c], "precision": float(precision[c]), "recall": float(recall[c]),
       "f1": float(f1[c]), "support": int(support[c])}
      for c in range(num_classes)]
  return {
      "num_examples": int(labels.shape[0]),
      "num_classes": num_classes,
      "class_names": names,
      "accuracy": float(tp.sum() / labels.shape[0]),
      "per_class": per_class,
      "macro_precision": float(precision.mean()),
      "macro_recall": float(recall.mean()),
      "macro_f1": float(f1.mean()),
      "weighted_precision": float((precision * weights).sum()),
      "weighted_recall": float((recall * weights).sum()),
      "weighted_f1": float((f1 * weights).sum()),
      "confusion_matrix": matrix.tolist(),
  }


# ---------------------------------------------------------------------------
# Confusion-matrix plot.


def plot_confusion_matrix(matrix: Any, path: str | os.PathLike, class_names: Sequence[str] | None = None,
                          normalize: bool = False) -> str:
  """Draws a confusion matrix as a PNG, written atomically; returns its path.

  Rows are the true classes, columns the predicted ones. Each cell shows its
  count; with normalize, the cells are coloured by their fraction of the row
  (the recall of the row's class on the diagonal) and show that fraction under
  the count (a row without examples shows fractions of 0). Counts are omitted
  beyond MAX_ANNOTATED_CLASSES classes, where the cells are too small.

  Args:
    matrix: [num_classes, num_classes] counts [true, predicted], e.g. confusion_matrix(...)
      or classification_metrics(...)["confusion_matrix"].
    path: where to write the PNG; its directory is created if needed.
    class_names: optional tick labels, one per class.
    normalize: colour by row-normalized fractions and print them next to the counts.
  """
  counts = np.asarray(matrix)
  if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
    raise ValueError(
        f"matrix has shape {counts.shape}; pass a square [num_classes, num_classes] confusion matrix "
        "(rows true, columns predicted), e.g. from confusion_matrix(labels, predictions, num_classes).")
  if not np.issubdtype(counts.dtype, np.number) or not np.isfinite(counts).all() or (counts < 0).any():
    raise ValueError("matrix must hold finite, non-negative counts; pass the confusion matrix, not logits.")
  num_classes = counts.shape[0]
  names = _check_class_names(class_names, num_classes)
  fractions = _divide(counts, np.broadcast_to(counts.sum(axis=1, keepdims=True), counts.shape))
  inches = float(np.clip(2.5 + 0.55 * num_classes, 4.5, 20.0))
  figure = files.new_figure((inches + 1.0, inches), FIGURE_DPI)
  axes = figure.add_subplot()
  shown = fractions if normalize else counts.astype(np.float64)
  top = 1.0 if normalize else max(float(shown.max()), 1.0)
  image = axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=top, interpolation="nearest")
  figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04,
                  label="fraction of the true class" if normalize else "examples")
  if num_classes <= MAX_ANNOTATED_CLASSES:
    integral = bool(np.all(counts == np.round(counts)))
    for t in range(num_classes):
      for p in range(num_classes):
        count = f"{int(counts[t, p])}" if integral else f"{counts[t, p]:g}"
        text = f"{count}\n{fractions[t, p]:.2f}" if normalize else count
        color = "white" if shown[t, p] > 0.5 * top else "black"
        axes.text(p, t, text, ha="center", va="center", color=color, fontsize="small")
  axes.set_xticks(range(num_classes))
  axes.set_yticks(range(num_classes))
  rotate = max(len(name) for name in names) > 3
  axes.set_xticklabels(names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
  axes.set_yticklabels(names)
  axes.set_xlabel("predicted class")
  axes.set_ylabel("true class")
  total = counts.sum()
  total_text = f"{int(total)}" if float(total).is_integer() else f"{total:g}"
  accuracy = float(np.trace(counts) / total) if total else 0.0
  axes.set_title(f"Confusion matrix ({total_text} examples, accuracy {accuracy:.3f})"
                 + (", row-normalized" if normalize else ""), fontsize="medium")
  figure.tight_layout()
  return files.save_png(figure, path)


# ---------------------------------------------------------------------------
# Stratified cross-validation folds.


def stratified_folds(labels: Any, k: int, seed: int) -> list[np.ndarray]:
  """Splits example indices into k disjoint folds, spreading every class evenly over them.

  Classes are taken in sorted order; each class's indices are shuffled with a
  numpy default_rng(seed) permutation and dealt round-robin over the folds,
  each class starting at the fold after the one where the previous class
  stopped. Equivalently, the concatenation of the shuffled classes is dealt
  round-robin from fold 0, so
    * every class's count differs by at most 1 between folds, and
    * fold sizes differ by at most 1 overall;
  scikit-learn's StratifiedKFold allocates the same way but takes the classes in
  order of first appearance, so its per-fold class counts agree within 1.
  A class with fewer than k examples is still dealt, but is therefore MISSING
  from some folds (which will have no evaluation examples of it).

  Args:
    labels: [num_examples] class labels (any sortable values: ids or names).
    k: the number of folds, 2 <= k <= num_examples.
    seed: the same seed gives the same folds.

  Returns:
    k int64 arrays of example indices, each sorted; together they hold every index exactly once.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels has shape {labels.shape}; pass one label per example [num_examples].")
  num_examples = labels.shape[0]
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 2 <= k <= num_examples:
    raise ValueError(
        f"k={k!r} folds for {num_examples} examples: k must be an integer with 2 <= k <= num_examples "
        "(each fold needs at least one example); the usual value is 5 or 10.")
  k = int(k)
  _, classes = np.unique(labels, return_inverse=True)
  classes = classes.reshape(-1)
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(np.flatnonzero(classes == c)) for c in range(int(classes.max()) + 1)])
  fold_of = np.empty(num_examples, np.int64)
  fold_of[order] = np.arange(num_examples) % k
  return [np.flatnonzero(fold_of == i).astype(np.int64) for i in range(k)]


def fold_split(folds: Sequence[np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray]:
  """(train_indices, eval_indices) for fold i: evaluate on folds[i], train on all the others (sorted)."""
  folds = list(folds)
  if len(folds) < 2:
    raise ValueError(f"Got {len(folds)} fold(s); pass the output of stratified_folds(labels, k, seed) with k >= 2.")
  if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < len(folds):
    raise ValueError(f"Fold index i={i!r} must be an integer in [0, {len(folds) - 1}] for {len(folds)} folds.")
  train = np.sort(np.concatenate([np.asarray(fold, np.int64) for j, fold in enumerate(folds) if j != i]))
  return train, np.asarray(folds[i], np.int64)


# ---------------------------------------------------------------------------
# Paired comparisons of two classifiers.


def _as_correct(values: np.ndarray, name: str) -> np.ndarray:
  if values.dtype == np.bool_:
    return values
  if not np.issubdtype(values.dtype, np.number) or not np.isin(values, (0, 1)).all():
    raise ValueError(
        f"{name} must be booleans (or 0/1): whether the classifier got each example right, "
        "e.g. predictions == labels.")
  return values.astype(bool)


def mcnemar(a_correct: Any, b_correct: Any) -> dict[str, Any]:
  """McNemar's test: do classifiers A and B, run on the same examples, differ in accuracy?

  Only the discordant examples matter: b01 = A wrong and B right, b10 = A right
  and B wrong. Under "no difference" each discordant example is equally likely
  to go either way, so b01 ~ Binomial(b01 + b10, 1/2).
    * b01 + b10 < EXACT_BELOW (25): the exact two-sided binomial test,
      p = min(1, 2 * binom.cdf(min(b01, b10), b01 + b10, 0.5)); statistic = min(b01, b10).
    * otherwise: the chi-square test with continuity correction (Edwards),
      statistic = (|b01 - b10| - 1)^2 / (b01 + b10), p = chi2.sf(statistic, df=1)
      (as statsmodels' mcnemar(exact=False, correction=True)).
    * b01 + b10 = 0 (the classifiers agree on every example): p = 1, method "exact".

  Args:
    a_correct, b_correct: [num_examples] booleans (or 0/1), whether A / B got each example right.

  Returns:
    {"b01": int, "b10": int, "statistic": float, "p_value": float, "method": "exact" or "chi2"}.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  a, b = check_pair(a_correct, b_correct, "correctness arrays")
  a, b = _as_correct(a, "a_correct"), _as_correct(b, "b_correct")
  b01 = int(np.count_nonzero(~a & b))
  b10 = int(np.count_nonzero(a & ~b))
  discordant = b01 + b10
  if discordant == 0:
    return {"b01": 0, "b10": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}
  if discordant < EXACT_BELOW:
    smaller = min(b01, b10)
    p_value = min(1.0, 2.0 * float(stats.binom.cdf(smaller, discordant, 0.5)))
    return {"b01": b01, "b10": b10, "statistic": float(smaller), "p_value": p_value, "method": "exact"}
  statistic = (abs(b01 - b10) - 1.0) ** 2 / discordant
  return {"b01": b01, "b10": b10, "statistic": float(statistic),
          "p_value": float(stats.chi2.sf(statistic, df=1)), "method": "chi2"}
