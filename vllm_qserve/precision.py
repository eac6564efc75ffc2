"""QServe precision strings (QServe's --precision flag) and the quantization settings they stand for."""

from __future__ import annotations

from dataclasses import dataclass

GROUP_SIZES = (-1, 128)


@dataclass(frozen=True)
class Precision:
    weight_bits: int  # 4 (W4A8) or 8 (W8A8)
    kv_bits: int  # 4, 8, or 16 (= the model dtype, vLLM's own KV cache)

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a8" + ("" if self.kv_bits == 16 else f"kv{self.kv_bits}")


PRECISIONS = {
    p.name: p
    for p in (Precision(w, kv) for w in (4, 8) for kv in (4, 8, 16))
}
PRECISIONS["w4a8kv16"] = Precision(4, 16)
PRECISIONS["w8a8kv16"] = Precision(8, 16)


def parse_precision(name: str) -> Precision:
    key = str(name).strip().lower()
    if key not in PRECISIONS:
        raise ValueError(f"unsupported QServe precision {name!r}; supported: {sorted(set(PRECISIONS))}")
    return PRECISIONS[key]


def check_group_size(group_size: int, weight_bits: int = 4) -> int:
    try:
        group_size = int(group_size)
    except (TypeError, ValueError):
        raise ValueError(f"QServe group_size must be -1 (per-channel) or 128, got {group_size!r}") from None
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported QServe group size {group_size}: only -1 (per-channel) and 128 exist")
    if weight_bits == 8 and group_size != -1:
        raise ValueError("W8A8 QServe checkpoints are per-channel only (group_size -1)")
    return group_size
