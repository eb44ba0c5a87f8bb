"""PyTorch peer for the JAX train-step benchmark: nanoGPT's GPT, same shapes, same machine, same run.

The JAX train step is judged against a PyTorch implementation of the same model,
the same shapes and the same optimizer, timed on the same machine in the same
run. This file is that peer. It follows nanoGPT's `model.py` and
`configure_optimizers` (https://github.com/karpathy/nanoGPT).

Its defaults are the CPU peer: plain eager PyTorch on the CPU with the config
from nanoGPT's README (`config/train_shakespeare_char.py` shrunk for a laptop):

    vocab 66 (65 chars + unk), n_layer 4, n_head 4, n_embd 128, block_size 64,
    batch 12, dropout 0, bias=False, exact GELU,
    AdamW(lr 1e-3, betas (0.9, 0.99), wd 0.1, single-tensor), clip 1.0

`--preset gpt2-124m` is the GPU peer of `experiments/gpt2_124m.py`: GPT-2 small
(12 layers, 12 heads, width 768, context 1024, vocab 50304, biases, tanh GELU,
tied embeddings), AdamW(lr 6e-4, betas (0.9, 0.95), wd 0.1), batch 16, run as
nanoGPT runs it on a GPU: `torch.compile(model)` (default mode), bf16 autocast,
fused AdamW, TF32 allowed for float32 matmuls, and
`F.scaled_dot_product_attention(is_causal=True)` (flash attention on the GPU).
Any flag given after the preset overrides it (e.g. `--batch 8 --no-compile`).

One timed "optimizer step" is zero_grad, forward, cross-entropy, backward,
clip_grad_norm_, AdamW step, and a device synchronization. The batch is drawn
(and moved to the device) before the clock starts, so the figure is the train
step alone, as for the jitted JAX `train_step`. The first step (which under
`--compile` includes compilation) is reported on its own as `first_step_s`.

Run (prints a JSON object as its last line):

    .venv/bin/python benchmarks/torch_peer.py [--steps 100] [--warmup 10] [--threads N]
    .venv/bin/python benchmarks/torch_peer.py --compile   # torch.compile (needs a C++ compiler on the CPU)
    python benchmarks/torch_peer.py --preset gpt2-124m [--peak-flops 989e12]   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
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
ADAM_B1 = 0.9
ADAM_B2 = 0.99
ADAM_BETAS = (ADAM_B1, ADAM_B2)
WEIGHT_DECAY = 0.1
GRAD_CLIP_NORM = 1.0
INIT_STD = 0.02
PARAM_SEED = 1337  # nanoGPT's seed; only fixes the weights, timing does not depend on it.
DATA_SEED = 0
OTHER_LOAD_WARNING = 0.05  # Above this share of the machine, a timing says more about the neighbours.
GELU_FORMS = {"exact": "none", "tanh": "tanh"}  # --gelu -> F.gelu's `approximate`
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODE = "default"  # torch.compile(model) with no mode: what nanoGPT's train.py does.

# Command-line defaults a preset sets; flags given on the command line still win.
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small as experiments/gpt2_124m.py defines it, run as nanoGPT's train.py runs it on a GPU.
    "gpt2-124m": dict(
        layers=12, heads=12, width=768, context=1024, vocab=50304, batch=16,
        bias=True, gelu="tanh", lr=6e-4, adam_b2=0.95, bf16=True, compile=True,
        untied=False, device="auto",
    ),
}


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention: [batch, length, width] -> [batch, length, width]."""

  def __init__(self, n_embd: int, n_head: int, bias: bool = False) -> None:
    super().__init__()
    if n_embd % n_head:
      raise ValueError(f"width {n_embd} is not divisible by heads {n_head}; pick a width that is")
    self.n_head = n_head
    self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
    self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    batch, length, width = x.shape
    q, k, v = self.c_attn(x).split(width, dim=2)
    # [batch, heads, length, head_dim], the layout scaled_dot_product_attention expects.
    head_dim = width // self.n_head
    q, k, v = (t.view(batch, length, self.n_head, head_dim).transpose(1, 2) for t in (q, k, v))
    # Flash attention on a GPU (bf16 inputs under autocast), the math kernel on the CPU.
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.c_proj(y.transpose(1, 2).contiguous().view(batch, length, width))


