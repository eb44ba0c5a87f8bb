"""Quality and diversity of generated text: BLEU, self-BLEU, and the temperature curve.

Text GANs are usually claimed to beat maximum-likelihood (MLE) language models
on sample quality. Caccia et al. 2020 ("Language GANs Falling Short", ICLR,
arXiv:1811.02549) showed that such claims compare a single GAN operating point
against a single MLE operating point, while a GAN mostly trades diversity for
quality, which an MLE model can do too by lowering its softmax temperature.
The fair comparison is therefore a GAN point against the whole MLE temperature
curve in the quality-diversity plane:

  * quality   = BLEU-n of the samples against held-out references (higher is better);
  * diversity = 1 - self-BLEU-n, where self-BLEU-n scores each sample against
                the OTHER samples as references (Zhu et al. 2018, "Texygen",
                arXiv:1802.01886); lower self-BLEU is more diverse.

A GAN point that some temperature of the MLE model beats on both axes at once
is `dominated`; Caccia et al. found this to be the case for every GAN they
tested.

Both metrics are computed with sacrebleu (Post 2018, "A Call for Clarity in
Reporting BLEU Scores") so that tokenization is fixed and reproducible: the
"13a" tokenizer, case-sensitive, BLEU-n = brevity penalty x geometric mean of
the clipped n-gram precisions of orders 1..n (uniform weights), with no
smoothing (an order without any match gives 0, not a smoothing constant) and
no "effective order" (samples too short to hold any n-gram of order n score
BLEU-n = 0, rather than dropping that order: one-word samples, a collapsed
GAN's, must not score the unigram precision as their BLEU-4).
As in Caccia et al. / Texygen, the whole held-out set is the reference set of
every sample (a sample n-gram is clipped at its largest count in any single
reference, and the brevity penalty uses the closest reference length).

Aggregation: both BLEU and self-BLEU are corpus-level, i.e. the clipped match
and n-gram counts are summed over all samples before taking precisions, which
is exactly what `sacrebleu.metrics.BLEU.corpus_score` returns when every
reference is given to every sample. Texygen instead averages smoothed sentence
BLEU; for BLEU-4/5 of short sentences that average is dominated by the
smoothing constant (most sentences have no matching 5-gram), whereas corpus
statistics need no smoothing and put both axes on the same footing. Numbers
are therefore comparable between runs of this module, not with the paper's.

The statistics are computed from n-gram counts directly instead of calling
sacrebleu once per sample: with N samples and R references, sacrebleu's
multi-reference API would need N x R reference strings. Self-BLEU is
leave-one-out in O(total n-grams): for each n-gram we keep its largest and
second-largest count over samples and which sample holds the largest, so the
largest count among the OTHER samples is known for every sample.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.helpers import extract_all_word_ngrams
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from lm.core import files

FILENAME = "generation.json"
TOKENIZE = "13a"  # sacrebleu's default tokenizer (mteval-v13a)
SMOOTH_METHOD = "none"  # corpus statistics need no smoothing; a zero is a real zero
MIN_ORDER = 2  # BLEU-1 says nothing about fluency; Caccia et al. / Texygen report 2..5
DEFAULT_MAX_ORDER = 5
DEFAULT_PLOT_ORDER = 4
DEFAULT_MAX_SAMPLES = 500  # self-BLEU subsample: the cost grows with the number of samples
MIN_SELF_BLEU_SAMPLES = 2  # leave-one-out needs at least one other sample
SACREBLEU_SCALE = 100.0  # sacrebleu reports 0-100; we report 0-1
FIGURE_INCHES = (7.0, 5.5)
FIGURE_DPI = 100


# ---------------------------------------------------------------------------
# Input checks and n-gram statistics.


def _check_order(max_order: int) -> None:
  if not isinstance(max_order, (int, np.integer)) or isinstance(max_order, bool) or max_order < MIN_ORDER:
    raise ValueError(
        f"max_order={max_order!r} must be an integer >= {MIN_ORDER}; BLEU-n is reported for "
        f"n = {MIN_ORDER}..max_order, so pass e.g. max_order={DEFAULT_MAX_ORDER}.")


def _check_texts(texts: Sequence[str], what: str, minimum: int = 1) -> list[str]:
  if isinstance(texts, (str, bytes)):
    raise ValueError(
        f"{what} is a single string; pass a list of sentences (one string per sample), "
        "e.g. [text] for one sentence.")
  texts = list(texts)
  if len(texts) < minimum:
    raise ValueError(
        f"{what} has {len(texts)} sentence(s) but needs at least {minimum}; "
        "generate (or load) more text before scoring.")
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(
          f"{what}[{i}] is a {type(text).__name__}, not a str; decode token ids to text "
          "(e.g. with the tokenizer) before scoring.")
  return texts


def _ngrams(texts: Sequence[str], max_order: int) -> list[tuple[collections.Counter, int]]:
  """Each text's (n-gram counts of orders 1..max_order, token count), tokenized as sacrebleu does."""
  tokenizer = Tokenizer13a()
  # BLEU._preprocess_segment: optional lowercasing (off), then tokenize(sentence.rstrip()).
  return [extract_all_word_ngrams(tokenizer(text.rstrip()), 1, max_order) for text in texts]


