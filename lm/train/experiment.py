"""Builds everything a run needs from a config, without writing anything.

`build_experiment(config, workdir)` resolves the tokenizer, tokenizes the
data, builds the model, optimizer and mesh, and checks that an existing
checkpoint fits, all before the workdir is touched: a bad config, data path
or checkpoint stops the run with the workdir exactly as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
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
from lm import config as config_lib
from lm import distributed
from lm.data import clean as clean_lib
from lm.data import pipeline, sentences as sentences_lib, sources
from lm.data import tokenizers as tokenizers_lib
from lm.heads import Head, make_head
from lm.models import TransformerConfig
from lm.train import checkpoint as checkpoint_lib
from lm.train import sharding, step as step_lib
from lm.train import state as state_lib

TOKENIZER_DIR = "tokenizer"
# Model fields that change parameter shapes: a checkpoint written with other
# values cannot be restored into this model.
SHAPE_FIELDS = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "width", "mlp_dim", "max_len", "position",
                "norm", "mlp", "use_bias", "tie_embeddings", "scan_layers", "param_dtype")

# VAE fields that change parameter shapes (a head="vae" run, or the autoencoder of a latent GAN).
VAE_SHAPE_FIELDS = ("latent_size", "injection", "pooling", "encoder_layers")


@dataclasses.dataclass
class Experiment:
  """A built run: config, tokenizer, model, optimizer, mesh and compiled steps."""

  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: tokenizers_lib.Tokenizer
  model_config: TransformerConfig
  head: Head
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: Mesh
  rules: sharding.Rules
  steps: step_lib.CompiledSteps
  abstract_state: Any  # ShapeDtypeStructs with target shardings

  @property
  def model(self) -> nn.Module:
    """The head's Flax module (a TransformerLM for head="lm")."""
    return self.head.model

  @property
  def checkpoint_dir(self) -> str:
    return checkpoint_lib.checkpoint_dir(self.workdir)

  @property
  def process_rows(self) -> pipeline.ProcessRows:
    """The rows of every global batch this process reads (all of them with one process)."""
    try:
      return pipeline.ProcessRows.for_sharding(self.steps.batch_sharding, self.config.batch_size)
    except ValueError as error:
      raise sharding.MeshError(str(error)) from error

  def metadata(self) -> dict[str, Any]:
    return {
        "config": config_lib.to_json_dict(self.config),
        "head": self.head.name,
        "model": dataclasses.asdict(self.model_config),
        "tokenizer": self.tokenizer.to_json(),
        "mesh": {"shape": dict(self.mesh.shape), "rules": [list(rule) for rule in self.rules],
                 "process_count": jax.process_count()},
        "lm_version": lm_version,
    }

  def logits(self, params: Any, tokens: Any) -> jax.Array:
    """Forward pass [batch, length] -> [batch, length, vocab] on the run's mesh (jitted, notebook helper)."""
    if self.head.name != "lm":
      raise ValueError(f"Experiment.logits is the language model's forward pass; this run's head is "
                       f"{self.head.name!r}: call experiment.model.apply (or the head's methods) instead.")
    with self.steps.context():
      return _jitted_apply(self.model, params, jnp.asarray(tokens, jnp.int32))

  def init_state(self) -> state_lib.TrainState:
    state, _ = state_lib.create_state(self.head.init_params, self.tx, self.mesh, self.rules, self.config.seed,
                                      self.steps.state_shardings)
    return state


@functools.partial(jax.jit, static_argnums=0)
def _jitted_apply(model: nn.Module, params: Any, tokens: jax.Array) -> jax.Array:
  # The logical sharding constraints inside the model need a traced context:
  # under a mesh they are sharding annotations, which eager calls cannot take.
  return model.apply({"params": params}, tokens)


