"""QServe's serving numerics simulated in PyTorch, on the quantizer's own model (vllm_qserve.quantize.model).

Used to propagate calibration activations through already-quantized layers (so that later layers are calibrated
on what they will see when served), to score candidate transforms, and to evaluate configurations the vLLM path
cannot run yet (KV4 before the attention backend exists).  The arithmetic is the contract of docs/format.md in the
model's dtype (the reference kernels accumulate integers exactly; here the dequantized weights are multiplied in
floating point, which differs by rounding only):

    x_hat = per-token int8 quantization of x      (reference.activation.quantize_per_token)
    y     = x_hat @ (s1 * q)^T - s1_szeros * sum(x)       per-channel W4A8, activation_sum "input" (QServe's)
    y     = x_hat @ (s1 * q - s1_szeros)^T                per-channel W4A8, activation_sum "quantized"
    y     = x_hat @ W^T                                   group-128 W4A8 (W = s1 * w8) and W8A8
    keys after RoPE and values: per token and KV head, asymmetric KV4/KV8 (reference.kv) when kv_bits < 16.
"""

from __future__ import annotations

import torch

from vllm_qserve.quantize.model import PROJECTIONS, CausalLM, Linear
from vllm_qserve.reference.activation import check_activation_sum, quantize_per_token
from vllm_qserve.reference.gemm import (
    dequantize_w4_per_channel,
    dequantize_w4_per_group,
)
from vllm_qserve.reference.key_center import rope_offset
from vllm_qserve.reference.kv import dequantize_kv, quantize_kv


def fake_quant_act(x: torch.Tensor) -> torch.Tensor:
    """x -> xq * sx (per-token symmetric int8, the serving contract), in x's dtype."""
    xq, sx, _ = quantize_per_token(x)
    return (xq.to(sx.dtype) * sx.unsqueeze(-1)).to(x.dtype)


def act_terms(x: torch.Tensor, activation_sum: str = "input") -> tuple:
    """(x_hat, sum(x_hat) - xsum) of x [..., K]: what the W4A8 GEMMs see of an input.  The second term is the
    per-channel epilogue's error in the activation sum: sum(x_hat) - sum(x) for QServe's sum of the input, zero
    when the sum is taken over the quantized activations (activation_sum "quantized", None returned)."""
    x_hat = fake_quant_act(x)
    if activation_sum == "quantized":
        return x_hat, None
    check_activation_sum(activation_sum)
    return x_hat, x_hat.sum(-1) - x.sum(-1)


def sim_matmul(x_hat: torch.Tensor, xsum_err: torch.Tensor | None, deq: torch.Tensor, szeros: torch.Tensor | None):
    """QServe's output from dequantized weights: x_hat @ deq^T, plus for per-channel grids the zero-point term of
    the sum's error, (sum(x_hat) - xsum) * s1_szeros (deq = s1 * q - s1_szeros; act_terms)."""
    y = x_hat @ deq.t()
    if szeros is not None and xsum_err is not None:
        y = y + xsum_err.unsqueeze(-1) * szeros
    return y


class QServeSimLinear(Linear):
    """A projection with quantized weights and per-token int8 inputs.

    weight holds what multiplies x_hat: s1 * q (uncentred codes) in per-channel mode, the dequantized weight
    otherwise; szeros (per-channel) is subtracted times the activation sum -- QServe's epilogue -- of the input
    (activation_sum "input", QServe's) or of the quantized input ("quantized"; docs/format.md section 5).
    """

    def __init__(self, weight, bias=None, szeros=None, act_bits: int | None = 8, activation_sum: str = "input"):
        super().__init__(weight, bias)
        self.szeros = None if szeros is None else torch.nn.Parameter(szeros, requires_grad=False)
        self.act_bits = act_bits
        self.xsum_of_quantized = check_activation_sum(activation_sum) == "quantized"

    def forward(self, x):
        xin = fake_quant_act(x) if self.act_bits == 8 else x
        y = torch.nn.functional.linear(xin, self.weight, self.bias)
        if self.szeros is not None:
            y = y - (xin if self.xsum_of_quantized else x).sum(-1, keepdim=True) * self.szeros
        return y


def sim_linear_from_tensors(t: dict, bias, dtype, act_bits: int | None = 8,
                            activation_sum: str = "input") -> QServeSimLinear:
    if "s1_szeros" in t:
        w = dequantize_w4_per_channel(t["qweight"], t["s1_scales"], torch.zeros_like(t["s1_szeros"]))
        szeros = t["s1_szeros"].float()
    elif "s2_scales" in t:
        w, szeros = dequantize_w4_per_group(t["qweight"], t["s1_scales"], t["s2_scales"], t["s2_zeros"]), None
    else:
        w, szeros = t["weight"].float() * t["dequant_scale"].float()[:, None], None
    return QServeSimLinear(w.to(dtype), None if bias is None else bias.detach().to(dtype),
                           None if szeros is None else szeros.to(dtype), act_bits, activation_sum)


def kv_fake_quant(bits: int, key_centers: dict | None = None, rope=None):
    """KV hook: keys (after RoPE) and values quantized per token and KV head, then dequantized.

    key_centers {layer index: mean pre-RoPE key [Hkv, D]} with rope (the model's ``rope(positions, dtype)``): those
    layers cache RoPE_p(k - m) and add R_p m back (reference/key_center.py), as the qserve backend does.  The hook
    sees whole sequences from position 0 (calibration and evaluation windows)."""

    def fq(x):
        codes, scale, zero = quantize_kv(x, bits)
        return dequantize_kv(codes, scale, zero).to(x.dtype)

    def hook(layer_index, k, v):
        if key_centers is None or layer_index not in key_centers:
            return fq(k), fq(v)
        t, d = k.shape[2], k.shape[3]
        cos, sin = rope(torch.arange(t, device=k.device)[None], torch.float32)  # [1, T, D], halves repeated
        off = rope_offset(key_centers[layer_index].to(k.device), cos[0, :, : d // 2], sin[0, :, : d // 2])
        off = off.permute(1, 0, 2)[None].to(k.dtype)  # [1, Hkv, T, D]
        return fq(k - off) + off, fq(v)

    return hook


def load_qserve_tensors(model: CausalLM, tensors: dict, act_bits: int | None = 8,
                        activation_sum: str = "input") -> CausalLM:
    """Replace every projection of model by its QServe simulation from checkpoint tensors (name -> tensor)."""
    dtype = model.lm_head.weight.dtype
    for i, layer in enumerate(model.layers):
        for proj in PROJECTIONS:
            prefix = f"model.layers.{i}.{proj}"
            parent_name, name = proj.split(".")
            parent = getattr(layer, parent_name)
            t = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            bias = t.pop("bias", None)
            setattr(parent, name, sim_linear_from_tensors(t, bias, dtype, act_bits, activation_sum))
    return model
