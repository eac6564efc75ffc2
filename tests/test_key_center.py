"""Key centring (vllm_qserve/reference/key_center.py): the KV cache holds RoPE_p(k - m) and R_p m is added back
after dequantization.  Exact in real arithmetic; with m = the mean pre-RoPE key it leaves constant key channels
(Qwen2.5's k_proj bias) out of the 4-bit range.

* the offset is the model's own RoPE applied to m; token positions of a mixed batch;
* the paged reference attention with centred keys matches fp attention far better than without, on keys with a
  large constant channel pair, and equals it where the cache is exact;
* end to end (slow): `quantize --key-center` writes the centres and the flag, vLLM (CPU) serves the checkpoint with
  the same perplexity as the PyTorch simulation, and centring brings KV4 closer to the 16-bit cache.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from vllm_qserve.reference.key_center import KeyCenter, rope_offset, token_positions
from vllm_qserve.reference.kv import KVCacheLayout, paged_attention, write_kv_cache


def _rope_tables(positions: int, d: int, theta: float = 10000.0):
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().float(), ang.sin().float()  # [P, D/2]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate-half RoPE of x [P, H, D] at positions 0..P-1 (transformers' formula)."""
    c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat([-x2, x1], -1) * s


def test_offset_is_the_models_rope_of_the_centre():
    g = torch.Generator().manual_seed(0)
    h, d, p = 3, 16, 40
    mean = torch.randn(h, d, generator=g) * 50
    cos, sin = _rope_tables(p, d)
    expected = _rope(mean[None].expand(p, h, d), cos, sin)
    torch.testing.assert_close(rope_offset(mean, cos, sin), expected, rtol=1e-5, atol=1e-4)
    center = KeyCenter(mean, torch.cat([cos, sin], -1))
    pos = torch.tensor([7, 0, 39, 7])
    torch.testing.assert_close(center.offset(pos), expected[pos], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="beyond the RoPE table"):
        center.offset(torch.tensor([40]))
    with pytest.raises(ValueError, match="full-head rotary"):
        KeyCenter(mean, torch.cat([cos, sin], -1)[:, :8])


def test_token_positions_of_a_mixed_batch():
    # a decode (seq 10), a 3-token prompt, a 2-token chunk that continues a 5-token context; padding after
    qsl = torch.tensor([0, 1, 4, 6])
    seq_lens = torch.tensor([10, 3, 7])
    assert token_positions(qsl, seq_lens, 6).tolist() == [9, 0, 1, 2, 5, 6]
    assert token_positions(qsl, seq_lens, 4).tolist() == [9, 0, 1, 2]
    assert token_positions(qsl, seq_lens, 8).tolist() == [9, 0, 1, 2, 5, 6, 0, 0]  # padded batch


