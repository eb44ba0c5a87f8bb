"""The `Task` protocol: what is trained on the Transformer backbone, and everything that differs between tasks.

A task owns its Flax module and initializer, its optimizer, its loss (handed
to the engine as `lm.train.step.Update`s: the engine accumulates, clips,
updates, shards and donates), its eval step and how eval sums become metrics,
the figure that picks the best checkpoint, what its checkpoints record and
whether another checkpoint fits it, a report after training, and how it
generates. Everything around it is shared: the mesh, the jitted steps, the
Grain pipeline, Orbax checkpoints and the loop (`lm.train`), so every task is
sharded, checkpointed and resumed exactly like the language model.

Modes and validation ask a task what it can do (`data_formats`,
`supports_online`, `sample_kinds`, ...), never what it is called: the one
place that maps `config.head` to a task is the registry (`lm.experiment.registry`).

Evaluation: `eval_step(params, batch)` returns float32 sums (added over
batches) and per-row arrays under keys starting with `ROWS` (gathered);
`summarize(sums, rows, chars_per_token)` turns them into "eval/..."
metrics, always with "eval/loss".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, ContextManager, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm.core.configs import ConfigPart
from lm.core.errors import ConfigError
from lm.data import sentences as sentences_lib
from lm.data import sources
from lm.data.tokenizers import Tokenizer
from lm.models.config import TransformerConfig
from lm.train import optim
from lm.train import privacy as privacy_lib
from lm.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class RunView:
  """A trained run as another task's report sees it: its task, its params, and the mesh context to call them in."""

  task: Task
  params: Any
  context: Callable[[], ContextManager]
  workdir: str = ""


@dataclasses.dataclass(frozen=True)
class ReportContext:
  """What a task's `final_report` is handed (functions, not the run: big_vision's evaluators).

  run: this run with its final params. best(): the params of the best
  checkpoint and its step (the final params and None without one).
  open_split(name): a split of data.source, opened as training opens it.
  evaluate_rows(params, examples): the gathered "rows/" outputs of this run's
  eval step over eval examples. load_run(workdir): another finished run, on
  this run's mesh.
  """

  workdir: str
  run: RunView
  best: Callable[[], tuple[Any, int | None]]
  open_split: Callable[[str], sources.TextSource]
  evaluate_rows: Callable[[Any, Any], dict[str, np.ndarray]]
  load_run: Callable[[str], RunView]


