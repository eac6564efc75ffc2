"""Warp-level numpy emulation of csrc/attention/kv_decode.cuh (dev check of the index math; not shipped).

Mirrors the kernel line by line: per-lane registers are arrays of shape [32]; ldmatrix / ldmatrix.trans / mma
m16n8k16 / movmatrix follow the PTX ISA fragment definitions.
"""
import math
import sys

import numpy as np
import torch

sys.path.insert(0, "/work/main/.wt/kvkern")
from vllm_qserve.reference import kv as ref  # noqa: E402

LANE = np.arange(32)
R = LANE >> 2
T = LANE & 3


def u32(x):
    return np.asarray(x, dtype=np.uint64).astype(np.uint32)


def h2_from_u32(w):  # -> (lo, hi) float16 arrays
    w = u32(w)
    lo = (w & 0xFFFF).astype(np.uint16).view(np.float16)
    hi = (w >> 16).astype(np.uint16).view(np.float16)
    return lo, hi


def u32_from_h2(lo, hi):
    lo = np.asarray(lo, dtype=np.float16).view(np.uint16).astype(np.uint32)
    hi = np.asarray(hi, dtype=np.float16).view(np.uint16).astype(np.uint32)
    return lo | (hi << 16)


def hsub2(a, b):
    al, ah = h2_from_u32(a)
    bl, bh = h2_from_u32(b)
    return u32_from_h2((al.astype(np.float32) - bl).astype(np.float16), (ah.astype(np.float32) - bh).astype(np.float16))


def hfma2(a, b, c):
    al, ah = h2_from_u32(a)
    bl, bh = h2_from_u32(b)
    cl, ch = h2_from_u32(c)
    f = lambda x, y, z: (x.astype(np.float64) * y + z).astype(np.float16)  # exact here (single rounding of exact)
    return u32_from_h2(f(al, bl, cl), f(ah, bh, ch))


MAGIC = 0x64006400


def nib_lo(w):
    w = u32(w)
    return hsub2((w & 0x000F000F) | MAGIC, np.full(32, MAGIC, np.uint32))


def nib_hi(w):
    w = u32(w)
    return hfma2((w & 0x00F000F0) | MAGIC, np.full(32, 0x2C002C00, np.uint32), np.full(32, 0xD400D400, np.uint32))


def byte_perm(x, y, s):
    x = u32(x).astype(np.uint64)
    y = u32(y).astype(np.uint64)
    b = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros(32, np.uint64)
    for i in range(4):
        sel = (s >> (4 * i)) & 7
        out |= b[sel] << (8 * i)
    return u32(out)


def byte_pair(w, sel):
    return hsub2(byte_perm(w, np.full(32, 0x64646464, np.uint32), sel), np.full(32, MAGIC, np.uint32))


