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

A CPU run's trace has no kernels; its ops are summed instead (`--cpu`, or by itself when a trace holds no
kernels): XLA:CPU's executed ops (the events naming an `hlo_op`, written when the process runs with
XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true) of one jitted module (`--module`; default the one with the
most time, the train step), or PyTorch's CPU operators (category cpu_op) by self time (an operator's time
less that of the operators it called, so nested calls count once). Their kinds: matmul (YNNPACK's fusions,
XLA's dots, aten::mm / addmm / bmm), attention (aten's fused scaled-dot-product kernels), reduce, layout
(copies and transposes) and elementwise (XLA's other fusions, the other aten operators). With `--hlo DIR`
(an HLO dump of the same program: XLA_FLAGS='--xla_dump_to=DIR --xla_dump_hlo_as_text'), XLA's ops are also
summed by the part of the Transformer their op_name metadata names (matmuls of the projections or of the
attention, the attention's softmax and transposes, GELU, LayerNorm, split reductions, the rest).
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
    ("other", re.compile("")),  # the rest
)


CPU_KINDS = (
    ("matmul", re.compile(r"^ynn_fusion|^dot\b|^dot\.|_dot_fusion|aten::(mm|addmm|bmm|baddbmm|matmul)$", re.I)),
    ("attention", re.compile(r"scaled_dot_product|flash_attention", re.I)),
    ("lm kernel", re.compile(r"^ffi_call", re.I)),  # lm's XLA:CPU kernels (lm/kernels), XLA FFI custom calls
    ("reduce", re.compile(r"reduce|aten::(sum|mean|max|amax|norm|linalg_vector_norm|_softmax|_log_softmax|"
                          r"native_layer_norm)", re.I)),
    ("layout", re.compile(r"^copy|transpose|aten::(copy_|clone|contiguous|cat|t|transpose|view|as_strided|"
                          r"_reshape_alias|expand|permute|reshape|empty|empty_strided|zeros|fill_|zero_)$", re.I)),
    ("elementwise", re.compile("")),  # the rest: XLA's other fusions, the other aten operators
)


def kind_of(name: str, kinds: tuple = KINDS) -> str:
  """The first kind whose pattern the name matches (each table ends with a catch-all)."""
  return next(kind for kind, pattern in kinds if pattern.search(name))


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


def cpu_ops(events: Iterable[dict[str, Any]], module: str | None = None) -> tuple[list[tuple[str, float]], str]:
  """(name, µs) of each CPU op, and where they came from: XLA:CPU's ops of `module` (the busiest by default),
  or, in a trace without them, PyTorch's CPU operators by self time (module doc)."""
  events = [e for e in events if e.get("ph") == "X" and "dur" in e]
  xla: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  for e in events:
    args = e.get("args") or {}
    if "hlo_op" in args:
      xla[str(args.get("hlo_module", ""))].append((str(args["hlo_op"]), float(e["dur"])))
  if xla:
    if module is None:
      module = max(xla, key=lambda name: sum(duration for _, duration in xla[name]))
    if module not in xla:
      sys.exit(f"error: the trace has no XLA module {module!r}; its modules: {', '.join(sorted(xla))}")
    return xla[module], f"XLA:CPU ops of {module}"
  threads: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
  for e in events:
    if e.get("cat") == "cpu_op":
      threads[(e.get("pid"), e.get("tid"))].append(e)
  ops = []
  for thread in threads.values():
    thread.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
    children = [0.0] * len(thread)
    stack: list[int] = []
    for index, e in enumerate(thread):
      while stack and float(thread[stack[-1]]["ts"]) + float(thread[stack[-1]]["dur"]) <= float(e["ts"]):
        stack.pop()
      if stack:
        children[stack[-1]] += float(e["dur"])
      stack.append(index)
    ops += [(str(e["name"]), float(e["dur"]) - children[i]) for i, e in enumerate(thread)]
  return ops, "PyTorch CPU operators (self time)"


def op_names(hlo_dir: str, module: str) -> dict[str, str]:
  """Each instruction of `module`'s optimized HLO (an XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text dump)
  -> its op_name metadata (the JAX source op, e.g. .../layer_0/mlp/down/dot_general)."""
  module = module.split(" of ")[-1]
  found = sorted(glob.glob(os.path.join(hlo_dir, f"*.{module}.cpu_after_optimizations.txt")))
  if not found:
    sys.exit(f"error: {hlo_dir} holds no {module}.cpu_after_optimizations.txt: dump the same program with "
             "XLA_FLAGS='--xla_dump_to=DIR --xla_dump_hlo_as_text'")
  with open(found[-1]) as f:
    text = f.read()
  names: dict[str, str] = {}
  for match in re.finditer(r'^\s+(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]+)"', text, re.M):
    names.setdefault(match.group(1), match.group(2))
  return names


def part_of(op: str, op_name: str) -> str:
  """The part of lm's Transformer an XLA:CPU op computes, from its name and op_name (the table of
  BENCHMARKS.md's CPU profiles)."""
  matmul = kind_of(op, CPU_KINDS) == "matmul"
  attention = "vmap(" in op_name or any(key in op_name for key in ("attention", "softmax", "dot_product"))
  if matmul:
    return "matmul: attention scores and values" if attention else "matmul: projections"
  if kind_of(op, CPU_KINDS) == "lm kernel" and "/attn/" in op_name:
    return "attention: lm's fused kernel (forward and backward)"
  if attention or any(f"/{key}/" in op_name for key in ("query", "key", "value")):
    return "attention: mask, softmax, head transposes"
  if "erf" in op_name or "/mlp/" in op_name:
    return "GELU and its gradient"
  if "reduce-window" in op:
    return "reductions split in two (reduce-window)"
  if "norm" in op_name.lower() or "/ln" in op_name:
    return "LayerNorm"
  return "other: optimizer, residual adds, loss, embeddings"


def summarize(kernels: list[tuple[str, float]], steps: int, top: int, kinds: tuple = KINDS) -> dict[str, Any]:
  by_kind: dict[str, float] = collections.defaultdict(float)
  by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for name, duration in kernels:
    by_kind[kind_of(name, kinds)] += duration
    by_name[name][0] += duration
    by_name[name][1] += 1
  busy = sum(by_kind.values())
  names = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
  return {
      "steps": steps,
      "kernels_per_step": len(kernels) / steps,
      "busy_ms_per_step": busy / steps / 1e3,
      "kinds_ms_per_step": {kind: value / steps / 1e3 for kind, value in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "top": [{"name": name, "kind": kind_of(name, kinds), "ms_per_step": total / steps / 1e3,
               "calls_per_step": count / steps}
              for name, (total, count) in names],
  }


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("trace", help="a trace file, or the folder a profiler wrote")
  parser.add_argument("--steps", type=int, default=3, help="steps the trace holds (bench.profile_steps)")
  parser.add_argument("--top", type=int, default=15, help="kernels listed by name")
  parser.add_argument("--cpu", action="store_true", help="sum CPU ops even if the trace holds device kernels")
  parser.add_argument("--module", default=None, help="XLA:CPU ops: the jitted module (default: the busiest)")
  parser.add_argument("--hlo", default=None, metavar="DIR", help="XLA:CPU ops: an HLO dump of the same program; "
                      "adds the time per model part (parts_ms_per_step)")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  path = find_trace(args.trace)
  events = load_events(path)
  kernels = [] if args.cpu else device_kernels(events)
  source, kinds = "device kernels", KINDS
  if not kernels:
    kernels, source = cpu_ops(events, args.module)
    kinds = CPU_KINDS
  if not kernels:
    names = sorted({str(e.get("args", {}).get("name", "")) for e in events if e.get("ph") == "M"})
    sys.exit(f"error: {path} holds no device kernels and no CPU ops: on a GPU, profile the steps; on a CPU, run "
             "with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true (JAX) or torch.profiler's CPU activity. "
             f"Its processes and threads: {', '.join(names[:40])}")
  summary = {"trace": path, "source": source, **summarize(kernels, args.steps, args.top, kinds)}
  if args.hlo and source.startswith("XLA:CPU"):
    names = op_names(args.hlo, source)
    parts: dict[str, float] = collections.defaultdict(float)
    for name, duration in kernels:
      parts[part_of(name, names.get(name, ""))] += duration / args.steps / 1e3
    summary["parts_ms_per_step"] = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
  print(f"{path} ({source}): {summary['kernels_per_step']:.0f} per step, {summary['busy_ms_per_step']:.2f} ms "
        "busy per step")
  for kind, ms in summary["kinds_ms_per_step"].items():
    print(f"  {kind:<10} {ms:8.2f} ms  {ms / summary['busy_ms_per_step']:6.1%}")
  for part, ms in summary.get("parts_ms_per_step", {}).items():
    print(f"  {part:<45} {ms:8.2f} ms")
  for row in summary["top"]:
    print(f"  {row['ms_per_step']:8.3f} ms {row['calls_per_step']:6.1f}x  {row['kind']:<9} {row['name'][:110]}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
