"""QServe's three weight grids as stateful quantizers: per-row parameters first, then codes column by column.

GPTQ visits the columns of a weight matrix one at a time and needs, for each, the integer codes and the value the
kernel will actually compute with (the "fake-quantized" column).  Both must be exactly what the checkpoint stores
and the kernels read (docs/format.md section 5), so each quantizer here owns its grid end to end, including the
fp16 rounding of every stored scale:

* ``PerChannelW4``  q in [0, 15];  W = s1 * q - s1_szeros  with s1 = fp16((max - min) / 15),
  s1_szeros = fp16(z * s1).  The range [r * min, r * max] is clipped by a per-row ratio r (clipping search).
* ``GroupW4``       progressive: level 1 symmetric int8 per row with QServe's protective range [-119, 119]
  (s1 = fp16(max|W| / 119)); level 2 asymmetric uint4 per 128 inputs on the int8 values, integer s2 in 1..127 and
  z in 0..15, codes clamped so that q * s2 <= 255 and (q - z) * s2 stays in int8 (the kernel's byte arithmetic).
  W = s1 * (q - z) * s2.  Level-2 parameters are chosen when GPTQ reaches each group (``begin_group``), from the
  error-updated weights, as the candidate with the least (Hessian-diagonal weighted) squared error.
* ``W8``            symmetric int8 per row, s = fp16(r * max|W| / 127), q in [-127, 127].
"""

from __future__ import annotations

import torch

from vllm_qserve.packing import pack_w4, permute_s2

PROTECTIVE_RANGE = 119
GROUP = 128


FP16_TINY = 2.0 ** -24  # the smallest positive fp16 value


def _fp16_scale(x: torch.Tensor) -> torch.Tensor:
    """A scale rounded to the positive fp16 value the checkpoint will hold (kept in the working dtype); all-zero
    rows get the smallest one instead of 0, so that every division by it is defined."""
    return x.to(torch.float16).to(x.dtype).clamp(min=FP16_TINY)


