"""The KV4/KV8 paged-cache ops (csrc/attention/): fake implementations and thin Python wrappers.

Ops (schemas and argument rules: csrc/attention/kv_cache_ops.cpp; layout and numerics: reference/kv.py):

    torch.ops.qserve.kv_cache_write(key, value, kv_cache!, slot_mapping, num_kv_heads, bits)
    torch.ops.qserve.kv_paged_decode(out!, query, kv_cache, block_table, seq_lens, softmax_scale, num_kv_heads, bits,
                                     sliding_window=0)
    torch.ops.qserve.kv_paged_decode_splits(..., bits, num_splits, sliding_window=0)   explicit split count
    torch.ops.qserve.kv_decode_num_splits(query, kv_cache, block_table, num_kv_heads, bits, sliding_window=0) -> int

sliding_window > 0: the new token (position seq_len - 1) attends to the last sliding_window positions only.
    torch.ops.qserve.kv_gather_dequant(kv_cache, block_table, seq_lens, cu_seqlens_k, key_out!, value_out!,
                                       num_kv_heads, bits)

All mutate their `!` arguments and return nothing, so the fakes only have to exist (Dynamo / Inductor / CUDA-graph
capture trace them without running them).  kv_decode_num_splits is a host-side query and has no fake.
"""

from __future__ import annotations

import math

import torch

from vllm_qserve import ops as _ops

_MUTATING_OPS = ("kv_cache_write", "kv_paged_decode", "kv_paged_decode_splits", "kv_gather_dequant")


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.qserve, name)
        return True
    except (AttributeError, RuntimeError):
        return False


HAS_KV_OPS = _ops.HAS_CUDA_OPS and all(_op_defined(n) for n in _MUTATING_OPS)

if HAS_KV_OPS:

    @torch.library.register_fake("qserve::kv_cache_write")
    def _kv_cache_write_fake(key, value, kv_cache, slot_mapping, num_kv_heads, bits):
        return None

    @torch.library.register_fake("qserve::kv_paged_decode")
    def _kv_paged_decode_fake(out, query, kv_cache, block_table, seq_lens, softmax_scale, num_kv_heads, bits,
                              sliding_window=0):
        return None

    @torch.library.register_fake("qserve::kv_paged_decode_splits")
    def _kv_paged_decode_splits_fake(out, query, kv_cache, block_table, seq_lens, softmax_scale, num_kv_heads,
                                     bits, num_splits, sliding_window=0):
        return None

    @torch.library.register_fake("qserve::kv_gather_dequant")
    def _kv_gather_dequant_fake(kv_cache, block_table, seq_lens, cu_seqlens_k, key_out, value_out, num_kv_heads,
                                bits):
        return None


def page_bytes(num_kv_heads: int, head_dim: int, block_size: int, bits: int) -> int:
    """Bytes of one block's K (or V) page: H * block_size * (D * bits / 8 + 4)."""
    if bits not in (4, 8):
        raise ValueError(f"KV cache bits must be 4 or 8, got {bits}")
    return num_kv_heads * block_size * (head_dim * bits // 8 + 4)


def cache_block_size(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int, bits: int) -> int:
    """block_size of a cache uint8/int8 [num_blocks, 2, page_bytes] (what the kernels derive)."""
    per_token = page_bytes(num_kv_heads, head_dim, 1, bits)
    if kv_cache.dim() != 3 or kv_cache.shape[1] != 2 or kv_cache.shape[2] % per_token:
        raise ValueError(f"KV cache must be [num_blocks, 2, k * {per_token}] for num_kv_heads={num_kv_heads}, "
                         f"head_dim={head_dim}, bits={bits}; got {tuple(kv_cache.shape)}")
    return kv_cache.shape[2] // per_token


def write(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
          num_kv_heads: int, bits: int) -> None:
    """Quantize key/value [T, H, D] and store them at slot_mapping[:T] (-1 = skip)."""
    torch.ops.qserve.kv_cache_write(key, value, kv_cache, slot_mapping, num_kv_heads, bits)


def paged_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                 num_kv_heads: int, bits: int, softmax_scale: float | None = None, out: torch.Tensor | None = None,
                 num_splits: int | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """Decode attention of query [B, Hq, D] (one token per sequence) over the quantized cache -> out [B, Hq, D].

    sliding_window: attend to the last sliding_window positions only (None / 0: the whole sequence)."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(query.shape[-1])
    if out is None:
        out = torch.empty_like(query)
    if num_splits is None:
        torch.ops.qserve.kv_paged_decode(out, query, kv_cache, block_table, seq_lens, softmax_scale, num_kv_heads,
                                         bits, sliding_window or 0)
    else:
        torch.ops.qserve.kv_paged_decode_splits(out, query, kv_cache, block_table, seq_lens, softmax_scale,
                                                num_kv_heads, bits, num_splits, sliding_window or 0)
    return out


def gather_dequant(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, num_kv_heads: int, head_dim: int, bits: int, total_rows: int,
                   dtype: torch.dtype = torch.float16, key_out: torch.Tensor | None = None,
                   value_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K/V of every sequence into rows cu_seqlens_k[b] .. + seq_lens[b] of [total_rows, H, D] tensors.

    Rows outside those ranges are left as they were (uninitialised when the outputs are allocated here).
    """
    shape = (total_rows, num_kv_heads, head_dim)
    if key_out is None:
        key_out = kv_cache.new_empty(shape, dtype=dtype)
    if value_out is None:
        value_out = kv_cache.new_empty(shape, dtype=dtype)
    torch.ops.qserve.kv_gather_dequant(kv_cache, block_table, seq_lens, cu_seqlens_k, key_out, value_out,
                                       num_kv_heads, bits)
    return key_out, value_out
