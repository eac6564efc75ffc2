// Hopper (sm_90a) W4A8 GEMM on wgmma: both QServe modes, reading the checkpoint's packed weights as they are.
//
// The product is computed transposed, Y^T = W . X^T, so that the 4-bit weights are wgmma's operand A, which may
// come from registers (converted from 4-bit to int8 on the way), and the int8 activations are operand B, which
// must come from shared memory:
//
//   wgmma M  = weight channels (64 per instruction; a warpgroup owns 128 channels = two m64 blocks)
//   wgmma N  = tokens (kBN per CTA)
//   wgmma K  = input features (32 per instruction)
//
// Why QServe's packing fits register-A wgmma without a re-layout: in a packed 32x32 tile (32 channels x 32 k),
// lane (r, t)'s 16 bytes hold, in words x/y/z/w, channels {r, r+8} (low nibbles) and {r+16, r+24} (high
// nibbles) at k = 4t..4t+3 and 16+4t..16+4t+3.  wgmma's register A fragment for k32 s8 (PTX ISA, "Register
// fragments", = CUTLASS's ALayout_64x32) gives warp w of the warpgroup rows 16w + {g, g+8} (g = lane/4) at the
// same k offsets: a0 = (g, 4t..), a1 = (g+8, 4t..), a2 = (g, 16+4t..), a3 = (g+8, 16+4t..).  So one 16-byte
// shared-memory load per lane and k32 step gives warp w the A fragments of two m64 blocks:
//     block 0, row 16w + i  <->  channel 32w + i        (low nibbles:  x, y, z, w & 0x0F0F0F0F)
//     block 1, row 16w + i  <->  channel 32w + 16 + i   (high nibbles: (x, y, z, w >> 4) & 0x0F0F0F0F)
// i.e. the warpgroup's 128 channels are 4 packed tiles, warp w reads only tile w, no byte is loaded twice, and
// the row <-> channel map is a fixed permutation undone in the epilogue.
//
// Group-128 mode rebuilds w8 = q*s2 + s2_zero (byte-wise mod 256) in the same registers, exactly as the mma.sync
// kernel does; QServe's s2 permutation puts the four s2 bytes a lane needs (channels r, r+8, r+16, r+24 of its
// tile) in one 32-bit word.
//
// Pipeline (v1, no warp specialization): all threads copy each stage with 16-byte cp.async (activations into the
// 128-byte-swizzled K-major layout wgmma's descriptor expects, weights as their 512-byte tiles), kStages deep
// with a prefetch distance of kStages-1: the slot being refilled was last read by the previous stage's wgmmas,
// which every warpgroup has waited for (see consume_stage) before the barrier.  Each stage = 128 bytes of K =
// one 128-byte swizzle row = one quantization group = 4 k32 steps x 2 m64 blocks of wgmma per warpgroup.
//
// Epilogue: the reference's fp32 operations in its order (__fmul_rn etc., no contraction), then the tile is
// transposed through shared memory and written with 16-byte row-major stores (out is [M tokens, N channels]).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../gemm/epilogue_math.cuh"
#include "../gemm/qgemm_params.h"
#include "wgmma_ptx.cuh"