def _attention_error(center_keys: bool, constant: float, bits: int = 4) -> float:
    """Max |paged KV-cache attention - fp attention| for keys whose channel pair (D/2 - 1, D - 1) carries a large
    constant before RoPE (Qwen2.5-style), a 3-sequence batch (decode, prompt, chunk), block size 16."""
    g = torch.Generator().manual_seed(1)
    hq, h, d, bs = 4, 2, 32, 16
    seq_lens, q_lens = [37, 20, 29], [1, 20, 5]
    cos, sin = _rope_tables(64, d)
    mean = torch.zeros(h, d)
    mean[:, d // 2 - 1], mean[:, d - 1] = constant, -0.6 * constant
    layout = KVCacheLayout(h, d, bs, bits)
    n_blocks = sum((s + bs - 1) // bs for s in seq_lens)
    cache = torch.zeros(n_blocks, 2, bs * h * (d * bits // 8 + 4), dtype=torch.uint8)
    block_table = torch.full((3, 4), 0, dtype=torch.int32)
    center = KeyCenter(mean, torch.cat([cos, sin], -1))
    nxt, queries, expected = 0, [], []
    for b, (s, ql) in enumerate(zip(seq_lens, q_lens)):
        nb = (s + bs - 1) // bs
        block_table[b, :nb] = torch.arange(nxt, nxt + nb)
        nxt += nb
        k = _rope(torch.randn(s, h, d, generator=g) + mean, cos[:s], sin[:s])
        v = torch.randn(s, h, d, generator=g)
        q = torch.randn(ql, hq, d, generator=g)
        pos = torch.arange(s)
        slots = block_table[b, pos // bs].long() * bs + pos % bs
        write_kv_cache(k, v, cache, slots, layout, key_offset=center.offset(pos) if center_keys else None)
        kk, vv = k.repeat_interleave(hq // h, 1), v.repeat_interleave(hq // h, 1)
        logits = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(d)
        causal = torch.arange(s)[None, :] > torch.arange(s - ql, s)[:, None]
        expected.append(torch.einsum("hqk,khd->qhd", logits.masked_fill(causal, -math.inf).softmax(-1), vv))
        queries.append(q)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    out = paged_attention(torch.cat(queries), cache, block_table, torch.tensor(seq_lens), qsl, layout,
                          key_center=center if center_keys else None)
    assert torch.isfinite(out).all()
    return float((out - torch.cat(expected)).abs().max())


def test_centred_keys_survive_a_large_constant_channel():
    plain, centred = _attention_error(False, 60.0), _attention_error(True, 60.0)
    assert centred < 0.5 * plain, (centred, plain)
    # without a constant, centring on m = 0 is the plain cache, and an 8-bit cache is near exact either way
    assert _attention_error(True, 0.0) == pytest.approx(_attention_error(False, 0.0), abs=1e-6)
    assert _attention_error(True, 60.0, bits=8) < 0.05


# --- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def outlier_workspace(tmp_path_factory):
    """The tiny Qwen2 of test_quantize_e2e with Qwen2.5-like constant key channels: a k_proj bias of +-30 on the
    lowest-frequency RoPE pair of every KV head."""
    from safetensors.torch import load_file, save_file

    from tests.test_quantize_e2e import TEXT, tiny_qwen2_dir

    root = tmp_path_factory.mktemp("key-center")
    model = tiny_qwen2_dir(str(root))
    path = os.path.join(model, "model.safetensors")
    sd = load_file(path)
    cfg = json.load(open(os.path.join(model, "config.json")))
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    for i in range(cfg["num_hidden_layers"]):
        bias = sd[f"model.layers.{i}.self_attn.k_proj.bias"].float().view(cfg["num_key_value_heads"], d)
        bias[:, d // 2 - 1] += 30.0
        bias[:, d - 1] -= 20.0
        sd[f"model.layers.{i}.self_attn.k_proj.bias"] = bias.reshape(-1).half()
    save_file(sd, path, metadata={"format": "pt"})
    text = root / "text.txt"
    g = torch.Generator().manual_seed(0)
    words = TEXT.split()
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (6000,), generator=g)))
    return {"root": str(root), "model": model, "text": str(text)}


@pytest.mark.slow
def test_key_centred_checkpoint_through_vllm(outlier_workspace, tmp_path):
    from safetensors.torch import load_file

    from tests.test_quantize_e2e import _eval_cli, _quantize

    ws = outlier_workspace
    centred = _quantize(ws, "qoq-centred", "--group-size", "-1", "--key-center")
    plain = _quantize(ws, "qoq-plain", "--group-size", "-1")
    qcfg = json.load(open(os.path.join(centred, "config.json")))["quantization_config"]
    assert qcfg["key_center"] is True
    tensors = load_file(os.path.join(centred, "model.safetensors"))
    m = tensors["model.layers.0.self_attn.attn.k_center"].view(2, -1)
    assert m.shape == (2, 64) and float(m[:, 31].min()) > 20 and float(m[:, 63].max()) < -10, m[:, [31, 63]]
    assert "key_center" not in json.load(open(os.path.join(plain, "config.json")))["quantization_config"]

    args = ("--data", ws["text"], "--seq-len", "256", "--max-windows", "6")
    served = _eval_cli(tmp_path, "--model", centred, *args, "--dtype", "float32")
    sim = _eval_cli(tmp_path, "--model", centred, *args, "--backend", "torch")
    assert served["kv_cache_dtype_resolved"] == "int4_per_token_head" and sim["kv_bits"] == 4
    # vLLM (our PyTorch KV backend, keys centred) computes what the simulation computes
    assert math.isclose(served["ppl"], sim["ppl"], rel_tol=0.01), (served["ppl"], sim["ppl"])

    # centring is what brings KV4 back to the 16-bit cache on keys with constant channels: KL divergence of the
    # next-token distributions against the same checkpoint with a 16-bit cache, with and without its centres (a
    # random model's perplexity is too flat to show it)
    from transformers import AutoTokenizer

    from vllm_qserve.evaluate import eval_windows, load_sim_model, read_eval_text
    from vllm_qserve.quantize.simulate import kv_fake_quant

    windows = eval_windows(AutoTokenizer.from_pretrained(centred), read_eval_text(ws["text"], None), 256, 4)
    ids = torch.tensor(windows)
    model = load_sim_model(centred, 16)[0]
    with torch.no_grad():
        ref = model(ids).float().log_softmax(-1)
        kl = {}
        for name, centres in (("centred", {i: m_i.view(2, 64) for i, m_i in enumerate(
                [tensors[f"model.layers.{i}.self_attn.attn.k_center"] for i in range(2)])}), ("plain", None)):
            model.set_kv_hook(kv_fake_quant(4, centres, model.rope))
            out = model(ids).float().log_softmax(-1)
            kl[name] = float((ref.exp() * (ref - out)).sum(-1).mean())
    assert kl["centred"] < 0.5 * kl["plain"], kl


@pytest.mark.slow
def test_every_centred_attention_call_in_the_engine(outlier_workspace):
    """Inside vLLM (CPU): every attention call of a key-centred checkpoint -- prompt chunks, continuations over
    cached context, decodes, mixed batches -- equals SDPA over the raw keys the engine wrote, centred, fake-quantized
    and un-centred by an independent RoPE of the centre (tests/kv_attention_probe.py); and a prefix-cache hit (blocks
    of centred keys, reused) gives the same tokens and log-probabilities as the first run."""
    from tests.test_kv_cache_e2e import PROBE_RTOL, run_probe
    from tests.test_quantize_e2e import _quantize
    from tests.test_vllm_cpu_e2e import run_vllm

    ckpt = _quantize(outlier_workspace, "qoq-centred", "--group-size", "-1", "--key-center")
    g = torch.Generator().manual_seed(3)
    vocab = json.load(open(os.path.join(ckpt, "config.json")))["vocab_size"]
    prompts = [torch.randint(3, vocab, (37 + 5 * i,), generator=g).tolist() for i in range(3)]
    res = run_probe(model=ckpt, prompts=prompts, max_tokens=6, engine_kwargs={
        "block_size": 32, "max_num_batched_tokens": 24, "enable_chunked_prefill": True})
    assert res["prefill_calls"] >= 2 and res["decode_calls"] >= 2 * 5, res
    assert res["centred_calls"] == res["calls"], res
    assert res["worst"] < PROBE_RTOL, res

    out = run_vllm(model=ckpt, prompts=prompts, max_tokens=12, logprobs=3, rounds=2,
                   engine_kwargs={"enable_prefix_caching": True, "block_size": 16})
    assert out["rounds"][0] == out["rounds"][1], "a prefix-cache hit changed the result"
