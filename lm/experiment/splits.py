"""The run's data: its splits opened as data.source says, cleaned when asked.

`open_train_split` / `open_eval_split` read `config.data` (a TFDS dataset,
local files, or synthetic ids; labels too for tasks that read them);
`cleaned_documents` cleans a split first (`config.clean`).
"""

from __future__ import annotations

import ml_collections
from absl import logging

from lm.core.errors import DataError
from lm.data import clean as clean_lib
from lm.data import sources, synthetic
from lm.experiment.registry import task_class


def _cache_dir(config: ml_collections.ConfigDict) -> str | None:
  return config.data.cache_dir or None


def _label_field(config: ml_collections.ConfigDict) -> str | None:
  """Tasks that read labels (a classifier) read each record's label too."""
  return config.data.label_field if task_class(config.head).reads_labels else None


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
