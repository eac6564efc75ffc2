"""End-to-end offline throughput and latency through vLLM's engine, QServe's protocol (issue 5).

Protocol (QServe's, arXiv 2405.04532): every request has a 1024-token prompt of random token ids (no tokenizer)
and generates exactly 512 tokens (``ignore_eos``); all B requests are submitted at once; output tokens / wall time.

One engine per configuration, each in its own process (GPU memory is freed between configurations), built once
with ``max_num_seqs`` = the largest batch; for each batch B the worker then submits exactly B requests, which is
the same as ``max_num_seqs = B`` whenever B sequences fit in the KV cache (each record holds the cache capacity in
tokens and vLLM's preemption count, so "fits" is visible).  A short warm-up generate comes first.  vLLM defaults
otherwise: compiled model, CUDA graphs, chunked prefill, prefix caching (random prompts never hit).

Results go into one JSON file, a record per (model, config, mode, batch, lengths), written after every
measurement; measurements already there are skipped, so a sweep can be split over several short runs
(``--deadline-s`` stops before starting what would not finish in time).  At the end: a markdown table on stdout
and a PNG bar chart of the best-batch output throughput with ratios to fp8 and bf16.

    python benchmarks/bench_throughput.py --model llama-3-8b --configs w4a8kv4-pc,fp8 --batches 64,128,256,512
    vllm-qserve bench throughput --model llama-3-8b --configs all --batches 256 --mode throughput,latency
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from vllm_qserve.benchmark.configs import (CONFIGS, DEFAULT_CONFIGS, BenchConfig, child_env, parse_configs,
                                           resolve_model, write_model_folder)

DEFAULT_OUT = os.path.join("benchmarks", "results", "e2e_throughput.json")
DEFAULT_START_ESTIMATE_S = 120.0  # engine start of an 8B model in compiled mode (H100: ~60-100 s) + warm-up


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# --- results file ----------------------------------------------------------------------------------------------
def record_key(r: dict) -> tuple:
    return (r["model"], r["config"], r["mode"], r["batch"], r["input_len"], r["output_len"])


def load_results(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"protocol": "QServe e2e: random-token prompts, ignore_eos, all requests at once", "runs": [],
            "records": []}


def save_results(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # a run killed at its time limit never leaves a half-written file


def add_record(path: str, record: dict) -> None:
    data = load_results(path)
    data["records"] = [r for r in data["records"] if record_key(r) != record_key(record)] + [record]
    save_results(path, data)


def done_keys(path: str) -> set:
    return {record_key(r) for r in load_results(path)["records"]}


# --- the worker: one engine, one configuration -----------------------------------------------------------------
def _random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Stay clear of the lowest ids (special tokens in every vocabulary) and of the top of the vocabulary.
    ids = torch.randint(100, max(101, vocab_size - 100), (n, length), generator=g)
    return [{"prompt_token_ids": row.tolist()} for row in ids]


def _counter(llm, name: str) -> float | None:
    try:
        return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)
    except Exception:  # stats disabled or the metric absent in this vLLM
        return None


def _measure(llm, prompts: list, params, output_len: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    if out_tokens != len(prompts) * output_len:
        raise RuntimeError(f"expected {len(prompts) * output_len} output tokens, got {out_tokens} (ignore_eos)")
    return wall, out_tokens


def run_worker(job: dict) -> None:
    """Builds one engine for job["config"] and measures every (mode, batch) not yet in the results file."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    t_begin = time.perf_counter()
    deadline = job["deadline"]  # time.time() by which the worker must be done (None: no limit)
    in_len, out_len = job["input_len"], job["output_len"]
    todo = job["todo"]  # [[mode, batch], ...]
    kwargs = dict(model=job["model_dir"], load_format="dummy", skip_tokenizer_init=True, seed=0,
                  dtype=job["dtype"], max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"],
                  disable_log_stats=False, **job["engine_kwargs"])
    if job.get("gpu_memory_utilization"):
        kwargs["gpu_memory_utilization"] = job["gpu_memory_utilization"]
    if job.get("enforce_eager"):
        kwargs["enforce_eager"] = True
    log(f"{job['config']}: starting the engine ({', '.join(f'{k}={v}' for k, v in job['engine_kwargs'].items())})")
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    log(f"{job['config']}: engine up in {start_s:.0f}s; KV cache {kv_tokens} tokens "
        f"({kv_tokens // (in_len + out_len)} sequences of {in_len + out_len}), kv_cache_dtype {cache.cache_dtype}")
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=out_len, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    warm_n = min(job["warmup_requests"], job["max_num_seqs"])
    warm = llm.generate(_random_prompts(warm_n, in_len, vocab, seed=1), SamplingParams(
        max_tokens=min(16, out_len), ignore_eos=True, detokenize=False, logprobs=1), use_tqdm=False)
    warmup_s = time.perf_counter() - t0
    # Random weights must still give finite logits, or the benchmark would time NaN arithmetic.
    bad = sum(1 for o in warm for step in (o.outputs[0].logprobs or []) for lp in step.values()
              if not math.isfinite(lp.logprob))
    if bad:
        raise RuntimeError(f"{job['config']}: {bad} non-finite log-probabilities in the warm-up: the dummy weights "
                           f"give NaN/inf logits")
    common = {"model": job["model"], "config": job["config"], "input_len": in_len, "output_len": out_len,
              "description": job["description"], "engine_start_s": round(start_s, 1),
              "warmup_s": round(warmup_s, 1), "warmup_logprobs_finite": True, "kv_cache_tokens": kv_tokens,
              "kv_cache_dtype": str(cache.cache_dtype), "max_num_seqs": job["max_num_seqs"],
              "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens,
              "enforce_eager": bool(job.get("enforce_eager")), "dtype": job["dtype"],
              "engine_kwargs": job["engine_kwargs"],
              "vllm_version": vllm.__version__, "torch_version": torch.__version__, "gpu": job["gpu"]}
    measured: list[tuple[int, float]] = []  # (batch, seconds of one generate) so far, for the deadline estimate
    for mode, batch in todo:
        iters = job["latency_iters"] if mode == "latency" else 1
        if deadline is not None and measured:
            # A batch takes at most as long as a larger one, and at most proportionally longer than a smaller one.
            one = min(w if b >= batch else w * batch / b for b, w in measured)
            estimate = one * iters * 1.2
            if time.time() + estimate > deadline:
                log(f"{job['config']} {mode} B={batch}: skipped, ~{estimate:.0f}s would pass the deadline "
                    f"(rerun to resume)")
                continue
        pre0 = _counter(llm, "vllm:num_preemptions")
        walls = []
        for it in range(iters):
            prompts = _random_prompts(batch, in_len, vocab, seed=1000 * batch + it + (7 if mode == "latency" else 0))
            wall, out_tokens = _measure(llm, prompts, params, out_len)
            walls.append(wall)
        pre1 = _counter(llm, "vllm:num_preemptions")
        wall = sorted(walls)[len(walls) // 2]  # median
        measured.append((batch, max(walls)))
        rec = dict(common, mode=mode, batch=batch, wall_s=round(wall, 3), walls_s=[round(w, 3) for w in walls],
                   output_tok_s=round(batch * out_len / wall, 1),
                   total_tok_s=round(batch * (in_len + out_len) / wall, 1),
                   fits_in_kv_cache=batch * (in_len + out_len) <= kv_tokens,
                   preemptions=None if pre0 is None or pre1 is None else int(pre1 - pre0),
                   measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        if mode == "latency":
            rec["latency_s"] = rec["wall_s"]
            rec["ms_per_output_token"] = round(1000 * wall / out_len, 2)
        add_record(job["out"], rec)
        extra = f", {rec['ms_per_output_token']} ms/step" if mode == "latency" else ""
        log(f"{job['config']} {mode} B={batch}: {rec['output_tok_s']:.0f} output tok/s "
            f"({wall:.1f}s{extra}, preemptions {rec['preemptions']})")
    log(f"{job['config']}: done in {time.perf_counter() - t_begin:.0f}s")


# --- the driver ------------------------------------------------------------------------------------------------
def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # No nvidia-smi: ask torch in a throw-away process (a CUDA context here would hold GPU memory all run long).
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0) "
                              "if torch.cuda.is_available() else '')"], capture_output=True, text=True, timeout=120)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError):
        pass
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def plan_jobs(args, configs: list[BenchConfig], done: set) -> list[tuple[BenchConfig, list]]:
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    plan = []
    for cfg in configs:
        todo = []
        for mode in modes:
            batches = args.batches if mode == "throughput" else args.latency_batches
            for b in batches:
                if (args.model, cfg.name, mode, b, args.input_len, args.output_len) not in done:
                    todo.append([mode, b])
        plan.append((cfg, todo))
    return plan


