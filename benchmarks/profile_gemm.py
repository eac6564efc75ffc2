"""Launches our W4A8 per-channel GEMM on the gate_up shape (28672 x 4096) for the M values given, a few times each,
for Nsight Compute (the kernel notes' profile):

    ncu --kernel-name regex:qgemm --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis python3 benchmarks/profile_gemm.py --m 1
"""

import argparse

import torch

import vllm_qserve._C  # noqa: F401  (loads torch.ops.qserve; no vLLM needed)
from vllm_qserve.packing import pack_w4

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--n", type=int, default=28672)
    ap.add_argument("--k", type=int, default=4096)
    a = ap.parse_args()
    dev = "cuda"
    qweight = pack_w4(torch.randint(0, 16, (a.n, a.k), dtype=torch.uint8, device=dev))
    s1 = (torch.rand(a.n, device=dev) * 0.01 + 1e-3).half()
    sz = (torch.randn(a.n, device=dev) * 0.01).half()
    xq = torch.randint(-127, 128, (a.m, a.k), dtype=torch.int8, device=dev)
    sx, xs = torch.rand(a.m, device=dev) * 0.01, torch.randn(a.m, device=dev)
    for _ in range(3):
        torch.ops.qserve.w4a8_gemm_per_channel(xq, sx, xs, qweight, s1, sz, None, torch.bfloat16)
    torch.cuda.synchronize()
