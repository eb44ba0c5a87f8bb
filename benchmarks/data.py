r"""Data at scale: preparing token caches, starting a run on one, and the loader's throughput.

  python benchmarks/data.py [--sizes_mb 250 1000] [--workdir /tmp/lm-bench-data] [--skip_sentencepiece]
  make bench-data

The corpora are generated here from ../shared's Tiny Shakespeare (its
paragraphs reshuffled with a fixed seed until the file has the size asked
for), as a folder with train.txt and a 1 MB validation.txt; nothing large is
committed. For each size it measures:

  * preparation: `lm.data.prepare.ensure_prepared` into a fresh cache with 1 and
    with 2 Beam DirectRunner workers, for the byte tokenizer and a SentencePiece
    tokenizer (8,000 pieces trained on a 10 MB sample): --repeats runs of each,
    alternating, the corpus read into the page cache before each, the caches
    written to a tmpfs (--prepare_dir) so the figure is the workers' and not the
    disk's (the disk's own write rate is measured and printed beside it), as much
    tmpfs memory as a cache holds touched before each (see touch_memory): the
    median seconds, every run, the speed-up and MB/s per worker;
  * start-up: `python -m lm.main` of experiments/shakespeare_byte.py on the
    prepared corpus for 1 step (tokenizer, cache, model, compile, the step, one
    evaluation, a checkpoint), in a fresh process: wall seconds and peak
    resident memory (the process's own, from GNU time);
  * the loader alone: windows (seq_len 1024, stride 1) -> shuffled global
    batches of 32 (Grain) -> global jax.Arrays, with and without document
    masking, the cache's files read into the page cache first: tokens per
    second over 200 batches.

Prints a Markdown table per measurement and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def make_corpus(folder: Path, size_mb: int, seed: int = 0) -> Path:
  """train.txt of about `size_mb` MB of reshuffled Tiny Shakespeare paragraphs, and a 1 MB validation.txt."""
  folder.mkdir(parents=True, exist_ok=True)
  train = folder / "train.txt"
  target = size_mb * 1_000_000
  if train.exists() and abs(train.stat().st_size - target) < 1_000_000:
    return folder
  paragraphs = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
  rng = random.Random(seed)
  written = 0
  with open(train, "w") as out:
    while written < target:
      rng.shuffle(paragraphs)
      block = "\n\n".join(paragraphs) + "\n\n"
      out.write(block)
      written += len(block)
  rng.shuffle(paragraphs)
  (folder / "validation.txt").write_text("\n\n".join(paragraphs)[:1_000_000])
  return folder


def peak_rss_mb(command: list[str], env: dict) -> tuple[float, float, int, str]:
  """Runs `command` under GNU time; returns (wall seconds, its peak resident memory in MB, exit code, output).

  GNU time (a small program) forks the command, so its peak is the command's own: a child forked straight
  from this process would start with this process's resident pages counted in its peak.
  """
  started = time.perf_counter()
  result = subprocess.run(["/usr/bin/time", "-f", "lm-bench-maxrss-kb %M", *command], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wall = time.perf_counter() - started
  line = next(line for line in result.stdout.splitlines() if line.startswith("lm-bench-maxrss-kb"))
  return wall, int(line.split()[1]) / 1024, result.returncode, result.stdout[-3000:]


def warm(path: Path) -> None:
  """Reads `path` once, so every preparation reads its corpus from the page cache (none from the disk)."""
  with open(path, "rb") as file:
    while file.read(64 << 20):
      pass


def touch_memory(folder: Path, megabytes: int) -> None:
  """Writes and deletes `megabytes` of zeros in `folder` (the tmpfs the caches go to). On a VM the first touch
  of memory the host has not backed yet is slow and erratic (here the first 2 GB `dd` into /dev/shm took
  8.6 s, the next 1.3 s), which would land on whichever preparation came first; touching as much as a cache
  holds before each preparation gives every run the same, already backed, memory."""
  folder.mkdir(parents=True, exist_ok=True)
  path, block = folder / "memory-touch", np.zeros(1 << 20, np.uint8).tobytes()
  with open(path, "wb") as file:
    for _ in range(megabytes):
      file.write(block)
  path.unlink()


def disk_write_mb_s(folder: Path, megabytes: int = 1000) -> float:
  """This disk's sustained write rate (MB/s, `megabytes` written and fsync'ed): the floor of a preparation
  whose cache is on it."""
  folder.mkdir(parents=True, exist_ok=True)
  path, block = folder / "disk-write-probe", np.zeros(1 << 20, np.uint8).tobytes()
  started = time.perf_counter()
  with open(path, "wb") as file:
    for _ in range(megabytes):
      file.write(block)
    file.flush()
    os.fsync(file.fileno())
  seconds = time.perf_counter() - started
  path.unlink()
  return megabytes * (1 << 20) / 1e6 / seconds


def measure_preparation(folder: Path, tokenizer, label: str, cache_root: Path, repeats: int) -> list[dict]:
  """Each worker count `repeats` times, alternating (1, 2, 1, 2, ...), into a fresh cache under `cache_root`;
  one row per worker count with the median and every run's seconds."""
  from lm.data import corpus, prepare  # pylint: disable=g-import-not-at-top
  split = corpus.Split(str(folder), "train")
  size_mb = (folder / "train.txt").stat().st_size / 1e6
  seconds: dict[int, list[float]] = {1: [], 2: []}
  manifest = {}
  for _ in range(repeats):
    for workers in (1, 2):
      cache = cache_root / f"{label}-{workers}"
      shutil.rmtree(cache, ignore_errors=True)
      warm(folder / "train.txt")
      touch_memory(cache_root, int(size_mb * 2.5))  # a byte cache holds 2 bytes per byte of text, plus slack
      options = prepare.PrepareOptions(cache_dir=str(cache), workers=workers)
      started = time.perf_counter()
      directory = prepare.ensure_prepared(split, tokenizer, options)
      seconds[workers].append(time.perf_counter() - started)
      manifest = json.loads((Path(directory) / "manifest.json").read_text())
      shutil.rmtree(cache, ignore_errors=True)
  rows = []
  for workers, samples in seconds.items():
    median = float(np.median(samples))
    rows.append({"corpus_mb": round(size_mb), "tokenizer": label, "workers": workers, "seconds": round(median, 1),
                 "runs": " / ".join(f"{sample:.1f}" for sample in samples),
                 "speedup": round(float(np.median(seconds[1])) / median, 2),
                 "mb_per_s_per_worker": round(size_mb / median / workers, 2), "tokens": manifest["num_tokens"],
                 "shards": len(manifest["shards"])})
  return rows


