"""Times the Hopper wgmma W4A8 GEMM against our mma.sync kernels and cuBLAS (bf16 torch.mm, fp8 torch._scaled_mm
with row-wise scales, int8 torch._int_mm) on the Llama-3-8B projection shapes, in one run.

    python benchmarks/bench_gemm_sm90.py [--m 1,16,...] [--shapes qkv,o,gate_up,down] [--json out.json]

Times are triton.testing.do_bench medians (CUDA events, L2 flushed before every call).  Only the GEMM is timed
(pre-quantized int8 activations).  The wgmma columns force the wgmma kernel at every M (wgmma_min_m=0) so that
the crossover with mma.sync can be read off the table.  _scaled_mm needs M % 16 == 0 and _int_mm M > 16: their
inputs are padded (marked *).  Writes the JSON (and a PNG of TOP/s vs M, if matplotlib is there) under $OUT or
benchmarks/results/.  Needs torch and triton only (no vLLM).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tqdm import tqdm
from triton.testing import do_bench

from vllm_qserve import ops  # noqa: F401  (loads torch.ops.qserve.*)
from vllm_qserve.packing import pack_w4, permute_s2

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEFAULT_M = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096]
COLS = ["mma_pc", "wgmma_pc", "wgmma_pc_v2", "mma_g128", "wgmma_g128", "wgmma_g128_v2", "bf16_mm", "fp8_scaled_mm",
        "int_mm"]
# _v2 columns: the warp-specialized kernel without the cluster K split (QSERVE_WGMMA_IMPL=v2, read by the op at
# every call), only where it can differ from the default (M > 128, where the default may split K across a cluster);
# `--forced v2,v2-serial,v3` adds a column per kernel named (v2-serial: v2 without k-step pipelining).
# Earlier runs of docs/kernels/gemm_sm90.md had _v1 columns (the cp.async kernel) and _ws columns (v2 when the
# default still used v1 tiles up to 512); `--forced v1` brings the _v1 columns back.


def bench(fn) -> float:
    return do_bench(fn, warmup=20, rep=60, return_mode="median") * 1e3  # us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default=",".join(map(str, DEFAULT_M)))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--forced", default="v2",
                    help="comma list of kernels forced in extra columns (v1, v2, v2-serial, v2-1wg, v3, split2, split4): wgmma_pc_<kernel>")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    ap.add_argument("--json", default=os.path.join(out_dir, "bench_gemm_sm90.json"))
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    forced = list(dict.fromkeys(args.forced.split(","))) if args.forced else []  # each kernel once
    bad = [f for f in forced if f not in ("v1", "v2", "v2-serial", "v2-1wg", "v3", "split2", "split4")]
    if bad:
        ap.error(f"--forced: unknown kernel(s) {bad}; choose from v1, v2, v2-serial, v2-1wg, v3, split2, split4")
    cols = []
    for c in COLS:
        cols += [c.replace("_v2", "_" + f) for f in forced] if c.endswith("_v2") else [c]
    dev = "cuda"
    torch.manual_seed(0)
    results = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    qt = torch.ops.qserve
    lines = []
    for sname in args.shapes.split(","):
        n, k = SHAPES[sname]
        qweight = pack_w4(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev))
        s1 = (torch.rand(n, device=dev) * 0.01 + 1e-3).half()
        sz = (torch.randn(n, device=dev) * 0.01).half()
        s2 = permute_s2(torch.randint(1, 17, (k // 128, n), dtype=torch.int8, device=dev)).contiguous()
        z2 = permute_s2(torch.randint(-100, 100, (k // 128, n), dtype=torch.int8, device=dev)).contiguous()
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
        wbf = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        wf8 = wbf.to(torch.float8_e4m3fn)
        sb = torch.rand(1, n, device=dev) + 0.5
        lines.append(f"\n== {sname}: N={n} K={k}   us (median, cold L2); [TOP/s]")
        lines.append(f"{'M':>6} " + " ".join(f"{c:>16}" for c in cols))
        for m in tqdm(ms, desc=sname):
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
            sx = torch.rand(m, device=dev) * 0.01
            xs = torch.randn(m, device=dev)
            xbf = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            mp16 = (m + 15) // 16 * 16
            xf8 = torch.randn(mp16, k, device=dev).to(torch.float8_e4m3fn)
            sa = torch.rand(mp16, 1, device=dev) + 0.5
            mi = max(mp16, 32)
            xi = torch.randint(-127, 128, (mi, k), dtype=torch.int8, device=dev)
            bf = torch.bfloat16
            fns = {
                "mma_pc": lambda: qt.w4a8_gemm_per_channel(xq, sx, xs, qweight, s1, sz, None, bf),
                "wgmma_pc": lambda: qt.w4a8_gemm_per_channel_sm90(xq, sx, xs, qweight, s1, sz, None, bf, 0),
                "mma_g128": lambda: qt.w4a8_gemm_per_group(xq, sx, qweight, s1, s2, z2, None, bf),
                "wgmma_g128": lambda: qt.w4a8_gemm_per_group_sm90(xq, sx, qweight, s1, s2, z2, None, bf, 0),
                "bf16_mm": lambda: torch.mm(xbf, wbf.t()),
                "fp8_scaled_mm": lambda: torch._scaled_mm(xf8, wf8.t(), scale_a=sa, scale_b=sb, out_dtype=bf),
                "int_mm": lambda: torch._int_mm(xi, w8.t()),
            }
            for f in forced:  # the same ops; the kernel is picked by QSERVE_WGMMA_IMPL below
                fns[f"wgmma_pc_{f}"] = fns["wgmma_pc"]
                fns[f"wgmma_g128_{f}"] = fns["wgmma_g128"]
            row = {"shape": sname, "N": n, "K": k, "M": m}
            for c in cols:
                f = next((f for f in forced if c.endswith("_" + f)), None)
                if f is not None:
                    if m <= 128:
                        row[c] = None
                        continue
                    os.environ["QSERVE_WGMMA_IMPL"] = f
                else:
                    os.environ.pop("QSERVE_WGMMA_IMPL", None)
                try:
                    row[c] = bench(fns[c])
                except Exception as e:  # noqa: BLE001  (an unsupported column must not stop the table)
                    row[c] = None
                    row[c + "_error"] = str(e).splitlines()[0][:200]
            os.environ.pop("QSERVE_WGMMA_IMPL", None)
            results.append(row)
            cells = []
            for c in cols:
                t = row[c]
                if t is None:
                    cells.append(f"{'n/a':>16}")
                    continue
                pad = "*" if (c == "fp8_scaled_mm" and mp16 != m) or (c == "int_mm" and mi != m) else " "
                cells.append(f"{t:8.1f}{pad}[{2 * m * n * k / t / 1e6:5.0f}]")
            if row.get("mma_pc") and row.get("wgmma_pc") and row.get("fp8_scaled_mm"):
                cells.append(f"  wgmma/fp8 {row['fp8_scaled_mm'] / row['wgmma_pc']:.2f}x")
            lines.append(f"{m:>6} " + " ".join(cells))
    print("\n".join(lines), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, sname in zip(axes[0], shapes):
        rows = [r for r in results if r["shape"] == sname]
        for c in cols:
            pts = [(r["M"], 2 * r["M"] * r["N"] * r["K"] / r[c] / 1e6) for r in rows if r.get(c)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c, linestyle="-" if "wgmma" in c else "--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("TOP/s")
        ax.set_title(f"{sname} N={rows[0]['N']} K={rows[0]['K']}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png = os.path.splitext(args.json)[0] + ".png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
