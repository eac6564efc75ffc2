"""Loads a key-centred checkpoint's ``model.layers.{i}.self_attn.attn.k_center`` (fp16/fp32 [Hkv * D], the mean
pre-RoPE key; reference/key_center.py says why) into vLLM's Attention layer and gives the qserve KV backend a
KeyCenter with the model's RoPE table.

vLLM lets a quantization config return a ``BaseKVCacheMethod`` for attention layers (that is how FP8 checkpoints
load k_scale / v_scale): the parameter then sits on the Attention module, its checkpoint name is the module's name
plus ``.k_center``, and the models' own ``load_weights`` load it like any other parameter.
"""

from __future__ import annotations

import weakref

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

from vllm_qserve.reference.key_center import KeyCenter

logger = init_logger(f"vllm.{__name__}")

# Architectures whose attention applies rotate-half RoPE over the whole head with one table for every layer (what
# KeyCenter assumes).  Others (Gemma 3: a second RoPE base on its local layers, QK-norm before RoPE) are refused.
KEY_CENTER_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


# get_rope returns one cached module per set of RoPE arguments; its fp32 table is made once and shared by every
# layer (~16 MB for 32k positions x 128); weak keys, so that a second model in the process gets its own.
_ROPE_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rope_table(head_size: int) -> torch.Tensor:
    """cos | sin [max_positions, head_size] of the served model's RoPE (the same get_rope call as its attention).
    Called while vLLM builds the model (its config is current then)."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    hf_config = get_current_vllm_config().model_config.hf_config
    archs = tuple(getattr(hf_config, "architectures", None) or ())
    if not set(archs) & set(KEY_CENTER_ARCHITECTURES):
        raise ValueError(f"qserve: key-centred checkpoints are supported for {', '.join(KEY_CENTER_ARCHITECTURES)}, "
                         f"not {', '.join(archs) or 'this model'}; quantize it without --key-center")
    rope = get_rope(head_size, max_position=hf_config.max_position_embeddings,
                    rope_parameters=getattr(hf_config, "rope_parameters", None), is_neox_style=True)
    if rope.rotary_dim != head_size or not rope.is_neox_style:
        raise ValueError(f"qserve: key centring needs rotate-half RoPE over the whole head (rotary dim "
                         f"{rope.rotary_dim}, head size {head_size})")
    if rope not in _ROPE_TABLES:
        _ROPE_TABLES[rope] = rope.cos_sin_cache.float()
    return _ROPE_TABLES[rope]


class QServeKeyCenterMethod(BaseKVCacheMethod):
    def create_weights(self, layer: torch.nn.Module):
        super().create_weights(layer)
        n = layer.num_kv_heads * layer.head_size
        center = torch.nn.Parameter(torch.zeros(n, dtype=torch.float32), requires_grad=False)

        def load(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
            if loaded.shape != param.shape:
                raise ValueError(f"qserve: {layer.layer_name}.k_center must be [{n}] (num_kv_heads "
                                 f"{layer.num_kv_heads} x head_size {layer.head_size}), got {tuple(loaded.shape)}")
            if not torch.isfinite(loaded).all():
                raise ValueError(f"qserve: {layer.layer_name}.k_center has non-finite values")
            param.data.copy_(loaded.float())
            param.qserve_loaded = True

        center.weight_loader = load
        layer.k_center = center
        layer.qserve_rope_table = _rope_table(layer.head_size)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        center = getattr(layer, "k_center", None)
        if center is None:
            return
        if not getattr(center, "qserve_loaded", False):
            if getattr(self.quant_config, "dummy_weights", False):  # load_format=dummy: a zero centre (no-op)
                center.qserve_loaded = True
            else:
                raise ValueError(f"qserve: the checkpoint declares key_center but has no {layer.layer_name}.k_center")
        mean = center.data.view(layer.num_kv_heads, layer.head_size)
        layer.qserve_key_center = KeyCenter(mean, layer.qserve_rope_table.to(mean.device))
        del layer.k_center, layer.qserve_rope_table
        logger.info_once("qserve: key-centred checkpoint: KV-cache keys are stored as RoPE(k - m), m added back "
                         "after dequantization")
