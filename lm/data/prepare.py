"""Preparing token caches with Apache Beam, once per (split, tokenizer); and a split's token stream.

    stream = token_stream(split, tokenizer, PrepareOptions.from_config(config.data))

opens the split's cache, preparing it first if it is missing or its corpus
changed. Preparation is one Beam pipeline, the engine TFDS and ArrayRecord use
for large datasets:

    units of work (lm.data.corpus.Split.units: byte ranges / document ranges, cut the same way every time)
      -> Reshuffle (spread over the workers)
      -> encode each unit's documents with the tokenizer (loaded once per worker) -> its shard's files
      -> gather the shards' counts -> manifest.json, written last, atomically

On this machine it runs on Beam's DirectRunner with one worker process per
core (`data.prepare_workers`); `data.beam_options` passes any other runner's
options (Dataflow, Flink, Spark) to the same pipeline. Shard i always holds
unit i's documents, so 1 and N workers write the same tokens. A unit that
fails (a malformed file, a full disk) is recorded instead of crashing a
worker, so the pipeline ends, writes no manifest, and the caller gets one
`error:` line naming the file (or the cache folder) and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import time
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from etils import epath

from lm.core import files
from lm.core.errors import DataError
from lm.data import corpus, sources, token_cache
from lm.data import tokenizers as tokenizers_lib

try:  # POSIX only: without it, two processes may prepare the same cache at once (the result is the same).
  import fcntl
except ImportError:  # pragma: no cover
  fcntl = None

_CACHE_ENV = "LM_DATA_CACHE"
_DEFAULT_CACHE_DIR = "~/.cache/lm/tfds"
_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """Where caches live and how they are prepared (the data.* fields of the same names)."""

  cache_dir: str = ""
  workers: int = 0  # DirectRunner worker processes; 0: one per CPU core
  shard_mb: float = 64
  beam_options: str = ""

  @classmethod
  def from_config(cls, data: Any) -> PrepareOptions:
    return cls(cache_dir=data.cache_dir, workers=data.prepare_workers, shard_mb=data.shard_mb,
               beam_options=data.beam_options)

  def local(self) -> PrepareOptions:
    """The same, on this machine's DirectRunner whatever data.beam_options says (what a training run uses
    to prepare a cache it lacks; a cluster runs through --mode prepare)."""
    return dataclasses.replace(self, beam_options="")

  @property
  def root(self) -> epath.Path:
    """The folder holding every token cache: <data.cache_dir or $LM_DATA_CACHE or ~/.cache/lm/tfds>/tokens."""
    base = self.cache_dir or os.environ.get(_CACHE_ENV) or _DEFAULT_CACHE_DIR
    return epath.Path(os.path.expanduser(base) if "://" not in base else base) / "tokens"


def separator_of(tokenizer: tokenizers_lib.Tokenizer) -> tuple[np.ndarray, int, bool]:
  """(ids written after every document, their characters, whether the stream ends with them).

  The tokenizer's end-of-document id ends every document; a tokenizer without
  one (characters) separates documents by the encoded paragraph break, which
  the stream does not end with.
  """
  if tokenizer.eos_id is not None:
    return np.array([tokenizer.eos_id], np.int64), 0, True
  return (np.asarray(tokenizer.encode(sources.PARAGRAPH_SEPARATOR), np.int64), len(sources.PARAGRAPH_SEPARATOR),
          False)


def tokenize_documents(documents: Iterable[str], tokenizer: tokenizers_lib.Tokenizer, *, name: str
                       ) -> token_cache.TokenStream:
  """Documents tokenized in memory into one stream (online chunks, folds, cleaned splits: small ones)."""
  separator, separator_chars, ends_with_it = separator_of(tokenizer)
  tokens, starts, chars = token_cache.encode_documents(documents, tokenizer, separator, separator_chars, np.int32)
  if not len(starts):
    raise DataError(f"{name} has no documents; point data.source at a non-empty corpus.")
  trim = 0 if ends_with_it else len(separator)
  return token_cache.TokenStream.in_memory(tokens, starts, name=name,
                                           num_chars=chars - (0 if ends_with_it else separator_chars), trim=trim)


def token_stream(split: Any, tokenizer: tokenizers_lib.Tokenizer, options: PrepareOptions | None = None
                 ) -> token_cache.TokenStream:
  """The token stream of `split`: a `corpus.Split` through its token cache (prepared if it must be), any
  other documents (a list, a TextSource) tokenized in memory."""
  name = getattr(split, "name", "documents")
  if not isinstance(split, corpus.Split):
    return tokenize_documents(split, tokenizer, name=name)
  directory = ensure_prepared(split, tokenizer, options or PrepareOptions())
  return token_cache.open_cache(directory, name=name, tokenizer=tokenizers_lib.identity(tokenizer))


def cache_directory(split: corpus.Split, tokenizer: tokenizers_lib.Tokenizer, options: PrepareOptions
                    ) -> epath.Path:
  return options.root / token_cache.cache_key(split.identity(), tokenizers_lib.identity(tokenizer))


def ensure_prepared(split: corpus.Split, tokenizer: tokenizers_lib.Tokenizer, options: PrepareOptions
                    ) -> epath.Path:
  """The folder of `split`'s complete cache for `tokenizer`, prepared first when it is missing, incomplete
  (a preparation killed midway) or older than the corpus (its fingerprint differs)."""
  directory = cache_directory(split, tokenizer, options)
  identity = tokenizers_lib.identity(tokenizer)
  fingerprint = split.fingerprint()

  def usable() -> bool:
    manifest = token_cache.read_manifest(directory)
    if manifest is None:
      return False
    token_cache.check_manifest(directory, manifest, identity)
    if manifest.get("fingerprint") != fingerprint:
      _log.warning("%s changed after its token cache %s was prepared: preparing it again.", split.name, directory)
      return False
    return True

  if usable():
    return directory
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise DataError(f"Cannot create the token cache folder {directory} ({error.strerror or error}). Fix: set "
                    f"data.cache_dir (or ${_CACHE_ENV}) to a writable folder.") from None
  with _exclusive(directory):
    if usable():  # another process prepared it while this one waited
      return directory
    prepare(split, tokenizer, directory, fingerprint, options)
  return directory


@contextlib.contextmanager
def _exclusive(directory: epath.Path) -> Iterator[None]:
  """One preparation of a cache at a time among the processes of this machine (local folders)."""
  if fcntl is None or "://" in str(directory):
    yield
    return
  with open(os.path.join(os.fspath(directory), ".prepare.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _clear(directory: epath.Path) -> None:
  """Removes a previous or partial cache's files, the manifest first (so a crash here leaves no manifest)."""
  for name in (token_cache.MANIFEST, token_cache.FAILURES):
    path = directory / name
    if path.exists():
      path.unlink()
  for path in directory.glob("shard-*"):
    path.unlink()


