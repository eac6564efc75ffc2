"""GPU tests of the Hopper wgmma W4A8 GEMM (csrc/gemm_sm90/, torch.ops.qserve.w4a8_gemm_per_*_sm90).

Same contract as tests/test_cuda_gemm.py: exact int32 accumulation and the reference's fp32 epilogue, so the
outputs must equal vllm_qserve.reference.gemm bit for bit; every output is poisoned with NaN first.  The wgmma
kernel is forced with wgmma_min_m=0 (every M runs it, including M=1); the dispatch to mma.sync below the
crossover is tested separately.  Skips without an sm_90 GPU or without the _C_sm90 extension.
Imports only torch and vllm_qserve (no vLLM).
"""

from __future__ import annotations

import pytest
import torch

from vllm_qserve import ops
from vllm_qserve.gemm_sm90_ops import HAS_SM90_OPS
from tests.test_cuda_gemm import check_equal, make_acts, make_weights, run_ref

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.HAS_CUDA_OPS, reason="vllm_qserve._C is not built"),
    pytest.mark.skipif(not HAS_SM90_OPS, reason="vllm_qserve._C_sm90 is not built"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() != (9, 0),
                       reason="the wgmma kernel needs an sm_90 GPU"),
]

DEV = "cuda"


@pytest.fixture(autouse=True, params=["auto", "v2", "v2-serial", "v2-1wg", "v3", "v1", "split4"])
def wgmma_impl(request, monkeypatch):
    """Every test runs with the launcher's own choice at M > 128 (v2, warp-specialized; where the tiles are few, K
    split 4 ways across a cluster or v2-1wg: e.g. M = 129-300 on 4096-channel layers, test_integer_accumulation
    and test_extreme_values; a head and a split tail where the last wave is mostly empty), with v2 alone, v2 without step pipelining (v2-serial), v2 with one consumer warpgroup and two CTAs per SM
    (v2-1wg: 128-channel tiles, so also partial ones at N = 32 mod 128), the 4-way split whatever the
    occupancy (split4: several waves of clusters at large M), v3 (v2 on a persistent grid: one CTA per SM, so the large M and N
    here give each CTA several tiles, partial ones included) and v1 (cp.async) forced (QSERVE_WGMMA_IMPL, read by
    the launcher at every call), so all stay correct on every shape; M <= 128 uses the small v1 tiles in every
    run."""
    if request.param == "auto":
        monkeypatch.delenv("QSERVE_WGMMA_IMPL", raising=False)
    else:
        monkeypatch.setenv("QSERVE_WGMMA_IMPL", request.param)
    return request.param


MODES = ["per_channel", "per_group"]
ALL_M = [1, 7, 64, 129, 300, 1000, 4096]
# Llama-3-8B projections (qkv, o, gate_up, down) and N that are multiples of 32 but not of the 128/256-channel
# CTA tiles, with K multiples of 128 (one pipeline stage) down to a single stage.
LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
ODD_SHAPES = [(32, 128), (96, 384), (160, 640), (224, 1280), (4128, 256), (2080, 1536),
              # the cluster split-K path (M > 128 with few tiles): 4 ways with a partial 32-channel N tile, and
              # 2 ways over 25 stages (ranks of 13 and 12 stages) with a partial N tile
              (1056, 4096), (4128, 3200)]


def run_sm90(mode, xq, sx, xsum, w, bias, out_dtype, min_m=0):
    if mode == "per_channel":
        return torch.ops.qserve.w4a8_gemm_per_channel_sm90(xq, sx, xsum, w["qweight"], w["s1_scales"],
                                                           w["s1_szeros"], bias, out_dtype, min_m)
    return torch.ops.qserve.w4a8_gemm_per_group_sm90(xq, sx, w["qweight"], w["s1_scales"], w["s2_scales"],
                                                     w["s2_zeros"], bias, out_dtype, min_m)


def run_poisoned(mode, xq, sx, xsum, w, bias, out_dtype, min_m=0):
    m, n = xq.shape[0], w["qweight"].shape[0]
    torch.cuda.synchronize()
    poison = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEV)
    ptr = poison.data_ptr()
    del poison
    out = run_sm90(mode, xq, sx, xsum, w, bias, out_dtype, min_m)
    return out, out.data_ptr() == ptr


