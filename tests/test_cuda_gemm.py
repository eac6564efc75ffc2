"""GPU tests of the compiled ops (csrc/gemm/, csrc/quant/) against the reference numerics.

The GEMM epilogues perform the reference's fp32 operations in its order with explicit round-to-nearest, and the
int32 accumulation is exact, so outputs must equal vllm_qserve.reference.gemm bit for bit (the reference is
computed on the same GPU, float64 accumulation).  Every output is poisoned with NaN first (the caching
allocator hands the op the block a NaN tensor just freed), so an unwritten element shows up as NaN.

Imports only torch and vllm_qserve.{ops,packing,reference} (no vLLM): runs on a bare GPU machine.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vllm_qserve import ops
from vllm_qserve.packing import pack_w4, permute_s2
from vllm_qserve.reference import activation as ref_act
from vllm_qserve.reference import gemm as ref_gemm

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.HAS_CUDA_OPS, reason="vllm_qserve._C is not built"),
]

DEV = "cuda"
ALL_M = [1, 2, 3, 7, 16, 31, 64, 100, 256, 1000, 4096]
BIG_M = [1, 16, 100, 300, 1000]  # the large projection shapes use a subset of M to keep the run short
MODES = ["per_channel", "per_group", "w8a8"]

# (N, K) of every projection (q/k/v and gate/up fused, as vLLM loads them).
MODEL_SHAPES = {
    "llama3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "llama2-7b": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)],
    "mistral-7b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "qwen2.5-1.5b": [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)],
}
UNIQUE_MODEL_SHAPES = sorted({s for v in MODEL_SHAPES.values() for s in v})
# Small shapes that exercise the tails: N not a multiple of the 64/128 tiles, K not a multiple of a stage.
SMALL_SHAPES = [(32, 128), (96, 384), (160, 640), (64, 192), (224, 320)]


def _k_ok(mode: str, k: int) -> bool:
    return k % (128 if mode == "per_group" else 64) == 0


def _gen():
    return torch.Generator(device=DEV).manual_seed(torch.randint(0, 2**31 - 1, ()).item())


def make_weights(mode: str, n: int, k: int, small_ints: bool = False):
    """Random checkpoint tensors.  small_ints: weights with small integer values and unit scales (exactness test)."""
    g = _gen()
    if mode == "w8a8":
        hi = 4 if small_ints else 128
        w = torch.randint(-hi + 1, hi, (n, k), dtype=torch.int8, device=DEV, generator=g)
        s = torch.ones(n, device=DEV) if small_ints else torch.rand(n, device=DEV, generator=g) * 0.02 + 1e-3
        return {"weight": w, "dequant_scale": s.half()}
    q = torch.randint(0, 4 if small_ints else 16, (n, k), dtype=torch.uint8, device=DEV, generator=g)
    w = {"qweight": pack_w4(q)}
    if small_ints:
        w["s1_scales"] = torch.ones(n, device=DEV).half()
    else:
        w["s1_scales"] = (torch.rand(n, device=DEV, generator=g) * 0.02 + 1e-3).half()
    if mode == "per_channel":
        w["s1_szeros"] = torch.zeros(n, device=DEV).half() if small_ints else \
            (torch.randn(n, device=DEV, generator=g) * 0.05).half()
    else:
        gk = k // 128
        if small_ints:
            s2 = torch.ones(gk, n, dtype=torch.int32, device=DEV)
            z = torch.zeros(gk, n, dtype=torch.int32, device=DEV)
        else:
            # q * s2 <= 255 is QServe's contract (one 32-bit multiply scales 4 bytes); zeros wrap mod 256.
            s2 = torch.randint(1, 18, (gk, n), dtype=torch.int32, device=DEV, generator=g)
            z = torch.randint(0, 16, (gk, n), dtype=torch.int32, device=DEV, generator=g)
        z2 = torch.remainder(-(z * s2), 256)
        z2 = torch.where(z2 > 127, z2 - 256, z2)
        w["s2_scales"] = permute_s2(s2.to(torch.int8)).contiguous()
        w["s2_zeros"] = permute_s2(z2.to(torch.int8)).contiguous()
    return w


def make_acts(m: int, k: int, small_ints: bool = False):
    g = _gen()
    hi = 2 if small_ints else 128
    xq = torch.randint(-hi + 1, hi, (m, k), dtype=torch.int8, device=DEV, generator=g)
    if small_ints:
        return xq, torch.ones(m, device=DEV), torch.zeros(m, device=DEV)
    sx = torch.rand(m, device=DEV, generator=g) * 0.01 + 1e-4
    xsum = torch.randn(m, device=DEV, generator=g) * 20
    return xq, sx, xsum


def run_op(mode, xq, sx, xsum, w, bias, out_dtype):
    if mode == "per_channel":
        return torch.ops.qserve.w4a8_gemm_per_channel(xq, sx, xsum, w["qweight"], w["s1_scales"], w["s1_szeros"],
                                                      bias, out_dtype)
    if mode == "per_group":
        return torch.ops.qserve.w4a8_gemm_per_group(xq, sx, w["qweight"], w["s1_scales"], w["s2_scales"],
                                                    w["s2_zeros"], bias, out_dtype)
    return torch.ops.qserve.w8a8_gemm(xq, sx, w["weight"], w["dequant_scale"], bias, out_dtype)


def run_ref(mode, xq, sx, xsum, w, bias, out_dtype):
    if mode == "per_channel":
        return ref_gemm.w4a8_per_channel(xq, sx, xsum, w["qweight"], w["s1_scales"], w["s1_szeros"], out_dtype, bias)
    if mode == "per_group":
        return ref_gemm.w4a8_per_group(xq, sx, w["qweight"], w["s1_scales"], w["s2_scales"], w["s2_zeros"],
                                       out_dtype, bias)
    return ref_gemm.w8a8(xq, sx, w["weight"], w["dequant_scale"], out_dtype, bias)


def run_poisoned(mode, xq, sx, xsum, w, bias, out_dtype):
    """Run the op into a block the caching allocator just held NaNs in; returns (out, poisoned_same_block)."""
    m, n = xq.shape[0], (w["weight"] if mode == "w8a8" else w["qweight"]).shape[0]
    torch.cuda.synchronize()
    poison = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEV)
    ptr = poison.data_ptr()
    del poison
    out = run_op(mode, xq, sx, xsum, w, bias, out_dtype)
    return out, out.data_ptr() == ptr


def check_equal(out, ref, what):
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    nan = torch.isnan(out)
    assert not nan.any(), f"{what}: {int(nan.sum())} NaN outputs (unwritten or bad arithmetic)"
    if not torch.equal(out, ref):
        d = (out.float() - ref.float()).abs()
        bad = int((d > 0).sum())
        rel = d.max().item() / max(ref.float().abs().max().item(), 1e-30)
        idx = torch.nonzero(d == d.max())[0].tolist()
        raise AssertionError(f"{what}: {bad}/{out.numel()} elements differ from the reference, max |diff| "
                             f"{d.max().item():.4g} (rel. to max|ref| {rel:.3g}) first at {idx}: "
                             f"{out[tuple(idx)].item()} vs {ref[tuple(idx)].item()}")


@functools.lru_cache(maxsize=4)
def _cached_weights(mode, n, k):
    return make_weights(mode, n, k)


def _check_shape(mode, n, k, ms, dtypes=(torch.float16, torch.bfloat16), bias_kinds=(None, "same")):
    w = _cached_weights(mode, n, k)
    poisoned = 0
    total = 0
    for i, m in enumerate(ms):
        xq, sx, xsum = make_acts(m, k)
        for j, dt in enumerate(dtypes):
            bk = bias_kinds[(i + j) % len(bias_kinds)]
            bias = None if bk is None else (torch.randn(n, device=DEV) * 0.5).to(dt if bk == "same" else bk)
            ref = run_ref(mode, xq, sx, xsum if mode == "per_channel" else None, w, bias, dt)
            out, same = run_poisoned(mode, xq, sx, xsum, w, bias, dt)
            poisoned += same
            total += 1
            check_equal(out, ref, f"{mode} M={m} N={n} K={k} {dt} bias={bk}")
    # The allocator should hand back the poisoned block nearly always; if it never did, the poison proved nothing.
    assert poisoned > 0, "the output never reused the NaN-poisoned block"


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nk", SMALL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_small_shapes_all_m(mode, nk):
    n, k = nk
    if not _k_ok(mode, k):
        pytest.skip("K not valid for this mode")
    _check_shape(mode, n, k, ALL_M, bias_kinds=(None, "same", torch.float32))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nk", UNIQUE_MODEL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_model_shapes(mode, nk):
    n, k = nk
    ms = ALL_M if nk == (4096, 4096) else BIG_M
    # Qwen2.5's q/k/v projection has a bias: always test one there.
    bias_kinds = ("same",) if nk == (2048, 1536) else (None, "same")
    _check_shape(mode, n, k, ms, bias_kinds=bias_kinds)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 20, 50, 100, 200, 700])  # one M per tile configuration
def test_integer_accumulation_exact(mode, m):
    """Unit scales, small integers: every output is an integer below 2048 (exact in fp16), compared with an int64
    product -- checks the fragment mapping and the int32 accumulation without any rounding in between."""
    n, k = 160, 4096
    w = make_weights(mode, n, k, small_ints=True)
    xq, sx, xsum = make_acts(m, k, small_ints=True)
    if mode == "w8a8":
        wi = w["weight"].long()
    else:
        from vllm_qserve.packing import unpack_w4
        wi = unpack_w4(w["qweight"]).long()  # s2 = 1, zero = 0: w8 = q
    acc = xq.double() @ wi.double().t()  # exact: |partial sums| < 2^53
    assert acc.abs().max() < 2048
    out, _ = run_poisoned(mode, xq, sx, xsum, w, None, torch.float16)
    assert torch.equal(out.float(), acc.float()), f"{mode}: integer accumulation mismatch"


def test_group_zero_wraps_and_full_code_range():
    """Group mode with z*s2 > 128 (the stored zero wraps) and q*s2 = 255 exactly."""
    n, k, m = 64, 256, 33
    q = torch.full((n, k), 15, dtype=torch.uint8, device=DEV)
    q[:, ::2] = 0
    s2 = torch.full((k // 128, n), 17, dtype=torch.int32, device=DEV)
    z = torch.full((k // 128, n), 9, dtype=torch.int32, device=DEV)
    z2 = torch.remainder(-(z * s2), 256)
    z2 = torch.where(z2 > 127, z2 - 256, z2)
    w = {"qweight": pack_w4(q), "s1_scales": torch.full((n,), 0.01, device=DEV).half(),
         "s2_scales": permute_s2(s2.to(torch.int8)).contiguous(), "s2_zeros": permute_s2(z2.to(torch.int8)).contiguous()}
    xq, sx, xsum = make_acts(m, k)
    ref = run_ref("per_group", xq, sx, None, w, None, torch.bfloat16)
    out, _ = run_poisoned("per_group", xq, sx, xsum, w, None, torch.bfloat16)
    check_equal(out, ref, "wrapping zeros")


def test_empty_m():
    w = make_weights("per_channel", 64, 128)
    xq, sx, xsum = make_acts(0, 128)
    out = run_op("per_channel", xq, sx, xsum, w, None, torch.float16)
    assert out.shape == (0, 64)


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 129), (17, 4095), (2, 3, 4096), (9, 14336), (300, 1536)])
@pytest.mark.parametrize("with_sum", [False, True, 2])
def test_quantize_per_token(dtype, shape, with_sum):
    """with_sum: False / True (QServe's sum of x) / 2 (the sum of the quantized x, bit-exact)."""
    x = torch.randn(shape, device=DEV) * torch.rand(shape[:-1] + (1,), device=DEV) * 8
    x = x.to(dtype)
    if x.numel() > 4:
        x.view(-1)[3] = 0  # zeros and an all-zero row are legal input
    if shape[0] > 1:
        x[1].zero_()
    xq, scale, xsum = torch.ops.qserve.quantize_per_token(x, with_sum)
    rq, rs, rsum = ref_act.quantize_per_token(x, with_sum)
    assert xq.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(xq, rq), f"xq differs in {int((xq != rq).sum())} places"
    assert torch.equal(scale, rs), "scale not bit-exact"
    if with_sum == 2:  # (True == 1: only the quantized sum takes this branch; it is exact)
        assert torch.equal(xsum, rsum), "quantized-sum xsum not bit-exact"
        assert torch.equal(xsum, xq.sum(-1, dtype=torch.int64).float() * scale)
    elif with_sum:
        assert xsum.shape == rsum.shape and xsum.dtype == torch.float32
        # Different summation order: within fp32 rounding of sum |x|.
        tol = x.float().abs().sum(-1) * (x.shape[-1] * 2.0**-24) + 1e-30
        assert ((xsum - rsum).abs() <= tol).all()
    else:
        assert xsum.numel() == 0


def test_bad_shapes_raise_clear_errors():
    xq, sx, xsum = make_acts(4, 96)
    w = make_weights("per_channel", 64, 96)  # packable (multiples of 32) but K % 64 != 0
    with pytest.raises(RuntimeError, match="multiple of 64"):
        run_op("per_channel", xq, sx, xsum, w, None, torch.float16)
    w8 = make_weights("w8a8", 64, 96)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        run_op("w8a8", xq, sx, xsum, w8, None, torch.float16)
    xq, sx, xsum = make_acts(4, 192)
    wg = make_weights("per_channel", 64, 192)
    wg["s2_scales"] = torch.ones(1, 64, dtype=torch.int8, device=DEV)
    wg["s2_zeros"] = torch.zeros(1, 64, dtype=torch.int8, device=DEV)
    with pytest.raises(RuntimeError, match="multiple of the group size 128"):
        run_op("per_group", xq, sx, xsum, wg, None, torch.float16)
    xq, sx, xsum = make_acts(4, 128)
    w = make_weights("w8a8", 64, 128)
    w["weight"] = w["weight"][:48].contiguous()
    w["dequant_scale"] = w["dequant_scale"][:48].contiguous()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        run_op("w8a8", xq, sx, xsum, w, None, torch.float16)
    w = make_weights("per_channel", 64, 128)
    with pytest.raises(RuntimeError, match="out_dtype must be float16 or bfloat16"):
        run_op("per_channel", xq, sx, xsum, w, None, torch.float32)
    with pytest.raises(RuntimeError, match="xq must be int8"):
        run_op("per_channel", xq.half(), sx, xsum, w, None, torch.float16)
    with pytest.raises(RuntimeError, match="sx must have M=4 elements"):
        run_op("per_channel", xq, sx[:3], xsum, w, None, torch.float16)
    with pytest.raises(RuntimeError, match="sx must be Float"):
        run_op("per_channel", xq, sx.half(), xsum, w, None, torch.float16)
    with pytest.raises(RuntimeError, match="xsum must have M=4 elements"):
        run_op("per_channel", xq, sx, xsum[:2], w, None, torch.float16)
    with pytest.raises(RuntimeError, match=r"qweight is \[64, 64\] but xq has K=256"):
        run_op("per_channel", make_acts(4, 256)[0], sx, xsum, w, None, torch.float16)
    with pytest.raises(RuntimeError, match="bias must have N=64"):
        run_op("per_channel", xq, sx, xsum, w, torch.zeros(32, device=DEV).half(), torch.float16)
    with pytest.raises(RuntimeError, match="xq must be a CUDA tensor"):
        run_op("per_channel", xq.cpu(), sx, xsum, w, None, torch.float16)
    wg = make_weights("per_group", 64, 256)
    wg["s2_scales"] = wg["s2_scales"][:1].contiguous()
    with pytest.raises(RuntimeError, match=r"s2_scales must be \[K/128, N\]"):
        run_op("per_group", make_acts(4, 256)[0], sx, None, wg, None, torch.float16)