def _disk_full_message(directory: Any, error: Any) -> str:
  return (f"The disk holding the token cache {directory} is full ({error}). Fix: free space there, or set "
          "data.cache_dir to a folder on a larger disk. Nothing was cached (no manifest); the next run prepares "
          "it again.")


class _EncodeUnits:
  """The pipeline's work: a unit's documents -> its shard's files -> (its counts) or (a failure message)."""

  def __init__(self, split: corpus.Split, tokenizer: tokenizers_lib.Tokenizer, directory: str, count: int,
               dtype: str):
    self.split, self.tokenizer, self.directory, self.count, self.dtype = split, tokenizer, directory, count, dtype

  def __call__(self, unit: corpus.Unit) -> Iterator[tuple[str, Any]]:
    separator, separator_chars, _ = separator_of(self.tokenizer)
    try:
      has_text = False

      def batches():
        nonlocal has_text
        for documents in self.split.read_batches(unit):
          has_text = has_text or any(document and not document.isspace() for document in documents)
          yield documents

      info = token_cache.write_shard(self.directory, unit.index, self.count, batches(), self.tokenizer,
                                     separator, separator_chars, np.dtype(self.dtype))
    except DataError as error:
      yield "failure", str(error)
      return
    except OSError as error:
      if not files.disk_full(error):
        raise
      yield "failure", _disk_full_message(self.directory, error)
      return
    yield "shard", (info, unit.describes, has_text)


class _Finish:
  """The last step: every shard's counts -> the manifest; or the failures, for the caller to report."""

  def __init__(self, directory: str, manifest_fields: Mapping[str, Any], count: int, started: float,
               check_files: bool):
    self.directory, self.fields, self.count = directory, dict(manifest_fields), count
    self.started, self.check_files = started, check_files

  def __call__(self, results: list[tuple[str, Any]]) -> None:
    failures = sorted({message for kind, message in results if kind == "failure"})
    shards = [info for kind, info in results if kind == "shard"]
    if not failures:
      texts: dict[str, bool] = {}
      for _, describes, has_text in shards:
        texts[describes] = texts.get(describes, False) or has_text
      failures = [f"{path} holds no text (it is empty or blank). Fix: add text to it or remove it."
                  for path, has_text in texts.items() if self.check_files and not has_text]
    if not failures and len(shards) != self.count:
      failures = [f"only {len(shards)} of {self.count} shards were written"]
    if not failures and not sum(info.documents for info, _, _ in shards):
      failures = [f"{self.fields['name']} has no documents; point data.source at a non-empty corpus."]
    directory = epath.Path(self.directory)
    if failures:
      (directory / token_cache.FAILURES).write_text(json.dumps(failures))
      return
    fields = dict(self.fields)
    fields.pop("name")
    fields["prepared_by"] = dict(fields["prepared_by"], seconds=round(time.time() - self.started, 3))
    manifest = token_cache.make_manifest(shards=[info for info, _, _ in shards], **fields)
    token_cache.write_manifest(directory, manifest)


