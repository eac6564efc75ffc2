"""The QoQ quantizer on Gemma 3 text models (issue 9), on CPU.

* the quantizer's own forward (quantize/model.py) equals transformers' Gemma3ForCausalLM (sandwich norms with
  (1 + w) gains, QK-norm, GeGLU, embedding scale, local/global RoPE bases, sliding window);
* every transform used for Gemma leaves the fp function unchanged (float64): input smoothing into the norm gains,
  SmoothAttention through the QK-norm gains, per-head V/o rotation, v->o and up->down smoothing, reorder; the
  residual rotation is refused, and scaling k_proj's rows (Llama's SmoothAttention) is shown *not* to be exact;
* `vllm-qserve quantize` (QoQ, W4A8KV4) -> vLLM's Gemma3ForCausalLM with the qserve method and the KV4 backend ->
  generate equals transformers' Gemma 3 with simulated W4A8 + KV4 numerics built from the written checkpoint.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.test_kv_cache_e2e import KV4_LOGPROB_TOL
from tests.test_vllm_cpu_e2e import check_against_reference, load_tensors, prompts, run_vllm

TEXT = ("The quick brown fox jumps over the lazy dog. QServe quantizes weights to four bits and activations to eight "
        "bits. Hello world! How are you today? I am fine, thank you. Paris is the capital of France. ")


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    """A tiny random Gemma 3 text model saved as a Hugging Face folder (fp16), with outlier channels."""
    from transformers import Gemma3ForCausalLM

    from vllm_qserve.convert.fixture import build_tokenizer, random_gemma3_state, tiny_gemma3_config

    root = tmp_path_factory.mktemp("gemma3-hf")
    out = str(root / "model")
    tok = build_tokenizer(out)
    config = tiny_gemma3_config(vocab_size=len(tok), layers=2)
    model = Gemma3ForCausalLM(config)
    state = random_gemma3_state(config)
    with torch.no_grad():
        state["model.embed_tokens.weight"][:, :3] *= 10  # residual-stream outliers
        for i in range(config.num_hidden_layers):
            state[f"model.layers.{i}.mlp.up_proj.weight"][:4] *= 8  # down_proj input outliers
            state[f"model.layers.{i}.self_attn.k_norm.weight"][:2] += 4.0  # key outlier channels (after QK-norm)
            state[f"model.layers.{i}.self_attn.k_norm.weight"][128:130] += 4.0  # ... their RoPE partners
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.config.architectures = ["Gemma3ForCausalLM"]
    model.half().save_pretrained(out)
    text = root / "text.txt"
    g = torch.Generator().manual_seed(0)
    words = TEXT.split()
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=g)))
    return {"root": str(root), "model": out, "text": str(text), "config": config}


def _lm(gemma3_dir, dtype=torch.float64):
    from safetensors.torch import load_file

    from vllm_qserve.quantize.model import CausalLM

    sd = {k: v.to(dtype) for k, v in load_file(os.path.join(gemma3_dir["model"], "model.safetensors")).items()}
    cfg = json.load(open(os.path.join(gemma3_dir["model"], "config.json")))
    return CausalLM(sd, cfg).to(dtype), sd, cfg


def _ids(vocab, n=2, length=40):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(5))


def test_quantizer_forward_equals_transformers(gemma3_dir):
    """40 tokens with a 16-token window: local layers really are windowed."""
    from vllm_qserve.quantize.model import hf_reference_model

    lm, sd, cfg = _lm(gemma3_dir)
    assert lm.arch.gemma and lm.arch.layer_window(0) == 16 and lm.arch.layer_window(1) is None
    hf = hf_reference_model(sd, cfg, dtype=torch.float64)
    ids = _ids(cfg["vocab_size"])
    with torch.no_grad():
        ours, theirs = lm(ids), hf(ids).logits
    # transformers' Gemma RMSNorm and RoPE compute in fp32 even in a float64 model (x.float()): fp32-level agreement
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the window matters (so the comparison above checks it): full attention everywhere gives other logits
    for layer in lm.layers:
        layer.self_attn.window = None
    with torch.no_grad():
        assert (lm(ids) - theirs).abs().max() > 1e-4


def test_gemma3_transforms_are_exact(gemma3_dir):
    from vllm_qserve.quantize import transforms as T

    lm, _, cfg = _lm(gemma3_dir)
    a = lm.arch
    ids = _ids(cfg["vocab_size"])
    with torch.no_grad():
        before = lm(ids)
    g = torch.Generator().manual_seed(1)

    def rand_scale(*shape):
        return torch.exp(torch.randn(*shape, generator=g, dtype=torch.float64))

    with pytest.raises(ValueError, match="not exact for Gemma"):
        T.rotate_residual(lm)
    T.rotate_heads(lm, seed=3)
    for layer in lm.layers:
        T.smooth_norm_input(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                     layer.self_attn.v_proj], rand_scale(a.hidden_size))
        T.smooth_norm_input(layer.mlp_input_norm, [layer.mlp.gate_proj, layer.mlp.up_proj], rand_scale(a.hidden_size))
        key_absmax = rand_scale(a.num_kv_heads, a.head_dim)
        T.smooth_attention(layer, T.smooth_attention_scale(T.shared_over_heads(key_absmax), 0.5))
        with pytest.raises(ValueError, match="shared by all KV heads"):
            T.smooth_attention(layer, T.smooth_attention_scale(key_absmax, 0.5))  # per-head: impossible via gains
        T.smooth_v_o(layer, rand_scale(a.num_kv_heads, a.head_dim))
        T.smooth_up_down(layer, rand_scale(a.intermediate_size))
        T.reorder_down(layer, torch.randperm(a.intermediate_size, generator=g))
    with torch.no_grad():
        after = lm(ids)
    torch.testing.assert_close(after, before, rtol=1e-8, atol=1e-8)
    # Llama's SmoothAttention (k_proj rows / lambda) is undone by k_norm and is NOT exact here
    attn = lm.layers[0].self_attn
    lam = T.smooth_attention_scale(rand_scale(a.num_kv_heads, a.head_dim), 0.5).reshape(-1)
    attn.k_proj.weight.data /= lam[:, None]
    attn.q_proj.weight.data *= lam.repeat(a.group)[:, None]
    with torch.no_grad():
        assert (lm(ids) - before).abs().max() > 1e-3


@pytest.mark.slow
def test_qoq_gemma3_through_vllm_matches_reference(gemma3_dir):
    """quantize (QoQ W4A8KV4, per-channel) -> vLLM CPU (qserve method, KV4 backend with sliding windows, no flag)
    -> greedy generation and log-probabilities = transformers' Gemma 3 with the checkpoint's tensors and simulated
    W4A8 + KV4 numerics."""
    from transformers import Gemma3TextConfig

    from vllm_qserve.cli import main

    out = os.path.join(gemma3_dir["root"], "qoq")
    assert main(["quantize", "--model", gemma3_dir["model"], "--output", out, "--calib", gemma3_dir["text"],
                 "--calib-samples", "4", "--calib-seq-len", "64", "--group-size", "-1"]) == 0
    log = json.load(open(os.path.join(out, "quantize_log.json")))
    # rotation skipped (not exact for Gemma), the norm-input smoothing took its place
    assert log["qoq"]["rotate"] is False and log["qoq"]["smooth_inputs"] is True
    assert all("smooth_qkv_alpha" in e and "smooth_gate_up_alpha" in e for e in log["layers"])
    assert all(e["key_absmax_after"] < e["key_absmax_before"] for e in log["layers"])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["quantization_config"]["kv_bits"] == 4
    config = Gemma3TextConfig(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    ps = prompts(config.vocab_size, n=2, length=30, seed=4)
    res = run_vllm(model=out, prompts=ps, max_tokens=8, engine_kwargs={"block_size": 16})
    tensors = load_tensors(out)
    assert "model.layers.0.self_attn.q_norm.weight" in tensors
    print("max |logprob diff|", check_against_reference((out, None, config), res["generations"], ps,
                                                        tol=KV4_LOGPROB_TOL, kv_bits=4))


def test_multimodal_gemma3_language_model_is_extracted(tmp_path):
    """A Gemma3ForConditionalGeneration folder (MedGemma 4B's layout: SigLIP tower, projector, text model) becomes a
    text-only Gemma3ForCausalLM: the quantizer's model of the extracted weights gives the multimodal model's logits
    on text input, and an RTN checkpoint of it validates with the vision tensors left out."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from vllm_qserve.checkpoint import inspect_checkpoint
    from vllm_qserve.convert.fixture import build_tokenizer, tiny_gemma3_config
    from vllm_qserve.quantize.model import CausalLM
    from vllm_qserve.quantize.pipeline import load_source, quantize_model_dir

    src = str(tmp_path / "mm")
    tok = build_tokenizer(src)
    text = tiny_gemma3_config(vocab_size=len(tok), layers=2)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                       image_token_index=len(tok) - 1, boi_token_index=0, eoi_token_index=1)
    torch.manual_seed(0)
    mm = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in mm.named_parameters():
            if "norm" in name and "language_model" in name:
                p.copy_(0.2 * torch.randn_like(p))
    mm.config.architectures = ["Gemma3ForConditionalGeneration"]
    mm.save_pretrained(src)
    sd, out_cfg, _ = load_source(src, str(tmp_path))
    assert out_cfg["model_type"] == "gemma3_text" and out_cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert not any("vision" in k or "projector" in k for k in sd)
    ids = _ids(len(tok) - 2, n=1, length=24)
    lm = CausalLM({k: v.double() for k, v in sd.items()}, out_cfg).double()
    with torch.no_grad():
        want = mm.double()(input_ids=ids).logits
        got = lm(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # transformers' norms run in fp32
    out = quantize_model_dir(src, str(tmp_path / "rtn"), method="rtn", group_size=-1, kv_bits=4)
    cfg_out = json.load(open(os.path.join(out, "config.json")))
    assert cfg_out["architectures"] == ["Gemma3ForCausalLM"] and cfg_out["quantization_config"]["kv_bits"] == 4
    info = inspect_checkpoint(out)
    assert (info.weight_bits, info.group_size) == (4, -1)
    assert not any("vision" in k for k in info.tensors)
