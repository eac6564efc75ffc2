#!/usr/bin/env bash
# The GPU checks that have not run on a device yet, in one call, each with its own log under $OUT:
#   bash scripts/gpu_pending.sh [tests|real|e2e]...   (default: tests real)
# tests: the kernel and backend tests of issues 9 and 10 (windowed KV decode, GeGLU fused quant, Gemma 3 plugin,
#        fused-quant kernels, the sm90 wgmma GEMM) and the GPU plugin tests;
# real:  tests/test_real_model_gpu.py (the SmolLM2 QoQ checkpoint made on the CPU: VLLM_QSERVE_TEST_CHECKPOINT);
# e2e:   benchmarks/run_e2e.sh A (throughput sweep with the wgmma GEMM; BUDGET seconds, resumable).
# Needs torch with CUDA, vLLM 0.26 and this package built for the GPU (pip install -e .).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
steps="${*:-tests real}"
want() { [[ " $steps " == *" $1 "* ]]; }
export VLLM_USE_FLASHINFER_SAMPLER="${VLLM_USE_FLASHINFER_SAMPLER:-0}"
rc=0
run() {  # name, command...
  local name=$1; shift
  local t0; t0=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1 || rc=1
  echo "== $name ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT/$name.log")"
}
if want tests; then
  run gpu_tests python3 -m pytest -q -p no:cacheprovider -rfE \
    tests/test_cuda_kv.py tests/test_gelu_fused_quant.py tests/test_fused_quant_kernels.py \
    tests/test_cuda_gemm_sm90.py tests/test_gemm_sm90_layout.py tests/test_gpu_gemma3.py \
    tests/test_gpu_fusion_e2e.py tests/test_gpu_plugin.py
fi
if want real; then
  run real_model python3 -m pytest -q -p no:cacheprovider -rfE tests/test_real_model_gpu.py
fi
if want e2e; then
  run e2e env BUDGET="${BUDGET:-470}" bash benchmarks/run_e2e.sh A
fi
exit $rc
