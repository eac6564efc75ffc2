"""Tensor-parallel loading of QServe tensors, checked shard by shard against the unsharded math.

Column-parallel layers (q/k/v, gate/up) split output rows: whole 32-row tiles, so plain row slices of qweight
and of the natural-order s1 work, and s2's 32-channel permutation blocks stay intact.  Row-parallel layers
(o_proj, down_proj) split the *input* dim, which for qweight means whole 32x32 tiles, and for s2 whole groups.
"""

import pytest
import torch

import vllm.model_executor.parameter as vparam
from vllm_qserve import reference as ref
from vllm_qserve.config import QServeConfig
from vllm_qserve.convert.rtn import quantize_weight
from vllm_qserve.linear import QServeLinearMethod
from vllm_qserve.packing import unpack_w4

MODES = [(4, -1), (4, 128), (8, -1)]


def _make_layer(monkeypatch, rank, world, weight_bits, group_size, k_part, out_parts):
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: world)
    cfg = QServeConfig(weight_bits=weight_bits, group_size=group_size)
    method = QServeLinearMethod(cfg, "model.layers.0.test_proj")
    layer = torch.nn.Module()
    method.create_weights(layer, k_part, out_parts, k_part * world, sum(out_parts) * world, torch.float32,
                          weight_loader=None)
    return method, layer


def _natural(t, weight_bits, group_size):
    """Unsharded-math view of a tensor set: (integer weights [N, K], per-channel scale, extra)."""
    if weight_bits == 8:
        return t["weight"].long(), t["dequant_scale"].float()
    if group_size == -1:
        return unpack_w4(t["qweight"]).long(), t["s1_scales"].float()
    return ref.rebuild_w8_per_group(t["qweight"], t["s2_scales"], t["s2_zeros"]).long(), t["s1_scales"].float()


@pytest.mark.parametrize("weight_bits,group_size", MODES)
@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_split(monkeypatch, weight_bits, group_size, world):
    n, k = 64, 1024
    torch.manual_seed(0)
    w = torch.randn(n, k)
    full = quantize_weight(w, weight_bits, group_size)
    w_int, s_full = _natural(full, weight_bits, group_size)
    x = torch.randn(3, k)
    k_part = k // world
    partial_sum = torch.zeros(3, n, dtype=torch.float64)
    for rank in range(world):
        method, layer = _make_layer(monkeypatch, rank, world, weight_bits, group_size, k_part, [n])
        for name, tensor in full.items():
            getattr(layer, name).load_row_parallel_weight(tensor)
        shard = {name: getattr(layer, name).data.clone() for name in full}
        cols = slice(rank * k_part, (rank + 1) * k_part)
        shard_int, shard_s = _natural(shard, weight_bits, group_size)
        assert torch.equal(shard_int, w_int[:, cols]), "shard weights differ from the unsharded columns"
        assert torch.equal(shard_s, s_full)
        method.process_weights_after_loading(layer)
        x_r = x[:, cols]
        y_r = method.apply(layer, x_r).double()
        # the unsharded formula, restricted to this rank's columns and its own activation quantization
        xq, sx, xsum = ref.quantize_per_token(x_r, 1)
        expect = (xq.double() @ w_int[:, cols].double().t()) * sx.double()[:, None] * s_full.double()[None]
        if weight_bits == 4 and group_size == -1:
            expect -= xsum.double()[:, None] * full["s1_szeros"].double()[None]
        assert torch.allclose(y_r, expect, rtol=1e-5, atol=1e-4)
        partial_sum += y_r
    # all-reduce of the partials approximates the full-precision product
    assert (partial_sum.float() - x @ w.t()).norm() / (x @ w.t()).norm() < 0.15


@pytest.mark.parametrize("weight_bits,group_size", MODES)
def test_column_parallel_qkv_split(monkeypatch, weight_bits, group_size):
    """QKV with 4 q heads / 2 kv heads of dim 64 at TP=2: rank r gets q rows of its 2 heads and one kv head."""
    hidden, hd, world = 256, 64, 2
    torch.manual_seed(1)
    parts = {"q": torch.randn(4 * hd, hidden), "k": torch.randn(2 * hd, hidden), "v": torch.randn(2 * hd, hidden)}
    quant = {s: quantize_weight(w, weight_bits, group_size) for s, w in parts.items()}
    sizes = {"q": 2 * hd, "k": hd, "v": hd}
    for rank in range(world):
        method, layer = _make_layer(monkeypatch, rank, world, weight_bits, group_size, hidden, list(sizes.values()))
        offset = 0
        for s in ("q", "k", "v"):
            for name, tensor in quant[s].items():
                getattr(layer, name).load_qkv_weight(loaded_weight=tensor, shard_id=s, shard_offset=offset,
                                                     shard_size=sizes[s], num_heads=1)
            offset += sizes[s]
        got_int, got_s = _natural({name: getattr(layer, name).data for name in quant["q"]}, weight_bits, group_size)
        rows = []
        for s in ("q", "k", "v"):
            full_int, full_s = _natural(quant[s], weight_bits, group_size)
            sl = slice(rank * sizes[s], (rank + 1) * sizes[s])
            rows.append((full_int[sl], full_s[sl]))
        assert torch.equal(got_int, torch.cat([r[0] for r in rows]))
        assert torch.equal(got_s, torch.cat([r[1] for r in rows]))
        method.process_weights_after_loading(layer)  # every row was loaded


def test_missing_shard_is_reported(monkeypatch):
    method, layer = _make_layer(monkeypatch, 0, 1, 4, -1, 256, [128, 64, 64])
    q = quantize_weight(torch.randn(128, 256), 4, -1)
    for name, tensor in q.items():
        getattr(layer, name).load_qkv_weight(loaded_weight=tensor, shard_id="q", shard_offset=0, shard_size=128,
                                             num_heads=1)
    with pytest.raises(ValueError, match=r"model.layers.0.test_proj.qweight was never loaded \(output rows 128..255"):
        method.process_weights_after_loading(layer)


def test_wrong_shard_shape_is_reported(monkeypatch):
    method, layer = _make_layer(monkeypatch, 0, 2, 4, 128, 512, [64])
    bad = quantize_weight(torch.randn(64, 512), 4, 128)["qweight"]  # rank shard instead of the full tensor
    with pytest.raises(ValueError, match=r"test_proj.qweight has shape \[64, 256\], expected \[64, 512\]"):
        layer.qweight.load_row_parallel_weight(bad)
