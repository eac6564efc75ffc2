"""GPU: qserve.gelu_tanh_mul_quant (GeGLU -> per-token int8, Gemma's MLP) against the reference composition
vllm_qserve.reference.activation.gelu_tanh_mul_quant, like tests/test_fused_quant_kernels.py does for SiLU.

Contract: the gated value gelu_tanh(g) is rounded to the activation dtype, times up, rounded (eager PyTorch's and
vLLM's GeluAndMul("tanh") order); then the per-token quantizer of docs/format.md.  The kernel's tanhf may differ
from PyTorch's by an ulp in fp32, which can move the rounded gelu value to the neighbouring fp16/bf16 number and,
at a .5 boundary, a code by one: codes may differ by at most 1, in at most 0.5% of the elements; scales and sums
are compared with the matching relative tolerance.  Outputs are poisoned first; NaN checked; odd widths, strided
rows, 0 rows, edge rows (zeros, huge, tiny) and with_sum both ways.
"""

import pytest
import torch

from vllm_qserve import ops
from vllm_qserve.reference import activation as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not ops.HAS_CUDA_OPS
                                or not hasattr(torch.ops.qserve, "gelu_tanh_mul_quant"),
                                reason="needs a CUDA GPU and vllm_qserve._C with gelu_tanh_mul_quant")

DTYPES = [torch.float16, torch.bfloat16]


def _check(x, with_sum):
    xq, scale, xsum = torch.ops.qserve.gelu_tanh_mul_quant(x, with_sum)
    rq, rscale, rsum = ref.gelu_tanh_mul_quant(x, with_sum)
    d = x.shape[-1] // 2
    assert xq.shape == (*x.shape[:-1], d) and xq.dtype == torch.int8
    assert scale.dtype == torch.float32 and not scale.isnan().any()
    diff = (xq.int() - rq.int()).abs()
    worst = int(diff.max()) if diff.numel() else 0
    assert worst <= 1, f"codes differ by {worst}"
    assert diff.float().mean() <= 0.005 if diff.numel() else True, f"{int((diff > 0).sum())} codes differ"
    eps = 2.0 ** -10 if x.dtype == torch.float16 else 2.0 ** -7
    torch.testing.assert_close(scale, rscale, rtol=eps, atol=1e-30)
    if with_sum:
        y = ref.gelu_tanh_and_mul(x).float()
        row_l1 = y.abs().sum(-1).max() if y.numel() else y.new_zeros(())
        torch.testing.assert_close(xsum, rsum, rtol=1e-4, atol=float(eps * row_l1) + 1e-6)
    else:
        assert xsum.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [1, 7, 64, 2048, 6912, 10240, 21504])  # 2048: Gemma-3-270M; 10240/21504: 4B/27B
@pytest.mark.parametrize("with_sum", [True, False])
def test_gelu_tanh_mul_quant_matches_reference(dtype, d, with_sum):
    g = torch.Generator(device="cuda").manual_seed(d)
    x = (torch.randn(37, 2 * d, device="cuda", generator=g) * 3).to(dtype)
    _check(x, with_sum)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_gelu_tanh_mul_quant_edges_strides_and_empty(dtype):
    d = 512
    x = torch.randn(6, 2 * d, device="cuda").to(dtype)
    x[0] = 0  # amax 0: codes 0, scale 0
    x[1, :d] = 12.0  # gelu saturates (= g)
    x[2, :d] = -12.0  # gelu -> -0
    x[3] *= 1e-3
    x[4, d:] = 100.0
    _check(x, True)
    wide = torch.randn(9, 2 * d + 64, device="cuda").to(dtype)
    _check(wide[:, 32:32 + 2 * d], True)  # strided rows (row stride != width)
    _check(torch.empty(0, 2 * d, device="cuda", dtype=dtype), True)
    _check(torch.randn(2, 3, 2 * d, device="cuda").to(dtype), False)  # leading dims
    with pytest.raises(RuntimeError, match="even"):
        torch.ops.qserve.gelu_tanh_mul_quant(torch.randn(4, 7, device="cuda").half(), False)


def test_gelu_tanh_mul_quant_in_cuda_graph():
    x = torch.randn(16, 4096, device="cuda").half()
    torch.ops.qserve.gelu_tanh_mul_quant(x, True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.qserve.gelu_tanh_mul_quant(x, True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    ref_q, _, _ = ref.gelu_tanh_mul_quant(x, True)
    assert (out[0].int() - ref_q.int()).abs().max() <= 1