namespace qserve {
namespace gemm_sm90 {

using gemm::from_float;
using gemm::GemmParams;
using gemm::load_bias;
using gemm::Pair;

enum class Mode { kPerChannel, kPerGroup };

constexpr int kStageK = 128;  // bytes (= int8 k values) of K per pipeline stage: one 128-byte swizzle row

template <int WGS_, int BN_, int STAGES_>
struct Config {
  static constexpr int kWGs = WGS_;                  // consumer warpgroups, 128 channels each
  static constexpr int kBN = BN_;                    // tokens per CTA (wgmma N)
  static constexpr int kStages = STAGES_;
  static constexpr int kThreads = 128 * kWGs;
  static constexpr int kChannels = 128 * kWGs;       // channels per CTA
  static constexpr int kNTiles = kChannels / 32;     // packed 32-channel tiles per CTA
  static constexpr int kKTiles = kStageK / 32;       // packed k32 tiles per stage
  static constexpr int kAccPerBlock = kBN / 2;       // s32 accumulators per thread per m64 block
  static constexpr bool kStepPipelined = false;      // see consume_stage
  static_assert(kBN % 64 == 0 && kBN <= 128, "the kernel instantiates wgmma n64 and n128 only");
  static_assert(kStages >= 2, "prefetch distance kStages-1 must be >= 1");
};

// The epilogue's factors for one output tile, as fp32 in shared memory: per token sx and xsum, per channel the
// column scale, the per-channel zero term and the bias (0 where unused or outside M / N).  The consumer threads
// load them at the start of each tile, while its first stages are still in flight, and the barrier before the
// epilogue publishes them.  Why: read in the epilogue itself, these were a dozen dependent global loads per thread
// and tile, which the split-K reduction loop even issued one row at a time (~0.5 us each, serialized behind the
// previous row's stores): on the H100 at M = 256 that was about half of o_proj's 29 us.
template <class Cfg>
struct EpiFactors {
  static constexpr int kSx = 0, kXs = Cfg::kBN, kCs = 2 * Cfg::kBN;
  static constexpr int kCz = kCs + Cfg::kChannels, kCb = kCz + Cfg::kChannels;
  static constexpr int kCount = kCb + Cfg::kChannels;
  static constexpr int kBytes = kCount * 4;
};

// Threads t = 0 .. kLoaders-1 load the factors of the tile at (m0 tokens, n0 channels) into `ep`: every load of a
// thread first, then its stores, so the loads are in flight together (one memory latency, not one per value).
template <Mode MODE, class Cfg, int kLoaders>
__device__ __forceinline__ void load_epilogue_factors(const GemmParams& p, float* ep, int m0, int n0, int t) {
  using E = EpiFactors<Cfg>;
  constexpr int kPer = (E::kCount + kLoaders - 1) / kLoaders;
  float v[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = t + u * kLoaders;
    float x = 0.f;
    if (i < E::kCs) {  // sx, xsum of token i (or i - kBN)
      const int tok = i < E::kXs ? i : i - E::kXs, gm = m0 + tok;
      if (gm < p.M) {
        if (i < E::kXs) x = __ldg(p.sx + gm);
        else if (MODE == Mode::kPerChannel) x = __ldg(p.xsum + gm);
      }
    } else if (i < E::kCount) {  // column scale, zero term, bias of channel c
      const int which = (i - E::kCs) / Cfg::kChannels, col = n0 + (i - E::kCs) % Cfg::kChannels;
      if (col < p.N) {
        if (which == 0) x = __half2float(static_cast<const half*>(p.col_scale)[col]);
        else if (which == 1) x = MODE == Mode::kPerChannel ? __half2float(static_cast<const half*>(p.szeros)[col]) : 0.f;
        else x = p.bias_kind ? load_bias(p.bias, p.bias_kind, col) : 0.f;
      }
    }
    v[u] = x;
  }
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int i = t + u * kLoaders;
    if (i < E::kCount) ep[i] = v[u];
  }
}

template <Mode MODE, class Cfg>
struct Smem {
  static constexpr int kAct = Cfg::kBN * kStageK;                  // swizzled activation tile
  static constexpr int kW = Cfg::kNTiles * Cfg::kKTiles * 512;     // packed weight tiles
  static constexpr int kS2 = MODE == Mode::kPerGroup ? 2 * Cfg::kChannels : 0;  // s2 scales + zeros of the group
  static constexpr int kStage = (kAct + kW + kS2 + 1023) / 1024 * 1024;  // 1024-aligned (swizzle atom)
  static constexpr int kPipe = Cfg::kStages * kStage;
  static constexpr int kOutRow = Cfg::kChannels * 2 + 16;          // bytes per staged output row (padded)
  static constexpr int kOut = Cfg::kBN * kOutRow;
  static constexpr int kPipeAndOut = kPipe > kOut ? kPipe : kOut;
  // + mbarriers (v2: full/empty per stage, then 8 unused bytes), the epilogue factors, and slack to
  // align the base to 1024
  static constexpr int kEpi = kPipeAndOut + 16 * Cfg::kStages + 8;
  static constexpr int kTotal = kEpi + EpiFactors<Cfg>::kBytes + 1024;
};

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
// Byte-wise a + b mod 256 (see csrc/gemm/qgemm_ptx.cuh add_bytes): no carry between byte lanes.
__device__ __forceinline__ uint32_t add_bytes(uint32_t a, uint32_t b) {
  const uint32_t s = (a & 0x7f7f7f7fu) + (b & 0x7f7f7f7fu);
  return s ^ ((a ^ b) & 0x80808080u);
}

// ---------------------------------------------------------------------------------------------------------------
// global -> shared for one stage (all threads; 16-byte cp.async, zero-filled out of range).
template <Mode MODE, class Cfg>
__device__ __forceinline__ void load_stage(const GemmParams& p, uint32_t stage, int m0, int n0, int k0) {
  using L = Smem<MODE, Cfg>;
  const int tid = threadIdx.x;
  // Activations: kBN rows x 128 bytes, chunk c of row r stored at chunk c ^ (r % 8) (128-byte swizzle).
  constexpr int kActChunks = Cfg::kBN * 8;
#pragma unroll
  for (int i0 = 0; i0 < kActChunks; i0 += Cfg::kThreads) {
    const int i = i0 + tid;
    const int row = i >> 3, c = i & 7;
    const int gm = m0 + row;
    const bool v = gm < p.M;
    const int8_t* src = v ? p.a + (int64_t)gm * p.K + k0 + c * 16 : p.a;
    cp_async_16(stage + row * 128 + ((c ^ (row & 7)) << 4), src, v);
  }
  // Weights: kNTiles x kKTiles packed tiles; tile (nt, kt) of the checkpoint at byte (nt*K/32 + kt)*512.
  constexpr int kWChunks = Cfg::kNTiles * Cfg::kKTiles * 32;
  const int ktiles = p.K / 32, ntiles = p.N / 32;
  const uint32_t wbase = stage + L::kAct;
#pragma unroll
  for (int i0 = 0; i0 < kWChunks; i0 += Cfg::kThreads) {
    const int i = i0 + tid;
    const int tile = i >> 5, w = i & 31;
    const int ntl = tile / Cfg::kKTiles, ktl = tile % Cfg::kKTiles;
    const int nt = n0 / 32 + ntl, kt = k0 / 32 + ktl;
    const bool v = nt < ntiles;
    const int8_t* src = v ? p.b + ((int64_t)nt * ktiles + kt) * 512 + w * 16 : p.b;
    cp_async_16(wbase + tile * 512 + w * 16, src, v);
  }
  if constexpr (MODE == Mode::kPerGroup) {
    // The stage is exactly one group: kChannels s2 bytes then kChannels zero bytes (QServe's permuted order).
    constexpr int kRowChunks = Cfg::kChannels / 16;
    const int g = k0 / kStageK;
    const uint32_t sbase = wbase + L::kW;
    if (tid < 2 * kRowChunks) {
      const int which = tid / kRowChunks, c = tid % kRowChunks;
      const int gn = n0 + c * 16;
      const bool v = gn < p.N;
      const int8_t* srcb = which ? p.s2_zeros : p.s2_scales;
      const int8_t* src = v ? srcb + (int64_t)g * p.N + gn : srcb;
      cp_async_16(sbase + which * Cfg::kChannels + c * 16, src, v);
    }
  }
}

// The group-128 s2 scales and zeros a lane needs for a stage.  Bytes 0..3 of the lane group's word: channels r,
// r+8, r+16, r+24 of the warp's packed tile (block 0 rows g / g+8, block 1 rows g / g+8).
struct GroupBytes {
  uint32_t s_lo[2], s_hi[2], z_lo[2], z_hi[2];
};
template <Mode MODE, class Cfg>
__device__ __forceinline__ GroupBytes load_group_bytes(uint32_t stage, int wg, int warp, int lane) {
  using L = Smem<MODE, Cfg>;
  GroupBytes r{};
  if constexpr (MODE == Mode::kPerGroup) {
    const uint32_t sbase = stage + L::kAct + L::kW + (wg * 4 + warp) * 32 + (lane >> 2) * 4;
    const uint32_t sw = lds32(sbase), zw = lds32(sbase + Cfg::kChannels);
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      r.s_lo[b] = (sw >> (16 * b)) & 0xFFu;
      r.s_hi[b] = (sw >> (16 * b + 8)) & 0xFFu;
      r.z_lo[b] = __byte_perm(zw, 0, (2 * b) * 0x1111);      // byte 2b broadcast to all four byte lanes
      r.z_hi[b] = __byte_perm(zw, 0, (2 * b + 1) * 0x1111);
    }
  }
  return r;
}

