"""The run's data: its splits opened as data.source says, cleaned when asked.

`open_train_split` / `open_eval_split` read `config.data` (a TFDS dataset,
local files, or synthetic ids; labels too for tasks that read them);
`cleaned_documents` cleans a split first (`config.clean`).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from absl import logging

from lm.core.errors import DataError
from lm.data import clean as clean_lib
from lm.data import corpus, sources, synthetic
from lm.experiment.registry import task_class


def _cache_dir(config: ml_collections.ConfigDict) -> str | None:
  return config.data.cache_dir or None


def _label_field(config: ml_collections.ConfigDict) -> str | None:
  """Tasks that read labels (a classifier) read each record's label too."""
  return config.data.label_field if task_class(config.head).reads_labels else None


def _synthetic_split(config: ml_collections.ConfigDict, split: str) -> synthetic.SyntheticSource:
  return synthetic.SyntheticSource(split, vocab_size=config.data.synthetic_vocab_size,
                                   num_tokens=config.data.synthetic_tokens, seed=config.seed)


def _split(config: ml_collections.ConfigDict, source: str, split: str) -> corpus.Split:
  _, _, named = sources.parse_source(source)
  return corpus.Split(source, named or split, text_field=config.data.text_field, cache_dir=_cache_dir(config),
                      label_field=_label_field(config))


def open_train_split(config: ml_collections.ConfigDict) -> Any:
  """The training split: a `lm.data.corpus.Split` (read lazily: a token cache is prepared from it, random access
  opens it), a `corpus.Mixture` of them (data.mixture), or synthetic ids."""
  if config.data.source == synthetic.SOURCE:
    return _synthetic_split(config, config.data.train_split)
  if config.data.mixture:
    entries = corpus.parse_mixture(config.data.mixture)
    names = corpus.mixture_names([source for source, _ in entries])
    return corpus.Mixture(tuple((name, _split(config, source, config.data.train_split), weight)
                                for name, (source, weight) in zip(names, entries)))
  return _split(config, config.data.source, config.data.train_split)


def open_eval_split(config: ml_collections.ConfigDict, split: str | None = None) -> Any:
  """The eval split (`split`, default data.eval_split) of data.source; of each mixture source that has it."""
  split = split or config.data.eval_split
  if config.data.source == synthetic.SOURCE:
    return _synthetic_split(config, split)
  if config.data.mixture:
    entries = corpus.parse_mixture(config.data.mixture)
    parts = []
    for name, (source, weight) in zip(corpus.mixture_names([source for source, _ in entries]), entries):
      part = corpus.Split(source, split, text_field=config.data.text_field, cache_dir=_cache_dir(config))
      try:
        part.files() if part.files() is not None else part.open()
      except DataError as error:
        logging.warning("Mixture source %s has no eval split %r: it is not evaluated (%s).", name, split, error)
        continue
      parts.append((name, part, weight))
    if not parts:
      raise DataError(f"No source of config.data.mixture has the eval split {split!r}. Fix: set data.eval_split to "
                      "a split they have (e.g. validation), or give the sources validation files.")
    return corpus.Mixture(tuple(parts))
  return corpus.Split(config.data.source, split, text_field=config.data.text_field, cache_dir=_cache_dir(config),
                      label_field=_label_field(config))


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
    raise DataError(f"Cleaning dropped every document of {source.name} ({dict(dropped)}); loosen config.clean "
                    "(min_chars, near_dup_threshold) or set data.clean_train=False.")
  return _CleanedSplit(kept, source.name)
