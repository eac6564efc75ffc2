"""Time our KV4 paged decode kernel alone at a few (batch x context) shapes: a quick A/B probe for kernel changes.

    python tools/kv_decode_timing.py --shapes 512x1024,256x2048,64x2048,16x2048

Uses benchmarks/bench_attention.py's configuration (Llama-3-8B heads: 32 query / 8 KV, D = 128; block size 16,
max model length 2048), random valid KV4 cache and timing (triton do_bench median, L2 flushed); prints us, effective
TB/s (KV4 bytes read / time) and the split count the launcher picked.  Needs a CUDA GPU and the built extension.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def main() -> None:
    import bench_attention as ba

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="512x1024,256x2048,64x2048", help="comma list of BATCHxCONTEXT")
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        batch, ctx = map(int, shape.split("x"))
        cfg = ba.Config(batch, ctx, 16, 2048)
        cache = ba.make_qserve_cache(cfg, 4)
        out = torch.empty_like(cfg.query)

        def run():
            torch.ops.qserve.kv_paged_decode(out, cfg.query, cache, cfg.block_table, cfg.seq_lens, cfg.scale,
                                             ba.HKV, 4)

        us = ba.bench_us(run)
        splits = torch.ops.qserve.kv_decode_num_splits(cfg.query, cache, cfg.block_table, ba.HKV, 4)
        print(f"B={batch} ctx={ctx}: {us:.1f} us, {ba.kv_bytes('qserve_kv4', batch, ctx) / us / 1e6:.2f} TB/s, "
              f"splits {splits}", flush=True)
        del cache


if __name__ == "__main__":
    main()
