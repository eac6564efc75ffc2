"""Times the qserve int8 GEMMs against torch.mm (bf16), torch._scaled_mm (fp8 e4m3, row-wise scales) and
torch._int_mm (int8 -> int32) on the Llama-3-8B projection shapes.

    python benchmarks/bench_gemm.py [--m 1,16,...] [--json out.json]

Times are triton.testing.do_bench medians (CUDA events, L2 flushed before every call, so weights come from DRAM:
the cold-cache case, like a decode step through many layers).  Only the GEMM is timed; our ops get pre-quantized
int8 activations.  _scaled_mm needs M % 16 == 0 and _int_mm needs M > 16, so their inputs are padded (marked *).
Needs torch and triton only (no vLLM).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from triton.testing import do_bench

from vllm_qserve import ops  # noqa: F401  (loads torch.ops.qserve.*)
from vllm_qserve.packing import pack_w4, permute_s2

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DEFAULT_M = [1, 16, 32, 64, 128, 256, 512, 1024, 4096]


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default=",".join(map(str, DEFAULT_M)))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_gemm.json"))
    args = ap.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    dev = "cuda"
    torch.manual_seed(0)
    results = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    cols = ["w4a8_pc", "w4a8_g128", "w8a8", "bf16_mm", "fp8_scaled_mm", "int_mm"]
    for sname in args.shapes.split(","):
        n, k = SHAPES[sname]
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
        qweight = pack_w4(q)
        del q
        s1 = (torch.rand(n, device=dev) * 0.01 + 1e-3).half()
        sz = (torch.randn(n, device=dev) * 0.01).half()
        s2 = permute_s2(torch.randint(1, 17, (k // 128, n), dtype=torch.int8, device=dev)).contiguous()
        z2 = permute_s2(torch.randint(-100, 100, (k // 128, n), dtype=torch.int8, device=dev)).contiguous()
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
        wbf = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        wf8 = wbf.to(torch.float8_e4m3fn)
        sb = torch.rand(1, n, device=dev) + 0.5
        print(f"\n== {sname}: N={n} K={k}   times in us (median, cold L2); TOP/s of ours in brackets")
        print(f"{'M':>6} " + " ".join(f"{c:>15}" for c in cols))
        for m in ms:
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
            sx = torch.rand(m, device=dev) * 0.01
            xs = torch.randn(m, device=dev)
            xbf = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            mp16 = (m + 15) // 16 * 16
            xf8 = torch.randn(mp16, k, device=dev).to(torch.float8_e4m3fn)
            sa = torch.rand(mp16, 1, device=dev) + 0.5
            mi = max(mp16, 32)
            xi = torch.randint(-127, 128, (mi, k), dtype=torch.int8, device=dev)
            fns = {
                "w4a8_pc": lambda: torch.ops.qserve.w4a8_gemm_per_channel(xq, sx, xs, qweight, s1, sz, None,
                                                                          torch.bfloat16),
                "w4a8_g128": lambda: torch.ops.qserve.w4a8_gemm_per_group(xq, sx, qweight, s1, s2, z2, None,
                                                                          torch.bfloat16),
                "w8a8": lambda: torch.ops.qserve.w8a8_gemm(xq, sx, w8, s1, None, torch.bfloat16),
                "bf16_mm": lambda: torch.mm(xbf, wbf.t()),
                "fp8_scaled_mm": lambda: torch._scaled_mm(xf8, wf8.t(), scale_a=sa, scale_b=sb,
                                                          out_dtype=torch.bfloat16),
                "int_mm": lambda: torch._int_mm(xi, w8.t()),
            }
            row = {"shape": sname, "N": n, "K": k, "M": m}
            for c in cols:
                try:
                    row[c] = bench(fns[c])
                except Exception as e:  # noqa: BLE001  (an unsupported baseline must not stop the table)
                    row[c] = None
                    row[c + "_error"] = str(e).splitlines()[0][:200]
            results.append(row)
            cells = []
            for c in cols:
                t = row[c]
                if t is None:
                    cells.append(f"{'n/a':>15}")
                    continue
                pad = "*" if (c == "fp8_scaled_mm" and mp16 != m) or (c == "int_mm" and mi != m) else " "
                if c in ("w4a8_pc", "w4a8_g128", "w8a8"):
                    cells.append(f"{t:8.1f}[{2 * m * n * k / t / 1e6:5.0f}]")
                else:
                    cells.append(f"{t:14.1f}{pad}")
            print(f"{m:>6} " + " ".join(cells), flush=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
