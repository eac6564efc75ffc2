"""vLLM parameters for QServe tensors: tile-aware tensor-parallel slicing, checked loads, coverage tracking.

vLLM's stock parameters assert shapes without saying which tensor failed, slice packed weights along the input
dim as if bytes were input-ordered (wrong for QServe's 32x32 tiles), and, for quantized models, never check that
every parameter was loaded.  These subclasses fix all three for the tensors QServe uses.
"""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import ChannelQuantScaleParameter, GroupQuantScaleParameter, ModelWeightParameter

from vllm_qserve.checkpoint import CheckpointError
from vllm_qserve.packing import slice_packed_input_dim


class _CheckedLoadMixin:
    """Validates dtype and shape of each loaded tensor and records which output rows were written."""

    def _setup_checks(self, name: str, allowed_dtypes: tuple):
        self.qserve_name = name
        self.allowed_dtypes = allowed_dtypes
        self._filled = torch.zeros(self.data.shape[self.output_dim], dtype=torch.bool)

    def _check_dtype(self, w: torch.Tensor):
        if w.dtype not in self.allowed_dtypes:
            raise CheckpointError(f"tensor {self.qserve_name} has dtype {w.dtype}, expected "
                                  f"{' or '.join(str(d) for d in self.allowed_dtypes)}")

    def _check_shape(self, got: torch.Tensor, expected: tuple, what: str):
        if tuple(got.shape) != tuple(expected):
            raise CheckpointError(f"tensor {self.qserve_name}{what} has shape {list(got.shape)}, expected "
                                  f"{list(expected)}")

    def _check_source(self, w: torch.Tensor, shard_size: int, slots: int, what: str):
        """The on-disk tensor must match our shard on every dim but the output dim, which holds `slots` shards."""
        expected = list(self.data.shape)
        expected[self.output_dim] = shard_size * slots
        self._check_shape(w, tuple(expected), what)

    def load_column_parallel_weight(self, loaded_weight):
        self._check_dtype(loaded_weight)
        self._check_source(loaded_weight, self.data.shape[self.output_dim], self.tp_size, "")
        super().load_column_parallel_weight(loaded_weight.to(self.data.dtype))
        self._filled[:] = True

    def load_merged_column_weight(self, loaded_weight, **kwargs):
        self._check_dtype(loaded_weight)
        if "shard_offset" not in kwargs:
            raise CheckpointError(f"tensor {self.qserve_name}: fused-on-disk tensors without shard ids are not "
                                  f"supported; store q/k/v and gate/up separately as QServe does")
        off, size = kwargs["shard_offset"], kwargs["shard_size"]
        what = f" (shard {kwargs.get('shard_id')})"
        self._check_source(loaded_weight, size, self.tp_size, what)
        super().load_merged_column_weight(loaded_weight.to(self.data.dtype), **kwargs)
        self._filled[off:off + size] = True

    def load_qkv_weight(self, loaded_weight, **kwargs):
        self._check_dtype(loaded_weight)
        off, size, shard_id = kwargs["shard_offset"], kwargs["shard_size"], kwargs["shard_id"]
        slots = self.tp_size if shard_id == "q" else max(1, self.tp_size // kwargs["num_heads"])
        self._check_source(loaded_weight, size, slots, f" (shard {shard_id})")
        super().load_qkv_weight(loaded_weight.to(self.data.dtype), **kwargs)
        self._filled[off:off + size] = True

    def check_fully_loaded(self):
        if not bool(self._filled.all()):
            missing = (~self._filled).nonzero().flatten()
            raise CheckpointError(f"tensor {self.qserve_name} was never loaded (output rows {int(missing[0])}.."
                                  f"{int(missing[-1])} missing): the checkpoint lacks it")
        del self._filled


class QServePackedWeight(_CheckedLoadMixin, ModelWeightParameter):
    """qweight int8 [N, K/2] in QServe's 32x32-tile layout.  Row-parallel splits cut whole tiles."""

    def load_row_parallel_weight(self, loaded_weight):
        self._check_dtype(loaded_weight)
        n, k_part = self.data.shape[0], self.data.shape[1] * 2
        self._check_shape(loaded_weight, (n, k_part * self.tp_size // 2), "")
        shard = slice_packed_input_dim(loaded_weight, self.tp_rank * k_part, k_part)
        self.data.copy_(shard)
        self._filled[:] = True


class QServeRowSplitWeight(_CheckedLoadMixin, ModelWeightParameter):
    """Unpacked [N, K] tensors (W8A8 weight): plain slices on both dims."""

    def load_row_parallel_weight(self, loaded_weight):
        self._check_dtype(loaded_weight)
        n, k_part = self.data.shape
        self._check_shape(loaded_weight, (n, k_part * self.tp_size), "")
        super().load_row_parallel_weight(loaded_weight)
        self._filled[:] = True


class QServeGroupScale(_CheckedLoadMixin, GroupQuantScaleParameter):
    """s2_scales / s2_zeros int8 [K/128, N]: column-parallel on dim 1, row-parallel on dim 0 (whole groups)."""

    def load_row_parallel_weight(self, loaded_weight):
        self._check_dtype(loaded_weight)
        g_part, n = self.data.shape
        self._check_shape(loaded_weight, (g_part * self.tp_size, n), "")
        super().load_row_parallel_weight(loaded_weight)
        self._filled[:] = True


class QServeChannelScale(_CheckedLoadMixin, ChannelQuantScaleParameter):
    """s1_scales / s1_szeros / dequant_scale [N]: per output channel, copied whole by row-parallel layers."""

    def load_row_parallel_weight(self, loaded_weight):
        self._check_dtype(loaded_weight)
        self._check_shape(loaded_weight, tuple(self.data.shape), "")
        self.data.copy_(loaded_weight.to(self.data.dtype))
        self._filled[:] = True
