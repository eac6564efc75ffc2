"""GPU tests of the KV4/KV8 paged-cache kernels (csrc/attention/) against vllm_qserve/reference/kv.py.

What each op must match, and why:

* kv_cache_write performs the reference's fp32 operations in its order with IEEE division and round-half-even, so
  scales and zeros must be bit-identical, and so must every code -- except that a code may differ by one where
  x/scale + zero lies within fp32 rounding of a .5 boundary (the only place where a different but legal rounding
  of the same operations could flip rint).  Such codes are counted and reported; the count is expected to be 0.
  Slots of padded tokens (-1) and every byte the reference does not write must be untouched: both caches start
  from the same random bytes and are compared whole.
* Round trip (write, then gather): q = clamp(rint(x/s + z), 0, L) is within 1/2 of x/s + z, except where the
  fp16 rounding of s and z pushes x/s + z past 0 or L, by at most L ds + |z| 2^-11 + 2^-25 levels, where
  ds = max(2^-11, 2^-25 / s) is the relative rounding of s (a subnormal fp16 scale, s < 2^-14, i.e. a vector
  whose range is below ~1e-3 (KV4) / ~1.6e-2 (KV8), is rounded much more coarsely -- a property of the format).
  So |x - (q - z) s| <= s (1/2 + 1.01 (L ds + |z| 2^-11 + 2^-25)), plus fp32 rounding (2^-20 |x|, generous).
* kv_gather_dequant computes (q - z) * s in fp32 and rounds once to the output dtype, exactly like
  reference gather_kv(...).to(dtype): bit-identical.  Rows that no sequence covers keep their NaN poison.
* kv_paged_decode: logits, softmax, sums and corrections are fp32; Q enters the tensor cores exactly (fp16, or
  bf16 scaled by a power of two into fp16) and so do the integer codes.  The one extra rounding is the softmax
  weight times the V scale, p * s_v, rounded to fp16 (relative error <= 2^-11 per weight), so for every output
  channel d: |out - ref| <= 2^-11 * sum_t w_t |v_t,d| <= 2^-11 * max_t |v_t,d|.  We allow twice that (exp2
  approximation, fp32 accumulation order), plus half an ulp of the output dtype (2^-11 |ref| for fp16, 2^-8 for
  bf16), 1e-6 max|v| and 2^-24 (fp16 subnormals) absolute.  The test reports the largest error / bound ratio.
Every output is poisoned (NaN, or random bytes for the cache) first, so an unwritten element shows up.

Imports only torch and vllm_qserve (no vLLM): runs on a bare GPU machine.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_qserve import attention_ops, ops
from vllm_qserve.reference import kv as ref

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.HAS_CUDA_OPS or not attention_ops.HAS_KV_OPS, reason="vllm_qserve._C (KV ops) not built"),
]

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    """The reference's einsums must run in true fp32 (no TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _gen(seed=None):
    """A fresh random generator; the seed is printed (pytest shows it with a failure) to reproduce a run."""
    s = torch.randint(0, 2**31 - 1, ()).item() if seed is None else seed
    print(f"generator seed {s}")
    return torch.Generator(device=DEV).manual_seed(s)


def random_cache(layout: ref.KVCacheLayout, num_blocks: int, g) -> torch.Tensor:
    """A cache full of random bytes: stale data, including NaN/inf bit patterns in the scale/zero areas."""
    return torch.randint(0, 256, (num_blocks, 2, layout.page_bytes), dtype=torch.uint8, device=DEV, generator=g)


def make_kv(t, h, d, dtype, g, edge=False):
    """Random K/V [t, h, d]: per-vector offsets and spreads; with edge=True some rows are degenerate."""
    x = torch.randn(t, h, d, device=DEV, generator=g) * (torch.rand(t, h, 1, device=DEV, generator=g) * 4 + 0.05)
    x = x + torch.randn(t, h, 1, device=DEV, generator=g) * 2
    if edge and t >= 8:
        x[0] = 0.0                                   # all zeros (flat)
        x[1] = 1.5                                   # constant (flat, fp16-exact)
        x[2, :, 0] = 100.0                           # one outlier
        x[3] = torch.rand(h, d, device=DEV, generator=g) * 0.25 + 5.0   # far from zero (|zero| ~ 5000 for KV8)
        x[4] = -torch.rand(h, d, device=DEV, generator=g) * 300         # all negative, large
        x[5] = torch.rand(h, d, device=DEV, generator=g) * 1e-4         # tiny, all positive
        x[6, :, ::2] = 3.0
        x[6, :, 1::2] = -3.0                         # two values only
    return x.to(dtype)


