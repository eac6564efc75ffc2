"""The configurations an end-to-end benchmark compares, and the config-only model folders they run on.

A configuration is a name ("w4a8kv4-pc", "fp8", ...) plus what it changes: a ``quantization_config`` written into
the model folder's config.json, vLLM engine arguments and environment variables.  Every configuration runs on
random weights (``load_format="dummy"``): vLLM's own filler for BF16/FP8/GPTQ, ours (vllm_qserve/dummy_weights.py)
for QServe, so no checkpoint is needed and the 8B models cost nothing to "download".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS_DIR = os.path.join(REPO_ROOT, "benchmarks", "models")
MODEL_NAMES = ("llama-3-8b", "llama-2-7b", "mistral-7b")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    description: str
    quantization_config: dict | None = None  # written into config.json
    engine_kwargs: dict = field(default_factory=dict)  # vllm.LLM(...) arguments
    env: dict = field(default_factory=dict)
    gpu_only: bool = False  # vLLM cannot run it on CPU (fp8, Triton int4 KV, Marlin)

    @property
    def is_qserve(self) -> bool:
        return bool(self.quantization_config) and self.quantization_config.get("quant_method") == "qserve"


def _qserve(name: str, weight_bits: int, group_size: int, kv_bits: int, key_center: bool = False) -> BenchConfig:
    precision = f"w{weight_bits}a8" + ("" if kv_bits == 16 else f"kv{kv_bits}")
    kv = {4: "QServe KV4", 8: "QServe KV8", 16: "16-bit KV (FlashAttention)"}[kv_bits]
    gs = "per-channel" if group_size == -1 else f"group {group_size}"
    qcfg = {"quant_method": "qserve", "precision": precision, "weight_bits": weight_bits, "group_size": group_size,
            "kv_bits": kv_bits}
    if key_center:  # dummy weights give a zero centre: same numbers, but the key-centred path and its cost
        qcfg["key_center"] = True
    return BenchConfig(name, f"ours: W{weight_bits}A8 {gs}, {kv}" + (", centred keys" if key_center else ""),
                       quantization_config=qcfg, engine_kwargs={"quantization": "qserve"})


# GPTQ W4A16 g128 (symmetric, no act-order) read by vLLM's gptq_marlin method; on dummy weights its qweight and
# g_idx are whatever torch.empty held (every int4 pattern is a valid weight; g_idx is unused without act-order)
# and its scales are vLLM's uniform(-1e-3, 1e-3).
_GPTQ_W4 = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}

CONFIGS: dict[str, BenchConfig] = {c.name: c for c in (
    _qserve("w4a8kv4-pc", 4, -1, 4),
    _qserve("w4a8kv4-g128", 4, 128, 4),
    _qserve("w4a8kv8-pc", 4, -1, 8),
    _qserve("w4a8kv16-pc", 4, -1, 16),
    _qserve("w8a8kv4", 8, -1, 4),
    _qserve("w4a8kv4-pc-kc", 4, -1, 4, key_center=True),  # not in DEFAULT_CONFIGS: the path of --key-center
    BenchConfig("bf16", "vLLM BF16 weights, BF16 KV (FlashAttention 3 on Hopper)"),
    BenchConfig("fp8", "vLLM FP8 W8A8 (dynamic per-token activations) + FP8 KV",
                engine_kwargs={"quantization": "fp8", "kv_cache_dtype": "fp8"}, gpu_only=True),
    BenchConfig("bf16-int4kv", "vLLM BF16 + int4_per_token_head KV (Triton attention)",
                engine_kwargs={"kv_cache_dtype": "int4_per_token_head"}, gpu_only=True),
    # vLLM picks Machete before Marlin on Hopper; switching Machete off gives the Marlin kernel the name promises.
    BenchConfig("marlin-w4a16", "vLLM GPTQ W4A16 g128, Marlin kernel, BF16 KV",
                quantization_config=_GPTQ_W4, engine_kwargs={"quantization": "gptq_marlin"},
                env={"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}, gpu_only=True),
    BenchConfig("machete-w4a16", "vLLM GPTQ W4A16 g128, vLLM's default kernel (Machete on Hopper), BF16 KV",
                quantization_config=_GPTQ_W4, engine_kwargs={"quantization": "gptq_marlin"}, gpu_only=True),
)}
DEFAULT_CONFIGS = ("w4a8kv4-pc", "w4a8kv4-g128", "w4a8kv8-pc", "w4a8kv16-pc", "w8a8kv4",
                   "bf16", "fp8", "bf16-int4kv", "marlin-w4a16")


def parse_configs(spec: str) -> list[BenchConfig]:
    names = DEFAULT_CONFIGS if spec in ("all", "") else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    return [CONFIGS[n] for n in names]


def resolve_model(model: str) -> str:
    """A name from benchmarks/models (llama-3-8b, ...) or a folder holding a config.json."""
    folder = model if os.path.isdir(model) else os.path.join(MODELS_DIR, model)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"model {model!r}: neither a folder with a config.json nor one of "
                         f"{', '.join(sorted(os.listdir(MODELS_DIR)))} (in {MODELS_DIR})")
    return os.path.abspath(folder)


def write_model_folder(base_folder: str, config: BenchConfig, out_dir: str) -> str:
    """A config-only model folder for `config`: the base config.json plus its quantization_config, if any."""
    with open(os.path.join(base_folder, "config.json")) as f:
        hf_config = json.load(f)
    hf_config.pop("quantization_config", None)
    if config.quantization_config is not None:
        hf_config["quantization_config"] = dict(config.quantization_config)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return out_dir


def child_env(config: BenchConfig) -> dict:
    """Environment of a benchmark's engine or server process: the configuration's variables, this checkout's
    vllm_qserve first on PYTHONPATH (also for the engine processes vLLM spawns), and the settings the project's
    machines need (no FlashInfer sampler; on CPU a 1 GiB KV cache)."""
    env = dict(os.environ)
    env.update(config.env)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env
