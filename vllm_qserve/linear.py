"""The QServe checkpoint scheme for vLLM linear layers: creates and loads the parameters, nothing else.

Which code runs the GEMM is decided after loading by `kernels.choose_kernel` (a kernel class says whether it
can implement the layer), so this module never changes when a kernel is added.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method

from vllm_qserve.checkpoint import CheckpointError, check_projection_dims
from vllm_qserve.config import load_format_is_dummy
from vllm_qserve.dummy_weights import fill_dummy_qserve_weights
from vllm_qserve.kernels import LinearSpec, choose_kernel
from vllm_qserve.parameters import (
    QServeChannelScale,
    QServeGroupScale,
    QServePackedWeight,
    QServeRowSplitWeight,
)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INT8 = (torch.int8,)


@register_weight_loader_v2_supported_method
class QServeLinearMethod(LinearMethodBase):
    def __init__(self, quant_config, prefix: str):
        self.config = quant_config
        self.prefix = prefix
        self.kernel = None
        self.dummy_weights = False

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        cfg = self.config
        if cfg.group_size is None:
            raise CheckpointError("qserve: the group size is unknown (no quantization_config and the checkpoint "
                                  "could not be inspected); pass --hf-overrides "
                                  "'{\"quantization_config\": {\"quant_method\": \"qserve\", \"group_size\": 128}}'")
        n, k = sum(output_partition_sizes), input_size_per_partition
        for part in output_partition_sizes:
            if part % 32:
                raise CheckpointError(f"{self.prefix}: an output partition of {part} channels is not a multiple of "
                                      f"32 (QServe packs 32-row tiles); use a smaller tensor-parallel size")
        check_projection_dims(self.prefix, n, k, cfg.weight_bits, cfg.group_size)
        loader = extra_weight_attrs["weight_loader"]
        # load_format=dummy: vLLM fills nothing valid (see dummy_weights.py); we fill after its loader ran.
        self.dummy_weights = cfg.dummy_weights or load_format_is_dummy()

        def add(name, param_cls, data, allowed, **dims):
            param = param_cls(data=data, weight_loader=loader, **dims)
            param._setup_checks(f"{self.prefix}.{name}", allowed)
            if self.dummy_weights:
                param._filled[:] = True
            layer.register_parameter(name, param)

        if cfg.weight_bits == 8:
            add("weight", QServeRowSplitWeight, torch.empty(n, k, dtype=torch.int8), _INT8, input_dim=1, output_dim=0)
            add("dequant_scale", QServeChannelScale, torch.empty(n, dtype=torch.float16), _FLOATS, output_dim=0)
        else:
            add("qweight", QServePackedWeight, torch.empty(n, k // 2, dtype=torch.int8), _INT8,
                input_dim=1, output_dim=0)
            add("s1_scales", QServeChannelScale, torch.empty(n, dtype=torch.float16), _FLOATS, output_dim=0)
            if cfg.group_size == -1:
                add("s1_szeros", QServeChannelScale, torch.empty(n, dtype=torch.float16), _FLOATS, output_dim=0)
            else:
                g = k // cfg.group_size
                for name in ("s2_scales", "s2_zeros"):
                    add(name, QServeGroupScale, torch.empty(g, n, dtype=torch.int8), _INT8,
                        input_dim=0, output_dim=1)
        layer.qserve_spec = LinearSpec(cfg.weight_bits, cfg.group_size, n, k, params_dtype, "?", cfg.activation_sum)

    def process_weights_after_loading(self, layer):
        if self.dummy_weights:
            s = layer.qserve_spec
            fill_dummy_qserve_weights(layer, s.weight_bits, s.group_size, s.in_features, self.prefix)
        for p in list(layer.parameters(recurse=False)):
            if hasattr(p, "check_fully_loaded"):
                p.check_fully_loaded()
        s = layer.qserve_spec
        device_type = next(p for p in layer.parameters(recurse=False)).device.type
        spec = LinearSpec(s.weight_bits, s.group_size, s.out_features, s.in_features, s.act_dtype, device_type,
                          s.activation_sum)
        self.kernel = choose_kernel(spec)
        self.kernel.process_weights_after_loading(layer)

    def apply(self, layer, x, bias=None):
        return self.kernel.apply(layer, x, bias)
