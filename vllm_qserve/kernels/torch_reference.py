"""Any-device kernel built from the reference math: the CPU serving path and the fallback everywhere else.

At load time the packed weights are unpacked once to natural-layout integers (QServe 4-bit codes, or the
group-128 int8 weights rebuilt byte-wise exactly as the CUDA kernel does), stored as floats: the GEMM then runs
on the platform BLAS with exact integer accumulation.  fp32 is exact while every partial sum stays below 2^24
(127 * max|w| * K < 2^24, true for most per-channel layers); otherwise float64 is used.  The code is plain
traceable torch, so vLLM's torch.compile on CPU compiles it with the rest of the model.
"""

from __future__ import annotations

import torch

from vllm_qserve.kernels.base import LinearSpec, QServeLinearKernel
from vllm_qserve.packing import unpack_w4
from vllm_qserve.reference.activation import quantize_per_token
from vllm_qserve.reference.gemm import rebuild_w8_per_group

_FP32_EXACT_LIMIT = 2 ** 24


def _replace(layer: torch.nn.Module, name: str, value: torch.Tensor | None) -> None:
    if hasattr(layer, name):
        delattr(layer, name)
    if value is not None:
        layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


class TorchReferenceKernel(QServeLinearKernel):
    name = "torch-reference"

    @classmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        return True, None

    def process_weights_after_loading(self, layer):
        spec = self.spec
        if spec.weight_bits == 8:
            w_int = layer.weight.data
            col_scale = layer.dequant_scale.data
            _replace(layer, "weight", None)
            _replace(layer, "dequant_scale", None)
        else:
            if spec.group_size == -1:
                w_int = unpack_w4(layer.qweight.data).to(torch.int8)
            else:
                w_int = rebuild_w8_per_group(layer.qweight.data, layer.s2_scales.data, layer.s2_zeros.data)
                _replace(layer, "s2_scales", None)
                _replace(layer, "s2_zeros", None)
            col_scale = layer.s1_scales.data
            _replace(layer, "qweight", None)
        bound = 127 * int(w_int.abs().max()) * spec.in_features if w_int.numel() else 0
        acc_dtype = torch.float32 if bound < _FP32_EXACT_LIMIT else torch.float64
        _replace(layer, "qserve_w", w_int.to(acc_dtype).t().contiguous())  # [K, N]
        _replace(layer, "qserve_col_scale", col_scale.float())
        if spec.weight_bits == 4 and spec.group_size == -1:
            _replace(layer, "qserve_szeros", layer.s1_szeros.data.float())
            _replace(layer, "s1_szeros", None)
        _replace(layer, "s1_scales", None)

    def apply(self, layer, x, bias):
        per_channel = self.spec.weight_bits == 4 and self.spec.group_size == -1
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq, sx, xsum = quantize_per_token(x2, self.spec.sum_mode)
        w = layer.qserve_w
        acc = torch.mm(xq.to(w.dtype), w).float()
        out = acc * sx.unsqueeze(1) * layer.qserve_col_scale.unsqueeze(0)
        if per_channel:
            out = out - xsum.unsqueeze(1) * layer.qserve_szeros.unsqueeze(0)
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype).reshape(*lead, -1)
