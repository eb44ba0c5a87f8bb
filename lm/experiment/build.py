"""Builds everything a run needs from a config, without writing anything.

`build_experiment(config, workdir)` validates the config, resolves the
tokenizer, builds the task (its model, optimizer and loss) and the mesh,
jits the engine's steps with their shardings, and checks that an existing
checkpoint fits, all before the workdir is touched: a bad config, data path
or checkpoint stops the run with the workdir exactly as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from lm import __version__ as lm_version
from lm import distributed
from lm import interop
from lm.core import malloc
from lm.core.configs import to_json_dict
from lm.core.errors import CheckpointError, ConfigError, UserError
from lm.data import pipeline, sources
from lm.data import tokenizers as tokenizers_lib
from lm.experiment.config import validate
from lm.experiment.registry import make_task, saved_task, task_class
from lm.experiment.model import TOKENIZER_DIR, model_config_for, resolve_tokenizer, settle_kernels, tokenizer_identity
from lm.experiment.splits import cleaned_documents, open_train_split
from lm.models.config import SHAPE_FIELDS, TransformerConfig
from lm.tasks.base import Task
from lm.train import checkpoint as checkpoint_lib
from lm.train import sharding
from lm.train import state as state_lib
from lm.train import step as step_lib
from lm.train.evaluate import evaluate



@dataclasses.dataclass
class Experiment:
  """A built run: config, tokenizer, model, optimizer, mesh and compiled steps."""

  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: tokenizers_lib.Tokenizer
  model_config: TransformerConfig
  task: Task
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: Mesh
  rules: sharding.Rules
  steps: step_lib.CompiledSteps
  abstract_state: Any  # ShapeDtypeStructs with target shardings

  @property
  def model(self) -> nn.Module:
    """The task's Flax module (a TransformerLM for head="lm")."""
    return self.task.model

  @property
  def checkpoint_dir(self) -> str:
    return checkpoint_lib.checkpoint_dir(self.workdir)

  @property
  def process_rows(self) -> pipeline.ProcessRows:
    """The rows of every global batch this process reads (all of them with one process)."""
    return self.steps.process_rows

  def metadata(self) -> dict[str, Any]:
    return {
        "config": to_json_dict(self.config),
        "head": self.task.name,
        "model": dataclasses.asdict(self.model_config),
        "tokenizer": self.tokenizer.to_json(),
        **self.task.metadata(),
        "mesh": {"shape": dict(self.mesh.shape), "rules": [list(rule) for rule in self.rules],
                 "process_count": jax.process_count()},
        "lm_version": lm_version,
    }

  def logits(self, params: Any, tokens: Any) -> jax.Array:
    """Forward pass [batch, length] -> [batch, length, vocab] on the run's mesh (jitted, notebook helper)."""
    if not self.task.language_model:
      raise ValueError(f"Experiment.logits is the language model's forward pass; this run's head is "
                       f"{self.task.name!r}: call experiment.model.apply (or the task's methods) instead.")
    with self.steps.context():
      return _jitted_apply(self.model, params, jnp.asarray(tokens, jnp.int32))

  def evaluate(self, params: Any, examples: Any, num_batches: int | None = None) -> dict[str, float]:
    """The task's eval metrics over eval examples (for the LM: mean token loss, perplexity, bits per token/char).

    A mixture's examples (data.mixture) are evaluated source by source ("eval/<name>/loss", ...); "eval/loss"
    is then the mixture-weighted mean of their losses.
    """
    if isinstance(examples, pipeline.MixedExamples):
      metrics: dict[str, float] = {}
      for name, part, _ in examples.parts:
        metrics.update({f"eval/{name}/{key[len('eval/'):]}": value
                        for key, value in self.evaluate(params, part, num_batches).items()})
      total = sum(weight for _, _, weight in examples.parts)
      loss = sum(weight * metrics[f"eval/{name}/loss"] for name, _, weight in examples.parts) / total
      metrics.update({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))})
      return metrics
    sums, rows = evaluate(self.steps, params, examples, num_batches=num_batches)
    metrics = self.task.summarize(sums, rows, examples.chars_per_token(self.tokenizer))
    with self.steps.context():
      metrics.update(self.task.sampled_metrics(params))
    return metrics

  def evaluate_rows(self, params: Any, examples: Any, num_batches: int | None = None) -> dict[str, Any]:
    """The eval step's per-row outputs ("rows/..." keys, gathered in example order), all batches by default."""
    return evaluate(self.steps, params, examples, num_batches=num_batches)[1]

  def init_state(self) -> state_lib.TrainState:
    state, _ = state_lib.create_state(self.task.init_params, self.tx, self.mesh, self.rules, self.config.seed,
                                      self.steps.state_shardings)
    return state


@functools.partial(jax.jit, static_argnums=0)
def _jitted_apply(model: nn.Module, params: Any, tokens: jax.Array) -> jax.Array:
  # The logical sharding constraints inside the model need a traced context:
  # under a mesh they are sharding annotations, which eager calls cannot take.
  return model.apply({"params": params}, tokens)


