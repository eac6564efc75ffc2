"""A plain PyTorch decoder-only LM (Llama, Mistral, Qwen2, Gemma 3 text) that the quantizer transforms and calibrates.

Why not transformers' own classes: QoQ needs to see and change things those classes keep internal -- the keys
after RoPE (SmoothAttention statistics, simulated KV4), every projection as a swappable module (GPTQ statistics,
QServe's W4A8 numerics), and one decoder layer at a time on stored hidden states (layer-wise calibration).  The
module tree mirrors Hugging Face's names, so ``state_dict()`` is a Hugging Face state dict, and
``tests/test_quantize_transforms.py`` holds the forward to transformers' logits.

Only the RoPE frequencies come from transformers (its rotary-embedding class of the model's own config), so every
``rope_scaling`` variant it knows is handled the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "gemma3_text": "Gemma3ForCausalLM"}
GEMMA_TYPES = ("gemma3_text",)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    sliding_window: int | None
    # Gemma 3 (defaults: Llama).  Gemma's RMSNorm multiplies by (1 + weight); its layers wrap attention and MLP in
    # pre- and post-norms ("sandwich"), normalise q and k per head before RoPE, use GeGLU (tanh GELU), scale the
    # embeddings by sqrt(hidden), and alternate sliding-window (local RoPE base) and global layers.
    gemma: bool = False
    norm_offset: float = 0.0
    activation: str = "silu"
    embed_scale: float | None = None
    attn_scale: float | None = None  # None: head_dim ** -0.5
    layer_types: tuple = ()  # per layer "sliding_attention" / "full_attention" (Gemma); empty: all one kind
    final_logit_softcapping: float | None = None

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def layer_window(self, index: int) -> int | None:
        """The attention window of layer `index` (None: full causal attention)."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[index] == "sliding_attention" else None
        return self.sliding_window

    @classmethod
    def from_config(cls, cfg: dict) -> "ArchSpec":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported by the QServe quantizer (supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}: decoder-only models with Llama-style layers)")
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None  # Qwen2 configs carry a window size that is off unless use_sliding_window is set
        gemma = {}
        if model_type in GEMMA_TYPES:
            if cfg.get("attn_logit_softcapping"):
                raise ValueError("Gemma with attn_logit_softcapping (Gemma 2) is not supported: QServe's KV4 "
                                 "attention has no logit soft-capping")
            act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
            if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
                raise ValueError(f"Gemma 3 with activation {act!r}: the quantizer implements gelu_pytorch_tanh")
            n = int(cfg["num_hidden_layers"])
            layer_types = cfg.get("layer_types")
            if not layer_types:  # older configs: every pattern-th layer is global
                pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
                layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
            head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
            gemma = dict(gemma=True, norm_offset=1.0, activation="gelu_tanh",
                         embed_scale=float(cfg["hidden_size"]) ** 0.5,
                         attn_scale=float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5,
                         layer_types=tuple(layer_types),
                         final_logit_softcapping=cfg.get("final_logit_softcapping"))
        return cls(model_type=model_type, hidden_size=int(cfg["hidden_size"]),
                   intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma.get("gemma", False))),
                   sliding_window=int(window) if window else None, **gemma)


def hf_config_object(cfg: dict):
    """The transformers config object of a config.json dict (for its rotary embedding and for reference models)."""
    from transformers import AutoConfig

    clean = {k: v for k, v in cfg.items() if k not in ("quantization_config", "model_type")}
    return AutoConfig.for_model(cfg["model_type"], **clean)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:  # Gemma: (1 + w), applied in fp32 before the rounding to the activation dtype
        return (y * (offset + weight.to(y.dtype))).to(x.dtype)
    return weight * y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


class Linear(torch.nn.Module):
    """y = x W^T + b.  The quantizer swaps ``forward`` implementations by replacing the module."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(torch.nn.Module):
    """RMSNorm with gain ``offset + weight`` (offset 0: Llama; 1: Gemma, whose checkpoints store gain - 1)."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset)

    @property
    def gain(self) -> torch.Tensor:
        """The effective per-channel gain (float64)."""
        return self.weight.double() + self.offset

    def set_gain(self, gain: torch.Tensor) -> None:
        """Store an effective gain (the transforms fold and scale gains; Gemma stores gain - 1)."""
        self.weight.data = (gain.double() - self.offset).to(self.weight.dtype).contiguous()


class PerLayerType:
    """cos or sin tables of several RoPE bases (Gemma 3: local and global layers); batch slices like a tensor."""

    def __init__(self, tables: dict):
        self.tables = tables

    def __getitem__(self, idx) -> "PerLayerType":
        return PerLayerType({k: v[idx] for k, v in self.tables.items()})

    def pick(self, layer_type: str) -> torch.Tensor:
        return self.tables[layer_type]


def _pick(t, layer_type):
    return t.pick(layer_type) if isinstance(t, PerLayerType) else t


