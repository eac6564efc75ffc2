"""Puts QServeFusionPass into vLLM's compilation with no flag from the user.

vLLM builds one PostGradPassManager per compiled model and calls its `configure(vllm_config)` before the first
Inductor compile (compilation/backends.py, VllmBackend.configure_post_pass).  We wrap that method once per
process: after vLLM's own configure, the pass is appended if the model being compiled is a QServe model, the
platform is CUDA and the extension has the fused ops.  This is an internal vLLM API (0.26); the wrapper is
idempotent, never raises into vLLM (a failure is logged and the model runs unfused), and touches nothing for
other models.  The public alternative, `compilation_config.inductor_passes["post_grad_custom_post_pass"]`, needs
a user flag (or a config hook) and takes the single slot a user may want for their own pass.

VLLM_QSERVE_DISABLE_FUSION=1 keeps the quantizers unfused (to compare, or to rule the pass out).
"""

from __future__ import annotations

import functools
import os

from vllm.logger import init_logger

logger = init_logger("vllm.vllm_qserve.fusion")

DISABLE_ENV = "VLLM_QSERVE_DISABLE_FUSION"
_HOOK_ATTR = "_qserve_fusion_hook"


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def fusion_decision(vllm_config) -> tuple[bool, str]:
    """(True, "") when the pass should run for this config, else (False, why)."""
    if os.environ.get(DISABLE_ENV, "0").lower() not in ("", "0", "false", "no", "off"):
        return False, f"{DISABLE_ENV} is set"
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None or (model_config.quantization or "").lower() != "qserve":
        return False, "not a QServe model"
    if not _on_cuda():
        return False, "not a CUDA platform (the fused kernels are CUDA only)"
    from vllm_qserve.fusion.fused_ops import fused_ops_available

    if not fused_ops_available():
        return False, "the CUDA extension vllm_qserve._C has no fused activation-quant ops (not built?)"
    return True, ""


def add_fusion_pass(pass_manager, vllm_config) -> bool:
    """Appends QServeFusionPass to a configured PostGradPassManager if fusion_decision allows; True if added."""
    ok, why = fusion_decision(vllm_config)
    if not ok:
        if why != "not a QServe model":
            logger.info("qserve fusion pass not installed: %s", why)
        return False
    if any(type(p).__name__ == "QServeFusionPass" for p in pass_manager.passes):
        return False  # configure() ran twice on this manager
    from vllm.config import set_current_vllm_config

    from vllm_qserve.fusion.inductor_pass import QServeFusionPass

    with set_current_vllm_config(vllm_config, check_compile=False):
        pass_manager.add(QServeFusionPass(vllm_config))
    logger.info("qserve fusion pass installed (norm/SiLU-and-mul -> int8 quantization fused)")
    return True


def install_pass_manager_hook() -> None:
    """Wraps PostGradPassManager.configure (once per process) so that QServe models get the fusion pass.

    Called when a QServe config hands out its first linear method (QServeConfig.get_quant_method), i.e. in the
    process that builds and then compiles the model, before compilation; that is also where vLLM imports its
    pass manager anyway, so no other process pays for the import."""
    try:
        from vllm.compilation.passes.pass_manager import PostGradPassManager
    except Exception:  # a vLLM without this internal API: serve unfused
        logger.exception("qserve fusion: vLLM's PostGradPassManager is not importable; quantizers stay unfused")
        return

    original = PostGradPassManager.configure
    if getattr(original, _HOOK_ATTR, False):
        return

    @functools.wraps(original)
    def configure(self, config) -> None:
        original(self, config)
        try:
            add_fusion_pass(self, config)
        except Exception:  # never take vLLM's compilation down: run unfused, loudly
            logger.exception("qserve fusion pass could not be installed; the model runs with unfused quantizers")

    setattr(configure, _HOOK_ATTR, True)
    PostGradPassManager.configure = configure