def _closest_length(hyp_len: int, lengths: collections.Counter) -> int:
  """sacrebleu's closest reference length: smallest |difference|, ties go to the shorter reference."""
  return min((length for length, count in lengths.items() if count > 0),
             key=lambda length: (abs(hyp_len - length), length))


class _Statistics:
  """Summed corpus statistics over orders 1..max_order."""

  def __init__(self, max_order: int):
    self.correct = [0] * max_order
    self.total = [0] * max_order
    self.sys_len = 0
    self.ref_len = 0

  def add(self, counts: collections.Counter, hyp_len: int, ref_len: int, ref_count) -> None:
    self.sys_len += hyp_len
    self.ref_len += ref_len
    for ngram, count in counts.items():
      n = len(ngram) - 1
      self.total[n] += count
      reference = ref_count(ngram)
      if reference:
        self.correct[n] += min(count, reference)

  def scores(self, max_order: int) -> dict[int, float]:
    """BLEU-n in [0, 1] for n = MIN_ORDER..max_order from the same counts (orders 1..n of them)."""
    result = {}
    for n in range(MIN_ORDER, max_order + 1):
      score = BLEU.compute_bleu(list(self.correct[:n]), list(self.total[:n]), self.sys_len, self.ref_len,
                                smooth_method=SMOOTH_METHOD, effective_order=False, max_ngram_order=n)
      result[n] = float(score.score) / SACREBLEU_SCALE
    return result


# ---------------------------------------------------------------------------
# The metrics.


def bleu(samples: Sequence[str], references: Sequence[str], *,
         max_order: int = DEFAULT_MAX_ORDER) -> dict[int, float]:
  """Corpus BLEU-n of the samples, each scored against ALL references.

  Equals `sacrebleu.metrics.BLEU(max_ngram_order=n, effective_order=False,
  smooth_method="none").corpus_score(samples, [[r] * len(samples) for r in references])`
  divided by 100, without building that N x R reference list.

  Args:
    samples: generated sentences, one string each.
    references: held-out sentences; every one is a reference for every sample.
    max_order: the largest n; BLEU-n is returned for n = 2..max_order.

  Returns:
    {n: BLEU-n in [0, 1]}; higher is better quality.
  """
  _check_order(max_order)
  samples = _check_texts(samples, "samples")
  references = _check_texts(references, "references")
  maximum: dict[tuple[str, ...], int] = {}
  lengths: collections.Counter = collections.Counter()
  for counts, length in _ngrams(references, max_order):
    lengths[length] += 1
    for ngram, count in counts.items():
      if count > maximum.get(ngram, 0):
        maximum[ngram] = count
  statistics = _Statistics(max_order)
  for counts, hyp_len in _ngrams(samples, max_order):
    statistics.add(counts, hyp_len, _closest_length(hyp_len, lengths), lambda ngram: maximum.get(ngram, 0))
  return statistics.scores(max_order)


