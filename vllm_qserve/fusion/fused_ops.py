"""Fake (meta) implementations of the fused activation-quantization ops, so that vLLM's Dynamo tracing
(fullgraph), Inductor and CUDA-graph capture handle them without running them.

The ops themselves are defined in csrc/quant/fused_quant_ops.cpp (TORCH_LIBRARY_FRAGMENT(qserve)); their
numbers are those of vllm_qserve.reference.activation.{rms_norm_quant, add_rms_norm_quant, silu_mul_quant}.
Every output is contiguous, like the CUDA implementation's.
"""

from __future__ import annotations

import torch

FUSED_OP_NAMES = ("rms_norm_quant", "add_rms_norm_quant", "silu_mul_quant")


def fused_ops_available() -> bool:
    """True when the loaded extension defines the fused ops (an older or missing build does not)."""
    return all(hasattr(torch.ops.qserve, name) for name in FUSED_OP_NAMES)


def _quant_outputs(x: torch.Tensor, width, sum_mode: int):
    lead = x.shape[:-1]
    return (
        x.new_empty((*lead, width), dtype=torch.int8),
        x.new_empty(lead, dtype=torch.float32),
        x.new_empty(lead if sum_mode else (0,), dtype=torch.float32),
    )


def _rms_norm_quant_fake(x, weight, eps, sum_mode):
    return _quant_outputs(x, x.shape[-1], sum_mode)


def _add_rms_norm_quant_fake(x, residual, weight, eps, sum_mode):
    return (*_quant_outputs(x, x.shape[-1], sum_mode), x.new_empty(x.shape))


def _silu_mul_quant_fake(x, sum_mode):
    return _quant_outputs(x, x.shape[-1] // 2, sum_mode)


def _gelu_tanh_mul_quant_fake(x, sum_mode):
    return _quant_outputs(x, x.shape[-1] // 2, sum_mode)


# Newer than the three above: registered (and fused) only when the loaded build has it, so an older build keeps
# the other fusions.
GELU_OP_NAME = "gelu_tanh_mul_quant"


def gelu_op_available() -> bool:
    return hasattr(torch.ops.qserve, GELU_OP_NAME)


_registered = False
_gelu_registered = False


def register_fakes() -> bool:
    """Registers the fakes once, if the ops are defined (the extension is loaded); True when registered."""
    global _registered, _gelu_registered
    if not _gelu_registered and gelu_op_available():
        torch.library.register_fake(f"qserve::{GELU_OP_NAME}")(_gelu_tanh_mul_quant_fake)
        _gelu_registered = True
    if not _registered and fused_ops_available():
        torch.library.register_fake("qserve::rms_norm_quant")(_rms_norm_quant_fake)
        torch.library.register_fake("qserve::add_rms_norm_quant")(_add_rms_norm_quant_fake)
        torch.library.register_fake("qserve::silu_mul_quant")(_silu_mul_quant_fake)
        _registered = True
    return _registered


register_fakes()
