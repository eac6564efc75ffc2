"""Reading and validating QServe checkpoints before vLLM loads a single weight.

Official zoo checkpoints carry no quantization_config: the mode is whatever tensors are present
(``s2_scales``/``s2_zeros`` -> group 128, ``s1_szeros`` -> per-channel, ``weight`` + ``dequant_scale`` -> W8A8).
``inspect_checkpoint`` reads only headers (safetensors) or a memory-mapped ``torch.load(weights_only=True)``
(.bin/.pt), checks every projection of every layer against the model config, and raises one clear error
naming the first problem.  Nothing here ever unpickles arbitrary objects.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
from dataclasses import dataclass, field

import torch

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
W4_PER_CHANNEL = ("qweight", "s1_scales", "s1_szeros")
W4_PER_GROUP = ("qweight", "s1_scales", "s2_scales", "s2_zeros")
W8 = ("weight", "dequant_scale")
QUANT_SUFFIXES = ("qweight", "s1_scales", "s1_szeros", "s2_scales", "s2_zeros", "dequant_scale")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.(\w+)$")


class CheckpointError(ValueError):
    """A QServe checkpoint that cannot be served as it is; the message names the file or tensor at fault."""


@dataclass
class TensorMeta:
    dtype: torch.dtype
    shape: tuple


@dataclass
class CheckpointInfo:
    files: list
    tensors: dict = field(default_factory=dict)  # name -> TensorMeta
    weight_bits: int | None = None
    group_size: int | None = None


def checkpoint_files(model_dir: str) -> list:
    """The weight files vLLM will load: *.safetensors if any, else *.bin / *.pt."""
    st = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if st:
        return st
    pt = sorted(glob.glob(os.path.join(model_dir, "*.bin")) + glob.glob(os.path.join(model_dir, "*.pt")))
    if not pt:
        raise CheckpointError(f"no *.safetensors, *.bin or *.pt weight file in {model_dir}")
    return pt


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_safetensors_header(path: str) -> dict:
    """Parse the header ourselves, before vLLM memory-maps a byte of the file, so that an untrusted or damaged
    file gets an error naming the tensor at fault: every entry must have a known dtype, a shape of non-negative
    ints and data offsets whose length is exactly shape x dtype, and the tensors must tile the data buffer with
    no overlap, no hole and nothing past its end (the safetensors rules; a file that breaks them would otherwise
    reach the weight loader, or hand a kernel the bytes of another tensor)."""
    import json
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    data_bytes = size - 8 - n
    metas, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{path}: corrupt safetensors header: the entry of tensor {name} needs dtype, "
                                  f"shape and data_offsets")
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} has shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name} has data_offsets {offsets!r}")
        start, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if start < 0 or end - start != nbytes:
            raise CheckpointError(f"{path}: tensor {name} has data offsets [{start}, {end}) ({end - start} bytes) "
                                  f"but shape {list(shape)} and dtype {entry['dtype']} need {nbytes} bytes: the "
                                  f"header is corrupt")
        if end > data_bytes:
            raise CheckpointError(f"{path}: tensor {name} has data offsets [{start}, {end}) that run past the end "
                                  f"of the file ({data_bytes} data bytes): the file is truncated or corrupt")
        metas[name] = TensorMeta(dtype, tuple(shape))
        spans.append((start, end, name))
    covered, last = 0, None
    for start, end, name in sorted(spans):
        if start < covered:
            raise CheckpointError(f"{path}: tensor {name} (bytes [{start}, {end})) overlaps tensor {last}, which "
                                  f"ends at byte {covered}: the header is corrupt")
        if start > covered:
            raise CheckpointError(f"{path}: bytes [{covered}, {start}) before tensor {name} belong to no tensor "
                                  f"(safetensors allows no holes): the header is corrupt")
        covered, last = end, name
    if covered != data_bytes:
        raise CheckpointError(f"{path}: the tensors end at data byte {covered} but the file holds {data_bytes}: "
                              f"the header is corrupt or the file has trailing bytes")
    return metas


def load_torch_file(path: str, mmap: bool = True) -> dict:
    """torch.load with weights_only=True; turns the usual failures into errors a user can act on."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # legacy (non-zip) format cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
            else:
                raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the file holds pickled objects other than tensors "
                              f"(loaded with weights_only=True; {str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint, it is truncated or corrupt "
                              f"({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict of name -> tensor, got {type(obj).__name__}")
    return obj


def read_tensor_metas(path: str) -> dict:
    if path.endswith(".safetensors"):
        return _read_safetensors_header(path)
    return {k: TensorMeta(v.dtype, tuple(v.shape)) for k, v in load_torch_file(path).items()}


