"""Compiled CUDA kernels (csrc/gemm/): per-token int8 quantization, then an int8 tensor-core GEMM (mma.sync, sm80+).

The GEMMs read QServe's checkpoint tensors as they are on disk (packed qweight, permuted s2), so
process_weights_after_loading changes nothing but the dtype of the per-channel scales (fp16 is what the kernels
read).  Numerics are the reference's (vllm_qserve/reference/gemm.py) bit for bit: exact int32 accumulation and
the same fp32 epilogue operations.
"""

from __future__ import annotations

import torch

from vllm_qserve.kernels.base import LinearSpec, QServeLinearKernel


def _as_fp16_param(layer: torch.nn.Module, name: str) -> None:
    p = getattr(layer, name)
    if p.dtype != torch.float16:
        delattr(layer, name)
        layer.register_parameter(name, torch.nn.Parameter(p.data.to(torch.float16), requires_grad=False))


class CudaW4A8Kernel(QServeLinearKernel):
    name = "cuda-int8-mma"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        if spec.device_type != "cuda":
            return False, f"device is {spec.device_type}, not cuda"
        from vllm_qserve.ops import cuda_ops_available

        ok, why = cuda_ops_available()
        if not ok:
            return False, why
        if not hasattr(torch.ops.qserve, "w4a8_gemm_per_channel"):
            return False, "the built extension has no GEMM ops (rebuild vllm_qserve._C)"
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        cap = torch.cuda.get_device_capability()
        if cap < (8, 0):
            return False, f"compute capability {cap[0]}.{cap[1]} < 8.0 (int8 mma.sync m16n8k32 needs sm80+)"
        if spec.act_dtype not in (torch.float16, torch.bfloat16):
            return False, f"activation dtype {spec.act_dtype} (fp16 or bf16 only)"
        if spec.weight_bits not in (4, 8):
            return False, f"{spec.weight_bits}-bit weights"
        if spec.weight_bits == 4 and spec.group_size not in (-1, 128):
            return False, f"group size {spec.group_size} (-1 or 128 only)"
        n, k = spec.out_features, spec.in_features
        if n % 32:
            return False, f"out_features {n} is not a multiple of 32"
        k_mult = 128 if spec.weight_bits == 4 and spec.group_size == 128 else 64
        if k % k_mult:
            return False, f"in_features {k} is not a multiple of {k_mult}"
        return True, None

    def process_weights_after_loading(self, layer):
        # The checkpoint tensors are the kernel's format; only make sure the channel scales are fp16.
        if self.spec.weight_bits == 8:
            _as_fp16_param(layer, "dequant_scale")
        else:
            _as_fp16_param(layer, "s1_scales")
            if self.spec.group_size == -1:
                _as_fp16_param(layer, "s1_szeros")

    def apply(self, layer, x, bias):
        spec = self.spec
        per_channel = spec.weight_bits == 4 and spec.group_size == -1
        lead = x.shape[:-1]
        # No reshape node for the usual 2-D input: the fusion pass matches norm -> quantize_per_token directly.
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        xq, sx, xsum = torch.ops.qserve.quantize_per_token(x2, spec.sum_mode)
        if spec.weight_bits == 8:
            out = torch.ops.qserve.w8a8_gemm(xq, sx, layer.weight, layer.dequant_scale, bias, x.dtype)
        elif per_channel:
            out = torch.ops.qserve.w4a8_gemm_per_channel(xq, sx, xsum, layer.qweight, layer.s1_scales,
                                                         layer.s1_szeros, bias, x.dtype)
        else:
            out = torch.ops.qserve.w4a8_gemm_per_group(xq, sx, layer.qweight, layer.s1_scales, layer.s2_scales,
                                                       layer.s2_zeros, bias, x.dtype)
        return out.reshape(*lead, spec.out_features)
