"""The data part of the run config: where text comes from, how it is tokenized and cut, cleaned, and scored.

`data.*` (training and its evaluation), `clean.*` (`lm.data.clean`: every
online chunk, and the training split with `data.clean_train`) and `eval.*`
(what `--mode eval` and `--mode crossval` score).
"""

from __future__ import annotations

import ml_collections

from lm.core.configs import ConfigPart, require
from lm.core.errors import ConfigError
from lm.data.clean import CleanConfig

TOKENIZERS = ("char", "byte", "sentencepiece")
# windows: documents joined into one token stream, cut into seq_len windows (the LM's default);
# sentences: one record = one example, BOS + tokens + EOS padded to seq_len (lm.data.sentences).
DATA_FORMATS = ("windows", "sentences")

DATA_FIELDS = {
    "data.source": "tfds:tiny_shakespeare",  # tfds:NAME[:SPLIT] or a .txt/.jsonl/.tsv file or folder, or synthetic
    "data.train_split": "train",
    "data.eval_split": "validation",
    "data.text_field": "text",
    # Tasks that read labels (head="classifier"): the .tsv column / .jsonl field / TFDS feature holding them.
    "data.label_field": "label",
    "data.format": "windows",  # windows | sentences (DATA_FORMATS)
    "data.tokenizer": "char",  # char | byte | sentencepiece
    "data.tokenizer_vocab_size": 8000,  # sentencepiece only
    "data.tokenizer_model": "",  # a SentencePiece .model file; empty: train one on the train split
    # data.source="synthetic" (lm.data.synthetic): uniform random ids, for throughput runs.
    "data.synthetic_vocab_size": 50_257,  # GPT-2's vocabulary
    "data.synthetic_tokens": 1 << 22,  # ids per split
    "data.cache_dir": "",  # where local corpora are prepared as TFDS datasets; empty: ~/.cache/lm/tfds
    "data.train_stride": 1,  # training windows start every `train_stride` tokens
    "data.clean_train": False,  # True: clean the training split with config.clean (dedup, filters) first
    "data.prefetch": 4,
    "data.threads": 1,
}

CLEAN_FIELDS = {
    "clean.normalization": "NFC",  # NFC | NFKC | none
    "clean.min_chars": 1,
    "clean.max_chars": 0,  # 0: no limit
    "clean.exact_dedup": True,
    "clean.near_dup_threshold": 0.8,  # MinHash estimate of the Jaccard similarity of 5-gram sets; 0: off
    "clean.shingle_size": 5,
    "clean.num_perm": 64,
    "clean.bands": 16,
}

EVAL_FIELDS = {
    "eval.source": "",  # --mode eval scores this source (tfds:NAME[:SPLIT] or a local path); empty: data.source
    "eval.split": "",  # and this split of it; empty: data.eval_split
    # A sliding window: windows start every `stride` tokens and score only their new tokens, each with
    # >= seq_len - stride tokens of context; 0: non-overlapping windows (lm.data.scoring).
    "eval.stride": 0,
    "eval.folds": 5,  # --mode crossval: K stratified folds of the training split
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """data.*, clean.* and eval.*; which task may read which format is the task's check (lm.tasks.base)."""
  del mode
  data = config.data
  require(data.format in DATA_FORMATS, f"config.data.format={data.format!r} is not one of {DATA_FORMATS}.")
  require(isinstance(data.label_field, str) and data.label_field.strip() != "",
          "config.data.label_field is empty: name the .tsv column / .jsonl field holding the labels.")
  require(isinstance(data.source, str) and data.source.strip() != "",
          "config.data.source is empty: set it to tfds:NAME[:SPLIT] or a path to a .txt/.jsonl/.tsv corpus.")
  require(data.tokenizer in TOKENIZERS, f"config.data.tokenizer={data.tokenizer!r} is not one of {TOKENIZERS}.")
  require(data.train_stride >= 1, "config.data.train_stride must be >= 1.")
  if data.source == "synthetic":
    require(data.format == "windows" and data.tokenizer == "byte",
            "config.data.source='synthetic' is random token ids for a language model's throughput: it needs "
            f"data.format='windows' and data.tokenizer='byte' (got {data.format!r}, {data.tokenizer!r}).")
    require(data.synthetic_vocab_size >= 1 and data.synthetic_tokens > config.seq_len,
            f"config.data.synthetic_vocab_size must be >= 1 and data.synthetic_tokens > seq_len={config.seq_len} "
            f"(got {data.synthetic_vocab_size}, {data.synthetic_tokens}).")
  try:
    CleanConfig.from_mapping(config.clean.to_dict())
  except ValueError as error:
    raise ConfigError(f"config.clean: {error}") from error
  require(isinstance(config.eval.stride, int) and 0 <= config.eval.stride <= config.seq_len,
          f"config.eval.stride={config.eval.stride!r} must be in [0, seq_len={config.seq_len}] (0: non-overlapping "
          "windows; S: a sliding window scoring each token with >= seq_len - S tokens of context).")
  require(isinstance(config.eval.folds, int) and config.eval.folds >= 2,
          f"config.eval.folds={config.eval.folds!r} must be an integer >= 2 (the usual value is 5 or 10).")


CONFIG = ConfigPart("lm.data", {**DATA_FIELDS, **CLEAN_FIELDS, **EVAL_FIELDS}, validate)
