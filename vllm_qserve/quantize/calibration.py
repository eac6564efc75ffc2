"""Calibration token sequences: windows of a user's text file, or text sampled from the model itself.

The default without a file is self-generated text: every sequence starts at the tokenizer's BOS token (or, for
tokenizers without one, the end-of-text token that separates documents in pre-training) and continues by
sampling from the fp model at temperature 1.  That is the model's own distribution of text -- no data set to
ship or license, no domain chosen for the user -- and it follows the data-free calibration of LLM-QAT.  On a CPU
it costs one generation pass (minutes for a 1B model); a text file of the target domain is better when one exists.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512


def text_file_windows(path: str, tokenizer, n_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                      seed: int = 0) -> torch.Tensor:
    """n_samples windows of seq_len tokens at random (seeded) offsets of the tokenized file: [n, seq_len]."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"calibration file {path} has {ids.numel()} tokens, fewer than one window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def start_token(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start self-generated calibration text "
                     "from; pass --calib with a text file")


@torch.no_grad()
def self_generated(model, tokenizer, n_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                   seed: int = 0, batch_size: int = 16, temperature: float = 1.0) -> torch.Tensor:
    """[n, seq_len] tokens sampled from ``model`` (a CausalLM of vllm_qserve.quantize.model), KV-cached."""
    first = start_token(tokenizer)
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    dev = model.lm_head.weight.device
    with tqdm(total=n_samples * (seq_len - 1), desc="generating calibration text", unit="tok") as bar:
        for b0 in range(0, n_samples, batch_size):
            b = min(batch_size, n_samples - b0)
            ids = torch.full((b, 1), first, dtype=torch.long, device=dev)
            cache = _KVCache(model)
            logits = cache.step(ids, 0)
            for t in range(1, seq_len):
                probs = torch.softmax(logits[:, -1].double() / temperature, -1).cpu()
                nxt = torch.multinomial(probs, 1, generator=g).to(dev)
                ids = torch.cat([ids, nxt], 1)
                if t < seq_len - 1:
                    logits = cache.step(nxt, t)
                bar.update(b)
            out.append(ids.cpu())
    print(f"[quantize] calibration: {n_samples} x {seq_len} tokens sampled from the model (start token {first})",
          file=sys.stderr)
    return torch.cat(out)


class _KVCache:
    """Incremental decoding for the quantizer's model: keys/values of past positions appended per layer."""

    def __init__(self, model):
        self.model = model
        self.k = [None] * len(model.layers)
        self.v = [None] * len(model.layers)

    def step(self, ids: torch.Tensor, pos0: int) -> torch.Tensor:
        m = self.model
        h = m.embed(ids)
        b, t = ids.shape
        pos = torch.arange(pos0, pos0 + t, device=ids.device).expand(b, -1)
        cos, sin = m.rope(pos, h.dtype)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            q, k, v = attn.qkv(layer.input_layernorm(h), cos, sin)
            self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], 2)
            self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], 2)
            h = layer.add_attention(h, attn.o_proj(attn.attend(q, self.k[i], self.v[i])))
            h = layer.mlp_block(h)
        return m.head(h)