def _check(mode, n, k, ms, bias_kinds=(None, "same", torch.float32), min_m=0):
    w = make_weights(mode, n, k)
    poisoned = total = 0
    for i, m in enumerate(ms):
        xq, sx, xsum = make_acts(m, k)
        for j, dt in enumerate((torch.float16, torch.bfloat16)):
            bk = bias_kinds[(i + j) % len(bias_kinds)]
            bias = None if bk is None else (torch.randn(n, device=DEV) * 0.5).to(dt if bk == "same" else bk)
            ref = run_ref(mode, xq, sx, xsum if mode == "per_channel" else None, w, bias, dt)
            out, same = run_poisoned(mode, xq, sx, xsum, w, bias, dt, min_m)
            poisoned += same
            total += 1
            check_equal(out, ref, f"sm90 {mode} M={m} N={n} K={k} {dt} bias={bk} min_m={min_m}")
    assert poisoned > 0, "the output never reused the NaN-poisoned block"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nk", ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_odd_shapes(mode, nk):
    _check(mode, *nk, ALL_M)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nk", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llama_shapes(mode, nk):
    ms = ALL_M if nk != (28672, 4096) else [1, 129, 256, 1000, 4096]
    _check(mode, *nk, ms, bias_kinds=(None, "same"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mnk", [(2500, 4128, 4096), (1100, 544, 14336)], ids=lambda s: "x".join(map(str, s)))
def test_grouped_tile_order(mode, mnk):
    """CTAs take their tiles in groups of token tiles (grouped_tile: 8 MB of activation rows per group, so 16 token
    tiles at K = 4096, 4 at K = 14336): several groups with a partial last one (20 = 16 + 4 and 9 = 4 + 4 + 1 token
    tiles) and a partial channel tile, so a wrong tile mapping leaves NaN-poisoned or duplicated outputs."""
    m, n, k = mnk
    _check(mode, n, k, [m], bias_kinds=("same",))


# (N, K, M) where v2's last wave would be partly empty, so the launcher runs a head of whole waves and the
# remaining channels as a 4-way cluster split (launch_head_and_tail; on a 132-SM H100): qkv M = 768 (22 + 2 channel
# tiles), o M = 1152 (14 + 2), down M = 1152 (K = 14336), qkv M = 1536 (a head of 2 waves), and N = 6176 (a
# partial 32-channel last tile in the tail).
HEAD_AND_TAIL = [(6144, 4096, 768), (4096, 4096, 1152), (4096, 14336, 1152), (6144, 4096, 1536), (6176, 4096, 768)]

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nkm", HEAD_AND_TAIL, ids=lambda s: "x".join(map(str, s)))
def test_head_and_tail_launch(mode, nkm):
    """Two launches over disjoint channel ranges: a wrong range leaves NaN-poisoned or doubly written columns."""
    n, k, m = nkm
    _check(mode, n, k, [m], bias_kinds=("same",))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 100, 200, 700, 2000])  # every tile configuration of the launcher
def test_integer_accumulation_exact(mode, m):
    """Unit scales, small integers: outputs are integers < 2048 (exact in fp16), compared with an exact product."""
    from vllm_qserve.packing import unpack_w4

    n, k = 288, 4096
    w = make_weights(mode, n, k, small_ints=True)
    xq, sx, xsum = make_acts(m, k, small_ints=True)
    acc = xq.double() @ unpack_w4(w["qweight"]).double().t()
    assert acc.abs().max() < 2048
    out, _ = run_poisoned(mode, xq, sx, xsum, w, None, torch.float16)
    assert torch.equal(out.float(), acc.float()), f"{mode}: integer accumulation mismatch"


@pytest.mark.parametrize("mode", MODES)
def test_extreme_values(mode):
    """All-(-128)/127 activations and all-15 codes: the largest |accumulator| the format allows at this K."""
    n, k, m = 256, 4096, 300
    w = make_weights(mode, n, k)
    w["qweight"] = torch.full_like(w["qweight"], -1)  # every nibble 15
    xq = torch.where(torch.rand(m, k, device=DEV) < 0.5, -128, 127).to(torch.int8)
    sx = torch.rand(m, device=DEV) * 0.01 + 1e-4
    xsum = torch.randn(m, device=DEV) * 20
    ref = run_ref(mode, xq, sx, xsum if mode == "per_channel" else None, w, None, torch.bfloat16)
    out, _ = run_poisoned(mode, xq, sx, xsum, w, None, torch.bfloat16)
    check_equal(out, ref, f"sm90 {mode} extreme values")


