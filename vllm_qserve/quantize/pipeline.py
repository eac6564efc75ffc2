"""``vllm-qserve quantize``: a Hugging Face folder or a GGUF in, a QServe checkpoint out.

    method qoq   the QoQ recipe (vllm_qserve.quantize.qoq): rotation, SmoothAttention, smoothing, reorder, GPTQ
    method rtn   plain round-to-nearest of the original weights (vllm_qserve.convert.rtn), no calibration: the
                 baseline QoQ is measured against
    method none  the fp model itself as an fp16 Hugging Face checkpoint (the FP row of the accuracy tables; a
                 GGUF source is dequantized)

The output is written next to its destination and moved in at the end, so a killed run never leaves a folder
that looks finished.  ``quantize_log.json`` records the options, calibration and per-layer choices.
"""

from __future__ import annotations

import glob
import json
import re
import os
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from vllm_qserve.quantize.model import SUPPORTED_MODEL_TYPES, ArchSpec
from vllm_qserve.reference.activation import check_activation_sum

METHODS = ("qoq", "rtn", "none")


def load_source(path: str, work_dir: str) -> tuple:
    """(fp32 state dict, config dict, tokenizer folder) of a Hugging Face model folder or a .gguf file."""
    if path.endswith(".gguf"):
        from vllm_qserve.convert.gguf import load_gguf_as_hf

        hf_dir = os.path.join(work_dir, "hf")
        sd, cfg = load_gguf_as_hf(path, hf_dir)
        return sd, cfg, hf_dir
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {path}: expected a Hugging Face model folder (with config.json) or a "
                                f".gguf file")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("quantization_config"):
        raise ValueError(f"{path} is already quantized ({cfg['quantization_config'].get('quant_method')}); "
                         f"quantize the fp model")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    sd = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            sd.update(load_file(f))
    else:
        from vllm_qserve.checkpoint import load_torch_file

        files = sorted(glob.glob(os.path.join(path, "*.bin")))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weight files")
        for f in files:
            sd.update(load_torch_file(f, mmap=False))
    sd = {k: v.float() for k, v in sd.items() if "rotary_emb" not in k}
    if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
        sd, cfg = gemma3_language_model(sd, cfg)
    return sd, cfg, path