// One k32 step: a lane's 16 packed bytes -> the int8 A fragments of both m64 blocks (low nibbles = block 0, high
// nibbles = block 1; group 128: w8 = q * s2 + zero, byte-wise).
template <Mode MODE>
__device__ __forceinline__ void convert_step(const uint4 v, const GroupBytes& gb, uint32_t (&a0)[4],
                                             uint32_t (&a1)[4]) {
  constexpr uint32_t kLo = 0x0F0F0F0Fu;
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    uint32_t(&a)[4] = b == 0 ? a0 : a1;
    const int sh = 4 * b;
    const uint32_t q0 = (v.x >> sh) & kLo, q1 = (v.y >> sh) & kLo, q2 = (v.z >> sh) & kLo, q3 = (v.w >> sh) & kLo;
    if constexpr (MODE == Mode::kPerGroup) {
      // q * s2 <= 255 per byte (QServe's contract): one 32-bit multiply scales four weights.
      a[0] = add_bytes(q0 * gb.s_lo[b], gb.z_lo[b]);
      a[1] = add_bytes(q1 * gb.s_hi[b], gb.z_hi[b]);
      a[2] = add_bytes(q2 * gb.s_lo[b], gb.z_lo[b]);
      a[3] = add_bytes(q3 * gb.s_hi[b], gb.z_hi[b]);
    } else {
      a[0] = q0;
      a[1] = q1;
      a[2] = q2;
      a[3] = q3;
    }
  }
}

