"""The reference numerics against independent fp64 computations from the unpacked integers."""

import math

import pytest
import torch

from vllm_qserve import reference as ref
from vllm_qserve.convert.rtn import quantize_w4_per_channel, quantize_w4_per_group, quantize_w8
from vllm_qserve.packing import pack_w4, permute_s2, unpack_w4

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token(dtype):
    x = (torch.randn(7, 300) * 3).to(dtype)
    x[2] = 0  # an all-zero row gets scale 0 and codes 0, no NaN
    x[3, 5] = 1000
    xq, s, xsum = ref.quantize_per_token(x, 1)
    assert xq.dtype == torch.int8 and s.dtype == torch.float32 and xsum.dtype == torch.float32
    xf = x.double()
    amax = xf.abs().amax(-1)
    assert torch.allclose(s.double(), amax / 127, rtol=1e-6)
    assert int(xq.abs().max()) == 127 and bool((xq[2] == 0).all()) and float(s[2]) == 0
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    assert ((xq.double() - xf * 127 / safe[:, None]).abs() <= 0.5 + 1e-4).all()
    assert torch.allclose(xsum.double(), xf.sum(-1), rtol=1e-5, atol=1e-3)
    assert not torch.isnan(s).any()
    # the sum of the quantized activations (sum_mode 2): exactly sum(x_hat), x_hat = xq * scale
    _, s2, xsum2 = ref.quantize_per_token(x, ref.SUM_OF_QUANTIZED)
    assert torch.equal(s2, s)
    x_hat = xq.double() * s.double()[:, None]
    assert torch.allclose(xsum2.double(), x_hat.sum(-1), rtol=1e-6, atol=0)
    assert (xsum2 - xsum).abs().max() > 0  # a different quantity: rounding errors do not cancel exactly
    assert ref.quantize_per_token(x)[2] is None and ref.quantize_per_token(x, False)[2] is None
    with pytest.raises(ValueError, match="sum_mode must be 0"):
        ref.quantize_per_token(x, 3)
    from vllm_qserve.reference.activation import check_activation_sum

    assert [check_activation_sum(a) for a in ("input", "quantized")] == ["input", "quantized"]
    with pytest.raises(ValueError, match="activation_sum must be one of .*'fp8'"):
        check_activation_sum("fp8")


