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
from lm import interop
from lm.data import clean as clean_lib
from lm.data import pipeline, sentences as sentences_lib, sources, synthetic
from lm.data import tokenizers as tokenizers_lib
from lm.heads import Head, make_head
from lm.models import TransformerConfig
from lm.models import transformer as transformer_lib
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
        **self.head.metadata(),
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
  run (so weights and ids agree), the tokenizer of an `hf:DIR` init_from when
  DIR has one (lm.interop.read_tokenizer), else one built from the training
  split (which must fit the imported vocabulary: `model_config_for` checks).
  """
  hf_dir = interop.hf_directory(config.init_from)
  for directory in (workdir, config.warm_start, None if hf_dir is not None else config.init_from):
    if directory and os.path.exists(os.path.join(directory, TOKENIZER_DIR, "tokenizer.json")):
      return tokenizers_lib.load_tokenizer(os.path.join(directory, TOKENIZER_DIR)), directory != workdir
  if hf_dir is not None:
    tokenizer = interop.read_tokenizer(hf_dir)
    if tokenizer is not None:
      return tokenizer, True
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
  if isinstance(tokenizer, tokenizers_lib.HFTokenizer):
    identity["model_sha256"] = hashlib.sha256(tokenizer.tokenizer_json.encode("utf-8")).hexdigest()
  return identity


def _cache_dir(config: ml_collections.ConfigDict) -> str | None:
  return config.data.cache_dir or None


def _label_field(config: ml_collections.ConfigDict) -> str | None:
  """A classifier reads each record's label too."""
  return config.data.label_field if config.head == "classifier" else None


def _synthetic_split(config: ml_collections.ConfigDict, split: str) -> synthetic.SyntheticSource:
  return synthetic.SyntheticSource(split, vocab_size=config.data.synthetic_vocab_size,
                                   num_tokens=config.data.synthetic_tokens, seed=config.seed)


def open_train_split(config: ml_collections.ConfigDict) -> sources.TextSource:
  if config.data.source == synthetic.SOURCE:
    return _synthetic_split(config, config.data.train_split)
  _, _, split = sources.parse_source(config.data.source)
  return sources.open_split(config.data.source, split or config.data.train_split,
                            text_field=config.data.text_field, cache_dir=_cache_dir(config),
                            label_field=_label_field(config))


def open_eval_split(config: ml_collections.ConfigDict, split: str | None = None) -> sources.TextSource:
  if config.data.source == synthetic.SOURCE:
    return _synthetic_split(config, split or config.data.eval_split)
  return sources.open_split(config.data.source, split or config.data.eval_split,
                            text_field=config.data.text_field, cache_dir=_cache_dir(config),
                            label_field=_label_field(config))


def model_config_for(config: ml_collections.ConfigDict, tokenizer: tokenizers_lib.Tokenizer) -> TransformerConfig:
  hf_dir = interop.hf_directory(config.init_from)
  if hf_dir is not None:
    return _hf_model_config(config, tokenizer, hf_dir)
  model = config.model
  multiple = model.vocab_multiple
  needed = tokenizer.vocab_size
  if config.data.source == synthetic.SOURCE:
    needed = config.data.synthetic_vocab_size
  elif config.data.format == "sentences":
    needed = sentences_lib.SentenceVocab.for_tokenizer(tokenizer).size  # + PAD, BOS, EOS, MASK
  vocab_size = model.vocab_size or -(-needed // multiple) * multiple
  if vocab_size < needed:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={vocab_size} is smaller than the {needed} ids the tokenizer (and sentence "
        "specials) need; leave it unset to use the tokenizer's size.")
  try:
    fields = dict(model.to_dict(), valid_vocab_size=needed if needed < vocab_size else None)
    return TransformerConfig.from_config(fields, vocab_size=vocab_size, max_len=model.max_len or config.seq_len)
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from error


def settle_attention(model_config: TransformerConfig) -> TransformerConfig:
  """model.attention_impl cudnn/auto -> cudnn or xla for these devices, saying why cuDNN is not used."""
  settled, problem = transformer_lib.resolve_attention(model_config)
  if problem and model_config.attention_impl == "cudnn":
    logging.warning("model.attention_impl=cudnn cannot be used: %s. Using XLA's attention instead (same result, "
                    "no flash kernel); set model.attention_impl=auto to choose silently.", problem)
  elif model_config.attention_impl != "xla":
    logging.info("model.attention_impl=%s -> %s%s", model_config.attention_impl, settled.attention_impl,
                 f" ({problem})" if problem else "")
  return settled


# Model fields an `hf:DIR` run keeps from its own config: how it computes, not what the weights are.
HF_RUN_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers", "dropout", "loss_impl",
                 "loss_chunk_len", "fused_loss_min_mb")