template <class Cfg>
__device__ __forceinline__ void mma(int (&acc)[Cfg::kAccPerBlock], const uint32_t (&a)[4], uint64_t desc,
                                    int accumulate) {
  if constexpr (Cfg::kBN == 128) {
    wgmma_m64n128k32_s8_rs(acc, a, desc, accumulate);
  } else {
    wgmma_m64n64k32_s8_rs(acc, a, desc, accumulate);
  }
}

// One stage of a consumer warpgroup: its 4 k32 steps x 2 m64 blocks of wgmma (B = the stage's activation tile),
// A converted from the stage's packed weights, then a wait for all 8 (wait_group 0: the slot and the fragment
// registers are free when this returns).
//
// Cfg::kStepPipelined (v2 / v3 / split-K): step ks+1 is converted while step ks's wgmmas run.  Each step has its
// own fragment registers (a[4][2][4], fully unrolled, so distinct PTX registers never rewritten before the wait),
// and a wgmma.fence orders each step's conversion (pinned before it by an empty volatile asm) before the wgmmas that
// read it.  That the registers are not reused while a wgmma may still read them rests on ptxas, which tracks
// register-A operands of wgmma up to the wait_group (it serializes the wgmmas, warning C75xx, where it cannot);
// the empty asm after the wait only keeps the PTX itself from reusing them earlier.
// Otherwise (v1): all 4 steps are converted, then the 8 wgmmas issued.
//
// Why no wgmma is left in flight across stages: wgmma reads its register operands asynchronously, until the wait
// that retires it.  v1 once had wait_group 1 and rewrote the same fragment variables for the next stage under the
// running wgmmas: wrong results on the H100, worst in per-channel mode, whose conversion is the quickest.  The
// overlap across stages comes from the other consumer warpgroup (v2) or the other CTAs on the SM (v1 small tiles).
template <Mode MODE, class Cfg>
__device__ __forceinline__ void consume_stage(uint32_t stage, int wg, int warp, int lane, bool first,
                                              int (&acc)[2][Cfg::kAccPerBlock]) {
  using L = Smem<MODE, Cfg>;
  // This warp's packed tile (wg * 4 + warp) in the CTA: 4 consecutive 512-byte k32 tiles, 16 bytes per lane.
  const uint32_t wtile = stage + L::kAct + (wg * 4 + warp) * Cfg::kKTiles * 512 + lane * 16;
  const GroupBytes gb = load_group_bytes<MODE, Cfg>(stage, wg, warp, lane);
  uint4 v[4];
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) v[ks] = lds128(wtile + ks * 512);
  uint32_t a[4][2][4];
  // Pins a step's fragments before the wgmma.fence: the empty volatile asm keeps the conversion's register writes
  // from sinking below the fence (CUTLASS's warpgroup_fence_operand pattern).
  auto pin = [](uint32_t(&f)[2][4]) {
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
      for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(f[b][r])::"memory");
  };
  // Steps converted before the first wgmma: all 4 (v1), or only step 0, the rest under the previous step's wgmmas.
  constexpr int kUpFront = Cfg::kStepPipelined ? 1 : 4;
