"""Runs inside vLLM's worker (LLM.apply_model): feeds fixed random inputs to every loaded QServe linear layer."""

import torch

PROJS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


def probe_linears(model, path):
    """Writes {layer name: (x, y)} to `path` (results travel back through a file, not vLLM's RPC encoder)."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for i, layer in enumerate(model.model.layers):
        for part, name in PROJS:
            lin = getattr(getattr(layer, part), name)
            # the dtype the model runs in (a CUDA kernel only takes fp16/bf16 activations)
            dtype = lin.quant_method.kernel.spec.act_dtype
            x = (torch.randn(6, lin.input_size_per_partition, generator=g) * 2).to(
                next(iter(lin.parameters())).device, dtype)
            y = lin.quant_method.apply(lin, x, None)
            out[f"model.layers.{i}.{part}.{name}"] = (x.cpu(), y.cpu())  # in the model dtype
    torch.save(out, path)
    return len(out)
