"""PyTorch peer for the JAX train-step benchmark: nanoGPT's "baby" Shakespeare-char GPT.

The JAX train step is judged against a plain PyTorch eager CPU implementation of
the same model, the same shapes and the same optimizer, timed on the same machine
in the same run. This file is that peer. It follows nanoGPT's `model.py` and
`configure_optimizers` (https://github.com/karpathy/nanoGPT) with the CPU config
from its README (`config/train_shakespeare_char.py` shrunk for a laptop):

    vocab 66 (65 chars + unk), n_layer 4, n_head 4, n_embd 128, block_size 64,
    batch 12, dropout 0, bias=False, AdamW(lr 1e-3, betas (0.9, 0.99), wd 0.1), clip 1.0

One timed "optimizer step" is zero_grad, forward, cross-entropy, backward,
clip_grad_norm_, AdamW step. The batch is drawn before the clock starts, so the
figure is the train step alone, as for the jitted JAX `train_step`.

Run (prints a JSON object as its last line):

    .venv/bin/python benchmarks/torch_peer.py [--steps 100] [--warmup 10] [--threads N]
    .venv/bin/python benchmarks/torch_peer.py --compile   # torch.compile, not the issue's peer
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# nanoGPT's CPU "baby" Shakespeare-char configuration; the JAX benchmark uses the same.
DEFAULT_VOCAB_SIZE = 66
DEFAULT_N_LAYER = 4
DEFAULT_N_HEAD = 4
DEFAULT_N_EMBD = 128
DEFAULT_CONTEXT = 64
DEFAULT_BATCH_SIZE = 12
DEFAULT_STEPS = 100
DEFAULT_WARMUP = 10

LEARNING_RATE = 1e-3
ADAM_BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.1
GRAD_CLIP_NORM = 1.0
INIT_STD = 0.02
PARAM_SEED = 1337  # nanoGPT's seed; only fixes the weights, timing does not depend on it.
DATA_SEED = 0
OTHER_LOAD_WARNING = 0.05  # Above this share of the machine, a timing says more about the neighbours.


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention: [batch, length, width] -> [batch, length, width]."""

  def __init__(self, n_embd: int, n_head: int) -> None:
    super().__init__()
    if n_embd % n_head:
      raise ValueError(f"width {n_embd} is not divisible by heads {n_head}; pick a width that is")
    self.n_head = n_head
    self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
    self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    batch, length, width = x.shape
    q, k, v = self.c_attn(x).split(width, dim=2)
    # [batch, heads, length, head_dim], the layout scaled_dot_product_attention expects.
    head_dim = width // self.n_head
    q, k, v = (t.view(batch, length, self.n_head, head_dim).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, width))


class MLP(nn.Module):
  """GELU feed-forward block, 4x wide: [batch, length, width] -> [batch, length, width]."""

  def __init__(self, n_embd: int) -> None:
    super().__init__()
    self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
    self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # Exact (erf) GELU, as nanoGPT's nn.GELU() default.
    return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
  """Pre-LayerNorm transformer block: [batch, length, width] -> [batch, length, width]."""

  def __init__(self, n_embd: int, n_head: int) -> None:
    super().__init__()
    self.ln_1 = nn.LayerNorm(n_embd, bias=False)
    self.attn = CausalSelfAttention(n_embd, n_head)
    self.ln_2 = nn.LayerNorm(n_embd, bias=False)
    self.mlp = MLP(n_embd)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """nanoGPT's GPT, bias=False, dropout 0: tokens [batch, length] -> logits [batch, length, vocab]."""

  def __init__(self, vocab_size: int, context: int, n_layer: int, n_head: int, n_embd: int,
               tied: bool = True) -> None:
    super().__init__()
    self.context = context
    self.wte = nn.Embedding(vocab_size, n_embd)
    self.wpe = nn.Embedding(context, n_embd)
    self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(n_embd, bias=False)
    self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
    if tied:
      # Tied input/output embedding, so both ends train one matrix as in nanoGPT.
      self.wte.weight = self.lm_head.weight

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    length = tokens.shape[1]
    if length > self.context:
      raise ValueError(f"sequence length {length} exceeds the context {self.context}; raise --context")
    positions = torch.arange(length, device=tokens.device)
    x = self.wte(tokens) + self.wpe(positions)
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.ln_f(x))


