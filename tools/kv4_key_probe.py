"""Where a KV4 cache hurts a model: perplexity of an fp checkpoint with only its keys, or only its values, cached in
4 bits (QServe's per-token-and-head asymmetric KV4), with and without SmoothAttention at fixed alphas, a per-head
Hadamard rotation after RoPE (--hadamard), and the mean pre-RoPE key removed in the rotating frame (RoPE_p(k - m)
cached, R_p m added back after dequantization: exact, see docs/accuracy.md).

    vllm-qserve quantize --model Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf --output fp-ckpt --group-size -1 --method none
    python tools/kv4_key_probe.py fp-ckpt --seq-len 512 --windows 3

Runs the PyTorch simulation (vllm_qserve.evaluate.load_sim_model) on the CPU in fp32; the key statistics (max |key|,
mean key) come from WikiText-2 *validation* windows, the perplexity from the first test windows.  Prints one line
per variant and the per-layer max |key| against the median channel's max.
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
    from vllm_qserve.quantize.hadamard import orthogonal_rotation
    from vllm_qserve.quantize.model import rotate_half
    from vllm_qserve.reference.kv import dequantize_kv, quantize_kv

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--data", default=os.path.join(DATA, "wiki.test.raw"))
    ap.add_argument("--calib", default=os.path.join(DATA, "wiki.valid.tokens"))
    ap.add_argument("--alphas", default="0.5,0.75,1.0")
    ap.add_argument("--hadamard", action="store_true", help="also the Hadamard-rotated keys (no better: see "
                    "docs/accuracy.md)")
    ap.add_argument("--skip-baselines", action="store_true", help="only the mean-removed variants")
    ap.add_argument("--only-pairs", action="store_true", help="only the top-pairs variants")
    ap.add_argument("--pairs", default="4,8", help="centre only each KV head's N largest RoPE pairs (comma list)")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    test = eval_windows(tok, read_eval_text(args.data, None), args.seq_len, args.windows)
    with open(args.calib) as f:
        calib = eval_windows(tok, f.read(), args.seq_len, 2)

    def fake_kv4(x):
        return dequantize_kv(*quantize_kv(x, 4)).to(x.dtype)

    def fake_kv4_rotated(x):
        """Keys cached as H k in 4 bits, H an orthonormal Hadamard matrix over head_dim (queries rotated alike:
        (H q) . (H k) = q . k, so H^T applied back here is the same attention)."""
        h = orthogonal_rotation(x.shape[-1]).to(x.dtype)
        return fake_kv4(x @ h.T) @ h

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

    def key_means(m):
        """Mean pre-RoPE key [Hkv, D] of every layer over the calibration windows (k_proj output, bias included)."""
        sums, hooks = {}, []
        for i, layer in enumerate(m.layers):
            def h(_mod, _inp, out, i=i):
                sums[i] = sums.get(i, 0) + out.detach().reshape(-1, out.shape[-1]).double().sum(0)
            hooks.append(layer.self_attn.k_proj.register_forward_hook(h))
        with torch.no_grad():
            for c in calib:
                m(torch.tensor([c]))
        for hk in hooks:
            hk.remove()
        a = m.layers[0].self_attn.arch
        return {i: (s / (len(calib) * len(calib[0]))).float().view(a.num_kv_heads, a.head_dim) for i, s in sums.items()}

    def mean_removed(model, means, quant_values):
        """4-bit keys cached as RoPE_p(k - m) (m: the layer's mean pre-RoPE key), m added back after dequantization
        in the rotating frame: RoPE_p(k) = RoPE_p(k - m) + R_p m exactly, so only the informative part is quantized."""
        def hook(i, k, v):
            t = k.shape[2]
            cos, sin = model.rope(torch.arange(t)[None], k.dtype)  # [1, T, D]
            mm = means[i][None, :, None, :]  # [1, Hkv, 1, D]
            rm = mm * cos[:, None] + rotate_half(mm) * sin[:, None]
            return fake_kv4(k - rm) + rm, (fake_kv4(v) if quant_values else v)
        return hook

    def top_pairs(means, k):
        """The centres with only each KV head's k largest RoPE pairs kept (still exact: any m is)."""
        out = {}
        for i, m in means.items():
            h, d = m.shape
            mag = m[:, : d // 2].pow(2) + m[:, d // 2:].pow(2)
            keep = torch.zeros_like(mag, dtype=torch.bool).scatter_(1, mag.topk(min(k, d // 2), dim=1).indices, True)
            out[i] = m * keep.repeat(1, 2)
        return out

    def ppl(name, hook, alpha=None, remove_mean=False, quant_values=False, pairs=None):
        m, _ = load_sim_model(args.checkpoint, 16, dtype=torch.float32)
        if alpha is not None:
            for i, layer in enumerate(m.layers):
                T.smooth_attention(layer, T.smooth_attention_scale(key_absmax[i], alpha))
        if remove_mean:
            means = key_means(m)
            hook = mean_removed(m, top_pairs(means, pairs) if pairs else means, quant_values)
        m.set_kv_hook(hook)
        nll, n = nll_torch(m, test)
        print(f"{name:<32} perplexity {math.exp(nll / n):.3f}", flush=True)
        del m
        gc.collect()

    if not (args.skip_baselines or args.only_pairs):
        ppl("16-bit keys and values", lambda i, k, v: (k, v))
        ppl("4-bit keys", lambda i, k, v: (fake_kv4(k), v))
        ppl("4-bit values", lambda i, k, v: (k, fake_kv4(v)))
        for alpha in (float(a) for a in args.alphas.split(",")):
            ppl(f"4-bit keys, SmoothAttention {alpha}", lambda i, k, v: (fake_kv4(k), v), alpha)
    if args.hadamard:
        ppl("4-bit keys, Hadamard", lambda i, k, v: (fake_kv4_rotated(k), v))
        for alpha in (float(a) for a in args.alphas.split(",")):
            ppl(f"4-bit keys, SA {alpha} + Hadamard", lambda i, k, v: (fake_kv4_rotated(k), v), alpha)
    if not args.only_pairs:
        ppl("4-bit keys, mean removed", None, remove_mean=True)
        for alpha in (float(a) for a in args.alphas.split(",")):
            ppl(f"4-bit keys, SA {alpha} + mean removed", None, alpha, remove_mean=True)
        ppl("4-bit keys and values, mean removed", None, remove_mean=True, quant_values=True)
    for k in (int(x) for x in args.pairs.split(",") if x):
        ppl(f"4-bit K and V, mean of top {k} pairs", None, remove_mean=True, quant_values=True, pairs=k)
    print("layer: max |key| / median channel max:",
          {i: f"{float(a.max()):.1f}/{float(a.amax(0).median()):.1f}" for i, a in sorted(key_absmax.items())})


if __name__ == "__main__":
    main()