#pragma unroll
  for (int ks = 0; ks < kUpFront; ++ks) {
    convert_step<MODE>(v[ks], gb, a[ks][0], a[ks][1]);
    if constexpr (Cfg::kStepPipelined) pin(a[ks]);  // v1: no pins (its measured code; nothing runs under a wgmma)
  }
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const uint64_t desc = make_desc_sw128_kmajor(stage + ks * 32);
#pragma unroll
    for (int b = 0; b < 2; ++b) mma<Cfg>(acc[b], a[ks][b], desc, !first || ks > 0);
    if (ks + 1 >= kUpFront && ks + 1 < 4) {
      convert_step<MODE>(v[ks + 1], gb, a[ks + 1][0], a[ks + 1][1]);
      pin(a[ks + 1]);
      wgmma_fence();
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int i = 0; i < Cfg::kAccPerBlock; ++i) reg_fence(acc[b][i]);
  if constexpr (Cfg::kStepPipelined) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) pin(a[ks]);
  }
}

// Epilogue, part 1: the reference's fp32 operations on this warpgroup's accumulators, written as OutT into the
// [kBN tokens][kChannels] staging tile in shared memory (rows padded by 16 bytes: no bank conflicts).  The factors
// come from `ep` (EpiFactors, staged in shared memory by the kernel at the start of the tile).
// Accumulator i of block b (PTX ISA wgmma D fragment, = CUTLASS CLayout_64xN):
//   row (channel side) 16*warp + g + 8*((i>>1)&1),  column (token) 8*(i>>2) + 2t + (i&1).
template <Mode MODE, class Cfg, typename OutT>
__device__ __forceinline__ void epilogue_to_smem(const GemmParams& p, const int (&acc)[2][Cfg::kAccPerBlock],
                                                 const float* ep, uint8_t* tile, int wg, int warp, int lane) {
  using L = Smem<MODE, Cfg>;
  using E = EpiFactors<Cfg>;
  const int g = lane >> 2, t = lane & 3;
  float col_s[2][2], col_z[2][2], col_b[2][2];
  int ch_local[2][2];
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int cl = (wg * 4 + warp) * 32 + 16 * b + g + 8 * h;  // the row <-> channel permutation (header)
      ch_local[b][h] = cl;
      col_s[b][h] = ep[E::kCs + cl];
      col_z[b][h] = ep[E::kCz + cl];
      col_b[b][h] = ep[E::kCb + cl];
    }
#pragma unroll
  for (int j = 0; j < Cfg::kBN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int tok = 8 * j + 2 * t + e;
      const float sx = ep[E::kSx + tok];
      const float xs = ep[E::kXs + tok];
      OutT* row = reinterpret_cast<OutT*>(tile + tok * L::kOutRow);
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float o = __fmul_rn(__fmul_rn(__int2float_rn(acc[b][4 * j + 2 * h + e]), sx), col_s[b][h]);
          if constexpr (MODE == Mode::kPerChannel) o = __fsub_rn(o, __fmul_rn(xs, col_z[b][h]));
          if (p.bias_kind) o = __fadd_rn(o, col_b[b][h]);
          row[ch_local[b][h]] = from_float<OutT>(o);
        }
    }
}

