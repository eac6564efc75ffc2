"""Online serving benchmark: ``vllm serve`` on dummy weights + a token-id client (TTFT, TPOT, throughput).

``vllm bench serve --dataset-name random`` needs the model's tokenizer to build its prompts, and the benchmark
models are config-only folders, so this client does the same measurement with token-id prompts instead: the
OpenAI completions endpoint takes ``prompt`` as a list of token ids, the server runs with
``--skip-tokenizer-init``, every request asks for exactly ``output_len`` tokens (``ignore_eos``) and streams.
At concurrency C the client keeps C requests in flight until ``prompts_per_concurrency * C`` have finished
(request rate unbounded, as ``vllm bench serve --max-concurrency C``).

Per request: TTFT = first streamed token - send; TPOT = (last token - first token) / (output tokens - 1).
Reported: mean / median / p99 of both, output tok/s = all output tokens / wall time of the level.

    python benchmarks/bench_serving.py --model llama-3-8b --configs w4a8kv4-pc,fp8 --concurrency 16,64,256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from vllm_qserve.benchmark.configs import CONFIGS, child_env, parse_configs, resolve_model, write_model_folder
from vllm_qserve.benchmark.throughput import gpu_name, load_results, log, save_results

DEFAULT_OUT = os.path.join("benchmarks", "results", "e2e_serving.json")
# the `vllm` console script is not on PATH on every machine (the project's GPU box); the module always is
VLLM_CLI = os.environ.get("VLLM_CLI", f"{sys.executable} -m vllm.entrypoints.cli.main")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


class Server:
    """`vllm serve` in its own process group (so that stop() also ends the engine-core process)."""

    def __init__(self, model_dir: str, cfg, args, log_path: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = []
        for k, v in cfg.engine_kwargs.items():
            extra += [f"--{k.replace('_', '-')}", str(v)]
        self.cmd = shlex.split(VLLM_CLI) + [
            "serve", model_dir, "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "bench",
            "--load-format", "dummy", "--skip-tokenizer-init", "--dtype", args.dtype,
            "--max-model-len", str(args.input_len + args.output_len), "--max-num-seqs", str(max(args.concurrency)),
            *extra, *shlex.split(args.serve_args or "")]
        if args.enforce_eager:
            self.cmd.append("--enforce-eager")
        env = child_env(cfg)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_healthy(self, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"vllm serve not healthy after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def stop(self) -> None:
        for sig, grace in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        self._log.close()


async def _one_request(session, url: str, prompt: list, output_len: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 1.0,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    t0 = time.perf_counter()
    first = last = None
    tokens = chunks = 0
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:500]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or ():
                if choice.get("token_ids"):  # a chunk can carry several tokens when the client falls behind
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
    if tokens != output_len:
        raise RuntimeError(f"a request returned {tokens} tokens, expected {output_len} (ignore_eos)")
    return {"ttft": first - t0, "tpot": (last - first) / max(1, tokens - 1), "latency": last - t0, "tokens": tokens,
            "chunks": chunks}


async def _level(url: str, concurrency: int, n_requests: int, input_len: int, output_len: int, vocab: int,
                 seed: int) -> dict:
    import aiohttp

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(input_len)] for _ in range(n_requests)]
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def bounded(p):
            async with sem:
                return await _one_request(session, url, p, output_len)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - t0
    ttft = [1000 * r["ttft"] for r in results]
    tpot = [1000 * r["tpot"] for r in results]
    out_tokens = sum(r["tokens"] for r in results)
    # tokens per streamed chunk: 1.0 = every decode step reached the client on its own (TPOT is then exact)
    tokens_per_chunk = out_tokens / max(1, sum(r["chunks"] for r in results))
    return {"requests": n_requests, "wall_s": round(wall, 2), "output_tok_s": round(out_tokens / wall, 1),
            "total_tok_s": round(n_requests * (input_len + output_len) / wall, 1),
            "request_per_s": round(n_requests / wall, 3), "tokens_per_chunk": round(tokens_per_chunk, 2),
            **{f"ttft_ms_{k}": round(f(ttft), 1) for k, f in
               (("mean", statistics.mean), ("median", statistics.median), ("p99", lambda v: _pct(v, 99)))},
            **{f"tpot_ms_{k}": round(f(tpot), 2) for k, f in
               (("mean", statistics.mean), ("median", statistics.median), ("p99", lambda v: _pct(v, 99)))}}


def markdown_table(records: list, model: str) -> str:
    rows = [r for r in records if r["model"] == model]
    if not rows:
        return f"(no serving results for {model})"
    lines = [f"Serving, {model}, input {rows[0]['input_len']} / output {rows[0]['output_len']} (gpu: {rows[0]['gpu']})",
             "", "| config | concurrency | requests | output tok/s | TTFT ms median (p99) | TPOT ms median (p99) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (list(CONFIGS).index(r["config"]) if r["config"] in CONFIGS else 99,
                                         r["concurrency"])):
        lines.append(f"| {r['config']} | {r['concurrency']} | {r['requests']} | {r['output_tok_s']:,.0f} | "
                     f"{r['ttft_ms_median']:.0f} ({r['ttft_ms_p99']:.0f}) | {r['tpot_ms_median']:.1f} "
                     f"({r['tpot_ms_p99']:.1f}) |")
    return "\n".join(lines)


def plot(records: list, model: str, path: str) -> str | None:
    """Bar charts of output tok/s, median TTFT and median TPOT per configuration and concurrency (PNG)."""
    rows = [r for r in records if r["model"] == model]
    if not rows:
        return None
    # one protocol per plot: the lengths of the first record (a JSON may also hold other input / output lengths)
    rows = [r for r in rows if (r["input_len"], r["output_len"]) == (rows[0]["input_len"], rows[0]["output_len"])]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    configs = list(dict.fromkeys(r["config"] for r in rows))
    levels = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / len(configs)
    for ax, (key, label) in zip(axes, (("output_tok_s", "output tokens/s"), ("ttft_ms_median", "TTFT median (ms)"),
                                       ("tpot_ms_median", "TPOT median (ms)"))):
        for i, cfg in enumerate(configs):
            by_c = {r["concurrency"]: r[key] for r in rows if r["config"] == cfg}
            xs = [j + i * width for j, c in enumerate(levels) if c in by_c]
            ax.bar(xs, [by_c[c] for c in levels if c in by_c], width, label=cfg)
        ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(levels))], [f"C={c}" for c in levels])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"vllm serve, {model}, {rows[0]['input_len']} in / {rows[0]['output_len']} out ({rows[0]['gpu']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(args) -> None:
    records = load_results(args.out)["records"]
    print(markdown_table(records, args.model), flush=True)
    png = plot(records, args.model, os.path.splitext(args.out)[0] + f"_{args.model}.png")
    if png:
        log(f"plot: {png}")


def run(args) -> int:
    base = None if args.report_only else resolve_model(args.model)
    if os.path.isdir(args.model):  # records are keyed by the folder's name
        args.model = os.path.basename(os.path.normpath(args.model))
    if args.report_only:
        report(args)
        return 0
    configs = parse_configs(args.configs)
    with open(os.path.join(base, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    gpu = gpu_name()
    data = load_results(args.out)
    data["runs"].append({"command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
                         "gpu": gpu, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    save_results(args.out, data)
    t_start = time.time()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="qserve-serve-") as tmp:
        for cfg in configs:
            done = {(r["config"], r["concurrency"]) for r in load_results(args.out)["records"]
                    if (r["model"], r["input_len"], r["output_len"]) == (args.model, args.input_len, args.output_len)}
            todo = [c for c in args.concurrency if (cfg.name, c) not in done]
            if not todo:
                log(f"serve {cfg.name}: all concurrencies already in {args.out}")
                continue
            if cfg.gpu_only and gpu.startswith("cpu"):
                log(f"serve {cfg.name}: skipped, vLLM runs it on CUDA GPUs only")
                continue
            if args.deadline_s and time.time() - t_start + args.start_estimate_s > args.deadline_s:
                log(f"serve {cfg.name}: not started (deadline); rerun to resume")
                continue
            model_dir = write_model_folder(base, cfg, os.path.join(tmp, cfg.name))
            log_path = os.path.join(tmp, f"{cfg.name}.log")
            t0 = time.perf_counter()
            server = Server(model_dir, cfg, args, log_path)
            try:
                server.wait_healthy(args.startup_timeout)
                start_s = time.perf_counter() - t0
                log(f"serve {cfg.name}: server up in {start_s:.0f}s")
                asyncio.run(_level(server.url, 4, 4, args.input_len, min(16, args.output_len), vocab, 1)
                            if args.output_len >= 16 else asyncio.sleep(0))  # warm-up
                for c in todo:
                    n = max(c, args.prompts_per_concurrency * c)
                    if args.deadline_s and time.time() - t_start > args.deadline_s:
                        log(f"serve {cfg.name} C={c}: skipped (deadline)")
                        continue
                    res = asyncio.run(_level(server.url, c, n, args.input_len, args.output_len, vocab, seed=c))
                    rec = {"model": args.model, "config": cfg.name, "description": cfg.description,
                           "concurrency": c, "input_len": args.input_len, "output_len": args.output_len,
                           "server_start_s": round(start_s, 1), "gpu": gpu, **res,
                           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
                    data = load_results(args.out)
                    data["records"] = [r for r in data["records"] if not (
                        (r["model"], r["config"], r["concurrency"], r["input_len"], r["output_len"]) ==
                        (args.model, cfg.name, c, args.input_len, args.output_len))] + [rec]
                    save_results(args.out, data)
                    log(f"serve {cfg.name} C={c}: {res['output_tok_s']:.0f} output tok/s, TTFT median "
                        f"{res['ttft_ms_median']:.0f} ms, TPOT median {res['tpot_ms_median']:.1f} ms")
            except Exception as e:  # one configuration failing must not lose the others
                failures += 1
                log(f"serve {cfg.name}: FAILED: {e}\n{server.tail()}")
            finally:
                server.stop()
    report(args)
    return 1 if failures else 0


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="bench_serving", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--configs", default="w4a8kv4-pc,fp8")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 256])
    p.add_argument("--prompts-per-concurrency", type=int, default=2,
                   help="requests per level = this x concurrency (default 2)")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--serve-args", default=None, help="extra `vllm serve` arguments, one string")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--start-estimate-s", type=float, default=120.0)
    p.add_argument("--deadline-s", type=float, default=None)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--report-only", action="store_true", help="print the table and plot from --out, run nothing")
    return p


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
