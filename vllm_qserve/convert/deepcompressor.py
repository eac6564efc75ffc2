"""DeepCompressor (and lmquant) output -> QServe checkpoint in this project's format.

DeepCompressor's ``--save-model`` writes two torch files into one folder:

* ``model.pt``: the fp16 state dict of the *fake-quantized* model (after its rotation, reorder, smoothing and GPTQ),
  Hugging Face names: every projection weight lies exactly on its quantization grid;
* ``scale.pt``: per projection ``<name>.weight.scale.0`` (level-1 / per-channel scale s1), for group 128 also
  ``<name>.weight.scale.1`` (integer level-2 scale s2 per group), and the zero point, either
  ``<name>.weight.zero`` (integer zero z: W = s * (q - z)) or ``<name>.weight.scaled_zero`` (z * s: W = s*q - z*s).
  Zero points of signed codes (z < 0 somewhere) are shifted by 8 to QServe's unsigned codes.

The integer codes are recovered as q = round(W / s) + z and checked: every code in [0, 15], s2 in [1, 127], the
kernel's byte arithmetic exact (q * s2 <= 255, (q - z) * s2 in int8), and the grid reproducing model.pt's weights.
The level-2 scales and zeros are written in the order QServe's kernel reads them (0, 8, 16, 24, 1, ...: see
docs/format.md section 3), not DeepCompressor's own packer order (0, 8, 1, 9, ...), which does not match it.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch
from tqdm import tqdm

from vllm_qserve.packing import pack_w4, permute_s2
from vllm_qserve.precision import Precision, check_group_size

_PROJ_WEIGHT_RE = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
# A grid reproduces the stored fp16 weight when |W - s * (q - z)| stays within fp16 rounding of the larger one.
_REL_TOL = 2 ** -9


class DeepCompressorError(ValueError):
    """A DeepCompressor output that cannot become a QServe checkpoint; the message names the tensor."""


def _scales_by_param(scale_dict: dict) -> dict:
    """{'<param>.weight': {'scale': {level: t}, 'zero': t, 'zero_scaled': bool}} from scale.pt's keys."""
    out: dict = {}
    for name, t in scale_dict.items():
        if not isinstance(t, torch.Tensor):
            continue
        if name.endswith(".weight.scaled_zero"):
            out.setdefault(name[: -len(".scaled_zero")], {})["zero"] = t
            out[name[: -len(".scaled_zero")]]["zero_scaled"] = True
        elif name.endswith(".weight.zero"):
            out.setdefault(name[: -len(".zero")], {})["zero"] = t
            out[name[: -len(".zero")]]["zero_scaled"] = False
        elif ".weight.scale." in name:
            param, level = name.split(".weight.scale.", 1)
            if not level.isdigit():
                raise DeepCompressorError(f"scale.pt: cannot read the scale level of {name}")
            out.setdefault(param + ".weight", {}).setdefault("scale", {})[int(level)] = t
    return out


def _check_grid(name: str, w: torch.Tensor, deq: torch.Tensor) -> None:
    err = (w - deq).abs()
    tol = _REL_TOL * torch.maximum(w.abs(), deq.abs()) + 1e-7
    bad = err > tol
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise DeepCompressorError(
            f"{name}: model.pt's weight is not on the grid of its scale.pt scales ({int(bad.sum())} of {w.numel()} "
            f"elements off, e.g. {list(idx)}: {float(w[idx]):.6g} vs {float(deq[idx]):.6g}); model.pt and scale.pt "
            f"must come from the same DeepCompressor run, with matching --group-size")


def convert_w4_per_channel(name: str, w: torch.Tensor, s1: torch.Tensor, zero: torch.Tensor,
                           zero_scaled: bool) -> dict:
    n = w.shape[0]
    w = w.double()
    s1 = s1.double().reshape(-1)
    if s1.numel() == 1:
        s1 = s1.expand(n)
    if s1.numel() != n:
        raise DeepCompressorError(f"{name}: scale.0 has {s1.numel()} values for {n} output channels (per-channel "
                                  f"expects one per channel)")
    zero = zero.double().reshape(-1).expand(n) if zero.numel() == 1 else zero.double().reshape(-1)
    if zero.numel() != n:
        raise DeepCompressorError(f"{name}: zero point has {zero.numel()} values for {n} output channels")
    if zero_scaled:  # W = s*q - zs: the integer zero is zs / s
        z = torch.round(zero / s1)
    else:
        z = torch.round(zero)
    q = torch.round(w / s1[:, None]) + z[:, None]
    if float(z.min()) < 0 or float(q.min()) < 0:  # signed int4 codes -> QServe's unsigned ones
        q, z = q + 8, z + 8
    if float(q.min()) < 0 or float(q.max()) > 15 or float(z.min()) < 0 or float(z.max()) > 15:
        raise DeepCompressorError(f"{name}: codes or zeros outside [0, 15] (codes {float(q.min()):.0f}.."
                                  f"{float(q.max()):.0f}, zeros {float(z.min()):.0f}..{float(z.max()):.0f}); is "
                                  f"this a 4-bit per-channel DeepCompressor output?")
    s1_16 = s1.to(torch.float16)
    szeros = (z * s1_16.double()).to(torch.float16)
    _check_grid(name, w, (q - z[:, None]) * s1[:, None])
    return {"qweight": pack_w4(q.to(torch.uint8)), "s1_scales": s1_16, "s1_szeros": szeros}


