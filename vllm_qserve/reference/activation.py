"""Dynamic per-token symmetric int8 activation quantization, alone and fused behind RMSNorm / SiLU-and-mul.

Contract (the CUDA kernels implement exactly these fp32 operations):
    amax  = max_k |x_k|                      (x upcast to fp32)
    inv   = 127 / max(amax, 1e-30)
    xq    = clamp(rint(x * inv), -127, 127)  as int8   (rint = round half to even)
    scale = amax / 127                       fp32 [T]
    xsum  (per-channel W4A8 only; sum_mode, see below)
        SUM_OF_INPUT:      sum_k x_k         fp32 [T], over the *unquantized* input (QServe's kernels)
        SUM_OF_QUANTIZED:  float(sum_k xq_k) * scale   (exact integer sum, one rounding, one fp32 product)

Per-channel W4A8 computes out = acc * sx * s1 - s1_szeros * xsum (docs/format.md section 5).  With QServe's sum
of the unquantized input, every activation rounding error is multiplied by the weight's uncentred code; with the
sum of the quantized input the GEMM is exactly x_hat . W (x_hat = xq * scale), the product DeepCompressor and our
quantizer simulate.  Checkpoints say which one they were made for (quantization_config.activation_sum).

Scales and sums are fp32, not fp16 as in QServe: QServe is fp16-only, we also serve bf16, whose range exceeds
fp16's, and a fp16 sum over K=14336 channels overflows easily.  The extra bytes are 8 per token.

The fused variants are *defined* as the composition with the intermediate rounded to the activation dtype,
so fusing (an Inductor pass or a fused kernel) never changes a model's numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_AMAX_FLOOR = 1e-30

# sum_mode of the quantizers (the compiled ops' int argument; a bool is NO_SUM / SUM_OF_INPUT)
NO_SUM, SUM_OF_INPUT, SUM_OF_QUANTIZED = 0, 1, 2
# quantization_config.activation_sum -> sum_mode of per-channel W4A8 layers
ACTIVATION_SUM_MODES = {"input": SUM_OF_INPUT, "quantized": SUM_OF_QUANTIZED}


def check_activation_sum(activation_sum, what: str = "activation_sum") -> str:
    """The one validity check of an activation_sum setting (quantization_config, quantizer, simulation)."""
    if activation_sum not in ACTIVATION_SUM_MODES:
        raise ValueError(f"{what} must be one of {sorted(ACTIVATION_SUM_MODES)}, got {activation_sum!r}")
    return activation_sum


def check_sum_mode(sum_mode) -> int:
    mode = int(sum_mode)
    if mode not in (NO_SUM, SUM_OF_INPUT, SUM_OF_QUANTIZED):
        raise ValueError(f"sum_mode must be 0 (no sum), 1 (sum of the input) or 2 (sum of the quantized input), "
                         f"got {sum_mode!r}")
    return mode


def quantize_per_token(x: torch.Tensor, sum_mode: int = NO_SUM):
    """x [..., K] fp16/bf16/fp32 -> (xq int8 [..., K], scale fp32 [...], xsum fp32 [...] or None)."""
    mode = check_sum_mode(sum_mode)
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # Tensor/tensor divisions on purpose: PyTorch's CUDA division by a Python scalar multiplies by the
    # reciprocal (1 ulp off IEEE), which would move rounding boundaries away from the kernels' IEEE division.
    c127 = torch.full_like(amax, 127.0)
    inv = c127 / amax.clamp(min=_AMAX_FLOOR)
    xq = torch.round(xf * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    scale = amax / c127
    if mode == SUM_OF_QUANTIZED:
        xsum = xq.sum(dim=-1, dtype=torch.int64).float() * scale
    else:
        xsum = xf.sum(dim=-1) if mode == SUM_OF_INPUT else None
    return xq, scale, xsum


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's RMSNorm: normalise in fp32, round to the input dtype, then apply the gain in that dtype."""
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    y = (xf * torch.rsqrt(var + eps)).to(x.dtype)
    return y * weight.to(x.dtype)


def rms_norm_quant(x, weight, eps: float, sum_mode: int = NO_SUM):
    return quantize_per_token(rms_norm(x, weight, eps), sum_mode)


def add_rms_norm_quant(x, residual, weight, eps: float, sum_mode: int = NO_SUM):
    """residual <- x + residual (in the activation dtype); returns (xq, scale, xsum, new_residual)."""
    new_residual = x + residual
    xq, scale, xsum = quantize_per_token(rms_norm(new_residual, weight, eps), sum_mode)
    return xq, scale, xsum, new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2d] -> [..., d]: silu(gate) * up with gate the first half (vLLM / QServe convention)."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_mul_quant(x, sum_mode: int = NO_SUM):
    return quantize_per_token(silu_and_mul(x), sum_mode)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2d] -> [..., d]: gelu_tanh(gate) * up (GeGLU: Gemma; vLLM's GeluAndMul(approximate="tanh"))."""
    d = x.shape[-1] // 2
    return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


def gelu_tanh_mul_quant(x, sum_mode: int = NO_SUM):
    return quantize_per_token(gelu_tanh_and_mul(x), sum_mode)