def ldmatrix_x4(smem, addrs, trans=False):
    """addrs [32] byte offsets into smem (np.uint8); returns 4 regs of [32] uint32 (PTX fragment semantics)."""
    addrs = np.asarray(addrs)
    regs = []
    for i in range(4):
        rows = np.stack([smem[addrs[8 * i + rr]: addrs[8 * i + rr] + 16] for rr in range(8)])  # [8, 16] bytes
        el = rows.copy().view(np.uint16)  # [8 rows][8 b16]
        if not trans:
            lo, hi = el[LANE // 4, 2 * (LANE % 4)], el[LANE // 4, 2 * (LANE % 4) + 1]
        else:
            lo, hi = el[2 * (LANE % 4), LANE // 4], el[2 * (LANE % 4) + 1, LANE // 4]
        regs.append(lo.astype(np.uint32) | (hi.astype(np.uint32) << 16))
    return regs


_G, _T = LANE // 4, LANE % 4
_A_POS = [(_G, 2 * _T), (_G + 8, 2 * _T), (_G, 2 * _T + 8), (_G + 8, 2 * _T + 8)]
_B_POS = [2 * _T, 2 * _T + 8]


def mma(d, a, b0, b1):
    """d: [32][4] float32 (modified), a: list of 4 [32] u32, b0/b1 [32] u32."""
    A = np.zeros((16, 16), np.float64)
    B = np.zeros((16, 8), np.float64)
    for reg, (row, col) in zip(a, _A_POS):
        lo, hi = h2_from_u32(reg)
        A[row, col] = lo
        A[row, col + 1] = hi
    for reg, k in zip((b0, b1), _B_POS):
        lo, hi = h2_from_u32(reg)
        B[k, _G] = lo
        B[k + 1, _G] = hi
    C = A @ B
    d[:, 0] += C[_G, 2 * _T]
    d[:, 1] += C[_G, 2 * _T + 1]
    d[:, 2] += C[_G + 8, 2 * _T]
    d[:, 3] += C[_G + 8, 2 * _T + 1]


def movmatrix(x):
    M = np.zeros((8, 8), np.uint32)
    x = u32(x)
    M[_G, 2 * _T] = x & 0xFFFF
    M[_G, 2 * _T + 1] = x >> 16
    return M[2 * _T, _G] | (M[2 * _T + 1, _G] << 16)


def shfl_xor(v, m):
    return v[LANE ^ m]


def max_rows(v):
    for m in (4, 8, 16):
        v = np.maximum(v, shfl_xor(v, m))
    return v


def sum_rows(v):
    for m in (4, 8, 16):
        v = v + shfl_xor(v, m)
    return v


def ex2(x):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp2(np.asarray(x, np.float64)).astype(np.float32)


def split_tokens(seq_len, S):
    if seq_len <= 0:
        return 0
    c = (seq_len + S - 1) // S
    c = (c + 63) // 64 * 64
    if S > 1 and c < 128:
        c = 128
    return c


class Cfg:
    def __init__(self, D, BITS, NT):
        self.D, self.BITS, self.NT = D, BITS, NT
        self.RowBytes = D * BITS // 8
        self.Segs = self.RowBytes // 16
        self.TileBytes = 16 * self.RowBytes
        self.StageBytes = 2 * self.TileBytes + 128
        self.Stages = 4 if self.StageBytes <= 2304 else (3 if self.StageBytes <= 4352 else 2)
        self.Heads = 8 * NT
        self.KSteps = D // 16
        self.MTiles = D // 16
        self.QWords = D // 8

    def swizzle(self, t):
        rows = 1 if self.Segs >= 8 else 8 // self.Segs
        mask = (8 if self.Segs >= 8 else self.Segs) - 1
        return (t // rows) & mask

    def out_channel(self, i, r, hi):
        if self.BITS == 4:
            return (i >> 1) * 32 + 4 * r + 2 * (i & 1) + hi
        return i * 16 + 2 * r + hi


def run_cta(cfg, p, b, kvh, chunk, split, bf16):
    """Returns (dict head->out fp32 [D]) for S == 1, or partials (o, m, l) per head."""
    D, BITS, NT = cfg.D, cfg.BITS, cfg.NT
    H, bs = p["H"], p["bs"]
    group = p["group"]
    qh0 = kvh * group + chunk * cfg.Heads
    nheads = min(cfg.Heads, group - chunk * cfg.Heads)
    seq_len = min(max(int(p["seq_lens"][b]), 0), p["max_blocks"] * bs)
    per = split_tokens(seq_len, p["S"])
    t_begin = split * per
    t_end = min(seq_len, t_begin + per)
    if t_begin >= t_end:
        return None
    cache = p["cache"]  # np.uint8 [nb, 2, page]
    q = p["query"]  # float32 values representable in dtype [B, Hq, D]

    # ---- Q: each warp computes the same; emulate one set per lane
    w = np.zeros((NT, cfg.QWords, 32), np.uint32)
    qv = np.zeros((NT, cfg.QWords, 32, 2), np.float32)  # raw values
    for j in range(NT):
        for l in range(32):
            g = 8 * j + R[l]
            if g >= nheads:
                continue
            row = q[b, qh0 + g]
            t = T[l]
            if BITS == 4:
                for s in range(D // 32):
                    ch = s * 32 + 8 * t
                    for i in range(4):
                        qv[j, 4 * s + i, l] = row[ch + 2 * i: ch + 2 * i + 2]
            else:
                for s in range(D // 16):
                    ch = s * 16 + 4 * t
                    for i in range(2):
                        qv[j, 2 * s + i, l] = row[ch + 2 * i: ch + 2 * i + 2]
    logit_scale = np.float32(p["scale_log2"])
    if bf16:
        amax = np.abs(qv).max()
        e = 0
        if amax > 0:
            e = min(max(math.frexp(float(amax))[1] - 1 - 14, -126), 127)
        down = np.float32(2.0 ** -e)
        logit_scale = np.float32(logit_scale * np.float32(2.0 ** e))
        qv = (qv * down).astype(np.float16)
    else:
        qv = qv.astype(np.float16)
    for j in range(NT):
        for i in range(cfg.QWords):
            w[j, i] = u32_from_h2(qv[j, i, :, 0], qv[j, i, :, 1])
    qf = np.zeros((NT, cfg.KSteps, 2, 32), np.uint32)
    qsum = np.zeros((NT, 2, 32), np.float32)
    for j in range(NT):
        own = np.zeros(32, np.float32)
        for i in range(cfg.QWords):
            lo, hi = h2_from_u32(w[j, i])
            own = own + (lo.astype(np.float32) + hi.astype(np.float32))
        own = own + shfl_xor(own, 1)
        own = own + shfl_xor(own, 2)
        qsum[j, 0] = own[8 * T]
        qsum[j, 1] = own[8 * T + 4]
        for s in range(cfg.Segs):
            if BITS == 4:
                w01, w23, w45, w67 = w[j, 4 * s], w[j, 4 * s + 1], w[j, 4 * s + 2], w[j, 4 * s + 3]
                qf[j, 2 * s, 0] = byte_perm(w01, w45, 0x5410)
                qf[j, 2 * s, 1] = byte_perm(w01, w45, 0x7632)
                qf[j, 2 * s + 1, 0] = byte_perm(w23, w67, 0x5410)
                qf[j, 2 * s + 1, 1] = byte_perm(w23, w67, 0x7632)
            else:
                qf[j, s, 0] = w[j, 2 * s]
                qf[j, s, 1] = w[j, 2 * s + 1]

    n_tiles = (t_end - t_begin + 15) // 16
    warps_out = []
    bt = p["block_table"][b]
    page = cache.shape[2]
    RB = cfg.RowBytes
    scales_off = H * bs * RB
    zeros_off = scales_off + H * bs * 2
    for warp in range(4):
        my_tiles = (n_tiles - warp + 3) // 4 if warp < n_tiles else 0
        acc = np.zeros((NT, cfg.MTiles, 32, 4), np.float32)
        m_run = np.full((NT, 2, 32), -np.inf, np.float32)
        l_run = np.zeros((NT, 2, 32), np.float32)
        corr = np.zeros((NT, 2, 32), np.float32)
        ev_run = 64
        ld_tok = (LANE & 7) + ((LANE >> 3) & 1) * 8
        ld_seg = LANE >> 4
        ld_swz = np.array([cfg.swizzle(int(x)) for x in ld_tok])
        for k in range(my_tiles):
            # issue (direct copy into a fresh stage buffer; pipelining is not emulated)
            st = np.zeros(cfg.StageBytes, np.uint8)
            t0 = t_begin + (warp + k * 4) * 16
            blk = int(bt[t0 // bs])
            ok = 0 <= blk < cache.shape[0]
            row = kvh * bs + (t0 % bs)
            pk = cache[blk, 0] if ok else np.zeros(page, np.uint8)
            pv = cache[blk, 1] if ok else np.zeros(page, np.uint8)
            for i in range(cfg.TileBytes // 16):
                tok, seg = i // cfg.Segs, i % cfg.Segs
                dst = tok * RB + ((seg ^ cfg.swizzle(tok)) << 4)
                st[dst:dst + 16] = pk[row * RB + i * 16: row * RB + i * 16 + 16]
                st[cfg.TileBytes + dst: cfg.TileBytes + dst + 16] = pv[row * RB + i * 16: row * RB + i * 16 + 16]
            for lane in range(8):
                which, hidx = lane >> 1, lane & 1
                src = (pk if which < 2 else pv)
                off = (zeros_off if which & 1 else scales_off) + row * 2 + hidx * 16
                st[2 * cfg.TileBytes + lane * 16: 2 * cfg.TileBytes + lane * 16 + 16] = src[off:off + 16]
            # compute
            n_valid = min(16, t_end - t0) if ok else 0
            if n_valid == 0:
                continue
            v0 = R < n_valid
            v1 = R + 8 < n_valid
            sc = st[2 * cfg.TileBytes:].view(np.float16).astype(np.float32)
            sk0, sk1 = sc[R], sc[R + 8]
            zk0, zk1 = sc[16 + R], sc[24 + R]
            sv0 = np.where(v0, sc[32 + R], 0).astype(np.float32)
            sv1 = np.where(v1, sc[40 + R], 0).astype(np.float32)
            zv0 = np.where(v0, sc[48 + R], 0).astype(np.float32)
            zv1 = np.where(v1, sc[56 + R], 0).astype(np.float32)
            s = np.zeros((NT, 32, 4), np.float32)
            for s2 in range(0, cfg.Segs, 2):
                addrs = ld_tok * RB + (((s2 + ld_seg) ^ ld_swz) << 4)
                kw = ldmatrix_x4(st, addrs)
                for u in range(2):
                    seg = s2 + u
                    w0, w1 = kw[2 * u], kw[2 * u + 1]
                    if BITS == 4:
                        a = [nib_lo(w0), nib_lo(w1), nib_hi(w0), nib_hi(w1)]
                        for j in range(NT):
                            mma(s[j], a, qf[j, 2 * seg, 0], qf[j, 2 * seg, 1])
                        x0, x1 = u32(w0) >> 8, u32(w1) >> 8
                        a2 = [nib_lo(x0), nib_lo(x1), nib_hi(x0), nib_hi(x1)]
                        for j in range(NT):
                            mma(s[j], a2, qf[j, 2 * seg + 1, 0], qf[j, 2 * seg + 1, 1])
                    else:
                        a = [byte_pair(w0, 0x4140), byte_pair(w1, 0x4140), byte_pair(w0, 0x4342), byte_pair(w1, 0x4342)]
                        for j in range(NT):
                            mma(s[j], a, qf[j, seg, 0], qf[j, seg, 1])
            svm = max_rows(np.maximum(sv0, sv1))
            bits = svm.astype(np.float32).view(np.int32)
            ev_tile = np.minimum(14 - (((bits >> 23) & 0xFF) - 127), 64)
            assert (ev_tile == ev_tile[0]).all()
            ev_new = min(ev_run, int(ev_tile[0]))
            ev_shift = np.float32(ev_new - ev_run)
            ev_run = ev_new
            two_ev = np.float32(2.0 ** ev_new)
            svs0, svs1 = sv0 * two_ev, sv1 * two_ev
            ls0, ls1 = sk0 * logit_scale, sk1 * logit_scale
            pb = np.zeros((NT, 2, 32), np.uint32)
            aa = np.ones((NT, 2, 32), np.float32)
            changed = np.full(32, ev_shift != 0)
            for j in range(NT):
                with np.errstate(invalid="ignore"):
                    x0 = np.where(v0, (s[j, :, 0] - zk0 * qsum[j, 0]) * ls0, -np.inf).astype(np.float32)
                    x1 = np.where(v0, (s[j, :, 1] - zk0 * qsum[j, 1]) * ls0, -np.inf).astype(np.float32)
                    x2 = np.where(v1, (s[j, :, 2] - zk1 * qsum[j, 0]) * ls1, -np.inf).astype(np.float32)
                    x3 = np.where(v1, (s[j, :, 3] - zk1 * qsum[j, 1]) * ls1, -np.inf).astype(np.float32)
                mn0 = np.maximum(m_run[j, 0], max_rows(np.maximum(x0, x2)))
                mn1 = np.maximum(m_run[j, 1], max_rows(np.maximum(x1, x3)))
                ch0, ch1 = m_run[j, 0] != mn0, m_run[j, 1] != mn1
                changed = changed | ch0 | ch1
                al0 = np.where(ch0, ex2(m_run[j, 0] - mn0), 1.0).astype(np.float32)
                al1 = np.where(ch1, ex2(m_run[j, 1] - mn1), 1.0).astype(np.float32)
                aa[j, 0] = np.where(ch0 | (ev_shift != 0), ex2(m_run[j, 0] - mn0 + ev_shift), 1.0)
                aa[j, 1] = np.where(ch1 | (ev_shift != 0), ex2(m_run[j, 1] - mn1 + ev_shift), 1.0)
                aa0, aa1 = aa[j, 0], aa[j, 1]
                m_run[j, 0], m_run[j, 1] = mn0, mn1
                p0, p1, p2, p3 = ex2(x0 - mn0), ex2(x1 - mn1), ex2(x2 - mn0), ex2(x3 - mn1)
                l_run[j, 0] = l_run[j, 0] * al0 + (p0 + p2)
                l_run[j, 1] = l_run[j, 1] * al1 + (p1 + p3)
                w01 = u32_from_h2((p0 * svs0).astype(np.float16), (p1 * svs0).astype(np.float16))
                w23 = u32_from_h2((p2 * svs1).astype(np.float16), (p3 * svs1).astype(np.float16))
                f01l, f01h = [x.astype(np.float32) for x in h2_from_u32(w01)]
                f23l, f23h = [x.astype(np.float32) for x in h2_from_u32(w23)]
                corr[j, 0] = corr[j, 0] * aa0 + (f01l * zv0 + f23l * zv1)
                corr[j, 1] = corr[j, 1] * aa1 + (f01h * zv0 + f23h * zv1)
                pb[j, 0] = movmatrix(w01)
                pb[j, 1] = movmatrix(w23)
            if changed.any():
                for j in range(NT):
                    acc[j, :, :, 0] *= aa[j, 0]
                    acc[j, :, :, 1] *= aa[j, 1]
                    acc[j, :, :, 2] *= aa[j, 0]
                    acc[j, :, :, 3] *= aa[j, 1]
            for s2 in range(0, cfg.Segs, 2):
                addrs = cfg.TileBytes + ld_tok * RB + (((s2 + ld_seg) ^ ld_swz) << 4)
                vw = ldmatrix_x4(st, addrs, trans=True)
                for u in range(2):
                    seg = s2 + u
                    x0, x1 = vw[2 * u], vw[2 * u + 1]
                    if BITS == 4:
                        a = [nib_lo(x0), nib_hi(x0), nib_lo(x1), nib_hi(x1)]
                        for j in range(NT):
                            mma(acc[j, 2 * seg], a, pb[j, 0], pb[j, 1])
                        y0, y1 = u32(x0) >> 8, u32(x1) >> 8
                        a2 = [nib_lo(y0), nib_hi(y0), nib_lo(y1), nib_hi(y1)]
                        for j in range(NT):
                            mma(acc[j, 2 * seg + 1], a2, pb[j, 0], pb[j, 1])
                    else:
                        a = [byte_pair(x0, 0x4240), byte_pair(x0, 0x4341), byte_pair(x1, 0x4240), byte_pair(x1, 0x4341)]
                        for j in range(NT):
                            mma(acc[j, seg], a, pb[j, 0], pb[j, 1])
        # warp finalize
        for j in range(NT):
            for c in range(2):
                l_run[j, c] = sum_rows(l_run[j, c])
                corr[j, c] = sum_rows(corr[j, c])
        s_o = np.zeros((cfg.Heads, D), np.float32)
        s_ml = np.zeros((cfg.Heads, 2), np.float32)
        written = np.zeros((cfg.Heads, D), bool)
        inv = np.float32(2.0 ** -ev_run)
        for j in range(NT):
            for i in range(cfg.MTiles):
                for c in range(4):
                    for l in range(32):
                        head = 8 * j + 2 * T[l] + (c & 1)
                        ch = cfg.out_channel(i, R[l], c >> 1)
                        assert not written[head, ch]
                        written[head, ch] = True
                        s_o[head, ch] = (acc[j, i, l, c] - corr[j, c & 1, l]) * inv
            for l in range(32):
                if R[l] == 0:
                    for c in range(2):
                        s_ml[8 * j + 2 * T[l] + c] = (m_run[j, c, l], l_run[j, c, l])
        assert written.all()
        warps_out.append((s_o, s_ml))
    res = {}
    for head in range(nheads):
        mw = np.array([wo[1][head, 0] for wo in warps_out])
        m_all = mw.max()
        l_all = 0.0
        o = np.zeros(D, np.float32)
        for wi, wo in enumerate(warps_out):
            wt = 0.0 if mw[wi] == -np.inf else float(ex2(mw[wi] - m_all))
            l_all += wt * wo[1][head, 1]
            o += wt * wo[0][head]
        inv = 1.0 / l_all if l_all > 0 else 0.0
        res[qh0 + head] = (o * inv, m_all, l_all)
    return res


def run_decode(cfg_args, query, cache, block_table, seq_lens, H, scale, S, bf16):
    D = query.shape[2]
    B, Hq = query.shape[0], query.shape[1]
    group = Hq // H
    heads_per_cta = 16 if (group > 8 and D <= 128) else 8
    chunks = (group + heads_per_cta - 1) // heads_per_cta
    BITS = cfg_args
    cfg = Cfg(D, BITS, heads_per_cta // 8)
    per_token = H * (D * BITS // 8 + 4)
    bs = cache.shape[2] // per_token
    p = dict(H=H, bs=bs, group=group, seq_lens=seq_lens, max_blocks=block_table.shape[1], S=S, cache=cache,
             query=query, scale_log2=np.float32(scale * 1.4426950408889634), block_table=block_table)
    out = np.full((B, Hq, D), np.nan, np.float32)
    for b in range(B):
        for kvh in range(H):
            for chunk in range(chunks):
                parts = [run_cta(cfg, p, b, kvh, chunk, sp, bf16) for sp in range(S)]
                if S == 1:
                    if parts[0] is None:
                        nh = min(heads_per_cta, group - chunk * heads_per_cta)
                        out[b, kvh * group + chunk * heads_per_cta: kvh * group + chunk * heads_per_cta + nh] = 0
                    else:
                        for qh, (o, m, l) in parts[0].items():
                            out[b, qh] = o
                else:
                    nh = min(heads_per_cta, group - chunk * heads_per_cta)
                    for hh in range(nh):
                        qh = kvh * group + chunk * heads_per_cta + hh
                        live = [pp[qh] for pp in parts if pp is not None]
                        if not live:
                            out[b, qh] = 0
                            continue
                        M = max(x[1] for x in live)
                        wts = [0.0 if x[1] == -np.inf else float(ex2(x[1] - M)) * x[2] for x in live]
                        W = sum(wts)
                        out[b, qh] = sum(wt * x[0] for wt, x in zip(wts, live)) / W if W > 0 else 0
    return out


def main(seed=0, D=128, BITS=4, H=2, Hq=8, bs=16, seq_lens=(1, 37, 200), S=1, dtype=torch.float16, nb=64,
         v_scale=1.0):
    torch.manual_seed(seed)
    B = len(seq_lens)
    layout = ref.KVCacheLayout(H, D, bs, BITS)
    cache = layout.allocate(nb)
    max_blocks = max((s + bs - 1) // bs for s in seq_lens) + 1
    perm = torch.randperm(nb)
    bt = torch.zeros(B, max_blocks, dtype=torch.int32)
    c = 0
    for b, s in enumerate(seq_lens):
        nblk = (s + bs - 1) // bs
        bt[b, :nblk] = perm[c:c + nblk].int()
        c += nblk
    # write K/V for all positions
    for b, s in enumerate(seq_lens):
        if s == 0:
            continue
        k = (torch.randn(s, H, D) * 2 + torch.randn(s, H, 1)).to(dtype)
        v = (torch.randn(s, H, D) * v_scale).to(dtype)
        pos = torch.arange(s)
        slots = bt[b, pos // bs].long() * bs + pos % bs
        ref.write_kv_cache(k, v, cache, slots, layout)
    q = (torch.randn(B, Hq, D) * 3).to(dtype)
    scale = 1 / math.sqrt(D)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    out = run_decode(BITS, q.float().numpy(), cache.numpy(), bt.numpy(), sl.numpy(), H, scale, S,
                     dtype == torch.bfloat16)
    qsl = torch.arange(B + 1, dtype=torch.int32)
    r = ref.paged_attention(q, cache, bt, sl, qsl, layout, scale).numpy()
    for b, s in enumerate(seq_lens):
        if s == 0:
            r[b] = 0
    err = np.abs(out - r)
    # bound: 2^-10 * max_t |v|  per channel
    data, sc, zr = layout.views(cache)
    print(f"D={D} bits={BITS} H={H} Hq={Hq} bs={bs} S={S} {dtype}: max err {err.max():.3g}, max |ref| "
          f"{np.abs(r).max():.3g}, nan {np.isnan(out).sum()}")
    return err.max(), np.abs(r).max()


if __name__ == "__main__":
    main()
