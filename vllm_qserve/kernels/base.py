"""What a QServe linear kernel is: it says whether it can run a layer, prepares the weights once, and runs it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from vllm_qserve.reference.activation import ACTIVATION_SUM_MODES, NO_SUM


@dataclass(frozen=True)
class LinearSpec:
    weight_bits: int  # 4 or 8
    group_size: int  # -1 (per-channel) or 128
    out_features: int  # this rank's partition
    in_features: int  # this rank's partition
    act_dtype: torch.dtype
    device_type: str  # "cuda", "cpu", ...
    activation_sum: str = "input"  # per-channel W4A8's xsum: "input" (QServe's) or "quantized" (config.py)

    @property
    def sum_mode(self) -> int:
        """The quantizer's sum_mode for this layer (reference/activation.py): a sum for per-channel W4A8 only."""
        if self.weight_bits != 4 or self.group_size != -1:
            return NO_SUM
        return ACTIVATION_SUM_MODES[self.activation_sum]

    @property
    def mode(self) -> str:
        if self.weight_bits == 8:
            return "w8a8"
        return "w4a8-per-channel" if self.group_size == -1 else f"w4a8-g{self.group_size}"


class QServeLinearKernel(ABC):
    name: str = "?"

    def __init__(self, spec: LinearSpec):
        self.spec = spec

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LinearSpec) -> tuple[bool, str | None]:
        """(True, None) or (False, the reason in words)."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Turn the checkpoint parameters of `layer` into whatever this kernel reads at run time."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., K] in the activation dtype -> [..., N] in the activation dtype."""
