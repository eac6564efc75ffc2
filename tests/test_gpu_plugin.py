"""GPU checks of the foundation: the op-registration pattern (compiled op + fake impl under torch.compile) and
QServe fixture checkpoints served by vLLM on CUDA.  Skipped without a GPU."""

import pytest
import torch

from tests.conftest import requires_gpu

pytestmark = requires_gpu
FP16_TOL = 0.6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 64), (7, 576), (33, 4096), (300, 14336), (5, 1000)])
def test_quantize_per_token_op_matches_reference(dtype, m, k):
    from vllm_qserve import ops, reference

    assert ops.HAS_CUDA_OPS, ops.CUDA_OPS_IMPORT_ERROR
    x = (torch.randn(m, k, device="cuda") * 4).to(dtype)
    x[0, :3] = 0
    if m > 2:
        x[2] = 0  # all-zero token
    xq, s, xsum = torch.ops.qserve.quantize_per_token(x, True)
    rq, rs, rsum = reference.quantize_per_token(x, 1)
    assert torch.equal(xq, rq) and torch.equal(s, rs)
    assert torch.allclose(xsum, rsum, rtol=1e-5, atol=1e-3 * k ** 0.5)
    assert not torch.isnan(s).any() and not torch.isnan(xsum).any()


def test_quantize_per_token_op_traces_under_torch_compile():
    """The fake impl lets Dynamo trace the op with fullgraph=True (what vLLM's compile does)."""
    import vllm_qserve.ops  # noqa: F401

    def f(x):
        xq, s, xsum = torch.ops.qserve.quantize_per_token(x, True)
        return xq.float() * s[:, None], xsum

    x = torch.randn(9, 256, device="cuda", dtype=torch.float16)
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    a, b = compiled(x)
    ea, eb = f(x)
    assert torch.equal(a, ea) and torch.equal(b, eb)


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [-1, 128])
def test_fixture_on_gpu_matches_reference(fixture_ckpt, tmp_path, group_size):
    from tests.test_vllm_cpu_e2e import check_against_reference, check_layers_exact, prompts, run_vllm

    ckpt = fixture_ckpt(group_size=group_size)
    ps = prompts(ckpt[2].vocab_size)
    eager = run_vllm(tmp_path, model=ckpt[0], prompts=ps, dtype="float16", enforce_eager=True)
    check_layers_exact(ckpt[0], eager["probe_path"])
    # An fp16 model (attention, norms and residual stream in fp16) against the fp32 reference: fp16 rounding
    # flips activation codes more often than fp32 does, so the per-token tolerance is 0.6 nats here, and a
    # sequence may leave the reference at its first token when that token is a near-tie (seen on the H100 for
    # the per-channel fixture: two of three prompts).  Every divergence must still be a near-tie.
    check_against_reference(ckpt, eager["generations"], ps, tol=FP16_TOL, min_compared=1)
    graphs = run_vllm(model=ckpt[0], prompts=ps, dtype="float16", enforce_eager=False)  # compile + CUDA graphs
    check_against_reference(ckpt, graphs["generations"], ps, tol=FP16_TOL, min_compared=1)