def _subsample(count: int, max_samples: int | None, seed: int) -> np.ndarray:
  if max_samples is not None and (isinstance(max_samples, bool) or max_samples < MIN_SELF_BLEU_SAMPLES):
    raise ValueError(
        f"max_samples={max_samples!r} leaves no other sample to compare against; pass an integer "
        f">= {MIN_SELF_BLEU_SAMPLES} (e.g. {DEFAULT_MAX_SAMPLES}) or None to use every sample.")
  if max_samples is None or count <= max_samples:
    return np.arange(count)
  return np.sort(np.random.default_rng(seed).choice(count, size=max_samples, replace=False))


def self_bleu(samples: Sequence[str], *, max_order: int = DEFAULT_MAX_ORDER,
              max_samples: int | None = DEFAULT_MAX_SAMPLES, seed: int = 0) -> dict[int, float]:
  """Corpus self-BLEU-n: each sample against all OTHER samples as references (leave-one-out).

  Equals sacrebleu's corpus_score of the samples with the N - 1 other samples
  as each one's references, divided by 100.

  Args:
    samples: generated sentences, one string each; at least 2.
    max_order: the largest n; self-BLEU-n is returned for n = 2..max_order.
    max_samples: score a random subset of this many samples (against each
      other), since the cost grows with the number of samples; None uses all.
    seed: seeds numpy's default_rng for the subset, so the value is reproducible.

  Returns:
    {n: self-BLEU-n in [0, 1]}; lower is more diverse.
  """
  _check_order(max_order)
  samples = _check_texts(samples, "samples", minimum=MIN_SELF_BLEU_SAMPLES)
  chosen = [samples[i] for i in _subsample(len(samples), max_samples, seed)]
  extracted = _ngrams(chosen, max_order)
  # Per n-gram: (largest count over samples, the sample holding it, second-largest count).
  # The largest count among the samples other than i is then the second one when i holds the first.
  best: dict[tuple[str, ...], list[int]] = {}
  lengths: collections.Counter = collections.Counter()
  for i, (counts, length) in enumerate(extracted):
    lengths[length] += 1
    for ngram, count in counts.items():
      entry = best.get(ngram)
      if entry is None:
        best[ngram] = [count, i, 0]
      elif count > entry[0]:
        entry[2], entry[0], entry[1] = entry[0], count, i
      elif count > entry[2]:
        entry[2] = count
  statistics = _Statistics(max_order)
  for i, (counts, hyp_len) in enumerate(extracted):
    lengths[hyp_len] -= 1  # leave this sample's own length out of the closest-length search
    ref_len = _closest_length(hyp_len, lengths)
    lengths[hyp_len] += 1

    def others(ngram: tuple[str, ...], i: int = i) -> int:
      first, holder, second = best[ngram]
      return second if holder == i else first

    statistics.add(counts, hyp_len, ref_len, others)
  return statistics.scores(max_order)


# ---------------------------------------------------------------------------
# Operating points and their comparison.


def _scores(name: str, label: str, values: dict[int, float]) -> dict[int, float]:
  result = {}
  for order, value in dict(values).items():
    value = float(value)
    if not 0.0 <= value <= 1.0:
      raise ValueError(
          f"{name}[{order}] of {label!r} is {value}, outside [0, 1]; pass the output of bleu / self_bleu "
          "(divide sacrebleu's 0-100 scores by 100).")
    result[int(order)] = value
  return result