def resolve_tokenizer(config: ml_collections.ConfigDict, workdir: str | None) -> tuple[tokenizers_lib.Tokenizer, bool]:
  """The run's tokenizer and whether it is new (must be saved into the workdir).

  Order: the workdir's own (resume), the tokenizer of the warm_start/init_from
  run (so weights and ids agree), else one built from the training split.
  """
  for directory in (workdir, config.warm_start, config.init_from):
    if directory and os.path.exists(os.path.join(directory, TOKENIZER_DIR, "tokenizer.json")):
      return tokenizers_lib.load_tokenizer(os.path.join(directory, TOKENIZER_DIR)), directory != workdir
  data = config.data
  texts = None
  if data.tokenizer == "char" or (data.tokenizer == "sentencepiece" and not data.tokenizer_model):
    split = open_train_split(config)
    # The separator joins documents in the token stream, so its characters must be in the vocabulary.
    texts = itertools.chain(split, [sources.PARAGRAPH_SEPARATOR])
  tokenizer = tokenizers_lib.build_tokenizer(
      data.tokenizer, texts, vocab_size=data.tokenizer_vocab_size, model_file=data.tokenizer_model or None)
  return tokenizer, True


def tokenizer_identity(tokenizer: tokenizers_lib.Tokenizer) -> dict[str, Any]:
  """What makes two tokenizers the same: their description and, for SentencePiece, the model bytes."""
  identity = dict(tokenizer.to_json())
  if isinstance(tokenizer, tokenizers_lib.SentencePieceTokenizer):
    identity["model_sha256"] = hashlib.sha256(tokenizer.model_proto).hexdigest()
  return identity


def _cache_dir(config: ml_collections.ConfigDict) -> str | None:
  return config.data.cache_dir or None


def open_train_split(config: ml_collections.ConfigDict) -> sources.TextSource:
  _, _, split = sources.parse_source(config.data.source)
  return sources.open_split(config.data.source, split or config.data.train_split,
                            text_field=config.data.text_field, cache_dir=_cache_dir(config))


def open_eval_split(config: ml_collections.ConfigDict, split: str | None = None) -> sources.TextSource:
  return sources.open_split(config.data.source, split or config.data.eval_split,
                            text_field=config.data.text_field, cache_dir=_cache_dir(config))