# KV hook: (layer index, keys after RoPE [B, Hkv, T, D], values [B, Hkv, T, D]) -> (keys, values) as attended.
KVHook = Callable[[int, torch.Tensor, torch.Tensor], tuple]


class Attention(torch.nn.Module):
    def __init__(self, arch: ArchSpec, index: int, weights: dict):
        super().__init__()
        self.arch, self.index = arch, index
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, Linear(weights[f"{name}.weight"], weights.get(f"{name}.bias")))
        if arch.gemma:  # QK-norm: per head, over head_dim, gains shared by all heads
            self.q_norm = RMSNorm(weights["q_norm.weight"], arch.rms_norm_eps, arch.norm_offset)
            self.k_norm = RMSNorm(weights["k_norm.weight"], arch.rms_norm_eps, arch.norm_offset)
        self.layer_type = arch.layer_types[index] if arch.layer_types else None
        self.window = arch.layer_window(index)
        self.kv_hook: KVHook | None = None
        self.qk_observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None  # sees q, k after RoPE

    def qkv(self, x, cos, sin):
        """q [B, H, T, D], k and v [B, Hkv, T, D]: after QK-norm (Gemma) and RoPE, as the KV cache holds them."""
        a = self.arch
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, a.num_heads, a.head_dim)
        k = self.k_proj(x).view(b, t, a.num_kv_heads, a.head_dim)
        v = self.v_proj(x).view(b, t, a.num_kv_heads, a.head_dim).transpose(1, 2)
        if a.gemma:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = _pick(cos, self.layer_type).unsqueeze(1), _pick(sin, self.layer_type).unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend(self, q, k, v):
        """Causal (and, for a sliding-window layer, windowed) attention of the last q.shape[2] positions over
        k/v [B, Hkv, S, D]; returns [B, T, H * D]."""
        a = self.arch
        b, _, t, _ = q.shape
        s = k.shape[2]
        qpos = torch.arange(s - t, s, device=q.device)[:, None]
        kpos = torch.arange(s, device=q.device)[None, :]
        allowed = kpos <= qpos
        if self.window is not None:
            allowed = allowed & (qpos - kpos < self.window)  # vLLM / transformers: q - k < W
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=a.attn_scale,
                                           enable_gqa=a.group > 1)
        return o.transpose(1, 2).reshape(b, t, a.num_heads * a.head_dim)

    def forward(self, x, cos, sin):
        q, k, v = self.qkv(x, cos, sin)
        if self.qk_observer is not None:
            self.qk_observer(q, k)
        if self.kv_hook is not None:
            k, v = self.kv_hook(self.index, k, v)
        return self.o_proj(self.attend(q, k, v))


class MLP(torch.nn.Module):
    def __init__(self, weights: dict, activation: str = "silu"):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, Linear(weights[f"{name}.weight"], weights.get(f"{name}.bias")))
        self.activation = activation

    def act(self, gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(gate)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(torch.nn.Module):
    def __init__(self, arch: ArchSpec, index: int, weights: dict):
        super().__init__()
        off = arch.norm_offset
        self.gemma = arch.gemma
        self.input_layernorm = RMSNorm(weights["input_layernorm.weight"], arch.rms_norm_eps, off)
        # Llama: post_attention_layernorm is the MLP's input norm.  Gemma: it normalises the attention output
        # before the residual add, pre_feedforward_layernorm is the MLP's input norm and post_feedforward_layernorm
        # normalises the MLP output.
        self.post_attention_layernorm = RMSNorm(weights["post_attention_layernorm.weight"], arch.rms_norm_eps, off)
        if arch.gemma:
            self.pre_feedforward_layernorm = RMSNorm(weights["pre_feedforward_layernorm.weight"],
                                                     arch.rms_norm_eps, off)
            self.post_feedforward_layernorm = RMSNorm(weights["post_feedforward_layernorm.weight"],
                                                      arch.rms_norm_eps, off)
        self.self_attn = Attention(arch, index, {k[len("self_attn."):]: v for k, v in weights.items()
                                                 if k.startswith("self_attn.")})
        self.mlp = MLP({k[len("mlp."):]: v for k, v in weights.items() if k.startswith("mlp.")}, arch.activation)

    @property
    def mlp_input_norm(self) -> RMSNorm:
        return self.pre_feedforward_layernorm if self.gemma else self.post_attention_layernorm

    def add_attention(self, h, attn_out):
        """Residual add of the attention branch (Gemma normalises the branch output first)."""
        return h + (self.post_attention_layernorm(attn_out) if self.gemma else attn_out)

    def mlp_block(self, h):
        m = self.mlp(self.mlp_input_norm(h))
        return h + (self.post_feedforward_layernorm(m) if self.gemma else m)

    def forward(self, h, cos, sin):
        h = self.add_attention(h, self.self_attn(self.input_layernorm(h), cos, sin))
        return self.mlp_block(h)


class _Body(torch.nn.Module):
    """Hugging Face's ``model.`` level: embeddings, layers, final norm."""

    def __init__(self, arch: ArchSpec, sd: dict):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding.from_pretrained(sd["model.embed_tokens.weight"], freeze=True)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(arch, i, {k[len(f"model.layers.{i}."):]: v for k, v in sd.items()
                                   if k.startswith(f"model.layers.{i}.")})
            for i in range(arch.num_layers))
        self.norm = RMSNorm(sd["model.norm.weight"], arch.rms_norm_eps, arch.norm_offset)


