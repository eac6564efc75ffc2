"""Runs a vLLM engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), records every call the qserve KV
backend gets (cache writes and attention), and checks each attention output against an independent computation:
the raw (unquantized) K/V the engine wrote, looked up through vLLM's own block table and slot numbering, passed
through tests/hf_reference.fake_quant_kv, then causal SDPA.  Nothing of vllm_qserve's layout or reference code is
used on the checking side.

    python tests/kv_attention_probe.py '{"model": DIR, "prompts": [[ids...]], "max_tokens": 6, "engine_kwargs": {}}'
prints "PROBE_JSON {...}" with the number of attention calls checked and the worst difference (relative to the
largest output of the call).
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rope_of_center(mean, theta, positions):
    """RoPE_p(m) for a key centre m [H, D] (rotate-half, base theta), from its definition, in fp32 with the
    rounding of vLLM's RoPE table (inv_freq, then position * inv_freq), so that a 4-bit code at a rounding
    boundary falls the same way on both sides."""
    import torch

    d = mean.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    ang = torch.einsum("i,j->ij", positions.float(), inv)
    c, sn = ang.cos()[:, None, :], ang.sin()[:, None, :]
    m1, m2 = mean.float()[None, :, : d // 2], mean.float()[None, :, d // 2:]
    return torch.cat([m1 * c - m2 * sn, m2 * c + m1 * sn], -1)  # [n, H, D]


def check_call(raw_k, raw_v, q, out, md, bits, block_size, num_kv_heads, scale, center=None):
    """center: (mean pre-RoPE key [H, D], RoPE base) of a key-centred layer: the cache must hold
    RoPE_p(k) - RoPE_p(m) in 4 bits and the attention add RoPE_p(m) back."""
    import torch
    import torch.nn.functional as F

    from tests.hf_reference import fake_quant_kv

    worst = 0.0
    q, out = q.cpu(), out.cpu()
    qsl, seq_lens, bt = md.query_start_loc.tolist(), md.seq_lens.tolist(), md.block_table.cpu()
    for b in range(len(seq_lens)):
        q0, q1, s = qsl[b], qsl[b + 1], seq_lens[b]
        if q1 == q0:
            continue
        pos = torch.arange(s)
        slots = bt[b, pos // block_size].long() * block_size + pos % block_size
        k = torch.stack([raw_k[int(x)] for x in slots]).cpu()  # [s, H, D]
        v = torch.stack([raw_v[int(x)] for x in slots]).cpu()
        k, v = k.float(), v.float()
        off = rope_of_center(center[0], center[1], pos) if center is not None else torch.zeros_like(k)
        kq = fake_quant_kv((k - off).transpose(0, 1), bits) + off.transpose(0, 1)  # per token and head, over D
        vq = fake_quant_kv(v.transpose(0, 1), bits)
        qq = q[q0:q1].float().transpose(0, 1)  # [Hq, n, D]
        rep = qq.shape[0] // num_kv_heads
        kq, vq = kq.float().repeat_interleave(rep, 0), vq.float().repeat_interleave(rep, 0)
        n = q1 - q0
        mask = torch.arange(s)[None, :] <= torch.arange(s - n, s)[:, None]
        ref = F.scaled_dot_product_attention(qq, kq, vq, attn_mask=mask, scale=scale).transpose(0, 1)
        worst = max(worst, float((out[q0:q1].float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)))
        assert not torch.isnan(out[q0:q1]).any()
    return worst


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    import torch

    from vllm_qserve.attention import backend as backend_mod

    raw = {}  # (layer, slot) -> (k, v): the unquantized values the engine asked to cache
    armed = [False]  # engine start-up (profiling, kernel warm-up, graph capture) runs on dummy metadata
    results = {"calls": 0, "decode_calls": 0, "prefill_calls": 0, "centred_calls": 0, "worst": 0.0}
    with open(os.path.join(args["model"], "config.json")) as f:
        cfg = json.load(f)
    rope_theta = float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    orig_update, orig_forward = backend_mod.QServeKVImpl.do_kv_cache_update, backend_mod.QServeKVImpl.forward

    def update(self, layer, key, value, kv_cache, slot_mapping):
        for i, slot in enumerate(slot_mapping.tolist()):
            if slot >= 0:
                raw[(layer.layer_name, slot)] = (key[i].clone(), value[i].clone())
        return orig_update(self, layer, key, value, kv_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, md, output, *a, **kw):
        r = orig_forward(self, layer, query, key, value, kv_cache, md, output, *a, **kw)
        if md is None or not armed[0]:
            return r
        block_size = self.kernel.layout(kv_cache.view(torch.uint8)).block_size
        name = layer.layer_name
        raw_k = {s: kv[0] for (ln, s), kv in raw.items() if ln == name}
        raw_v = {s: kv[1] for (ln, s), kv in raw.items() if ln == name}
        t = md.num_actual_tokens
        q = query.view(-1, self.num_heads, self.head_size)[:t]
        out = output.view(-1, self.num_heads, self.head_size)[:t]
        kc = getattr(layer, "qserve_key_center", None)
        center = None if kc is None else (kc.mean.cpu(), rope_theta)
        results["centred_calls"] += center is not None
        worst = check_call(raw_k, raw_v, q, out, md, self.bits, block_size, self.num_kv_heads, self.scale, center)
        results["worst"] = max(results["worst"], worst)
        results["calls"] += 1
        results["decode_calls" if md.max_query_len == 1 else "prefill_calls"] += 1
        return r

    backend_mod.QServeKVImpl.do_kv_cache_update = update
    backend_mod.QServeKVImpl.forward = forward
    from vllm import LLM, SamplingParams

    llm = LLM(model=args["model"], dtype=args.get("dtype", "float32"), max_model_len=256, seed=0, enforce_eager=True,
              skip_tokenizer_init=True, **args.get("engine_kwargs", {}))
    armed[0] = True
    llm.generate([{"prompt_token_ids": p} for p in args["prompts"]],
                 SamplingParams(max_tokens=args.get("max_tokens", 6), temperature=0, ignore_eos=True,
                                detokenize=False))
    print("PROBE_JSON " + json.dumps(results), flush=True)
