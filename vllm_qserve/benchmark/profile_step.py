"""Profile one decode step and one prefill step through vLLM's engine: where the time goes (issue 5).

Per configuration, in its own process, with the engine in that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so
that torch.profiler sees the model's CUDA kernels:

* decode: `batch` requests with `input_len`-token random prompts are added and the engine is stepped until every
  one is decoding (context ~input_len); then `steps` engine steps are timed without the profiler (step wall time)
  and `steps` more are profiled (kernel time by category, GPU-busy time = union of kernel intervals).
* prefill: the decode requests are aborted, then enough 1-token requests to fill one step's token budget
  (max_num_batched_tokens / input_len prompts) are added and that step is timed, then profiled the same way.

step wall - GPU busy = time the GPU waits for the CPU (scheduling, input preparation, sampling bookkeeping,
output processing).  Kernels inside CUDA graphs are recorded individually by CUPTI.  Results: JSON (per config
and phase: ms per step by category, top kernels) and a markdown table.

    python benchmarks/profile_step.py --model llama-3-8b --configs w4a8kv4-pc,fp8 --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from vllm_qserve.benchmark.configs import child_env, parse_configs, resolve_model, write_model_folder
from vllm_qserve.benchmark.kernel_classes import CATEGORIES, summarize_trace
from vllm_qserve.benchmark.throughput import _random_prompts, gpu_name, load_results, log, save_results

DEFAULT_OUT = os.path.join("benchmarks", "results", "e2e_profile.json")


def _timed_steps(engine, n: int, sync) -> list[float]:
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        sync()
        walls.append(time.perf_counter() - t0)
    return walls


def _profiled(engine, n: int, sync, trace_path: str) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            engine.step()
        sync()
    prof.export_chrome_trace(trace_path)


def _python_profile(engine, n: int, sync, top: int = 25) -> list:
    """n engine steps under cProfile: the functions with the most own time, per step (host-side cost of a step:
    scheduler, input preparation, sampling, output processing), as [{name, calls_per_step, own_ms, cum_ms}]."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        engine.step()
        sync()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, func) -> (primitive calls, calls, own s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"name": f"{os.path.basename(f)}:{line}:{fn}", "calls_per_step": round(v[1] / n, 1),
             "own_ms": round(1000 * v[2] / n, 3), "cum_ms": round(1000 * v[3] / n, 3)} for (f, line, fn), v in rows]


def run_worker(job: dict) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model runs in this process: the profiler sees it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    in_len, batch, steps = job["input_len"], job["batch"], job["steps"]
    kwargs = dict(model=job["model_dir"], load_format="dummy", skip_tokenizer_init=True, seed=0, dtype=job["dtype"],
                  max_model_len=in_len + job["output_len"], max_num_seqs=batch, **job["engine_kwargs"])
    if job.get("enforce_eager"):
        kwargs["enforce_eager"] = True
    log(f"profile {job['config']}: starting the engine")
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    vocab = engine.vllm_config.model_config.get_vocab_size()
    budget = engine.vllm_config.scheduler_config.max_num_batched_tokens
    warm = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False)
    llm.generate(_random_prompts(min(8, batch), in_len, vocab, seed=1), warm, use_tqdm=False)
    results = {}

    # --- decode at `batch`, context ~ input_len --------------------------------------------------------------
    params = SamplingParams(temperature=1.0, max_tokens=job["output_len"], ignore_eos=True, detokenize=False)
    ids = [engine.add_request(f"d{i}", p, params) for i, p in enumerate(_random_prompts(batch, in_len, vocab, 2))]
    produced: dict = {}
    t_fill = time.time()
    while len(produced) < batch and time.time() - t_fill < 600:
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                produced[out.request_id] = True
    for _ in range(3):  # settle (graphs of this batch size warm)
        engine.step()
    sync()
    walls = _timed_steps(engine, steps, sync)
    trace = os.path.join(job["tmp"], f"{job['config']}-decode.json")
    _profiled(engine, steps, sync, trace)
    results["decode"] = {"batch": batch, "context": in_len, "step_wall_ms": round(1000 * sum(walls) / len(walls), 3),
                         "steps": steps, **summarize_trace(trace, steps)}
    if job.get("python_profile"):
        results["decode"]["python_top"] = _python_profile(engine, job["python_profile"], sync)
    engine.abort_request([i for i in ids if i is not None])
    while engine.has_unfinished_requests():
        engine.step()

    # --- prefill: one step's worth of whole prompts ---------------------------------------------------------------
    n_prefill = max(1, min(batch, budget // in_len))
    one = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)

    def prefill_round(seed: int) -> None:
        for i, p in enumerate(_random_prompts(n_prefill, in_len, vocab, seed)):
            engine.add_request(f"p{seed}-{i}", p, one)

    prefill_round(10)  # warm-up round (the prefill shapes)
    while engine.has_unfinished_requests():
        engine.step()
    sync()
    prefill_round(11)
    t0 = time.perf_counter()
    n_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        n_steps += 1
    sync()
    wall = time.perf_counter() - t0
    prefill_round(12)
    trace = os.path.join(job["tmp"], f"{job['config']}-prefill.json")
    import torch.profiler as tp

    activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with tp.profile(activities=activities) as prof:
        n_prof = 0
        while engine.has_unfinished_requests():
            engine.step()
            n_prof += 1
        sync()
    prof.export_chrome_trace(trace)
    # the prefill "step" is everything these prompts needed (normally one engine step, plus the step that returns
    # the sampled token when scheduling is asynchronous): report per prefill round, with the engine-step count
    results["prefill"] = {"prompts": n_prefill, "tokens": n_prefill * in_len, "engine_steps": n_steps,
                          "step_wall_ms": round(1000 * wall, 3), "steps": 1, **summarize_trace(trace, 1)}
    rec = {"model": job["model"], "config": job["config"], "description": job["description"], "gpu": job["gpu"],
           "vllm_version": vllm.__version__, "torch_version": torch.__version__, "dtype": job["dtype"],
           "max_num_batched_tokens": budget, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), **results}
    data = load_results(job["out"])
    data["records"] = [r for r in data["records"] if (r["model"], r["config"]) != (job["model"], job["config"])]
    data["records"].append(rec)
    save_results(job["out"], data)
    for phase in ("decode", "prefill"):
        r = results[phase]
        if torch.cuda.is_available() and not r["kernel_ms_per_step"]:
            log(f"profile {job['config']} {phase}: WARNING: the trace holds no CUDA kernels (CUPTI unavailable?); "
                f"rerun with --enforce-eager to see the kernels without CUDA graphs")
        log(f"profile {job['config']} {phase}: step {r['step_wall_ms']:.2f} ms, GPU busy "
            f"{r['gpu_busy_ms_per_step']:.2f} ms; " + ", ".join(f"{c} {v:.2f}" for c, v in r["category_ms_per_step"].items() if v))
        host = r.get("host", {})
        log(f"profile {job['config']} {phase} host: " + ", ".join(
            f"{c['name']} x{c['calls_per_step']:g} {c['ms_per_step']:.2f} ms" for c in host.get("runtime_calls", [])[:8]))
        log(f"profile {job['config']} {phase} cpu ops: " + ", ".join(
            f"{c['name']} x{c['calls_per_step']:g} {c['ms_per_step']:.2f} ms" for c in host.get("cpu_ops", [])[:12]))
        for row in r.get("python_top", []):
            log(f"profile {job['config']} {phase} python: {row['own_ms']:7.3f} ms own, {row['cum_ms']:7.3f} cum, "
                f"x{row['calls_per_step']:g}  {row['name']}")


