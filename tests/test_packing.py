import pytest
import torch

from vllm_qserve.packing import pack_w4, permute_s2, slice_packed_input_dim, unpack_w4, unpermute_s2


def _byte_formula(q, n, k):
    """The layout written out literally, one byte at a time (docs/format.md)."""
    out = torch.zeros(n * k // 2, dtype=torch.uint8)
    for nt in range(n // 32):
        for kt in range(k // 32):
            for r in range(8):
                for t in range(4):
                    for kh in range(2):
                        for nh in range(2):
                            for e in range(4):
                                byte = (nt * (k // 32) + kt) * 512 + (r * 4 + t) * 16 + kh * 8 + nh * 4 + e
                                row, col = nt * 32 + nh * 8 + r, kt * 32 + kh * 16 + t * 4 + e
                                out[byte] = q[row, col] | (q[row + 16, col] << 4)
    return out


def test_pack_matches_literal_layout():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (64, 96), generator=g, dtype=torch.uint8)
    assert torch.equal(pack_w4(q).view(torch.uint8).reshape(-1), _byte_formula(q, 64, 96))


@pytest.mark.parametrize("n,k", [(32, 32), (64, 128), (96, 64), (288, 576), (1024, 256)])
def test_pack_round_trip(n, k):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_w4(q)
    assert packed.dtype == torch.int8 and packed.shape == (n, k // 2)
    assert torch.equal(unpack_w4(packed), q)


def test_pack_edges_and_errors():
    for value in (0, 15):
        q = torch.full((32, 32), value, dtype=torch.uint8)
        assert torch.equal(unpack_w4(pack_w4(q)), q)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_w4(torch.zeros(48, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_w4(torch.full((32, 32), 16))


def test_s2_order():
    s = torch.arange(64)
    p = permute_s2(s)
    assert p[:8].tolist() == [0, 8, 16, 24, 1, 9, 17, 25]
    assert p[32:36].tolist() == [32, 40, 48, 56]
    for n in range(64):  # stored position p = (n % 8) * 4 + (n % 32) // 8 inside each 32
        assert p[(n // 32) * 32 + (n % 8) * 4 + (n % 32) // 8] == n
    x = torch.randn(3, 96)
    assert torch.equal(unpermute_s2(permute_s2(x)), x)


@pytest.mark.parametrize("start,length", [(0, 64), (64, 64), (32, 96), (0, 128)])
def test_input_dim_slice_is_tile_aware(start, length):
    q = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    shard = slice_packed_input_dim(pack_w4(q), start, length)
    assert torch.equal(unpack_w4(shard), q[:, start:start + length])
    with pytest.raises(ValueError, match="multiples of 32"):
        slice_packed_input_dim(pack_w4(q), 16, 32)
