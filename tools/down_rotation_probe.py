"""Would an online Hadamard rotation of down_proj's input pay for a per-channel W4A8 model?  A simulation probe.

QServe's format rotates only what folds into the weights (the residual stream, each head's V / o_proj input); the
MLP's intermediate activation (SiLU(gate) * up) cannot be rotated offline, so down_proj's per-channel 4-bit grid sees
its input channels as they are.  This probe runs the QoQ recipe on a model whose MLP computes
``down((SiLU(gate) * up) R)`` with ``down.weight <- down.weight R`` (R orthogonal: an exact re-parametrisation in
real arithmetic, but R would have to be applied *online* by the serving kernels -- not part of QServe's format), and
scores W4A8 (16-bit KV), W4A8KV4 and W4A16 perplexity in the PyTorch simulation of the served numerics.

    python tools/down_rotation_probe.py <model .gguf or HF folder> --variant base          # the default recipe
    python tools/down_rotation_probe.py <model> --variant base_nosmooth                     # no up -> down smoothing
    python tools/down_rotation_probe.py <model> --variant rot128                            # block Hadamard, 128
    python tools/down_rotation_probe.py <model> --variant rotfull                           # one Hadamard (or random
                                                                                            # orthogonal) matrix
Rotated variants cannot smooth up -> down (the scale would have to pass through R), hence base_nosmooth.  Per-channel
grid, calibration on 64 x 512 tokens of WikiText-2 validation, key centring off, fp32 on the CPU; results in
docs/accuracy.md (SmolLM2-135M, session 11).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import torch

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "wikitext-2")
VARIANTS = ("base", "base_nosmooth", "rot128", "rotfull")


def rotate_down_inputs(lm, block: int) -> None:
    """down((SiLU(gate) * up) R) with down.weight <- down.weight R, R block-diagonal with blocks of `block`."""
    from vllm_qserve.quantize.hadamard import orthogonal_rotation
    from vllm_qserve.quantize.model import MLP

    inter = lm.arch.intermediate_size
    if inter % block:
        raise ValueError(f"intermediate size {inter} is not a multiple of the rotation block {block}")
    rot = torch.block_diag(*[orthogonal_rotation(block)] * (inter // block)).float()
    for layer in lm.layers:
        layer.mlp.down_proj.weight.data = layer.mlp.down_proj.weight.data @ rot

    def forward(self, x):
        return self.down_proj((self.act(self.gate_proj(x)) * self.up_proj(x)) @ rot)

    MLP.forward = forward  # this process only: the probe's model is the only MLP user


def main() -> None:
    from transformers import AutoTokenizer

    from vllm_qserve.evaluate import eval_windows, nll_torch, read_eval_text
    from vllm_qserve.quantize import calibration
    from vllm_qserve.quantize.model import CausalLM
    from vllm_qserve.quantize.pipeline import load_source
    from vllm_qserve.quantize.qoq import QoQOptions, quantize_qoq
    from vllm_qserve.quantize.simulate import kv_fake_quant

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--variant", choices=VARIANTS, default="base")
    ap.add_argument("--windows", type=int, default=8, help="test windows of --seq-len tokens")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--data", default=os.path.join(DATA, "wiki.test.raw"))
    ap.add_argument("--calib", default=os.path.join(DATA, "wiki.valid.tokens"))
    ap.add_argument("--json", help="write the three perplexities here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sd, cfg, tok_dir = load_source(args.model, tmp)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    lm = CausalLM(sd, cfg)
    del sd
    if args.variant.startswith("rot"):
        rotate_down_inputs(lm, 128 if args.variant == "rot128" else lm.arch.intermediate_size)
    ids = calibration.text_file_windows(args.calib, tokenizer, 64, 512, 0)
    opts = QoQOptions(weight_bits=4, group_size=-1, kv_bits=16, smooth_up_down=args.variant == "base")
    quantize_qoq(lm, ids, opts)
    windows = eval_windows(tokenizer, read_eval_text(args.data), args.seq_len, args.windows)

    results = {}

    def score(name):
        nll, n = nll_torch(lm, windows)
        results[name] = math.exp(nll / n)
        print(f"{args.variant} {name}: {results[name]:.3f}", flush=True)

    score("w4a8_kv16")
    lm.set_kv_hook(kv_fake_quant(4))
    score("w4a8_kv4")
    lm.set_kv_hook(None)
    for mod in lm.modules():
        if hasattr(mod, "act_bits"):
            mod.act_bits = None  # the same quantized weights with unquantized activations
    score("w4a16_kv16")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"variant": args.variant, **results}, f, indent=1)


if __name__ == "__main__":
    main()
