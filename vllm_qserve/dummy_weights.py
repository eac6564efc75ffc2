"""Random but *valid* QServe weights for ``load_format="dummy"`` (benchmarks without a checkpoint).

vLLM's dummy loader (``weight_utils.initialize_single_dummy_weight``) fills floating-point tensors with
uniform(-1e-3, 1e-3) and leaves integer tensors as ``torch.empty`` left them: whatever bytes the allocator had.
For QServe that gives negative level-1 scales and, for group 128, level-2 scales and zeros that break the kernel's
byte arithmetic (q * s2 must stay <= 255 and (q - z) * s2 inside int8), so a benchmark would time garbage and
could run into inf/NaN after a few layers.

`fill_dummy_qserve_weights` overwrites a layer's checkpoint tensors, in place and on their own device, with what
a real quantizer could have written:

* 4-bit codes: uniform random bytes.  Every byte is two codes in [0, 15] and the packing is a permutation of
  positions, so uniform bytes are exactly "uniform random codes in QServe's layout".
* per-channel: s1 around 0.5 / (4.6 sqrt(K)) (4.6 = std of a code minus a middle zero point) so that
  W = s1 * (q - z) has std ~0.5 / sqrt(K) and activations neither blow up nor vanish through 32 layers;
  zero point z in {7, 8}, stored as s1_szeros = z * s1.
* group 128: level-2 scale s2 in [1, 8] and zero z in [0, 15]: then q * s2 <= 120 <= 255 and (q - z) * s2 lies in
  [-120, 120], inside int8, for every code; s2_zeros holds the byte of -(z * s2).  s1 scales the resulting
  int8 weights to the same std as above.
* W8A8: int8 weights uniform in [-127, 127], dequant_scale to the same std.

Values are drawn from a generator seeded per layer (from its name), so runs are repeatable.
"""

from __future__ import annotations

import math
import zlib

import torch

TARGET_WEIGHT_STD = 0.5  # std of W * sqrt(K): each linear maps unit-variance inputs to ~0.5-variance outputs
_CODE_STD = math.sqrt((16 ** 2 - 1) / 12)  # std of a uniform code in 0..15 (4.61)
_S2_MAX = 8  # level-2 scales 1..8: 15 * 8 = 120 keeps q * s2 and (q - z) * s2 inside one signed byte


def _generator(device: torch.device, name: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return g


def _randint(low: int, high: int, like: torch.Tensor, gen: torch.Generator, dtype=None) -> torch.Tensor:
    """Uniform integers in [low, high] with `like`'s shape and device (inclusive bounds)."""
    return torch.randint(low, high + 1, like.shape, generator=gen, device=like.device, dtype=dtype or torch.int32)


def _fill_scale(param: torch.Tensor, value_std: float, k: int, gen: torch.Generator) -> None:
    """Channel scales so that scale * (integer of std value_std) has std TARGET_WEIGHT_STD / sqrt(K), +-25%."""
    base = TARGET_WEIGHT_STD / (value_std * math.sqrt(k))
    jitter = 0.75 + 0.5 * torch.rand(param.shape, generator=gen, device=param.device, dtype=torch.float32)
    param.copy_((base * jitter).to(param.dtype))


@torch.no_grad()
def fill_dummy_qserve_weights(layer: torch.nn.Module, weight_bits: int, group_size: int, in_features: int,
                              name: str = "") -> None:
    """Overwrite the QServe checkpoint tensors of `layer` (created by QServeLinearMethod) with valid random ones."""
    k = in_features
    any_param = next(p for p in layer.parameters(recurse=False))
    gen = _generator(any_param.device, name or f"{type(layer).__name__}.{k}")
    if weight_bits == 8:
        w = layer.weight.data
        w.copy_(_randint(-127, 127, w, gen, torch.int8))  # drawn as int8: no wider temporary on the device
        _fill_scale(layer.dequant_scale.data, 254 / math.sqrt(12), k, gen)
        return
    qweight = layer.qweight.data
    qweight.copy_(_randint(-128, 127, qweight, gen, torch.int8))  # any byte = two valid 4-bit codes
    if group_size == -1:
        s1 = layer.s1_scales.data
        _fill_scale(s1, _CODE_STD, k, gen)
        zero = _randint(7, 8, s1, gen).to(torch.float32)
        layer.s1_szeros.data.copy_((zero * s1.float()).to(layer.s1_szeros.dtype))
        return
    s2 = _randint(1, _S2_MAX, layer.s2_scales.data, gen)
    zero = _randint(0, 15, s2, gen)
    zero_byte = torch.remainder(-(zero * s2), 256)  # two's-complement byte of -(z * s2)
    layer.s2_scales.data.copy_(s2.to(torch.int8))
    layer.s2_zeros.data.copy_(torch.where(zero_byte > 127, zero_byte - 256, zero_byte).to(torch.int8))
    # w8 = (q - z) * s2: with q and z uniform over 0..15 and s2 over 1..8, std(w8) = sqrt(2) * 4.61 * E[s2^2]^0.5
    s2_rms = math.sqrt(sum(v * v for v in range(1, _S2_MAX + 1)) / _S2_MAX)
    _fill_scale(layer.s1_scales.data, math.sqrt(2) * _CODE_STD * s2_rms, k, gen)
