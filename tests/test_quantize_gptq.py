"""QServe weight grids and GPTQ (vllm_qserve.quantize.quantizers / gptq), on random matrices with outliers.

* What a quantizer says the kernel computes (``dequant``) is what the reference kernels compute from the
  checkpoint tensors it writes (``tensors``), element for element, and the codes respect the format's limits.
* GPTQ lowers the layer-output error ||X (W - Q)^T|| against round-to-nearest on the same grid; with a diagonal
  Hessian (no correlations to exploit) it *is* round-to-nearest.
"""

from __future__ import annotations

import pytest
import torch

from vllm_qserve.packing import unpack_w4, unpermute_s2
from vllm_qserve.quantize.gptq import gptq
from vllm_qserve.quantize.quantizers import GroupW4, PerChannelW4, W8, make_quantizer
from vllm_qserve.reference import dequantize_w4_per_channel, dequantize_w4_per_group, rebuild_w8_per_group

GRIDS = [(4, -1), (4, 128), (8, -1)]


def weights(n=96, k=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, 7] *= 30  # an outlier input channel
    w[5] *= 10  # an outlier row
    w[11] = 0.0  # an all-zero row
    w[13, :128] = 0.0  # an all-zero group
    w[17] = w[17].abs()  # a row with no negative weight
    return w


def activations(m=512, k=384, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)  # correlated inputs, as in real layers
    x = torch.randn(m, k, generator=g) @ mix
    x[:, 3] *= 20
    return x


def dequant_from_tensors(t):
    if "s1_szeros" in t:
        return dequantize_w4_per_channel(t["qweight"], t["s1_scales"], t["s1_szeros"])
    if "s2_scales" in t:
        return dequantize_w4_per_group(t["qweight"], t["s1_scales"], t["s2_scales"], t["s2_zeros"])
    return t["weight"].float() * t["dequant_scale"].float()[:, None]


@pytest.mark.parametrize("bits,group", GRIDS)
@pytest.mark.parametrize("ratio", [1.0, 0.85])
def test_grid_writes_what_the_kernels_compute(bits, group, ratio):
    w = weights()
    q = make_quantizer(bits, group)
    q.prepare(w, ratio)
    codes, deq = q.rtn(w)
    assert torch.isfinite(deq).all()
    t = q.tensors(codes)
    torch.testing.assert_close(dequant_from_tensors(t), deq, rtol=0, atol=0)
    if bits == 4:
        assert torch.equal(unpack_w4(t["qweight"]).float(), codes)
        assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    if group == 128:
        s2 = unpermute_s2(t["s2_scales"]).t().float()
        assert int(s2.min()) >= 1 and int(s2.max()) <= 127
        prod = codes.view(codes.shape[0], -1, 128) * s2[..., None]
        assert float(prod.max()) <= 255  # one 32-bit multiply for four byte lanes
        w8 = rebuild_w8_per_group(t["qweight"], t["s2_scales"], t["s2_zeros"]).float()
        torch.testing.assert_close(w8 * t["s1_scales"].float()[:, None], deq, rtol=0, atol=0)
    # zero rows stay zero
    assert torch.equal(deq[11], torch.zeros_like(deq[11]))
    if group == -1 and ratio == 1.0:
        # round to nearest over the whole row range: at most half a step off (plus fp16 rounding of s1_szeros)
        step = q.scale[:, None]
        slack = 15 * step * 2.0 ** -11 if bits == 4 else 0
        assert torch.all((deq - w).abs() <= step / 2 * (1 + 1e-6) + slack)


def test_group_grid_uses_small_steps_for_small_groups():
    """Groups away from the outlier column get finer level-2 steps than a per-channel grid (the point of
    groups): lower squared error on nearly every row."""
    w = weights()
    q = GroupW4()
    q.prepare(w)
    _, deq = q.rtn(w)
    pc = PerChannelW4()
    pc.prepare(w)
    _, deq_pc = pc.rtn(w)
    mse_group = (deq[:, 128:] - w[:, 128:]).pow(2).mean(1)
    mse_pc = (deq_pc[:, 128:] - w[:, 128:]).pow(2).mean(1)
    nonzero = w[:, 128:].abs().amax(1) > 0
    assert (mse_group[nonzero] < mse_pc[nonzero]).float().mean() > 0.9
    assert float(mse_group.sum()) < 0.5 * float(mse_pc.sum())


def _out_err(x, w, deq):
    return float((x @ (w - deq).t()).pow(2).sum())


@pytest.mark.parametrize("bits,group", GRIDS)
def test_gptq_beats_round_to_nearest(bits, group):
    w, x = weights(), activations()
    h = x.double().t() @ x.double()
    q = make_quantizer(bits, group)
    q.prepare(w)
    _, rtn = q.rtn(w)
    q2 = make_quantizer(bits, group)
    q2.prepare(w)
    codes, deq = gptq(w, h, q2)
    torch.testing.assert_close(dequant_from_tensors(q2.tensors(codes)), deq, rtol=0, atol=0)
    e_rtn, e_gptq = _out_err(x, w, rtn), _out_err(x, w, deq)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("bits,group", GRIDS)
def test_gptq_with_diagonal_hessian_is_rounding(bits, group):
    w = weights()
    h = torch.diag(torch.rand(w.shape[1], dtype=torch.float64) + 0.5)
    q = make_quantizer(bits, group)
    q.prepare(w)
    q_rtn = make_quantizer(bits, group)
    q_rtn.prepare(w)
    codes, deq = gptq(w, h, q, damp=0.0)
    codes_rtn, _ = q_rtn.rtn(w, torch.diagonal(h).float())
    assert torch.equal(codes, codes_rtn)


def test_make_quantizer_rejects_unknown_grids():
    with pytest.raises(ValueError, match="per-channel only"):
        make_quantizer(8, 128)
    with pytest.raises(ValueError, match="group size 64"):
        make_quantizer(4, 64)
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        GroupW4().prepare(torch.randn(32, 200))
    assert isinstance(make_quantizer(8, -1), W8)
