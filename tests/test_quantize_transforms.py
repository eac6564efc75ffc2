"""The QoQ quantizer's pieces on tiny random models (CPU, seconds).

* the quantizer's own forward equals transformers' for Llama, Mistral and Qwen2 (q/k/v bias), GQA and MHA;
* rotation, head rotation, SmoothAttention, v->o and up->down smoothing and the channel reorder are exact
  re-parametrisations: float64 logits before quantization are unchanged, while the quantities they exist to
  change (key outliers, activation maxima, channel order) do change;
* the weight grids write exactly what the checkpoint format and reference kernels compute with, and GPTQ beats
  round-to-nearest on the objective it minimises.
"""

from __future__ import annotations

import pytest
import torch

from vllm_qserve.quantize import transforms as T
from vllm_qserve.quantize.model import CausalLM, hf_reference_model

ARCHS = {
    "llama": dict(model_type="llama"),
    "llama-mha-bias": dict(model_type="llama", num_key_value_heads=6, attention_bias=True),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
}


def tiny_config(**overrides) -> dict:
    cfg = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-6,
               tie_word_embeddings=False, rope_theta=10000.0)
    cfg.update(overrides)
    return cfg


def tiny_state(cfg: dict, seed: int = 0) -> dict:
    """A random model of cfg with non-trivial norm gains and biases, float64."""
    import transformers

    from vllm_qserve.quantize.model import SUPPORTED_MODEL_TYPES, hf_config_object

    torch.manual_seed(seed)
    model = getattr(transformers, SUPPORTED_MODEL_TYPES[cfg["model_type"]])(hf_config_object(cfg)).double()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if "rotary" not in k}
    for k in sd:
        if k.endswith("norm.weight"):
            sd[k] = 0.5 + torch.rand_like(sd[k])
        elif k.endswith("bias"):
            sd[k] = 0.1 * torch.randn_like(sd[k])
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    # Outliers: a few residual channels and key channels far larger than the rest, as in real models.
    sd["model.embed_tokens.weight"][:, :3] *= 20
    for i in range(cfg["num_hidden_layers"]):
        sd[f"model.layers.{i}.self_attn.k_proj.weight"][:2] *= 8
    return sd


def ids_batch(cfg, b=2, t=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (b, t), generator=g)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_matches_transformers(arch):
    cfg = tiny_config(**ARCHS[arch])
    sd = tiny_state(cfg)
    ids = ids_batch(cfg)
    with torch.no_grad():
        ours = CausalLM(sd, cfg).double()(ids)
        theirs = hf_reference_model(sd, cfg, torch.float64)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def _observe_keys(model, ids):
    seen = []

    def hook(_i, k, v):
        seen.append(k.abs().amax(dim=(0, 2)))
        return k, v

    model.set_kv_hook(hook)
    with torch.no_grad():
        model(ids)
    model.set_kv_hook(None)
    return seen


def _inputs_of(model, ids, proj):
    """max |input| per channel of every layer's `proj` (e.g. 'mlp.down_proj')."""
    seen = []
    hooks = []
    for layer in model.layers:
        part, name = proj.split(".")
        mod = getattr(getattr(layer, part), name)
        hooks.append(mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax(dim=(0, 1)))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", list(ARCHS))
def test_transforms_are_exact_reparametrisations(arch):
    cfg = tiny_config(**ARCHS[arch])
    sd = tiny_state(cfg)
    ids = ids_batch(cfg)
    model = CausalLM(sd, cfg).double()
    with torch.no_grad():
        ref = model(ids)

    def check(what):
        with torch.no_grad():
            torch.testing.assert_close(model(ids), ref, atol=1e-8, rtol=1e-8, msg=f"{what} changed the logits")

    resid_before = _inputs_of(model, ids, "self_attn.q_proj")[0]
    T.rotate_residual(model)
    check("residual rotation")
    assert model.arch.tie_word_embeddings is False
    for layer in model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    resid_after = _inputs_of(model, ids, "self_attn.q_proj")[0]
    # the 20x outlier channels are spread over all channels
    assert resid_after.max() / resid_after.mean() < 0.5 * resid_before.max() / resid_before.mean()

    T.rotate_heads(model)
    check("head rotation")

    keys = _observe_keys(model, ids)
    for i, layer in enumerate(model.layers):
        lam = T.smooth_attention_scale(keys[i], 0.5)
        d = lam.shape[1]
        torch.testing.assert_close(lam[:, : d // 2], lam[:, d // 2:])  # shared by each RoPE pair
        T.smooth_attention(layer, lam)
    check("SmoothAttention")
    keys_after = _observe_keys(model, ids)
    for before, after in zip(keys, keys_after):
        assert after.max() / after.mean() < before.max() / before.mean()

    o_in = _inputs_of(model, ids, "self_attn.o_proj")
    down_in = _inputs_of(model, ids, "mlp.down_proj")
    a = model.arch
    for i, layer in enumerate(model.layers):
        act = o_in[i].view(a.num_kv_heads, a.group, a.head_dim).amax(1)
        T.smooth_v_o(layer, T.smoothing_scale(act, T.o_proj_weight_absmax_per_kv_channel(layer), 0.5))
        w_max = layer.mlp.down_proj.weight.abs().amax(0)
        T.smooth_up_down(layer, T.smoothing_scale(down_in[i], w_max, 0.5))
    check("smoothing")
    down_after = _inputs_of(model, ids, "mlp.down_proj")
    for before, after in zip(down_in, down_after):
        assert after.max() / after.mean() < before.max() / before.mean()

    for i, layer in enumerate(model.layers):
        perm = T.activation_order(down_after[i])
        assert not torch.equal(perm, torch.arange(perm.numel()))
        T.reorder_down(layer, perm)
    check("reorder")
    sorted_in = _inputs_of(model, ids, "mlp.down_proj")
    for s in sorted_in:
        assert torch.all(s[:-1] >= s[1:] - 1e-12)


def test_hf_state_dict_round_trip_after_rotation():
    """What the writer receives (hf_state_dict of the transformed model) is the transformed model."""
    cfg = tiny_config(**ARCHS["qwen2"])
    sd = tiny_state(cfg)
    ids = ids_batch(cfg)
    model = CausalLM(sd, cfg).double()
    T.rotate_residual(model)
    T.rotate_heads(model)
    out = model.hf_state_dict()
    assert "lm_head.weight" in out and model.config["tie_word_embeddings"] is False
    with torch.no_grad():
        torch.testing.assert_close(CausalLM(out, model.config).double()(ids), model(ids))
        torch.testing.assert_close(hf_reference_model(out, model.config, torch.float64)(ids).logits, model(ids),
                                   atol=1e-6, rtol=1e-6)


def test_unsupported_architecture_is_refused():
    from vllm_qserve.quantize.model import ArchSpec

    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ArchSpec.from_config(dict(tiny_config(), model_type="gpt2"))
