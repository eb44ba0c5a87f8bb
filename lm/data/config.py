"""The data part of the run config: where text comes from, how it is tokenized and cut, cleaned, and scored.

`data.*` (training and its evaluation), `clean.*` (`lm.data.clean`: every
online chunk, and the training split with `data.clean_train`) and `eval.*`
(what `--mode eval` and `--mode crossval` score).
"""

from __future__ import annotations

import ml_collections

from lm.core.configs import ConfigPart, require
from lm.core.errors import ConfigError, DataError
from lm.data import corpus
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
    # Where local corpora are prepared as TFDS datasets and token caches are written (lm.data.token_cache);
    # empty: $LM_DATA_CACHE, else ~/.cache/lm/tfds. A gs:// folder works for token caches (etils.epath).
    "data.cache_dir": "",
    "data.train_stride": 1,  # training windows start every `train_stride` tokens
    # Weighted sources, e.g. (("tfds:tiny_shakespeare", 0.7), ("path/to/new/", 0.3)): each its own token cache,
    # batches drawn in these proportions by (seed, step); empty: data.source alone.
    "data.mixture": (),
    # True: within a window, tokens attend only to earlier tokens of their own document, positions restart at
    # each document, and no loss is taken on a document's first token (predicted from the previous document).
    "data.document_mask": False,
    # SentencePiece is trained on a deterministic sample of this many bytes of the training split (evenly
    # spaced documents; the whole split when it is smaller).
    "data.tokenizer_sample_bytes": 10_000_000,
    # Token caches are prepared by Apache Beam (--mode prepare, or the first run that needs one):
    "data.prepare_workers": 0,  # local DirectRunner worker processes; 0: one per CPU core
    "data.shard_mb": 64,  # MB of text per shard (a unit of work and one .tokens file)
    "data.beam_options": "",  # extra Beam pipeline options, e.g. "--runner=DataflowRunner --project=P ..."
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
  if data.mixture:
    try:
      corpus.parse_mixture(data.mixture)
    except DataError as error:
      raise ConfigError(str(error)) from None
    require(data.format == "windows" and data.source != "synthetic",
            "config.data.mixture draws token windows from several corpora: it needs data.format='windows' and "
            f"real sources (got data.format={data.format!r}, data.source={data.source!r}).")
    require(not data.clean_train, "config.data.clean_train cleans one training split; with config.data.mixture "
            "clean each source beforehand, or set data.clean_train=False.")
    require(mode in ("train", "prepare", "bench", "sample", "export", "serve"),
            f"--mode {mode} reads one source, and config.data.mixture names several: set data.mixture=() and "
            "data.source (or eval.source for --mode eval) to the source to use; a mixture run logs each "
            "source's eval/<source>/loss while it trains.")
  require(not data.document_mask or data.format == "windows",
          "config.data.document_mask keeps the documents of a window apart; a sentence (data.format='sentences') "
          "is one document already. Set data.document_mask=False.")
  require(isinstance(data.prepare_workers, int) and data.prepare_workers >= 0,
          f"config.data.prepare_workers={data.prepare_workers!r} must be an integer >= 0 (0: one per CPU core).")
  require(data.shard_mb > 0, f"config.data.shard_mb={data.shard_mb!r} must be > 0 (MB of text per shard).")
  require(isinstance(data.tokenizer_sample_bytes, int) and data.tokenizer_sample_bytes > 0,
          f"config.data.tokenizer_sample_bytes={data.tokenizer_sample_bytes!r} must be a positive integer.")
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