class Task:
  """The base of every task (module doc): the shared parts, and the defaults a subclass may keep."""

  name: ClassVar[str] = ""
  CONFIG: ClassVar[ConfigPart | None] = None  # the task's own config group (config.vae, ...), if any

  # -- what the task can do (read by validation and the modes) -------------------------------------
  data_formats: ClassVar[tuple[str, ...]] = ("sentences",)  # the data.format values it trains on
  init_from_tasks: tuple[str, ...] = ()  # tasks whose checkpoints config.init_from may take weights from
  requires_init_from: str = ""  # non-empty: it cannot start from scratch, and this says what init_from needs
  counts_lm_flops: ClassVar[bool] = False  # lm.train.perf's FLOP count (a decoder-only LM's) is its own: MFU
  reads_labels: ClassVar[bool] = False  # its records carry data.label_field
  supports_online: ClassVar[bool] = False  # --mode online can keep training it on token windows
  # DP-SGD (config.privacy) can train it: one loss per row, one update per step (lm.train.privacy).
  supports_privacy: ClassVar[bool] = False
  sample_kinds: ClassVar[tuple[str, ...]] = ("continue",)  # the sample.kind values --mode sample takes
  continues_prompts: ClassVar[bool] = False  # sample.prompts_file, beam search and stop strings apply
  sliding_eval: ClassVar[bool] = False  # eval.stride > 0 can slide a window over its token stream
  exports_hf: ClassVar[bool] = False  # an hf: model is this task's model as it is; --mode export writes it
  synthetic_data: ClassVar[bool] = False  # it can train on data.source="synthetic" (random ids)
  language_model: ClassVar[bool] = False  # its params are a TransformerLM's: logits, KV-cache decoding, its benchmark
  ab_comparable: ClassVar[bool] = False  # --mode ab can compare two runs of it example by example

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
    """Checks of a config that asks this task for something beyond what its capabilities say (a VAE's
    KL schedule against the run's length); the registry checks the capabilities."""
    del config, mode

  def __init__(self, config: ml_collections.ConfigDict, model_config: TransformerConfig, tokenizer: Tokenizer, *,
               train_split: Callable[[], sources.TextSource] | None = None):
    """train_split(): opens the training split, for tasks that learn something from it before training
    (a classifier's classes); `lm.experiment.build_experiment` passes it."""
    self._open_train_split = train_split
    self.config = config
    self.model_config = model_config
    self.tokenizer = tokenizer
    self.sentences = config.data.format == "sentences"
    self.vocab = sentences_lib.SentenceVocab.for_tokenizer(tokenizer) if self.sentences else None
    self.model = self.build_model()

  # -- model, parameters, optimizer ----------------------------------------------------------------
  def build_model(self) -> nn.Module:
    raise NotImplementedError

  @property
  def batch_ranks(self) -> dict[str, int]:
    """The batch's keys and ranks ([batch, length] = 2, [batch] = 1)."""
    return {"inputs": 2, "targets": 2, "mask": 2, "index": 1}

  @property
  def train_only_ranks(self) -> dict[str, int]:
    """Keys of a training batch that evaluation batches lack: `dp_real` (1 sampled, 0 padding) under
    DP-SGD's Poisson sampling (lm.data.pipeline.poisson_train_dataset)."""
    privacy = self.config.privacy
    return {"dp_real": 1} if privacy.enabled and privacy.sampling == "poisson" else {}

  def example_batch(self, batch_size: int) -> dict[str, jax.Array]:
    """Zeros shaped like a (micro-)batch of `batch_size` rows, for initialization and tracing."""
    length = self.config.seq_len
    return {key: jnp.zeros((batch_size, length)[:rank], jnp.int32) for key, rank in self.batch_ranks.items()}

  def init_params(self, key: jax.Array) -> Any:
    """Parameters (boxed with logical axis names) from an rng key."""
    raise NotImplementedError

  def make_optimizer(self) -> tuple[Any, optax.Schedule]:
    """(optax transformation or lm.train.optim.MultiOptimizer, the learning-rate schedule it reports)."""
    return optim.make_optimizer(self.config.optim, self.config.steps)

  def init_from_target(self, abstract_params: Any, source_task: str) -> tuple[Any, Callable[[Any, Any], Any]]:
    """What of this task's params a `source_task` checkpoint fills, and how to put it back.

    Returns (abstract tree to restore, merge(params, restored) -> params).
    """
    del source_task
    return abstract_params, lambda params, restored: restored

  # A task whose params hold a language model as one part of them beside others (a DPO run's policy beside its
  # reference) names that part: a task that starts from a language model can start from its runs too.
  lm_part: ClassVar[str] = ""

  @classmethod
  def lm_part_target(cls, target: Any, merge: Callable[[Any, Any], Any]) -> tuple[Any, Callable[[Any, Any], Any]]:
    """(what of a checkpoint of this task to restore, merge) for another task whose `init_from_target` wants a
    language model's params (`target`, `merge`): this task's params, of which `lm_part` is used."""
    raise NotImplementedError

  def frozen_weights(self) -> dict[str, str]:
    """{part of the params: a run's workdir or hf:DIR} whose weights fill that part at the start, after init_from
    (a DPO reference named by dpo.reference, a distillation's teacher). The builder checks each run's shapes
    and tokenizer."""
    return {}

  def check_frozen(self, part: str, directory: str, written_by: str) -> None:
    """Raises CheckpointError if a `written_by` run cannot fill `part` (see `frozen_weights`)."""
    del part, directory, written_by

  def frozen_model_config(self, part: str) -> TransformerConfig:
    """The model whose shapes `part` has (the builder checks the run named to fill it against it): this run's
    own model, unless the part is another model (a distillation's teacher)."""
    del part
    return self.model_config

  def frozen_source(self, part: str, directory: str) -> str:
    """How an error names the run that fills `part` (the config field that names it, where there is one)."""
    return f"{directory!r} (the weights of the params' {part!r} part)"

  def frozen_tokenizer_hint(self, part: str) -> str:
    """What an error about `part`'s tokenizer adds to its fix (", or ..."), beyond naming another run."""
    del part
    return ""

  @staticmethod
  def lm_params(params: Any) -> Any:
    """The language model's params in this task's (a DPO run's policy); what sampling, serving and export use."""
    return params

  # -- the loss, for the engine (lm.train.step) ------------------------------------------------------
  def updates(self) -> Sequence[step_lib.Update]:
    """The step's updates: loss functions and the parts of the params they train."""
    raise NotImplementedError

  def loss_totals(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Normalizers of the loss over the whole global batch (a mean over its target tokens divides by these)."""
    del batch
    return {}

  prepare: step_lib.Prepare | None = None  # values computed once per step before the updates (a GAN's fakes)

  def step_metrics(self, step: jax.Array) -> dict[str, jax.Array]:
    """Metrics of the step itself, not of the batch (a KL weight, a temperature)."""
    del step
    return {}

  def make_train_step(self, tx: Any, schedule: optax.Schedule) -> Callable:
    """The engine's train step for this task (DP-SGD's under config.privacy: `self.dp_sgd`)."""
    self.dp_sgd = privacy_lib.DpSgd.from_config(self.config)
    return step_lib.make_train_step(self.updates(), tx, learning_rate=schedule,
                                    grad_accum_steps=int(self.config.grad_accum_steps),
                                    loss_totals=self.loss_totals, prepare=self.prepare,
                                    step_metrics=self.step_metrics, privacy=self.dp_sgd)

  def check_privacy(self, online: bool = False) -> None:
    """Raises ConfigError unless DP-SGD's accounting holds for how this task's examples are drawn (`online`: by
    the online loop, which cuts its own examples: lm.online.privacy)."""
    if not self.supports_privacy:
      raise ConfigError(f"config.privacy.enabled=True, but head={self.config.head!r} cannot be trained with DP-SGD "
                        "(it needs one loss per example and one update per step): use head=lm or head=classifier, "
                        "or set --config.privacy.enabled=False.")

  # -- evaluation ----------------------------------------------------------------------------------
  def make_eval_step(self) -> Callable:
    raise NotImplementedError

  def examples(self, source: sources.TextSource, *, train: bool, stride: int | None = None) -> Any:
    """A split as random-access examples: sentences (lm.data.sentences), padded to whole batches for eval."""
    del stride
    examples = sentences_lib.Sentences(source, self.tokenizer, self.config.seq_len)
    return examples if train else sentences_lib.PaddedToBatches(examples, self.config.batch_size)

  def summarize(self, sums: Mapping[str, float], rows: Mapping[str, np.ndarray], chars_per_token: float
                ) -> dict[str, float]:
    """Eval sums (and rows) over a split -> "eval/..." metrics."""
    raise NotImplementedError

  def sampled_metrics(self, params: Any) -> dict[str, float]:
    """"eval/..." figures that need generation, computed at every eval after the eval step's (a DPO run's
    sampled KL to its reference); call under the mesh context."""
    del params
    return {}

  def selection(self, metrics: Mapping[str, float]) -> float:
    """The figure (lower is better) that picks the best checkpoint(s) kept by config.keep_best."""
    return float(metrics["eval/loss"])

  def metadata(self) -> dict[str, Any]:
    """What beyond the config a checkpoint must record for this task (its classes, ...)."""
    return {}

  def check_checkpoint(self, directory: str, metadata: Mapping[str, Any], written_by: str) -> None:
    """Raises CheckpointError if a `written_by` checkpoint's recorded settings do not fit this task's."""
    del directory, metadata, written_by

  def final_report(self, context: ReportContext) -> dict[str, Any]:
    """Figures computed once after training and by --mode eval, beyond the eval metrics (files in the workdir)."""
    del context
    return {}

  @classmethod
  def fold_labels(cls, source: sources.TextSource) -> list[str] | None:
    """--mode crossval: the labels its folds are stratified by (None: plain random folds)."""
    del source
    return None

  def compare(self, rows_a: Mapping[str, np.ndarray], rows_b: Mapping[str, np.ndarray], other: Task, *,
              confidence: float, samples: int, seed: int) -> tuple[dict[str, Any], dict[str, float]]:
    """--mode ab: (the comparison of two runs' eval rows on the same examples, its headline metrics)."""
    raise ConfigError(f"--mode ab compares two runs example by example; config.head={self.name!r} has no "
                      "per-example figure to pair. Compare language models or classifiers.")

  def check_comparable(self, other: Task, where: tuple[str, str]) -> None:
    """--mode ab: raises ConfigError if `other` (B) cannot be paired example by example with this run (A)."""
    del other, where

  # -- generation ----------------------------------------------------------------------------------
  def sample(self, params: Any, options: ml_collections.ConfigDict, prompt: str | None = None, *,
             prompts: Sequence[Any] | None = None) -> list[str]:
    """--mode sample's texts (config.sample); call under the mesh context."""
    raise NotImplementedError

  def decode_text(self, ids: Any) -> str:
    """Generated ids -> text (sentences stop at EOS; specials decode to nothing)."""
    if self.vocab is not None:
      return self.vocab.decode(self.tokenizer, ids)
    return self.tokenizer.decode(np.asarray(ids))
