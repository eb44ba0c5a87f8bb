"""`config.head = "classifier"`: fine-tune a sequence classifier (`lm.models.classifier`) with the shared engine.

Data: labeled sentences (`lm.data.labeled`) from the .tsv column / .jsonl
field / TFDS feature `data.label_field`; train on `data.train_split`, select
the model on `data.eval_split` (the best checkpoint is the one with the
highest accuracy there), and after training evaluate those best weights once
on `classifier.test_split`: `classification.json` and a confusion-matrix PNG
per split in the workdir.

Loss: cross-entropy with optional label smoothing, class weights
("balanced" = inverse class frequency of the training split; the mean is
weighted by them over the whole global batch) and token dropout (sentence
tokens replaced by <mask>, drawn per row; an augmentation for small data). Eval step:
per-row predictions and losses, gathered, turned into accuracy, per-class and
macro precision / recall / F1 (`lm.stats.classify`). `eval/loss` is the plain
mean cross-entropy (no smoothing, no weights), an honest NLL of the labels.
Start from an LM: `config.init_from=<a head="lm" run on data.format=sentences
with the same tokenizer>` fills the backbone; the classification layer
starts from scratch.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.core import files
from lm.core.configs import ConfigPart, require
from lm.core.errors import CheckpointError, ConfigError, DataError
from lm.data import labeled as labeled_lib
from lm.data import sentences as sentences_lib
from lm.data import sources
from lm.models.classifier import ATTENTIONS, POOLINGS, TransformerClassifier, classification_loss
from lm.stats import ab as ab_stats
from lm.stats import classify
from lm.tasks.base import ReportContext, Task
from lm.train import step as step_lib
from lm.train.evaluate import ROWS

REPORT_FILE = "classification.json"
TOKEN_STREAM = 0  # the per-row rng stream of token dropout (StepContext.row_keys)

FIELDS = {
    # The class labels as written in the data, in class order; empty: the training split's distinct labels,
    # sorted (numerically when all are integers).
    "classifier.labels": (),
    "classifier.pooling": "mean",  # mean | max (over the sentence's tokens) | last (the EOS position)
    "classifier.attention": "causal",  # causal (as the LM) | bidirectional (every token reads the sentence)
    "classifier.label_smoothing": 0.0,
    "classifier.token_dropout": 0.0,  # rate of sentence tokens replaced by <mask> in training (augmentation)
    "classifier.class_weights": "",  # "": none | "balanced" (inverse class frequency) | "w0,w1,..."
    "classifier.test_split": "test",  # evaluated once after training with the best-on-dev weights; "": none
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  del mode
  classifier = config.classifier
  require(classifier.pooling in POOLINGS,
          f"config.classifier.pooling={classifier.pooling!r} is not one of {POOLINGS}.")
  require(0 <= classifier.label_smoothing < 1,
          f"config.classifier.label_smoothing={classifier.label_smoothing} must be in [0, 1).")
  require(classifier.attention in ATTENTIONS,
          f"config.classifier.attention={classifier.attention!r} is not one of {ATTENTIONS}.")
  require(0 <= classifier.token_dropout < 1,
          f"config.classifier.token_dropout={classifier.token_dropout} must be in [0, 1).")
  require(isinstance(classifier.class_weights, str), "config.classifier.class_weights must be a string: '', "
          "'balanced' or comma-separated weights such as '1.0,2.5'.")


def parse_class_weights(spec: str, counts: np.ndarray, classes: list[str]) -> np.ndarray | None:
  """config.classifier.class_weights -> [classes] float32 weights (None: unweighted).

  "balanced": n / (classes * count_c), scikit-learn's rule; "w0,w1,...": one weight per class in class order.
  """
  spec = (spec or "").strip()
  if not spec:
    return None
  if spec == "balanced":
    if (counts == 0).any():
      missing = [classes[i] for i in np.flatnonzero(counts == 0)]
      raise ConfigError(f"config.classifier.class_weights='balanced' needs every class in the training split; "
                        f"{missing} have no examples. Give explicit weights or fix config.classifier.labels.")
    return (counts.sum() / (len(counts) * counts)).astype(np.float32)
  try:
    weights = np.asarray([float(part) for part in spec.split(",")], np.float32)
  except ValueError:
    weights = None
  if weights is None or len(weights) != len(classes) or not (weights > 0).all():
    raise ConfigError(f"config.classifier.class_weights={spec!r} must be 'balanced' or {len(classes)} positive "
                      f"numbers separated by commas, one per class {classes}.")
  return weights


class ClassifierTask(Task):
  """A sequence classifier on the backbone (module doc)."""

  name = "classifier"
  CONFIG = ConfigPart("lm.tasks.classifier", FIELDS, validate)
  init_from_tasks = ("lm", "classifier")
  reads_labels = True
  ab_comparable = True
  supports_privacy = True  # an example is a sentence

  def __init__(self, config: ml_collections.ConfigDict, model_config: Any, tokenizer: Any, *,
               train_split: Callable[[], sources.LabeledSource] | None = None):
    """train_split(): opens the labeled training split (the classes and class weights come from it)."""
    self._open_train_split = train_split
    self._train_source: sources.LabeledSource | None = None
    self.classes = self._resolve_classes(config)
    super().__init__(config, model_config, tokenizer, train_split=train_split)
    self._class_weights: np.ndarray | None = None
    self._weights_resolved = False

  # -- classes -------------------------------------------------------------
  def train_source(self) -> sources.LabeledSource:
    """The labeled training split (opened once)."""
    if self._train_source is None:
      if self._open_train_split is None:
        raise ConfigError("This classifier was built without its training split and config.classifier.labels is "
                          "empty: set the labels, or build it with lm.experiment.build_experiment.")
      self._train_source = self._open_train_split()
    return self._train_source

  def _resolve_classes(self, config: ml_collections.ConfigDict) -> list[str]:
    self.config = config
    if config.classifier.labels:
      classes = [str(label).strip() for label in config.classifier.labels]
      if len(set(classes)) != len(classes) or len(classes) < 2 or not all(classes):
        raise ConfigError(f"config.classifier.labels={tuple(config.classifier.labels)!r} must name at least 2 "
                          "distinct, non-empty classes.")
      return classes
    classes = labeled_lib.derive_classes(self.train_source().labels())
    if len(classes) < 2:
      raise DataError(f"The training split {self.train_source().name} has only the label(s) {classes}; "
                      "a classifier needs at least 2 classes. Check config.data.label_field.")
    return classes

  def metadata(self) -> dict[str, Any]:
    return {"classes": list(self.classes)}

  @property
  def class_weights(self) -> np.ndarray | None:
    if not self._weights_resolved:
      spec = self.config.classifier.class_weights
      counts = np.zeros(len(self.classes), np.int64)
      if (spec or "").strip() == "balanced":
        index = {label: i for i, label in enumerate(self.classes)}
        for label in self.train_source().labels():
          if label in index:
            counts[index[label]] += 1
      self._class_weights = parse_class_weights(spec, counts, self.classes)
      self._weights_resolved = True
    return self._class_weights

  def check_checkpoint(self, directory: str, metadata: Mapping[str, Any], written_by: str) -> None:
    del written_by
    saved_classes = metadata.get("classes")
    if saved_classes is not None and list(saved_classes) != list(self.classes):
      raise CheckpointError(
          f"The checkpoint in {directory} classifies into {saved_classes}, but this config's classes are "
          f"{self.classes}. Set config.classifier.labels={tuple(saved_classes)!r} (same classes, same order), or use "
          "a new --workdir. Nothing was written.")

  # -- model and state -----------------------------------------------------
  def build_model(self) -> nn.Module:
    return TransformerClassifier(self.model_config, num_classes=len(self.classes),
                                 pooling=self.config.classifier.pooling,
                                 attention=self.config.classifier.attention)

  @property
  def batch_ranks(self) -> dict[str, int]:
    return dict(labeled_lib.BATCH_RANKS)

  def init_params(self, key: jax.Array) -> Any:
    batch = self.example_batch(self.config.batch_size)
    return self.model.init(key, batch["inputs"], batch["mask"])["params"]

  def init_from_target(self, abstract_params: Any, source_task: str) -> tuple[Any, Callable[[Any, Any], Any]]:
    if source_task == self.name:
      return abstract_params, lambda params, restored: restored
    # An LM's parameters are this model's backbone, as they are.
    return abstract_params["lm"], lambda params, restored: dict(params, lm=restored)

  # -- the loss ----------------------------------------------------------------------------------------
  def updates(self) -> Sequence[step_lib.Update]:
    model, vocab = self.model, self.vocab
    # Resolved while the run is built (here, not when the step is traced): bad weights stop it before it runs.
    class_weights = self.class_weights
    deterministic = self.model_config.dropout == 0.0
    smoothing = float(self.config.classifier.label_smoothing)
    token_dropout = float(self.config.classifier.token_dropout)

    def loss_fn(params, batch, ctx):
      inputs = batch["inputs"]
      if token_dropout:  # sentence tokens only: BOS, EOS and padding stay
        drop = jax.vmap(lambda key: jax.random.bernoulli(key, token_dropout, inputs.shape[1:]))(
            ctx.row_keys(TOKEN_STREAM))
        inputs = jnp.where(drop & (inputs < vocab.base), vocab.mask, inputs)
      # The dropout key of the step before tasks were given one (kept: the SST-2 figures reproduce).
      dropout_rng = jax.random.split(ctx.rng)[0]
      logits = model.apply({"params": params}, inputs, batch["mask"], deterministic=deterministic,
                           rngs={"dropout": dropout_rng})
      _, row_loss = classification_loss(logits, batch["label"], jnp.ones(batch["label"].shape, jnp.float32),
                                        label_smoothing=smoothing)
      weights = self._row_weights(batch["label"], class_weights)
      loss = jnp.sum(row_loss * weights) / jnp.maximum(ctx.totals["weight"], 1e-9)
      correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
      return loss, {"accuracy": ctx.mean(correct)}

    return (step_lib.Update(loss_fn),)

  @staticmethod
  def _row_weights(labels: jax.Array, class_weights: np.ndarray | None) -> jax.Array:
    """Each training row's weight in the mean loss: its class weight (1 without class weights)."""
    if class_weights is None:
      return jnp.ones(labels.shape, jnp.float32)
    return jnp.asarray(class_weights)[labels]

  def loss_totals(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {"weight": jnp.sum(self._row_weights(batch["label"], self.class_weights))}

  def make_eval_step(self) -> Callable:
    model = self.model

    def eval_step(params, batch):
      logits = model.apply({"params": params}, batch["inputs"], batch["mask"], deterministic=True)
      valid = jnp.any(batch["mask"] > 0, axis=-1).astype(jnp.float32)
      _, row_loss = classification_loss(logits, batch["label"], valid)
      return {"loss_sum": jnp.sum(row_loss * valid), "examples": jnp.sum(valid),
              ROWS + "prediction": jnp.argmax(logits, -1).astype(jnp.int32), ROWS + "label": batch["label"],
              ROWS + "loss": row_loss, ROWS + "valid": valid, ROWS + "index": batch["index"]}

    return eval_step

  # -- data ----------------------------------------------------------------
  def examples(self, source: sources.TextSource, *, train: bool, stride: int | None = None) -> Any:
    del stride
    if not hasattr(source, "labels"):
      raise DataError(f"{source.name} has no labels: the classifier reads data.label_field="
                              f"{self.config.data.label_field!r}.")
    examples = labeled_lib.LabeledSentences(source, self.tokenizer, self.config.seq_len, self.classes)
    return examples if train else sentences_lib.PaddedToBatches(examples, self.config.batch_size)

  # -- evaluation ----------------------------------------------------------
  def selection(self, metrics: Mapping[str, float]) -> float:
    return 1.0 - float(metrics["eval/accuracy"])  # model selection by accuracy on the eval split

  def per_example(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gathered eval rows -> {prediction, label, loss, correct} of the real (non-padding) examples, in order."""
    keep = rows[ROWS + "valid"] > 0
    order = np.argsort(rows[ROWS + "index"][keep], kind="stable")
    out = {key: rows[ROWS + key][keep][order] for key in ("prediction", "label", "loss")}
    out["correct"] = (out["prediction"] == out["label"]).astype(np.float64)
    return out

  def report(self, rows: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Full classification metrics (lm.stats.classify) of gathered eval rows, with the mean loss."""
    examples = self.per_example(rows)
    report = classify.classification_metrics(examples["label"], examples["prediction"], len(self.classes),
                                             class_names=self.classes)
    report["loss"] = float(examples["loss"].mean())
    return report

  def summarize(self, sums: Mapping[str, float], rows: Mapping[str, np.ndarray], chars_per_token: float
                ) -> dict[str, float]:
    del chars_per_token
    report = self.report(rows)
    metrics = {"eval/loss": report["loss"], "eval/perplexity": math.exp(min(report["loss"], 50.0)),
               "eval/accuracy": report["accuracy"], "eval/examples": float(report["num_examples"])}
    for average in ("macro", "weighted"):
      for measure in ("precision", "recall", "f1"):
        metrics[f"eval/{average}_{measure}"] = report[f"{average}_{measure}"]
    for row in report["per_class"]:
      for measure in ("precision", "recall", "f1"):
        metrics[f"eval/{measure}/{row['name']}"] = row[measure]
    return metrics

  def final_report(self, context: ReportContext) -> dict[str, Any]:
    """The best-on-dev weights evaluated once on the eval and test splits: classification.json + PNGs."""
    params, step = context.best()
    splits = {"eval": self.config.data.eval_split}
    if self.config.classifier.test_split:
      splits["test"] = self.config.classifier.test_split
    reports, metrics = {}, {}
    for role, split in splits.items():
      examples = self.examples(context.open_split(split), train=False)
      report = self.report(context.evaluate_rows(params, examples))
      report["split"] = split
      reports[role] = report
      classify.plot_confusion_matrix(report["confusion_matrix"], os.path.join(
          context.workdir, f"confusion_{_file_key(split)}.png"), class_names=self.classes)
      for key in ("accuracy", "macro_f1", "loss"):
        metrics[f"final_{role}/{key}"] = report[key]
    metrics["final/step"] = float(step if step is not None else -1)
    if jax.process_index() == 0:
      files.atomic_write(os.path.join(context.workdir, REPORT_FILE), json.dumps(
          {"step": step, "classes": self.classes, **reports}, indent=2).encode())
    return metrics

  # -- crossval and A/B ------------------------------------------------------------------------------
  @classmethod
  def fold_labels(cls, source: sources.TextSource) -> list[str]:
    return source.labels()

  def check_comparable(self, other: Task, where: tuple[str, str]) -> None:
    if self.classes != other.classes:
      raise ConfigError(f"The classifiers have different classes ({self.classes} in {where[0]}, {other.classes} in "
                        f"{where[1]}); they cannot be compared example by example.")

  def compare(self, rows_a, rows_b, other, *, confidence, samples, seed):
    """Accuracy and macro-F1, B - A with intervals and p-values, and McNemar's test on the same examples."""
    a, b = self.per_example(rows_a), other.per_example(rows_b)
    comparison = ab_stats.compare_classifiers(a["label"], a["prediction"], b["prediction"], len(self.classes),
                                              confidence=confidence, samples=samples, seed=seed)
    headline = {f"ab/{metric}/{key}": comparison[metric][key] for metric in ("accuracy", "macro_f1")
                for key in ("a", "b", "difference", "lower", "upper", "p_value")}
    headline["ab/mcnemar/p_value"] = comparison["mcnemar"]["p_value"]
    return comparison, headline

  # -- generation ----------------------------------------------------------------------------------
  def sample(self, params: Any, options: ml_collections.ConfigDict, prompt: str | None = None, *,
             prompts: Sequence[Any] | None = None) -> list[str]:
    """Classifies sample.prompt: "label (p=0.93)"."""
    del prompts
    texts = [options.prompt if prompt is None else prompt]
    return [f"{label} (p={probability:.3f})" for label, probability in self.classify_texts(params, texts)]

  def classify_texts(self, params: Any, texts: list[str]) -> list[tuple[str, float]]:
    """(predicted class, its probability) for each text; call under the mesh context."""
    encoded = [labeled_lib.encode(self.vocab, self.config.seq_len, self.tokenizer.encode(text.strip()))
               for text in texts]
    inputs, mask = (np.stack(parts) for parts in zip(*encoded))
    probabilities = np.asarray(_probabilities(self.model, params, jnp.asarray(inputs), jnp.asarray(mask)))
    return [(self.classes[int(p.argmax())], float(p.max())) for p in probabilities]


def _file_key(split: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in split).strip("_")


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model: TransformerClassifier, params: Any, inputs: jax.Array, mask: jax.Array) -> jax.Array:
  # Jitted so the model's logical sharding constraints trace under the mesh; one compilation per shape.
  return jax.nn.softmax(model.apply({"params": params}, inputs, mask), axis=-1)
