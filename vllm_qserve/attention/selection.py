"""How a qserve checkpoint gets its quantized KV cache without expert flags.

vLLM 0.26 gives a quantization method no say over the KV-cache dtype or the attention backend, so two of its
functions are wrapped (once, idempotently, from ``register()``), and only ever change a *default*:

1. ``--kv-cache-dtype auto`` (vLLM's default) on a ``qserve`` model whose quantization_config says ``kv_bits`` 4 or
   8 resolves to ``int4_per_token_head`` / ``int8_per_token_head``, exactly as vLLM itself resolves ``auto`` from a
   ModelOpt checkpoint's kv_cache_quant_algo.  An explicit ``--kv-cache-dtype`` always wins (``float16`` /
   ``bfloat16`` give vLLM's own 16-bit KV for any precision).
2. The platform's attention-backend choice: for a ``qserve`` model with a per-token-head int4/int8 cache and no
   ``--attention-backend`` (or ``CUSTOM``), the qserve backend.  Other models keep vLLM's choice (its Triton int4
   KV uses another format).  On CPU vLLM ignores ``--attention-backend`` altogether, so the same rule applies there.

Official zoo checkpoints carry no quantization_config, hence no kv_bits: they get the 16-bit KV cache unless the
user asks for ``--kv-cache-dtype int4_per_token_head`` (one flag, which is how QServe's zoo models were meant to run).
"""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from vllm_qserve.attention import BACKEND_PATH, BITS_TO_KV_CACHE_DTYPE, KV_CACHE_DTYPE_BITS

logger = init_logger(f"vllm.{__name__}")


def checkpoint_kv_bits(model_config) -> int:
    """kv_bits declared by a qserve checkpoint (16 when it declares none)."""
    from vllm_qserve.config import QServeConfig

    hf_config = getattr(model_config, "hf_config", None)
    quant_cfg = getattr(hf_config, "quantization_config", None)
    if not isinstance(quant_cfg, dict):
        return 16
    try:
        return QServeConfig.from_config(quant_cfg).kv_bits
    except ValueError:
        return 16


def default_kv_cache_dtype(kv_cache_dtype: str, model_config) -> str:
    if kv_cache_dtype != "auto" or getattr(model_config, "quantization", None) != "qserve":
        return kv_cache_dtype
    bits = checkpoint_kv_bits(model_config)
    if bits in BITS_TO_KV_CACHE_DTYPE:
        resolved = BITS_TO_KV_CACHE_DTYPE[bits]
        logger.info("qserve: the checkpoint declares kv_bits=%d -> --kv-cache-dtype %s (QServe KV%d: per token and "
                    "head, fp16 scale and zero); pass --kv-cache-dtype float16/bfloat16 for a 16-bit cache",
                    bits, resolved, bits)
        return resolved
    return kv_cache_dtype


def _is_qserve_model() -> bool:
    from vllm.config import get_current_vllm_config

    try:
        model_config = get_current_vllm_config().model_config
    except Exception:
        return False
    return getattr(model_config, "quantization", None) == "qserve"


def wants_qserve_backend(selected_backend, attn_selector_config) -> bool:
    if attn_selector_config.kv_cache_dtype not in KV_CACHE_DTYPE_BITS or attn_selector_config.use_mla:
        return False
    name = getattr(selected_backend, "name", None)
    if name == "CUSTOM":
        return True
    return name in (None, "CPU_ATTN") and _is_qserve_model()


def _fix_sliding_window_int4_page() -> None:
    """vLLM 0.26's ``SlidingWindowSpec.real_page_size_bytes`` ignores int4 packing (``AttentionSpec``'s own
    property halves the head size for ``INT4_PER_TOKEN_HEAD``; the sliding-window override forgot it), so a
    sliding-window layer's KV4 page is budgeted at 2x its size and differs from the global layers' page: a model
    that mixes both (Gemma 2/3) then fails to start ("page size is not divisible ...") with any int4 backend.  The
    override below is the base rule for int4 and leaves every other mode to vLLM's code.  Idempotent."""
    from vllm.v1.kv_cache_interface import AttentionSpec, KVQuantMode, SlidingWindowSpec

    original = SlidingWindowSpec.real_page_size_bytes
    if getattr(original.fget, "_qserve_wrapped", False):
        return

    def real_page_size_bytes(self) -> int:
        if self.kv_quant_mode == KVQuantMode.INT4_PER_TOKEN_HEAD and self.head_size_v == self.head_size:
            return AttentionSpec.real_page_size_bytes.fget(self)
        return original.fget(self)

    real_page_size_bytes._qserve_wrapped = True
    SlidingWindowSpec.real_page_size_bytes = property(real_page_size_bytes)


def install() -> None:
    """Wraps vLLM's KV-dtype resolution and the current platform's backend choice (idempotent)."""
    import vllm.engine.arg_utils as arg_utils
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _fix_sliding_window_int4_page()

    resolve = arg_utils.resolve_kv_cache_dtype_string
    if not getattr(resolve, "_qserve_wrapped", False):
        @functools.wraps(resolve)
        def resolve_with_qserve(kv_cache_dtype, model_config):
            return default_kv_cache_dtype(resolve(kv_cache_dtype, model_config), model_config)

        resolve_with_qserve._qserve_wrapped = True
        arg_utils.resolve_kv_cache_dtype_string = resolve_with_qserve

    platform_cls = type(current_platform)
    choose = platform_cls.get_attn_backend_cls  # bound classmethod
    if not getattr(choose, "_qserve_wrapped", False):
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
            if wants_qserve_backend(selected_backend, attn_selector_config):
                logger.info_once("qserve: attention backend %s for --kv-cache-dtype %s", BACKEND_PATH,
                                 attn_selector_config.kv_cache_dtype)
                return BACKEND_PATH
            return choose(selected_backend, attn_selector_config, *args, **kwargs)

        get_attn_backend_cls._qserve_wrapped = True
        platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
