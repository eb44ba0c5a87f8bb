r"""The server under load: streaming clients on 127.0.0.1, against --mode bench's cached batch-1 decoding.

  python benchmarks/serve.py [--clients 1 8 32] [--seconds 20] [--max_tokens 56] [--workdir /tmp/lm-bench-serve]
  make bench-serve

The model is the baseline's (experiments/shakespeare_char.py), trained here for
a few steps (the weights do not change the speed). In this process, first the
peer: `lm.inference.sample.decode_benchmark` at batch 1 (what `--mode bench`
reports as decode/b1/tokens_per_sec: one jitted generate of max_tokens
tokens after a 6-token prompt, fastest of 3). Then `--mode serve` in a process
of its own (serve.max_batch 32), and for each client count C: C asyncio
clients (httpx), each sending streaming requests back to back for --seconds
(prompt "ROMEO:", max_tokens, temperature 0.8; the character model has no end
of document, so every request generates max_tokens tokens). Reported per C:
generated tokens/s (all clients), p50 / p99 latency (request to [DONE]) and
time to first token, failed requests. Last, a hot swap under C = max(clients):
a training run writes a newer checkpoint into the served workdir while the
clients stream; every request must succeed and the server must swap.

The clients run in this process and the server in its own, on the same cores:
on a 2-core machine the clients' own CPU time is part of the figures.
Prints Markdown tables and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "experiments" / "shakespeare_char.py")
PROMPT = "ROMEO:"


def train(workdir: Path, steps: int) -> None:
  subprocess.run([sys.executable, "-m", "lm.main", "--config", CONFIG, "--workdir", str(workdir),
                  f"--config.steps={steps}", "--config.checkpoint_every=10", f"--config.eval_every={steps}",
                  "--config.eval_batches=2", "--config.log_every=10"], cwd=ROOT, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def peer_tokens_per_s(workdir: Path, max_tokens: int, batch_size: int = 1) -> float:
  """--mode bench's cached decode of max_tokens tokens after a prompt as long as PROMPT, all rows at once."""
  from lm.config import load_config  # pylint: disable=g-import-not-at-top
  from lm.experiment import load_trained  # pylint: disable=g-import-not-at-top
  from lm.inference import sample as sample_lib  # pylint: disable=g-import-not-at-top
  experiment, params, _ = load_trained(load_config(CONFIG), str(workdir), "bench")
  with experiment.steps.context():
    result = sample_lib.decode_benchmark(experiment.task.model, params, batch_size=batch_size, prompt_len=len(PROMPT),
                                         new_tokens=max_tokens, repeats=3, uncached=False)
  return result["cached_tokens_per_s"]


def start_server(workdir: Path, block: int) -> tuple[subprocess.Popen, str]:
  process = subprocess.Popen(
      [sys.executable, "-m", "lm.main", "--config", CONFIG, "--workdir", str(workdir), "--mode", "serve",
       "--config.serve.port=0", "--config.serve.max_batch=32", "--config.serve.watch_interval=0.5",
       "--config.serve.max_queue=1024", f"--config.serve.decode_block={block}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in process.stdout:
    found = re.search(r" on (http://127\.0\.0\.1:\d+) ", line)
    if found:
      return process, found.group(1)
  raise SystemExit(f"the server did not start (exit {process.wait()})")


async def _client(http, url: str, max_tokens: int, until: float, records: list, failures: list) -> None:
  body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
  while time.perf_counter() < until:
    sent = time.perf_counter()
    first, reasons, version = None, [], None
    try:
      async with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
          failures.append(f"HTTP {response.status_code}")
          continue
        async for line in response.aiter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          event = json.loads(line[6:])
          if "error" in event:
            failures.append(event["error"]["message"])
            break
          version = event.get("system_fingerprint", version)
          for choice in event["choices"]:
            if choice["text"] and first is None:
              first = time.perf_counter()
            if choice["finish_reason"]:
              reasons.append(choice["finish_reason"])
    except Exception as error:  # pylint: disable=broad-except  (counted, not raised: the figure is the count)
      failures.append(repr(error))
      continue
    if reasons != ["length"]:
      failures.append(f"finished {reasons}")
      continue
    records.append({"sent": sent, "ttft": first - sent, "latency": time.perf_counter() - sent,
                    "tokens": max_tokens, "version": version})


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> tuple[list, list, float]:
  import httpx  # pylint: disable=g-import-not-at-top
  records, failures = [], []
  limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
  async with httpx.AsyncClient(timeout=300, limits=limits) as http:
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_client(http, url, max_tokens, until, records, failures) for _ in range(clients)))
    wall = time.perf_counter() - started
  return records, failures, wall


