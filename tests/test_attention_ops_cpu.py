"""CPU tests of vllm_qserve/attention_ops.py: page geometry helpers, the fake (meta) implementations of the KV ops
and their use under torch.compile.  The kernels themselves are tested on the GPU (tests/test_cuda_kv.py)."""

from __future__ import annotations

import pytest
import torch

from vllm_qserve import attention_ops
from vllm_qserve.reference import kv as ref

needs_ops = pytest.mark.skipif(not attention_ops.HAS_KV_OPS, reason="vllm_qserve._C (KV ops) not built")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("h,d,bs", [(1, 64, 16), (8, 128, 16), (2, 256, 64), (3, 128, 32)])
def test_page_geometry_matches_reference_layout(bits, h, d, bs):
    layout = ref.KVCacheLayout(h, d, bs, bits)
    assert attention_ops.page_bytes(h, d, bs, bits) == layout.page_bytes
    cache = layout.allocate(5)
    assert attention_ops.cache_block_size(cache, h, d, bits) == bs
    assert attention_ops.cache_block_size(cache.view(torch.int8), h, d, bits) == bs


def test_page_geometry_errors():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        attention_ops.page_bytes(8, 128, 16, 3)
    cache = ref.KVCacheLayout(8, 128, 16, 4).allocate(2)
    with pytest.raises(ValueError, match="num_kv_heads=3"):  # 8 * 16 * 68 is not a multiple of 3 * 68
        attention_ops.cache_block_size(cache, 3, 128, 4)
    with pytest.raises(ValueError, match=r"\[num_blocks, 2,"):
        attention_ops.cache_block_size(cache[:, 0], 8, 128, 4)


def _meta_inputs(b=3, h=2, hq=8, d=128, bs=16, bits=4):
    m = "meta"
    cache = torch.empty(4, 2, attention_ops.page_bytes(h, d, bs, bits), dtype=torch.uint8, device=m)
    q = torch.empty(b, hq, d, dtype=torch.bfloat16, device=m)
    bt = torch.empty(b, 4, dtype=torch.int32, device=m)
    sl = torch.empty(b, dtype=torch.int32, device=m)
    return cache, q, bt, sl


@needs_ops
def test_fakes_run_on_meta_tensors():
    cache, q, bt, sl = _meta_inputs()
    out = attention_ops.paged_decode(q, cache, bt, sl, 2, 4)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == "meta"
    out2 = attention_ops.paged_decode(q, cache, bt, sl, 2, 4, softmax_scale=0.2, out=out, num_splits=3)
    assert out2 is out
    kv = torch.empty(5, 2, 128, dtype=torch.float16, device="meta")
    assert torch.ops.qserve.kv_cache_write(kv, kv, cache, torch.empty(5, dtype=torch.long, device="meta"), 2, 4) is None
    k, v = attention_ops.gather_dequant(cache, bt, sl, sl, 2, 128, 4, total_rows=11, dtype=torch.float32)
    assert k.shape == v.shape == (11, 2, 128) and k.dtype == torch.float32


@needs_ops
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_ops_trace_under_torch_compile(backend):
    """fullgraph tracing (what vLLM's compiled model does with custom ops), including functionalization of the
    in-place outputs (aot_eager)."""
    torch._dynamo.reset()

    def step(key, value, cache, slots, q, bt, sl):
        torch.ops.qserve.kv_cache_write(key, value, cache, slots, 2, 4)
        out = torch.empty_like(q)
        torch.ops.qserve.kv_paged_decode(out, q, cache, bt, sl, 0.125, 2, 4)
        k = torch.empty(7, 2, 128, dtype=q.dtype, device=q.device)
        v = torch.empty_like(k)
        torch.ops.qserve.kv_gather_dequant(cache, bt, sl, sl, k, v, 2, 4)
        return out * 2, k + v

    cache, q, bt, sl = _meta_inputs()
    kv = torch.empty(3, 2, 128, dtype=torch.bfloat16, device="meta")
    slots = torch.empty(3, dtype=torch.long, device="meta")
    out, kv_sum = torch.compile(step, fullgraph=True, backend=backend)(kv, kv, cache, slots, q, bt, sl)
    assert out.shape == q.shape and kv_sum.shape == (7, 2, 128)