def convert_w4_per_group(name: str, w: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, zero: torch.Tensor,
                         zero_scaled: bool, group_size: int) -> dict:
    n, k = w.shape
    w = w.double()
    if k % group_size:
        raise DeepCompressorError(f"{name}: input dim {k} is not a multiple of the group size {group_size}")
    ng = k // group_size
    s1 = s1.double().reshape(-1)
    if s1.numel() == 1:
        s1 = s1.expand(n)
    if s1.numel() != n:
        raise DeepCompressorError(f"{name}: scale.0 has {s1.numel()} values, expected one per output channel ({n})")
    if s2.numel() != n * ng:
        raise DeepCompressorError(f"{name}: scale.1 has {s2.numel()} values, expected {n} x {ng} groups of "
                                  f"{group_size} (is --group-size right?)")
    s2 = torch.round(s2.double().reshape(n, ng))
    zero = zero.double()
    zero = zero.reshape(-1).expand(n * ng).reshape(n, ng) if zero.numel() == 1 else zero.reshape(n, ng)
    w8 = torch.round(w / s1[:, None])  # level 1: int8 values
    if float(w8.min()) < -128 or float(w8.max()) > 127:
        raise DeepCompressorError(f"{name}: level-1 values W / scale.0 exceed int8 ({float(w8.min()):.0f}.."
                                  f"{float(w8.max()):.0f})")
    z = torch.round(zero / s2) if zero_scaled else torch.round(zero)  # zero in the int8 domain: z * s2
    g = w8.view(n, ng, group_size)
    q = torch.round(g / s2[..., None]) + z[..., None]
    if float(z.min()) < 0 or float(q.min()) < 0:  # signed int4 codes -> QServe's unsigned ones
        q, z = q + 8, z + 8
    problems = []
    if float(s2.min()) < 1 or float(s2.max()) > 127:
        problems.append(f"level-2 scales {float(s2.min()):.0f}..{float(s2.max()):.0f} outside [1, 127]")
    if float(z.min()) < 0 or float(z.max()) > 15:
        problems.append(f"zeros {float(z.min()):.0f}..{float(z.max()):.0f} outside [0, 15]")
    if float(q.min()) < 0 or float(q.max()) > 15:
        problems.append(f"codes {float(q.min()):.0f}..{float(q.max()):.0f} outside [0, 15]")
    if float((q * s2[..., None]).max()) > 255:
        problems.append("q * s2 exceeds 255 (the kernel multiplies four codes in one 32-bit word)")
    prod = (q - z[..., None]) * s2[..., None]
    if float(prod.min()) < -128 or float(prod.max()) > 127:
        problems.append("(q - z) * s2 leaves int8 (the level-1 range must be the protective [-119, 119])")
    if problems:
        raise DeepCompressorError(f"{name}: not a valid QServe group-{group_size} grid: " + "; ".join(problems))
    _check_grid(name, w, prod.reshape(n, k) * s1[:, None])
    zeros = torch.remainder(-(z * s2), 256)
    zeros = torch.where(zeros > 127, zeros - 256, zeros)
    return {"qweight": pack_w4(q.reshape(n, k).to(torch.uint8)), "s1_scales": s1.to(torch.float16),
            "s2_scales": permute_s2(s2.t().contiguous()).to(torch.int8),
            "s2_zeros": permute_s2(zeros.t().contiguous()).to(torch.int8)}


def convert_w8(name: str, w: torch.Tensor, s: torch.Tensor) -> dict:
    n = w.shape[0]
    s = s.double().reshape(-1)
    if s.numel() == 1:
        s = s.expand(n)
    if s.numel() != n:
        raise DeepCompressorError(f"{name}: scale.0 has {s.numel()} values for {n} output channels")
    q = torch.round(w.double() / s[:, None])
    if float(q.min()) < -128 or float(q.max()) > 127:
        raise DeepCompressorError(f"{name}: W / scale exceeds int8; is this an 8-bit DeepCompressor output?")
    _check_grid(name, w.double(), q * s[:, None])
    return {"weight": q.to(torch.int8), "dequant_scale": s.to(torch.float16)}


