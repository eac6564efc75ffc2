#!/usr/bin/env bash
# The issue-5 end-to-end runs on the GPU machine, split into steps that each fit one 600 s device call.
#   bash benchmarks/run_e2e.sh A|B|C|D|E [MODEL]     (default model llama-3-8b)
# Every step resumes: measurements already in benchmarks/results/e2e_*.json are skipped, so copy the JSON files
# of earlier steps back into benchmarks/results/ before the next step.  Each step stops starting new work at
# ~560 s (BUDGET) and copies its results to $OUT when that is set.
#   A: w4a8kv4-pc and fp8: full batch sweep {64,128,256,512} + latency (batch 1, 16); then bf16 at B=256
#   B: w4a8kv4-g128, w4a8kv8-pc, w8a8kv4, bf16-int4kv at B=256
#   C: profile of one decode (B=256) and one prefill step, w4a8kv4-pc and fp8; then serving at C=64,256
#   D: w4a8kv16-pc, marlin-w4a16, machete-w4a16 at B=256; serving at C=16
#   E: w4a8kv4-pc, fp8, bf16 at B=256 (for the other models: run_e2e.sh E llama-2-7b, run_e2e.sh E mistral-7b)
set -uo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?usage: run_e2e.sh A|B|C|D|E [MODEL]}
MODEL=${2:-llama-3-8b}
BUDGET=${BUDGET:-560}
export VLLM_USE_FLASHINFER_SAMPLER=0
PY=${PYTHON:-python3}
left() { echo $((BUDGET - SECONDS)); }
thr() { $PY benchmarks/bench_throughput.py --model "$MODEL" --deadline-s "$(left)" "$@"; }
case "$STEP" in
  A) thr --configs w4a8kv4-pc,fp8 --batches 64,128,256,512 --mode throughput,latency
     thr --configs bf16 --batches 256 ;;
  B) thr --configs w4a8kv4-g128,w4a8kv8-pc,w8a8kv4,bf16-int4kv --batches 256 ;;
  C) $PY benchmarks/profile_step.py --model "$MODEL" --configs w4a8kv4-pc,fp8 --batch 256
     $PY benchmarks/bench_serving.py --model "$MODEL" --configs w4a8kv4-pc,fp8 --concurrency 64,256 \
         --deadline-s "$(left)" ;;
  D) thr --configs w4a8kv16-pc,marlin-w4a16,machete-w4a16 --batches 256
     $PY benchmarks/bench_serving.py --model "$MODEL" --configs w4a8kv4-pc,fp8 --concurrency 16 \
         --deadline-s "$(left)" ;;
  E) thr --configs w4a8kv4-pc,fp8,bf16 --batches 256 ;;
  *) echo "unknown step $STEP (A, B, C, D or E)" >&2; exit 2 ;;
esac
$PY benchmarks/bench_throughput.py --report-only --model "$MODEL"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/e2e_* "$OUT"/ 2>/dev/null; fi
echo "step $STEP done in ${SECONDS}s"
