"""Where a step's GPU time goes: CUDA kernel names -> categories, and busy time from a profiler trace.

The rules look at the (demangled) kernel name only, first match wins; the order matters because names overlap
("kv_gather" is attention, not sampling; "fused_quant_kernel<..., Prologue 2>" is SiLU-and-mul + quant, the other
prologues are norms).  Inductor's generated kernels are named after the ops they fuse (``triton_red_fused_..._mean_
..._rsqrt_...`` is an RMSNorm), so they are classified by those op names.
"""

from __future__ import annotations

import json
import re

CATEGORIES = ("gemm-qserve", "gemm-vendor", "attention", "act-quant", "norm(+quant)", "silu-mul(+quant)", "rotary",
              "sampling/logits", "memcpy/memset", "other")

_RULES: list[tuple[str, re.Pattern]] = [(cat, re.compile(rx, re.IGNORECASE)) for cat, rx in (
    ("gemm-qserve", r"qgemm_kernel|w4a8_wgmma"),  # ours: mma.sync family, Hopper wgmma family (before "wgmma")
    ("silu-mul(+quant)", r"fused_quant_kernel.*Prologue\)2|fused_quant_kernel.*,\s*2>"),
    ("norm(+quant)", r"fused_quant_kernel"),
    ("attention", r"kv_decode|kv_cache_write|kv_gather|flash|fmha|attn|attention|paged|reshape_and_cache|"
                  r"concat_and_cache|kernel_unified|merge_attn"),
    ("rotary", r"rotary|rope"),
    # vendor GEMMs before "quant": their template arguments may spell anything (FA3's spell cutlass: above)
    ("gemm-vendor", r"gemm|gemv|cutlass|cublas|nvjet|xmma|wgmma|machete|marlin"),
    ("act-quant", r"per_token_quant|scaled_fp8_quant|dynamic_per_token|per_token_group_quant|quant"),
    ("norm(+quant)", r"rms_?norm|layer_?norm|rsqrt"),
    ("silu-mul(+quant)", r"silu|act_and_mul|gelu"),
    ("gemm-vendor", r"sm90_|sm80_|scaled_mm|splitk|ampere_.*_tn|matmul|_mm_"),
    ("sampling/logits", r"sampl|softmax|topk|top_k|top_p|argmax|sort|multinomial|exponential|logit|cumsum|"
                        r"penalt|radix"),
)]


def classify(name: str) -> str:
    for cat, rx in _RULES:
        if rx.search(name):
            return cat
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize_trace(trace_path: str, steps: int, top: int = 15) -> dict:
    """Kernel time per category (ms per step), GPU-busy time per step and the top kernels of a chrome trace, plus
    what the host did (summarize_host)."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    return {**summarize_events(events, steps, top), "host": summarize_host(events, steps)}


def summarize_host(events: list, steps: int, top: int = 20) -> dict:
    """The host side of the same steps: CUDA runtime/driver calls (count and ms per step: one cudaGraphLaunch per
    step means a full CUDA graph, hundreds of kernel launches mean eager or piecewise code; synchronizations show
    where the host waited for the GPU) and the CPU ops with the most inclusive time per step (nested ops are
    counted in their parents too, so the column does not add up)."""
    steps = max(1, steps)
    runtime: dict[str, list] = {}
    ops: dict[str, list] = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name, dur = e.get("cat", ""), e.get("name", "?"), float(e.get("dur", 0.0))
        table = runtime if cat in ("cuda_runtime", "cuda_driver") else ops if cat in ("cpu_op", "user_annotation") \
            else None
        if table is None:
            continue
        k = table.setdefault(name[:120], [0, 0.0])
        k[0] += 1
        k[1] += dur

    def rows(table):
        best = sorted(table.items(), key=lambda kv: -kv[1][1])[:top]
        return [{"name": n, "calls_per_step": round(c / steps, 1), "ms_per_step": round(t / 1000 / steps, 3)}
                for n, (c, t) in best]

    return {"runtime_calls": rows(runtime), "cpu_ops": rows(ops)}


def summarize_events(events: list, steps: int, top: int = 15) -> dict:
    per_cat = {c: 0.0 for c in CATEGORIES}
    per_kernel: dict[str, list] = {}
    busy: list[tuple[float, float]] = []
    for e in events:
        cat = e.get("cat", "")
        if e.get("ph") != "X" or cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        name, ts, dur = e.get("name", "?"), float(e["ts"]), float(e.get("dur", 0.0))
        c = classify(name) if cat == "kernel" else "memcpy/memset"
        per_cat[c] += dur
        k = per_kernel.setdefault(name, [c, 0.0, 0])
        k[1] += dur
        k[2] += 1
        busy.append((ts, ts + dur))
    steps = max(1, steps)
    kernel_ms = sum(per_cat.values()) / 1000 / steps
    top_kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "kernel_ms_per_step": round(kernel_ms, 3),
        "gpu_busy_ms_per_step": round(_union_us(busy) / 1000 / steps, 3),  # overlapping streams counted once
        "category_ms_per_step": {c: round(v / 1000 / steps, 3) for c, v in per_cat.items()},
        "top_kernels": [{"name": n[:160], "category": c, "ms_per_step": round(t / 1000 / steps, 3),
                         "launches_per_step": round(cnt / steps, 1)} for n, (c, t, cnt) in top_kernels],
    }