def model_config_for(config: ml_collections.ConfigDict, tokenizer: tokenizers_lib.Tokenizer) -> TransformerConfig:
  model = config.model
  multiple = model.vocab_multiple
  needed = tokenizer.vocab_size
  if config.data.format == "sentences":
    needed = sentences_lib.SentenceVocab.for_tokenizer(tokenizer).size  # + PAD, BOS, EOS, MASK
  vocab_size = model.vocab_size or -(-needed // multiple) * multiple
  if vocab_size < needed:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={vocab_size} is smaller than the {needed} ids the tokenizer (and sentence "
        "specials) need; leave it unset to use the tokenizer's size.")
  try:
    return TransformerConfig.from_config(model.to_dict(), vocab_size=vocab_size,
                                         max_len=model.max_len or config.seq_len)
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from error


def saved_head(metadata: dict[str, Any]) -> str:
  """The head a checkpoint was written by (checkpoints from before heads existed are LMs)."""
  return metadata.get("head") or metadata.get("config", {}).get("head") or "lm"


def check_checkpoint_fits(directory: str, model_config: TransformerConfig, head: Head | None = None,
                          how: str = "resume") -> None:
  """Raises CheckpointError if the checkpoint in `directory` has other parameter shapes or another head.

  how: "resume" / "warm_start" need the same head; "init_from" a head in `head.init_from_heads`.
  """
  metadata = checkpoint_lib.read_metadata(directory)
  if head is not None:
    written_by = saved_head(metadata)
    allowed = head.init_from_heads if how == "init_from" else (head.name,)
    if written_by not in allowed:
      fix = (f"set --config.head={written_by} to continue it, or use a new --workdir" if how == "resume" else
             f"point config.{how} at a run of head {' or '.join(repr(h) for h in allowed)}")
      raise checkpoint_lib.CheckpointError(
          f"The checkpoint in {directory} was written by a head={written_by!r} run, but config.head="
          f"{head.name!r}{' (and ' + head.name + ' can start only from ' + ', '.join(allowed) + ')' if how == 'init_from' else ''}"
          f": its parameters do not fit. Fix: {fix}. Nothing was written.")
  if head is not None and saved_head(metadata) in ("vae", "gan") and head.name in ("vae", "gan"):
    saved_vae, current_vae = metadata.get("config", {}).get("vae", {}), head.config.vae
    differences = [f"vae.{key}: checkpoint {saved_vae.get(key)!r}, config {current_vae[key]!r}"
                   for key in VAE_SHAPE_FIELDS if key in saved_vae and saved_vae.get(key) != current_vae[key]]
    if differences:
      raise checkpoint_lib.CheckpointError(
          f"The checkpoint in {directory} was written for another VAE ({'; '.join(differences)}). Set those "
          "config.vae fields to the checkpoint's values, or use a new --workdir. Nothing was written.")
  saved = metadata.get("model", {})
  current = dataclasses.asdict(model_config)
  differences = [f"{key}: checkpoint {saved.get(key)!r}, config {current[key]!r}"
                 for key in SHAPE_FIELDS if key in saved and saved.get(key) != current[key]]
  if differences:
    raise checkpoint_lib.CheckpointError(
        f"The checkpoint in {directory} was written for a different model ({'; '.join(differences)}). "
        "Use a new --workdir for this config, or set the model fields back to the checkpoint's values; "
        "to start a different model from these weights is not possible, but init_from works for the same shapes.")


def build_experiment(config: ml_collections.ConfigDict, workdir: str, mode: str = "train") -> tuple[Experiment, bool]:
  """Validates and builds a run. Returns (experiment, tokenizer_is_new). Writes nothing."""
  config_lib.validate(config, mode)
  tokenizer, tokenizer_is_new = resolve_tokenizer(config, workdir)
  # Processes started with different flags, data or tokenizers would train on
  # inconsistent batches or deadlock later; stop them all now instead.
  run_identity = config_lib.to_json_dict(config)
  run_identity.pop("distributed")  # differs per process by design (process_id)
  distributed.check_same_on_all_processes({"config": run_identity, "tokenizer": tokenizer_identity(tokenizer)})
  model_config = model_config_for(config, tokenizer)
  try:
    head = make_head(config, model_config, tokenizer)
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from error
  tx, schedule = head.make_optimizer()
  try:
    mesh_sizes, rules = sharding.mesh_settings(config.mesh)
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from error
  mesh = sharding.make_mesh(mesh_sizes)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % (data_parallel * config.grad_accum_steps):
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
        f"{data_parallel} (mesh.data x mesh.fsdp) times grad_accum_steps={config.grad_accum_steps}; "
        "make batch_size a multiple of it.")
  boxed = state_lib.abstract_state(head.init_params, tx, config.seed)
  sharding.check_even(boxed.params, mesh, rules)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = checkpoint_lib.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  compiled = step_lib.jit_steps(head.make_train_step(tx, schedule), head.make_eval_step(), shardings, mesh, rules,
                                head.batch_ranks, step_lib.cpu_compiler_options(config.xla_cpu_options, mesh))
  for directory, how in ((workdir if checkpoint_lib.has_checkpoint(workdir) and config.resume else None, "resume"),
                         (config.warm_start, "warm_start"), (config.init_from, "init_from")):
    if directory:
      check_checkpoint_fits(directory, model_config, head, how)
  experiment = Experiment(config, workdir, tokenizer, model_config, head, tx, schedule, mesh, rules, compiled,
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
  return experiment.head.examples(source, train=train, stride=stride)


class _CleanedSplit(list):
  def __init__(self, documents: list[str], name: str):
    super().__init__(documents)
    self.name = name


def cleaned_documents(config: ml_collections.ConfigDict, source: sources.TextSource) -> _CleanedSplit:
  """The split's documents normalized, filtered and deduplicated (lm.data.clean), with the counts logged."""
  cleaner = clean_lib.Cleaner(clean_lib.CleanConfig.from_mapping(config.clean.to_dict()))
  kept, dropped = cleaner.clean(source)
  logging.info("Cleaned %s: kept %d documents, dropped %s.", source.name, len(kept), dict(dropped) or "none")
  if not kept:
    raise sources.DataError(f"Cleaning dropped every document of {source.name} ({dict(dropped)}); loosen config.clean "
                            "(min_chars, near_dup_threshold) or set data.clean_train=False.")
  return _CleanedSplit(kept, source.name)