def _expected_shapes(hf_config) -> dict:
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = hf_config.intermediate_size
    return {  # projection -> (N = out features, K = in features)
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


def expected_tensors(n: int, k: int, weight_bits: int, group_size: int) -> dict:
    """name suffix -> (allowed dtypes, shape) for one projection of N outputs and K inputs."""
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if weight_bits == 8:
        return {"weight": ((torch.int8,), (n, k)), "dequant_scale": (floats, (n,))}
    out = {"qweight": ((torch.int8,), (n, k // 2)), "s1_scales": (floats, (n,))}
    if group_size == -1:
        out["s1_szeros"] = (floats, (n,))
    else:
        out["s2_scales"] = ((torch.int8,), (k // group_size, n))
        out["s2_zeros"] = ((torch.int8,), (k // group_size, n))
    return out


def check_projection_dims(name: str, n: int, k: int, weight_bits: int, group_size: int) -> None:
    if n % 32:
        raise CheckpointError(f"{name}: output dim {n} is not a multiple of 32, which QServe's packed layout needs")
    if weight_bits == 4 and k % 32:
        raise CheckpointError(f"{name}: input dim {k} is not a multiple of 32, which QServe's packed layout needs")
    if group_size == 128 and k % 128:
        raise CheckpointError(f"{name}: input dim {k} is not a multiple of 128, so group-128 quantization cannot "
                              f"apply; use a per-channel (group_size -1) checkpoint for this model")


def mode_name(weight_bits: int, group_size: int) -> str:
    if weight_bits == 8:
        return "W8A8"
    return "W4A8 per-channel" if group_size == -1 else f"W4A8 group-{group_size}"


def detect_mode(tensors: dict) -> tuple[int, int]:
    """(weight_bits, group_size) from the tensors present; raises on a mix."""
    kinds = {}
    for name in tensors:
        m = _LAYER_RE.match(name)
        if m is None:
            if name.rsplit(".", 1)[-1] in QUANT_SUFFIXES:
                raise CheckpointError(f"quantized tensor {name} does not follow Llama-style layer names "
                                      f"(model.layers.N.self_attn.{{q,k,v,o}}_proj / mlp.{{gate,up,down}}_proj); "
                                      f"qserve serves Llama-architecture checkpoints")
            continue
        layer, proj, suffix = m.groups()
        if suffix == "s2_scales":
            kinds[f"{layer}.{proj}"] = (4, 128)
        elif suffix == "s1_szeros":
            kinds[f"{layer}.{proj}"] = (4, -1)
        elif suffix == "dequant_scale":
            kinds[f"{layer}.{proj}"] = (8, -1)
    modes = set(kinds.values())
    if not modes:
        raise CheckpointError("no QServe-quantized projection found (no s1_szeros, s2_scales or dequant_scale "
                              "tensors): this is not a QServe checkpoint")
    if len(modes) > 1:
        examples = {mode: key for key, mode in kinds.items()}
        desc = ", ".join(f"layer {key} is {mode_name(*m)}"
                         for m, key in examples.items())
        raise CheckpointError(f"mixed quantization modes in one checkpoint ({desc}); qserve needs one group size "
                              f"and weight width for every layer")
    return modes.pop()


def inspect_checkpoint(model_dir: str, hf_config=None) -> CheckpointInfo:
    files = checkpoint_files(model_dir)
    info = CheckpointInfo(files=files)
    for path in files:
        info.tensors.update(read_tensor_metas(path))
    info.weight_bits, info.group_size = detect_mode(info.tensors)
    if hf_config is not None:
        validate_tensors(info, hf_config)
    return info


def validate_tensors(info: CheckpointInfo, hf_config) -> None:
    shapes = _expected_shapes(hf_config)
    for proj, (n, k) in shapes.items():  # model-level problems first: they explain every tensor-level one
        check_projection_dims(f"model.layers.*.{proj}", n, k, info.weight_bits, info.group_size)
    for layer in range(hf_config.num_hidden_layers):
        for proj, (n, k) in shapes.items():
            prefix = f"model.layers.{layer}.{proj}"
            for suffix, (dtypes, shape) in expected_tensors(n, k, info.weight_bits, info.group_size).items():
                name = f"{prefix}.{suffix}"
                meta = info.tensors.get(name)
                if meta is None:
                    raise CheckpointError(f"checkpoint is missing tensor {name} "
                                          f"({mode_name(info.weight_bits, info.group_size)} "
                                          f"layout expects {', '.join(expected_tensors(n, k, info.weight_bits, info.group_size))})")
                if meta.dtype not in dtypes:
                    raise CheckpointError(f"tensor {name} has dtype {meta.dtype}, expected "
                                          f"{' or '.join(str(d) for d in dtypes)}")
                if tuple(meta.shape) != tuple(shape):
                    raise CheckpointError(f"tensor {name} has shape {list(meta.shape)}, expected {list(shape)} "
                                          f"for a projection of {n} outputs x {k} inputs")
    validate_key_centers(info, hf_config)


KEY_CENTER = "self_attn.attn.k_center"  # the mean pre-RoPE key of a layer (reference/key_center.py)


def key_center_name(layer: int) -> str:
    """Checkpoint name of layer's key centre: vLLM's attention module (self_attn.attn) plus .k_center."""
    return f"model.layers.{layer}.{KEY_CENTER}"


def validate_key_centers(info: CheckpointInfo, hf_config) -> None:
    """A checkpoint that declares key_center (attention/key_center_method.py) has one fp [Hkv * D] centre per layer;
    centres without the declaration would reach vLLM's loader as unknown tensors."""
    qcfg = getattr(hf_config, "quantization_config", None)
    declared = bool(qcfg.get("key_center")) if isinstance(qcfg, dict) else False
    present = sorted(k for k in info.tensors if k.endswith("." + KEY_CENTER))
    if present and not declared:
        raise CheckpointError(f"checkpoint has key centres ({present[0]}, ...) but its quantization_config does not "
                              f"declare key_center: true")
    if not declared:
        return
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    for layer in range(hf_config.num_hidden_layers):
        name = key_center_name(layer)
        meta = info.tensors.get(name)
        if meta is None:
            raise CheckpointError(f"quantization_config declares key_center but the checkpoint is missing {name}")
        floats = (torch.float16, torch.bfloat16, torch.float32)
        if meta.dtype not in floats or tuple(meta.shape) != (kv_heads * head_dim,):
            raise CheckpointError(f"tensor {name} is {meta.dtype} {list(meta.shape)}; a key centre is a float "
                                  f"[{kv_heads * head_dim}] (num_key_value_heads x head_dim)")
