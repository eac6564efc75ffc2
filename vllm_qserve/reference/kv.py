"""KV-cache quantization (per token and KV head, asymmetric, fp16 scale + fp16 zero) and paged attention.

    scale = (max - min) / L          L = 15 (KV4) or 255 (KV8); stored fp16
    zero  = -min / scale             stored fp16 and *not* rounded to an integer (QServe's convention)
    q     = clamp(rint(x / scale + zero), 0, L)
    x'    = (q - zero) * scale       (with the fp16-rounded scale and zero)

A constant vector (max == min) gets scale 1 and zero -min, which reproduces it exactly when min is fp16-exact.

Page layout (one vLLM block of one layer, uint8 [2, page_bytes], K then V), QServe's own:
    data   [H][block_size][D * bits / 8]   KV4: channel 2i in the low nibble, 2i+1 in the high nibble
    scales [H][block_size] fp16
    zeros  [H][block_size] fp16
so page_bytes = H * block_size * (D * bits / 8 + 4): exactly vLLM's int4/int8_per_token_head budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _levels(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"KV cache quantization supports 4 or 8 bits, got {bits}")
    return (1 << bits) - 1


def quantize_kv(x: torch.Tensor, bits: int):
    """x [..., D] -> (codes uint8 [..., D], scale fp16 [...], zero fp16 [...])."""
    levels = _levels(bits)
    xf = x.float()
    mn, mx = xf.amin(dim=-1), xf.amax(dim=-1)
    # tensor/tensor division: PyTorch's CUDA division by a Python scalar multiplies by the reciprocal (not IEEE)
    scale = (mx - mn) / torch.full_like(mx, float(levels))
    flat = scale == 0
    scale = torch.where(flat, torch.ones_like(scale), scale).to(torch.float16)
    zero = (-mn / scale.float()).to(torch.float16)
    q = torch.round(xf / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).clamp(0, levels)
    return q.to(torch.uint8), scale, zero


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """-> fp32 [..., D]."""
    return (codes.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., D] (values < 16) -> [..., D/2], channel 2i low nibble, 2i+1 high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


@dataclass(frozen=True)
class KVCacheLayout:
    num_kv_heads: int
    head_dim: int
    block_size: int
    bits: int

    @property
    def data_bytes_per_token_head(self) -> int:
        return self.head_dim * self.bits // 8

    @property
    def page_bytes(self) -> int:
        """Bytes of one block for K (or V) of one layer."""
        return self.num_kv_heads * self.block_size * (self.data_bytes_per_token_head + 4)

    def allocate(self, num_blocks: int, device=None) -> torch.Tensor:
        return torch.zeros(num_blocks, 2, self.page_bytes, dtype=torch.uint8, device=device)

    def views(self, cache: torch.Tensor):
        """cache uint8 [nb, 2, page_bytes] -> (data [nb,2,H,bs,Db], scale fp16 [nb,2,H,bs], zero fp16 [nb,2,H,bs])."""
        nb = cache.shape[0]
        h, bs, db = self.num_kv_heads, self.block_size, self.data_bytes_per_token_head
        if cache.dim() != 3 or cache.shape[1] != 2 or cache.shape[2] != self.page_bytes:
            raise ValueError(f"KV cache must be uint8 [num_blocks, 2, {self.page_bytes}], got {tuple(cache.shape)}")
        n_data = h * bs * db
        data = cache[..., :n_data].view(nb, 2, h, bs, db)
        scale = cache[..., n_data:n_data + 2 * h * bs].view(torch.float16).view(nb, 2, h, bs)
        zero = cache[..., n_data + 2 * h * bs:].view(torch.float16).view(nb, 2, h, bs)
        return data, scale, zero


def write_kv_cache(key, value, cache, slot_mapping, layout: KVCacheLayout, key_offset=None) -> None:
    """Quantize key/value [T, H, D] and scatter them to slots (block * block_size + offset); slot -1 is skipped.
    key_offset [T, H, D] (key centring, reference/key_center.py): subtracted from the keys before quantization."""
    data, scale, zero = layout.views(cache)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blk, off = slots // layout.block_size, slots % layout.block_size
    if key_offset is not None:
        key = (key.float() - key_offset.float()).to(key.dtype)
    for kv_idx, x in enumerate((key, value)):
        codes, s, z = quantize_kv(x[valid], layout.bits)  # [t, H, D], [t, H]
        if layout.bits == 4:
            codes = pack_nibbles(codes)
        # advanced indexing [blk, kv, :, off] -> [t, H, ...]
        data[blk, kv_idx, :, off] = codes
        scale[blk, kv_idx, :, off] = s
        zero[blk, kv_idx, :, off] = z


def gather_kv(cache, block_table_row, seq_len: int, layout: KVCacheLayout, start: int = 0):
    """Dequantized K and V [seq_len - start, H, D] (fp32) of positions start .. seq_len - 1 of one sequence."""
    data, scale, zero = layout.views(cache)
    pos = torch.arange(start, seq_len, device=cache.device)
    blk = block_table_row[pos // layout.block_size].long()
    off = pos % layout.block_size
    out = []
    for kv_idx in (0, 1):
        codes = data[blk, kv_idx, :, off]  # [S, H, Db]
        if layout.bits == 4:
            codes = unpack_nibbles(codes)
        out.append(dequantize_kv(codes, scale[blk, kv_idx, :, off], zero[blk, kv_idx, :, off]))
    return out[0], out[1]


def paged_attention(query, cache, block_table, seq_lens, query_start_loc, layout: KVCacheLayout,
                    softmax_scale: float | None = None, sliding_window: int | None = None,
                    key_center=None) -> torch.Tensor:
    """Causal attention of new tokens over a paged quantized cache that already holds them.

    query [T, Hq, D]; block_table [B, max_blocks]; seq_lens [B] (context + new tokens); query_start_loc [B+1].
    Covers decode (1 new token), prefill, chunked prefill and prefix-cache hits alike.  fp32 softmax.
    sliding_window W: the token at position p attends to positions p - W + 1 .. p (vLLM's and FlashAttention's
    window_size = (W - 1, 0), transformers' ``q - k < W``).  Positions older than the first query's window are
    never read: vLLM's sliding-window manager may already have given their blocks to other requests.
    key_center (reference/key_center.KeyCenter): the cache holds centred keys; R_p m is added back after
    dequantization.  Returns fp32 [T, Hq, D].
    """
    t, hq, d = query.shape
    h = layout.num_kv_heads
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=query.device)
    for b in range(block_table.shape[0]):
        q0, q1 = int(query_start_loc[b]), int(query_start_loc[b + 1])
        if q1 == q0:
            continue
        s = int(seq_lens[b])
        start = max(0, s - (q1 - q0) - sliding_window + 1) if sliding_window else 0
        k, v = gather_kv(cache, block_table[b], s, layout, start)
        if key_center is not None:
            k = k + key_center.offset(torch.arange(start, s, device=k.device)).to(k.device)
        k = k.repeat_interleave(hq // h, dim=1)
        v = v.repeat_interleave(hq // h, dim=1)
        q = query[q0:q1].float()
        logits = torch.einsum("qhd,khd->hqk", q, k) * scale
        qpos = torch.arange(s - (q1 - q0), s, device=query.device)
        kpos = torch.arange(start, s, device=query.device)
        mask = kpos[None, :] > qpos[:, None]
        if sliding_window is not None:
            mask |= kpos[None, :] <= qpos[:, None] - sliding_window
        logits = logits.masked_fill(mask[None], float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), v)
    return out