def check_checkpoint_fits(directory: str, model_config: TransformerConfig, task: Task | None = None,
                          how: str = "resume") -> None:
  """Raises CheckpointError if the checkpoint in `directory` has other parameter shapes or another task.

  how: "resume" / "warm_start" need the same task; "init_from" a task in `task.init_from_tasks`. The task
  then checks what else its checkpoints record (a VAE's latent shape, a classifier's classes).
  """
  metadata = checkpoint_lib.read_metadata(directory)
  if task is not None:
    written_by = saved_task(metadata)
    allowed = task.init_from_tasks if how == "init_from" else (task.name,)
    if written_by not in allowed:
      fix = (f"set --config.head={written_by} to continue it, or use a new --workdir" if how == "resume" else
             f"point config.{how} at a run of head {' or '.join(repr(h) for h in allowed)}")
      only = f" (and {task.name} can start only from {', '.join(allowed)})" if how == "init_from" else ""
      raise CheckpointError(
          f"The checkpoint in {directory} was written by a head={written_by!r} run, but config.head="
          f"{task.name!r}{only}: its parameters do not fit. Fix: {fix}. Nothing was written.")
    task.check_checkpoint(directory, metadata, written_by)
  saved = metadata.get("model", {})
  current = dataclasses.asdict(model_config)
  differences = [f"{key}: checkpoint {saved.get(key)!r}, config {current[key]!r}"
                 for key in SHAPE_FIELDS if key in saved and saved.get(key) != current[key]]
  if differences:
    raise CheckpointError(
        f"The checkpoint in {directory} was written for a different model ({'; '.join(differences)}). "
        "Use a new --workdir for this config, or set the model fields back to the checkpoint's values; "
        "to start a different model from these weights is not possible, but init_from works for the same shapes.")


def check_frozen_fits(directory: str, part: str, task: Task, tokenizer: tokenizers_lib.Tokenizer) -> None:
  """Raises CheckpointError if the run `directory` (or `hf:DIR`), named to fill `part` of the params
  (`Task.frozen_weights`), has no checkpoint, is of a task that cannot, has other shapes than the part's model
  (`Task.frozen_model_config`), or another tokenizer than this run's."""
  where = task.frozen_source(part, directory)
  model_config = task.frozen_model_config(part)
  hf_dir = interop.hf_directory(directory)
  if hf_dir is not None:  # a Hugging Face folder: a language model's weights and (maybe) its tokenizer
    interop.check_weights(hf_dir, model_config)
    theirs = interop.read_tokenizer(hf_dir)
    if theirs is None:
      raise CheckpointError(
          f"{where} holds no tokenizer (tokenizer.json, tokenizer.model or lm_tokenizer/), so its ids cannot be "
          "checked against this run's. Fix: put the model's tokenizer in that folder. Nothing was written.")
  else:
    if not checkpoint_lib.has_checkpoint(directory):
      raise CheckpointError(f"{where} holds no checkpoint. Fix: point it at the workdir of a finished run. "
                            "Nothing was written.")
    task.check_frozen(part, directory, saved_task(checkpoint_lib.read_metadata(directory)))
    check_checkpoint_fits(directory, model_config)
    tokenizer_dir = os.path.join(directory, TOKENIZER_DIR)
    theirs = tokenizers_lib.load_tokenizer(tokenizer_dir) if os.path.isdir(tokenizer_dir) else None
  if theirs is None or tokenizer_identity(theirs) != tokenizer_identity(tokenizer):
    described = "no tokenizer" if theirs is None else f"a {theirs.kind} tokenizer of {theirs.vocab_size} ids"
    raise CheckpointError(
        f"{where} was trained with another tokenizer ({described}) than this run's (a {tokenizer.kind} tokenizer "
        f"of {tokenizer.vocab_size} ids): the same ids would mean other text. Fix: name a run trained with the same "
        "tokenizer"
        f"{task.frozen_tokenizer_hint(part)}. Nothing was written.")


def hf_source_task(task: Task) -> str | None:
  """The task among `task.init_from_tasks` whose model a Hugging Face folder holds (the LM), or None."""
  return next((name for name in task.init_from_tasks if task_class(name).exports_hf), None)


