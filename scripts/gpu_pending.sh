#!/usr/bin/env bash
# The GPU checks that have not run on a device yet, in one call, each with its own log under $OUT:
#   bash scripts/gpu_pending.sh [tests|real|kc|e2e]...   (default: tests real)
# tests: every GPU test on synthetic models (kernels, plugin, tiny Gemma 3, fusion, key centring) -- all passed on the
#        H100 (sessions 5-6);
# real:  the real-model tests: tests/test_real_model_gpu.py (SmolLM2; VLLM_QSERVE_TEST_CHECKPOINT = a QoQ checkpoint
#        made on the CPU, else quantized on the GPU from the cached GGUF) and the real Gemma-3-270M greedy test
#        (QSERVE_GEMMA3_CKPT, else quantized on the GPU from the cached GGUF; skipped when neither is there);
# kc:    the cost of the key-centred path (no fused decode kernel yet): w4a8kv4-pc vs w4a8kv4-pc-kc at B=256;
# e2e:   benchmarks/run_e2e.sh A (throughput sweep; BUDGET seconds, resumable).
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
    tests/test_cuda_gemm_sm90.py tests/test_gemm_sm90_layout.py \
    tests/test_gpu_gemma3.py::test_gemma3_gpu_greedy_equals_cpu_reference \
    tests/test_gpu_fusion_e2e.py tests/test_gpu_plugin.py tests/test_key_center.py::test_cuda_kernel_class_centres_keys \
    tests/test_key_center.py::test_key_centred_checkpoint_on_the_gpu
fi
if want real; then
  run real_model python3 -m pytest -q -p no:cacheprovider -rfE tests/test_real_model_gpu.py
  run gemma3_real python3 -m pytest -q -p no:cacheprovider -rfE -s \
    tests/test_gpu_gemma3.py::test_real_gemma3_greedy_follows_reference
fi
if want kc; then
  run kc python3 benchmarks/bench_throughput.py --model llama-3-8b --configs w4a8kv4-pc,w4a8kv4-pc-kc \
    --batches 256 --out "$OUT/e2e_throughput_key_center.json"
fi
if want e2e; then
  run e2e env BUDGET="${BUDGET:-470}" bash benchmarks/run_e2e.sh A
fi
exit $rc
