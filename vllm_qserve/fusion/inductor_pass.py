"""QServeFusionPass: replaces norm/activation -> qserve.quantize_per_token with one fused op (patterns.py).

It runs inside vLLM's PostGradPassManager (install.py puts it there), i.e. on every piecewise graph Inductor
compiles, after vLLM's own fusions and before vLLM-IR lowering (so RMSNorm is still `vllm_ir.*`).  After
matching it counts the qserve ops left in the graph, logs them at INFO, and appends them to REPLACEMENT_LOG
(read by the tests from inside the engine process).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import torch
import torch._inductor.pattern_matcher as pm
from vllm.compilation.passes.inductor_pass import InductorPass, enable_fake_mode, get_pass_context
from vllm.compilation.passes.vllm_inductor_pass import (
    VllmFusionPatternMatcherPass,
    VllmInductorPass,
    VllmPatternMatcherPass,
)
from vllm.config import VllmConfig
from vllm.logger import init_logger

from vllm_qserve.fusion.fused_ops import FUSED_OP_NAMES
from vllm_qserve.fusion.patterns import QuantFusionPattern, build_patterns

logger = init_logger("vllm.vllm_qserve.fusion")  # under "vllm." so vLLM's handlers print it

# One entry per graph the pass ran on: {"range": compile range, op name: count, ...}.  Process-local.
REPLACEMENT_LOG: list[dict] = []

_DEFAULT_EPSILONS = (1e-5, 1e-6)  # vLLM's RMSNorm default and the most common checkpoint value
_SOURCES = ("patterns.py", "inductor_pass.py", "fused_ops.py")


def model_epsilons(config: VllmConfig) -> tuple[float, ...]:
    """The model's rms_norm_eps (if its config has one) and the common defaults, in a stable order."""
    eps = set(_DEFAULT_EPSILONS)
    model_config = config.model_config
    if model_config is not None:
        hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
        value = getattr(hf, "rms_norm_eps", None)
        if isinstance(value, (int, float)) and value > 0:
            eps.add(float(value))
    return tuple(sorted(eps))


def count_qserve_ops(graph: torch.fx.Graph) -> Counter:
    """How many fused ops (and plain quantizers) the graph calls."""
    from vllm_qserve.fusion.fused_ops import GELU_OP_NAME, gelu_op_available

    names = (*FUSED_OP_NAMES, "quantize_per_token") + ((GELU_OP_NAME,) if gelu_op_available() else ())
    targets = {getattr(torch.ops.qserve, name).default: name for name in names}
    counts: Counter = Counter({name: 0 for name in targets.values()})
    for node in graph.nodes:
        if node.op == "call_function" and node.target in targets:
            counts[targets[node.target]] += 1
    return counts


def _source_digest() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


class QServeFusionPass(VllmFusionPatternMatcherPass):
    def __init__(self, config: VllmConfig) -> None:
        super().__init__(config, "qserve_fusion_pass")
        self.epsilons = model_epsilons(config)
        dtype = self.model_dtype if self.model_dtype in (torch.float16, torch.bfloat16, torch.float32) \
            else torch.float16
        for pr in build_patterns(self.epsilons, dtype):
            self.register(pr)
        self.dump_patterns(config, self.pm_pass)

    @enable_fake_mode
    def register(self, pr: QuantFusionPattern) -> None:  # the base class's, plus extra_check
        pm.register_replacement(pr.pattern, pr.replacement, pr.get_inputs(), self._trace_fn, self.pm_pass,
                                extra_check=pr.extra_check)
        self._pattern_replacements.append(pr)

    def uuid(self) -> str:
        """Content-based (keys vLLM's and Inductor's compile caches): this package's sources, the patterns
        (epsilons, dtype, sum_mode, SiLU forms) and the fused ops' schemas."""
        schemas = [str(getattr(torch.ops.qserve, n).default._schema) for n in FUSED_OP_NAMES]
        return InductorPass.hash_dict({
            "source": _source_digest(),
            "patterns": [pr.key for pr in self._pattern_replacements],
            "schemas": schemas,
        })

    @VllmInductorPass.time_and_log
    def __call__(self, graph: torch.fx.Graph) -> None:
        self.matched_count = self.pm_pass.apply(graph)
        VllmPatternMatcherPass.match_table[self.pass_name] += self.matched_count
        counts = count_qserve_ops(graph)
        try:
            compile_range = str(get_pass_context().compile_range)
        except AssertionError:  # outside vLLM's pass context (unit tests driving the pass directly)
            compile_range = "?"
        REPLACEMENT_LOG.append({"range": compile_range, **counts})
        logger.info(
            "qserve fusion (compile range %s): %d rms_norm_quant, %d add_rms_norm_quant, %d silu_mul_quant, "
            "%d gelu_tanh_mul_quant; %d quantize_per_token left (inputs with no norm/activation in front, e.g. "
            "o_proj's)", compile_range, counts["rms_norm_quant"], counts["add_rms_norm_quant"],
            counts["silu_mul_quant"], counts["gelu_tanh_mul_quant"], counts["quantize_per_token"])
