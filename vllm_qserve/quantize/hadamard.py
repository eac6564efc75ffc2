"""Orthogonal rotations for the residual stream and the attention heads: Hadamard matrices where they exist.

Hadamard rather than random: every output coordinate mixes all inputs with equal weight +-1/sqrt(n), which spreads
an outlier channel evenly over all channels (QuaRot; QoQ's rotation).  Orders of the form 12^a * 2^b are built from
Paley's 12x12 matrix and Sylvester's doubling (hidden sizes such as 576 = 12 * 48 or 1536 = 12 * 128 need the 12);
any other order falls back to a seeded random orthogonal matrix, which is still an exact re-parametrisation.
"""

from __future__ import annotations

import torch


def _paley12() -> torch.Tensor:
    """The 12x12 Hadamard matrix of Paley's first construction with q = 11."""
    q = 11
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([[0 if (j - i) % q == 0 else (1 if (j - i) % q in squares else -1) for j in range(q)]
                        for i in range(q)], dtype=torch.float64)
    s = torch.zeros(12, 12, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, chi
    return torch.eye(12, dtype=torch.float64) + s


def is_hadamard_order(n: int) -> bool:
    while n % 12 == 0:
        n //= 12
    return n >= 1 and n & (n - 1) == 0


def orthogonal_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """Normalised Hadamard matrix of order n (n = 12^a * 2^b), else a seeded random orthogonal matrix (float64)."""
    h, m = torch.ones(1, 1, dtype=torch.float64), n
    while m % 12 == 0:
        h, m = torch.kron(h, _paley12()), m // 12
    if m & (m - 1) == 0:
        syl = torch.ones(1, 1, dtype=torch.float64)
        while syl.shape[0] < m:
            syl = torch.cat([torch.cat([syl, syl], 1), torch.cat([syl, -syl], 1)], 0)
        return torch.kron(h, syl) / n ** 0.5
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))