def test_quantized_activation_sum_makes_the_per_channel_gemm_exactly_x_hat_w():
    """docs/format.md section 5: with QServe's sum of the unquantized x the output carries an extra
    s1_szeros * (sum(x_hat) - sum(x)) term; with the sum of the quantized x it is exactly x_hat . W (fp64)."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 5, 64, 256
    x = torch.randn(m, k, generator=g) * 4
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    s1 = (torch.rand(n, generator=g) * 0.02 + 0.01).half()
    szeros = (s1.float() * torch.randint(3, 12, (n,), generator=g)).half()
    qweight = pack_w4(q)
    w = ref.dequantize_w4_per_channel(qweight, s1, szeros).double()  # s1 * q - s1_szeros
    for mode, extra in ((ref.SUM_OF_QUANTIZED, False), (ref.SUM_OF_INPUT, True)):
        xq, sx, xsum = ref.quantize_per_token(x, mode)
        out = ref.w4a8_per_channel(xq, sx, xsum, qweight, s1, szeros, out_dtype=torch.float32).double()
        x_hat = xq.double() * sx.double()[:, None]
        expect = x_hat @ w.t()
        if extra:
            expect = expect - (x.double().sum(-1) - x_hat.sum(-1))[:, None] * szeros.double()[None]
        assert torch.allclose(out, expect, rtol=1e-5, atol=1e-4), mode


def test_fused_quant_equals_composition():
    x, r = torch.randn(5, 256, dtype=torch.bfloat16), torch.randn(5, 256, dtype=torch.bfloat16)
    w = torch.rand(256, dtype=torch.bfloat16) + 0.5
    xq, s, xsum, res = ref.add_rms_norm_quant(x, r, w, 1e-6, 1)
    assert torch.equal(res, x + r)
    xq2, s2, xsum2 = ref.quantize_per_token(ref.rms_norm(x + r, w, 1e-6), 1)
    assert torch.equal(xq, xq2) and torch.equal(s, s2) and torch.equal(xsum, xsum2)
    h = torch.randn(4, 2 * 96)
    xq, s, _ = ref.silu_mul_quant(h)
    expect = torch.nn.functional.silu(h[:, :96]) * h[:, 96:]
    assert torch.equal(xq, ref.quantize_per_token(expect)[0])


def _act(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * 2


@pytest.mark.parametrize("m,n,k", [(1, 32, 128), (7, 96, 256), (33, 64, 512)])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_w4a8_per_channel_matches_fp64(m, n, k, out_dtype):
    w = torch.randn(n, k)
    t = quantize_w4_per_channel(w)
    x = _act(m, k)
    xq, sx, xsum = ref.quantize_per_token(x, 1)
    bias = torch.randn(n)
    out = ref.w4a8_per_channel(xq, sx, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"], out_dtype, bias)
    q = unpack_w4(t["qweight"]).double()
    acc = xq.double() @ q.t()  # independent exact integer product
    expect = acc * sx.double()[:, None] * t["s1_scales"].double()[None] \
        - xsum.double()[:, None] * t["s1_szeros"].double()[None] + bias.double()
    tol = 2 * torch.finfo(out_dtype).eps * expect.abs() + 1e-3
    assert ((out.double() - expect).abs() <= tol).all()
    # and the whole scheme approximates the fp matmul (4-bit RTN on Gaussian weights: ~8% relative error)
    xb = _act(256, k, 7)
    xq, sx, xsum = ref.quantize_per_token(xb, 1)
    approx = ref.w4a8_per_channel(xq, sx, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"], torch.float32)
    assert (approx - xb @ w.t()).norm() / (xb @ w.t()).norm() < 0.15


@pytest.mark.parametrize("m,n,k", [(1, 32, 128), (5, 64, 384), (16, 128, 256)])
def test_w4a8_per_group_matches_fp64(m, n, k):
    w = torch.randn(n, k)
    t = quantize_w4_per_group(w)
    # kernel preconditions the quantizer must guarantee
    q = unpack_w4(t["qweight"]).long().view(n, k // 128, 128)
    w8 = ref.rebuild_w8_per_group(t["qweight"], t["s2_scales"], t["s2_zeros"])
    assert int(w8.abs().max()) <= 127
    x = _act(m, k, 1)
    xq, sx, _ = ref.quantize_per_token(x)
    out = ref.w4a8_per_group(xq, sx, t["qweight"], t["s1_scales"], t["s2_scales"], t["s2_zeros"], torch.float32)
    expect = (xq.double() @ w8.double().t()) * sx.double()[:, None] * t["s1_scales"].double()[None]
    assert torch.allclose(out.double(), expect, rtol=1e-6, atol=1e-6)
    xb = _act(256, k, 8)  # the scheme approximates the fp matmul (4-bit RTN on Gaussian weights: ~8%)
    xq, sx, _ = ref.quantize_per_token(xb)
    approx = ref.w4a8_per_group(xq, sx, t["qweight"], t["s1_scales"], t["s2_scales"], t["s2_zeros"], torch.float32)
    assert (approx - xb @ w.t()).norm() / (xb @ w.t()).norm() < 0.15
    assert q.max() <= 15


def test_w4a8_per_group_byte_arithmetic():
    """w8 = (q*s2 + s2_zeros) mod 256 as int8, with zeros stored as the two's complement byte of -(z*s2)."""
    n, k = 32, 128
    q = torch.randint(0, 16, (n, k))
    s2 = torch.randint(1, 17, (n,))
    z = torch.randint(0, 16, (n,))
    s2 = torch.where(15 * s2 > 255, torch.full_like(s2, 17), s2)
    zeros = (-(z * s2)) % 256
    zeros = torch.where(zeros > 127, zeros - 256, zeros)
    w8 = ref.rebuild_w8_per_group(pack_w4(q), permute_s2(s2[None].to(torch.int8)), permute_s2(zeros[None].to(torch.int8)))
    expect = ((q * s2[:, None] - z[:, None] * s2[:, None]) + 128) % 256 - 128
    assert torch.equal(w8.long(), expect)


