r"""Where a profiled step's device time goes: kernels summed by kind and by name, from a trace file.

  python benchmarks/profile_summary.py TRACE [--steps 3] [--top 15]

TRACE is a Chrome trace-event file (plain or .gz): the Perfetto trace `jax.profiler.trace(...,
create_perfetto_trace=True)` writes (`--config.bench.profile_dir=DIR` of `lm.main --mode bench`: the
newest DIR/plugins/profile/*/perfetto_trace.json.gz; give DIR and it is found), or torch.profiler's
(`benchmarks/torch_peer.py --profile DIR`: DIR/torch_trace.json.gz). Device kernels are the events on a
GPU stream (JAX: the "Stream ..." threads of a "/device:GPU:N" process) or of category kernel / gpu_memcpy /
gpu_memset (PyTorch). Each kernel's name puts it in one kind: matmul (cuBLAS / CUTLASS / XLA's Triton
GEMMs), attention (cuDNN / flash kernels), copy (memcpy, memset) or other (XLA's fusions, elementwise and
reductions, the optimizer). Times are per step (the trace's total / --steps); "busy" is the sum of kernel
times, which on one stream is the time the GPU computed, against the step time the benchmark printed.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Any, Iterable

KINDS = (
    ("attention", re.compile(r"flash|fmha|cudnn|sdpa|attention|_attn", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|cublas|nvjet|sm\d\d_.*(hmma|gmma|mma)|wgmma|triton_.*dot|__dot|matmul", re.I)),
    ("copy", re.compile(r"memcpy|memset", re.I)),
)


def kind_of(name: str) -> str:
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return "other"


def find_trace(path: str) -> str:
  """`path` itself, or the newest Perfetto trace under a jax profile folder."""
  if os.path.isfile(path):
    return path
  found = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
                 + glob.glob(os.path.join(path, "**", "torch_trace.json*"), recursive=True), key=os.path.getmtime)
  if not found:
    sys.exit(f"error: no trace file at {path}: give a perfetto_trace.json.gz or torch_trace.json.gz, or the "
             "folder --config.bench.profile_dir / torch_peer.py --profile wrote")
  return found[-1]


def load_events(path: str) -> list[dict[str, Any]]:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt") as f:
      data = json.load(f)
  except (OSError, ValueError) as error:
    sys.exit(f"error: {path} is not a readable Chrome trace ({error}); give the file the profiler wrote")
  return data["traceEvents"] if isinstance(data, dict) else data


def device_kernels(events: Iterable[dict[str, Any]]) -> list[tuple[str, float]]:
  """(name, duration in µs) of each device kernel."""
  events = list(events)
  processes = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  kernels = []
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    category = str(e.get("cat", "")).lower()
    on_gpu_stream = ("/device:GPU" in processes.get(e.get("pid"), "")
                     and threads.get((e.get("pid"), e.get("tid")), "").startswith("Stream"))
    if on_gpu_stream or category in ("kernel", "gpu_memcpy", "gpu_memset"):
      kernels.append((str(e.get("name", "")), float(e["dur"])))
  return kernels


def summarize(kernels: list[tuple[str, float]], steps: int, top: int) -> dict[str, Any]:
  by_kind: dict[str, float] = collections.defaultdict(float)
  by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for name, duration in kernels:
    by_kind[kind_of(name)] += duration
    by_name[name][0] += duration
    by_name[name][1] += 1
  busy = sum(by_kind.values())
  names = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
  return {
      "steps": steps,
      "kernels_per_step": len(kernels) / steps,
      "busy_ms_per_step": busy / steps / 1e3,
      "kinds_ms_per_step": {kind: value / steps / 1e3 for kind, value in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "top": [{"name": name, "kind": kind_of(name), "ms_per_step": total / steps / 1e3, "calls_per_step": count / steps}
              for name, (total, count) in names],
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("trace", help="a trace file, or the folder a profiler wrote")
  parser.add_argument("--steps", type=int, default=3, help="steps the trace holds (bench.profile_steps)")
  parser.add_argument("--top", type=int, default=15, help="kernels listed by name")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  path = find_trace(args.trace)
  kernels = device_kernels(load_events(path))
  if not kernels:
    events = load_events(path)
    names = sorted({str(e.get("args", {}).get("name", "")) for e in events if e.get("ph") == "M"})
    sys.exit(f"error: {path} holds no device kernels (a CPU run's trace has none): profile on a GPU. "
             f"Its processes and threads: {', '.join(names[:40])}")
  summary = {"trace": path, **summarize(kernels, args.steps, args.top)}
  print(f"{path}: {summary['kernels_per_step']:.0f} kernels, {summary['busy_ms_per_step']:.2f} ms busy per step")
  for kind, ms in summary["kinds_ms_per_step"].items():
    print(f"  {kind:<10} {ms:8.2f} ms  {ms / summary['busy_ms_per_step']:6.1%}")
  for row in summary["top"]:
    print(f"  {row['ms_per_step']:8.3f} ms {row['calls_per_step']:6.1f}x  {row['kind']:<9} {row['name'][:110]}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
