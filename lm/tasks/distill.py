"""`config.head = "distill"`: knowledge distillation of a trained language model (the teacher) into another one.

The student is the run's own model (config.model: e.g. 2 layers where the
teacher has 4); the teacher is a trained head="lm" or "sft" run's workdir or
a Hugging Face folder (`hf:DIR`), named by `distill.teacher`, with its own
architecture (read from its checkpoint's metadata or DIR's config.json) and
the same tokenizer and vocabulary as the student. Per target token
(Hinton et al. 2015):

  loss = (1 - alpha) * CE(student, target) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

`distill.alpha` is the weight of the soft (teacher) term, so alpha = 0 is
exactly the language model's loss (`lm.tasks.lm`); `distill.temperature` is
T, and the T^2 keeps the soft term's gradient on the scale of the hard one's
whatever T is. Both terms are means over the global batch's target tokens
(the engine's accumulation is exact). Reported: train/hard_loss (the CE),
train/soft_loss (the T^2-scaled KL) and train/loss (the mix).

Parameters: {"student": trained, "teacher": frozen}. The teacher is filled
from distill.teacher at a fresh start (`Task.frozen_weights`; the builder
checks its task, shapes and tokenizer before anything is written) and is
then part of the state, like a DPO reference: sharded like the student by
the same logical axes, its logits computed inside the jitted step (one
forward pass, no gradient, no dropout), never updated (it has no optimizer
state), and checkpointed with the student, so a resumed run continues with
the very teacher it started with even if the teacher's run trains on. The
student starts as a head="lm" run of the same seed would (the same init key).

Eval reports the student's plain language-model figures (eval/loss,
perplexity, bits per token / character: `lm.tasks.lm`'s eval step on the
student), comparable with a student trained alone, plus eval/soft_loss (the
same T^2-scaled KL on the eval split) and eval/teacher_loss (the teacher's
own eval loss, the floor to compare with). Sampling, serving and export use
the student (`lm_params`); a head="lm" run can start from a distill run's
student (config.init_from).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import interop
from lm.core.configs import ConfigPart, require
from lm.core.errors import CheckpointError, ConfigError
from lm.models.config import SHAPE_FIELDS, TransformerConfig
from lm.models.losses import cross_entropy, distillation_kl, document_args
from lm.models.transformer import TransformerLM
from lm.tasks.lm import LMTask, loss_totals, make_eval_step, summarize_loss
from lm.train import checkpoint as checkpoint_lib
from lm.train import optim
from lm.train import step as step_lib

STUDENT, TEACHER = "student", "teacher"
TEACHER_TASKS = ("lm", "sft")  # the runs whose params are a plain language model's
# The teacher computes as this run does (its dtype, attention kernel for these devices, remat); what its weights
# are (every other field) is its own.
RUN_FIELDS = ("dtype", "attention_impl", "norm_impl", "gelu_impl", "remat_policy", "loss_impl", "loss_chunk_len",
              "fused_loss_min_mb")

FIELDS = {
    "distill.teacher": "",  # the teacher: a head=lm or sft run's workdir, or hf:DIR (same tokenizer as the student)
    "distill.temperature": 2.0,  # T > 0: softens both distributions; the soft term is scaled by T^2
    "distill.alpha": 0.5,  # in [0, 1]: the soft term's weight; (1 - alpha) is the hard CE's (0: the LM's loss)
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  del mode
  distill = config.distill
  require(distill.temperature > 0, f"config.distill.temperature={distill.temperature} must be > 0: it divides the "
          "logits (1: the plain distributions; 2 to 4 soften the teacher's, Hinton et al. 2015).")
  require(0 <= distill.alpha <= 1, f"config.distill.alpha={distill.alpha} must be in [0, 1]: it is the weight of "
          "the teacher's soft targets, (1 - alpha) the hard loss's (0: the hard loss alone, 1: the soft alone).")


def make_distill_loss(student: TransformerLM, teacher: TransformerLM, *, temperature: float, alpha: float,
                      teacher_of: Callable[[step_lib.StepContext], Any]) -> step_lib.LossFn:
  """The engine's loss function of the student's params (module doc), with metrics hard_loss and soft_loss.

  teacher_of(ctx): the frozen teacher's params. Both terms are contributions to means over the global
  batch's target tokens (`loss_totals`: "tokens"), weighted by the batch's mask where it has one.
  """
  deterministic = student.config.dropout == 0.0

  def loss_fn(params: Any, batch: Mapping[str, jax.Array], ctx: step_lib.StepContext) -> tuple[jax.Array, dict]:
    documents = document_args(batch)
    logits = student.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                           rngs={"dropout": ctx.rng}, **documents)
    teacher_logits = jax.lax.stop_gradient(teacher.apply({"params": teacher_of(ctx)}, batch["inputs"], **documents))
    mask = batch.get("mask")
    hard_sum, _ = cross_entropy(logits, batch["targets"], mask)
    kl = distillation_kl(logits, teacher_logits, temperature)
    soft_sum = jnp.sum(kl if mask is None else kl * mask.astype(jnp.float32))
    hard, soft = ctx.mean(hard_sum, "tokens"), ctx.mean(soft_sum, "tokens")
    return (1.0 - alpha) * hard + alpha * soft, {"hard_loss": hard, "soft_loss": soft}

  return loss_fn


def teacher_model_config(source: str, student: TransformerConfig) -> TransformerConfig:
  """The teacher's model: its shapes from its checkpoint's metadata (or `hf:DIR`'s config.json), computed as
  the student is (RUN_FIELDS), without dropout. Raises a UserError naming config.distill.teacher."""
  where = f"config.distill.teacher={source!r}"
  run_fields = {key: getattr(student, key) for key in RUN_FIELDS}
  hf_dir = interop.hf_directory(source)
  if hf_dir is not None:
    return interop.model_config(hf_dir, max_len=student.max_len, param_dtype=student.param_dtype,
                                scan_layers=student.scan_layers, dropout=0.0, **run_fields)
  if not checkpoint_lib.has_checkpoint(source):
    missing = "does not exist" if not os.path.exists(source) else "holds no checkpoint"
    raise CheckpointError(f"{where} {missing}: the teacher is a trained head='lm' run's workdir (or hf:DIR). Fix: "
                          f"train it first (--mode train --workdir {source}), or point config.distill.teacher at a "
                          "finished run. Nothing was written.")
  metadata = checkpoint_lib.read_metadata(source)
  written_by = metadata.get("head") or metadata.get("config", {}).get("head") or "lm"  # as the registry reads it
  check_teacher_task(source, written_by)
  names = {field.name for field in dataclasses.fields(TransformerConfig)}
  saved = {key: value for key, value in metadata.get("model", {}).items() if key in names}
  try:
    return TransformerConfig(**{**saved, **run_fields, "dropout": 0.0})
  except (TypeError, ValueError) as error:
    raise CheckpointError(f"{where}: its checkpoint's model cannot be built ({error}). Fix: name a run written by "
                          "this version of lm. Nothing was written.") from None


def check_teacher_task(source: str, written_by: str) -> None:
  if written_by not in TEACHER_TASKS:
    raise CheckpointError(f"config.distill.teacher={source!r} was written by a head={written_by!r} run; the teacher "
                          f"is a language model: name a run of head {' or '.join(TEACHER_TASKS)}, or hf:DIR. "
                          "Nothing was written.")


class DistillTask(LMTask):
  """Knowledge distillation into the run's model (module doc)."""

  name = "distill"
  CONFIG = ConfigPart("lm.tasks.distill", FIELDS, validate)
  data_formats = ("windows", "sentences")
  init_from_tasks = ("lm", "sft", "dpo", "distill")  # the student may start from a language model's weights
  counts_lm_flops = False  # a step also runs the teacher forward: not the LM's FLOP count
  supports_online = sliding_eval = synthetic_data = ab_comparable = supports_privacy = False
  language_model = False  # the params hold two models; the language model is lm_params(params)
  exports_hf = True  # the student is a language model (lm_params)
  lm_part = STUDENT

  @classmethod
  def validate_config(cls, config: ml_collections.ConfigDict, mode: str) -> None:
    del mode
    require(bool(config.distill.teacher), "config.head='distill' trains a student on a teacher's soft targets: set "
            "--config.distill.teacher to a trained head='lm' run's workdir (or hf:DIR) with the same tokenizer.")

  @classmethod
  def lm_part_target(cls, target, merge):
    # Only the student is restored (Orbax's partial restore): the teacher's shapes are not this task's to know.
    return {STUDENT: target}, lambda params, restored: merge(params, restored[STUDENT])

  def __init__(self, config, model_config, tokenizer, *, train_split=None):
    super().__init__(config, model_config, tokenizer, train_split=train_split)
    distill = config.distill
    self.source = str(distill.teacher)
    self.temperature, self.alpha = float(distill.temperature), float(distill.alpha)
    self.teacher_config = teacher_model_config(self.source, model_config)
    self._check_teacher_fits()
    self.teacher = TransformerLM(self.teacher_config)

  def _check_teacher_fits(self) -> None:
    """The soft targets are over the student's ids, position by position: the same vocabulary, enough context."""
    where = f"config.distill.teacher={self.source!r}"
    teacher, student = self.teacher_config, self.model_config
    sizes = [(config.vocab_size, config.valid_vocab_size or config.vocab_size) for config in (teacher, student)]
    if sizes[0] != sizes[1]:
      raise ConfigError(
          f"{where} predicts over {sizes[0][0]} ids ({sizes[0][1]} of them tokens), this run's model over "
          f"{sizes[1][0]} ({sizes[1][1]}): the soft targets must be over the same vocabulary. Fix: the teacher's "
          f"tokenizer and data.format, and --config.model.vocab_size={sizes[0][0]} (or the teacher run's "
          "model.vocab_multiple).")
    if teacher.max_len < self.config.seq_len:
      raise ConfigError(f"config.seq_len={self.config.seq_len} is longer than the {teacher.max_len} positions of "
                        f"{where}. Fix: lower --config.seq_len to at most {teacher.max_len}.")

  # -- parameters ----------------------------------------------------------------------------------
  def init_params(self, key: jax.Array) -> Any:
    micro = self.config.batch_size // self.config.grad_accum_steps
    inputs = self.example_batch(micro)["inputs"]
    # The student's key is a head="lm" run's, so a distilled student and one trained alone start alike.
    return {STUDENT: self.model.init(key, inputs)["params"],
            TEACHER: self.teacher.init(jax.random.fold_in(key, 1), inputs)["params"]}

  def make_optimizer(self):
    tx, schedule = optim.make_optimizer(self.config.optim, self.config.steps)
    return optim.MultiOptimizer({STUDENT: tx}), schedule  # the teacher has none: it never changes

  def init_from_target(self, abstract_params: Any, source_task: str) -> tuple[Any, Callable[[Any, Any], Any]]:
    if source_task == self.name:  # another distill run's student; the teacher is distill.teacher's
      return {STUDENT: abstract_params[STUDENT]}, lambda params, restored: dict(params, **{STUDENT: restored[STUDENT]})
    return abstract_params[STUDENT], lambda params, restored: dict(params, **{STUDENT: restored})

  def frozen_weights(self) -> dict[str, str]:
    return {TEACHER: self.source}

  def check_frozen(self, part: str, directory: str, written_by: str) -> None:
    del part
    check_teacher_task(directory, written_by)

  def frozen_model_config(self, part: str) -> TransformerConfig:
    return self.teacher_config if part == TEACHER else self.model_config

  def frozen_source(self, part: str, directory: str) -> str:
    del part
    return f"config.distill.teacher={directory!r}"

  def frozen_tokenizer_hint(self, part: str) -> str:
    del part
    return (", or build the student's tokenizer as the teacher's was (config.data.tokenizer, data.tokenizer_model "
            "and the same training split)")

  @staticmethod
  def lm_params(params: Any) -> Any:
    return params[STUDENT]

  def metadata(self) -> dict[str, Any]:
    return {"distill": {"teacher": self.source, "teacher_model": dataclasses.asdict(self.teacher_config)}}

  def check_checkpoint(self, directory: str, metadata: Mapping[str, Any], written_by: str) -> None:
    """A distill checkpoint holds its teacher: distill.teacher must still name a model of the same shapes."""
    if written_by != self.name:  # init_from a language model: only its student part is read
      return
    saved = metadata.get("distill", {}).get("teacher_model", {})
    current = dataclasses.asdict(self.teacher_config)
    differences = [f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}" for key in SHAPE_FIELDS
                   if key in saved and saved[key] != current[key]]
    if differences:
      raise CheckpointError(
          f"The checkpoint in {directory} holds a teacher of other shapes ({'; '.join(differences)}) than "
          f"config.distill.teacher={self.source!r} now has. Fix: set config.distill.teacher back to "
          f"{metadata.get('distill', {}).get('teacher')!r}, or use a new --workdir. Nothing was written.")

  # -- the loss --------------------------------------------------------------------------------------
  def updates(self) -> Sequence[step_lib.Update]:
    loss_fn = make_distill_loss(self.model, self.teacher, temperature=self.temperature, alpha=self.alpha,
                                teacher_of=lambda ctx: ctx.params[TEACHER])
    return (step_lib.Update(loss_fn, part=STUDENT),)

  def loss_totals(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return loss_totals(batch)

  # -- evaluation ------------------------------------------------------------------------------------
  def make_eval_step(self) -> Callable:
    """The language model's eval step on the student (its eval/loss is a student-alone run's), plus the soft
    loss to the teacher and the teacher's own loss, summed over the same target tokens."""
    student_eval = make_eval_step(self.model)
    student, teacher, temperature = self.model, self.teacher, self.temperature

    def eval_step(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
      out = student_eval(params[STUDENT], batch)
      documents = document_args(batch)
      logits = student.apply({"params": params[STUDENT]}, batch["inputs"], **documents)
      teacher_logits = teacher.apply({"params": params[TEACHER]}, batch["inputs"], **documents)
      mask = batch.get("mask")
      weights = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
      out["soft_loss_sum"] = jnp.sum(distillation_kl(logits, teacher_logits, temperature) * weights)
      out["teacher_loss_sum"] = cross_entropy(teacher_logits, batch["targets"], weights)[0]
      return out

    return eval_step

  def summarize(self, sums: Mapping[str, float], rows: Mapping[str, np.ndarray], chars_per_token: float
                ) -> dict[str, float]:
    del rows
    tokens = max(sums["tokens"], 1.0)
    return {**summarize_loss(sums, chars_per_token), "eval/soft_loss": sums["soft_loss_sum"] / tokens,
            "eval/teacher_loss": sums["teacher_loss_sum"] / tokens}

  # -- generation ------------------------------------------------------------------------------------
  def sample(self, params: Any, options: ml_collections.ConfigDict, prompt: str | None = None, *,
             prompts: Sequence[Any] | None = None) -> list[str]:
    """The student's continuations (`LMTask.sample`)."""
    return super().sample(self.lm_params(params), options, prompt, prompts=prompts)
