"""DeepCompressor output -> QServe checkpoint, on a synthetic DeepCompressor output of a tiny Llama.

The synthetic output is built the way DeepCompressor writes it: random integer codes, scales and zeros per
projection; model.pt holds the fp16 fake-quantized weights s1 * (q - z) (per-channel) or s1 * s2 * (q - z)
(group 128), scale.pt the scales under ``<proj>.weight.scale.0/.1`` and the zero under ``.weight.zero`` (integer)
or ``.weight.scaled_zero``, in DeepCompressor's broadcastable shapes.  The converted checkpoint must give back the
same codes and scales, the level-2 scales in the kernel's order, and weights equal to model.pt's.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from vllm_qserve.convert.deepcompressor import DeepCompressorError, convert_state_dict
from vllm_qserve.packing import permute_s2, unpack_w4, unpermute_s2
from vllm_qserve.reference import dequantize_w4_per_channel, dequantize_w4_per_group

PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


def _shapes(hidden=256, inter=384, heads=4, kv_heads=2):
    d = hidden // heads
    return {"self_attn.q_proj": (heads * d, hidden), "self_attn.k_proj": (kv_heads * d, hidden),
            "self_attn.v_proj": (kv_heads * d, hidden), "self_attn.o_proj": (hidden, heads * d),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def synthetic_dc_output(group_size: int, signed: bool = False, scaled_zero: bool = False, layers: int = 2,
                        seed: int = 0):
    """(model.pt dict, scale.pt dict, truth {proj: (q, s1, s2, z)})."""
    g = torch.Generator().manual_seed(seed)
    model, scales, truth = {}, {}, {}
    hidden, vocab = 256, 64
    model["model.embed_tokens.weight"] = torch.randn(vocab, hidden, generator=g).half()
    model["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).half()
    model["model.norm.weight"] = torch.ones(hidden).half()
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            model[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden).half()
        for proj, (n, k) in _shapes().items():
            name = f"model.layers.{i}.{proj}.weight"
            s1 = (torch.rand(n, generator=g) * 0.01 + 0.001).half().double()
            if group_size == -1:
                z = torch.randint(0, 16, (n,), generator=g).double()
                q = torch.randint(0, 16, (n, k), generator=g).double()
                w = (q - z[:, None]) * s1[:, None]
                s2 = None
            else:
                ng = k // group_size
                s2 = torch.randint(1, 17, (n, ng), generator=g).double()
                z = torch.randint(0, 16, (n, ng), generator=g).double()
                q = torch.randint(0, 16, (n, ng, group_size), generator=g).double()
                # keep (q - z) * s2 inside the protective range, as DeepCompressor's quantizer does
                lo = torch.clamp(z - torch.floor(119 / s2), min=0)
                hi = torch.clamp(z + torch.floor(119 / s2), max=15)
                q = torch.minimum(torch.maximum(q, lo[..., None]), hi[..., None])
                w = ((q - z[..., None]) * s2[..., None]).reshape(n, k) * s1[:, None]
                q = q.reshape(n, k)
            model[name] = w.half()
            truth[name] = (q, s1, s2, z)
            zs = z - 8 if signed else z  # DeepCompressor's signed int4 codes have zero points in [-8, 7]
            scales[f"{name}.scale.0"] = s1.half().view(n, 1, 1, 1)
            if s2 is not None:
                scales[f"{name}.scale.1"] = s2.half().view(n, 1, -1, 1)
            zero_shape = (n, 1, 1, 1) if s2 is None else (n, 1, s2.shape[1], 1)
            if scaled_zero:
                scaled = zs * (s1 if s2 is None else s2)
                scales[f"{name}.scaled_zero"] = scaled.half().view(zero_shape)
            else:
                scales[f"{name}.zero"] = zs.half().view(zero_shape)
    return model, scales, truth


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("variant", ["unsigned", "signed", "scaled_zero"])
def test_round_trip(group_size, variant):
    model, scales, truth = synthetic_dc_output(group_size, signed=variant == "signed",
                                               scaled_zero=variant == "scaled_zero")
    out = convert_state_dict(model, scales, 4, group_size)
    for name, (q, s1, s2, z) in truth.items():
        prefix = name[: -len(".weight")]
        assert torch.equal(unpack_w4(out[f"{prefix}.qweight"]).double(), q), name
        assert torch.equal(out[f"{prefix}.s1_scales"].double(), s1)
        if group_size == -1:
            assert torch.equal(out[f"{prefix}.s1_szeros"], (z * s1).half())
            w = dequantize_w4_per_channel(out[f"{prefix}.qweight"], out[f"{prefix}.s1_scales"],
                                          out[f"{prefix}.s1_szeros"])
        else:
            assert torch.equal(unpermute_s2(out[f"{prefix}.s2_scales"]).t().double(), s2)
            zeros = unpermute_s2(out[f"{prefix}.s2_zeros"]).t().double()
            assert torch.equal(torch.remainder(zeros, 256), torch.remainder(-z * s2, 256))
            w = dequantize_w4_per_group(out[f"{prefix}.qweight"], out[f"{prefix}.s1_scales"],
                                        out[f"{prefix}.s2_scales"], out[f"{prefix}.s2_zeros"])
        # per-channel: s1_szeros = fp16(z * s1) is rounded, so zero weights come back within a rounding of it
        torch.testing.assert_close(w.half().float(), model[name].float(), rtol=2e-3,
                                   atol=1e-3 * float(model[name].abs().max()))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(out[name], model[name])


def test_level2_order_is_the_kernels():
    """Channel n of each 32-block is stored at (n % 8) * 4 + (n % 32) // 8: 0, 8, 16, 24, 1, ... -- not
    DeepCompressor's own packer order 0, 8, 1, 9, ... (which the kernel does not read)."""
    model, scales, truth = synthetic_dc_output(128, layers=1)
    out = convert_state_dict(model, scales, 4, 128)
    name = "model.layers.0.mlp.down_proj.weight"
    s2 = truth[name][2]  # [N, groups]
    stored = out["model.layers.0.mlp.down_proj.s2_scales"].double()  # [groups, N]
    for n in (0, 1, 7, 8, 9, 16, 24, 31, 33, 63):
        p = (n // 32) * 32 + (n % 8) * 4 + (n % 32) // 8
        assert torch.equal(stored[:, p], s2[n]), n
    # DeepCompressor's packer: stored position p holds channel (p // 16) * 16 + (p % 2) * 8 + (p % 16) // 2
    dc_order = torch.tensor([(p // 16) * 16 + (p % 2) * 8 + (p % 16) // 2 for p in range(32)])
    dc_stored = s2.t()[:, torch.cat([dc_order + b for b in range(0, s2.shape[0], 32)])]
    assert not torch.equal(dc_stored, stored)
    assert torch.equal(permute_s2(s2.t().contiguous()), stored)


def test_errors_name_the_problem():
    model, scales, _ = synthetic_dc_output(128, layers=1)
    with pytest.raises(DeepCompressorError, match=r"has level-2 scale .* but --group-size is -1"):
        convert_state_dict(model, scales, 4, -1)
    bad = dict(model)
    name = "model.layers.0.self_attn.o_proj.weight"
    bad[name] = bad[name].clone()
    bad[name][3, 5] += 0.37 * float(scales[f"{name}.scale.0"].view(-1)[3])  # off the grid by a third of a step
    with pytest.raises(DeepCompressorError, match="o_proj.weight: model.pt's weight is not on the grid"):
        convert_state_dict(bad, scales, 4, 128)
    missing = {k: v for k, v in scales.items() if not k.endswith("mlp.up_proj.weight.zero")}
    with pytest.raises(DeepCompressorError, match="up_proj.weight: scale.pt has no zero point"):
        convert_state_dict(model, missing, 4, 128)
    pc_model, pc_scales, _ = synthetic_dc_output(-1, layers=1)
    with pytest.raises(DeepCompressorError, match="has no level-2 scale .* but --group-size is 128"):
        convert_state_dict(pc_model, pc_scales, 4, 128)


@pytest.mark.parametrize("group_size", [-1, 128])
def test_cli_convert_writes_a_loadable_checkpoint(tmp_path, group_size):
    """The `convert` command end to end; the result passes the plugin's own checkpoint validation and computes
    model.pt's function with the reference kernels."""
    from transformers import LlamaConfig

    from vllm_qserve.checkpoint import inspect_checkpoint
    from vllm_qserve.cli import main
    from vllm_qserve.convert.fixture import build_tokenizer

    model, scales, _ = synthetic_dc_output(group_size, signed=True)
    dc = tmp_path / "dc"
    dc.mkdir()
    torch.save(model, dc / "model.pt")
    torch.save(scales, dc / "scale.pt")
    hf = tmp_path / "hf"
    hf.mkdir()
    build_tokenizer(str(hf), vocab_size=64)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=256,
               intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=True)
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "qserve"
    assert main(["convert", "--dc-quant-path", str(dc), "--model", str(hf), "--output", str(out),
                 "--group-size", str(group_size)]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["quantization_config"] == {"quant_method": "qserve", "precision": "w4a8kv4", "weight_bits": 4,
                                              "group_size": group_size, "kv_bits": 4}
    assert written["tie_word_embeddings"] is False  # model.pt's lm_head differs from its embedding
    info = inspect_checkpoint(str(out), LlamaConfig(**written))
    assert (info.weight_bits, info.group_size) == (4, group_size)
    assert os.path.isfile(out / "tokenizer.json")

    from safetensors.torch import load_file

    from vllm_qserve.reference import quantize_per_token, w4a8_per_channel, w4a8_per_group

    t = load_file(str(out / "model.safetensors"))
    x = torch.randn(5, 384)
    xq, sx, xsum = quantize_per_token(x, 1)
    p = "model.layers.1.mlp.down_proj"
    if group_size == -1:
        y = w4a8_per_channel(xq, sx, xsum, t[f"{p}.qweight"], t[f"{p}.s1_scales"], t[f"{p}.s1_szeros"],
                             out_dtype=torch.float32)
        # QServe's per-channel epilogue uses the unquantized sum: x_hat @ W^T + (sum x_hat - sum x) * s1_szeros
        x_hat = xq.double() * sx.double()[:, None]
        expect = x_hat @ model[f"{p}.weight"].double().t() + ((x_hat.sum(1) - x.double().sum(1))[:, None]
                                                             * t[f"{p}.s1_szeros"].double())
    else:
        y = w4a8_per_group(xq, sx, t[f"{p}.qweight"], t[f"{p}.s1_scales"], t[f"{p}.s2_scales"],
                           t[f"{p}.s2_zeros"], out_dtype=torch.float32)
        expect = (xq.double() * sx.double()[:, None]) @ model[f"{p}.weight"].double().t()
    torch.testing.assert_close(y.double(), expect, rtol=2e-3, atol=2e-3 * float(expect.abs().max()))
