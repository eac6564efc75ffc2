#!/usr/bin/env bash
# The test command (README, .ci/run): sets up the environment (scripts/setup.sh) and runs the whole suite.
# GPU tests run when a CUDA GPU is present and are skipped otherwise.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n1)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
exec "$PY" -m pytest -q -p no:cacheprovider -o console_output_style=classic "$@" tests
