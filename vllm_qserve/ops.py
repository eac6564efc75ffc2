"""torch.ops.qserve.*: the compiled ops (when the CUDA extension is built) and their fake implementations.

Fakes size every output from the symbolic input sizes so that vLLM's Dynamo tracing (fullgraph), Inductor and
CUDA-graph capture can handle the ops without running them.
"""

from __future__ import annotations

import torch

try:
    from vllm_qserve import _C  # noqa: F401  (loads the library; TORCH_LIBRARY registers the ops)

    HAS_CUDA_OPS = True
    CUDA_OPS_IMPORT_ERROR = None
except ImportError as e:  # pure-Python install (no nvcc / CPU-only torch at build time)
    HAS_CUDA_OPS = False
    CUDA_OPS_IMPORT_ERROR = str(e)

if HAS_CUDA_OPS:

    @torch.library.register_fake("qserve::quantize_per_token")
    def _quantize_per_token_fake(x: torch.Tensor, sum_mode: int):
        lead = x.shape[:-1]
        return (
            torch.empty_like(x, dtype=torch.int8),
            x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead if sum_mode else (0,), dtype=torch.float32),
        )

    @torch.library.register_fake("qserve::w4a8_gemm_per_channel")
    def _w4a8_gemm_per_channel_fake(xq, sx, xsum, qweight, s1_scales, s1_szeros, bias, out_dtype):
        return xq.new_empty((xq.shape[0], qweight.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("qserve::w4a8_gemm_per_group")
    def _w4a8_gemm_per_group_fake(xq, sx, qweight, s1_scales, s2_scales, s2_zeros, bias, out_dtype):
        return xq.new_empty((xq.shape[0], qweight.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("qserve::w8a8_gemm")
    def _w8a8_gemm_fake(xq, sx, weight, dequant_scale, bias, out_dtype):
        return xq.new_empty((xq.shape[0], weight.shape[0]), dtype=out_dtype)


def cuda_ops_available() -> tuple[bool, str | None]:
    if not HAS_CUDA_OPS:
        return False, f"the CUDA extension vllm_qserve._C is not built ({CUDA_OPS_IMPORT_ERROR})"
    return True, None


from vllm_qserve.fusion import fused_ops as _fused_ops  # noqa: E402,F401  (fakes of the fused norm/act quant ops)
from vllm_qserve import attention_ops  # noqa: E402,F401  (KV4/KV8 paged-cache ops: fakes, wrappers)
from vllm_qserve import gemm_sm90_ops  # noqa: E402,F401  (Hopper wgmma W4A8 GEMM ops, when built: fakes)
