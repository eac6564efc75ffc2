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
# shapes (docs/kernels/gemm_sm90.md: benchmarks/results/bench_gemm_sm90_h100.json, then run 9 of session 10,
# bench_gemm_sm90_s10_h100.json, with 128-channel v2-1wg tiles where v2's tiles are few):
#  * N >= 16384 (gate_up 28672): wgmma is already as fast as mma.sync at M = 1-16 and 2.2x faster at M = 64 (its
#    128-channel CTAs give N/128 = 224 CTAs, plenty for 132 SMs): from 64 rows on.
#  * every other layer, both modes: from 129 rows.  At M = 129-256 the launcher's few-tile path (v2-1wg, two CTAs
#    per SM) beats mma.sync on all three 4096-wide layers (per-channel, M = 129 / 256: o 22.8 / 22.4 us vs 26.3 /
#    25.8; qkv 24.1 / 23.4 vs 30.7 / 34.1; down 54.5 / 55.8 vs 69.9 / 71.2); at M <= 128 wgmma's small v1 tiles
#    lose (down M = 128: 70.1 vs 58.0 us, o group 128: 32.2 vs 24.6).  Until session 10 per-channel o stayed on
#    mma.sync up to 256 rows (v2's 256-channel tiles with a 2-way K split: 29.8 us at M = 256).
WIDE_N = 16384
WGMMA_MIN_M_WIDE = 64
WGMMA_MIN_M = 129
_logged: set = set()


def wgmma_min_m(out_features: int) -> int:
    """Rows from which the wgmma kernel runs (see above): since session 10 only the layer's width matters."""
    env = os.environ.get("QSERVE_WGMMA_MIN_M")
    if env:
        return int(env)
    if out_features >= WIDE_N:
        return WGMMA_MIN_M_WIDE
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
        self.min_m = wgmma_min_m(spec.out_features)
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
