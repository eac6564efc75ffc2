"""Plots the JSON written by bench_gemm.py: time per shape vs M for our GEMMs and the cuBLAS baselines, plus the
W4 weight-bytes floor (N*K/2 bytes at 3.35 TB/s, the H100 SXM spec bandwidth).

    python benchmarks/plot_gemm.py benchmarks/results/gemm_h100.json   # writes gemm_h100.png next to it
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HBM_BYTES_PER_S = 3.35e12
SERIES = ["w4a8_pc", "w4a8_g128", "w8a8", "bf16_mm", "fp8_scaled_mm", "int_mm"]


def main(path: str) -> None:
    rows = json.load(open(path))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["M"])
        ms = [r["M"] for r in rs]
        for s in SERIES:
            ax.plot(ms, [r[s] for r in rs], marker="o", ms=3, label=s, ls="-" if s.startswith("w") else "--")
        floor = rs[0]["N"] * rs[0]["K"] / 2 / HBM_BYTES_PER_S * 1e6
        ax.axhline(floor, color="k", lw=0.8, ls=":", label="W4 bytes floor")
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel="us (median)",
               title=f"{shape} N={rs[0]['N']} K={rs[0]['K']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1])
