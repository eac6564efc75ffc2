"""Decode attention time per layer: our KV4 / KV8 paged kernels against vLLM 0.26's own decode paths, all in one run.

    python benchmarks/bench_attention.py [--quick] [--batch 1,16,64,256] [--ctx 512,2048,8192] [--block-size 16]
                                          [--max-model-len 8192] [--no-sweep] [--out DIR]

Llama-3-8B attention heads (32 query / 8 KV heads, head_dim 128), one query token per sequence, every sequence
`ctx` tokens long, blocks scattered at random over the cache.  Methods (each baseline is skipped with a message
when its import or launch fails):

  qserve_kv4 / qserve_kv8   torch.ops.qserve.kv_paged_decode (this repo), cache uint8 [blocks, 2, page]
  fa_bf16                   vLLM's FlashAttention (FA3 on sm90, else FA2), BF16 KV, vLLM 0.26's cache layout
                            (K and V packed in the content dim), scheduler metadata prepared outside the timing
                            (vLLM builds it once per step for all layers)
  fa_fp8                    the same with an FP8 (e4m3) KV cache, FP8 query, unit descales (FA3 only)
  triton_int4               vLLM's `int4_per_token_head` path: unified_attention_int4 = Hadamard rotation of q,
                            the Triton kernel (3D split for small batches, as TRITON_ATTN configures it), the
                            inverse rotation of the output
  triton_int4_kernel        only the Triton kernel of that path (q pre-rotated)
  triton_int8               vLLM's `int8_per_token_head` Triton path (unified_attention)

Times are triton.testing.do_bench medians (CUDA events; L2 flushed before every call, so the KV cache comes from
DRAM as in a real decode step through 32 layers).  Bytes are the KV bytes each method must read plus q/out; the
floor is bytes / 3.35 TB/s (H100 SXM spec) and bytes / the measured device-to-device copy rate.  The split count
of our kernel is the automatic one; `--no-sweep` skips the per-config sweep of explicit split counts.

Writes a JSON file and a PNG plot (when matplotlib is importable) to --out (default $OUT, else
benchmarks/results), and prints a markdown table.  Needs torch + triton + this package's CUDA extension; vLLM only
for the baselines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vllm_qserve import attention_ops  # noqa: E402
from vllm_qserve.reference import kv as ref  # noqa: E402

HQ, HKV, D = 32, 8, 128
SPEC_BW = 3.35e12
QUICK = [(1, 2048), (16, 2048), (64, 2048), (256, 2048), (64, 8192), (16, 8192)]
SWEEP_SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def bench_us(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_rate() -> float:
    """Device-to-device copy rate (bytes read + written per second) on a 1 GiB buffer."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = bench_us(lambda: y.copy_(x))
    del x, y
    return 2 * (1 << 30) / (t * 1e-6)


class Config:
    def __init__(self, batch, ctx, block_size, max_model_len, seed=0):
        self.batch, self.ctx, self.bs = batch, ctx, block_size
        self.width = (max(ctx, max_model_len) + block_size - 1) // block_size  # vLLM's block_table width
        self.nblk_seq = (ctx + block_size - 1) // block_size
        self.num_blocks = batch * self.nblk_seq
        g = torch.Generator(device="cuda").manual_seed(seed)
        perm = torch.randperm(self.num_blocks, device="cuda", generator=g).int()
        self.block_table = torch.zeros(batch, self.width, dtype=torch.int32, device="cuda")
        self.block_table[:, :self.nblk_seq] = perm.view(batch, self.nblk_seq)
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        self.query = torch.randn(batch, HQ, D, device="cuda", generator=g).bfloat16()
        self.scale = 1.0 / math.sqrt(D)
        self.g = g