def summary(clients: int, records: list, failures: list, wall: float) -> dict:
  latency = np.array([record["latency"] for record in records])
  ttft = np.array([record["ttft"] for record in records])
  return {"clients": clients, "requests": len(records), "failed": len(failures),
          "tokens_per_s": round(sum(record["tokens"] for record in records) / wall, 1),
          "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
          "latency_p99_s": round(float(np.percentile(latency, 99)), 3),
          "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4), "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4)}


def table(rows: list[dict], columns: list[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(row.get(column, "")) for column in columns) + " |" for row in rows]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--seconds", type=float, default=20.0, help="per client count")
  parser.add_argument("--max_tokens", type=int, default=56, help="per request (the baseline's context is 64)")
  parser.add_argument("--workdir", default="/tmp/lm-bench-serve")
  parser.add_argument("--decode_block", type=int, default=32, help="serve.decode_block")
  args = parser.parse_args()
  os.environ.setdefault("TFDS_DATA_DIR", str(ROOT.parent / "shared" / "tfds"))
  workdir = Path(args.workdir) / "shakespeare_char"
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
             platform.processor())
  print(f"machine: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}")
  if not (workdir / "checkpoints").is_dir():
    train(workdir, 10)
  peers = {clients: peer_tokens_per_s(workdir, args.max_tokens, clients) for clients in args.clients}
  peer = peers[1] if 1 in peers else peer_tokens_per_s(workdir, args.max_tokens, 1)
  print(f"peer: --mode bench cached decode of {args.max_tokens} tokens, tokens/s by batch size: " +
        ", ".join(f"b{batch} {value:.0f}" for batch, value in peers.items()))
  server, url = start_server(workdir, args.decode_block)
  rows = []
  try:
    asyncio.run(load(url, 1, 3.0, args.max_tokens))  # a warm connection and first-use paths, not counted
    for clients in args.clients:
      rows.append(summary(clients, *asyncio.run(load(url, clients, args.seconds, args.max_tokens))))
    # The hot swap: a newer checkpoint appears while the most clients stream.
    clients = max(args.clients)
    before = int(json.loads(subprocess.run(["curl", "-s", url + "/v1/models"], capture_output=True,
                                           text=True).stdout)["data"][0]["version"]["step"])
    trainer = subprocess.Popen([sys.executable, "-c", f"import sys, time; time.sleep(2); "
                                f"sys.path.insert(0, {str(ROOT)!r}); import benchmarks.serve as s; "
                                f"from pathlib import Path; s.train(Path({str(workdir)!r}), {before + 10})"],
                               cwd=ROOT)
    records, failures, wall = asyncio.run(load(url, clients, max(args.seconds, 40.0), args.max_tokens))
    trainer.wait()
    swap = summary(clients, records, failures, wall)
    swap["versions"] = sorted({record["version"] for record in records})
    metrics = subprocess.run(["curl", "-s", url + "/metrics"], capture_output=True, text=True).stdout
    swap["swaps"] = int(float(re.search(r"^lm_model_swaps_total (\S+)", metrics, re.M).group(1)))
  finally:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=120)
  one = next((row["tokens_per_s"] for row in rows if row["clients"] == 1), None)
  for row in rows:
    row["peer_same_batch"] = round(peers[row["clients"]], 1)
    row["vs_peer"] = round(row["tokens_per_s"] / peer, 2)
    row["vs_one_client"] = round(row["tokens_per_s"] / one, 2) if one else ""
  print("\nStreaming clients on 127.0.0.1, serve.max_batch 32, "
        f"max_tokens {args.max_tokens}, {args.seconds:g} s each:\n" + table(
            rows, ["clients", "requests", "failed", "tokens_per_s", "vs_peer", "vs_one_client", "peer_same_batch",
                   "latency_p50_s",
                   "latency_p99_s", "ttft_p50_s", "ttft_p99_s"]))
  print(f"\nHot swap under {clients} clients (a newer checkpoint written mid-run):\n" + table(
      [swap], ["clients", "requests", "failed", "swaps", "versions", "tokens_per_s", "latency_p99_s"]))
  print(json.dumps({"cpu": cpu, "decode_block": args.decode_block, "peer_tokens_per_s": round(peer, 1),
                    "peers": {str(k): round(v, 1) for k, v in peers.items()}, "rows": rows, "swap": swap}))


if __name__ == "__main__":
  main()