class MLP(nn.Module):
  """GELU feed-forward block, 4x wide: [batch, length, width] -> [batch, length, width]."""

  def __init__(self, n_embd: int, bias: bool = False, gelu: str = "exact") -> None:
    super().__init__()
    if gelu not in GELU_FORMS:
      raise ValueError(f"gelu must be one of {tuple(GELU_FORMS)}, got {gelu!r}")
    self.approximate = GELU_FORMS[gelu]
    self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
    self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # "exact": erf GELU, nanoGPT's nn.GELU() default; "tanh": GPT-2's approximation.
    return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
  """Pre-LayerNorm transformer block: [batch, length, width] -> [batch, length, width]."""

  def __init__(self, n_embd: int, n_head: int, bias: bool = False, gelu: str = "exact") -> None:
    super().__init__()
    self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
    self.attn = CausalSelfAttention(n_embd, n_head, bias)
    self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
    self.mlp = MLP(n_embd, bias, gelu)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """nanoGPT's GPT, dropout 0: tokens [batch, length] -> logits [batch, length, vocab].

  `bias` puts biases in every Linear and LayerNorm except the output projection
  (GPT-2; nanoGPT's `bias=True`); `gelu` is "exact" or "tanh" (GPT-2).
  """

  def __init__(self, vocab_size: int, context: int, n_layer: int, n_head: int, n_embd: int,
               tied: bool = True, bias: bool = False, gelu: str = "exact") -> None:
    super().__init__()
    self.context = context
    self.wte = nn.Embedding(vocab_size, n_embd)
    self.wpe = nn.Embedding(context, n_embd)
    self.blocks = nn.ModuleList(Block(n_embd, n_head, bias, gelu) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(n_embd, bias=bias)
    self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
    if tied:
      # Tied input/output embedding, so both ends train one matrix as in nanoGPT.
      self.wte.weight = self.lm_head.weight

  def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, length, vocab]; with `targets` [batch, length], the mean cross-entropy instead.

    The loss is computed inside forward (as nanoGPT does) so that under
    `torch.compile` it is part of the compiled graph.
    """
    length = tokens.shape[1]
    if length > self.context:
      raise ValueError(f"sequence length {length} exceeds the context {self.context}; raise --context")
    positions = torch.arange(length, device=tokens.device)
    x = self.wte(tokens) + self.wpe(positions)
    for block in self.blocks:
      x = block(x)
    logits = self.lm_head(self.ln_f(x))
    if targets is None:
      return logits
    # Cross-entropy in float32 even under autocast, as the JAX step computes it.
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_model(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    context: int = DEFAULT_CONTEXT,
    n_layer: int = DEFAULT_N_LAYER,
    n_head: int = DEFAULT_N_HEAD,
    n_embd: int = DEFAULT_N_EMBD,
    seed: int = PARAM_SEED,
    tied: bool = True,
    bias: bool = False,
    gelu: str = "exact",
) -> GPT:
  """Builds the GPT with nanoGPT's initialization, on the CPU.

  Every Linear and Embedding weight is normal(0, 0.02); the residual output
  projections (`c_proj`) use 0.02 / sqrt(2 * n_layer) so the residual stream's
  variance does not grow with depth (GPT-2's scheme). LayerNorm scales start at 1,
  biases (with `bias`) at 0.
  """
  generator = torch.Generator().manual_seed(seed)
  model = GPT(vocab_size, context, n_layer, n_head, n_embd, tied, bias, gelu)
  for name, param in model.named_parameters():
    if name.endswith(".bias"):
      with torch.no_grad():
        param.zero_()  # nn.Linear starts its bias uniform; nanoGPT zeroes it.
      continue
    if param.dim() < 2:
      continue  # LayerNorm scales keep their ones.
    std = INIT_STD / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else INIT_STD
    with torch.no_grad():
      param.normal_(0.0, std, generator=generator)
  return model


def count_params(model: nn.Module) -> int:
  """Counts distinct parameters, so the tied embedding is counted once (positions included)."""
  return sum(p.numel() for p in model.parameters())


def matmul_params(model: GPT) -> int:
  """N of the 6N rule (lm.train.perf's convention): all parameters but the lookup tables (the learned
  position table, and the input token table when the output projection is untied from it)."""
  lookups = model.wpe.weight.numel()
  if model.lm_head.weight is not model.wte.weight:
    lookups += model.wte.weight.numel()
  return count_params(model) - lookups


def flops_per_token(num_params: int, n_layer: int, context: int, n_embd: int) -> float:
  """Training FLOPs per token, as lm.train.perf counts them: 6 N + 6 L T d (causal attention).

  6 FLOPs per matmul parameter per token (forward 2, backward 4) plus the
  attention scores and weighted sum, half of the T x T matrix being masked.
  """
  return 6.0 * num_params + 6.0 * n_layer * context * n_embd


def mfu(flops_per_tok: float, tokens_per_sec: float, peak_flops: float | None) -> float | None:
  """Model FLOPs utilization of one device with `peak_flops` FLOP/s; None without a peak."""
  if not peak_flops or not math.isfinite(peak_flops) or peak_flops <= 0:
    return None
  return flops_per_tok * tokens_per_sec / peak_flops


def default_fused_adamw(device: torch.device) -> bool:
  """Fused AdamW on CUDA (one kernel for all parameters), torch's default single-tensor loop on the CPU."""
  return device.type == "cuda"


def build_optimizer(
    model: nn.Module,
    lr: float = LEARNING_RATE,
    betas: tuple[float, float] = ADAM_BETAS,
    fused: bool = False,
) -> torch.optim.AdamW:
  """AdamW as nanoGPT configures it: weight decay on matrices and embeddings, none on biases or LayerNorm scales.

  `fused=False` is the default single-tensor AdamW (the eager CPU peer);
  `fused=True` is `AdamW(fused=True)`, as nanoGPT uses on CUDA.
  """
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [
      {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
      {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
  ]
  extra = {"fused": True} if fused else {}
  return torch.optim.AdamW(groups, lr=lr, betas=betas, **extra)


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
    loss = model(inputs, targets)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
  optimizer.step()
  return loss.detach()


def resolve_device(device: str) -> torch.device:
  """"auto" -> cuda when this torch sees a CUDA device, else cpu; "cuda" fails clearly without one."""
  if device not in DEVICES:
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda" and not torch.cuda.is_available():
    raise ValueError("--device cuda asked for, but this torch build sees no CUDA device; "
                     "use --device cpu or install a CUDA build of torch")
  return torch.device(device)


def _check_cpu_compiler() -> None:
  # torch.compile on the CPU (Inductor) generates C++ and needs a compiler; the eager path does not.
  candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
  if not any(c and shutil.which(c) for c in candidates):
    raise ValueError("--compile on the CPU needs a C++ compiler (g++, clang++ or $CXX) and none was found; "
                     "drop --compile (or pass --no-compile after a preset) for the eager peer")


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


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
  """Allows TF32 for float32 matmuls and convolutions (nanoGPT on CUDA), restoring the settings after."""
  previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  if enabled:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  try:
    yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


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
    bias: bool = False,
    gelu: str = "exact",
    lr: float = LEARNING_RATE,
    adam_b2: float = ADAM_B2,
    fused_adamw: bool | None = None,
    peak_flops: float | None = None,
    profile_dir: str | None = None,
    profile_steps: int = 3,
) -> dict[str, Any]:
  """Times `steps` optimizer steps after `warmup` untimed ones; returns the result record.

  `device` is "cpu", "cuda" or "auto" (cuda when available). `fused_adamw=None`
  means fused on CUDA, the default single-tensor AdamW on the CPU. On CUDA, TF32
  is allowed for float32 matmuls during the run (and restored after).
  `threads` sets torch's intra-op thread count for the run and restores it after,
  so a notebook calling this twice is not left with the first call's setting.
  Returns the dict printed by the CLI: step_time_ms is the median step, p10_ms and
  p90_ms show the spread, tokens_per_sec is batch_size * context / median,
  first_step_s is the first step alone (compilation under `torch_compile`), mfu is
  flops_per_token * tokens_per_sec / peak_flops (None without `peak_flops`),
  peak_memory_bytes is torch.cuda.max_memory_allocated (None on the CPU), and
  other_cpu_load is the fraction of the machine's CPU that other processes used
  during the timed steps (None where /proc/stat is missing). With `profile_dir`,
  `profile_steps` more steps run under torch.profiler after the timing and their
  Chrome trace is written to profile_dir/torch_trace.json.gz
  (benchmarks/profile_summary.py sums its kernels).
  """
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  if warmup < 0:
    raise ValueError(f"warmup must be non-negative, got {warmup}")
  if threads is not None and threads < 1:
    raise ValueError(f"threads must be at least 1, got {threads}; omit it for torch's default")
  if gelu not in GELU_FORMS:
    raise ValueError(f"gelu must be one of {tuple(GELU_FORMS)}, got {gelu!r}")
  torch_device = resolve_device(device)
  on_cuda = torch_device.type == "cuda"
  if torch_compile and not on_cuda:
    _check_cpu_compiler()
  fused = default_fused_adamw(torch_device) if fused_adamw is None else bool(fused_adamw)

  previous_threads = torch.get_num_threads()
  if threads is not None:
    torch.set_num_threads(threads)
  try:
    with _tf32(on_cuda):
      if on_cuda:
        torch.cuda.reset_peak_memory_stats(torch_device)
      model = build_model(vocab_size, context, n_layer, n_head, n_embd, tied=tied, bias=bias,
                          gelu=gelu).to(torch_device)
      optimizer = build_optimizer(model, lr=lr, betas=(ADAM_B1, adam_b2), fused=fused)
      # Compile only the model (forward and loss): the optimizer and clipping stay eager,
      # as in nanoGPT's train.py, so --compile measures what torch.compile does to the network.
      step_model = torch.compile(model) if torch_compile else model
      batches = random_batches(vocab_size, batch_size, context, torch_device)

      def timed_step() -> tuple[float, torch.Tensor]:
        inputs, targets = next(batches)
        _synchronize(torch_device)
        start = time.perf_counter()
        loss = train_step(step_model, optimizer, inputs, targets, bf16=bf16)
        _synchronize(torch_device)
        return (time.perf_counter() - start) * 1e3, loss

      # The first step alone: under --compile it includes compilation (and autotuning).
      first_ms, loss = timed_step()
      times_ms: list[float] = [] if warmup else [first_ms]
      for _ in range(warmup - 1):  # Untimed: allocator warm-up, recompilation settling.
        timed_step()
      busy_start, cpu_start, wall_start = machine_busy_seconds(), time.process_time(), time.perf_counter()
      for _ in range(steps - len(times_ms)):
        elapsed_ms, loss = timed_step()
        times_ms.append(elapsed_ms)
      busy_end, cpu_end, wall_end = machine_busy_seconds(), time.process_time(), time.perf_counter()
      peak_memory = int(torch.cuda.max_memory_allocated(torch_device)) if on_cuda else None
      tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if on_cuda else False
      trace_path = None
      if profile_dir:  # after the timing, so the profiler's overhead is not in the figures
        activities = [torch.profiler.ProfilerActivity.CPU]
        if on_cuda:
          activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
          for _ in range(profile_steps):
            timed_step()
        os.makedirs(profile_dir, exist_ok=True)
        trace_path = os.path.join(profile_dir, "torch_trace.json.gz")
        profiler.export_chrome_trace(trace_path)

    # On a small shared CPU another process can multiply the figure (torch's spinning
    # OpenMP threads fare worst), so the record says how busy the rest of the machine was.
    other_cpu_load = None
    if busy_start is not None and busy_end is not None and wall_end > wall_start:
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
    tokens_per_sec = batch_size * context / (median_ms / 1e3)
    num_matmul_params = matmul_params(model)
    flops_tok = flops_per_token(num_matmul_params, n_layer, context, n_embd)
    utilization = mfu(flops_tok, tokens_per_sec, peak_flops)
    return {
        "impl": "torch-compile" if torch_compile else "torch-eager",
        "step_time_ms": round(median_ms, 3),
        "p10_ms": round(deciles[0], 3),
        "p90_ms": round(deciles[-1], 3),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "first_step_s": round(first_ms / 1e3, 3),
        "mfu": utilization,
        "flops_per_token": flops_tok,
        "peak_flops": peak_flops,
        "device": describe_device(torch_device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": count_params(model),
        "matmul_params": num_matmul_params,
        "steps": steps,
        "warmup": warmup,
        "bf16": bf16,
        "compile": torch_compile,
        "compile_mode": COMPILE_MODE if torch_compile else None,
        "bias": bias,
        "gelu": gelu,
        "attention": "F.scaled_dot_product_attention(is_causal=True)",
        "optimizer": {
            "name": "AdamW", "fused": fused, "lr": lr, "betas": [ADAM_B1, adam_b2],
            "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP_NORM,
        },
        "fused_adamw": fused,
        "tf32": tf32,
        "peak_memory_bytes": peak_memory,
        "shape": {
            "layers": n_layer, "heads": n_head, "width": n_embd,
            "context": context, "batch": batch_size, "vocab": vocab_size, "tied": tied,
        },
        "final_loss": round(final_loss, 4),
        "other_cpu_load": other_cpu_load,
        "profile": trace_path,
    }
  finally:
    torch.set_num_threads(previous_threads)


def build_parser() -> argparse.ArgumentParser:
  """The command line; defaults are nanoGPT's baby Shakespeare-char run (eager, CPU)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                      help="set the defaults of a named model and run (flags given still override); "
                           "gpt2-124m: GPT-2 small, batch 16, bf16, compile, fused AdamW, device auto")
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed optimizer steps")
  parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                      help="untimed steps first (the first of them is reported as first_step_s)")
  parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
  parser.add_argument("--device", default="cpu", choices=DEVICES,
                      help="cpu (default), cuda, or auto = cuda if this torch sees one (the preset's default)")
  parser.add_argument("--layers", type=int, default=DEFAULT_N_LAYER)
  parser.add_argument("--heads", type=int, default=DEFAULT_N_HEAD)
  parser.add_argument("--width", type=int, default=DEFAULT_N_EMBD)
  parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="sequence length (= position table)")
  parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB_SIZE)
  parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False,
                      help="biases in every Linear and LayerNorm but the output projection (GPT-2)")
  parser.add_argument("--gelu", choices=tuple(GELU_FORMS), default="exact",
                      help="exact (erf, nanoGPT's default) or tanh (GPT-2's approximation)")
  parser.add_argument("--lr", type=float, default=LEARNING_RATE, help="AdamW learning rate (constant)")
  parser.add_argument("--adam-b2", type=float, default=ADAM_B2, help="AdamW beta2 (GPT-2: 0.95)")
  parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                      help="AdamW(fused=True); default: on for cuda, off for cpu")
  # Off by default: the CPU peer the comparison names is eager PyTorch.
  parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                      help=f"torch.compile the model (mode {COMPILE_MODE!r}); on the CPU it needs a C++ compiler")
  parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                      help="bfloat16 autocast for the forward pass")
  parser.add_argument("--untied", action=argparse.BooleanOptionalAction, default=False,
                      help="separate output projection (lm's baseline)")
  parser.add_argument("--peak-flops", type=float, default=None,
                      help="peak FLOP/s of the device, to report mfu (e.g. 989e12 for an H100 in bf16)")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="after the timing, trace 3 more steps with torch.profiler into DIR/torch_trace.json.gz")
  return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses the command line: the preset's values become defaults, then the flags given override them."""
  parser = build_parser()
  known, _ = parser.parse_known_args(argv)
  if known.preset:
    parser.set_defaults(**PRESETS[known.preset])
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
      bias=args.bias,
      gelu=args.gelu,
      lr=args.lr,
      adam_b2=args.adam_b2,
      fused_adamw=args.fused_adamw,
      peak_flops=args.peak_flops,
      profile_dir=args.profile,
  )
  result["preset"] = args.preset
  load = result["other_cpu_load"]
  if load is not None and load > OTHER_LOAD_WARNING:
    print(f"warning: other processes used {load:.0%} of the CPU while timing; the figure is not clean",
          file=sys.stderr, flush=True)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