def _hf_model_config(config: ml_collections.ConfigDict, tokenizer: tokenizers_lib.Tokenizer,
                     hf_dir: str) -> TransformerConfig:
  """The model of `init_from=hf:DIR`: shapes from DIR's config.json, HF_RUN_FIELDS from config.model."""
  model = config.model
  fields = interop.model_fields(hf_dir)
  if fields["position"] == "rope" and model.max_len:
    fields = interop.model_fields(hf_dir, max_len=model.max_len)  # a shorter KV cache than the checkpoint allows
  source = f"the model in {config.init_from}"
  if config.seq_len > fields["max_len"]:
    raise config_lib.ConfigError(
        f"config.seq_len={config.seq_len} is longer than the {fields['max_len']} positions of {source} "
        "(n_positions / max_position_embeddings, or config.model.max_len). Lower --config.seq_len.")
  if model.vocab_size not in (None, fields["vocab_size"]):
    raise config_lib.ConfigError(
        f"config.model.vocab_size={model.vocab_size}, but {source} has {fields['vocab_size']} ids. Leave "
        "config.model.vocab_size unset: an imported model keeps its vocabulary.")
  if tokenizer.vocab_size > fields["vocab_size"]:
    raise config_lib.ConfigError(
        f"The {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids, more than the {fields['vocab_size']} of "
        f"{source}. Put the model's tokenizer (tokenizer.json or tokenizer.model) in that folder, or choose a "
        "config.data.tokenizer with at most that many ids (byte: 257).")
  if config.data.format == "sentences":
    needed = sentences_lib.SentenceVocab.for_tokenizer(tokenizer).size
    if needed > fields["vocab_size"]:
      raise config_lib.ConfigError(
          f"config.data.format='sentences' adds PAD, BOS, EOS and MASK after the tokenizer's {tokenizer.vocab_size} "
          f"ids ({needed} in all), and {source} has only {fields['vocab_size']}: there is no room for them. Use "
          "--config.data.format=windows, or a smaller tokenizer.")
  logging.info("Model shapes from %s: %s (config.model keeps only %s).", config.init_from,
               {key: value for key, value in fields.items() if key != "variant"}, ", ".join(HF_RUN_FIELDS))
  try:
    return TransformerConfig(**fields, **{key: model[key] for key in HF_RUN_FIELDS})
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
  if head is not None and head.name == "classifier" and saved_head(metadata) == "classifier":
    saved_classes, classes = metadata.get("classes"), head.metadata()["classes"]
    if saved_classes is not None and list(saved_classes) != list(classes):
      raise checkpoint_lib.CheckpointError(
          f"The checkpoint in {directory} classifies into {saved_classes}, but this config's classes are "
          f"{classes}. Set config.classifier.labels={tuple(saved_classes)!r} (same classes, same order), or use "
          "a new --workdir. Nothing was written.")
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
  model_config = settle_attention(model_config_for(config, tokenizer))
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
  hf_dir = interop.hf_directory(config.init_from)
  for directory, how in ((workdir if checkpoint_lib.has_checkpoint(workdir) and config.resume else None, "resume"),
                         (config.warm_start, "warm_start"), (None if hf_dir is not None else config.init_from,
                                                             "init_from")):
    if directory:
      check_checkpoint_fits(directory, model_config, head, how)
  if hf_dir is not None:  # a Hugging Face folder, not a checkpoint
    if "lm" not in head.init_from_heads:
      raise config_lib.ConfigError(
          f"config.init_from={config.init_from!r} holds a language model, and config.head={head.name!r} cannot "
          f"start from one (it starts from {', '.join(head.init_from_heads)}). Use --config.head=lm.")
    if not (config.resume and checkpoint_lib.has_checkpoint(workdir)):  # its tensors will be read: check them now
      interop.check_weights(hf_dir, model_config)
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