def test_w8a8_matches_fp64():
    w, x = torch.randn(64, 256), _act(9, 256, 2)
    t = quantize_w8(w)
    xq, sx, _ = ref.quantize_per_token(x)
    out = ref.w8a8(xq, sx, t["weight"], t["dequant_scale"], torch.float32)
    expect = (xq.double() @ t["weight"].double().t()) * sx.double()[:, None] * t["dequant_scale"].double()[None]
    assert torch.allclose(out.double(), expect, rtol=1e-6, atol=1e-5)


def test_int_matmul_exact_at_large_k():
    k = 14336
    a = torch.full((2, k), 127, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    assert int(ref.int_matmul_exact(a, b)[0, 0]) == 127 * -128 * k


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_quant_round_trip_bound(bits):
    x = torch.randn(50, 4, 64, dtype=torch.float16) * 3
    codes, s, z = ref.quantize_kv(x, bits)
    assert int(codes.max()) <= (1 << bits) - 1
    err = (ref.dequantize_kv(codes, s, z) - x.float()).abs()
    # half a step of rounding plus the fp16 rounding of scale and zero
    bound = s.float()[..., None] * (0.5 + 2 ** -10 * (z.float().abs()[..., None] + (1 << bits)))
    assert (err <= bound + 1e-3).all()
    const = torch.full((1, 1, 64), 0.75, dtype=torch.float16)
    c, s1, z1 = ref.quantize_kv(const, bits)
    assert torch.equal(ref.dequantize_kv(c, s1, z1), const.float())


@pytest.mark.parametrize("bits", [4, 8])
def test_paged_attention_matches_dense(bits):
    torch.manual_seed(0)
    layout = ref.KVCacheLayout(num_kv_heads=2, head_dim=64, block_size=16, bits=bits)
    seq_lens, q_lens = [37, 1, 20], [5, 1, 20]  # chunked-prefill continuation, decode, fresh prefill
    cache = layout.allocate(16)
    block_table = torch.tensor([[3, 7, 1, 0], [5, 0, 0, 0], [9, 2, 0, 0]])
    ks, vs, qs = [], [], []
    for b, s in enumerate(seq_lens):
        k, v = torch.randn(s, 2, 64), torch.randn(s, 2, 64)
        slots = torch.tensor([int(block_table[b, i // 16]) * 16 + i % 16 for i in range(s)])
        ref.write_kv_cache(k, v, cache, slots, layout)
        ks.append(k), vs.append(v), qs.append(torch.randn(q_lens[b], 8, 64))
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor(q_lens), 0)))
    out = ref.paged_attention(torch.cat(qs), cache, block_table, torch.tensor(seq_lens), qsl, layout)
    for b, s in enumerate(seq_lens):
        kd, vd, _ = [ref.dequantize_kv(*ref.quantize_kv(t, bits)) for t in (ks[b], vs[b])] + [None]
        q = qs[b]
        logits = torch.einsum("qhd,khd->hqk", q, kd.repeat_interleave(4, 1)) / math.sqrt(64)
        qpos = torch.arange(s - q.shape[0], s)
        logits = logits.masked_fill(torch.arange(s)[None] > qpos[:, None], float("-inf"))
        expect = torch.einsum("hqk,khd->qhd", logits.softmax(-1), vd.repeat_interleave(4, 1))
        assert torch.allclose(out[qsl[b]:qsl[b + 1]], expect, atol=1e-5)


def test_write_kv_cache_skips_padded_slots():
    layout = ref.KVCacheLayout(1, 64, 16, 4)
    cache = layout.allocate(2)
    before = cache.clone()
    ref.write_kv_cache(torch.randn(2, 1, 64), torch.randn(2, 1, 64), cache, torch.tensor([-1, -1]), layout)
    assert torch.equal(cache, before)
