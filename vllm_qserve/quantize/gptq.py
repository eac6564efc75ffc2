"""GPTQ (Frantar et al., 2022) over QServe's weight grids.

Minimises ||X W^T - X Q^T||^2 column by column: each column is rounded on its grid and the rounding error is
spread over the columns not yet quantized, weighted by the inverse Hessian H^-1 = (X^T X)^-1 (Cholesky form).
Rows are independent given H, so projections that read the same input (q/k/v, gate/up) are quantized together.

Blocks are the grid's groups (128 columns), so a group's level-2 parameters are chosen from the weights exactly as
updated by all previous groups.  Per-channel grids (parameters fixed up front) may visit the columns in
decreasing Hessian-diagonal order ("act-order"), which quantizes the most important inputs first.
"""

from __future__ import annotations

import contextlib

import torch

from vllm_qserve.quantize.quantizers import WeightQuantizer


@contextlib.contextmanager
def single_thread():
    """The column loop is thousands of tiny tensor ops: one thread avoids OpenMP start-up and, on a shared
    machine, spin-waiting for a busy core (measured 10x faster on a loaded 2-core CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class Hessian:
    """Running X^T X (float64) of a layer input over calibration tokens."""

    def __init__(self, k: int, device="cpu"):
        self.h = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.h.device != x.device:
            self.h = self.h.to(x.device)
        self.h += (x.t() @ x).double()  # fp32 products per batch, fp64 accumulation over batches
        self.tokens += x.shape[0]

    def scaled(self, s: torch.Tensor) -> torch.Tensor:
        """H of the input x / s (a smoothing scale moved into the weights)."""
        inv = 1.0 / s.to(torch.float64)
        return self.h * inv[:, None] * inv[None, :]


def gptq(w: torch.Tensor, h: torch.Tensor, quantizer: WeightQuantizer, damp: float = 0.01,
         act_order: bool = True) -> tuple:
    """w [N, K] (prepared quantizer), h [K, K] -> (codes [N, K], dequantized [N, K]), natural column order.

    The column loop runs in w's dtype (float32 is GPTQ's usual precision); H is inverted in float64.
    """
    dtype = w.dtype
    w = w.clone()
    h = h.clone().to(torch.float64)
    n, k = w.shape
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    group = quantizer.group_size if quantizer.group_size > 0 else None
    perm = None
    if act_order and group is None:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    diag_h = torch.diagonal(h).clone()
    h.diagonal().add_(damp * diag_h.mean())
    hinv = _inverse_cholesky_upper(h).to(dtype)
    diag_h = diag_h.to(dtype)

    block = group or 128
    codes = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    _column_loop(w, hinv, diag_h, quantizer, codes, deq, group, block)
    if perm is not None:
        inv = torch.argsort(perm)
        codes, deq = codes[:, inv], deq[:, inv]
    return codes, deq


def _column_loop(w, hinv, diag_h, quantizer, codes, deq, group, block):
    k = w.shape[1]
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        with single_thread():
            if group is not None:
                quantizer.begin_group(w1, b0 // group, diag_h[b0:b1])
            for i in range(b1 - b0):
                col = w1[:, i:i + 1]
                q = quantizer.codes(col)
                dq = quantizer.dequant(q)
                codes[:, b0 + i] = q[:, 0]
                deq[:, b0 + i] = dq[:, 0]
                e = (col - dq) / hinv1[i, i]
                w1[:, i:] -= e * hinv1[i, i:][None, :]
                err1[:, i] = e[:, 0]
        if b1 < k:
            w[:, b1:] -= err1 @ hinv[b0:b1, b1:]


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding damping until H is numerically positive definite.

    With P the reversal permutation, P H P = L L^T gives H = V V^T with V = P L P upper triangular, so
    H^-1 = (V^-1)^T V^-1 and V^-1 is the factor: one Cholesky and one triangular inverse (half the work of
    inverting H and factorizing again, which dominates a K = 8960 layer on a CPU).  float32 first (GPTQ's usual
    precision), float64 when float32 fails."""
    mean = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for dtype in (torch.float32, torch.float64):
        extra = 0.0
        for _ in range(6):
            try:
                hd = (h if extra == 0 else h + extra * mean * eye).to(dtype)
                v = torch.linalg.cholesky(hd.flip(0, 1)).flip(0, 1)
                eye_d = torch.eye(h.shape[0], dtype=dtype, device=h.device)
                out = torch.linalg.solve_triangular(v, eye_d, upper=True)
                if torch.isfinite(out).all():
                    return out.to(h.dtype)
            except torch.linalg.LinAlgError:
                pass
            extra = 0.01 if extra == 0 else extra * 4
    raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even with strong damping "
                       "(too few calibration tokens for this layer?)")
