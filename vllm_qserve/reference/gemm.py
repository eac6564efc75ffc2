"""Reference W4A8 (per-channel and group-128) and W8A8 GEMMs, from QServe's checkpoint tensors.

    per-channel:  out[i,j] = acc[i,j] * sx[i] * s1[j] - s1_szeros[j] * xsum[i],   acc = sum_k xq[i,k] * q[j,k]
    group-128:    w8[j,k]  = (q[j,k] * s2[g,j] + s2_zeros[g,j]) mod 256  as int8,  g = k // 128
                  out[i,j] = acc[i,j] * sx[i] * s1[j],                              acc = sum_k xq[i,k] * w8[j,k]
    W8A8:         out[i,j] = acc[i,j] * sx[i] * s[j],                               acc = sum_k xq[i,k] * w[j,k]

The epilogue runs in fp32 (bias added there too) and the result is rounded once to the output dtype.
"""

from __future__ import annotations

import torch

from vllm_qserve.packing import unpack_w4, unpermute_s2

GROUP_SIZE = 128


def int_matmul_exact(a_int: torch.Tensor, b_int: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T for integer-valued tensors, exactly, as float64 (traceable, any device)."""
    return a_int.to(torch.float64) @ b_int.to(torch.float64).t()


def rebuild_w8_per_group(qweight: torch.Tensor, s2_scales: torch.Tensor, s2_zeros: torch.Tensor) -> torch.Tensor:
    """Progressive dequantization, level 2: 4-bit codes -> int8 weights [N, K], byte-wise like the kernel."""
    q = unpack_w4(qweight).to(torch.int32)  # [N, K]
    n, k = q.shape
    s2 = unpermute_s2(s2_scales).to(torch.int32).t()  # [N, K/128]
    z2 = unpermute_s2(s2_zeros).to(torch.int32).t()  # holds -(z*s2) as int8
    prod = q.view(n, k // GROUP_SIZE, GROUP_SIZE) * s2.unsqueeze(-1) + z2.unsqueeze(-1)
    w8 = torch.remainder(prod, 256)  # byte-wise add mod 256 ...
    w8 = torch.where(w8 > 127, w8 - 256, w8)  # ... reinterpreted as signed
    return w8.reshape(n, k).to(torch.int8)


def dequantize_w4_per_channel(qweight, s1_scales, s1_szeros) -> torch.Tensor:
    """fp32 [N, K] weights W = s1 * q - s1_szeros."""
    q = unpack_w4(qweight).float()
    return q * s1_scales.float().unsqueeze(1) - s1_szeros.float().unsqueeze(1)


def dequantize_w4_per_group(qweight, s1_scales, s2_scales, s2_zeros) -> torch.Tensor:
    """fp32 [N, K] weights W = s1 * w8."""
    return rebuild_w8_per_group(qweight, s2_scales, s2_zeros).float() * s1_scales.float().unsqueeze(1)


def _finish(acc64: torch.Tensor, row_scale, col_scale, out_dtype, bias, zero_term=None) -> torch.Tensor:
    out = acc64.float() * row_scale.float().unsqueeze(1) * col_scale.float().unsqueeze(0)
    if zero_term is not None:
        out = out - zero_term
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def w4a8_per_channel(xq, sx, xsum, qweight, s1_scales, s1_szeros, out_dtype=torch.float16, bias=None):
    acc = int_matmul_exact(xq, unpack_w4(qweight))
    zero_term = xsum.float().unsqueeze(1) * s1_szeros.float().unsqueeze(0)
    return _finish(acc, sx, s1_scales, out_dtype, bias, zero_term)


def w4a8_per_group(xq, sx, qweight, s1_scales, s2_scales, s2_zeros, out_dtype=torch.float16, bias=None):
    acc = int_matmul_exact(xq, rebuild_w8_per_group(qweight, s2_scales, s2_zeros))
    return _finish(acc, sx, s1_scales, out_dtype, bias)


def w8a8(xq, sx, weight, dequant_scale, out_dtype=torch.float16, bias=None):
    acc = int_matmul_exact(xq, weight)
    return _finish(acc, sx, dequant_scale, out_dtype, bias)