def build_model(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    context: int = DEFAULT_CONTEXT,
    n_layer: int = DEFAULT_N_LAYER,
    n_head: int = DEFAULT_N_HEAD,
    n_embd: int = DEFAULT_N_EMBD,
    seed: int = PARAM_SEED,
    tied: bool = True,
) -> GPT:
  """Builds the GPT with nanoGPT's initialization, on the CPU.

  Every Linear and Embedding weight is normal(0, 0.02); the residual output
  projections (`c_proj`) use 0.02 / sqrt(2 * n_layer) so the residual stream's
  variance does not grow with depth (GPT-2's scheme). LayerNorm scales start at 1.
  """
  generator = torch.Generator().manual_seed(seed)
  model = GPT(vocab_size, context, n_layer, n_head, n_embd, tied)
  for name, param in model.named_parameters():
    if param.dim() < 2:
      continue  # LayerNorm scales keep their ones.
    std = INIT_STD / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else INIT_STD
    with torch.no_grad():
      param.normal_(0.0, std, generator=generator)
  return model


def count_params(model: nn.Module) -> int:
  """Counts distinct parameters, so the tied embedding is counted once (positions included)."""
  return sum(p.numel() for p in model.parameters())


def build_optimizer(model: nn.Module) -> torch.optim.AdamW:
  """AdamW as nanoGPT configures it: weight decay on matrices and embeddings, none on LayerNorm scales."""
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [
      {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
  ]
  # Default (single-tensor) AdamW on CPU: the peer is plain eager PyTorch, not a fused kernel.
  return torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=ADAM_BETAS)


def random_batches(
    vocab_size: int, batch_size: int, context: int, device: torch.device, seed: int = DATA_SEED
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
  """Yields (inputs, targets), each int64 [batch, context], shifted by one token.

  Uniform random tokens: the timing of a dense model does not depend on the data,
  and a fixed generator keeps every run identical.
  """
  generator = torch.Generator().manual_seed(seed)
  while True:
    tokens = torch.randint(0, vocab_size, (batch_size, context + 1), generator=generator)
    tokens = tokens.to(device)
    yield tokens[:, :-1], tokens[:, 1:]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    bf16: bool = False,
) -> torch.Tensor:
  """One optimizer step on inputs/targets [batch, length]; returns the (unsynchronized) loss."""
  optimizer.zero_grad(set_to_none=True)
  with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
    logits = model(inputs)
  # Cross-entropy in float32 even under autocast, as the JAX step computes it.
  loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
  optimizer.step()
  return loss.detach()


def describe_device(device: torch.device) -> str:
  """Names the hardware, e.g. 'cpu: AMD EPYC 7B13 x2' or 'cuda: NVIDIA H100 80GB HBM3'."""
  if device.type == "cuda":
    return f"cuda: {torch.cuda.get_device_name(device)}"
  model_name = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          model_name = line.split(":", 1)[1].strip()
          break
  return f"cpu: {model_name} x{os.cpu_count()}"


def machine_busy_seconds() -> float | None:
  """CPU-seconds all processes have spent busy since boot, from /proc/stat; None off Linux."""
  try:
    with open("/proc/stat", encoding="utf-8") as stat:
      fields = [int(v) for v in stat.readline().split()[1:9]]
  except (OSError, ValueError):
    return None
  # user nice system idle iowait irq softirq steal: idle and iowait are not busy.
  busy_ticks = sum(fields) - fields[3] - fields[4]
  return busy_ticks / os.sysconf("SC_CLK_TCK")