def measure_startup(folder: Path, cache_root: Path, runs_root: Path) -> dict:
  """A 1-step run on the prepared corpus: prepared first (not timed), then timed in a fresh process."""
  env = dict(os.environ, LM_DATA_CACHE=str(cache_root / "startup"), JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "lm.main", "--config", "experiments/shakespeare_byte.py",
          f"--config.data.source={folder}"]
  workdir = runs_root / f"prepare-{folder.name}"
  shutil.rmtree(workdir, ignore_errors=True)
  seconds, _, code, output = peak_rss_mb(base + ["--workdir", str(workdir), "--mode", "prepare"], env)
  assert code == 0, output
  workdir = runs_root / f"startup-{folder.name}"
  shutil.rmtree(workdir, ignore_errors=True)
  wall, rss, code, output = peak_rss_mb(base + ["--workdir", str(workdir), "--config.steps=1",
                                                "--config.eval_batches=4", "--config.async_checkpointing=False"], env)
  assert code == 0, output
  return {"corpus_mb": round((folder / "train.txt").stat().st_size / 1e6), "startup_s": round(wall, 2),
          "peak_rss_mb": round(rss), "prepare_s": round(seconds, 1)}


def measure_loader(folder: Path, cache_root: Path, batches: int = 200, seq_len: int = 1024, batch_size: int = 32
                   ) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from lm.data import corpus, pipeline, prepare, tokenizers  # pylint: disable=g-import-not-at-top
  options = prepare.PrepareOptions(cache_dir=str(cache_root / "startup"))
  split, tokenizer = corpus.Split(str(folder), "train"), tokenizers.ByteTokenizer()
  stream = prepare.token_stream(split, tokenizer, options)
  # The loader's own speed, not the disk's: the cache's ids are read into the page cache first, as a training
  # run's are after its first pass (a cold 2 GB cache faulted in from this VM's disk measured 2.0 M tokens/s).
  for path in sorted(Path(prepare.cache_directory(split, tokenizer, options)).glob("*.tokens")):
    warm(path)
  sharding = NamedSharding(Mesh(jax.devices()[:1], ("data",)), PartitionSpec("data"))
  rows = []
  for document_mask in (False, True):
    windows = pipeline.Windows(stream, seq_len, 1, document_mask=document_mask)
    dataset = pipeline.train_dataset(windows, seed=0, global_batch_size=batch_size)
    iterator = pipeline.BatchIterator(dataset, sharding, global_batch_size=batch_size)
    for _ in range(10):
      next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
      batch = next(iterator)
    jax.block_until_ready(batch)
    seconds = time.perf_counter() - started
    rows.append({"corpus_mb": round((folder / "train.txt").stat().st_size / 1e6), "document_mask": document_mask,
                 "tokens_per_s": round(batches * batch_size * seq_len / seconds),
                 "keys": sorted(batch)})
  return rows


