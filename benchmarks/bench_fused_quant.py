"""Fused norm/activation + int8 quantization (torch.ops.qserve.{rms_norm_quant, add_rms_norm_quant,
silu_mul_quant}) against the unfused pair it replaces: vLLM's CUDA kernel (_C.rms_norm / _C.fused_add_rms_norm /
_C.silu_and_mul, what eager mode runs) or the Inductor-compiled native op (what compiled mode runs without our
pass), followed by torch.ops.qserve.quantize_per_token.

    python benchmarks/bench_fused_quant.py [--m 1,16,256,4096] [--k 4096,14336] [--dtype float16] [--ops ...]
                                          [--out-dir DIR]

silu_mul_quant at M >= 1024 also gets the columns fused_batch1 / fused_batch4: the same op with
QSERVE_FUSED_QUANT_GATED_BATCH = 1 (version 1's launch: one vector per thread, up to 1024 threads per row) or 4
(128-thread CTAs); the `fused` column is the default launch (batch 2, 256-thread CTAs).  `GB/s` = bytes read and
written by the fused op over its time.

Times are triton.testing.do_bench medians (CUDA events, L2 flushed before every call); K is the quantized width
(SiLU-and-mul reads 2K).  Writes DIR/bench_fused_quant.json and DIR/bench_fused_quant.png (DIR defaults to
$OUT or benchmarks/results).  Needs torch, triton, vLLM (for its kernels) and the built extension.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tqdm import tqdm
from triton.testing import do_bench

import vllm._custom_ops  # noqa: F401  (loads torch.ops._C: vLLM's rms_norm / fused_add_rms_norm / silu_and_mul)
from vllm_qserve import ops  # noqa: F401  (loads torch.ops.qserve.*)
from vllm_qserve.fusion.fused_ops import fused_ops_available

EPS = 1e-5
OPS = ("rms_norm_quant", "add_rms_norm_quant", "silu_mul_quant")
BATCHED_MIN_ROWS = 1024


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def native_rms_norm(x, w):
    """vLLM-IR's native rms_norm: what Inductor compiles for RMSNorm in vLLM's default (compiled) mode."""
    from vllm.ir.ops import rms_norm

    return rms_norm.impls["native"].impl_fn(x, w, EPS)


def native_add_rms_norm(x, r, w):
    from vllm.ir.ops import fused_add_rms_norm

    return fused_add_rms_norm.impls["native"].impl_fn(x, r, w, EPS)


def cases(kind: str, m: int, k: int, dtype: torch.dtype, with_sum: bool) -> dict:
    dev = "cuda"
    quant = torch.ops.qserve.quantize_per_token
    w = (1 + 0.1 * torch.randn(k, device=dev)).to(dtype)
    if kind == "rms_norm_quant":
        x = torch.randn(m, k, device=dev, dtype=dtype)
        out = torch.empty_like(x)

        def vllm_c():
            torch.ops._C.rms_norm(out, x, w, EPS)
            return quant(out, with_sum)

        compiled = torch.compile(lambda a, b: quant(native_rms_norm(a, b), with_sum), dynamic=True)
        return {"fused": lambda: torch.ops.qserve.rms_norm_quant(x, w, EPS, with_sum),
                "unfused_vllm_c": vllm_c, "unfused_inductor": lambda: compiled(x, w)}
    if kind == "add_rms_norm_quant":
        x = torch.randn(m, k, device=dev, dtype=dtype)
        r = torch.randn(m, k, device=dev, dtype=dtype)
        xs, rs = x.clone(), r.clone()

        def vllm_c():  # in place on (xs, rs), as vLLM's kernel works
            torch.ops._C.fused_add_rms_norm(xs, rs, w, EPS)
            return quant(xs, with_sum)

        def inductor_fn(a, b, c):
            y, res = native_add_rms_norm(a, b, c)
            return (*quant(y, with_sum), res)

        compiled = torch.compile(inductor_fn, dynamic=True)
        return {"fused": lambda: torch.ops.qserve.add_rms_norm_quant(x, r, w, EPS, with_sum),
                "unfused_vllm_c": vllm_c, "unfused_inductor": lambda: compiled(x, r, w)}
    x = torch.randn(m, 2 * k, device=dev, dtype=dtype)
    out = torch.empty(m, k, device=dev, dtype=dtype)

    def vllm_c():
        torch.ops._C.silu_and_mul(out, x)
        return quant(out, with_sum)

    compiled = torch.compile(
        lambda a: quant(torch.nn.functional.silu(a[:, :k]) * a[:, k:], with_sum), dynamic=True)
    fused = {"fused": lambda: torch.ops.qserve.silu_mul_quant(x, with_sum)}
    if m >= BATCHED_MIN_ROWS:  # the batch switch changes the launch only there (csrc: kBatchedMinRows)
        fused.update({f"fused_batch{b}": lambda: torch.ops.qserve.silu_mul_quant(x, with_sum) for b in (1, 4)})
    return {**fused, "unfused_vllm_c": vllm_c, "unfused_inductor": lambda: compiled(x)}


def fused_bytes(kind: str, m: int, k: int, dtype: torch.dtype) -> int:
    """Bytes the fused op must move: its inputs once, int8 out, fp32 scale and sum (and the new residual)."""
    e = torch.finfo(dtype).bits // 8
    reads = {"rms_norm_quant": m * k * e, "add_rms_norm_quant": 2 * m * k * e, "silu_mul_quant": 2 * m * k * e}[kind]
    writes = m * k + 8 * m + (m * k * e if kind == "add_rms_norm_quant" else 0)
    return reads + writes


def plot(results, path, ks):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    ops = [o for o in OPS if any(r["op"] == o for r in results)]  # --ops may have measured a subset
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, kind in zip(axes[0], ops):
        for k, style in zip(ks, ("-", "--", ":", "-.")):
            rows = [r for r in results if r["op"] == kind and r["K"] == k]
            ms = [r["M"] for r in rows]
            for col, color in (("fused", "C0"), ("fused_batch1", "C3"), ("unfused_vllm_c", "C1"),
                               ("unfused_inductor", "C2")):
                pts = [(m, r.get(col)) for m, r in zip(ms, rows) if r.get(col) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", label=f"{col} K={k}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("us (median, cold L2)")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot-only", metavar="JSON", help="re-plot a results file of this script (no GPU needed)")
    ap.add_argument("--m", default="1,16,256,4096")
    ap.add_argument("--k", default="4096,14336")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--no-sum", action="store_true", help="sum_mode 0 (group-128 / W8A8 layers)")
    ap.add_argument("--sum-mode", type=int, default=None, choices=(0, 1, 2),
                    help="0 no sum, 1 sum of the input (QServe's, the default), 2 sum of the quantized input "
                         "(activation_sum 'quantized'); --no-sum = 0")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.plot_only:
        with open(args.plot_only) as fh:
            results = json.load(fh)["results"]
        plot(results, os.path.splitext(args.plot_only)[0] + ".png", sorted({r["K"] for r in results}))
        return
    assert torch.cuda.is_available() and fused_ops_available(), "needs a GPU and the extension with the fused ops"
    ms = [int(v) for v in args.m.split(",")]
    ks = [int(v) for v in args.k.split(",")]
    dtype = getattr(torch, args.dtype)
    with_sum = 0 if args.no_sum else (1 if args.sum_mode is None else args.sum_mode)  # the ops' sum_mode
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  {args.dtype}  sum_mode={with_sum}")
    results = []
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {unknown}; choose from {OPS}")
    grid = [(kind, k, m) for kind in ops for k in ks for m in ms]
    for kind, k, m in tqdm(grid, desc="bench_fused_quant"):
        row = {"op": kind, "K": k, "M": m, "dtype": args.dtype, "with_sum": with_sum}
        for col, fn in cases(kind, m, k, dtype, with_sum).items():
            if col.startswith("fused_batch"):  # read by the op at every call
                os.environ["QSERVE_FUSED_QUANT_GATED_BATCH"] = col[len("fused_batch"):]
            try:
                row[col] = bench(fn)
            except Exception as e:  # noqa: BLE001  (a failing baseline must not stop the table)
                row[col] = None
                row[col + "_error"] = str(e).splitlines()[0][:200]
            finally:
                os.environ.pop("QSERVE_FUSED_QUANT_GATED_BATCH", None)
        row["fused_gbps"] = fused_bytes(kind, m, k, dtype) / (row["fused"] * 1e-6) / 1e9 if row["fused"] else None
        results.append(row)
    print(f"\n{'op':<20}{'K':>7}{'M':>6}{'fused us':>10}{'GB/s':>7}{'batch1 us':>10}{'batch4 us':>10}"
          f"{'vllm_c+q us':>12}{'inductor+q us':>14}{'speedup':>9}")
    for r in results:
        base = min(v for v in (r["unfused_vllm_c"], r["unfused_inductor"]) if v is not None)
        f = r["fused"]
        b1, b4 = r.get("fused_batch1") or float("nan"), r.get("fused_batch4") or float("nan")
        print(f"{r['op']:<20}{r['K']:>7}{r['M']:>6}{f:>10.2f}{r['fused_gbps']:>7.0f}{b1:>10.2f}{b4:>10.2f}"
              f"{r['unfused_vllm_c'] or float('nan'):>12.2f}{r['unfused_inductor'] or float('nan'):>14.2f}"
              f"{base / f:>8.2f}x")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "bench_fused_quant.json" if with_sum == 1 else f"bench_fused_quant_sum{with_sum}.json")
    with open(path, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, fh,
                  indent=1)
    print(f"wrote {path}")
    plot(results, os.path.splitext(path)[0] + ".png", ks)


if __name__ == "__main__":
    main()