def convert_state_dict(model_sd: dict, scale_sd: dict, weight_bits: int, group_size: int) -> dict:
    """DeepCompressor's (model.pt, scale.pt) -> QServe tensors (fp16 for everything not quantized)."""
    group_size = check_group_size(group_size, weight_bits)
    scales = _scales_by_param(scale_sd)
    for param in scales:
        if param not in model_sd:
            raise DeepCompressorError(f"scale.pt has scales for {param}, which model.pt does not contain")
    out = {}
    for name, t in tqdm(model_sd.items(), desc="converting", unit="tensor", leave=False):
        if not isinstance(t, torch.Tensor):
            continue
        if not _PROJ_WEIGHT_RE.match(name):
            if name in scales:
                raise DeepCompressorError(f"{name} is quantized in scale.pt but is not a q/k/v/o/gate/up/down "
                                          f"projection; QServe keeps it in fp16")
            out[name] = t.to(torch.float16).contiguous()
            continue
        prefix = name[: -len(".weight")]
        entry = scales.get(name)
        if entry is None or 0 not in entry.get("scale", {}):
            raise DeepCompressorError(f"scale.pt has no {name}.scale.0: every projection must be quantized")
        levels = entry["scale"]
        has_level2 = 1 in levels
        if weight_bits == 8:
            if has_level2 or entry.get("zero") is not None and bool((entry["zero"] != 0).any()):
                raise DeepCompressorError(f"{name}: an 8-bit QServe weight is symmetric per-channel, but scale.pt "
                                          f"has a level-2 scale or a zero point")
            tensors = convert_w8(name, t, levels[0])
        else:
            if has_level2 != (group_size != -1):
                raise DeepCompressorError(
                    f"{name}: scale.pt {'has' if has_level2 else 'has no'} level-2 scale (.weight.scale.1), so this "
                    f"is a {'group' if has_level2 else 'per-channel'} output, but --group-size is {group_size}")
            if entry.get("zero") is None:
                raise DeepCompressorError(f"{name}: scale.pt has no zero point (.weight.zero or .weight.scaled_zero); "
                                          f"QServe's 4-bit weights are asymmetric")
            if group_size == -1:
                tensors = convert_w4_per_channel(name, t, levels[0], entry["zero"], entry["zero_scaled"])
            else:
                tensors = convert_w4_per_group(name, t, levels[0], levels[1], entry["zero"], entry["zero_scaled"],
                                               group_size)
        for suffix, v in tensors.items():
            out[f"{prefix}.{suffix}"] = v.contiguous()
    return out


def convert_deepcompressor(dc_path: str, model_dir: str, output: str, group_size: int, weight_bits: int = 4,
                           kv_bits: int = 4, fmt: str = "safetensors") -> str:
    """--dc-quant-path (model.pt + scale.pt) and the original HF folder (config, tokenizer) -> output folder."""
    from vllm_qserve.checkpoint import inspect_checkpoint, load_torch_file
    from vllm_qserve.convert.writer import save_checkpoint

    paths = {n: os.path.join(dc_path, n) for n in ("model.pt", "scale.pt")}
    for n, p in paths.items():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--dc-quant-path {dc_path}: no {n} (DeepCompressor's --save-model writes "
                                    f"model.pt and scale.pt)")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"--model {model_dir}: no config.json (the original Hugging Face model folder)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    model_sd = load_torch_file(paths["model.pt"], mmap=False)
    scale_sd = load_torch_file(paths["scale.pt"], mmap=False)
    tensors = convert_state_dict(model_sd, scale_sd, weight_bits, group_size)
    cfg.pop("quantization_config", None)
    emb, head = tensors.get("model.embed_tokens.weight"), tensors.get("lm_head.weight")
    # DeepCompressor's rotation changes lm_head and the embedding differently: the result is untied.
    cfg["tie_word_embeddings"] = bool(head is None or (emb is not None and torch.equal(emb, head)))
    cfg["torch_dtype"] = "float16"
    save_checkpoint(output, tensors, cfg, Precision(weight_bits, kv_bits), group_size, tokenizer_dir=model_dir,
                    fmt=fmt)
    from types import SimpleNamespace

    inspect_checkpoint(output, SimpleNamespace(**cfg))
    print(f"[convert] wrote {Precision(weight_bits, kv_bits).name} group {group_size} checkpoint to {output}",
          file=sys.stderr)
    return output