def table(rows: list[dict], columns: list[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(f"{row[c]:,}" if isinstance(row[c], int) and not isinstance(row[c], bool) else
                              str(row[c]) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes_mb", type=int, nargs="+", default=[250, 1000])
  parser.add_argument("--workdir", default="/tmp/lm-bench-data")
  parser.add_argument("--skip_sentencepiece", action="store_true")
  parser.add_argument("--repeats", type=int, default=3, help="preparations per worker count (median reported)")
  parser.add_argument("--prepare_dir", default="/dev/shm/lm-bench-data" if os.path.isdir("/dev/shm") else "",
                      help="where the timed preparations write their caches (default: a tmpfs, so the figures are "
                           "the workers' and not this disk's; '' = under --workdir)")
  args = parser.parse_args()
  os.environ.setdefault("TFDS_DATA_DIR", str(SHARED / "tfds"))
  from lm.data import corpus, tokenizers  # pylint: disable=g-import-not-at-top

  root = Path(args.workdir)
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
             platform.processor())
  print(f"machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}")
  folders = [make_corpus(root / f"corpus-{size}mb", size) for size in args.sizes_mb]
  preparation, loader = [], []
  sentencepiece = None
  if not args.skip_sentencepiece:
    sample = corpus.Split(str(folders[0]), "train").sample(10_000_000)
    sentencepiece = tokenizers.SentencePieceTokenizer.train(sample, vocab_size=8000)
  # Start-ups first, in fresh processes, while this one is still small.
  startup = [measure_startup(folder, root / "caches", root / "runs") for folder in folders]
  disk = disk_write_mb_s(root)
  prepared_in = Path(args.prepare_dir) if args.prepare_dir else root / "caches"
  for folder in folders:
    preparation += measure_preparation(folder, tokenizers.ByteTokenizer(), "byte", prepared_in, args.repeats)
    if sentencepiece is not None:
      preparation += measure_preparation(folder, sentencepiece, "sentencepiece-8k", prepared_in, args.repeats)
    loader += measure_loader(folder, root / "caches")
  shutil.rmtree(prepared_in, ignore_errors=True)
  print(f"\nPreparation (Apache Beam DirectRunner), caches written to {prepared_in}; the disk under "
        f"{root} writes {disk:.0f} MB/s (fsync'ed):\n" + table(
      preparation, ["corpus_mb", "tokenizer", "workers", "seconds", "runs", "speedup", "mb_per_s_per_worker",
                    "tokens", "shards"]))
  print("\nStart-up of a 1-step run on the prepared corpus (experiments/shakespeare_byte.py):\n" + table(
      startup, ["corpus_mb", "startup_s", "peak_rss_mb"]))
  print("\nLoader alone (seq_len 1024, batch 32, stride 1):\n" + table(
      loader, ["corpus_mb", "document_mask", "tokens_per_s"]))
  print(json.dumps({"cpu": cpu, "disk_write_mb_s": round(disk), "prepared_in": str(prepared_in),
                    "preparation": preparation, "startup": startup, "loader": loader}))


if __name__ == "__main__":
  main()
