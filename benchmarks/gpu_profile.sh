#!/usr/bin/env bash
# Where GPT-2 124M's step time goes on a GPU, lm against the torch.compile peer (BENCHMARKS.md, "GPU: one NVIDIA
# H200"): both steps profiled (3 steps each, after their timing), their kernels summed by kind
# (benchmarks/profile_summary.py), then the lm step under the options that could close a gap. Same preparation
# as benchmarks/gpu_figures.sh (.whl/); everything lands under $OUT (default ./gpu-profile).
set -u
OUT=${OUT:-$PWD/gpu-profile}
source "$(dirname "$0")/gpu_env.sh"
BENCH=(python3 -m lm.main --config experiments/gpt2_124m.py --mode bench --config.bench.decode=False
       --config.bench.steps=20 --config.bench.warmup_steps=5)
line() { grep '^{' "$1" | tail -n 1 | cut -c1-420; }
echo "== lm, profiled"
timeout -k 10 90 "${BENCH[@]}" --config.bench.profile_dir=/tmp/lm-profile >"$OUT/lm.log" 2>&1; echo "rc=$? $(line "$OUT/lm.log")"
echo "== torch.compile peer, profiled"
timeout -k 10 90 python3 benchmarks/torch_peer.py --steps 20 --warmup 5 --device cuda --layers 12 --heads 12 \
  --width 768 --context 1024 --batch 32 --vocab 50304 --bias --gelu tanh --bf16 --no-untied --compile --lr 0.0006 \
  --adam-b2 0.95 --peak-flops 989e12 --profile /tmp/torch-profile >"$OUT/torch.log" 2>&1
echo "rc=$? $(line "$OUT/torch.log")"
for side in lm torch; do
  python3 benchmarks/profile_summary.py /tmp/$side-profile --top 25 > "$OUT/${side}_kernels.txt" 2>&1
  head -n 32 "$OUT/${side}_kernels.txt" | cut -c1-160
done
cp "$(ls -t /tmp/lm-profile/plugins/profile/*/perfetto_trace.json.gz | head -n 1)" "$OUT/lm_trace.json.gz" 2>/dev/null
cp /tmp/torch-profile/torch_trace.json.gz "$OUT/torch_trace.json.gz" 2>/dev/null
variant() {  # name overrides...
  local name=$1; shift
  echo "== lm, $name"
  timeout -k 10 60 "${BENCH[@]}" "$@" >"$OUT/v.log" 2>&1; echo "rc=$? $(line "$OUT/v.log" | cut -c1-200)"
  grep -m1 -i "error" "$OUT/v.log" | cut -c1-300
}
variant "attention xla" --config.model.attention_impl=xla
variant "no triton gemm" --config.xla.flags=--xla_gpu_enable_triton_gemm=false
variant "cublaslt" --config.xla.flags=--xla_gpu_enable_cublaslt=true
