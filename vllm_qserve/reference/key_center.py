"""Key centring for quantized KV caches: cache RoPE_p(k - m), add R_p m back after dequantization.

Why: some models' keys have channels that are nearly constant before RoPE (Qwen2.5's k_proj bias: mean -145, std
0.3 in one channel, against ~5 for ordinary channels).  After RoPE such a channel is a slowly rotating constant: it
carries a large, position-dependent logit term q . R_p m that must stay, but almost no per-token information, and
per-token 4-bit keys spend their whole range on it (Qwen2.5-Coder-1.5B: 146,663 perplexity with 4-bit keys against
19.39 with 16-bit ones; docs/accuracy.md).

RoPE is linear, so RoPE_p(k) = RoPE_p(k - m) + R_p m for any vector m: caching the first term and adding the second
after dequantization is exact in real arithmetic, whatever m is; with m = the calibrated mean pre-RoPE key of the
layer (per KV head and channel), the cached term is small and 4 bits are spent on information (1.5B: +4.0% with
4-bit keys and values).

RoPE convention: rotate-half ("neox") over the whole head, the one of Llama, Qwen2 and Mistral in vLLM and in
transformers: o1 = x1 cos - x2 sin, o2 = x2 cos + x1 sin, x1 / x2 the two halves of the head.
"""

from __future__ import annotations

import torch


def rope_offset(mean: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R_p m: mean [H, D] rotated to each position; cos, sin [n, D/2] (one row per position) -> [n, H, D] fp32."""
    d = mean.shape[1]
    if d % 2 or cos.shape[-1] != d // 2 or sin.shape != cos.shape:
        raise ValueError(f"key centre of head size {d} needs cos/sin [n, {d // 2}], got {tuple(cos.shape)} / "
                         f"{tuple(sin.shape)}")
    m1, m2 = mean.float()[None, :, : d // 2], mean.float()[None, :, d // 2:]
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    return torch.cat([m1 * c - m2 * s, m2 * c + m1 * s], dim=-1)


class KeyCenter:
    """The key centre of one attention layer: mean pre-RoPE key [Hkv, D] and the layer's RoPE table.

    cos_sin [max_positions, D] holds cos in its first half and sin in its second (vLLM's ``cos_sin_cache``)."""

    def __init__(self, mean: torch.Tensor, cos_sin: torch.Tensor):
        if mean.dim() != 2:
            raise ValueError(f"key centre must be [num_kv_heads, head_size], got {tuple(mean.shape)}")
        if cos_sin.dim() != 2 or cos_sin.shape[1] != mean.shape[1]:
            raise ValueError(f"key centre: RoPE table must be [positions, {mean.shape[1]}] (full-head rotary), got "
                             f"{tuple(cos_sin.shape)}")
        self.mean = mean.float()
        self.cos_sin = cos_sin.float()

    def offset(self, positions: torch.Tensor, max_position: int | None = None) -> torch.Tensor:
        """R_p m for positions [n] -> [n, Hkv, D] fp32.  max_position: a bound the caller knows on the host (no
        device sync); without it the positions are checked against the table here."""
        top = max_position if max_position is not None else (int(positions.max()) if positions.numel() else -1)
        if top >= self.cos_sin.shape[0]:
            raise ValueError(f"key centre: position {top} beyond the RoPE table ({self.cos_sin.shape[0]} positions)")
        cos, sin = self.cos_sin[positions.long()].chunk(2, dim=-1)
        return rope_offset(self.mean, cos, sin)

    def add_to_(self, keys: torch.Tensor, positions: torch.Tensor, max_position: int | None = None,
                chunk: int = 1 << 15) -> torch.Tensor:
        """keys [n, Hkv, D] += R_p m, in place, in chunks of positions (a gathered context of a large batch holds
        ~10^6 keys: the fp32 offsets of all of them at once would take gigabytes).  max_position: as in offset()."""
        if keys.shape[0] != positions.shape[0] or keys.shape[1:] != self.mean.shape:
            raise ValueError(f"key centre [{tuple(self.mean.shape)}]: keys {tuple(keys.shape)} and positions "
                             f"{tuple(positions.shape)} do not match")
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else -1
        for i in range(0, keys.shape[0], chunk):
            k = keys[i:i + chunk]
            k.copy_((k.float() + self.offset(positions[i:i + chunk], max_position)).to(k.dtype))
        return keys


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Position of each of the batch's first num_tokens tokens: request r's tokens are the last q_r of its
    seq_len_r.  Padding tokens past the batch's last request (slot -1, never written) get position 0.  Only
    fixed-size device ops (no host sync): every key-centred write of a step runs it."""
    qsl = query_start_loc.long()
    tok = torch.arange(num_tokens, device=qsl.device)
    req = torch.searchsorted(qsl[1:], tok, right=True).clamp(max=qsl.numel() - 2)  # request of each token
    pos = seq_lens.long()[req] - (qsl[req + 1] - tok)
    return torch.where(tok < qsl[-1], pos, torch.zeros_like(pos))
