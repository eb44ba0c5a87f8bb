"""`--mode prepare`: tokenize the run's corpora once into token caches, before (or instead of) a training run.

    python -m lm.main --config experiments/NAME.py --workdir runs/NAME --mode prepare

resolves the run's tokenizer (building a character or SentencePiece one from
the training split and saving it in the workdir, so the training run encodes
with the same ids), then prepares the token cache of the training and eval
splits of data.source, or of every source of data.mixture, with Apache Beam
(`lm.data.prepare`). A cache that is complete and current is reused; one the
corpus changed under is prepared again. A training run does the same for any
cache it lacks, so this mode is for preparing ahead: on a large machine or a
Beam cluster (data.beam_options), into a data.cache_dir the training hosts share.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from lm.core.errors import ConfigError
from lm.data import corpus, prepare, synthetic, token_cache
from lm.experiment import TOKENIZER_DIR, open_eval_split, open_train_split, resolve_tokenizer
from lm.experiment.config import validate


def _splits(config: ml_collections.ConfigDict) -> list[corpus.Split]:
  found = []
  for opened in (open_train_split(config), open_eval_split(config)):
    parts = [split for _, split, _ in opened.parts] if isinstance(opened, corpus.Mixture) else [opened]
    found.extend(split for split in parts if split.name not in {other.name for other in found})
  return found


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Prepares (or finds current) the token cache of each split the run reads; one figure row per split."""
  validate(config, "prepare")
  if config.data.source == synthetic.SOURCE and not config.data.mixture:
    raise ConfigError("config.data.source='synthetic' is generated on the fly: there is nothing to prepare.")
  if config.data.format != "windows":
    raise ConfigError(f"--mode prepare writes token caches of windows data; data.format={config.data.format!r} "
                      "reads its records directly (nothing to prepare).")
  tokenizer, is_new = resolve_tokenizer(config, workdir)
  if is_new and jax.process_index() == 0:
    tokenizer.save(os.path.join(workdir, TOKENIZER_DIR))  # the training run then encodes with these ids
  options = prepare.PrepareOptions.from_config(config.data)
  rows = []
  for split in _splits(config):
    directory = prepare.cache_directory(split, tokenizer, options)
    before = token_cache.read_manifest(directory)
    prepare.ensure_prepared(split, tokenizer, options)
    manifest = token_cache.read_manifest(directory)
    rows.append({"split": split.name, "cache": str(directory), "tokens": manifest["num_tokens"],
                 "documents": manifest["num_documents"], "shards": len(manifest["shards"]),
                 "prepared_in_s": manifest["prepared_by"].get("seconds"),
                 "reused": before is not None and before.get("created") == manifest.get("created")})
  return rows


def run(config: ml_collections.ConfigDict, workdir: str, report: Any = print) -> int:
  """The CLI's --mode prepare: one JSON line per split."""
  for row in prepare_data(config, workdir):
    report(json.dumps(row))
  return 0