class CausalLM(torch.nn.Module):
    def __init__(self, sd: dict, cfg: dict):
        super().__init__()
        self.arch = ArchSpec.from_config(cfg)
        self.config = dict(cfg)
        missing = [f"model.layers.{i}.{p}.weight" for i in range(self.arch.num_layers) for p in PROJECTIONS
                   if f"model.layers.{i}.{p}.weight" not in sd]
        if missing:
            raise ValueError(f"state dict lacks {len(missing)} projection weights, e.g. {missing[0]}")
        self.model = _Body(self.arch, sd)
        lm_head = sd.get("lm_head.weight")
        if lm_head is None:
            if not self.arch.tie_word_embeddings:
                raise ValueError("state dict has no lm_head.weight and the config does not tie it to the embeddings")
            lm_head = sd["model.embed_tokens.weight"]
        # A separate parameter even when tied: the transforms change lm_head and the embedding differently.
        self.lm_head = Linear(lm_head.clone())
        from transformers import AutoConfig  # noqa: F401  (fail early with a clear import error)

        hf_cfg = hf_config_object(cfg)
        rotary_cls = _rotary_class(cfg["model_type"])
        self.rotary = rotary_cls(config=hf_cfg)
        self.rope_layer_types = sorted(set(self.arch.layer_types)) if self.arch.gemma else None

    # -- plumbing -------------------------------------------------------------------------------------------------

    @property
    def layers(self):
        return self.model.layers

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B, T, D] for positions [B, T], in dtype."""
        ref = torch.empty(0, dtype=torch.float32, device=positions.device)
        self.rotary.to(positions.device)
        if self.rope_layer_types:  # Gemma 3: one table per layer type (local and global RoPE bases)
            cos, sin = {}, {}
            for lt in self.rope_layer_types:
                c, s_ = self.rotary(ref, positions, lt)
                cos[lt], sin[lt] = c.to(dtype), s_.to(dtype)
            return PerLayerType(cos), PerLayerType(sin)
        cos, sin = self.rotary(ref, positions)
        return cos.to(dtype), sin.to(dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        if self.arch.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the activation dtype first
            h = h * torch.tensor(self.arch.embed_scale, dtype=h.dtype)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(h))
        cap = self.arch.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, V] (no padding, positions 0..T-1)."""
        h = self.embed(ids)
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        cos, sin = self.rope(pos, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.head(h)

    def set_kv_hook(self, hook: KVHook | None) -> None:
        for layer in self.layers:
            layer.self_attn.kv_hook = hook

    def hf_state_dict(self, dtype: torch.dtype | None = None) -> dict:
        """Hugging Face names; lm_head dropped when the config still ties it to the embedding."""
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("rotary.") or (name == "lm_head.weight" and self.arch.tie_word_embeddings):
                continue
            out[name] = t.detach().to(dtype) if dtype is not None else t.detach()
        return out

    def untie_lm_head(self) -> None:
        """After a transform that changes lm_head and the embedding differently they are separate tensors."""
        if self.arch.tie_word_embeddings:
            self.arch = ArchSpec(**{**self.arch.__dict__, "tie_word_embeddings": False})
            self.config["tie_word_embeddings"] = False
            for layer in self.layers:
                layer.self_attn.arch = self.arch


def _rotary_class(model_type: str):
    if model_type in GEMMA_TYPES:
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding as R
    elif model_type == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding as R
    elif model_type == "mistral":
        from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding as R
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as R
    return R


def hf_reference_model(sd: dict, cfg: dict, dtype: torch.dtype = torch.float32):
    """transformers' own model class for cfg holding sd (tests; calibration text generation)."""
    import transformers

    hf_cfg = hf_config_object(cfg)
    cls = getattr(transformers, SUPPORTED_MODEL_TYPES[cfg["model_type"]])
    with torch.device("meta"):
        model = cls(hf_cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if hf_cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"state dict lacks {missing[:5]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg)
    emb = model.model.embed_tokens
    if hasattr(emb, "scalar_embed_scale"):  # Gemma's scaled embedding: a non-persistent buffer, still on meta
        emb.embed_scale = torch.tensor(emb.scalar_embed_scale)
    return model.to(dtype).eval()