# ------------------------------------------------------------------------------------------------ our kernels
def make_qserve_cache(cfg: Config, bits: int) -> torch.Tensor:
    """Random codes with sane per-token scales (0.01..0.1) and zeros (0..L): valid numbers, DRAM-sized."""
    layout = ref.KVCacheLayout(HKV, D, cfg.bs, bits)
    cache = torch.randint(0, 256, (cfg.num_blocks, 2, layout.page_bytes), dtype=torch.uint8, device="cuda",
                          generator=cfg.g)
    _, s, z = layout.views(cache)
    s.copy_((torch.rand(s.shape, device="cuda", generator=cfg.g) * 0.09 + 0.01).half())
    z.copy_((torch.rand(z.shape, device="cuda", generator=cfg.g) * ((1 << bits) - 1)).half())
    return cache


def run_qserve(cfg: Config, bits: int, results: dict, sweep: bool):
    cache = make_qserve_cache(cfg, bits)
    out = torch.empty_like(cfg.query)
    name = f"qserve_kv{bits}"

    def fn():
        torch.ops.qserve.kv_paged_decode(out, cfg.query, cache, cfg.block_table, cfg.seq_lens, cfg.scale, HKV, bits)

    results[name] = bench_us(fn)
    results[name + "_splits"] = torch.ops.qserve.kv_decode_num_splits(cfg.query, cache, cfg.block_table, HKV, bits)
    # correctness spot check on the first two sequences against the reference
    fn()
    nb = min(cfg.batch, 2)
    layout = ref.KVCacheLayout(HKV, D, cfg.bs, bits)
    expect = ref.paged_attention(cfg.query[:nb], cache, cfg.block_table[:nb], cfg.seq_lens[:nb],
                                 cfg.cu_q[:nb + 1], layout, cfg.scale)
    err = (out[:nb].float() - expect).abs().max().item()
    results[name + "_max_abs_err_vs_reference"] = err
    if not err <= 2e-2 * max(expect.abs().max().item(), 1e-3):
        print(f"  WARNING: {name} differs from the reference by {err:.3g}", flush=True)
    if sweep:
        sw = {}
        for s in SWEEP_SPLITS:
            if s > 1 and s * 128 > cfg.width * cfg.bs:
                continue
            sw[s] = bench_us(lambda s=s: torch.ops.qserve.kv_paged_decode_splits(
                out, cfg.query, cache, cfg.block_table, cfg.seq_lens, cfg.scale, HKV, bits, s))
        results[name + "_sweep"] = sw
    del cache


