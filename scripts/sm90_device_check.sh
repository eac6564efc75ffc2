#!/usr/bin/env bash
# One device call for the Hopper wgmma GEMM: build both extensions for sm_90 / sm_90a, run the GPU tests, time.
#   bash scripts/sm90_device_check.sh [build|test|bench|all]...   (default: all)
# Logs and the benchmark JSON/PNG go to $OUT (or benchmarks/results/).  Needs an H100/H200, torch with CUDA,
# nvcc, ninja, pytest, triton (no vLLM: the tests and the benchmark import torch and vllm_qserve only).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
steps="${*:-all}"
want() { [[ " $steps " == *" all "* || " $steps " == *" $1 "* ]]; }
rc=0
if want build; then
  t0=$(date +%s)
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"; grep -h "C7515\|spill\|error" "$OUT/build.log" | sort | uniq -c | head
fi
if want test; then
  t0=$(date +%s)
  PYTHONPATH=$PWD python3 -m pytest -q -x tests/test_cuda_gemm_sm90.py tests/test_gemm_sm90_layout.py \
    -p no:cacheprovider > "$OUT/test_sm90.log" 2>&1 || rc=1
  tail -15 "$OUT/test_sm90.log"; echo "tests: $(( $(date +%s) - t0 )) s"
fi
if want bench; then
  PYTHONPATH=$PWD python3 benchmarks/bench_gemm_sm90.py ${BENCH_ARGS:-} 2> "$OUT/bench_stderr.log" | tee "$OUT/bench.log" || rc=1
fi
exit $rc
