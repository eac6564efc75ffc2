"""Writes a QServe checkpoint folder from an fp Llama-architecture state dict.

Layout = the official zoo layout (separate q/k/v and gate/up tensors, fp16 embeddings/norms/lm_head), as
safetensors by default or as QServe's own ``pytorch_model.bin``.  ``config.json`` gets
``quantization_config: {quant_method: qserve, ...}`` unless ``zoo_style=True`` (no block, like the zoo), so vLLM
picks the method with no flag.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from tqdm import tqdm

from vllm_qserve.checkpoint import KEY_CENTER
from vllm_qserve.convert.rtn import quantize_weight
from vllm_qserve.precision import Precision, check_group_size
from vllm_qserve.reference.activation import check_activation_sum

_PROJ_RE = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def quantize_state_dict(state_dict: dict, weight_bits: int, group_size: int, desc: str = "quantizing") -> dict:
    out = {}
    for name, t in tqdm(state_dict.items(), desc=desc, unit="tensor", leave=False):
        if _PROJ_RE.match(name):
            prefix = name[: -len(".weight")]
            for suffix, q in quantize_weight(t, weight_bits, group_size).items():
                out[f"{prefix}.{suffix}"] = q.contiguous()
        elif name.endswith(".bias") and _PROJ_RE.match(name[: -len(".bias")] + ".weight"):
            out[name] = t.to(torch.float16).contiguous()
        elif "rotary_emb" in name:
            continue
        else:
            out[name] = t.to(torch.float16).contiguous()
    return out


def write_checkpoint(out_dir: str, state_dict: dict, hf_config: dict, precision: Precision, group_size: int,
                     tokenizer_dir: str | None = None, fmt: str = "safetensors", zoo_style: bool = False,
                     activation_sum: str | None = None) -> str:
    """state_dict: fp weights with HF Llama names.  hf_config: config.json as a dict.  Returns out_dir."""
    group_size = check_group_size(group_size, precision.weight_bits)
    tensors = quantize_state_dict(state_dict, precision.weight_bits, group_size)
    return save_checkpoint(out_dir, tensors, hf_config, precision, group_size, tokenizer_dir, fmt, zoo_style,
                           activation_sum)


def save_checkpoint(out_dir: str, tensors: dict, hf_config: dict, precision: Precision, group_size: int,
                    tokenizer_dir: str | None = None, fmt: str = "safetensors", zoo_style: bool = False,
                    activation_sum: str | None = None) -> str:
    """Writes already-quantized QServe tensors (plus fp16 embeddings/norms/lm_head), config.json and tokenizer.
    activation_sum: the per-channel W4A8 activation sum the tensors were made for ("input", QServe's, when None;
    recorded in quantization_config for per-channel W4 checkpoints, where it matters)."""
    group_size = check_group_size(group_size, precision.weight_bits)
    if activation_sum is not None:
        check_activation_sum(activation_sum)  # before anything is written
    os.makedirs(out_dir, exist_ok=True)
    tensors = dict(tensors)
    if hf_config.get("tie_word_embeddings") and "lm_head.weight" in tensors:
        del tensors["lm_head.weight"]
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(tensors, os.path.join(out_dir, "pytorch_model.bin"))
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r} (safetensors or bin)")
    cfg = dict(hf_config)
    cfg["torch_dtype"] = cfg.get("torch_dtype") or "float16"
    cfg.pop("quantization_config", None)
    if not zoo_style:
        cfg["quantization_config"] = {"quant_method": "qserve", "precision": precision.name,
                                      "weight_bits": precision.weight_bits, "group_size": group_size,
                                      "kv_bits": precision.kv_bits}
        if any(k.endswith("." + KEY_CENTER) for k in tensors):
            cfg["quantization_config"]["key_center"] = True  # attention/key_center_method.py loads them
        if activation_sum is not None and precision.weight_bits == 4 and group_size == -1:
            cfg["quantization_config"]["activation_sum"] = activation_sum  # config.py: the quantizers' sum_mode
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def copy_tokenizer_files(src_dir: str, out_dir: str) -> None:
    for name in os.listdir(src_dir):
        if name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template", "vocab.",
                            "merges.txt")) and os.path.isfile(os.path.join(src_dir, name)):
            if os.path.abspath(src_dir) != os.path.abspath(out_dir):
                shutil.copy(os.path.join(src_dir, name), out_dir)
