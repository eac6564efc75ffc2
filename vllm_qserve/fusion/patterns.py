"""What QServeFusionPass looks for in vLLM's post-grad FX graph, and what it puts in its place.

A QServe linear layer's apply() starts with `torch.ops.qserve.quantize_per_token(x, sum_mode)` (see
vllm_qserve/kernels/cuda.py), so in the compiled graph of a Llama-style decoder layer the quantizer follows
    * `vllm_ir.rms_norm`            (the first layer's input norm)                     -> qserve.rms_norm_quant
    * `vllm_ir.fused_add_rms_norm`  (every other norm; returns the new residual too)   -> qserve.add_rms_norm_quant
    * SiLU-and-mul, as vLLM traces it: native `silu(x[..., :d]) * x[..., d:]` (Inductor's default custom_ops
      "none") or `auto_functionalized(_C.silu_and_mul)` (custom op enabled)              -> qserve.silu_mul_quant
RMSNorm reaches the graph as the vLLM-IR ops in every configuration (RMSNorm.forward_native calls them, and the
IR lowering runs after the post-grad passes), so one form per norm suffices.  The attention output (o_proj's
input) has nothing in front to fuse with and keeps the plain quantizer.

Each pattern exists per epsilon (the model's rms_norm_eps; Inductor ignores float literals in its first match
and re-checks them against the traced pattern, so a norm with another eps is left alone) and per sum_mode
(per-channel W4A8 consumes the activation sum, the other modes do not, so their graphs differ by one output; the
two per-channel sums (reference/activation.py) differ only by the int literal, which Inductor's first match
ignores and its re-check compares, so each mode only ever takes its own replacement).
Patterns are traced in the model's activation dtype, because the native SiLU decomposition contains casts only
for fp16/bf16.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized
from torch._inductor.pattern_matcher import Match
from vllm.compilation.passes.vllm_inductor_pass import VllmPatternReplacement
from vllm.model_executor.layers.activation import SiluAndMul

from vllm_qserve.reference.activation import NO_SUM, SUM_OF_INPUT, SUM_OF_QUANTIZED

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _quantize(y: torch.Tensor, sum_mode: int) -> tuple:
    q = torch.ops.qserve.quantize_per_token.default(y, sum_mode)
    return (q[0], q[1], q[2]) if sum_mode else (q[0], q[1])


def _quant_outputs(fused: tuple, sum_mode: int) -> tuple:
    """The fused op's (xq, scale, xsum, ...) cut to what the pattern returns."""
    return (fused[0], fused[1], fused[2]) if sum_mode else (fused[0], fused[1])


def _val(match: Match, name: str):
    node = match.kwargs[name]
    return node.meta["val"] if isinstance(node, torch.fx.Node) else node


class QuantFusionPattern(VllmPatternReplacement):
    """One pattern -> fused-op replacement.  `fused_op` names the op it produces (the pass counts by it)."""

    fused_op: str = "?"

    def __init__(self, dtype: torch.dtype, sum_mode: int):
        self.dtype = dtype
        self.sum_mode = sum_mode

    @property
    def key(self) -> str:
        """Stable description (part of the pass uuid)."""
        return f"{type(self).__name__}(dtype={self.dtype}, sum_mode={self.sum_mode})"

    def extra_check(self, match: Match) -> bool:
        """The kernels take fp16/bf16/fp32 activations and a norm weight of the activation dtype (vLLM's
        rms_norm casts to the weight's dtype before the gain, which the kernels do not model)."""
        x = _val(match, "x")
        if x.dtype not in ACT_DTYPES:
            return False
        if "weight" in match.kwargs:
            w = _val(match, "weight")
            return w is not None and w.dtype == x.dtype and w.dim() == 1
        return True

    def act(self, *shape: int) -> torch.Tensor:
        return self.empty(*shape, dtype=self.dtype)


class RmsNormQuantPattern(QuantFusionPattern):
    fused_op = "rms_norm_quant"

    def __init__(self, eps: float, dtype: torch.dtype, sum_mode: int):
        super().__init__(dtype, sum_mode)
        self.eps = eps

    @property
    def key(self) -> str:
        return f"{super().key[:-1]}, eps={self.eps!r})"

    def get_inputs(self) -> list[torch.Tensor]:
        return [self.act(5, 16), self.act(16)]

    @property
    def pattern(self):
        eps, sum_mode = self.eps, self.sum_mode

        def _pattern(x: torch.Tensor, weight: torch.Tensor):
            y = torch.ops.vllm_ir.rms_norm.default(x, weight, eps, None)
            return _quantize(y, sum_mode)

        return _pattern

    @property
    def replacement(self):
        eps, sum_mode = self.eps, self.sum_mode

        def _replacement(x: torch.Tensor, weight: torch.Tensor):
            return _quant_outputs(torch.ops.qserve.rms_norm_quant.default(x, weight, eps, sum_mode), sum_mode)

        return _replacement


