"""Round-to-nearest quantization of one fp weight matrix into QServe tensors (no calibration).

per-channel:  asymmetric uint4 per output row: s1 = (max - min) / 15, z = rint(-min / s1),
              q = clamp(rint(W / s1) + z, 0, 15), s1_szeros = z * s1.
group 128:    level 1, symmetric int8 per row with the protective range [-119, 119]: s1 = max|W| / 119;
              level 2, asymmetric uint4 per 128 inputs on those integers: s2 = max(1, rint(range / 15)),
              z = rint(-min / s2), q clamped so that q * s2 <= 255 and (q - z) * s2 stays in int8 -- the two
              conditions the kernel's byte-wise q * s2 + (-z * s2) needs to be exact.
W8A8:         symmetric int8 per row: s = max|W| / 127.
"""

from __future__ import annotations

import torch

from vllm_qserve.packing import pack_w4, permute_s2

PROTECTIVE_RANGE = 119


def quantize_w4_per_channel(w: torch.Tensor) -> dict:
    w = w.float()
    mn, mx = w.amin(dim=1), w.amax(dim=1)
    s1 = ((mx - mn) / 15).clamp(min=1e-8).to(torch.float16).float()
    z = torch.round(-mn / s1).clamp(0, 15)
    q = (torch.round(w / s1[:, None]) + z[:, None]).clamp(0, 15)
    return {"qweight": pack_w4(q), "s1_scales": s1.to(torch.float16), "s1_szeros": (z * s1).to(torch.float16)}


def quantize_w4_per_group(w: torch.Tensor, group_size: int = 128) -> dict:
    w = w.float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input dim {k} is not a multiple of the group size {group_size}")
    s1 = (w.abs().amax(dim=1) / PROTECTIVE_RANGE).clamp(min=1e-8).to(torch.float16).float()
    w8 = torch.round(w / s1[:, None]).clamp(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)
    g = w8.view(n, k // group_size, group_size)
    mn, mx = g.amin(dim=2), g.amax(dim=2)
    s2 = torch.round((mx - mn) / 15).clamp(1, 127)
    z = torch.round(-mn / s2).clamp(0, 15)
    q = torch.round(g / s2[..., None]) + z[..., None]
    lo = torch.maximum(torch.zeros_like(z), z + torch.ceil(-128 / s2))
    hi = torch.minimum(torch.minimum(torch.full_like(z, 15), torch.floor(255 / s2)), z + torch.floor(127 / s2))
    q = torch.maximum(torch.minimum(q, hi[..., None]), lo[..., None])
    zeros = torch.remainder(-(z * s2), 256)  # two's complement byte of -(z * s2)
    zeros = torch.where(zeros > 127, zeros - 256, zeros)
    return {
        "qweight": pack_w4(q.reshape(n, k)),
        "s1_scales": s1.to(torch.float16),
        "s2_scales": permute_s2(s2.t().contiguous()).to(torch.int8),  # [K/128, N]
        "s2_zeros": permute_s2(zeros.t().contiguous()).to(torch.int8),
    }


def quantize_w8(w: torch.Tensor) -> dict:
    w = w.float()
    s = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.float16).float()
    return {"weight": torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), "dequant_scale": s.half()}


def quantize_weight(w: torch.Tensor, weight_bits: int, group_size: int) -> dict:
    if weight_bits == 8:
        return quantize_w8(w)
    return quantize_w4_per_channel(w) if group_size == -1 else quantize_w4_per_group(w, group_size)
