"""CPU checks of the sm_90a wgmma GEMM's design claims (no GPU needed, < 1 s).

csrc/gemm_sm90/w4a8_wgmma_kernel.cuh feeds QServe's packed weights to register-A wgmma without a re-layout.
Here the kernel's index arithmetic is replayed in Python on a random packed tensor: for every warpgroup warp,
lane, k32 step, m64 block and A register byte, the byte the kernel takes (tile byte lane*16 + word*4 + e,
nibble = block) must be the 4-bit code of the (row, k) that wgmma's A fragment layout assigns to that register
(PTX ISA: row 16*warp + lane/4 + 8*(reg&1), k = 4*(lane%4) + 16*(reg>>1) + e), with rows mapped to channels by
the kernel's permutation (block b, row 16w+i <-> channel 32w + 16b + i).  The same is done for the group-128
s2 byte each register uses.  Also: the kernel class declines cleanly off Hopper.
"""

from __future__ import annotations

import pytest
import torch

from vllm_qserve.packing import pack_w4, permute_s2


def _kernel_row_to_channel(warp: int, block: int, row_in_warp: int) -> int:
    return 32 * warp + 16 * block + row_in_warp


def test_register_a_fragments_match_packing():
    g = torch.Generator().manual_seed(0)
    n, k = 128, 128  # one warpgroup's channels x one pipeline stage
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = pack_w4(q).view(torch.uint8).reshape(-1)  # tile (nt, kt) at (nt*K/32 + kt)*512
    checked = 0
    for warp in range(4):  # warp w of the warpgroup reads packed tile (nt = w) only
        for ks in range(k // 32):
            tile = packed[(warp * (k // 32) + ks) * 512:(warp * (k // 32) + ks + 1) * 512]
            for lane in range(32):
                gq, t = lane // 4, lane % 4
                for block in range(2):
                    for reg in range(4):
                        for e in range(4):
                            byte = int(tile[lane * 16 + reg * 4 + e])
                            code = (byte >> (4 * block)) & 0xF
                            row = gq + 8 * (reg & 1)  # A fragment row inside the warp's 16
                            kk = ks * 32 + 4 * t + 16 * (reg >> 1) + e
                            ch = _kernel_row_to_channel(warp, block, row)
                            assert code == int(q[ch, kk]), (warp, ks, lane, block, reg, e)
                            checked += 1
    assert checked == n * k  # every weight of the stage is used exactly once


def test_group_scale_bytes_match_permutation():
    g = torch.Generator().manual_seed(1)
    n = 256
    s2 = torch.randint(1, 127, (1, n), generator=g, dtype=torch.int32)
    stored = permute_s2(s2.to(torch.int8)).view(torch.uint8).reshape(-1)
    for ntl in range(n // 32):
        warp = ntl % 4
        for lane in range(32):
            word = stored[ntl * 32 + (lane // 4) * 4: ntl * 32 + (lane // 4) * 4 + 4]
            for block in range(2):
                for h in range(2):  # h = reg & 1: rows g (h=0) and g+8 (h=1)
                    got = int(word[2 * block + h])
                    ch = (ntl - warp) * 32 + _kernel_row_to_channel(warp, block, lane // 4 + 8 * h)
                    assert got == int(s2[0, ch]), (ntl, lane, block, h)


def test_wgmma_kernel_declines_off_hopper(monkeypatch):
    pytest.importorskip("vllm")
    from vllm_qserve.kernels import cuda_sm90
    from vllm_qserve.kernels.base import LinearSpec

    cpu = LinearSpec(4, -1, 4096, 4096, torch.bfloat16, "cpu")
    ok, why = cuda_sm90.CudaSm90WgmmaKernel.can_implement(cpu)
    assert not ok and "cpu" in why
    w8 = LinearSpec(8, -1, 4096, 4096, torch.bfloat16, "cuda")
    ok, why = cuda_sm90.CudaSm90WgmmaKernel.can_implement(w8)
    assert not ok and "W8A8" in why
    monkeypatch.setenv("QSERVE_WGMMA_MIN_M", "300")
    assert cuda_sm90.wgmma_min_m(4096) == 300
    monkeypatch.delenv("QSERVE_WGMMA_MIN_M")
    assert cuda_sm90.wgmma_min_m(4096) == cuda_sm90.WGMMA_MIN_M == 129  # o, down
    assert cuda_sm90.wgmma_min_m(6144) == cuda_sm90.WGMMA_MIN_M  # qkv
    assert cuda_sm90.wgmma_min_m(28672) == cuda_sm90.WGMMA_MIN_M_WIDE < cuda_sm90.WGMMA_MIN_M  # gate_up


def test_sm90_ops_have_fake_implementations():
    """vLLM compiles the model with torch.compile: the wgmma ops must trace under fake tensors with the shapes and
    dtypes of the real kernels (the GPU tests check the values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vllm_qserve.gemm_sm90_ops import sm90_ops_available

    ok, why = sm90_ops_available()
    if not ok:
        pytest.skip(why)
    m, n, k = 37, 256, 512
    with FakeTensorMode():
        xq = torch.empty(m, k, dtype=torch.int8)
        sx = torch.empty(m, dtype=torch.float16)
        xsum = torch.empty(m, dtype=torch.float16)
        qweight = torch.empty(n, k // 2, dtype=torch.int8)
        s1 = torch.empty(n, dtype=torch.float16)
        out = torch.ops.qserve.w4a8_gemm_per_channel_sm90(xq, sx, xsum, qweight, s1, s1, None, torch.bfloat16, 64)
        assert out.shape == (m, n) and out.dtype == torch.bfloat16
        s2 = torch.empty(k // 128, n, dtype=torch.int8)
        out = torch.ops.qserve.w4a8_gemm_per_group_sm90(xq, sx, qweight, s1, s2, s2, None, torch.float16, 512)
        assert out.shape == (m, n) and out.dtype == torch.float16