def beam_arguments(options: PrepareOptions, units: int) -> list[str]:
  """Beam pipeline options: the DirectRunner with one worker process per core (in the calling process when one
  worker suffices), then data.beam_options, which may name another runner."""
  workers = options.workers or os.cpu_count() or 1
  workers = max(1, min(workers, units))
  local = (["--runner=DirectRunner", "--direct_running_mode=in_memory"] if workers == 1 else
           ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"])
  return local + shlex.split(options.beam_options)


def prepare(split: corpus.Split, tokenizer: tokenizers_lib.Tokenizer, directory: epath.Path, fingerprint: str,
            options: PrepareOptions) -> dict[str, Any]:
  """Runs the pipeline (module doc) into `directory` and returns the manifest; DataError on failure."""
  with _quiet_beam():  # its import warns of Google Cloud clients that local runs do not use
    import apache_beam as beam  # pylint: disable=g-import-not-at-top  (heavy; only preparation needs it)
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

  started = time.time()
  units = split.units(int(options.shard_mb * (1 << 20)))
  arguments = beam_arguments(options, len(units))
  _log.info("Preparing the token cache of %s in %s: %d shards, Beam %s.", split.name, directory, len(units),
            " ".join(arguments))
  _clear(directory)
  separator, separator_chars, ends_with_it = separator_of(tokenizer)
  fields = {
      "name": split.name,
      "source": split.identity(),
      "fingerprint": fingerprint,
      "tokenizer": tokenizers_lib.identity(tokenizer),
      "dtype": token_cache.dtype_for(tokenizer.vocab_size).str,
      "separator": separator.tolist(),
      "trim": 0 if ends_with_it else len(separator),
      "trim_chars": 0 if ends_with_it else separator_chars,
      "prepared_by": {"runner": " ".join(arguments), "units": len(units)},
  }
  encode = _EncodeUnits(split, tokenizer, str(directory), len(units), fields["dtype"])
  finish = _Finish(str(directory), fields, len(units), started, check_files=split.files() is not None)
  try:
    with _quiet_beam(), _stderr_to(directory / "prepare.log"), _batch_job(), \
         beam.Pipeline(options=PipelineOptions(arguments + _QUIET_WORKERS)) as pipeline:
      _ = (pipeline
           | "Units" >> beam.Create(units)
           | "Spread" >> beam.Reshuffle()
           | "Encode" >> beam.FlatMap(encode)
           | "Gather" >> beam.combiners.ToList()
           | "Manifest" >> beam.Map(finish))
  except Exception as error:  # pylint: disable=broad-except  (a runner's errors come wrapped in its own types)
    if files.disk_full(error):
      _clear_quietly(directory)
      raise DataError(_disk_full_message(directory, "No space left on device")) from None
    raise
  manifest = token_cache.read_manifest(directory)
  if manifest is None:
    failures_path = directory / token_cache.FAILURES
    failures = json.loads(failures_path.read_text()) if failures_path.exists() else ["no manifest was written"]
    _clear_quietly(directory)
    disk = any("is full" in failure for failure in failures)
    raise DataError(failures[0] if disk or len(failures) == 1 else
                    f"{failures[0]} ({len(failures) - 1} more problems in other shards)")
  _log.info("Prepared %s: %s tokens, %s documents in %d shards (%.1f s).", split.name,
            f"{manifest['num_tokens']:,}", f"{manifest['num_documents']:,}", len(manifest["shards"]),
            manifest["prepared_by"]["seconds"])
  return manifest


def _clear_quietly(directory: epath.Path) -> None:
  with contextlib.suppress(OSError):
    _clear(directory)


# Beam's own INFO lines (one per worker start and stop) say nothing a user needs.
_QUIET_WORKERS = ["--default_sdk_harness_log_level=ERROR"]


@contextlib.contextmanager
def _quiet_beam() -> Iterator[None]:
  loggers = [logging.getLogger(name) for name in ("apache_beam", "")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


@contextlib.contextmanager
def _batch_job() -> Iterator[None]:
  """Runs the pipeline as the batch job it is, also from a notebook.

  In an IPython kernel Beam turns every pipeline into an Interactive Beam one, whose bookkeeping imports
  `apache_beam.dataframe`, which fails with pandas 3 (`DataFrame.first` is gone). Preparation needs none of
  that, so Beam is told, for the pipeline's duration, that it is not in IPython.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  modules = [importlib.import_module(name) for name in (
      "apache_beam.utils.interactive_utils", "apache_beam.pipeline", "apache_beam.runners.direct.direct_runner")]
  saved = [module.is_in_ipython for module in modules]
  for module in modules:
    module.is_in_ipython = lambda: False
  try:
    yield
  finally:
    for module, original in zip(modules, saved):
      module.is_in_ipython = original


@contextlib.contextmanager
def _stderr_to(path: epath.Path) -> Iterator[None]:
  """Sends what Beam's local worker processes print at start-up (they inherit this process's stderr) to a log
  file in the cache folder; their errors still reach the caller as the pipeline's exception."""
  if "://" in str(path):
    yield
    return
  import sys  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.fspath(path), "ab") as log:
    os.dup2(log.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
