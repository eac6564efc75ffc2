"""An independent reference forward: transformers' Llama with dequantized weights and simulated W4A8.

Written from the format's definition, not from vllm_qserve's reference module, so that a shared mistake in the
plugin cannot make both sides agree.  Every nn.Linear of the decoder layers becomes
    y = (xq * sx) @ (s1 * q)^T - s1_szeros * sum(x)    (per-channel)
    y = (xq * sx) @ (s1 * w8)^T                       (group 128 / W8A8)
with xq, sx the per-token int8 quantization of the layer input, all in float64.
"""

import torch

Q = "model.layers.{}.{}"


def _unpack(qweight):
    n, k = qweight.shape[0], qweight.shape[1] * 2
    b = qweight.view(torch.uint8).reshape(-1).long()
    q = torch.empty(n, k, dtype=torch.long)
    idx = torch.arange(n * k // 2)
    tile, within = idx // 512, idx % 512
    nt, kt = tile // (k // 32), tile % (k // 32)
    lane, j = within // 16, within % 16
    r, t = lane // 4, lane % 4
    kh, nh, e = j // 8, (j // 4) % 2, j % 4
    row, col = nt * 32 + nh * 8 + r, kt * 32 + kh * 16 + t * 4 + e
    q[row, col] = b & 15
    q[row + 16, col] = b >> 4
    return q


def dequantized_weight(tensors, prefix):
    """float64 [N, K] integer weights times the per-channel scale, plus the zero term (per-channel only)."""
    if f"{prefix}.weight" in tensors and tensors[f"{prefix}.weight"].dtype == torch.int8:
        return tensors[f"{prefix}.weight"].double() * tensors[f"{prefix}.dequant_scale"].double()[:, None], None
    q = _unpack(tensors[f"{prefix}.qweight"]).double()
    s1 = tensors[f"{prefix}.s1_scales"].double()[:, None]
    if f"{prefix}.s1_szeros" in tensors:
        return q * s1, tensors[f"{prefix}.s1_szeros"].double()
    n, k = q.shape
    s2 = tensors[f"{prefix}.s2_scales"].long()  # [K/128, N], permuted within 32
    z2 = tensors[f"{prefix}.s2_zeros"].long()
    perm = torch.tensor([(c % 8) * 4 + (c % 32) // 8 for c in range(32)])
    nat = torch.cat([blk + perm for blk in range(0, n, 32)])  # natural channel c sits at stored position nat[c]
    s2n, z2n = s2[:, nat].t(), z2[:, nat].t()  # [N, K/128]
    w8 = (q.long().view(n, k // 128, 128) * s2n[..., None] + z2n[..., None]) % 256
    w8 = torch.where(w8 > 127, w8 - 256, w8).view(n, k)
    return w8.double() * s1, None


class SimQuantLinear(torch.nn.Module):
    """activation_sum (per-channel): "input" subtracts s1_szeros * sum(x) (QServe's), "quantized" s1_szeros *
    sum(xq * sx) (docs/format.md section 5)."""

    def __init__(self, w, szeros, bias, activation_sum="input"):
        super().__init__()
        self.w, self.szeros, self.b = w, szeros, bias
        assert activation_sum in ("input", "quantized"), activation_sum
        self.activation_sum = activation_sum

    def forward(self, x):
        # The activation-quantization contract is defined in fp32 (docs/format.md): same ops, same rounding.
        x32 = x.float()
        amax = x32.abs().amax(-1, keepdim=True)
        inv = 127.0 / amax.clamp(min=1e-30)
        xq = torch.round(x32 * inv).clamp(-127, 127).double()
        sx = (amax / 127.0).double()
        x64 = x32.double()
        y = (xq * sx) @ self.w.t()
        if self.szeros is not None:
            xsum = (xq * sx).sum(-1, keepdim=True) if self.activation_sum == "quantized" else x64.sum(-1, keepdim=True)
            y = y - xsum * self.szeros
        if self.b is not None:
            y = y + self.b.double()
        return y.to(x.dtype)


def fake_quant_kv(x, bits):
    """QServe's KV quantization restated from docs/format.md: per token and head (last dim), asymmetric,
    scale = (max - min) / (2^bits - 1) and zero = -min / scale both rounded to fp16, codes clamped to [0, L]."""
    levels = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = (hi - lo) / levels
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().float()
    zero = (-lo / scale).half().float()
    codes = torch.round(xf / scale + zero).clamp(0, levels)
    return ((codes - zero) * scale).to(x.dtype)


def _register_kv_sim(bits, model_cls=None):
    import importlib

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    # the architecture's own eager attention (Gemma 3's handles its scaling and sliding window like Llama's)
    module = importlib.import_module(model_cls.__module__ if model_cls else
                                     "transformers.models.llama.modeling_llama")
    eager_attention_forward = module.eager_attention_forward
    name = f"qserve_kv{bits}_sim_{module.__name__.rsplit('.', 1)[-1]}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        # key arrives after RoPE, as the KV cache stores it; the prompt's own tokens are quantized too.
        return eager_attention_forward(module, query, fake_quant_kv(key, bits), fake_quant_kv(value, bits),
                                       attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)  # without it transformers builds no causal mask
    return name


def build_reference_model(config, fp_state, qserve_tensors, kv_bits=16, activation_sum="input"):
    """transformers' model for the config (LlamaForCausalLM, Gemma3ForCausalLM, ...) in fp32 with non-linear
    weights from the checkpoint and simulated W4A8 linears (and, for kv_bits 4 or 8, simulated KV-cache
    quantization)."""
    from transformers import AutoModelForCausalLM

    import copy

    # the attention choice lives in the config
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), torch_dtype=torch.float32).float().eval()
    if kv_bits != 16:
        model.set_attn_implementation(_register_kv_sim(kv_bits, type(model)))
    state = {k: v.float() for k, v in qserve_tensors.items() if v.dtype in (torch.float16, torch.bfloat16)
             and not k.endswith(("s1_scales", "s1_szeros", "dequant_scale"))}
    model.load_state_dict(state, strict=False)
    for i, layer in enumerate(model.model.layers):
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                part = "self_attn" if parent is layer.self_attn else "mlp"
                w, sz = dequantized_weight(qserve_tensors, f"model.layers.{i}.{part}.{name}")
                old = getattr(parent, name)
                setattr(parent, name, SimQuantLinear(w, sz, old.bias, activation_sum))
    return model