def build_experiment(config: ml_collections.ConfigDict, workdir: str, mode: str = "train") -> tuple[Experiment, bool]:
  """Validates and builds a run. Returns (experiment, tokenizer_is_new). Writes nothing."""
  validate(config, mode)
  # A task that cannot start from scratch says so before its tokenizer is looked for: without init_from it would
  # be built from the training split, which for records (SFT, DPO) has no text field, and that error would hide
  # this one. The same starts as `initial_state`'s: resume, warm_start and init_from need none.
  requires_init_from = task_class(config.head).requires_init_from
  if (mode == "train" and requires_init_from and not config.init_from and not config.warm_start
      and not (config.resume and checkpoint_lib.has_checkpoint(workdir))):
    raise ConfigError(requires_init_from)
  tokenizer, tokenizer_is_new = resolve_tokenizer(config, workdir)
  # Processes started with different flags, data or tokenizers would train on
  # inconsistent batches or deadlock later; stop them all now instead.
  run_identity = to_json_dict(config)
  run_identity.pop("distributed")  # differs per process by design (process_id)
  distributed.check_same_on_all_processes({"config": run_identity, "tokenizer": tokenizer_identity(tokenizer)})
  model_config = settle_kernels(model_config_for(config, tokenizer))
  try:
    task = make_task(config, model_config, tokenizer, train_split=functools.partial(open_train_split, config))
  except ValueError as error:
    if isinstance(error, UserError):
      raise
    raise ConfigError(str(error)) from error
  if config.privacy.enabled:
    task.check_privacy(online=mode == "online")
  tx, schedule = task.make_optimizer()
  try:
    mesh_sizes, rules = sharding.mesh_settings(config.mesh)
  except ValueError as error:
    raise ConfigError(str(error)) from error
  mesh = sharding.make_mesh(mesh_sizes)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % (data_parallel * config.grad_accum_steps):
    raise ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
        f"{data_parallel} (mesh.data x mesh.fsdp) times grad_accum_steps={config.grad_accum_steps}; "
        "make batch_size a multiple of it.")
  boxed = state_lib.abstract_state(task.init_params, tx, config.seed)
  sharding.check_even(boxed.params, mesh, rules)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  if mesh.devices.flat[0].platform == "cpu" and config.cpu_malloc == "keep":
    logging.info("Host memory: %s.", malloc.keep_freed_memory())
  compiled = step_lib.jit_steps(task.make_train_step(tx, schedule), task.make_eval_step(), shardings, mesh, rules,
                                task.batch_ranks, global_batch_size=int(config.batch_size),
                                compiler_options=step_lib.cpu_compiler_options(config.xla_cpu_options, mesh),
                                train_only_ranks=task.train_only_ranks)
  hf_dir = interop.hf_directory(config.init_from)
  for directory, how in ((workdir if checkpoint_lib.has_checkpoint(workdir) and config.resume else None, "resume"),
                         (config.warm_start, "warm_start"), (None if hf_dir is not None else config.init_from,
                                                             "init_from")):
    if directory:
      check_checkpoint_fits(directory, model_config, task, how)
  starts = mode == "train" and not (config.resume and checkpoint_lib.has_checkpoint(workdir)) and not config.warm_start
  for part, directory in task.frozen_weights().items() if starts else ():  # read at a fresh start only
    check_frozen_fits(directory, part, task, tokenizer)
  if hf_dir is not None:  # a Hugging Face folder, not a checkpoint
    if hf_source_task(task) is None:
      raise ConfigError(
          f"config.init_from={config.init_from!r} holds a language model, and config.head={task.name!r} cannot "
          f"start from one (it starts from {', '.join(task.init_from_tasks)}). Use --config.head=lm.")
    if not (config.resume and checkpoint_lib.has_checkpoint(workdir)):  # its tensors will be read: check them now
      interop.check_weights(hf_dir, model_config)
  experiment = Experiment(config, workdir, tokenizer, model_config, task, tx, schedule, mesh, rules, compiled,
                          abstract)
  logging.info("Model %s: %s parameters.", model_config.variant,
               f"{sum(x.size for x in jax.tree.leaves(abstract.params)):,}")
  return experiment, tokenizer_is_new


def token_windows(experiment: Experiment, source: sources.TextSource, stride: int,
                  clean: bool = False, train: bool = False) -> Any:
  """A split's examples: windows over its tokens, or its sentences (data.format); with `clean`,
  its documents go through config.clean first. Evaluation sentences are padded to whole batches."""
  if clean:
    source = cleaned_documents(experiment.config, source)
  return experiment.task.examples(source, train=train, stride=stride)


def train_dataset(experiment: Experiment, examples: Any) -> tuple[Any, Any]:
  """The run's training batches (a Grain MapDataset, element s = this process's rows of step s) and, for a
  DP-SGD run, its accounting (lm.train.privacy.Accounting; None otherwise).

  A private run draws the batches its accountant describes (config.privacy.sampling: shuffled fixed-size
  batches or Poisson sampling), and its step's noise multiplier is set here, from `target_epsilon` and the
  size of `examples` when that is how it is given. Raises ConfigError when the data cannot be accounted.
  """
  from lm.train import privacy as privacy_lib  # pylint: disable=g-import-not-at-top
  config = experiment.config
  common = dict(seed=config.seed, global_batch_size=config.batch_size, rows=experiment.process_rows)
  if not config.privacy.enabled:
    return pipeline.train_dataset(examples, **common), None
  try:
    accounting = privacy_lib.accounting(config.privacy, dataset_size=len(examples), batch_size=config.batch_size,
                                        steps=config.steps)
  except ValueError as error:
    raise ConfigError(f"config.privacy: {error}. Fix: a larger target_epsilon, fewer steps or a larger batch, "
                      "or (Poisson sampling) a smaller privacy.expected_batch_size.") from None
  experiment.task.dp_sgd.noise_multiplier = accounting.noise_multiplier
  try:
    if accounting.sampling == "poisson":
      dataset = pipeline.poisson_train_dataset(examples, expected_batch_size=accounting.expected_batch_size, **common)
    else:
      dataset = pipeline.private_train_dataset(examples, **common)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  return dataset, accounting
