"""Where a KV4 cache hurts a model: perplexity of an fp checkpoint with only its keys, or only its values, cached in
4 bits (QServe's per-token-and-head asymmetric KV4), with and without SmoothAttention at fixed alphas.

    vllm-qserve quantize --model Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf --output fp-ckpt --group-size -1 --method none
    python tools/kv4_key_probe.py fp-ckpt --seq-len 512 --windows 3

Runs the PyTorch simulation (vllm_qserve.evaluate.load_sim_model) on the CPU in fp32; the key statistics come from
WikiText-2 *validation* windows, the perplexity from the first test windows.  Prints one line per variant and the
per-layer max |key| against the median channel's max.
"""

from __future__ import annotations

import argparse
import gc
import math
import os

import torch

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "wikitext-2")


def main() -> None:
    from transformers import AutoTokenizer

    from vllm_qserve.evaluate import eval_windows, load_sim_model, nll_torch, read_eval_text
    from vllm_qserve.quantize import transforms as T
    from vllm_qserve.reference.kv import dequantize_kv, quantize_kv

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--data", default=os.path.join(DATA, "wiki.test.raw"))
    ap.add_argument("--calib", default=os.path.join(DATA, "wiki.valid.tokens"))
    ap.add_argument("--alphas", default="0.5,0.75,1.0")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    test = eval_windows(tok, read_eval_text(args.data, None), args.seq_len, args.windows)
    with open(args.calib) as f:
        calib = eval_windows(tok, f.read(), args.seq_len, 2)

    def fake_kv4(x):
        return dequantize_kv(*quantize_kv(x, 4)).to(x.dtype)

    model, _ = load_sim_model(args.checkpoint, 16, dtype=torch.float32)
    key_absmax = {}

    def observe(i, k, v):
        a = k.abs().amax(dim=(0, 2))  # [Hkv, D]
        key_absmax[i] = torch.maximum(key_absmax[i], a) if i in key_absmax else a
        return k, v

    model.set_kv_hook(observe)
    with torch.no_grad():
        for c in calib:
            model(torch.tensor([c]))
    del model
    gc.collect()

    def ppl(name, hook, alpha=None):
        m, _ = load_sim_model(args.checkpoint, 16, dtype=torch.float32)
        if alpha is not None:
            for i, layer in enumerate(m.layers):
                T.smooth_attention(layer, T.smooth_attention_scale(key_absmax[i], alpha))
        m.set_kv_hook(hook)
        nll, n = nll_torch(m, test)
        print(f"{name:<32} perplexity {math.exp(nll / n):.3f}", flush=True)
        del m
        gc.collect()

    ppl("16-bit keys and values", lambda i, k, v: (k, v))
    ppl("4-bit keys", lambda i, k, v: (fake_kv4(k), v))
    ppl("4-bit values", lambda i, k, v: (k, fake_kv4(v)))
    for alpha in (float(a) for a in args.alphas.split(",")):
        ppl(f"4-bit keys, SmoothAttention {alpha}", lambda i, k, v: (fake_kv4(k), v), alpha)
    print("layer: max |key| / median channel max:",
          {i: f"{float(a.max()):.1f}/{float(a.amax(0).median()):.1f}" for i, a in sorted(key_absmax.items())})


if __name__ == "__main__":
    main()
