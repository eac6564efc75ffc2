"""The KV4/KV8 backend's sliding-window support on CPU (Gemma 2/3 local layers): the reference attention against a
dense masked computation with out-of-window blocks poisoned, and the CUDA prefill path's cut of the context.

Through vLLM end to end (quantize -> Gemma3ForCausalLM + KV4 backend -> generate = reference):
tests/test_gemma3_quantize.py; on the GPU: tests/test_cuda_kv.py (window decode / prefill), test_gpu_gemma3.py.
"""

import pytest
import torch

from vllm_qserve.reference import kv as ref


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window_reference_equals_dense_mask(window):
    """paged_attention with a window = softmax over the in-window positions only (q - k < W), for prefill chunks,
    continuations and decodes; it must not read blocks that lie wholly before the window (they are poisoned)."""
    torch.manual_seed(window)
    layout = ref.KVCacheLayout(num_kv_heads=2, head_dim=64, block_size=16, bits=4)
    seq_lens, q_lens = [70, 33, 9], [30, 1, 9]
    nblk = [(s + 15) // 16 for s in seq_lens]
    cache = layout.allocate(sum(nblk) + 1)
    block_table = torch.zeros(3, max(nblk), dtype=torch.int32)
    nxt, ks, vs = 1, [], []
    for b, s in enumerate(seq_lens):
        block_table[b, :nblk[b]] = torch.arange(nxt, nxt + nblk[b])
        nxt += nblk[b]
        k, v = torch.randn(s, 2, 64), torch.randn(s, 2, 64)
        slots = (block_table[b, torch.arange(s) // 16].long() * 16 + torch.arange(s) % 16)
        ref.write_kv_cache(k, v, cache, slots, layout)
        ks.append(k), vs.append(v)
    # poison every block that lies wholly before each sequence's first query's window: NaN scales
    data, scale, zero = layout.views(cache)
    for b, s in enumerate(seq_lens):
        first_read = max(0, s - q_lens[b] - window + 1) // 16
        for j in range(first_read):
            scale[int(block_table[b, j])] = float("nan")
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor(q_lens), 0)))
    query = torch.randn(int(qsl[-1]), 4, 64)
    out = ref.paged_attention(query, cache, block_table, torch.tensor(seq_lens), qsl, layout, sliding_window=window)
    assert not out.isnan().any()
    for b, s in enumerate(seq_lens):
        q = query[qsl[b]:qsl[b + 1]]
        kd = ref.dequantize_kv(*ref.quantize_kv(ks[b], 4)).repeat_interleave(2, 1)  # independent of the cache
        vd = ref.dequantize_kv(*ref.quantize_kv(vs[b], 4)).repeat_interleave(2, 1)
        qpos = torch.arange(s - q.shape[0], s)[:, None]
        kpos = torch.arange(s)[None, :]
        allowed = (kpos <= qpos) & (qpos - kpos < window)
        logits = torch.einsum("qhd,khd->hqk", q, kd) / 8.0
        logits = logits.masked_fill(~allowed[None], float("-inf"))
        want = torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), vd)
        torch.testing.assert_close(out[qsl[b]:qsl[b + 1]], want, rtol=1e-5, atol=1e-5)


def test_window_prefill_metadata_cut():
    """The CUDA prefill path's cut of the context for a window: whole blocks before the first query's window are
    dropped from the block table, lengths shrink by whole blocks, and FlashAttention's bottom-right window sees
    every in-window position."""
    from vllm_qserve.attention.backend import QServePrefillMetadata
    from vllm_qserve.attention.kernels import CudaKVKernel

    seq = torch.tensor([70, 33, 9, 100], dtype=torch.int32)
    ql = torch.tensor([30, 1, 9, 100], dtype=torch.int32)
    bt = torch.arange(4 * 8, dtype=torch.int32).view(4, 8) + 100
    cu_k = torch.zeros(5, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(seq, 0)
    p = QServePrefillMetadata(block_table=bt, seq_lens=seq.clone(), cu_seqlens_q=torch.zeros(5, dtype=torch.int32),
                              cu_seqlens_k=cu_k, max_query_len=100, max_seq_len=100, total_kv_tokens=int(cu_k[-1]),
                              seq_lens_cpu=seq, query_lens_cpu=ql)
    for window in (1, 16, 17, 64, 4096):
        cut = CudaKVKernel._window_prefill(p, window, block_size=16)
        assert CudaKVKernel._window_prefill(p, window, block_size=16) is cut  # cached per window
        for b in range(4):
            first_needed = max(0, int(seq[b]) - int(ql[b]) - window + 1)
            skipped = int(seq[b]) - int(cut.seq_lens_cpu[b])
            assert skipped % 16 == 0 and skipped <= first_needed < skipped + 16
            assert torch.equal(cut.block_table[b, :(int(cut.seq_lens_cpu[b]) + 15) // 16],
                               bt[b, skipped // 16:(int(seq[b]) + 15) // 16])
        assert int(cut.cu_seqlens_k[-1]) == cut.total_kv_tokens == int(cut.seq_lens_cpu.sum())
