"""vllm-qserve: QServe W4A8KV4 (QoQ) inference as a vLLM plugin.

vLLM calls `register()` in every process through the `vllm.general_plugins` entry point.  It must be idempotent
and must not initialise CUDA.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from vllm_qserve.config import QServeConfig

    register_quantization_config("qserve")(QServeConfig)
    from vllm_qserve import ops  # noqa: F401  (registers torch.ops.qserve.* and their fake impls)
    from vllm_qserve.attention import selection

    selection.install()  # KV4/KV8 cache + attention backend for qserve checkpoints (see attention/selection.py)

    _registered = True
