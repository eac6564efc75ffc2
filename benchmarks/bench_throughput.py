"""End-to-end throughput / latency, QServe's 1024/512 protocol; see vllm_qserve/benchmark/throughput.py.

    python benchmarks/bench_throughput.py --model llama-3-8b --configs w4a8kv4-pc,fp8 --batches 64,128,256,512
(the same as ``vllm-qserve bench throughput ...``).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's package

from vllm_qserve.benchmark.throughput import main

if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    sys.exit(main())
