"""The run's tokenizer and model config: what the config, the workdir and an imported model decide together.

Tokenizer order (`resolve_tokenizer`): the workdir's own (resume), the
tokenizer of the warm_start/init_from run (so weights and ids agree), the
tokenizer of an `hf:DIR` init_from when DIR has one, else one built from the
training split. The model (`model_config_for`): config.model with the
vocabulary the tokenizer (and sentence specials) need, padded to
`model.vocab_multiple`; or, for `init_from=hf:DIR`, DIR's shapes with the
run's own way of computing (`HF_RUN_FIELDS`).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import ml_collections
from absl import logging

from lm import interop
from lm.core.errors import ConfigError
from lm.data import sentences as sentences_lib
from lm.data import sources, synthetic
from lm.data import tokenizers as tokenizers_lib
from lm.experiment.splits import open_train_split
from lm.models import transformer as transformer_lib
from lm.models.config import TransformerConfig

TOKENIZER_DIR = "tokenizer"


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
    # Characters: every one of the split (a pass over it). SentencePiece: a deterministic sample of
    # data.tokenizer_sample_bytes (the whole split when it is smaller), so a large corpus costs no more.
    documents = split.sample(data.tokenizer_sample_bytes) if data.tokenizer == "sentencepiece" else split
    # The separator joins documents in the token stream, so its characters must be in the vocabulary.
    texts = itertools.chain(documents, [sources.PARAGRAPH_SEPARATOR])
  tokenizer = tokenizers_lib.build_tokenizer(
      data.tokenizer, texts, vocab_size=data.tokenizer_vocab_size, model_file=data.tokenizer_model or None)
  return tokenizer, True


tokenizer_identity = tokenizers_lib.identity  # what makes two tokenizers the same (lm.data.tokenizers)


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
    raise ConfigError(
        f"config.model.vocab_size={vocab_size} is smaller than the {needed} ids the tokenizer (and sentence "
        "specials) need; leave it unset to use the tokenizer's size.")
  try:
    fields = dict(model.to_dict(), valid_vocab_size=needed if needed < vocab_size else None)
    return TransformerConfig.from_config(fields, vocab_size=vocab_size, max_len=model.max_len or config.seq_len)
  except ValueError as error:
    raise ConfigError(str(error)) from error


def settle_kernels(model_config: TransformerConfig) -> TransformerConfig:
  """model.attention_impl (cudnn/cpu/auto), model.norm_impl and model.gelu_impl (cpu/auto) -> what these devices
  run, saying why a kernel asked for is not used."""
  settled, problem = transformer_lib.resolve_attention(model_config)
  if problem and model_config.attention_impl in ("cudnn", "cpu"):
    logging.warning("model.attention_impl=%s cannot be used: %s. Using XLA's attention instead (same result, "
                    "no fused kernel); set model.attention_impl=auto to choose silently.", model_config.attention_impl,
                    problem)
  elif model_config.attention_impl != "xla":
    logging.info("model.attention_impl=%s -> %s%s", model_config.attention_impl, settled.attention_impl,
                 f" ({problem})" if problem else "")
  for field, kind in (("norm_impl", "flax's LayerNorm"), ("gelu_impl", "XLA's GELU")):
    asked = getattr(model_config, field)
    settled, problem = transformer_lib.resolve_kernel(settled, field)
    if problem and asked == "cpu":
      logging.warning("model.%s=cpu cannot be used: %s. Using %s instead (same result); set model.%s=auto to "
                      "choose silently.", field, problem, kind, field)
    elif asked != "xla":
      logging.info("model.%s=%s -> %s%s", field, asked, getattr(settled, field), f" ({problem})" if problem else "")
  return settled


# Model fields an `hf:DIR` run keeps from its own config: how it computes, not what the weights are.
HF_RUN_FIELDS = ("dtype", "param_dtype", "attention_impl", "norm_impl", "gelu_impl", "remat_policy", "scan_layers",
                 "dropout", "loss_impl", "loss_chunk_len", "fused_loss_min_mb")


def _hf_model_config(config: ml_collections.ConfigDict, tokenizer: tokenizers_lib.Tokenizer,
                     hf_dir: str) -> TransformerConfig:
  """The model of `init_from=hf:DIR`: shapes from DIR's config.json, HF_RUN_FIELDS from config.model."""
  model = config.model
  fields = interop.model_fields(hf_dir)
  if fields["position"] == "rope" and model.max_len:
    fields = interop.model_fields(hf_dir, max_len=model.max_len)  # a shorter KV cache than the checkpoint allows
  source = f"the model in {config.init_from}"
  if config.seq_len > fields["max_len"]:
    raise ConfigError(
        f"config.seq_len={config.seq_len} is longer than the {fields['max_len']} positions of {source} "
        "(n_positions / max_position_embeddings, or config.model.max_len). Lower --config.seq_len.")
  if model.vocab_size not in (None, fields["vocab_size"]):
    raise ConfigError(
        f"config.model.vocab_size={model.vocab_size}, but {source} has {fields['vocab_size']} ids. Leave "
        "config.model.vocab_size unset: an imported model keeps its vocabulary.")
  if tokenizer.vocab_size > fields["vocab_size"]:
    raise ConfigError(
        f"The {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids, more than the {fields['vocab_size']} of "
        f"{source}. Put the model's tokenizer (tokenizer.json or tokenizer.model) in that folder, or choose a "
        "config.data.tokenizer with at most that many ids (byte: 257).")
  if config.data.format == "sentences":
    needed = sentences_lib.SentenceVocab.for_tokenizer(tokenizer).size
    if needed > fields["vocab_size"]:
      raise ConfigError(
          f"config.data.format='sentences' adds PAD, BOS, EOS and MASK after the tokenizer's {tokenizer.vocab_size} "
          f"ids ({needed} in all), and {source} has only {fields['vocab_size']}: there is no room for them. Use "
          "--config.data.format=windows, or a smaller tokenizer.")
  logging.info("Model shapes from %s: %s (config.model keeps only %s).", config.init_from,
               {key: value for key, value in fields.items() if key != "variant"}, ", ".join(HF_RUN_FIELDS))
  try:
    return TransformerConfig(**fields, **{key: model[key] for key in HF_RUN_FIELDS})
  except ValueError as error:
    raise ConfigError(str(error)) from error