// Epilogue, part 2: coalesced 16-byte stores of the staged [kBN x kChannels] tile by `nthreads` threads
// (N % 32 == 0: an 8-channel chunk is either entirely inside N or entirely outside).
template <class Cfg, typename OutT>
__device__ __forceinline__ void store_tile(const GemmParams& p, const uint8_t* tile, int m0, int n0, int tid,
                                           int nthreads) {
  constexpr int kOutRow = Cfg::kChannels * 2 + 16;
  constexpr int kRowChunks = Cfg::kChannels * 2 / 16;
  OutT* out = static_cast<OutT*>(p.out);
#pragma unroll 4
  for (int i = tid; i < Cfg::kBN * kRowChunks; i += nthreads) {
    const int tok = i / kRowChunks, c = i % kRowChunks;
    const int gm = m0 + tok, gn = n0 + c * 8;
    if (gm < p.M && gn < p.N) {
      const uint4 v = *reinterpret_cast<const uint4*>(tile + tok * kOutRow + c * 16);
      *reinterpret_cast<uint4*>(out + (int64_t)gm * p.N + gn) = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Which output tile this CTA computes (grid: x = token tiles, y = channel tiles), in grouped order.  CTAs start in
// linear order (x fastest), so the ~132 that run together should touch few bytes: tokens fastest alone made one
// wave cover *every* token tile of one or two channel tiles, i.e. the whole activation matrix -- 67 MB at
// M = 16384, K = 4096, more than the 50 MB L2 -- so each wave re-read the activations from DRAM (measured,
// docs/kernels/gemm_sm90.md run 9: 1105-1142 TOP/s at M = 16384 vs 1290-1365 at 4096).  Grouped order walks the
// token tiles in groups of G (tokens still fastest inside a group, so consecutive CTAs share a weight tile): a
// group's activation rows, G x kBN x K bytes (<= ~8 MB), stay in L2 while every channel tile passes over them;
// the weights are re-read once per group (M / (G kBN) times in all, a small fraction of the DRAM time available
// under a compute-bound GEMM).  With M <= G kBN (one group) the order is the old one.  Channel tiles count from
// p.n_begin (a tail launch, w4a8_wgmma_launch.cu).
template <class Cfg>
__device__ __forceinline__ void grouped_tile(const GemmParams& p, int& m0, int& n0) {
  constexpr int kMaxGroup = 16;
  constexpr int kGroupBytes = 8 << 20;
  const int group = max(1, min(kMaxGroup, kGroupBytes / (Cfg::kBN * p.K)));
  const int m_tiles = gridDim.x;
  const int linear = blockIdx.x + blockIdx.y * m_tiles;
  const int per_group = group * gridDim.y;  // CTAs in one full group
  const int g = linear / per_group;
  const int rows = min(group, m_tiles - g * group);  // token tiles in this group (the last may be partial)
  const int in_group = linear - g * per_group;
  m0 = (g * group + in_group % rows) * Cfg::kBN;
  n0 = p.n_begin + (in_group / rows) * Cfg::kChannels;
}

// ---------------------------------------------------------------------------------------------------------------
template <Mode MODE, class Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads, 1) w4a8_wgmma_kernel(const GemmParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // wgmma exists only in sm_90a code; the op refuses other devices before launching
#else
  using L = Smem<MODE, Cfg>;
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte aligned base: the 128-byte swizzle pattern repeats every 1024 bytes and the descriptor assumes the
  // atom starts on that boundary (base offset 0).
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* const base_ptr = smem_raw + (base - raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = (tid >> 5) & 3, wg = tid >> 7;
  int m0, n0;  // first token and channel of this CTA's tile
  grouped_tile<Cfg>(p, m0, n0);

  // No zero-initialization: the first k32 step overwrites the accumulators (scale-d = false).  Writing them with
  // ordinary instructions would make ptxas serialize the wgmma pipeline (C7515).  K >= 128 is checked by the op.
  int acc[2][Cfg::kAccPerBlock];

  const int ktiles = p.K / kStageK;
  constexpr int kAhead = Cfg::kStages - 1;  // prefetch distance
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < ktiles) load_stage<MODE, Cfg>(p, base + s * L::kStage, m0, n0, s * kStageK);
    cp_async_commit();
  }
  // The epilogue's factors, published by the main loop's first barrier (K >= 128: at least one iteration).
  float* const ep = reinterpret_cast<float*>(base_ptr + L::kEpi);
  load_epilogue_factors<MODE, Cfg, Cfg::kThreads>(p, ep, m0, n0, tid);

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kAhead - 1>();   // this thread's copies of stage kt have landed ...
    fence_proxy_async_smem();      // ... are visible to the async proxy (wgmma's B operand) ...
    __syncthreads();               // ... and everyone's; every warpgroup is done with stage kt-1 (wait_group 0)
    const int next = kt + kAhead;  // refill the slot of stage kt-1
    if (next < ktiles) load_stage<MODE, Cfg>(p, base + (next % Cfg::kStages) * L::kStage, m0, n0, next * kStageK);
    cp_async_commit();
    consume_stage<MODE, Cfg>(base + (kt % Cfg::kStages) * L::kStage, wg, warp, lane, kt == 0, acc);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done with the pipeline buffers: reuse them for the output tile

  epilogue_to_smem<MODE, Cfg, OutT>(p, acc, ep, base_ptr, wg, warp, lane);
  __syncthreads();
  store_tile<Cfg, OutT>(p, base_ptr, m0, n0, tid, Cfg::kThreads);
#endif
}

}  // namespace gemm_sm90
}  // namespace qserve
