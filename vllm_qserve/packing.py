"""QServe's on-disk 4-bit weight layout and level-2 scale order.

The layout exists so that one 128-bit shared-memory load hands each lane of a warp its complete B fragment for
``mma.sync.m16n8k32.s8`` (four n8 MMAs over rows r, r+8, r+16, r+24).  See docs/format.md for the derivation.

    q[n, k] in [0, 15], shape [N, K]  -->  qweight int8 [N, K/2]

* The matrix is cut into 32x32 tiles, 512 bytes each, tile (nt, kt) at byte offset (nt * K/32 + kt) * 512.
* Inside a tile, byte = lane * 16 + j with lane = r * 4 + t (r in 0..7, t in 0..3) and j = kh * 8 + nh * 4 + e.
* Low nibble:  q[nt*32 + nh*8 + r,      kt*32 + kh*16 + t*4 + e]
  High nibble: q[nt*32 + nh*8 + r + 16, kt*32 + kh*16 + t*4 + e]

Group-128 level-2 scales/zeros are stored [K/128, N] with the N axis permuted inside each block of 32 output
channels: stored position p = (n % 8) * 4 + (n % 32) // 8, i.e. channels 0, 8, 16, 24, 1, 9, 17, 25, ...
"""

from __future__ import annotations

import torch

TILE = 32  # output channels and input channels per packed tile
TILE_BYTES = TILE * TILE // 2


def check_packable(n: int, k: int) -> None:
    if n % TILE != 0:
        raise ValueError(f"QServe 4-bit packing needs the output dim to be a multiple of {TILE}, got {n}")
    if k % TILE != 0:
        raise ValueError(f"QServe 4-bit packing needs the input dim to be a multiple of {TILE}, got {k}")


def pack_w4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes q [N, K] (any integer dtype, values 0..15) into QServe's int8 [N, K/2]."""
    if q.dim() != 2:
        raise ValueError(f"pack_w4 expects a 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    n, k = q.shape
    check_packable(n, k)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_w4: codes must lie in [0, 15]")
    q = q.to(torch.uint8)
    # row = nt*32 + hi*16 + nh*8 + r ; col = kt*32 + kh*16 + t*4 + e
    v = q.view(n // 32, 2, 2, 8, k // 32, 2, 4, 4)  # nt, hi, nh, r, kt, kh, t, e
    v = v.permute(0, 4, 3, 6, 5, 2, 7, 1)  # nt, kt, r, t, kh, nh, e, hi
    packed = v[..., 0] | (v[..., 1] << 4)
    return packed.reshape(n, k // 2).view(torch.int8)


def unpack_w4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_w4: int8 [N, K/2] -> uint8 codes [N, K] in natural (row = output channel) order."""
    if qweight.dim() != 2:
        raise ValueError(f"unpack_w4 expects a 2-D [N, K/2] tensor, got shape {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    check_packable(n, k)
    b = qweight.contiguous().view(torch.uint8).view(n // 32, k // 32, 8, 4, 2, 2, 4)  # nt, kt, r, t, kh, nh, e
    both = torch.stack((b & 0x0F, b >> 4), dim=-1)  # ..., hi
    q = both.permute(0, 7, 5, 2, 1, 4, 3, 6)  # nt, hi, nh, r, kt, kh, t, e
    return q.reshape(n, k)


def permute_s2(s: torch.Tensor) -> torch.Tensor:
    """Natural channel order [..., N] -> QServe's stored order (0, 8, 16, 24, 1, 9, ... inside every 32)."""
    *lead, n = s.shape
    if n % TILE != 0:
        raise ValueError(f"group scales need the output dim to be a multiple of {TILE}, got {n}")
    return s.reshape(*lead, n // 32, 4, 8).transpose(-1, -2).reshape(*lead, n)


def unpermute_s2(s: torch.Tensor) -> torch.Tensor:
    """QServe's stored group-scale order [..., N] -> natural channel order."""
    *lead, n = s.shape
    if n % TILE != 0:
        raise ValueError(f"group scales need the output dim to be a multiple of {TILE}, got {n}")
    return s.reshape(*lead, n // 32, 8, 4).transpose(-1, -2).reshape(*lead, n)


def slice_packed_input_dim(qweight: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Columns [start, start+length) of the *unpacked* input dim, taken from a packed [N, K/2] tensor.

    Packing is local to 32x32 tiles, so a split along K is a split of whole tiles: view the bytes as
    [N/32, K/32, 512] and narrow the tile axis.  (A plain column slice of the [N, K/2] view would be wrong.)
    """
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if start % TILE or length % TILE:
        raise ValueError(f"input-dim shards of a packed QServe weight must be multiples of {TILE} "
                         f"(got start {start}, length {length})")
    if start + length > k:
        raise ValueError(f"input-dim shard [{start}, {start + length}) exceeds K={k}")
    tiles = qweight.reshape(n // 32, k // 32, TILE_BYTES)
    return tiles.narrow(1, start // 32, length // 32).reshape(n, length // 2)
