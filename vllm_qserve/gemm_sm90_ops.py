"""torch.ops.qserve.w4a8_gemm_per_{channel,group}_sm90: the Hopper wgmma W4A8 GEMM (csrc/gemm_sm90/), when built.

The ops live in their own extension, vllm_qserve._C_sm90, compiled only for sm_90a (setup.py builds it when 9.0
is in TORCH_CUDA_ARCH_LIST).  They take the checkpoint's tensors exactly like w4a8_gemm_per_channel /
w4a8_gemm_per_group plus `wgmma_min_m`: inputs with fewer rows run the mma.sync op instead (decided inside the
op from the shape, so the choice is fixed per captured CUDA graph and needs no host sync).
"""

from __future__ import annotations

import torch

try:
    from vllm_qserve import _C_sm90  # noqa: F401  (TORCH_LIBRARY_FRAGMENT registers the ops)

    HAS_SM90_OPS = True
    SM90_OPS_IMPORT_ERROR = None
except ImportError as e:  # not built (CPU-only install, or no 9.0 in the arch list)
    HAS_SM90_OPS = False
    SM90_OPS_IMPORT_ERROR = str(e)

if HAS_SM90_OPS:

    @torch.library.register_fake("qserve::w4a8_gemm_per_channel_sm90")
    def _w4a8_gemm_per_channel_sm90_fake(xq, sx, xsum, qweight, s1_scales, s1_szeros, bias, out_dtype,
                                         wgmma_min_m):
        return xq.new_empty((xq.shape[0], qweight.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("qserve::w4a8_gemm_per_group_sm90")
    def _w4a8_gemm_per_group_sm90_fake(xq, sx, qweight, s1_scales, s2_scales, s2_zeros, bias, out_dtype,
                                       wgmma_min_m):
        return xq.new_empty((xq.shape[0], qweight.shape[0]), dtype=out_dtype)


def sm90_ops_available() -> tuple[bool, str | None]:
    if not HAS_SM90_OPS:
        return False, f"the sm_90a extension vllm_qserve._C_sm90 is not built ({SM90_OPS_IMPORT_ERROR})"
    return True, None
