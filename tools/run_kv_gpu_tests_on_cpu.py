"""Runs tests/test_cuda_kv.py's test functions on CPU with CPU implementations of the qserve KV ops:
write/gather = reference, decode = the warp emulator of kv_decode.cuh.  Dev check of the test harness + emulator."""
import math
import sys
import time

import numpy as np
import torch

sys.path.insert(0, "/work/main/.wt/kvkern")
sys.path.insert(0, "/tmp/emu")
import emulate_decode as emu  # noqa: E402
from vllm_qserve import attention_ops  # noqa: E402,F401
from vllm_qserve.reference import kv as ref  # noqa: E402


def layout_of(cache, h, d, bits):
    return ref.KVCacheLayout(h, d, attention_ops.cache_block_size(cache, h, d, bits), bits)


def write_cpu(key, value, kv_cache, slot_mapping, num_kv_heads, bits):
    t = key.shape[0]
    if t == 0:
        return
    cache = kv_cache.view(torch.uint8)
    lay = layout_of(cache, num_kv_heads, key.shape[2], bits)
    sm = slot_mapping[:t].long()
    keep = (sm >= 0) & (sm < cache.shape[0] * lay.block_size)
    ref.write_kv_cache(key[keep], value[keep], cache, sm[keep], lay)


def gather_cpu(kv_cache, block_table, seq_lens, cu, key_out, value_out, num_kv_heads, bits):
    lay = layout_of(kv_cache, num_kv_heads, key_out.shape[2], bits)
    for b in range(seq_lens.shape[0]):
        s = int(seq_lens[b])
        if s <= 0:
            continue
        k, v = ref.gather_kv(kv_cache, block_table[b], s, lay)
        r0 = int(cu[b])
        key_out[r0:r0 + s] = k.to(key_out.dtype)
        value_out[r0:r0 + s] = v.to(value_out.dtype)


def heuristic(batch, h, group, d, max_tokens, sms=132):
    hpc = 16 if (group > 8 and d <= 128) else 8
    chunks = (group + hpc - 1) // hpc
    ctas = batch * h * chunks
    want = (3 * sms + ctas - 1) // ctas
    by_len = max(1, max_tokens // 128)
    return max(1, min(want, by_len, 64))


def decode_cpu_splits(out, query, kv_cache, block_table, seq_lens, scale, num_kv_heads, bits, num_splits):
    b, hq, d = query.shape
    if num_splits <= 0:
        lay = layout_of(kv_cache, num_kv_heads, d, bits)
        num_splits = heuristic(b, num_kv_heads, hq // num_kv_heads, d, block_table.shape[1] * lay.block_size)
    res = emu.run_decode(bits, query.float().numpy(), kv_cache.view(torch.uint8).numpy(),
                         block_table[:b].numpy(), seq_lens[:b].numpy(), num_kv_heads, scale, num_splits,
                         query.dtype == torch.bfloat16)
    out.copy_(torch.from_numpy(res).to(out.dtype))


def decode_cpu(out, query, kv_cache, block_table, seq_lens, scale, num_kv_heads, bits):
    decode_cpu_splits(out, query, kv_cache, block_table, seq_lens, scale, num_kv_heads, bits, -1)


def num_splits_cpu(query, kv_cache, block_table, num_kv_heads, bits):
    b, hq, d = query.shape
    lay = layout_of(kv_cache, num_kv_heads, d, bits)
    return heuristic(b, num_kv_heads, hq // num_kv_heads, d, block_table.shape[1] * lay.block_size)


lib = torch.library.Library("qserve", "IMPL")
lib.impl("kv_cache_write", write_cpu, "CPU")
lib.impl("kv_gather_dequant", gather_cpu, "CPU")
lib.impl("kv_paged_decode", decode_cpu, "CPU")
lib.impl("kv_paged_decode_splits", decode_cpu_splits, "CPU")
lib.impl("kv_decode_num_splits", num_splits_cpu, "CPU")

import tests.test_cuda_kv as T  # noqa: E402

T.DEV = "cpu"
torch.manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)

which = sys.argv[2] if len(sys.argv) > 2 else "all"
cases = []
if which in ("all", "io"):
    cases += [
        ("write", lambda: T.test_cache_write_matches_reference(torch.bfloat16, 4, 128, 16)),
        ("write8", lambda: T.test_cache_write_matches_reference(torch.float16, 8, 64, 32)),
        ("write_int32", lambda: T.test_cache_write_int32_slots_contiguous_inputs_and_empty(4)),
        ("write_int8", lambda: T.test_cache_write_accepts_int8_cache_and_skips_out_of_range_slots()),
        ("roundtrip4", lambda: T.test_round_trip_bound(torch.bfloat16, 4)),
        ("roundtrip8", lambda: T.test_round_trip_bound(torch.float16, 8)),
        ("gather", lambda: T.test_gather_matches_reference(torch.bfloat16, 4, 128, 32)),
        ("gather8", lambda: T.test_gather_matches_reference(torch.float32, 8, 256, 64)),
    ]
if which in ("all", "decode"):
    cases += [
        ("matrix kv4 fp16 4:1", lambda: T.test_decode_matrix(torch.float16, 4, 128, (2, 8))),
        ("matrix kv8 bf16 9:1", lambda: T.test_decode_matrix(torch.bfloat16, 8, 64, (3, 27))),
        ("matrix kv4 bf16 32:1", lambda: T.test_decode_matrix(torch.bfloat16, 4, 64, (1, 32))),
        ("edge kv4", lambda: T.test_decode_edge_values(4)),
        ("edge kv8", lambda: T.test_decode_edge_values(8)),
        ("views", lambda: T.test_decode_zero_lengths_views_and_guard_rows()),
        ("end2end", lambda: T.test_write_then_decode_end_to_end()),
    ]
if which == "splits":
    cases += [("splits", lambda: T.test_decode_explicit_splits_agree(4))]
if which == "d256":
    cases += [("d256", lambda: T.test_decode_head_dim_256(8, torch.bfloat16))]

for name, fn in cases:
    t0 = time.time()
    fn()
    print(f"PASS {name} ({time.time() - t0:.1f} s)", flush=True)