class WeightQuantizer:
    group_size = -1
    weight_bits = 4

    def prepare(self, w: torch.Tensor, clip_ratio: torch.Tensor | float = 1.0) -> None:
        """Fix the per-row parameters from the full matrix w [N, K]."""
        raise NotImplementedError

    def begin_group(self, w_group: torch.Tensor, group_index: int, h_diag: torch.Tensor | None = None) -> None:
        """Group-wise grids: choose the parameters of the group starting now (no-op for per-row grids)."""

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of columns x [N, B] of the current group."""
        raise NotImplementedError

    def dequant(self, q: torch.Tensor) -> torch.Tensor:
        """What the kernel computes with for codes q [N, B] of the current group."""
        raise NotImplementedError

    def tensors(self, codes: torch.Tensor) -> dict:
        """QServe checkpoint tensors of the full code matrix [N, K]."""
        raise NotImplementedError

    def szeros(self) -> torch.Tensor | None:
        """Per-channel grids: the zero term s1_szeros that the epilogue multiplies by sum(x); else None."""
        return None

    def rtn(self, w: torch.Tensor, h_diag: torch.Tensor | None = None) -> tuple:
        """Round-to-nearest of a prepared quantizer over the whole matrix: (codes, dequantized)."""
        n, k = w.shape
        step = k if self.group_size == -1 else self.group_size
        codes, deq = torch.empty_like(w), torch.empty_like(w)
        for g, c in enumerate(range(0, k, step)):
            self.begin_group(w[:, c:c + step], g, None if h_diag is None else h_diag[c:c + step])
            codes[:, c:c + step] = self.codes(w[:, c:c + step])
            deq[:, c:c + step] = self.dequant(codes[:, c:c + step])
        return codes, deq


class PerChannelW4(WeightQuantizer):
    def prepare(self, w, clip_ratio=1.0):
        r = torch.as_tensor(clip_ratio, dtype=w.dtype, device=w.device)
        mn = (w.amin(1) * r).clamp(max=0)
        mx = (w.amax(1) * r).clamp(min=0)
        self.scale = _fp16_scale((mx - mn) / 15)
        self.zero = torch.round(-mn / self.scale).clamp(0, 15)
        self.s1_szeros = (self.zero * self.scale).to(torch.float16).to(w.dtype)

    def szeros(self):
        return self.s1_szeros

    def codes(self, x):
        return (torch.round(x / self.scale[:, None]) + self.zero[:, None]).clamp(0, 15)

    def dequant(self, q):
        return q * self.scale[:, None] - self.s1_szeros[:, None]

    def tensors(self, codes):
        return {"qweight": pack_w4(codes.round().to(torch.uint8)), "s1_scales": self.scale.to(torch.float16),
                "s1_szeros": self.s1_szeros.to(torch.float16)}


class GroupW4(WeightQuantizer):
    group_size = GROUP

    def prepare(self, w, clip_ratio=1.0):
        n, k = w.shape
        if k % GROUP:
            raise ValueError(f"input dim {k} is not a multiple of the group size {GROUP}")
        r = torch.as_tensor(clip_ratio, dtype=w.dtype, device=w.device)
        self.s1 = _fp16_scale(w.abs().amax(1) * r / PROTECTIVE_RANGE)
        self.s2 = torch.zeros(n, k // GROUP, dtype=w.dtype, device=w.device)
        self.z = torch.zeros_like(self.s2)
        self._g = None

    @staticmethod
    def _limits(s2, z):
        """Code range [lo, hi] for which q * s2 <= 255 and (q - z) * s2 lies in [-128, 127]."""
        lo = torch.maximum(torch.zeros_like(z), z + torch.ceil(-128 / s2))
        hi = torch.minimum(torch.minimum(torch.full_like(z, 15), torch.floor(255 / s2)), z + torch.floor(127 / s2))
        return lo, hi

    def begin_group(self, w_group, group_index, h_diag=None):
        x = (w_group / self.s1[:, None]).clamp(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)  # level-1 (int8) domain
        mn, mx = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
        base = torch.ceil((mx - mn) / 15).clamp(min=1)
        weight = None if h_diag is None else h_diag.to(x.dtype).clamp(min=0)[None, :]
        best_err, best = None, None
        for delta in (0, -1, -2):  # a slightly smaller step rounds more finely and clips the extremes
            s2 = (base + delta).clamp(1, 127)
            for z in (torch.round(-mn / s2), torch.round(15 - mx / s2)):  # anchored at the min or at the max
                z = z.clamp(0, 15)
                lo, hi = self._limits(s2, z)
                q = torch.minimum(torch.maximum(torch.round(x / s2[:, None]) + z[:, None], lo[:, None]), hi[:, None])
                d = (q - z[:, None]) * s2[:, None] - x
                err = (d * d * weight).sum(1) if weight is not None else (d * d).sum(1)
                if best_err is None:
                    best_err, best = err, (s2, z)
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best = (torch.where(better, s2, best[0]), torch.where(better, z, best[1]))
        self.s2[:, group_index], self.z[:, group_index] = best
        self._g = group_index
        self._lo, self._hi = self._limits(*best)

    def codes(self, x):
        g = self._g
        s2, z = self.s2[:, g, None], self.z[:, g, None]
        q = torch.round(x / (self.s1[:, None] * s2)) + z
        return torch.minimum(torch.maximum(q, self._lo[:, None]), self._hi[:, None])

    def dequant(self, q):
        g = self._g
        return self.s1[:, None] * ((q - self.z[:, g, None]) * self.s2[:, g, None])

    def tensors(self, codes):
        zeros = torch.remainder(-(self.z * self.s2), 256)  # the two's-complement byte of -(z * s2)
        zeros = torch.where(zeros > 127, zeros - 256, zeros)
        return {"qweight": pack_w4(codes.round().to(torch.uint8)), "s1_scales": self.s1.to(torch.float16),
                "s2_scales": permute_s2(self.s2.t().contiguous()).round().to(torch.int8),
                "s2_zeros": permute_s2(zeros.t().contiguous()).round().to(torch.int8)}


class W8(WeightQuantizer):
    weight_bits = 8

    def prepare(self, w, clip_ratio=1.0):
        r = torch.as_tensor(clip_ratio, dtype=w.dtype, device=w.device)
        self.scale = _fp16_scale(w.abs().amax(1) * r / 127)

    def codes(self, x):
        return torch.round(x / self.scale[:, None]).clamp(-127, 127)

    def dequant(self, q):
        return q * self.scale[:, None]

    def tensors(self, codes):
        return {"weight": codes.round().to(torch.int8), "dequant_scale": self.scale.to(torch.float16)}


def make_quantizer(weight_bits: int, group_size: int) -> WeightQuantizer:
    if weight_bits == 8:
        if group_size != -1:
            raise ValueError("W8A8 is per-channel only (group size -1)")
        return W8()
    if weight_bits != 4:
        raise ValueError(f"QServe weights are 4 or 8 bits, not {weight_bits}")
    if group_size == -1:
        return PerChannelW4()
    if group_size == GROUP:
        return GroupW4()
    raise ValueError(f"unsupported group size {group_size}: QServe has -1 (per-channel) and 128")
