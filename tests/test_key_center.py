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


# --- CUDA ------------------------------------------------------------------------------------------------------

def _cuda_kv_ops():
    from vllm_qserve import attention_ops, ops

    return torch.cuda.is_available() and ops.HAS_CUDA_OPS and attention_ops.HAS_KV_OPS


@pytest.mark.skipif(not _cuda_kv_ops(), reason="needs a CUDA GPU and vllm_qserve._C's KV ops")
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_kernel_class_centres_keys(dtype, window):
    """CudaKVKernel with a key centre: the write subtracts R_p m, attention (every request the prefill way, as the
    metadata builder routes key-centred checkpoints) adds it back after dequantization; sliding-window cuts start
    at the right position.  Against the PyTorch reference on the same inputs; the same cache read without the centre
    is far off (the check can fail)."""
    pytest.importorskip("vllm")
    from vllm_qserve.attention.backend import QServeKVMetadata, QServePrefillMetadata
    from vllm_qserve.attention.kernels import CudaKVKernel, KVSpec

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(20261124)
    h, hq, d, bs, bits = 2, 8, 128, 16, 4
    seq_lens, q_lens = [300, 45, 1, 200, 64, 130], [1, 1, 1, 200, 20, 7]
    cos, sin = _rope_tables(512, d)
    table = torch.cat([cos, sin], -1).to(dev)
    mean = torch.randn(h, d, device=dev, generator=g)
    mean[:, d // 2 - 1], mean[:, d - 1] = 120.0, -80.0  # Qwen2.5-like constant pair, lowest RoPE frequency
    center = KeyCenter(mean, table)
    layout = KVCacheLayout(h, d, bs, bits)
    n_blocks = sum((s + bs - 1) // bs for s in seq_lens) + 4
    perm = torch.randperm(n_blocks, device=dev, generator=g).int()
    bt = torch.zeros(len(seq_lens), max((s + bs - 1) // bs for s in seq_lens), dtype=torch.int32, device=dev)
    cache = torch.zeros(n_blocks, 2, layout.page_bytes, dtype=torch.uint8, device=dev)
    cache_ref = cache.clone()
    kernel = CudaKVKernel(KVSpec(hq, h, d, bits, dtype, "cuda", key_center=True))
    used = 0
    for b, s in enumerate(seq_lens):
        nb = (s + bs - 1) // bs
        bt[b, :nb] = perm[used:used + nb]
        used += nb
        pos = torch.arange(s, device=dev)
        raw = torch.randn(s, h, d, device=dev, generator=g) * 2 + mean
        k = _rope(raw, cos[:s].to(dev), sin[:s].to(dev)).to(dtype)
        v = torch.randn(s, h, d, device=dev, generator=g).to(dtype)
        slots = bt[b, pos // bs].long() * bs + pos % bs
        kernel.write(k, v, cache, slots, key_offset=center.offset(pos))
        centred = (k.float() - center.offset(pos)).to(dtype)
        torch.ops.qserve.kv_cache_write(centred, v, cache_ref, slots, h, bits)
    assert torch.equal(cache, cache_ref), "the write did not store the op's codes of k - R_p m"

    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    cu_k = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(sl, 0)
    prefill = QServePrefillMetadata(block_table=bt, seq_lens=sl.to(dev), cu_seqlens_q=qsl.to(dev),
                                    cu_seqlens_k=cu_k.to(dev), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
                                    total_kv_tokens=int(cu_k[-1]), seq_lens_cpu=sl,
                                    query_lens_cpu=torch.tensor(q_lens, dtype=torch.int32))
    md = QServeKVMetadata(num_actual_tokens=int(qsl[-1]), num_decodes=0, num_decode_tokens=0,
                          num_prefills=len(seq_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
                          query_start_loc=qsl.to(dev), seq_lens=sl.to(dev), block_table=bt,
                          slot_mapping=torch.zeros(0, device=dev), prefill=prefill)
    query = (torch.randn(int(qsl[-1]), hq, d, device=dev, generator=g) * 0.3).to(dtype)
    scale = d ** -0.5
    out = torch.full_like(query, float("nan"))
    kernel.attend(query, cache, md, scale, out, sliding_window=window, key_center=center)
    expect = paged_attention(query.float(), cache, bt, sl.to(dev), qsl.to(dev), layout, scale,
                             sliding_window=window, key_center=center)
    assert not out.isnan().any(), "an output was not written"
    tol = 0.02 * float(expect.abs().max()) + 1e-3
    err = float((out.float() - expect).abs().max())
    assert err <= tol, f"centred keys: max error {err} (tolerance {tol})"
    uncentred = torch.empty_like(out)
    kernel.attend(query, cache, md, scale, uncentred, sliding_window=window, key_center=None)
    assert float((uncentred.float() - expect).abs().max()) > 3 * tol, "the centre made no difference"

    md.num_decodes = md.num_decode_tokens = 1  # a decode batch must never skip the centre
    with pytest.raises(ValueError, match="key-centred layer got decode requests"):
        kernel.attend(query, cache, md, scale, out, key_center=center)


@pytest.mark.slow
@pytest.mark.skipif(not _cuda_kv_ops(), reason="needs a CUDA GPU and vllm_qserve._C's KV ops")
def test_key_centred_checkpoint_on_the_gpu(outlier_workspace, tmp_path):
    """vLLM on the GPU (fp16, compiled, piecewise CUDA graphs) serves a key-centred KV4 checkpoint: its perplexity
    (prompt log-probabilities: the prefill path) is the simulation's, and greedy generation (decode steps, which
    take the dequantize path too) follows the CPU reference of the same checkpoint up to near-ties."""
    from tests.test_quantize_e2e import _eval_cli, _quantize
    from tests.test_vllm_cpu_e2e import greedy_steps_until_divergence, run_vllm
    from vllm_qserve.evaluate import load_sim_model

    ckpt = _quantize(outlier_workspace, "qoq-centred", "--group-size", "-1", "--key-center")
    args = ("--data", outlier_workspace["text"], "--seq-len", "256", "--max-windows", "6")
    share = os.environ.get("VLLM_QSERVE_TEST_GPU_MEMORY_UTILIZATION")  # tests/vllm_runner.py
    served = _eval_cli(tmp_path, "--model", ckpt, *args, "--dtype", "float16",
                       *(("--gpu-memory-utilization", share) if share else ()))
    sim = _eval_cli(tmp_path, "--model", ckpt, *args, "--backend", "torch")
    assert served["kv_cache_dtype_resolved"] == "int4_per_token_head"
    assert math.isclose(served["ppl"], sim["ppl"], rel_tol=0.02), (served["ppl"], sim["ppl"])

    model, _ = load_sim_model(ckpt, dtype=torch.float32, device="cpu")
    vocab = json.load(open(os.path.join(ckpt, "config.json")))["vocab_size"]
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 40, 75)]
    out = run_vllm(model=ckpt, prompts=prompts, max_tokens=32, dtype="float16", enforce_eager=False,
                   engine_kwargs={"block_size": 16, "max_num_batched_tokens": 64})
    compared = greedy_steps_until_divergence(model, prompts, out["generations"], tol=0.6)
    assert compared >= 24, f"only {compared} greedy steps equal the reference"


def test_key_centred_checkpoints_take_no_decode_kernel_and_no_full_cuda_graphs():
    """The CUDA decode kernel does not add the centre: for a key-centred checkpoint the metadata builder reports no
    full-CUDA-graph support (vLLM then captures piecewise graphs) and its decode routing is off; other checkpoints
    keep uniform single-token decode graphs."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_qserve.attention.backend import QServeKVMetadataBuilder, _key_centred
    from vllm_qserve.config import QServeConfig

    def cfg(key_center):
        return SimpleNamespace(quant_config=QServeConfig(group_size=-1, kv_bits=4, key_center=key_center))

    assert _key_centred(cfg(True)) and not _key_centred(cfg(False))
    assert not _key_centred(SimpleNamespace(quant_config=None))  # unquantized model on the qserve KV backend
    assert QServeKVMetadataBuilder.get_cudagraph_support(cfg(True), None) == AttentionCGSupport.NEVER
    assert (QServeKVMetadataBuilder.get_cudagraph_support(cfg(False), None)
            == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)


@pytest.mark.parametrize("centred", [True, False])
def test_builder_routes_every_request_of_a_key_centred_checkpoint_the_prefill_way(centred):
    """A mixed batch (2 decodes, then a prompt and a chunk): with key centring no request is a decode and the
    prefill metadata covers all four from query token 0; without it the decodes stay decodes."""
    pytest.importorskip("vllm")
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_qserve.attention.backend import QServeKVMetadataBuilder

    q_lens, seq_lens = [1, 1, 6, 3], [10, 4, 6, 9]
    qsl = torch.tensor([0, 1, 2, 8, 11], dtype=torch.int32)
    cm = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl.clone(),
                                 seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=4, num_actual_tokens=11,
                                 max_query_len=6, max_seq_len=10, block_table_tensor=torch.arange(8).view(4, 2),
                                 slot_mapping=torch.arange(11))
    builder = QServeKVMetadataBuilder.__new__(QServeKVMetadataBuilder)  # build() needs no engine state
    builder.no_decodes = centred
    md = builder.build(0, cm)
    first = 0 if centred else 2
    assert (md.num_decodes, md.num_decode_tokens, md.num_prefills) == (first, first, 4 - first)
    p = md.prefill
    assert p.cu_seqlens_q.tolist() == (qsl[first:] - qsl[first]).tolist()
    assert p.seq_lens_cpu.tolist() == seq_lens[first:] and p.query_lens_cpu.tolist() == q_lens[first:]
    assert p.cu_seqlens_k.tolist() == [0, *torch.tensor(seq_lens[first:]).cumsum(0).tolist()]
    assert p.total_kv_tokens == sum(seq_lens[first:]) and p.max_query_len == max(q_lens[first:])
    assert torch.equal(p.block_table, cm.block_table_tensor[first:])


def test_a_compilation_config_that_captures_the_centred_write_is_refused():
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from vllm.config import CUDAGraphMode

    from vllm_qserve.attention.backend import check_centred_write_outside_graphs

    def cfg(mode, kv_update_split):
        return SimpleNamespace(compilation_config=SimpleNamespace(
            cudagraph_mode=mode, splitting_ops_contain_kv_cache_update=lambda: kv_update_split))

    with pytest.raises(ValueError, match="needs the KV-cache update outside CUDA graphs"):
        check_centred_write_outside_graphs(cfg(CUDAGraphMode.PIECEWISE, False), "cuda:0")
    check_centred_write_outside_graphs(cfg(CUDAGraphMode.PIECEWISE, True), "cuda:0")  # vLLM's default
    check_centred_write_outside_graphs(cfg(CUDAGraphMode.NONE, False), "cuda")  # eager
    check_centred_write_outside_graphs(cfg(CUDAGraphMode.PIECEWISE, False), "cpu")  # no CUDA graphs on CPU