@dataclasses.dataclass(frozen=True)
class QualityDiversity:
  """One operating point: a model (or one temperature of it) and its samples' scores."""
  label: str  # e.g. "MLE T=0.8" or "GAN (RelGAN)"
  bleu: dict[int, float]  # {n: BLEU-n against held-out references}; higher = better quality
  self_bleu: dict[int, float]  # {n: self-BLEU-n}; lower = more diverse
  nll: float | None = None  # mean NLL of the samples under a judge LM, when measured
  temperature: float | None = None  # sampling temperature; None for a model without one (a GAN)

  def __post_init__(self):
    object.__setattr__(self, "bleu", _scores("bleu", self.label, self.bleu))
    object.__setattr__(self, "self_bleu", _scores("self_bleu", self.label, self.self_bleu))
    for name in ("nll", "temperature"):
      value = getattr(self, name)
      if value is not None:
        value = float(value)
        if not math.isfinite(value) or (name == "temperature" and value <= 0):
          raise ValueError(
              f"{name}={value} of {self.label!r} is not a usable number; pass a finite value "
              f"{'> 0 ' if name == 'temperature' else ''}or None when it was not measured.")
        object.__setattr__(self, name, value)

  def to_json(self) -> dict[str, Any]:
    return {"label": self.label, "temperature": self.temperature, "nll": self.nll,
            "bleu": {str(n): v for n, v in sorted(self.bleu.items())},
            "self_bleu": {str(n): v for n, v in sorted(self.self_bleu.items())}}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> QualityDiversity:
    return cls(label=data["label"], bleu={int(n): v for n, v in data["bleu"].items()},
               self_bleu={int(n): v for n, v in data["self_bleu"].items()},
               nll=data.get("nll"), temperature=data.get("temperature"))


def evaluate_samples(label: str, samples: Sequence[str], references: Sequence[str], *,
                     max_order: int = DEFAULT_MAX_ORDER, temperature: float | None = None,
                     nll: float | None = None, max_samples: int | None = DEFAULT_MAX_SAMPLES,
                     seed: int = 0) -> QualityDiversity:
  """BLEU against `references` and self-BLEU of one model's (or one temperature's) samples."""
  return QualityDiversity(
      label=label, bleu=bleu(samples, references, max_order=max_order),
      self_bleu=self_bleu(samples, max_order=max_order, max_samples=max_samples, seed=seed),
      nll=nll, temperature=temperature)


def _at(point: QualityDiversity, order: int) -> tuple[float, float]:
  """(BLEU-order, self-BLEU-order) of the point."""
  if order not in point.bleu or order not in point.self_bleu:
    raise ValueError(
        f"{point.label!r} has no order-{order} scores (BLEU orders {sorted(point.bleu)}, self-BLEU "
        f"orders {sorted(point.self_bleu)}); compare at an order every point has, or re-evaluate "
        f"with max_order >= {order}.")
  return point.bleu[order], point.self_bleu[order]


def tied_with(point: QualityDiversity, curve: Sequence[QualityDiversity], *,
              order: int = DEFAULT_PLOT_ORDER) -> list[str]:
  """Labels of the curve points with exactly the point's (BLEU, self-BLEU) at `order`.

  A tie is not domination, but it is no win either: with few samples BLEU-4/5
  and self-BLEU-4/5 are often exactly 0 for every point, where the test says nothing.
  """
  scores = _at(point, order)
  return [other.label for other in curve if _at(other, order) == scores]


def dominated(point: QualityDiversity, curve: Sequence[QualityDiversity], *,
              order: int = DEFAULT_PLOT_ORDER) -> bool:
  """Whether some curve point is at least as good on both axes and strictly better on one.

  "Good" is higher BLEU-order (quality) and lower self-BLEU-order (diversity).
  An identical point does not dominate.
  """
  quality, repetition = _at(point, order)
  for other in curve:
    other_quality, other_repetition = _at(other, order)
    if (other_quality >= quality and other_repetition <= repetition
        and (other_quality > quality or other_repetition < repetition)):
      return True
  return False


# ---------------------------------------------------------------------------
# Plot and report.


def _check_points(curve: Sequence[QualityDiversity], points: Sequence[QualityDiversity],
                  order: int) -> tuple[list[QualityDiversity], list[QualityDiversity]]:
  curve, points = list(curve), list(points)
  if not curve and not points:
    raise ValueError("Nothing to compare: both curve and points are empty; pass the MLE temperature "
                     "sweep as curve and the GAN evaluations as points.")
  for point in curve + points:
    if not isinstance(point, QualityDiversity):
      raise ValueError(f"Got a {type(point).__name__}; pass QualityDiversity values (from evaluate_samples).")
    _at(point, order)
  return curve, points