def strided_view(x: torch.Tensor, extra_heads=3) -> torch.Tensor:
    """The same values as a non-contiguous view (rows of a wider buffer, like vLLM's qkv split)."""
    t, h, d = x.shape
    buf = torch.full((t, h + extra_heads, d), float("nan"), dtype=x.dtype, device=x.device)
    v = buf[:, 1:h + 1]
    v.copy_(x)
    assert not v.is_contiguous()
    return v


def block_table_for(seq_lens, bs, num_blocks, g, extra_cols=2):
    """Distinct random blocks per sequence; padding columns hold *valid* random ids (reading them would show)."""
    need = [(s + bs - 1) // bs for s in seq_lens]
    width = max(need + [1]) + extra_cols
    perm = torch.randperm(num_blocks, device=DEV, generator=g)
    assert sum(need) <= num_blocks
    bt = torch.randint(0, num_blocks, (len(seq_lens), width), device=DEV, generator=g, dtype=torch.int32)
    c = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[c:c + n].int()
        c += n
    return bt


def slots_for(seq_lens, bt, bs):
    """slot of every position of every sequence (concatenated)."""
    out = []
    for b, s in enumerate(seq_lens):
        pos = torch.arange(s, device=DEV)
        out.append(bt[b, pos // bs].long() * bs + pos % bs)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=DEV)


def fill_cache(layout, seq_lens, bt, dtype, g, edge=False, writer="reference"):
    """Writes K/V for every position of every sequence; returns (cache, k_all, v_all)."""
    cache = random_cache(layout, int(bt.max().item()) + 1, g)
    total = sum(seq_lens)
    k = make_kv(total, layout.num_kv_heads, layout.head_dim, dtype, g, edge)
    v = make_kv(total, layout.num_kv_heads, layout.head_dim, dtype, g, edge)
    slots = slots_for(seq_lens, bt, layout.block_size)
    if total:
        if writer == "reference":
            ref.write_kv_cache(k, v, cache, slots, layout)
        else:
            torch.ops.qserve.kv_cache_write(k, v, cache, slots, layout.num_kv_heads, layout.bits)
    return cache, k, v


# ================================================================================================ cache write
def _near_tie(x, s, z):
    """True where x/s + z is within fp32 rounding of a .5 boundary (float64 evaluation from the stored s, z)."""
    y = x.double() / s.double().unsqueeze(-1) + z.double().unsqueeze(-1)
    dist = (y - torch.floor(y) - 0.5).abs()
    return dist <= 2.0**-20 * (y.abs() + 1)


def check_write(layout, key, value, slot_mapping, g, what):
    num_blocks = int(slot_mapping.max().item()) // layout.block_size + 3 if slot_mapping.numel() else 4
    base = random_cache(layout, num_blocks, g)
    ours, theirs = base.clone(), base.clone()
    torch.ops.qserve.kv_cache_write(key, value, ours, slot_mapping, layout.num_kv_heads, layout.bits)
    t = key.shape[0]
    ref.write_kv_cache(key, value, theirs, slot_mapping[:t], layout)
    if torch.equal(ours, theirs):
        return 0
    # Only codes of near-tie elements may differ (by one level); scales, zeros and untouched bytes may not.
    d_o, s_o, z_o = layout.views(ours)
    d_r, s_r, z_r = layout.views(theirs)
    assert torch.equal(s_o, s_r), f"{what}: scales differ"
    assert torch.equal(z_o, z_r), f"{what}: zeros differ"
    unpack = ref.unpack_nibbles if layout.bits == 4 else (lambda c: c)
    co, cr = unpack(d_o).int(), unpack(d_r).int()
    diff = co != cr
    assert (co - cr).abs().max() <= 1, f"{what}: a code differs by more than one level"
    valid = slot_mapping[:t] >= 0
    slots = slot_mapping[:t][valid]
    blk, off = slots // layout.block_size, slots % layout.block_size
    ties = 0
    for kv_idx, x in enumerate((key, value)):
        xs = x[valid]
        s = s_r[blk, kv_idx, :, off]
        z = z_r[blk, kv_idx, :, off]
        tie = _near_tie(xs.float(), s.float(), z.float())
        bad = diff[blk, kv_idx, :, off]
        assert not (bad & ~tie).any(), f"{what}: {int((bad & ~tie).sum())} codes differ away from a rounding tie"
        ties += int(bad.sum())
    # every differing element must belong to a written slot
    assert int(diff.sum()) == ties, f"{what}: bytes outside the written slots changed"
    return ties


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("bs", [16, 32, 64])
def test_cache_write_matches_reference(dtype, bits, d, bs):
    g = _gen()
    h, t = 4, 77
    layout = ref.KVCacheLayout(h, d, bs, bits)
    key = strided_view(make_kv(t, h, d, dtype, g, edge=True))
    value = strided_view(make_kv(t, h, d, dtype, g, edge=True), extra_heads=5)
    num_blocks = (t + bs - 1) // bs + 4
    slots = torch.randperm(num_blocks * bs, device=DEV, generator=g)[:t + 5].long()
    slots[torch.randperm(t, device=DEV, generator=g)[:9]] = -1  # padded tokens
    ties = check_write(layout, key, value, slots, g, f"write D={d} bits={bits} {dtype} bs={bs}")
    print(f"near-tie codes that differ: {ties}")


@pytest.mark.parametrize("bits", [4, 8])
def test_cache_write_int32_slots_contiguous_inputs_and_empty(bits):
    g = _gen()
    layout = ref.KVCacheLayout(2, 128, 16, bits)
    key = make_kv(40, 2, 128, torch.float16, g)
    value = make_kv(40, 2, 128, torch.float16, g)
    slots = torch.randperm(64, device=DEV, generator=g)[:40].int()
    slots[3] = -1
    check_write(layout, key, value, slots, g, "int32 slots")
    cache = random_cache(layout, 4, g)
    before = cache.clone()
    torch.ops.qserve.kv_cache_write(key[:0], value[:0], cache, slots, 2, bits)
    assert torch.equal(cache, before)


def test_cache_write_accepts_int8_cache_and_skips_out_of_range_slots():
    g = _gen()
    layout = ref.KVCacheLayout(2, 128, 16, 8)
    key = make_kv(10, 2, 128, torch.bfloat16, g)
    value = make_kv(10, 2, 128, torch.bfloat16, g)
    base = random_cache(layout, 3, g)
    slots = torch.tensor([0, 5, 47, 48, 10_000, -7, 2, 3, 4, 6], device=DEV)  # 48 and 10000: past the cache
    ours = base.clone()
    torch.ops.qserve.kv_cache_write(key, value, ours.view(torch.int8), slots, 2, 8)
    theirs = base.clone()
    keep = (slots >= 0) & (slots < 48)
    ref.write_kv_cache(key[keep], value[keep], theirs, slots[keep], layout)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_bound(dtype, bits):
    g = _gen()
    h, d, bs, t = 8, 128, 16, 300
    layout = ref.KVCacheLayout(h, d, bs, bits)
    levels = (1 << bits) - 1
    x = make_kv(t, h, d, dtype, g, edge=True)
    cache = random_cache(layout, t // bs + 1, g)
    slots = torch.arange(t, device=DEV)
    torch.ops.qserve.kv_cache_write(x, x, cache, slots, h, bits)
    bt = torch.arange(t // bs + 1, device=DEV, dtype=torch.int32)[None]
    k_out, _ = attention_ops.gather_dequant(cache, bt, torch.tensor([t], device=DEV, dtype=torch.int32),
                                            torch.zeros(1, device=DEV, dtype=torch.int32), h, d, bits, t,
                                            dtype=torch.float32)
    _, s, z = layout.views(cache)
    s = s[slots // bs, 0, :, slots % bs].float().unsqueeze(-1)
    z = z[slots // bs, 0, :, slots % bs].float().unsqueeze(-1)
    err = (k_out - x.float()).abs()
    ds = torch.clamp(2.0**-25 / s, min=2.0**-11)
    bound = s * (0.5 + 1.01 * (levels * ds + z.abs() * 2.0**-11 + 2.0**-25)) + 2.0**-20 * (x.float().abs() + (z * s).abs())
    assert (err <= bound).all(), f"round trip: max err/bound {(err / bound).max().item():.3f}"
    print(f"round trip: max |x - x'| / scale = {(err / s).max().item():.4f} (<= 0.5 + fp16 rounding of s, z)")


# ================================================================================================ gather
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d,bs", [(64, 16), (128, 32), (256, 64), (128, 16)])
def test_gather_matches_reference(out_dtype, bits, d, bs):
    g = _gen()
    h = 2 if d == 256 else 4
    seq_lens = [1, 0, 37, 16, 130, 5]
    layout = ref.KVCacheLayout(h, d, bs, bits)
    bt = block_table_for(seq_lens, bs, 64, g)
    cache, _, _ = fill_cache(layout, seq_lens, bt, torch.bfloat16, g, edge=True)
    # rows with gaps between sequences (gap rows must stay untouched)
    starts, row = [], 3
    for s in seq_lens:
        starts.append(row)
        row += s + 2
    total = row + 4
    cu = torch.tensor(starts, dtype=torch.int32, device=DEV)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    k_out = torch.full((total, h, d), float("nan"), dtype=out_dtype, device=DEV)
    v_out = torch.full((total, h + 2, d), float("nan"), dtype=out_dtype, device=DEV)[:, 1:h + 1]  # strided
    torch.ops.qserve.kv_gather_dequant(cache, bt, sl, cu, k_out, v_out, h, bits)
    covered = torch.zeros(total, dtype=torch.bool, device=DEV)
    for b, s in enumerate(seq_lens):
        kr, vr = ref.gather_kv(cache, bt[b], s, layout)
        r0 = starts[b]
        assert torch.equal(k_out[r0:r0 + s], kr.to(out_dtype)), f"K of sequence {b} differs"
        assert torch.equal(v_out[r0:r0 + s], vr.to(out_dtype)), f"V of sequence {b} differs"
        covered[r0:r0 + s] = True
    assert torch.isnan(k_out[~covered].float()).all() and torch.isnan(v_out[~covered].float()).all(), \
        "rows outside the sequences were written"


# ================================================================================================ decode
def ref_decode(query, cache, bt, seq_lens, layout, scale, window=None):
    b = query.shape[0]
    out = ref.paged_attention(query, cache, bt[:b], torch.tensor(seq_lens, device=DEV),
                              torch.arange(b + 1, device=DEV), layout, scale, sliding_window=window)
    for i, s in enumerate(seq_lens):
        if s == 0:
            out[i] = 0.0
    return out


def decode_bound(cache, bt, seq_lens, layout, query, scale, out_ref, dtype, window=None):
    """Per-element tolerance (module docstring): 2 * 2^-11 max_t |v_t,d| + half an ulp of the output + 1e-6,
    plus the effect of fp32 logit rounding, which only matters for huge logits: a logit error of at most
    eps_t = 2^-20 * scale * sum_d |q_d| (|k_t,d| + |z_t s_t|) (fp32 accumulation of D products and of the zero
    correction, in both implementations) moves the output by at most 2 max_t eps_t max_t |v_t,d|."""
    h, d = layout.num_kv_heads, layout.head_dim
    group = query.shape[1] // h
    vmax = torch.zeros(len(seq_lens), query.shape[1], d, device=DEV)
    logit_eps = torch.zeros(len(seq_lens), query.shape[1], 1, device=DEV)
    _, s_all, z_all = layout.views(cache)
    for b, s in enumerate(seq_lens):
        if not s:
            continue
        start = max(0, s - window) if window else 0  # the positions the query attends to
        k, v = ref.gather_kv(cache, bt[b], s, layout, start)
        vmax[b] = v.abs().amax(0).repeat_interleave(group, dim=0)
        pos = torch.arange(start, s, device=DEV)
        blk, off = bt[b, pos // layout.block_size].long(), pos % layout.block_size
        zs = (z_all[blk, 0, :, off].float() * s_all[blk, 0, :, off].float()).abs()  # [s, H]
        qa = query[b].float().abs().view(h, group, d)                                 # [H, G, D]
        terms = torch.einsum("hgd,shd->hgs", qa, k.abs()) + qa.sum(-1, keepdim=True) * zs.t()[:, None, :]
        logit_eps[b] = (2.0**-20 * scale * terms.amax(-1)).reshape(-1, 1)
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    return (2.0**-10 + 2 * logit_eps) * vmax + half_ulp * 1.01 * out_ref.abs() + 1e-6 * vmax.amax() + 2.0**-24


def run_decode_case(layout, hq, seq_lens, dtype, g, num_splits=None, edge=False, q_scale=3.0, extra_cols=2):
    h, d = layout.num_kv_heads, layout.head_dim
    group = hq // h
    nblk = sum((s + layout.block_size - 1) // layout.block_size for s in seq_lens) + 8
    bt = block_table_for(seq_lens, layout.block_size, nblk, g, extra_cols)
    cache, _, _ = fill_cache(layout, seq_lens, bt, dtype, g, edge=edge)
    b = len(seq_lens)
    query = (torch.randn(b, hq, d, device=DEV, generator=g) * q_scale).to(dtype)
    scale = 1.0 / math.sqrt(d)
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    out = torch.full((b, hq, d), float("nan"), dtype=dtype, device=DEV)
    attention_ops.paged_decode(query, cache, bt, sl, h, layout.bits, scale, out=out, num_splits=num_splits)
    expect = ref_decode(query, cache, bt, seq_lens, layout, scale)
    return out, expect, (cache, bt, query, sl, scale)


def check_decode(out, expect, cache, bt, seq_lens, layout, query, scale, dtype, what, window=None):
    assert not torch.isnan(out).any(), f"{what}: {int(torch.isnan(out).sum())} NaN outputs (unwritten?)"
    bound = decode_bound(cache, bt, seq_lens, layout, query, scale, expect, dtype, window)
    err = (out.float() - expect).abs()
    ratio = (err / bound).max().item()
    if ratio > 1:
        idx = torch.nonzero(err / bound == (err / bound).max())[0].tolist()
        raise AssertionError(f"{what}: error/bound {ratio:.3g} at {idx}: {out[tuple(idx)].item()} vs "
                             f"{expect[tuple(idx)].item()} (bound {bound[tuple(idx)].item():.3g})")
    return ratio


GQA = [(8, 8), (2, 8), (1, 8), (2, 14), (3, 27), (1, 32)]  # (H, Hq): 1:1, 4:1, 8:1, 7:1, 9:1 (16-head CTA), 32:1
SHORT_LENS = [1, 15, 16, 17, 33, 200, 1000, 64]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("gqa", GQA, ids=lambda x: f"{x[1]}q{x[0]}kv")
def test_decode_matrix(dtype, bits, d, gqa):
    h, hq = gqa
    bs = [16, 32, 64, 48][(GQA.index(gqa) + bits + d // 64) % 4]  # 48: the non-power-of-two path
    g = _gen()
    layout = ref.KVCacheLayout(h, d, bs, bits)
    out, expect, (cache, bt, query, _, scale) = run_decode_case(layout, hq, SHORT_LENS, dtype, g)
    ratio = check_decode(out, expect, cache, bt, SHORT_LENS, layout, query, scale, dtype,
                         f"decode D={d} bits={bits} {dtype} {hq}q/{h}kv bs={bs}")
    print(f"max error/bound {ratio:.3f}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bs", [16, 64])
def test_decode_long_context_llama3_heads(dtype, bits, bs):
    """Llama-3-8B heads (32 q / 8 kv, D=128), contexts up to 8192 with the automatic split count."""
    g = _gen()
    seq_lens = [8192, 4097, 2048, 1, 3000]
    layout = ref.KVCacheLayout(8, 128, bs, bits)
    out, expect, (cache, bt, query, sl, scale) = run_decode_case(layout, 32, seq_lens, dtype, g)
    n = torch.ops.qserve.kv_decode_num_splits(query, cache, bt, 8, bits)
    ratio = check_decode(out, expect, cache, bt, seq_lens, layout, query, scale, dtype,
                         f"long bits={bits} {dtype} bs={bs}")
    print(f"num_splits {n}, max error/bound {ratio:.3f}")


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_explicit_splits_agree(bits):
    g = _gen()
    seq_lens = [2500, 1, 129, 700, 0, 64]
    layout = ref.KVCacheLayout(4, 128, 16, bits)
    dtype = torch.bfloat16
    h = layout.num_kv_heads
    out1, expect, (cache, bt, query, sl, scale) = run_decode_case(layout, 16, seq_lens, dtype, g, num_splits=1)
    check_decode(out1, expect, cache, bt, seq_lens, layout, query, scale, dtype, "splits=1")
    for s in (2, 3, 5, 17, 64, 256):
        out = torch.full_like(out1, float("nan"))
        torch.ops.qserve.kv_paged_decode_splits(out, query, cache, bt, sl, scale, h, bits, s)
        check_decode(out, expect, cache, bt, seq_lens, layout, query, scale, dtype, f"splits={s}")
        assert (out[4] == 0).all(), "an empty sequence must give zeros"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_head_dim_256(bits, dtype):
    g = _gen()
    seq_lens = [1, 31, 500, 77]
    layout = ref.KVCacheLayout(2, 256, 16, bits)
    for hq in (4, 18):  # 2:1 and 9:1 (D=256 uses 8-head CTAs: two chunks)
        out, expect, (cache, bt, query, _, scale) = run_decode_case(layout, hq, seq_lens, dtype, g)
        check_decode(out, expect, cache, bt, seq_lens, layout, query, scale, dtype, f"D=256 bits={bits} hq={hq}")


def poison_before_window(cache, layout, bt, seq_lens, window):
    """NaN scales and zeros in every block that lies wholly before a sequence's window (vLLM's sliding-window
    manager frees those blocks and may hand them to other requests): any read of them turns outputs into NaN."""
    _, scale, zero = layout.views(cache)
    for b, s in enumerate(seq_lens):
        first = max(0, s - window)
        for j in range(first // layout.block_size):
            blk = int(bt[b, j])
            scale[blk] = float("nan")
            zero[blk] = float("nan")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d,bs,h,hq", [(256, 16, 1, 4), (256, 32, 2, 18), (128, 64, 2, 8), (64, 48, 4, 28)],
                         ids=["gemma3-270m", "D256-9to1", "D128", "D64-bs48"])
def test_decode_sliding_window(bits, dtype, d, bs, h, hq):
    """Sliding-window decode (Gemma 2/3 local layers): the new token at position s - 1 attends to positions
    >= s - W only.  Blocks wholly before the window are poisoned, so reading one shows up as NaN; windows below,
    at and above a tile / block boundary and above the length; automatic and explicit split counts."""
    g = _gen()
    seq_lens = [1, 16, 17, 100, 513, 1000, 4096, 0]
    layout = ref.KVCacheLayout(h, d, bs, bits)
    nblk = sum((s + bs - 1) // bs for s in seq_lens) + 8
    bt = block_table_for(seq_lens, bs, nblk, g)
    for window in (1, 15, 16, 17, 512, 1000, 5000):
        cache, _, _ = fill_cache(layout, seq_lens, bt, dtype, g)
        poison_before_window(cache, layout, bt, seq_lens, window)
        query = (torch.randn(len(seq_lens), hq, d, device=DEV, generator=g) * 3.0).to(dtype)
        scale = 1.0 / math.sqrt(d)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
        expect = ref_decode(query, cache, bt, seq_lens, layout, scale, window)
        n_auto = torch.ops.qserve.kv_decode_num_splits(query, cache, bt, h, bits, window)
        for splits in (None, 1, 3, 64):
            out = torch.full((len(seq_lens), hq, d), float("nan"), dtype=dtype, device=DEV)
            attention_ops.paged_decode(query, cache, bt, sl, h, bits, scale, out=out, num_splits=splits,
                                       sliding_window=window)
            check_decode(out, expect, cache, bt, seq_lens, layout, query, scale, dtype,
                         f"window={window} splits={splits or n_auto} D={d} bits={bits}", window=window)
            assert (out[-1] == 0).all(), "an empty sequence must give zeros"
    with pytest.raises(RuntimeError, match="sliding_window"):
        torch.ops.qserve.kv_paged_decode(out, query, cache, bt, sl, scale, h, bits, -3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("window", [1, 16, 37, 4096])
def test_backend_prefill_sliding_window(bits, window):
    """The CUDA kernel class's prefill path (cut context + FlashAttention's window) and decode path, in one mixed
    batch (decodes first, then prompt chunks over cached context), against the reference's windowed attention;
    blocks before each sequence's window are poisoned."""
    pytest.importorskip("vllm")
    from vllm_qserve.attention.backend import QServeKVMetadata, QServePrefillMetadata
    from vllm_qserve.attention.kernels import CudaKVKernel, KVSpec

    g = _gen()
    h, hq, d, bs, dtype = 1, 4, 256, 16, torch.bfloat16
    seq_lens = [300, 45, 1, 200, 64, 130]   # 2 decodes, then prefills (q_lens below)
    q_lens = [1, 1, 1, 200, 20, 7]
    layout = ref.KVCacheLayout(h, d, bs, bits)
    bt = block_table_for(seq_lens, bs, sum((s + bs - 1) // bs for s in seq_lens) + 8, g)
    cache, _, _ = fill_cache(layout, seq_lens, bt, dtype, g)
    _, sc, zc = layout.views(cache)
    for b, s in enumerate(seq_lens):  # blocks wholly before the first query's window
        first = max(0, s - q_lens[b] - window + 1)
        for j in range(first // bs):
            sc[int(bt[b, j])] = float("nan")
            zc[int(bt[b, j])] = float("nan")
    qsl = torch.tensor([0] + torch.cumsum(torch.tensor(q_lens), 0).tolist(), dtype=torch.int32)
    query = (torch.randn(int(qsl[-1]), hq, d, device=DEV, generator=g) * 2).to(dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    nd = 3
    seq_p = sl[nd:]
    cu_k = torch.zeros(len(seq_p) + 1, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(seq_p, 0)
    prefill = QServePrefillMetadata(block_table=bt[nd:], seq_lens=seq_p.to(DEV),
                                    cu_seqlens_q=(qsl[nd:] - qsl[nd]).to(DEV), cu_seqlens_k=cu_k.to(DEV),
                                    max_query_len=max(q_lens[nd:]), max_seq_len=int(seq_p.max()),
                                    total_kv_tokens=int(cu_k[-1]), seq_lens_cpu=seq_p,
                                    query_lens_cpu=torch.tensor(q_lens[nd:], dtype=torch.int32))
    md = QServeKVMetadata(num_actual_tokens=int(qsl[-1]), num_decodes=nd, num_decode_tokens=nd, num_prefills=3,
                          max_query_len=200, max_seq_len=300, query_start_loc=qsl.to(DEV), seq_lens=sl.to(DEV),
                          block_table=bt, slot_mapping=torch.zeros(0, device=DEV), prefill=prefill)
    kernel = CudaKVKernel(KVSpec(hq, h, d, bits, dtype, "cuda"))
    out = torch.full_like(query, float("nan"))
    scale = 256 ** -0.5
    kernel.attend(query, cache, md, scale, out, sliding_window=window)
    expect = ref.paged_attention(query, cache, bt, sl.to(DEV), qsl.to(DEV), layout, scale, sliding_window=window)
    assert not out.isnan().any(), "NaN: an out-of-window block was read, or an output was not written"
    err = (out.float() - expect).abs().max().item()
    # bf16 output (2^-8 relative) and FlashAttention's bf16 P.V on bf16-rounded K/V
    assert err <= 0.02 * expect.abs().max().item() + 1e-3, f"windowed mixed batch: max error {err}"


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_edge_values(bits):
    """Degenerate K/V rows (flat, outliers, far from zero, tiny), peaky attention (large q) and a large context."""
    g = _gen()
    seq_lens = [300, 9, 1]
    for dtype in DTYPES:
        layout = ref.KVCacheLayout(2, 128, 32, bits)
        for q_scale in (0.01, 3.0, 40.0):
            out, expect, (cache, bt, query, _, scale) = run_decode_case(layout, 8, seq_lens, dtype, g, edge=True,
                                                                        q_scale=q_scale)
            check_decode(out, expect, cache, bt, seq_lens, layout, query, scale, dtype, f"edge {dtype} q*{q_scale}")


def test_decode_zero_lengths_views_and_guard_rows():
    """seq_len 0 -> zeros; query is a strided view of a qkv buffer; out is a row slice of a bigger buffer whose
    other rows must stay untouched; block_table/seq_lens have more rows than the batch."""
    g = _gen()
    h, hq, d, bits, bs = 2, 8, 128, 4, 16
    layout = ref.KVCacheLayout(h, d, bs, bits)
    seq_lens = [0, 40, 0, 1]
    bt = block_table_for(seq_lens + [50], bs, 32, g)  # one extra row
    cache, _, _ = fill_cache(layout, seq_lens + [50], bt, torch.float16, g)
    qkv = torch.randn(4, (hq + 2 * h) * d, device=DEV, generator=g).half()
    query = qkv[:, :hq * d].view(4, hq, d)
    assert not query.is_contiguous()
    big = torch.full((7, hq, d), float("nan"), dtype=torch.float16, device=DEV)
    out = big[2:6]
    sl = torch.tensor(seq_lens + [50], dtype=torch.int32, device=DEV)
    for splits in (1, 4):
        big.fill_(float("nan"))
        torch.ops.qserve.kv_paged_decode_splits(out, query, cache, bt, sl, 0.1, h, bits, splits)
        assert torch.isnan(big[:2].float()).all() and torch.isnan(big[6:].float()).all(), "guard rows written"
        expect = ref_decode(query, cache, bt, seq_lens, layout, 0.1)
        check_decode(out, expect, cache, bt, seq_lens, layout, query, 0.1, torch.float16, f"views splits={splits}")
        assert (out[0] == 0).all() and (out[2] == 0).all()


def test_decode_cuda_graph_replay_with_new_lengths():
    """Captured once, replayed with other seq_lens / block tables / queries (same shapes): matches eager."""
    g = _gen()
    h, hq, d, bits, bs = 8, 32, 128, 4, 16
    layout = ref.KVCacheLayout(h, d, bs, bits)
    max_blocks = 4096 // bs
    lens_a = [4096, 10, 1, 2000]
    lens_b = [1, 4000, 1500, 17]
    b = len(lens_a)
    nblk = b * max_blocks + 8
    cache = random_cache(layout, nblk, g)
    bt = torch.randperm(nblk, device=DEV, generator=g)[:b * max_blocks].view(b, max_blocks).int()
    for lens in (lens_a, lens_b):
        slots = slots_for(lens, bt, bs)
        k = make_kv(len(slots), h, d, torch.bfloat16, g)
        v = make_kv(len(slots), h, d, torch.bfloat16, g)
        torch.ops.qserve.kv_cache_write(k, v, cache, slots, h, bits)
    query = torch.randn(b, hq, d, device=DEV, generator=g).bfloat16()
    sl = torch.tensor(lens_a, dtype=torch.int32, device=DEV)
    out = torch.empty_like(query)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            torch.ops.qserve.kv_paged_decode(out, query, cache, bt, sl, 0.0883883, h, bits)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.qserve.kv_paged_decode(out, query, cache, bt, sl, 0.0883883, h, bits)
    for lens in (lens_b, lens_a):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        query.copy_(torch.randn(b, hq, d, device=DEV, generator=g).bfloat16())
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = torch.empty_like(out)
        torch.ops.qserve.kv_paged_decode(eager, query, cache, bt, sl, 0.0883883, h, bits)
        assert torch.equal(out, eager), "graph replay differs from eager"
        expect = ref_decode(query, cache, bt, lens, layout, 0.0883883)
        check_decode(out, expect, cache, bt, lens, layout, query, 0.0883883, torch.bfloat16, "graph")


def test_write_then_decode_end_to_end():
    """Our write + our decode vs the reference write + reference attention on the same K/V."""
    g = _gen()
    h, hq, d, bs = 8, 32, 128, 16
    seq_lens = [777, 1, 64]
    for bits in (4, 8):
        layout = ref.KVCacheLayout(h, d, bs, bits)
        bt = block_table_for(seq_lens, bs, 80, g)
        ours, k, v = fill_cache(layout, seq_lens, bt, torch.bfloat16, g, writer="ours")
        theirs = random_cache(layout, ours.shape[0], g)
        ref.write_kv_cache(k, v, theirs, slots_for(seq_lens, bt, bs), layout)
        query = torch.randn(len(seq_lens), hq, d, device=DEV, generator=g).bfloat16()
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
        out = attention_ops.paged_decode(query, ours, bt, sl, h, bits)
        expect = ref_decode(query, theirs, bt, seq_lens, layout, 1 / math.sqrt(d))
        check_decode(out, expect, theirs, bt, seq_lens, layout, query, 1 / math.sqrt(d), torch.bfloat16,
                     f"end to end bits={bits}")


# ================================================================================================ bad input
def test_bad_inputs_raise_clear_errors():
    g = _gen()
    h, hq, d, bs = 2, 8, 128, 16
    layout = ref.KVCacheLayout(h, d, bs, 4)
    cache = random_cache(layout, 4, g)
    bt = torch.zeros(2, 4, dtype=torch.int32, device=DEV)
    sl = torch.ones(2, dtype=torch.int32, device=DEV)
    q = torch.randn(2, hq, d, device=DEV).half()
    out = torch.empty_like(q)
    dec = torch.ops.qserve.kv_paged_decode
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        dec(out, q, cache, bt, sl, 0.1, h, 5)
    with pytest.raises(RuntimeError, match="not a multiple of num_kv_heads"):
        dec(out, q, cache, bt, sl, 0.1, 3, 4)
    with pytest.raises(RuntimeError, match="head_dim must be 64, 128 or 256"):
        q96 = torch.randn(2, hq, 96, device=DEV).half()
        dec(torch.empty_like(q96), q96, cache, bt, sl, 0.1, h, 4)
    with pytest.raises(RuntimeError, match="must be float16 or bfloat16"):
        dec(out.float(), q.float(), cache, bt, sl, 0.1, h, 4)
    with pytest.raises(RuntimeError, match="positive multiple of num_kv_heads"):
        q7 = torch.randn(2, 7, d, device=DEV).half()
        dec(torch.empty_like(q7), q7, cache, bt, sl, 0.1, h, 4)
    with pytest.raises(RuntimeError, match="block_table must be int32"):
        dec(out, q, cache, bt.long(), sl, 0.1, h, 4)
    with pytest.raises(RuntimeError, match="seq_lens has 1 entries, need at least 2"):
        dec(out, q, cache, bt, sl[:1], 0.1, h, 4)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        dec(out, q, cache.cpu(), bt, sl, 0.1, h, 4)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        small = ref.KVCacheLayout(h, d, 8, 4)
        dec(out, q, random_cache(small, 4, g), bt, sl, 0.1, h, 4)
    with pytest.raises(RuntimeError, match="same shape"):
        dec(out[:1], q, cache, bt, sl, 0.1, h, 4)
    with pytest.raises(RuntimeError, match="kv_cache must be uint8"):
        dec(out, q, cache.half(), bt, sl, 0.1, h, 4)
    kv = torch.randn(3, h, d, device=DEV).half()
    with pytest.raises(RuntimeError, match="slot_mapping must be int64"):
        torch.ops.qserve.kv_cache_write(kv, kv, cache, torch.zeros(3, device=DEV), h, 4)
    with pytest.raises(RuntimeError, match="slot_mapping has 2 entries for 3 tokens"):
        torch.ops.qserve.kv_cache_write(kv, kv, cache, torch.zeros(2, dtype=torch.long, device=DEV), h, 4)
    with pytest.raises(RuntimeError, match="key has 3 heads but num_kv_heads = 2"):
        kv3 = torch.randn(3, 3, d, device=DEV).half()
        torch.ops.qserve.kv_cache_write(kv3, kv3, cache, torch.zeros(3, dtype=torch.long, device=DEV), h, 4)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must be int32"):
        torch.ops.qserve.kv_gather_dequant(cache, bt, sl, sl.long(), kv, kv, h, 4)