def markdown_table(records: list) -> str:
    if not records:
        return "(no profile results)"
    cats = [c for c in CATEGORIES if any(r[p]["category_ms_per_step"].get(c) for r in records
                                         for p in ("decode", "prefill"))]
    lines = ["| config | phase | step wall ms | GPU busy ms | CPU gap ms | " + " | ".join(cats) + " |",
             "|" + "---|" * (5 + len(cats))]
    for r in records:
        for phase in ("decode", "prefill"):
            p = r[phase]
            what = f"B={p['batch']}, ctx {p['context']}" if phase == "decode" else f"{p['tokens']} tokens"
            lines.append(f"| {r['config']} | {phase} ({what}) | {p['step_wall_ms']:.2f} | "
                         f"{p['gpu_busy_ms_per_step']:.2f} | {p['step_wall_ms'] - p['gpu_busy_ms_per_step']:.2f} | "
                         + " | ".join(f"{p['category_ms_per_step'].get(c, 0):.2f}" for c in cats) + " |")
    return "\n".join(lines)


def run(args) -> int:
    configs = parse_configs(args.configs)
    base = resolve_model(args.model)
    if os.path.isdir(args.model):
        args.model = os.path.basename(os.path.normpath(args.model))
    gpu = gpu_name()
    data = load_results(args.out)
    data["runs"].append({"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "gpu": gpu,
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    save_results(args.out, data)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="qserve-profile-") as tmp:
        for cfg in configs:
            if any((r["model"], r["config"]) == (args.model, cfg.name) for r in load_results(args.out)["records"]):
                log(f"profile {cfg.name}: already in {args.out}")
                continue
            if cfg.gpu_only and gpu.startswith("cpu"):
                log(f"profile {cfg.name}: skipped, vLLM runs it on CUDA GPUs only")
                continue
            job = {"model": args.model, "config": cfg.name, "description": cfg.description, "gpu": gpu,
                   "model_dir": write_model_folder(base, cfg, os.path.join(tmp, cfg.name)),
                   "engine_kwargs": cfg.engine_kwargs, "input_len": args.input_len, "output_len": args.output_len,
                   "batch": args.batch, "steps": args.steps, "dtype": args.dtype, "enforce_eager": args.enforce_eager,
                   "python_profile": args.python_profile, "out": os.path.abspath(args.out), "tmp": tmp}
            env = child_env(cfg)
            rc = subprocess.run([sys.executable, "-m", "vllm_qserve.benchmark.profile_step", "--worker",
                                 json.dumps(job)], env=env).returncode
            if rc:
                failures += 1
                log(f"profile {cfg.name}: worker exited with {rc}")
            if args.keep_traces:
                os.makedirs(args.keep_traces, exist_ok=True)
                for name in os.listdir(tmp):
                    if name.endswith(".json") and name.startswith(cfg.name):
                        os.replace(os.path.join(tmp, name), os.path.join(args.keep_traces, name))
    print(markdown_table([r for r in load_results(args.out)["records"] if r["model"] == args.model]), flush=True)
    return 1 if failures else 0


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--configs", default="w4a8kv4-pc,fp8")
    p.add_argument("--batch", type=int, default=256, help="decode batch (default 256)")
    p.add_argument("--steps", type=int, default=5, help="decode steps timed, and again profiled (default 5)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--python-profile", type=int, default=0, metavar="N",
                   help="also run N decode steps under cProfile and report the Python functions with the most own "
                        "time per step (where the host time of a step goes; 0 = off)")
    p.add_argument("--keep-traces", default=None, metavar="DIR", help="keep the chrome traces here")
    p.add_argument("--out", default=DEFAULT_OUT)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        run_worker(json.loads(argv[1]))
        return 0
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