@pytest.mark.parametrize("mode", MODES)
def test_dispatch_below_min_m_runs_mma_sync(mode):
    """Below wgmma_min_m the op runs the mma.sync op (same numerics: equal to the reference and to that op)."""
    n, k = 4096, 4096
    w = make_weights(mode, n, k)
    for m in (1, 16, 127, 128, 300):
        _check(mode, n, k, [m], min_m=128)
        xq, sx, xsum = make_acts(m, k)
        a = run_sm90(mode, xq, sx, xsum, w, None, torch.float16, min_m=128)
        if mode == "per_channel":
            b = torch.ops.qserve.w4a8_gemm_per_channel(xq, sx, xsum, w["qweight"], w["s1_scales"], w["s1_szeros"],
                                                       None, torch.float16)
        else:
            b = torch.ops.qserve.w4a8_gemm_per_group(xq, sx, w["qweight"], w["s1_scales"], w["s2_scales"],
                                                     w["s2_zeros"], None, torch.float16)
        assert torch.equal(a, b)


@pytest.mark.parametrize("nkm", [(1024, 1024, 512), (4096, 4096, 256), (6144, 4096, 768)],
                         ids=["unsplit", "cluster-split-k", "head-and-tail"])
def test_cuda_graph_capture(nkm):
    """The op is capturable (no host sync, no allocation but the output) and replays the same result; the
    second shape runs the few-tile path (the 4-way cluster split where the occupancy query, cached by the warm-up
    call before the capture, allows it, else v2-1wg), the third two launches (a head and a split tail, with PDL)."""
    mode, (n, k, m) = "per_group", nkm
    w = make_weights(mode, n, k)
    xq, sx, xsum = make_acts(m, k)
    ref = run_ref(mode, xq, sx, None, w, None, torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_sm90(mode, xq, sx, xsum, w, None, torch.bfloat16)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run_sm90(mode, xq, sx, xsum, w, None, torch.bfloat16)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_equal(out, ref, "graph replay")


def test_bad_inputs_raise_clear_errors(monkeypatch):
    n, k, m = 256, 384, 8
    w = make_weights("per_channel", n, k)
    xq, sx, xsum = make_acts(m, k)
    op = torch.ops.qserve.w4a8_gemm_per_channel_sm90
    args = [xq, sx, xsum, w["qweight"], w["s1_scales"], w["s1_szeros"], None, torch.float16, 0]

    def expect(msg, **repl):
        a = list(args)
        names = ["xq", "sx", "xsum", "qweight", "s1_scales", "s1_szeros", "bias", "out_dtype", "min_m"]
        for key, v in repl.items():
            a[names.index(key)] = v
        with pytest.raises(RuntimeError, match=msg):
            op(*a)
        torch.cuda.synchronize()  # nothing was launched that could fault

    expect("multiple of 128", xq=torch.zeros(m, 192, dtype=torch.int8, device=DEV),
           qweight=torch.zeros(n, 96, dtype=torch.int8, device=DEV))
    expect("xq must be int8", xq=xq.float())
    expect("must be a CUDA tensor", xq=xq.cpu())
    expect("expected \\[N, K/2\\]", qweight=w["qweight"][:, :128].contiguous())
    expect("s1_scales must have N=256", s1_scales=w["s1_scales"][:128])
    expect("sx must have M=8", sx=sx[:4])
    expect("xsum must be Float, got Half", xsum=xsum.half())
    expect("multiple of 32", qweight=torch.zeros(48, k // 2, dtype=torch.int8, device=DEV),
           s1_scales=w["s1_scales"][:48], s1_szeros=w["s1_szeros"][:48])
    expect("out_dtype must be float16 or bfloat16", out_dtype=torch.float32)
    expect("bias must have N=256", bias=torch.zeros(100, device=DEV))
    wg = make_weights("per_group", n, k)
    with pytest.raises(RuntimeError, match="s2_scales must be \\[K/128, N\\]"):
        torch.ops.qserve.w4a8_gemm_per_group_sm90(xq, sx, wg["qweight"], wg["s1_scales"], wg["s2_scales"][:1],
                                                  wg["s2_zeros"], None, torch.float16, 0)
    # Empty input: a valid [0, N] result, nothing launched.
    out = op(xq[:0], sx[:0], xsum[:0], *args[3:])
    assert out.shape == (0, n)
    # The benchmarks' kernel switch names itself when mistyped (not silently the default kernel).
    monkeypatch.setenv("QSERVE_WGMMA_IMPL", "v9")
    expect("QSERVE_WGMMA_IMPL must be v1, v2, v2-serial, v2-1wg, v3, split2 or split4 \\(or unset\\), got 'v9'")
