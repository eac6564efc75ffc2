"""`QServeConfig`: the `qserve` quantization method as vLLM sees it.

Sources of truth, in order: the checkpoint's ``quantization_config`` (``quant_method: qserve``, picked up with no
flag), else the tensors themselves (official zoo checkpoints have no quantization_config; the group size follows
from ``s1_szeros`` vs ``s2_scales``).  When both exist they must agree.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from vllm_qserve.checkpoint import CheckpointError, inspect_checkpoint, mode_name
from vllm_qserve.precision import check_group_size, parse_precision
from vllm_qserve.reference.activation import check_activation_sum

logger = init_logger(f"vllm.{__name__}")  # under "vllm." so vLLM's log handlers print it

QUANT_METHOD_NAMES = ("qserve", "qoq")


class QServeConfig(QuantizationConfig):
    def __init__(self, weight_bits: int | None = None, group_size: int | None = None, kv_bits: int = 16,
                 modules_to_not_convert: list[str] | None = None, key_center: bool = False,
                 activation_sum: str = "input"):
        super().__init__()
        if weight_bits is not None and weight_bits not in (4, 8):
            raise ValueError(f"qserve: weight_bits must be 4 or 8, got {weight_bits}")
        if kv_bits not in (4, 8, 16):
            raise ValueError(f"qserve: kv_bits must be 4, 8 or 16, got {kv_bits}")
        self.weight_bits = weight_bits
        self.group_size = None if group_size is None else check_group_size(group_size, weight_bits or 4)
        self.kv_bits = kv_bits
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.key_center = bool(key_center)  # attention layers carry k_center (attention/key_center_method.py)
        # Per-channel W4A8's activation sum (reference/activation.py): "input" = QServe's sum of the unquantized
        # activations (the zoo's checkpoints, and the default); "quantized" = the sum of the int8 activations, so
        # that the GEMM computes x_hat . W exactly, what `vllm-qserve quantize` calibrates for and writes.
        self.activation_sum = check_activation_sum(activation_sum, "qserve: quantization_config.activation_sum")
        self.dummy_weights = False

    def __repr__(self) -> str:
        return (f"QServeConfig(weight_bits={self.weight_bits}, group_size={self.group_size}, "
                f"kv_bits={self.kv_bits}, key_center={self.key_center}, activation_sum={self.activation_sum!r})")

    # --- vLLM interface ---------------------------------------------------------------------------------------
    def get_name(self) -> str:
        return "qserve"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        # QServe itself is fp16-only; bf16 works the same way here, fp32 serves the CPU reference path.
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # int8 mma.sync (Ampere and newer)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # no separate file: without a quantization_config, QServeConfig() + checkpoint inspection

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QServeConfig":
        method = str(config.get("quant_method", "qserve")).lower()
        if method not in QUANT_METHOD_NAMES:
            raise ValueError(f"qserve: quantization_config has quant_method {method!r}, expected 'qserve'")
        weight_bits, kv_bits = None, 16
        if "precision" in config:
            p = parse_precision(config["precision"])
            weight_bits, kv_bits = p.weight_bits, p.kv_bits
        weight_bits = cls.get_from_keys_or(config, ["weight_bits", "wbits", "bits"], weight_bits)
        kv_bits = cls.get_from_keys_or(config, ["kv_bits", "kv_cache_bits"], kv_bits)
        group_size = cls.get_from_keys_or(config, ["group_size", "q_group_size"], None)
        return cls(weight_bits=None if weight_bits is None else int(weight_bits),
                   group_size=group_size, kv_bits=int(kv_bits),
                   modules_to_not_convert=config.get("modules_to_not_convert"),
                   key_center=bool(config.get("key_center", False)),
                   activation_sum=str(config.get("activation_sum", "input")))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if str(hf_quant_cfg.get("quant_method", "")).lower() in QUANT_METHOD_NAMES:
            return "qserve"
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if any(m in prefix for m in self.modules_to_not_convert):
                return UnquantizedLinearMethod()
            from vllm_qserve.fusion.install import install_pass_manager_hook
            from vllm_qserve.linear import QServeLinearMethod

            install_pass_manager_hook()  # compiled graphs of this model get the fused norm/SiLU quantizers
            return QServeLinearMethod(self, prefix)
        if self.key_center:
            from vllm.model_executor.layers.attention.attention import Attention

            if isinstance(layer, Attention):
                from vllm_qserve.attention.key_center_method import QServeKeyCenterMethod

                return QServeKeyCenterMethod(self)
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None):
        """Reconcile the declared settings with the tensors, before any parameter is created."""
        if load_format_is_dummy():
            self.dummy_weights = True
        model_dir = model_name if os.path.isdir(model_name) else _try_local_snapshot(model_name, revision)
        if self.dummy_weights or (model_dir is not None and not _has_weight_files(model_dir)):
            # Nothing to inspect: a config-only folder for load_format=dummy (vLLM calls this method before it
            # sets the config context, so "dummy" is only known for sure in create_weights).  Without dummy
            # loading, vLLM itself reports the missing weight files.
            self.weight_bits = self.weight_bits or 4
            if self.group_size is None:
                raise ValueError(f"qserve: {model_name} has no weight files to read the group size from; with "
                                 f"load_format=dummy put group_size (-1 or 128) into its quantization_config")
            return
        if model_dir is None:
            if self.group_size is None or self.weight_bits is None:
                raise CheckpointError(f"qserve: cannot inspect {model_name!r} (not a local folder, not in the HF "
                                      f"cache) to detect its group size; download it first or pass "
                                      f"--hf-overrides with a quantization_config")
            return
        info = inspect_checkpoint(model_dir, hf_config)
        for attr, found in (("weight_bits", info.weight_bits), ("group_size", info.group_size)):
            declared = getattr(self, attr)
            if declared is not None and declared != found:
                raise CheckpointError(f"qserve: quantization_config says {attr}={declared} but the checkpoint's "
                                      f"tensors are {attr}={found} (a {mode_name(info.weight_bits, info.group_size)} checkpoint)")
            setattr(self, attr, found)
        logger.info("qserve: %s checkpoint, W%dA8 %s, KV %s", model_dir, self.weight_bits,
                    "per-channel" if self.group_size == -1 else f"group {self.group_size}",
                    "model dtype" if self.kv_bits == 16 else f"{self.kv_bits}-bit")


def load_format_is_dummy() -> bool:
    """True while vLLM builds a model for load_format=dummy (random weights, benchmarks)."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    return vllm_config is not None and str(vllm_config.load_config.load_format) == "dummy"


def _has_weight_files(model_dir: str) -> bool:
    return any(name.endswith((".safetensors", ".bin", ".pt")) for name in os.listdir(model_dir))


def _try_local_snapshot(model_name: str, revision: str | None):
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_name, revision=revision, local_files_only=True)
    except Exception:
        return None
