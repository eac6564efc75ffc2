"""Hopper (sm_90) W4A8 linears: the wgmma kernel (csrc/gemm_sm90/) from WGMMA_MIN_M rows up, mma.sync below.

Why two kernels: decode-sized inputs (few rows) are weight-bandwidth bound, and there the mma.sync kernel's
32-channel, K-split tiles put more SMs on the weight stream; from a few hundred rows on the GEMM is
tensor-core bound, and mma.sync reaches at most ~650 TOP/s on an H100 while wgmma's int8 path is rated 1979.
The op (torch.ops.qserve.w4a8_gemm_per_*_sm90) picks by the input's row count at run time (a function of the
shape, so a captured CUDA graph keeps its choice, no host sync); both kernels read the checkpoint's packed
weights as they are, so there is no re-layout and no second weight copy.  The crossover (by layer width) is
measured with benchmarks/bench_gemm_sm90.py (docs/kernels/gemm_sm90.md); QSERVE_WGMMA_MIN_M overrides it.
"""

from __future__ import annotations

import os

import torch
from vllm.logger import init_logger

from vllm_qserve.kernels.base import LinearSpec
from vllm_qserve.kernels.cuda import CudaW4A8Kernel

logger = init_logger(f"vllm.{__name__}")

# Rows (tokens) from which the wgmma kernel runs, by layer shape.  Measured on an H100 SXM, both modes, Llama-3-8B
# shapes (docs/kernels/gemm_sm90.md: benchmarks/results/bench_gemm_sm90_h100.json; 128 < M <= 512:
# bench_gemm_sm90_mid_h100.json, then bench_gemm_sm90_splitk_h100.json with the cluster split-K launch of run 7):
#  * N >= 16384 (gate_up 28672): wgmma is already as fast as mma.sync at M = 1-16 and 2.2x faster at M = 64 (its
#    128-channel CTAs give N/128 = 224 CTAs, plenty for 132 SMs): from 64 rows on.
#  * N * K >= 24 Mi (qkv 6144 x 4096, down 4096 x 14336): with K split across a cluster (few tiles), wgmma beats
#    mma.sync from 129 rows (M = 192 / 256: qkv 30.7 / 30.7 us vs 32.0 / 33.8; down 64.5 / 65.4 vs 69.9 / 71.7);
#    at M <= 128 the small v1 tiles lose (down M = 128: 70.1 vs 58.0 us).
#  * smaller layers (o 4096 x 4096), per-channel: mma.sync's 64x64 tiles still win up to M = 256 (M = 256: 25.9 vs
#    29.8 us); above 256 mma.sync steps to its 128-token tiles and wgmma wins (M = 320: 29.8 vs 41.4 us).  Group 128:
#    mma.sync's in-register w8 rebuild costs it more, so wgmma wins from 129 rows there too (o M = 192 / 256: 32.2 /
#    31.8 vs 34.4 / 34.4 us); at M = 128 (wgmma's small v1 tiles) mma.sync still wins (o 24.6 vs 32.2).
WIDE_N = 16384
LARGE_NK = 24 * 2**20
WGMMA_MIN_M_WIDE = 64
WGMMA_MIN_M_LARGE = 129
WGMMA_MIN_M = 257
_logged: set = set()


def wgmma_min_m(out_features: int, in_features: int, group_size: int = -1) -> int:
    env = os.environ.get("QSERVE_WGMMA_MIN_M")
    if env:
        return int(env)
    if out_features >= WIDE_N:
        return WGMMA_MIN_M_WIDE
    if group_size != -1 or out_features * in_features >= LARGE_NK:
        return WGMMA_MIN_M_LARGE
    return WGMMA_MIN_M


class CudaSm90WgmmaKernel(CudaW4A8Kernel):
    name = "cuda-int8-wgmma-sm90"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        if spec.weight_bits != 4:
            return False, "W8A8 has no wgmma kernel (W4A8 only)"
        ok, why = super().can_implement(spec)
        if not ok:
            return False, why
        from vllm_qserve.gemm_sm90_ops import sm90_ops_available

        ok, why = sm90_ops_available()
        if not ok:
            return False, why
        cap = torch.cuda.get_device_capability()
        if cap != (9, 0):
            return False, f"compute capability {cap[0]}.{cap[1]} is not 9.0 (the kernel is built for sm_90a only)"
        if spec.in_features % 128:
            return False, f"in_features {spec.in_features} is not a multiple of 128 (one wgmma pipeline stage)"
        return True, None

    def __init__(self, spec: LinearSpec):
        super().__init__(spec)
        self.min_m = wgmma_min_m(spec.out_features, spec.in_features, spec.group_size)
        key = (spec.mode, self.min_m)
        if key not in _logged:
            _logged.add(key)
            logger.info("qserve: %s linears like %d x %d (out x in) use the sm90 wgmma GEMM from %d tokens on and "
                        "the mma.sync GEMM below (measured crossover; QSERVE_WGMMA_MIN_M overrides)", spec.mode,
                        spec.out_features, spec.in_features, self.min_m)

    def apply(self, layer, x, bias):
        spec = self.spec
        per_channel = spec.group_size == -1
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        xq, sx, xsum = torch.ops.qserve.quantize_per_token(x2, spec.sum_mode)
        if per_channel:
            out = torch.ops.qserve.w4a8_gemm_per_channel_sm90(xq, sx, xsum, layer.qweight, layer.s1_scales,
                                                              layer.s1_szeros, bias, x.dtype, self.min_m)
        else:
            out = torch.ops.qserve.w4a8_gemm_per_group_sm90(xq, sx, layer.qweight, layer.s1_scales,
                                                            layer.s2_scales, layer.s2_zeros, bias, x.dtype,
                                                            self.min_m)
        return out.reshape(*lead, spec.out_features)
