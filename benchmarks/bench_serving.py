"""Online serving benchmark (vllm serve + token-id streaming client); see vllm_qserve/benchmark/serving.py.

    python benchmarks/bench_serving.py --model llama-3-8b --configs w4a8kv4-pc,fp8 --concurrency 16,64,256
(the same as ``vllm-qserve bench serve ...``).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's package

from vllm_qserve.benchmark.serving import main

if __name__ == "__main__":
    sys.exit(main())
