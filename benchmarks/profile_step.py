"""Profile one decode step (batch 256, context ~1024) and one prefill step; see vllm_qserve/benchmark/profile_step.py.

    python benchmarks/profile_step.py --model llama-3-8b --configs w4a8kv4-pc,fp8 --batch 256
(the same as ``vllm-qserve bench profile ...``).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's package

from vllm_qserve.benchmark.profile_step import main

if __name__ == "__main__":
    sys.exit(main())