# Gemma3ForConditionalGeneration (MedGemma 4B, Gemma-3-4B/12B/27B-it) stores its Gemma 3 text model under one of
# these prefixes (older hub layout / transformers >= 4.52), next to a SigLIP vision tower and a projector.
_GEMMA3_MM_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_GEMMA3_MM_HEADS = ("language_model.lm_head.weight", "lm_head.weight")
_GEMMA3_MM_VISION = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def gemma3_language_model(sd: dict, cfg: dict) -> tuple:
    """The Gemma 3 text model inside a multimodal Gemma3ForConditionalGeneration checkpoint, as a text-only
    Gemma3ForCausalLM (state dict with HF text names, gemma3_text config).  The vision tower and projector are
    dropped: the quantized checkpoint serves text prompts only (docs/quantizer.md, "Quantize your own MedGemma")."""
    from transformers import Gemma3TextConfig

    text = {}
    dropped = 0
    for name, t in sd.items():
        prefix = next((p for p in _GEMMA3_MM_TEXT_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            text["model." + name[len(prefix):]] = t
        elif name in _GEMMA3_MM_HEADS:
            text["lm_head.weight"] = t
        elif name.startswith(_GEMMA3_MM_VISION):
            dropped += 1
        else:
            raise ValueError(f"multimodal Gemma 3 checkpoint: unexpected tensor {name!r} (neither the language "
                             f"model, the vision tower nor the projector)")
    if not text:
        raise ValueError("multimodal Gemma 3 checkpoint without language-model tensors "
                         f"(expected names starting with {' or '.join(_GEMMA3_MM_TEXT_PREFIXES)})")
    # the hub's text_config lists only what differs from Gemma3TextConfig's defaults: complete it
    text_cfg = Gemma3TextConfig(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"}).to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"):
        text_cfg.pop(key, None)
    text_cfg["model_type"] = "gemma3_text"
    text_cfg["architectures"] = ["Gemma3ForCausalLM"]
    text_cfg["tie_word_embeddings"] = "lm_head.weight" not in text or torch.equal(
        text["lm_head.weight"], text.get("model.embed_tokens.weight", torch.empty(0)))
    if text_cfg["tie_word_embeddings"]:
        text.pop("lm_head.weight", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(key) is not None and text_cfg.get(key) is None:
            text_cfg[key] = cfg[key]
    print(f"[quantize] multimodal Gemma 3: quantizing its language model as a text-only Gemma3ForCausalLM; "
          f"{dropped} vision-tower / projector tensors are not part of the output (images are not supported)",
          file=sys.stderr)
    return text, text_cfg


def check_quantizable(cfg: dict, weight_bits: int, group_size: int) -> None:
    """Fail before any work when the model cannot become this kind of QServe checkpoint."""
    from vllm_qserve.checkpoint import check_projection_dims

    a = ArchSpec.from_config(cfg)
    shapes = {"q_proj": (a.num_heads * a.head_dim, a.hidden_size), "k_proj": (a.num_kv_heads * a.head_dim,
              a.hidden_size), "o_proj": (a.hidden_size, a.num_heads * a.head_dim),
              "gate_proj": (a.intermediate_size, a.hidden_size), "down_proj": (a.hidden_size, a.intermediate_size)}
    for name, (n, k) in shapes.items():
        check_projection_dims(f"model.layers.*.{name}", n, k, weight_bits, group_size)


_PROJ_MODULE_RE = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.")


def _fp16_rest(sd: dict) -> dict:
    """Everything that is not part of a projection (embeddings, norms, lm_head), in fp16.  The projections'
    checkpoint tensors come from the quantizer; their simulation modules' own parameters are not written."""
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items() if not _PROJ_MODULE_RE.match(k)}


def check_tensor_names(tensors: dict, cfg: dict, weight_bits: int, group_size: int) -> None:
    """The checkpoint holds exactly what the format defines: no missing and no stray tensor."""
    from vllm_qserve.checkpoint import PROJECTIONS, expected_tensors, key_center_name

    a = ArchSpec.from_config(cfg)
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.get("tie_word_embeddings"):
        expected.add("lm_head.weight")
    norms = ("input_layernorm", "post_attention_layernorm")
    if a.gemma:
        norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")
    for i in range(a.num_layers):
        expected |= {f"model.layers.{i}.{n}.weight" for n in norms}
        for proj in PROJECTIONS:
            expected |= {f"model.layers.{i}.{proj}.{s}" for s in expected_tensors(1, GROUP_K, weight_bits, group_size)}
    biases = {k for k in tensors if k.endswith("_proj.bias")}
    centers = {key_center_name(i) for i in range(a.num_layers)} & set(tensors)
    stray = sorted(set(tensors) - expected - biases - centers)
    missing = sorted(expected - set(tensors))
    if stray or missing:
        raise RuntimeError(f"internal error: checkpoint tensors do not match the format (stray: {stray[:4]}, "
                           f"missing: {missing[:4]})")


GROUP_K = 128  # any K divisible by the group size: only the tensor names matter here


def quantize_model_dir(model: str, output: str, weight_bits: int = 4, group_size: int = -1, kv_bits: int = 4,
                       method: str = "qoq", calib: str | None = None, calib_samples: int | None = None,
                       calib_seq_len: int | None = None, device: str = "auto", seed: int = 0,
                       fmt: str = "safetensors", activation_sum: str = "quantized", **qoq_overrides) -> str:
    from vllm_qserve.checkpoint import inspect_checkpoint
    from vllm_qserve.convert.writer import copy_tokenizer_files, save_checkpoint
    from vllm_qserve.precision import Precision, check_group_size
    from vllm_qserve.quantize import calibration
    from vllm_qserve.quantize.model import CausalLM
    from vllm_qserve.quantize.qoq import QoQOptions, quantize_qoq

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    if kv_bits not in (4, 8, 16):
        raise ValueError(f"kv bits must be 4, 8 or 16, not {kv_bits}")
    group_size = check_group_size(group_size, weight_bits)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    t0 = time.perf_counter()
    check_activation_sum(activation_sum)
    log = {"source": os.path.abspath(model), "method": method, "weight_bits": weight_bits, "group_size": group_size,
           "kv_bits": kv_bits, "device": device, "seed": seed, "activation_sum": activation_sum}
    with tempfile.TemporaryDirectory(dir=parent, prefix=".qserve-quantize-") as tmp:
        sd, cfg, tok_dir = load_source(model, tmp)
        if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
            ArchSpec.from_config(cfg)  # raises the clear error
        if method != "none":
            check_quantizable(cfg, weight_bits, group_size)
        print(f"[quantize] read {model}: {cfg.get('model_type')}, {cfg['num_hidden_layers']} layers "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        out_dir = os.path.join(tmp, "out")
        os.makedirs(out_dir)
        cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config",)}
        cfg.setdefault("architectures", [SUPPORTED_MODEL_TYPES[cfg["model_type"]]])
        cfg["torch_dtype"] = "float16"
        if method == "none":
            from safetensors.torch import save_file

            if cfg.get("tie_word_embeddings"):
                sd.pop("lm_head.weight", None)
            save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()},
                      os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            copy_tokenizer_files(tok_dir, out_dir)
        elif method == "rtn":
            from vllm_qserve.convert.writer import quantize_state_dict

            tensors = quantize_state_dict(sd, weight_bits, group_size)
            save_checkpoint(out_dir, tensors, cfg, Precision(weight_bits, kv_bits), group_size, tok_dir, fmt,
                            activation_sum=activation_sum)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            lm = CausalLM(sd, cfg).to(device)
            del sd
            n = calib_samples or calibration.DEFAULT_SAMPLES
            length = calib_seq_len or calibration.DEFAULT_SEQ_LEN
            if calib:
                ids = calibration.text_file_windows(calib, tokenizer, n, length, seed)
                log["calibration"] = {"file": os.path.abspath(calib), "samples": n, "seq_len": length}
            else:
                ids = calibration.self_generated(lm, tokenizer, n, length, seed)
                log["calibration"] = {"self_generated": True, "samples": n, "seq_len": length,
                                      "start_token": calibration.start_token(tokenizer)}
            opts = QoQOptions(weight_bits=weight_bits, group_size=group_size, kv_bits=kv_bits, seed=seed,
                              activation_sum=activation_sum, **qoq_overrides)
            tensors = quantize_qoq(lm, ids.to(device), opts)
            rest = _fp16_rest(lm.hf_state_dict())
            tensors = {k: v.cpu() for k, v in {**rest, **tensors}.items()}
            cfg = dict(cfg, tie_word_embeddings=lm.arch.tie_word_embeddings)
            check_tensor_names(tensors, cfg, weight_bits, group_size)
            save_checkpoint(out_dir, tensors, cfg, Precision(weight_bits, kv_bits), group_size, tok_dir, fmt,
                            activation_sum=activation_sum)
            log["qoq"] = {k: v for k, v in asdict(opts).items() if k != "log"}
            log["layers"] = opts.log.get("layers")
        if method != "none":
            with open(os.path.join(out_dir, "config.json")) as f:
                inspect_checkpoint(out_dir, _config_object(json.load(f)))  # as vLLM will read it
        log["seconds"] = round(time.perf_counter() - t0, 1)
        with open(os.path.join(out_dir, "quantize_log.json"), "w") as f:
            json.dump(log, f, indent=1)
        os.makedirs(output, exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(out_dir):
            os.chmod(os.path.join(out_dir, name), 0o666 & ~umask)
            os.replace(os.path.join(out_dir, name), os.path.join(output, name))
    what = ("the fp16 model" if method == "none" else
            f"a {method} {Precision(weight_bits, kv_bits).name} group {group_size} checkpoint")
    print(f"[quantize] wrote {what} to {output} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return output


def _config_object(cfg: dict):
    from types import SimpleNamespace

    return SimpleNamespace(**cfg)