# ------------------------------------------------------------------------------------------------ baselines
def run_flash(cfg: Config, results: dict, fp8: bool):
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata, is_fa_version_supported

    fa = 3 if is_fa_version_supported(3) else 2
    name = "fa_fp8" if fp8 else "fa_bf16"
    if fp8 and fa != 3:
        raise RuntimeError("FP8 KV needs FlashAttention 3")
    # vLLM 0.26 layout: [blocks, block_size, H, 2*D] (NHD), K = [..., :D], V = [..., D:]
    kv = torch.randn(cfg.num_blocks, cfg.bs, HKV, 2 * D, device="cuda", generator=cfg.g, dtype=torch.bfloat16)
    q = cfg.query
    descale = {}
    if fp8:
        kv = kv.to(torch.float8_e4m3fn)
        q = q.to(torch.float8_e4m3fn)
        ones = torch.ones(cfg.batch, HKV, dtype=torch.float32, device="cuda")
        descale = dict(q_descale=ones, k_descale=ones, v_descale=ones)
    k, v = kv[..., :D], kv[..., D:]
    out = torch.empty(cfg.batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    sched = None
    if fa == 3:
        sched = get_scheduler_metadata(batch_size=cfg.batch, max_seqlen_q=1, max_seqlen_k=cfg.ctx, num_heads_q=HQ,
                                       num_heads_kv=HKV, headdim=D, cache_seqlens=cfg.seq_lens,
                                       qkv_dtype=kv.dtype, cu_seqlens_q=cfg.cu_q, page_size=cfg.bs, causal=True)

    def fn():
        flash_attn_varlen_func(q=q, k=k, v=v, out=out, cu_seqlens_q=cfg.cu_q, max_seqlen_q=1, seqused_k=cfg.seq_lens,
                               max_seqlen_k=cfg.ctx, softmax_scale=cfg.scale, causal=True, block_table=cfg.block_table,
                               scheduler_metadata=sched, fa_version=fa, **descale)

    results[name] = bench_us(fn)
    results[name + "_version"] = fa
    del kv, k, v


def _triton_pth_cache(cfg: Config, data_bytes: int):
    """TRITON_ATTN per-token-head layout: [blocks, block_size, H, 2 * (data + 4)] bytes (NHD), each half =
    data then one fp32 scale; returns (key_cache, value_cache, k_scale, v_scale) views like _ensure_scale_caches."""
    padded = data_bytes + 4
    raw = torch.randint(0, 256, (cfg.num_blocks, cfg.bs, HKV, 2 * padded), dtype=torch.uint8, device="cuda",
                        generator=cfg.g)
    f32 = raw.view(torch.float32)  # [..., 2 * padded / 4]
    k_scale = f32[..., data_bytes // 4]
    v_scale = f32[..., (padded + data_bytes) // 4]
    return raw, raw[..., :padded], raw[..., padded:], k_scale, v_scale


def _segm_buffers(cfg: Config):
    thr = 128 // HKV  # TRITON_ATTN: MIN_LAUNCH_GRID_SIZE_2D // num_kv_heads
    seg = 16          # NUM_PAR_SOFTMAX_SEGMENTS
    return dict(seq_threshold_3D=thr, num_par_softmax_segments=seg,
                softmax_segm_output=torch.empty(thr, HQ, seg, D, dtype=torch.float32, device="cuda"),
                softmax_segm_max=torch.empty(thr, HQ, seg, dtype=torch.float32, device="cuda"),
                softmax_segm_expsum=torch.empty(thr, HQ, seg, dtype=torch.float32, device="cuda"))


def run_triton_int4(cfg: Config, results: dict):
    from vllm.v1.attention.ops import int4_per_token_head as m

    raw, kc, vc, ks, vs = _triton_pth_cache(cfg, D // 2)
    # scales: positive floats whose 4 low mantissa bits carry the zero point (the int4 format's steganography)
    for s in (ks, vs):
        val = (torch.rand(s.shape, device="cuda", generator=cfg.g) * 0.1 + 0.01).view(torch.int32)
        zp = torch.randint(0, 16, s.shape, device="cuda", generator=cfg.g, dtype=torch.int32)
        s.copy_(((val & -16) | zp).view(torch.float32))
    out = torch.empty(cfg.batch, HQ, D, dtype=torch.bfloat16, device="cuda")
    common = dict(cu_seqlens_q=cfg.cu_q, max_seqlen_q=1, seqused_k=cfg.seq_lens, softmax_scale=cfg.scale,
                  window_size=(-1, -1), block_table=cfg.block_table, softcap=0.0, sinks=None, alibi_slopes=None,
                  use_alibi_sqrt=False, qq_bias=None, output_scale=None, mm_prefix_range=None, k_scale_cache=ks,
                  v_scale_cache=vs, **_segm_buffers(cfg))

    def full():
        m.unified_attention_int4(q=cfg.query, k_cache=kc, v_cache=vc, out=out, max_seqlen_k=cfg.ctx, **common)

    results["triton_int4"] = bench_us(full)
    q_rot = m.single_rht(cfg.query.float()).to(cfg.query.dtype)
    kernel_args = dict(common)
    kernel_args["softmax_scale"] = cfg.scale / D

    def kernel():
        m._launch_packed_attn(q=q_rot, k_cache=kc, v_cache=vc, out=out, packing_factor=2, **kernel_args)

    results["triton_int4_kernel"] = bench_us(kernel)
    del raw, kc, vc


def run_triton_int8(cfg: Config, results: dict):
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    raw, kc, vc, ks, vs = _triton_pth_cache(cfg, D)
    ks.copy_(torch.rand(ks.shape, device="cuda", generator=cfg.g) * 0.01 + 1e-3)
    vs.copy_(torch.rand(vs.shape, device="cuda", generator=cfg.g) * 0.01 + 1e-3)
    kc, vc = kc.view(torch.int8), vc.view(torch.int8)
    out = torch.empty(cfg.batch, HQ, D, dtype=torch.bfloat16, device="cuda")

    def fn():
        unified_attention(q=cfg.query, k=kc, v=vc, out=out, cu_seqlens_q=cfg.cu_q, max_seqlen_q=1,
                          seqused_k=cfg.seq_lens, max_seqlen_k=cfg.ctx, softmax_scale=cfg.scale, causal=True,
                          window_size=(-1, -1), block_table=cfg.block_table, softcap=0.0, q_descale=None,
                          k_descale=None, v_descale=None, kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD,
                          k_scale_cache=ks, v_scale_cache=vs, **_segm_buffers(cfg))

    results["triton_int8"] = bench_us(fn)
    del raw, kc, vc


# ------------------------------------------------------------------------------------------------ bytes, report
def kv_bytes(method: str, batch: int, ctx: int) -> int:
    per_token_head = {  # K + V bytes per token and KV head
        "qserve_kv4": 2 * (D // 2 + 4), "qserve_kv8": 2 * (D + 4), "fa_bf16": 2 * 2 * D, "fa_fp8": 2 * D,
        "triton_int4": 2 * (D // 2 + 4), "triton_int4_kernel": 2 * (D // 2 + 4), "triton_int8": 2 * (D + 4),
    }[method]
    q_out = batch * HQ * D * 2 * 2
    return batch * ctx * HKV * per_token_head + q_out


METHODS = ["qserve_kv4", "qserve_kv8", "fa_bf16", "fa_fp8", "triton_int4", "triton_int4_kernel", "triton_int8"]


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    ctxs = sorted({r["ctx"] for r in rows})
    fig, axes = plt.subplots(1, len(ctxs), figsize=(5 * len(ctxs), 4), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        rs = sorted((r for r in rows if r["ctx"] == ctx), key=lambda r: r["batch"])
        for m in METHODS:
            pts = [(r["batch"], r[m]) for r in rs if r.get(m) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        fl = [(r["batch"], r["floor_kv4_us"]) for r in rs]
        ax.plot(*zip(*fl), "k--", label="KV4 floor @3.35 TB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("us per layer")
        ax.set_title(f"decode attention, ctx {ctx} (32q/8kv, D=128)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    ap.add_argument("--batch", default="1,16,64,256")
    ap.add_argument("--ctx", default="512,2048,8192")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=8192, help="block_table width = this / block_size")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sweep of explicit split counts")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if not attention_ops.HAS_KV_OPS:
        sys.exit("vllm_qserve._C with the KV ops is not built (pip install --no-build-isolation -e .)")
    torch.backends.cuda.matmul.allow_tf32 = False
    configs = QUICK if args.quick else [(b, c) for c in map(int, args.ctx.split(","))
                                        for b in map(int, args.batch.split(","))]
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}  torch {torch.__version__}  block_size {args.block_size}  "
          f"max_model_len {args.max_model_len}", flush=True)
    rate = copy_rate()
    print(f"measured device copy rate: {rate / 1e12:.2f} TB/s (read + write); spec {SPEC_BW / 1e12:.2f} TB/s",
          flush=True)
    skipped = {}
    rows = []
    try:
        from tqdm import tqdm
        it = tqdm(configs, desc="configs")
    except ImportError:
        it = configs
    for batch, ctx in it:
        cfg = Config(batch, ctx, args.block_size, args.max_model_len)
        res = {"batch": batch, "ctx": ctx}
        runners = [("qserve_kv4", lambda: run_qserve(cfg, 4, res, not args.no_sweep)),
                   ("qserve_kv8", lambda: run_qserve(cfg, 8, res, not args.no_sweep)),
                   ("fa_bf16", lambda: run_flash(cfg, res, fp8=False)),
                   ("fa_fp8", lambda: run_flash(cfg, res, fp8=True)),
                   ("triton_int4", lambda: run_triton_int4(cfg, res)),
                   ("triton_int8", lambda: run_triton_int8(cfg, res))]
        for name, run in runners:
            try:
                run()
            except Exception as e:  # noqa: BLE001  (a missing baseline must not stop the table)
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if name not in skipped:
                    print(f"\n  skipping {name}: {msg}", flush=True)
                skipped[name] = msg
            torch.cuda.empty_cache()
        for m in METHODS:
            res.setdefault(m, None)
            if res[m] is not None:
                res[m + "_bytes"] = kv_bytes(m, batch, ctx)
                res[m + "_TBps"] = kv_bytes(m, batch, ctx) / (res[m] * 1e-6) / 1e12
        res["floor_kv4_us"] = kv_bytes("qserve_kv4", batch, ctx) / SPEC_BW * 1e6
        res["floor_kv4_copy_rate_us"] = kv_bytes("qserve_kv4", batch, ctx) / (rate / 2) * 1e6
        res["floor_kv8_us"] = kv_bytes("qserve_kv8", batch, ctx) / SPEC_BW * 1e6
        res["floor_bf16_us"] = kv_bytes("fa_bf16", batch, ctx) / SPEC_BW * 1e6
        rows.append(res)
        del cfg
        torch.cuda.empty_cache()

    def f(v, fmt="{:.1f}"):
        return "n/a" if v is None else fmt.format(v)

    print("\n## Decode attention per layer (us, median), Llama-3-8B heads, block_size", args.block_size)
    print("| batch | ctx | KV4 | KV4 TB/s | KV4 floor (spec/copy) | splits | KV8 | FA bf16 | FA fp8 | triton int4 "
          "(kernel) | triton int8 | KV4 vs FA bf16 | KV4 vs triton int4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kv4 = r["qserve_kv4"]
        sp_fa = f(r["fa_bf16"] / kv4 if kv4 and r["fa_bf16"] else None, "{:.2f}x")
        sp_tr = f(r["triton_int4"] / kv4 if kv4 and r["triton_int4"] else None, "{:.2f}x")
        print(f"| {r['batch']} | {r['ctx']} | {f(kv4)} | {f(r.get('qserve_kv4_TBps'), '{:.2f}')} | "
              f"{r['floor_kv4_us']:.1f}/{r['floor_kv4_copy_rate_us']:.1f} | {r.get('qserve_kv4_splits', 'n/a')} | "
              f"{f(r['qserve_kv8'])} | {f(r['fa_bf16'])} | {f(r['fa_fp8'])} | {f(r['triton_int4'])} "
              f"({f(r['triton_int4_kernel'])}) | {f(r['triton_int8'])} | {sp_fa} | {sp_tr} |")
    if not args.no_sweep:
        print("\n## Split-count sweep (us): automatic choice in brackets")
        for r in rows:
            for bits in (4, 8):
                sw = r.get(f"qserve_kv{bits}_sweep")
                if sw:
                    auto = r.get(f"qserve_kv{bits}_splits")
                    best = min(sw, key=sw.get)
                    cells = " ".join(f"{s}:{t:.1f}" for s, t in sw.items())
                    print(f"KV{bits} B={r['batch']} ctx={r['ctx']} [auto {auto}] best {best} ({sw[best]:.1f}) | {cells}")
    for name, msg in skipped.items():
        print(f"skipped {name}: {msg}")

    os.makedirs(args.out, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", dev).strip("_").lower()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"bench_attention_{tag}_{stamp}")
    meta = {"device": dev, "torch": torch.__version__, "block_size": args.block_size,
            "max_model_len": args.max_model_len, "copy_rate_Bps": rate, "spec_Bps": SPEC_BW,
            "heads": {"q": HQ, "kv": HKV, "head_dim": D}, "skipped": skipped, "rows": rows}
    with open(base + ".json", "w") as fh:
        json.dump(meta, fh, indent=1)
    print(f"\nwrote {base}.json")
    png = plot(rows, base + ".png")
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
