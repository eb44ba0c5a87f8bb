#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md ("GPU: one NVIDIA H200"), in one call on a GPU machine, from the project's root:
#
#   bash benchmarks/gpu_figures.sh        # everything under $OUT (default ./gpu-figures)
#
# ../shared/device/gpu-figures.sh, adjusted to what one 10-minute call can hold: a 30-second smoke run first (so a
# machine whose JAX rejects a flag or lacks a package fails in seconds, not after the budget), JAX's persistent
# compilation cache shared by the runs (the torch comparison reuses the bench's compiled step), the train-only
# comparison (no decode), and the fast-path variants that matter most, each printed as soon as it is measured.
# Prepare on a machine with network access first:
#   .whl/            wheels the GPU image lacks (grain, tensorflow-datasets, array-record, ml-collections, tensorboardX
#                    and their own missing needs; ../shared/device/README.md says how)
#   .device/tfds     a copy of ../shared/tfds
#   .device/cache    token caches of the nanoGPT run's splits (Apache Beam is not on the GPU image):
#                    LM_DATA_CACHE=.device/cache TFDS_DATA_DIR=.device/tfds python -m lm.main \
#                        --config experiments/shakespeare_char_gpu.py --workdir /tmp/prep --mode prepare
set -u
OUT=${OUT:-$PWD/gpu-figures}
source "$(dirname "$0")/gpu_env.sh"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 - <<'EOF'
import time, jax, jax.numpy as jnp, flax, optax, orbax.checkpoint, torch
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", orbax.checkpoint.__version__, "torch", torch.__version__, jax.devices())
# The bf16 matrix-product ceiling on this card, the reference for MFU beside the data sheet's 989 TFLOP/s.
a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
f = jax.jit(lambda x: x @ x)
f(a).block_until_ready()
start = time.perf_counter()
for _ in range(20):
  out = f(a)
out.block_until_ready()
print(f"matmul 8192^3 bf16: {20 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12:.0f} TFLOP/s")
EOF
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

EXTRA=()  # overrides every lm run gets (the fallback below adds one)
step() {  # name seconds command...
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s)"
  local start=$SECONDS
  timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  local last; last=$(grep '^{' "$OUT/$name.log" | tail -n 1)
  echo "{\"figure\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"result\": ${last:-null}}" >> "$OUT/figures.jsonl"
  echo "rc=$rc in $((SECONDS - start))s ${last:0:300}"
  return $rc
}

SMOKE=(python3 -m lm.main --config experiments/shakespeare_char_gpu.py --mode bench --config.model.num_layers=1
       --config.bench.steps=3 --config.bench.warmup_steps=1 --config.bench.decode_batches='(1,)'
       --config.bench.decode_tokens=4)
if ! step smoke 60 "${SMOKE[@]}"; then
  if grep -q "Unknown flag" "$OUT/smoke.log"; then  # this jaxlib dropped a flag of the GPU preset: measure without it
    grep -m1 "Unknown flag" "$OUT/smoke.log"
    EXTRA=(--config.xla.preset=none)
    step smoke_no_preset 60 "${SMOKE[@]}" "${EXTRA[@]}" || { tail -n 20 "$OUT/smoke_no_preset.log"; exit 1; }
  else
    tail -n 30 "$OUT/smoke.log"; exit 1
  fi
fi

step bench_gpt2_124m 150 python3 -m lm.main --config experiments/gpt2_124m.py --mode bench "${EXTRA[@]}"
step vs_torch_compile 170 python3 benchmarks/run.py --config experiments/gpt2_124m.py --rounds 2 --steps 30 \
  --config.bench.decode=False "${EXTRA[@]}"
step nanogpt_gpu_baseline 170 python3 -m lm.main --config experiments/shakespeare_char_gpu.py --workdir /tmp/gpu-run \
  "${EXTRA[@]}"
[ -f /tmp/gpu-run/metrics.jsonl ] && grep '"eval/loss"' /tmp/gpu-run/metrics.jsonl > "$OUT/nanogpt_eval.jsonl"
step fast_path 120 python3 benchmarks/fast_path.py --config experiments/gpt2_124m.py --platform cuda --time \
  --variants "logits loss,fused + scan,fused + remat full" -- "${EXTRA[@]}"
echo "done: $(wc -l < "$OUT/figures.jsonl") figures in figures.jsonl"