class AddRmsNormQuantPattern(QuantFusionPattern):
    fused_op = "add_rms_norm_quant"

    def __init__(self, eps: float, dtype: torch.dtype, sum_mode: int):
        super().__init__(dtype, sum_mode)
        self.eps = eps

    @property
    def key(self) -> str:
        return f"{super().key[:-1]}, eps={self.eps!r})"

    def get_inputs(self) -> list[torch.Tensor]:
        return [self.act(5, 16), self.act(5, 16), self.act(16)]

    @property
    def pattern(self):
        eps, sum_mode = self.eps, self.sum_mode

        def _pattern(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
            y, new_residual = torch.ops.vllm_ir.fused_add_rms_norm.default(x, residual, weight, eps, None)
            return (*_quantize(y, sum_mode), new_residual)

        return _pattern

    @property
    def replacement(self):
        eps, sum_mode = self.eps, self.sum_mode

        def _replacement(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
            fused = torch.ops.qserve.add_rms_norm_quant.default(x, residual, weight, eps, sum_mode)
            return (*_quant_outputs(fused, sum_mode), fused[3])

        return _replacement


class SiluMulQuantPattern(QuantFusionPattern):
    """custom_op=False: SiluAndMul.forward_native as traced; True: vLLM's _C.silu_and_mul custom op."""

    fused_op = "silu_mul_quant"

    def __init__(self, dtype: torch.dtype, sum_mode: int, custom_op: bool):
        super().__init__(dtype, sum_mode)
        self.custom_op = custom_op

    @property
    def key(self) -> str:
        return f"{super().key[:-1]}, custom_op={self.custom_op})"

    def get_inputs(self) -> list[torch.Tensor]:
        return [self.act(5, 8)]

    @property
    def pattern(self):
        sum_mode, custom_op = self.sum_mode, self.custom_op

        def _pattern(x: torch.Tensor):
            if custom_op:
                d = x.shape[-1] // 2
                out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
                op = torch.ops._C.silu_and_mul.default
                # the output argument is `result` in the CUDA build and `out` in the CPU build
                out_name = op._schema.arguments[0].name
                y = auto_functionalized(op, **{out_name: out, "input": x})[1]
            else:
                y = SiluAndMul.forward_native(x)
            return _quantize(y, sum_mode)

        return _pattern

    @property
    def replacement(self):
        sum_mode = self.sum_mode

        def _replacement(x: torch.Tensor):
            return _quant_outputs(torch.ops.qserve.silu_mul_quant.default(x, sum_mode), sum_mode)

        return _replacement


class GeluTanhMulQuantPattern(SiluMulQuantPattern):
    """GeGLU (Gemma): GeluAndMul("tanh").forward_native as traced, or vLLM's _C.gelu_tanh_and_mul custom op."""

    fused_op = "gelu_tanh_mul_quant"

    @property
    def pattern(self):
        sum_mode, custom_op = self.sum_mode, self.custom_op

        def _pattern(x: torch.Tensor):
            d = x.shape[-1] // 2
            if custom_op:
                out = torch.empty(x.shape[:-1] + (d,), dtype=x.dtype, device=x.device)
                op = torch.ops._C.gelu_tanh_and_mul.default
                out_name = op._schema.arguments[0].name
                y = auto_functionalized(op, **{out_name: out, "input": x})[1]
            else:
                y = torch.nn.functional.gelu(x[..., :d], approximate="tanh") * x[..., d:]
            return _quantize(y, sum_mode)

        return _pattern

    @property
    def replacement(self):
        sum_mode = self.sum_mode

        def _replacement(x: torch.Tensor):
            return _quant_outputs(torch.ops.qserve.gelu_tanh_mul_quant.default(x, sum_mode), sum_mode)

        return _replacement


def gelu_tanh_custom_op_available() -> bool:
    try:
        torch.ops._C.gelu_tanh_and_mul.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def silu_custom_op_available() -> bool:
    try:
        torch.ops._C.silu_and_mul.default  # noqa: B018  (vLLM's compiled op; absent in a bare torch)
    except (AttributeError, RuntimeError):
        return False
    return True


def build_patterns(epsilons, dtype: torch.dtype) -> list[QuantFusionPattern]:
    """All patterns for a model: residual-add norms first (vLLM's order for norm patterns), then plain norms,
    then SiLU-and-mul in both traced forms."""
    out: list[QuantFusionPattern] = []
    sums = (SUM_OF_INPUT, SUM_OF_QUANTIZED, NO_SUM)
    out += [AddRmsNormQuantPattern(eps, dtype, s) for eps in epsilons for s in sums]
    out += [RmsNormQuantPattern(eps, dtype, s) for eps in epsilons for s in sums]
    forms = (False, True) if silu_custom_op_available() else (False,)
    out += [SiluMulQuantPattern(dtype, s, form) for form in forms for s in sums]
    from vllm_qserve.fusion.fused_ops import gelu_op_available

    if gelu_op_available():  # GeGLU (Gemma); an older extension build simply leaves it unfused
        forms = (False, True) if gelu_tanh_custom_op_available() else (False,)
        out += [GeluTanhMulQuantPattern(dtype, s, form) for form in forms for s in sums]
    return out
