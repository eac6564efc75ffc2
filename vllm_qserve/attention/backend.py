"""The vLLM attention backend for QServe's KV4/KV8 cache (registered in vLLM's ``CUSTOM`` slot).

Page layout: one kernel block of one layer is ``uint8 [2, page_bytes]`` (K page, V page), each page QServe's
``data [H][block_size][D*bits/8]``, then ``scales fp16 [H][block_size]``, then ``zeros fp16 [H][block_size]``.
That is exactly the ``2*B*H*(D*bits/8 + 4)`` bytes vLLM budgets for ``int4_per_token_head`` /
``int8_per_token_head``, so vLLM's block manager, prefix caching and preemption work unchanged: every block holds
its own scales and zeros, and a block shared by a prefix-cache hit is never rewritten.

Batches are reordered decodes-first (``reorder_batch_threshold = 1``).  Decodes go to the paged decode kernel;
everything else (prompts, chunked-prefill chunks, prefix-cache continuations) attends over the *quantized* cache,
new tokens included, so that a prompt token's attention sees the same K/V that a later decode step will.
Key-centred checkpoints (reference/key_center.py) are the exception: the decode kernel does not add the centre
back, so the builder marks none of their requests as decodes and all take the prefill path.

CUDA graphs: ``UNIFORM_SINGLE_TOKEN_DECODE`` — pure-decode batches run in full CUDA graphs (the decode kernel's
grid depends only on shapes); mixed and prefill batches run piecewise (the prefill path sizes its workspace from
host-side lengths).  Key-centred checkpoints: no full graphs (``NEVER``), piecewise only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from vllm.config import CUDAGraphMode
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_qserve.attention import KV_CACHE_DTYPE_BITS
from vllm_qserve.attention.kernels import KVSpec, choose_kv_kernel
from vllm_qserve.reference.key_center import token_positions

logger = init_logger(f"vllm.{__name__}")


def kv_page_bytes(block_size: int, num_kv_heads: int, head_size: int, bits: int) -> int:
    """Bytes of one K (or V) page of one layer."""
    return block_size * num_kv_heads * (head_size * bits // 8 + 4)


def kv_bits_of(cache_dtype_str: str) -> int:
    try:
        return KV_CACHE_DTYPE_BITS[cache_dtype_str]
    except KeyError:
        raise ValueError(f"the qserve KV backend serves --kv-cache-dtype {sorted(KV_CACHE_DTYPE_BITS)}, not "
                         f"{cache_dtype_str!r} (16-bit KV runs on vLLM's own backends)") from None


class QServeKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPE_BITS)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM maps the name back to its enum: the plugin slot is CUSTOM

    @staticmethod
    def get_supported_kernel_block_sizes():
        return [16, 32, 64]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 256]

    @staticmethod
    def get_impl_cls():
        return QServeKVImpl

    @staticmethod
    def get_builder_cls():
        return QServeKVMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        bits = kv_bits_of(cache_dtype_str)
        if (head_size * bits) % 8:
            raise ValueError(f"head size {head_size} cannot be packed at {bits} bits")
        return (num_blocks, 2, kv_page_bytes(block_size, num_kv_heads, head_size, bits))

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        if include_num_layers_dimension:
            raise NotImplementedError("qserve KV pages are per layer (no cross-layer layout)")
        return (0, 1, 2)

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # per layer (Gemma 2/3's local layers): decode skips older pages, prefill cuts the context

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class QServePrefillMetadata:
    """The non-decode requests of a batch (they follow the decodes)."""

    block_table: torch.Tensor  # [P, max_blocks]
    seq_lens: torch.Tensor  # [P] int32, context + new tokens
    cu_seqlens_q: torch.Tensor  # [P + 1] int32, relative to the first prefill token
    cu_seqlens_k: torch.Tensor  # [P + 1] int32
    max_query_len: int
    max_seq_len: int
    total_kv_tokens: int
    seq_lens_cpu: torch.Tensor | None = None  # [P] int32, host copies (sliding-window layers cut the context)
    query_lens_cpu: torch.Tensor | None = None  # [P] int32
    first_pos: torch.Tensor | None = None  # [P] position of each sequence's first gathered key (None: all 0)
    context_positions: torch.Tensor | None = None  # [total_kv_tokens] key positions, once per step (key centring)
    windowed: dict = field(default_factory=dict)  # sliding window -> QServePrefillMetadata of the window


@dataclass
class QServeKVMetadata:
    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    prefill: QServePrefillMetadata | None = None
    token_positions: torch.Tensor | None = None  # filled on first use by key-centred layers


class QServeKVMetadataBuilder(AttentionMetadataBuilder[QServeKVMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        # Key-centred checkpoints: the CUDA decode kernel does not add the key centre back, so every request goes
        # the prefill way (dequantize, add R_p m, FlashAttention); see CudaKVKernel.
        self.no_decodes = _key_centred(vllm_config)
        if self.no_decodes:
            check_centred_write_outside_graphs(vllm_config, device)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        # Without the decode kernel no batch is shape-static: vLLM then captures piecewise graphs only.
        return AttentionCGSupport.NEVER if _key_centred(vllm_config) else cls._cudagraph_support

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> QServeKVMetadata:
        cm = common_attn_metadata
        if self.no_decodes:
            num_decodes, num_prefills, num_decode_tokens = 0, cm.num_reqs, 0
        else:
            num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        md = QServeKVMetadata(num_actual_tokens=cm.num_actual_tokens, num_decodes=num_decodes,
                              num_decode_tokens=num_decode_tokens, num_prefills=num_prefills,
                              max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
                              query_start_loc=cm.query_start_loc, seq_lens=cm.seq_lens,
                              block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping)
        if num_prefills:
            md.prefill = self._build_prefill(cm, num_decodes, num_decode_tokens)
        return md

    def _build_prefill(self, cm, num_decodes: int, num_decode_tokens: int) -> QServePrefillMetadata:
        # Host-side lengths size the dequantization workspace; prefill batches are never in a full CUDA graph.
        lo, hi = num_decodes, cm.num_reqs
        qsl_cpu = cm.query_start_loc_cpu[lo:hi + 1]
        seq_cpu = cm.seq_lens_cpu[lo:hi].to(torch.int32)
        q_lens = qsl_cpu[1:] - qsl_cpu[:-1]
        cu_k = torch.zeros(hi - lo + 1, dtype=torch.int32)
        torch.cumsum(seq_cpu, 0, out=cu_k[1:])
        dev = cm.seq_lens.device
        return QServePrefillMetadata(
            block_table=cm.block_table_tensor[lo:hi],
            seq_lens=cm.seq_lens[lo:hi],
            cu_seqlens_q=(cm.query_start_loc[lo:hi + 1] - num_decode_tokens).to(torch.int32),
            cu_seqlens_k=cu_k.to(dev, non_blocking=True),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_cpu.max()),
            total_kv_tokens=int(cu_k[-1]),
            seq_lens_cpu=seq_cpu,
            query_lens_cpu=q_lens.to(torch.int32),
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> QServeKVMetadata:
        md = self.build(0, common_attn_metadata)
        # The kernel reads lengths from device memory at replay; capturing with length 1 keeps capture fast.
        md.seq_lens.fill_(1)
        return md


class QServeKVImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes,
                 sliding_window, kv_cache_dtype: str, logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks=None, **extra) -> None:
        unsupported = {"ALiBi slopes": alibi_slopes is not None, "logits soft-capping": bool(logits_soft_cap),
                       "attention sinks": sinks is not None,
                       f"attention type {attn_type}": attn_type != AttentionType.DECODER}
        bad = [name for name, present in unsupported.items() if present]
        if bad:
            raise NotImplementedError(f"the qserve KV4/KV8 attention backend does not support {', '.join(bad)}; "
                                      f"use a 16-bit KV cache (--kv-cache-dtype auto with a kv_bits=16 checkpoint, "
                                      f"or --kv-cache-dtype float16/bfloat16)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        # Gemma 2/3, Mistral: vLLM passes the layer's window (None for global layers); W means a token attends to
        # itself and the W - 1 positions before it (FlashAttention's window_size = (W - 1, 0)).
        if sliding_window is not None and int(sliding_window) <= 0:
            raise ValueError(f"qserve KV backend: sliding window must be a positive number of tokens, got "
                             f"{sliding_window}")
        self.sliding_window = None if sliding_window is None else int(sliding_window)
        self.kv_cache_dtype = kv_cache_dtype
        self.bits = kv_bits_of(kv_cache_dtype)
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        self.kernel = None

    def _kernel(self, x: torch.Tensor, layer):
        if self.kernel is None:
            center = key_center_of(layer)
            spec = KVSpec(self.num_heads, self.num_kv_heads, self.head_size, self.bits, x.dtype, x.device.type,
                          key_center=center is not None)
            self.kernel = choose_kv_kernel(spec)
            logger.info_once("qserve KV cache: %d-bit per token and head (fp16 scale + zero)%s, kernel %s",
                             self.bits, ", centred keys" if center is not None else "", self.kernel.name)
        return self.kernel

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if self.kv_sharing_target_layer_name is not None:
            return
        kernel, center, offset = self._kernel(key, layer), key_center_of(layer), None
        if center is not None:
            from vllm.model_executor.layers.attention.attention import get_attention_context

            md = get_attention_context(layer.layer_name)[0]
            if md is not None:  # (None: the profiling run, whose cache contents are never read)
                positions = _new_token_positions(md, slot_mapping.shape[0])
                offset = center.offset(positions, max_position=md.max_seq_len - 1)  # a host bound: no sync
        kernel.write(key, value, kv_cache, slot_mapping, key_offset=offset)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("qserve KV backend: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        q = query.view(-1, self.num_heads, self.head_size)
        out = output.view(-1, self.num_heads, self.head_size)
        self._kernel(q, layer).attend(q, kv_cache, attn_metadata, self.scale, out, self.sliding_window,
                                      key_center=key_center_of(layer))
        return output


def _key_centred(vllm_config) -> bool:
    """The served checkpoint centres its keys (quantization_config.key_center)."""
    return bool(getattr(getattr(vllm_config, "quant_config", None), "key_center", False))


def check_centred_write_outside_graphs(vllm_config, device) -> None:
    """The centred KV write keeps per-step Python state (token positions cached on the step's metadata, a host
    bound on them): a captured CUDA graph would replay the capture's.  vLLM's default splitting ops keep the
    KV-cache update out of the graphs; refuse a compilation config that puts it in."""
    cc = vllm_config.compilation_config
    if (torch.device(device).type == "cuda" and cc.cudagraph_mode != CUDAGraphMode.NONE
            and not cc.splitting_ops_contain_kv_cache_update()):
        raise ValueError("qserve: a key-centred checkpoint needs the KV-cache update outside CUDA graphs "
                         "(vllm::unified_kv_cache_update among the compilation splitting ops, vLLM's default); "
                         "this compilation config captures it: use the default splitting ops or --enforce-eager")


def _new_token_positions(md: "QServeKVMetadata", num_tokens: int) -> torch.Tensor:
    """The batch's token positions, computed once per step: every key-centred layer of the step shares them."""
    if md.token_positions is None or md.token_positions.numel() != num_tokens:
        md.token_positions = token_positions(md.query_start_loc, md.seq_lens, num_tokens)
    return md.token_positions


def key_center_of(layer):
    """The layer's KeyCenter (set by the qserve key-centre method after loading a key-centred checkpoint)."""
    return getattr(layer, "qserve_key_center", None)
