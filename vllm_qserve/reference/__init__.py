"""Pure-PyTorch reference numerics of QServe W4A8KV4: the contract every compiled kernel is tested against.

Device-agnostic and traceable (torch.compile on CPU runs it inside vLLM).  Integer accumulations are exact:
they run in float64, which represents every partial sum of int8 x int8 products up to K = 2^37 exactly.
"""

from vllm_qserve.reference.activation import (
    NO_SUM,
    SUM_OF_INPUT,
    SUM_OF_QUANTIZED,
    ACTIVATION_SUM_MODES,
    quantize_per_token,
    rms_norm,
    rms_norm_quant,
    add_rms_norm_quant,
    silu_and_mul,
    silu_mul_quant,
    gelu_tanh_and_mul,
    gelu_tanh_mul_quant,
)
from vllm_qserve.reference.gemm import (
    dequantize_w4_per_channel,
    dequantize_w4_per_group,
    rebuild_w8_per_group,
    w4a8_per_channel,
    w4a8_per_group,
    w8a8,
    int_matmul_exact,
)
from vllm_qserve.reference.kv import (
    quantize_kv,
    dequantize_kv,
    KVCacheLayout,
    write_kv_cache,
    paged_attention,
)

__all__ = [
    "quantize_per_token", "rms_norm", "rms_norm_quant", "add_rms_norm_quant", "silu_and_mul", "silu_mul_quant",
    "gelu_tanh_and_mul", "gelu_tanh_mul_quant",
    "dequantize_w4_per_channel", "dequantize_w4_per_group", "rebuild_w8_per_group", "w4a8_per_channel",
    "w4a8_per_group", "w8a8", "int_matmul_exact", "quantize_kv", "dequantize_kv", "KVCacheLayout",
    "write_kv_cache", "paged_attention",
]