def _synchronize(device: torch.device) -> None:
  # CUDA kernels run asynchronously; without this the clock would stop at launch time.
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def run_benchmark(
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    device: str = "cpu",
    n_layer: int = DEFAULT_N_LAYER,
    n_head: int = DEFAULT_N_HEAD,
    n_embd: int = DEFAULT_N_EMBD,
    context: int = DEFAULT_CONTEXT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    torch_compile: bool = False,
    bf16: bool = False,
    tied: bool = True,
) -> dict[str, Any]:
  """Times `steps` optimizer steps after `warmup` untimed ones; returns the result record.

  `threads` sets torch's intra-op thread count for the run and restores it after,
  so a notebook calling this twice is not left with the first call's setting.
  Returns the dict printed by the CLI: step_time_ms is the median step, p10_ms and
  p90_ms show the spread, tokens_per_sec is batch_size * context / median, and
  other_cpu_load is the fraction of the machine's CPU that other processes used
  during the timed steps (None where /proc/stat is missing).
  """
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  if warmup < 0:
    raise ValueError(f"warmup must be non-negative, got {warmup}")
  if threads is not None and threads < 1:
    raise ValueError(f"threads must be at least 1, got {threads}; omit it for torch's default")
  torch_device = torch.device(device)
  if torch_device.type == "cuda" and not torch.cuda.is_available():
    raise ValueError("--device cuda asked for, but this torch build sees no CUDA device; "
                     "use --device cpu or install a CUDA build of torch")

  previous_threads = torch.get_num_threads()
  if threads is not None:
    torch.set_num_threads(threads)
  try:
    model = build_model(vocab_size, context, n_layer, n_head, n_embd, tied=tied).to(torch_device)
    optimizer = build_optimizer(model)
    # Compile only the model: the optimizer and clipping stay eager, so --compile
    # measures what torch.compile does to the network, not a whole-step graph.
    step_model = torch.compile(model) if torch_compile else model
    batches = random_batches(vocab_size, batch_size, context, torch_device)

    def timed_step() -> tuple[float, torch.Tensor]:
      inputs, targets = next(batches)
      _synchronize(torch_device)
      start = time.perf_counter()
      loss = train_step(step_model, optimizer, inputs, targets, bf16=bf16)
      _synchronize(torch_device)
      return (time.perf_counter() - start) * 1e3, loss

    for _ in range(warmup):  # Untimed: allocator warm-up, and compilation under --compile.
      timed_step()
    busy_start, cpu_start, wall_start = machine_busy_seconds(), time.process_time(), time.perf_counter()
    times_ms: list[float] = []
    for _ in range(steps):
      elapsed_ms, loss = timed_step()
      times_ms.append(elapsed_ms)
    busy_end, cpu_end, wall_end = machine_busy_seconds(), time.process_time(), time.perf_counter()

    # On a small shared CPU another process can multiply the figure (torch's spinning
    # OpenMP threads fare worst), so the record says how busy the rest of the machine was.
    other_cpu_load = None
    if busy_start is not None and busy_end is not None:
      other_seconds = max(0.0, (busy_end - busy_start) - (cpu_end - cpu_start))
      other_cpu_load = round(other_seconds / ((wall_end - wall_start) * (os.cpu_count() or 1)), 3)
    final_loss = float(loss)
    if not math.isfinite(final_loss):
      raise FloatingPointError(f"loss became {final_loss}; the timing is of a broken step")

    median_ms = statistics.median(times_ms)
    # quantiles needs two points; a single step is its own p10 and p90.
    if len(times_ms) > 1:
      deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
    else:
      deciles = times_ms * 9
    return {
        "impl": "torch-compile" if torch_compile else "torch-eager",
        "step_time_ms": round(median_ms, 3),
        "p10_ms": round(deciles[0], 3),
        "p90_ms": round(deciles[-1], 3),
        "tokens_per_sec": round(batch_size * context / (median_ms / 1e3), 1),
        "device": describe_device(torch_device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": count_params(model),
        "steps": steps,
        "warmup": warmup,
        "bf16": bf16,
        "shape": {
            "layers": n_layer, "heads": n_head, "width": n_embd,
            "context": context, "batch": batch_size, "vocab": vocab_size, "tied": tied,
        },
        "final_loss": round(final_loss, 4),
        "other_cpu_load": other_cpu_load,
    }
  finally:
    torch.set_num_threads(previous_threads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line; defaults are nanoGPT's baby Shakespeare-char run."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed optimizer steps")
  parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps first")
  parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
  parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
  parser.add_argument("--layers", type=int, default=DEFAULT_N_LAYER)
  parser.add_argument("--heads", type=int, default=DEFAULT_N_HEAD)
  parser.add_argument("--width", type=int, default=DEFAULT_N_EMBD)
  parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
  parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB_SIZE)
  # Off by default: the peer the comparison names is eager PyTorch.
  parser.add_argument("--compile", action="store_true", help="torch.compile the model")
  parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
  parser.add_argument("--untied", action="store_true", help="separate output projection (lm's baseline)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  """Runs the benchmark from the command line and prints the result as the last line."""
  args = parse_args(argv)
  threads = args.threads if args.threads is not None else torch.get_num_threads()
  print(f"torch {torch.__version__}, threads {threads}, device {args.device}", flush=True)
  result = run_benchmark(
      steps=args.steps,
      warmup=args.warmup,
      threads=args.threads,
      device=args.device,
      n_layer=args.layers,
      n_head=args.heads,
      n_embd=args.width,
      context=args.context,
      batch_size=args.batch,
      vocab_size=args.vocab,
      torch_compile=args.compile,
      bf16=args.bf16,
      tied=not args.untied,
  )
  load = result["other_cpu_load"]
  if load is not None and load > OTHER_LOAD_WARNING:
    print(f"warning: other processes used {load:.0%} of the CPU while timing; the figure is not clean",
          file=sys.stderr, flush=True)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
