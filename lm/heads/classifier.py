"""`config.head = "classifier"`: fine-tune a sequence classifier (`lm.models.classifier`) in the shared loop.

Data: labeled sentences (`lm.data.labeled`) from the .tsv column / .jsonl
field / TFDS feature `data.label_field`; train on `data.train_split`, select
the model on `data.eval_split` (the best checkpoint is the one with the
highest accuracy there), and after training evaluate those best weights once
on `classifier.test_split`: `classification.json` and a confusion-matrix PNG
per split in the workdir.

Train step: cross-entropy with optional label smoothing, class weights
("balanced" = inverse class frequency of the training split) and token
dropout (sentence tokens replaced by <mask>, an augmentation for small data). Eval step:
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
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm.config import ConfigError
from lm.data import labeled as labeled_lib, sentences as sentences_lib, sources
from lm.core import files
from lm.stats import classify
from lm.heads import ROWS, Head
from lm.models.classifier import TransformerClassifier, classification_loss

REPORT_FILE = "classification.json"


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


class ClassifierHead(Head):
  """A sequence classifier on the backbone (module doc)."""

  name = "classifier"
  init_from_heads = ("lm", "classifier")
  counts_lm_flops = False

  def __init__(self, config: ml_collections.ConfigDict, model_config: Any, tokenizer: Any):
    self._train_source: sources.LabeledSource | None = None
    self.classes = self._resolve_classes(config)
    super().__init__(config, model_config, tokenizer)
    self._class_weights: np.ndarray | None = None
    self._weights_resolved = False

  # -- classes -------------------------------------------------------------
  def train_source(self) -> sources.LabeledSource:
    """The labeled training split (opened once)."""
    if self._train_source is None:
      from lm.train.experiment import open_train_split  # pylint: disable=g-import-not-at-top
      self._train_source = open_train_split(self.config)
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
      raise sources.DataError(f"The training split {self.train_source().name} has only the label(s) {classes}; "
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

  def init_from_target(self, abstract_params: Any, source_head: str) -> tuple[Any, Callable[[Any, Any], Any]]:
    if source_head == "classifier":
      return abstract_params, lambda params, restored: restored
    # An LM's parameters are this model's backbone, as they are.
    return abstract_params["lm"], lambda params, restored: dict(params, lm=restored)

  # -- steps ---------------------------------------------------------------
  def make_train_step(self, tx: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
    model = self.model
    deterministic = self.model_config.dropout == 0.0
    smoothing = float(self.config.classifier.label_smoothing)
    token_dropout = float(self.config.classifier.token_dropout)
    weights = None if self.class_weights is None else jnp.asarray(self.class_weights)
    vocab = self.vocab

    def train_step(state, batch):
      rng, token_rng = jax.random.split(jax.random.fold_in(state.key, state.step))
      valid = jnp.ones(batch["label"].shape, jnp.float32)
      inputs = batch["inputs"]
      if token_dropout:  # sentence tokens only: BOS, EOS and padding stay
        drop = jax.random.bernoulli(token_rng, token_dropout, inputs.shape) & (inputs < vocab.base)
        inputs = jnp.where(drop, vocab.mask, inputs)

      def loss_fn(params):
        logits = model.apply({"params": params}, inputs, batch["mask"], deterministic=deterministic,
                             rngs={"dropout": rng})
        loss, _ = classification_loss(logits, batch["label"], valid, label_smoothing=smoothing,
                                      class_weights=weights)
        return loss, jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))

      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {"train/loss": loss, "train/accuracy": accuracy, "train/grad_norm": optax.global_norm(grads),
                 "train/lr": schedule(state.step)}
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step

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
      raise sources.DataError(f"{source.name} has no labels: the classifier reads data.label_field="
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

  def evaluate_split(self, experiment: Any, params: Any, split: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(full report, per-example arrays) of `params` on a split of data.source."""
    from lm.train.experiment import open_eval_split  # pylint: disable=g-import-not-at-top
    from lm.train.loop import evaluate_rows  # pylint: disable=g-import-not-at-top
    examples = self.examples(open_eval_split(self.config, split), train=False)
    rows = evaluate_rows(experiment, params, examples)
    return self.report(rows), self.per_example(rows)

  def final_report(self, experiment: Any, params: Any) -> dict[str, Any]:
    """The best-on-dev weights evaluated once on the eval and test splits: classification.json + PNGs."""
    from lm.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
    step = None
    if checkpoint_lib.has_checkpoint(experiment.workdir):
      step = checkpoint_lib.best_step(experiment.workdir)
    if step is not None:
      params, _ = checkpoint_lib.restore_params(experiment.workdir, experiment.abstract_state.params, step=step)
    splits = {"eval": self.config.data.eval_split}
    if self.config.classifier.test_split:
      splits["test"] = self.config.classifier.test_split
    reports, metrics = {}, {}
    for role, split in splits.items():
      report, _ = self.evaluate_split(experiment, params, split)
      report["split"] = split
      reports[role] = report
      classify.plot_confusion_matrix(report["confusion_matrix"], os.path.join(
          experiment.workdir, f"confusion_{_file_key(split)}.png"), class_names=self.classes)
      for key in ("accuracy", "macro_f1", "loss"):
        metrics[f"final_{role}/{key}"] = report[key]
    metrics["final/step"] = float(step if step is not None else -1)
    if jax.process_index() == 0:
      files.atomic_write(os.path.join(experiment.workdir, REPORT_FILE), json.dumps(
          {"step": step, "classes": self.classes, **reports}, indent=2).encode())
    return metrics

  def sample(self, params: Any, options: ml_collections.ConfigDict, prompt: str | None = None) -> list[str]:
    """Classifies sample.prompt (or each prompt): "label (p=0.93)" per text."""
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
