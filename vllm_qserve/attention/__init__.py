"""QServe's quantized KV cache (KV4 / KV8, per token and KV head, asymmetric, fp16 scale and zero) as a vLLM
attention backend.

vLLM 0.26 already budgets QServe's page for ``--kv-cache-dtype int4_per_token_head`` (and the 8-bit variant for
``int8_per_token_head``); the backend registered in vLLM's ``CUSTOM`` slot lays those bytes out the way QServe does
(``vllm_qserve.reference.kv.KVCacheLayout``) and runs our kernels (CUDA) or the PyTorch reference (CPU).
"""

KV_CACHE_DTYPE_BITS = {"int4_per_token_head": 4, "int8_per_token_head": 8}
BITS_TO_KV_CACHE_DTYPE = {bits: name for name, bits in KV_CACHE_DTYPE_BITS.items()}
BACKEND_PATH = "vllm_qserve.attention.backend.QServeKVBackend"