def _ordered_curve(curve: list[QualityDiversity]) -> list[QualityDiversity]:
  """A temperature sweep drawn in temperature order; otherwise in the given order."""
  if curve and all(point.temperature is not None for point in curve):
    return sorted(curve, key=lambda point: point.temperature)
  return curve


def plot_quality_diversity(curve: Sequence[QualityDiversity], points: Sequence[QualityDiversity],
                           path: str | os.PathLike, *, order: int = DEFAULT_PLOT_ORDER) -> str:
  """Draws the quality-diversity plane as a PNG; returns its path.

  x = 1 - self-BLEU-order (diversity, right is more diverse), y = BLEU-order
  (quality, up is better): the curve (an MLE temperature sweep) as a labelled
  line, each point (a GAN) as a labelled marker, hollow when the curve dominates it.
  """
  curve, points = _check_points(curve, points, order)
  figure = files.new_figure(FIGURE_INCHES, FIGURE_DPI)
  axes = figure.add_subplot()
  curve = _ordered_curve(curve)
  if curve:
    xs = [1.0 - point.self_bleu[order] for point in curve]
    ys = [point.bleu[order] for point in curve]
    axes.plot(xs, ys, "-o", color="tab:blue", markersize=4, label="MLE temperature sweep")
    for point, x, y in zip(curve, xs, ys):
      text = f"T={point.temperature:g}" if point.temperature is not None else point.label
      axes.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small",
                    color="tab:blue")
  markers = "s^vDPX*<>ph"
  for k, point in enumerate(points):
    x, y = 1.0 - point.self_bleu[order], point.bleu[order]
    beaten = dominated(point, curve, order=order)
    tie = "" if beaten or not tied_with(point, curve, order=order) else " (tied with the curve)"
    color = f"C{(k + 1) % 10}"
    axes.plot([x], [y], linestyle="none", marker=markers[k % len(markers)], markersize=8, color=color,
              markerfacecolor="none" if beaten else color,
              label=f"{point.label}{' (dominated)' if beaten else tie}")
    axes.annotate(point.label, (x, y), textcoords="offset points", xytext=(5, -10), fontsize="small",
                  color=color)
  axes.set_xlabel(f"diversity: 1 - self-BLEU-{order} (right = more diverse)")
  axes.set_ylabel(f"quality: BLEU-{order} vs held-out text (up = better)")
  axes.set_title(f"Quality vs diversity of samples (BLEU-{order}, sacrebleu {TOKENIZE})", fontsize="medium")
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize="small", loc="best")
  figure.tight_layout()
  return files.save_png(figure, path)


def write_report(curve: Sequence[QualityDiversity], points: Sequence[QualityDiversity],
                 workdir: str | os.PathLike, *, order: int = DEFAULT_PLOT_ORDER) -> str:
  """Writes workdir/generation.json atomically; returns its path.

  Keys: "order" (the n the domination test used), "metric" (how the scores were
  computed), "curve" (the MLE sweep, in temperature order), "points" (each with
  "dominated": bool and "tied_with": the curve points with the same scores), and
  "dominated" (the labels of the dominated points).
  """
  curve, points = _check_points(curve, points, order)
  entries = [dict(point.to_json(), dominated=dominated(point, curve, order=order),
                  tied_with=tied_with(point, curve, order=order)) for point in points]
  report = {
      "order": order,
      "metric": {"tokenize": TOKENIZE, "smooth_method": SMOOTH_METHOD, "aggregation": "corpus",
                 "quality": "BLEU-n against all held-out references (higher is better)",
                 "diversity": "self-BLEU-n, leave-one-out (lower is more diverse)"},
      "curve": [point.to_json() for point in _ordered_curve(curve)],
      "points": entries,
      "dominated": [entry["label"] for entry in entries if entry["dominated"]],
  }
  return files.atomic_write(os.path.join(os.fspath(workdir), FILENAME),
                            json.dumps(report, indent=2, allow_nan=False).encode("utf-8"))
