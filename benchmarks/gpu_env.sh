# Sourced by benchmarks/gpu_figures.sh and gpu_profile.sh with OUT set: the GPU machine's environment for lm
# (the wheels in .whl/ the image lacks, lm on PYTHONPATH, one compilation cache, the carried TFDS data and caches).
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || { echo "wheel install failed: $(tail -n 3 "$OUT/pip.log")"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .device/tfds ] && export TFDS_DATA_DIR=$PWD/.device/tfds
[ -d .device/cache ] && export LM_DATA_CACHE=$PWD/.device/cache
true