def run_config(args, cfg: BenchConfig, todo: list, model_dir: str, gpu: str, deadline: float | None) -> int:
    job = {"model": args.model, "config": cfg.name, "description": cfg.description, "model_dir": model_dir,
           "engine_kwargs": cfg.engine_kwargs | json.loads(args.engine_args or "{}"), "todo": todo,
           "input_len": args.input_len, "output_len": args.output_len, "dtype": args.dtype,
           "max_model_len": args.max_model_len or args.input_len + args.output_len,
           "max_num_seqs": max(b for _, b in todo) if args.max_num_seqs is None else args.max_num_seqs,
           "warmup_requests": args.warmup_requests, "latency_iters": args.latency_iters,
           "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager,
           "out": os.path.abspath(args.out), "deadline": deadline, "gpu": gpu}
    env = child_env(cfg)
    cmd = [sys.executable, "-m", "vllm_qserve.benchmark.throughput", "--worker", json.dumps(job)]
    timeout = None if deadline is None else max(1.0, deadline - time.time() + 30)
    # Own process group: at the deadline the worker *and* vLLM's engine-core process go, freeing the GPU.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{cfg.name}: worker stopped at the deadline (finished measurements are saved)")
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                return proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return 124


def run_sweep(args) -> int:
    configs = parse_configs(args.configs)
    base = args.model_dir
    t_start = time.time()
    deadline = None if args.deadline_s is None else t_start + args.deadline_s
    gpu = gpu_name()
    has_gpu = not gpu.startswith("cpu")
    data = load_results(args.out)
    data["runs"].append({"command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
                         "gpu": gpu, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    save_results(args.out, data)
    plan = plan_jobs(args, configs, done_keys(args.out))
    log(f"{args.model} on {gpu}: " + "; ".join(f"{c.name}: {len(t)} to measure" for c, t in plan))
    failures = []
    with tempfile.TemporaryDirectory(prefix="qserve-bench-") as tmp:
        for cfg, todo in plan:
            if not todo:
                log(f"{cfg.name}: all measurements already in {args.out}, skipped")
                continue
            if cfg.gpu_only and not has_gpu:
                log(f"{cfg.name}: skipped, vLLM runs it on CUDA GPUs only")
                continue
            if deadline is not None and time.time() + args.start_estimate_s > deadline:
                log(f"{cfg.name}: not started, an engine start (~{args.start_estimate_s:.0f}s) would pass the "
                    f"deadline; rerun the same command to resume")
                continue
            model_dir = write_model_folder(base, cfg, os.path.join(tmp, cfg.name))
            rc = run_config(args, cfg, todo, model_dir, gpu, deadline)
            if rc != 0:
                failures.append(cfg.name)
                log(f"{cfg.name}: worker exited with {rc}")
    print(markdown_table(load_results(args.out)["records"], args.model, args.input_len, args.output_len), flush=True)
    if not args.no_plot:
        png = plot_best(load_results(args.out)["records"], args.model, args.input_len, args.output_len,
                        os.path.splitext(args.out)[0] + f"_{args.model}.png")
        if png:
            log(f"plot: {png}")
    log(f"results: {args.out} ({time.time() - t_start:.0f}s)")
    return 1 if failures else 0


# --- reporting -------------------------------------------------------------------------------------------------
def best_by_config(records: list, model: str, input_len: int, output_len: int) -> dict:
    best = {}
    for r in records:
        if (r["model"], r["mode"], r["input_len"], r["output_len"]) != (model, "throughput", input_len, output_len):
            continue
        if r["config"] not in best or r["output_tok_s"] > best[r["config"]]["output_tok_s"]:
            best[r["config"]] = r
    return best


def _order(names) -> list:
    known = list(DEFAULT_CONFIGS) + [n for n in CONFIGS if n not in DEFAULT_CONFIGS]
    return sorted(names, key=lambda n: known.index(n) if n in known else len(known))


def markdown_table(records: list, model: str, input_len: int, output_len: int) -> str:
    rows = [r for r in records if (r["model"], r["input_len"], r["output_len"]) == (model, input_len, output_len)]
    thr = [r for r in rows if r["mode"] == "throughput"]
    lines = []
    if thr:
        batches = sorted({r["batch"] for r in thr})
        best = best_by_config(records, model, input_len, output_len)
        ref = {k: best[k]["output_tok_s"] for k in ("fp8", "bf16") if k in best}
        lines.append(f"Output tokens/s, {model}, input {input_len} / output {output_len}, all requests at once "
                     f"(gpu: {thr[0]['gpu']}, vLLM {thr[0]['vllm_version']}, torch {thr[0]['torch_version']})")
        lines.append("")
        head = ["config"] + [f"B={b}" for b in batches] + ["best (B)", "vs fp8", "vs bf16", "KV cache tokens",
                                                          "preemptions at best", "engine start s"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for name in _order({r["config"] for r in thr}):
            by_b = {r["batch"]: r for r in thr if r["config"] == name}
            b = best[name]
            cells = [name] + [f"{by_b[x]['output_tok_s']:,.0f}" + ("" if by_b[x]["fits_in_kv_cache"] else "*")
                              if x in by_b else "-" for x in batches]
            cells += [f"{b['output_tok_s']:,.0f} ({b['batch']})"]
            cells += [f"{b['output_tok_s'] / ref[k]:.2f}x" if k in ref else "-" for k in ("fp8", "bf16")]
            cells += [f"{b['kv_cache_tokens']:,}", str(b["preemptions"]), f"{b['engine_start_s']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("(* = B x (input + output) exceeds the KV cache: vLLM preempts or queues requests)")
    lat = [r for r in rows if r["mode"] == "latency"]
    if lat:
        lines.append("")
        lines.append(f"Latency, {model}, input {input_len} / output {output_len} (median of the iterations)")
        lines.append("")
        lines.append("| config | batch | latency s | ms per output token | output tok/s |")
        lines.append("|---|---|---|---|---|")
        for name in _order({r["config"] for r in lat}):
            for r in sorted((r for r in lat if r["config"] == name), key=lambda r: r["batch"]):
                lines.append(f"| {name} | {r['batch']} | {r['latency_s']:.2f} | {r['ms_per_output_token']:.2f} | "
                             f"{r['output_tok_s']:,.0f} |")
    return "\n".join(lines) if lines else f"(no results for {model} {input_len}/{output_len})"


def plot_best(records: list, model: str, input_len: int, output_len: int, path: str) -> str | None:
    best = best_by_config(records, model, input_len, output_len)
    if not best:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    names = _order(best)
    vals = [best[n]["output_tok_s"] for n in names]
    colors = ["tab:green" if CONFIGS.get(n) and CONFIGS[n].is_qserve else "tab:gray" for n in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3, 4.5))
    bars = ax.bar(names, vals, color=colors)
    for bar, n in zip(bars, names):
        ratios = [f"{best[n]['output_tok_s'] / best[k]['output_tok_s']:.2f}x {k}" for k in ("fp8", "bf16")
                  if k in best and k != n]
        ax.annotate(f"{best[n]['output_tok_s']:,.0f}\nB={best[n]['batch']}\n" + "\n".join(ratios),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("output tokens / s (best batch)")
    gpu = next(iter(best.values()))["gpu"]
    ax.set_title(f"{model}, {input_len}/{output_len}, {gpu}; green = vllm-qserve", fontsize=9)
    ax.set_ylim(0, max(vals) * 1.35)
    plt.xticks(rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b",
                   help="llama-3-8b (default), llama-2-7b, mistral-7b (benchmarks/models) or a config-only folder")
    p.add_argument("--configs", default="all",
                   help=f"comma-separated: {', '.join(CONFIGS)}; 'all' = {', '.join(DEFAULT_CONFIGS)}")
    p.add_argument("--mode", default="throughput", help="throughput, latency or throughput,latency (one engine)")
    p.add_argument("--batches", type=_ints, default=[64, 128, 256, 512],
                   help="throughput sweep (default 64,128,256,512)")
    p.add_argument("--latency-batches", type=_ints, default=[1, 16], help="latency mode batches (default 1,16)")
    p.add_argument("--latency-iters", type=int, default=3, help="latency mode repetitions (median reported)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", help="activation dtype of every configuration (default bfloat16)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest batch measured")
    p.add_argument("--max-model-len", type=int, default=None, help="default: input + output length")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM's (default 0.9)")
    p.add_argument("--engine-args", default=None, metavar="JSON", help="extra vllm.LLM arguments for every config")
    p.add_argument("--warmup-requests", type=int, default=16, help="warm-up: this many requests, 16 output tokens")
    p.add_argument("--enforce-eager", action="store_true", help="no compile, no CUDA graphs (tests on CPU)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT}); resumed if present")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop starting work that would end later than this many seconds from now (e.g. 570 in a "
                        "600 s device call); rerun the same command to resume")
    p.add_argument("--start-estimate-s", type=float, default=DEFAULT_START_ESTIMATE_S,
                   help="engine start + warm-up time assumed by --deadline-s")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--report-only", action="store_true", help="print the table and plot from --out, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        run_worker(json.loads(argv[1]))
        return 0
    args = build_parser().parse_args(argv)
    return run_args(args)


def run_args(args) -> int:
    # Records and file names use the short name: "llama-3-8b", or a folder's base name.
    args.model_dir = resolve_model(args.model) if not args.report_only else None
    if os.path.isdir(args.model):
        args.model = os.path.basename(os.path.normpath(args.model))
    if args.report_only:
        records = load_results(args.out)["records"]
        print(markdown_table(records, args.model, args.input_len, args.output_len))
        if not args.no_plot:
            png = plot_best(records, args.model, args.input_len, args.output_len,
                            os.path.splitext(args.out)[0] + f"_{args.model}.png")
            if png:
                log(f"plot: {png}")
        return 0
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
