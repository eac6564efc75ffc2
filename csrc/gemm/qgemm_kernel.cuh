// One templated int8 tensor-core GEMM (mma.sync m16n8k32 s8, sm80+) for the three QServe linear modes:
//
//   kW4PerChannel  acc = xq . q          (q = raw 4-bit codes 0..15 fed as s8)
//                  out = acc*sx*s1 - s1_szeros*xsum (+ bias)
//   kW4PerGroup    acc = xq . w8,  w8 = (q*s2 + s2_zero) byte-wise mod 256, rebuilt in registers
//                  out = acc*sx*s1 (+ bias)
//   kW8            acc = xq . w          (int8 weight [N, K], row-major)
//                  out = acc*sx*s (+ bias)
//
// The epilogue is the contract of vllm_qserve/reference/gemm.py, operation by operation in fp32 with explicit
// round-to-nearest intrinsics (no FMA contraction), so the output equals the reference bit for bit.
//
// Structure (per CTA, tile kM x kN, kK bytes of K per pipeline stage):
//  * global -> shared by 16-byte cp.async.cg, kStages deep (one commit group per stage).
//  * A (activations [M, K] row-major) rows are padded by 16 bytes: row stride kK+16 puts the 8 rows that one
//    ldmatrix phase reads on 8 distinct 4-bank groups (no conflicts, and no swizzle arithmetic).
//  * W4 B tiles are QServe's packed 32x32 tiles (512 contiguous bytes in global memory and in shared memory);
//    lane l's 16 bytes at l*16 are its complete B fragments for four n8 MMAs (one ld.shared.v4 per 32x32).
//  * W8 B ([N, K] row-major) uses the same padded layout as A and ldmatrix.x4 (2 n8 blocks x k32 per call).
//  * Warps are laid out kWarpsM x kWarpsN x kWarpsK.  kWarpsK > 1 splits each stage's K among warps (for small
//    M, where a CTA has few rows and we want more bytes in flight per SM); partial sums are reduced through
//    shared memory after the main loop.
//  * Rows >= M, n tiles >= N and k tiles >= K are zero-filled by cp.async (no branches in the MMA loop);
//    stores are predicated on M (and on N when N is not a multiple of kN).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "epilogue_math.cuh"
#include "qgemm_params.h"
#include "qgemm_ptx.cuh"

namespace qserve {
namespace gemm {

enum class Mode { kW4PerChannel, kW4PerGroup, kW8 };

constexpr int kGroupSize = 128;  // QServe's level-2 group (hard-coded there too)

template <int M_, int N_, int K_, int WM_, int WN_, int WK_, int STAGES_>
struct TileConfig {
  static constexpr int kM = M_, kN = N_, kK = K_;
  static constexpr int kWarpsM = WM_, kWarpsN = WN_, kWarpsK = WK_;
  static constexpr int kStages = STAGES_;
  static constexpr int kWarps = WM_ * WN_ * WK_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpM = kM / kWarpsM;   // rows per warp
  static constexpr int kWarpN = kN / kWarpsN;   // columns per warp
  static constexpr int kWarpK = kK / kWarpsK;   // K bytes per warp per stage
  static constexpr int kMI = kWarpM / 16;       // m16 fragments per warp
  static constexpr int kNJ = kWarpN / 8;        // n8 fragments per warp
  static_assert(kM % (16 * kWarpsM) == 0, "warp M tile must be a multiple of 16");
  static_assert(kN % (32 * kWarpsN) == 0, "warp N tile must be a multiple of 32 (packed W4 tile)");
  static_assert(kK % (32 * kWarpsK) == 0, "warp K slice must be a multiple of 32");
  static_assert(kK % kGroupSize == 0 || kGroupSize % kK == 0, "a stage holds whole groups or part of one");
};

template <Mode MODE, class Cfg>
struct SmemLayout {
  static constexpr int kARow = Cfg::kK + 16;  // padded row (bytes)
  static constexpr int kABytes = Cfg::kM * kARow;
  static constexpr int kBBytes = MODE == Mode::kW8 ? Cfg::kN * kARow : Cfg::kN * Cfg::kK / 2;
  static constexpr int kGroups = Cfg::kK >= kGroupSize ? Cfg::kK / kGroupSize : 1;
  static constexpr int kSBytes = MODE == Mode::kW4PerGroup ? 2 * kGroups * Cfg::kN : 0;  // s2 scales + zeros
  static constexpr int kStage = (kABytes + kBBytes + kSBytes + 127) / 128 * 128;
  static constexpr int kPipe = Cfg::kStages * kStage;
  static constexpr int kAcc = Cfg::kMI * Cfg::kNJ * 4;  // accumulators per thread
  static constexpr int kReduce = (Cfg::kWarpsK - 1) * Cfg::kWarpsM * Cfg::kWarpsN * 32 * kAcc * 4;
  static constexpr int kTotal = kPipe > kReduce ? kPipe : kReduce;
};


// ---------------------------------------------------------------------------------------------------------------
// global -> shared for one pipeline stage (all threads cooperate; 16-byte chunks).
template <Mode MODE, class Cfg>
__device__ __forceinline__ void load_stage(const GemmParams& p, uint8_t* stage, int m0, int n0, int k0) {
  using L = SmemLayout<MODE, Cfg>;
  const int tid = threadIdx.x;
  // A: kM rows x kK bytes.
  {
    constexpr int kChunksPerRow = Cfg::kK / 16;
    constexpr int kChunks = Cfg::kM * kChunksPerRow;
    const uint32_t base = smem_addr(stage);
#pragma unroll
    for (int i0 = 0; i0 < kChunks; i0 += Cfg::kThreads) {
      const int i = i0 + tid;
      if (kChunks % Cfg::kThreads == 0 || i < kChunks) {
        const int row = i / kChunksPerRow, c = i % kChunksPerRow;
        const int gm = m0 + row, gk = k0 + c * 16;
        const bool v = gm < p.M && gk < p.K;
        const int8_t* src = v ? p.a + (int64_t)gm * p.K + gk : p.a;
        cp_async_16(base + row * L::kARow + c * 16, src, v);
      }
    }
  }
  const uint32_t bbase = smem_addr(stage + L::kABytes);
  if constexpr (MODE == Mode::kW8) {
    constexpr int kChunksPerRow = Cfg::kK / 16;
    constexpr int kChunks = Cfg::kN * kChunksPerRow;
#pragma unroll
    for (int i0 = 0; i0 < kChunks; i0 += Cfg::kThreads) {
      const int i = i0 + tid;
      if (kChunks % Cfg::kThreads == 0 || i < kChunks) {
        const int row = i / kChunksPerRow, c = i % kChunksPerRow;
        const int gn = n0 + row, gk = k0 + c * 16;
        const bool v = gn < p.N && gk < p.K;
        const int8_t* src = v ? p.b + (int64_t)gn * p.K + gk : p.b;
        cp_async_16(bbase + row * L::kARow + c * 16, src, v);
      }
    }
  } else {
    // Packed 32x32 tiles: tile (nt, kt) at byte (nt * K/32 + kt) * 512; a CTA stage is (kN/32) x (kK/32) tiles,
    // each 32 chunks of 16 bytes.  Consecutive threads copy consecutive 16-byte chunks of one tile (coalesced).
    constexpr int kKT = Cfg::kK / 32;
    constexpr int kChunks = (Cfg::kN / 32) * kKT * 32;
    const int ktiles = p.K / 32, ntiles = p.N / 32;
#pragma unroll
    for (int i0 = 0; i0 < kChunks; i0 += Cfg::kThreads) {
      const int i = i0 + tid;
      if (kChunks % Cfg::kThreads == 0 || i < kChunks) {
        const int tile = i >> 5, w = i & 31;
        const int ntl = tile / kKT, ktl = tile % kKT;
        const int nt = n0 / 32 + ntl, kt = k0 / 32 + ktl;
        const bool v = nt < ntiles && kt < ktiles;
        const int8_t* src = v ? p.b + ((int64_t)nt * ktiles + kt) * 512 + w * 16 : p.b;
        cp_async_16(bbase + tile * 512 + w * 16, src, v);
      }
    }
    if constexpr (MODE == Mode::kW4PerGroup) {
      // s2 scales and zeros of the stage's group(s): kGroups rows of kN bytes each (already in the lane order).
      const uint32_t sbase = smem_addr(stage + L::kABytes + L::kBBytes);
      constexpr int kChunksPerRow = Cfg::kN / 16;
      constexpr int kChunks2 = 2 * L::kGroups * kChunksPerRow;
      const int ngroups = p.K / kGroupSize;
#pragma unroll
      for (int i0 = 0; i0 < kChunks2; i0 += Cfg::kThreads) {
        const int i = i0 + tid;
        if (kChunks2 % Cfg::kThreads == 0 || i < kChunks2) {
          const int which = i / (L::kGroups * kChunksPerRow);  // 0 scales, 1 zeros
          const int rem = i % (L::kGroups * kChunksPerRow);
          const int gi = rem / kChunksPerRow, c = rem % kChunksPerRow;
          const int g = k0 / kGroupSize + gi, gn = n0 + c * 16;
          const bool v = g < ngroups && gn < p.N;
          const int8_t* srcb = which ? p.s2_zeros : p.s2_scales;
          const int8_t* src = v ? srcb + (int64_t)g * p.N + gn : srcb;
          cp_async_16(sbase + (which * L::kGroups + gi) * Cfg::kN + c * 16, src, v);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core work on one resident stage: this warp's K slice, kMI x kNJ MMAs per k32 step.
template <Mode MODE, class Cfg>
__device__ __forceinline__ void compute_stage(const uint8_t* stage, int (&acc)[Cfg::kMI][Cfg::kNJ][4], int wm, int wn,
                                              int wk, int lane) {
  using L = SmemLayout<MODE, Cfg>;
  const uint32_t abase = smem_addr(stage);
  const uint8_t* bptr = stage + L::kABytes;
#pragma unroll
  for (int ks = 0; ks < Cfg::kWarpK / 32; ++ks) {
    const int kk = wk * Cfg::kWarpK + ks * 32;  // byte offset of this k32 step inside the stage
    uint32_t a[Cfg::kMI][4];
#pragma unroll
    for (int mi = 0; mi < Cfg::kMI; ++mi) {
      const int row = wm * Cfg::kWarpM + mi * 16 + (lane & 15);
      ldmatrix_x4(a[mi], abase + row * L::kARow + kk + (lane >> 4) * 16);
    }
    uint32_t b[Cfg::kNJ][2];
    if constexpr (MODE == Mode::kW8) {
#pragma unroll
      for (int nb = 0; nb < Cfg::kNJ / 2; ++nb) {
        // matrices: 0 = n0-7/k0-15, 1 = n0-7/k16-31, 2 = n8-15/k0-15, 3 = n8-15/k16-31
        const int row = wn * Cfg::kWarpN + nb * 16 + ((lane >> 4) << 3) + (lane & 7);
        uint32_t r[4];
        ldmatrix_x4(r, smem_addr(bptr) + row * L::kARow + kk + ((lane >> 3) & 1) * 16);
        b[2 * nb][0] = r[0];
        b[2 * nb][1] = r[1];
        b[2 * nb + 1][0] = r[2];
        b[2 * nb + 1][1] = r[3];
      }
    } else {
      constexpr int kKT = Cfg::kK / 32;
      constexpr uint32_t kLo = 0x0F0F0F0Fu;
#pragma unroll
      for (int ni = 0; ni < Cfg::kWarpN / 32; ++ni) {
        const int ntl = wn * (Cfg::kWarpN / 32) + ni;
        // Lane (r, t)'s 16 bytes: words x/y/z/w = (kh, nh) 00/01/10/11; low nibble row nh*8+r, high row +16.
        const uint4 v = *reinterpret_cast<const uint4*>(bptr + (ntl * kKT + kk / 32) * 512 + lane * 16);
        uint32_t q[4][2] = {{v.x & kLo, v.z & kLo},
                            {v.y & kLo, v.w & kLo},
                            {(v.x >> 4) & kLo, (v.z >> 4) & kLo},
                            {(v.y >> 4) & kLo, (v.w >> 4) & kLo}};
        if constexpr (MODE == Mode::kW4PerGroup) {
          // Group of this k32 step; its s2 word for lane group r = bytes r*4..r*4+3 of the 32-channel block,
          // byte c belonging to n8 block c (channel c*8 + r) thanks to QServe's stored permutation.
          const int gi = Cfg::kK >= kGroupSize ? kk / kGroupSize : 0;
          const uint8_t* s = bptr + L::kBBytes + gi * Cfg::kN + ntl * 32 + (lane >> 2) * 4;
          const uint32_t sw = *reinterpret_cast<const uint32_t*>(s);
          const uint32_t zw = *reinterpret_cast<const uint32_t*>(s + L::kGroups * Cfg::kN);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const uint32_t s2 = (sw >> (8 * c)) & 0xFFu;
            const uint32_t z = __byte_perm(zw, 0, c * 0x1111);  // byte c broadcast to all four lanes
            const uint32_t zlo = z & 0x7f7f7f7fu, zhi = z & 0x80808080u;
            // q * s2 <= 255 per byte (QServe's contract), so one 32-bit multiply scales four weights.
            b[ni * 4 + c][0] = add_bytes(q[c][0] * s2, zlo, zhi);
            b[ni * 4 + c][1] = add_bytes(q[c][1] * s2, zlo, zhi);
          }
        } else {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            b[ni * 4 + c][0] = q[c][0];
            b[ni * 4 + c][1] = q[c][1];
          }
        }
      }
    }
#pragma unroll
    for (int mi = 0; mi < Cfg::kMI; ++mi)
#pragma unroll
      for (int nj = 0; nj < Cfg::kNJ; ++nj) mma_s8_16832(acc[mi][nj], a[mi], b[nj][0], b[nj][1]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
template <Mode MODE, class Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads) qgemm_kernel(const GemmParams p) {
  using L = SmemLayout<MODE, Cfg>;
  extern __shared__ __align__(128) uint8_t smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // warp -> (wm, wn, wk), wk slowest so that the K-split warps of one output tile are far apart.
  const int wm = warp % Cfg::kWarpsM;
  const int wn = (warp / Cfg::kWarpsM) % Cfg::kWarpsN;
  const int wk = warp / (Cfg::kWarpsM * Cfg::kWarpsN);
  // blockIdx.x walks M fastest: CTAs that run together share one weight (N) tile, read once from DRAM.
  const int m0 = blockIdx.x * Cfg::kM, n0 = blockIdx.y * Cfg::kN;

  int acc[Cfg::kMI][Cfg::kNJ][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::kMI; ++mi)
#pragma unroll
    for (int nj = 0; nj < Cfg::kNJ; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0;

  const int ktiles = (p.K + Cfg::kK - 1) / Cfg::kK;
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < ktiles) load_stage<MODE, Cfg>(p, smem + s * L::kStage, m0, n0, s * Cfg::kK);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<Cfg::kStages - 2>();  // stage kt has landed (this thread's copies) ...
    __syncthreads();                    // ... and everyone's; also: all warps are done with stage kt-1's slot
    const int next = kt + Cfg::kStages - 1;
    if (next < ktiles) load_stage<MODE, Cfg>(p, smem + (next % Cfg::kStages) * L::kStage, m0, n0, next * Cfg::kK);
    cp_async_commit();
    compute_stage<MODE, Cfg>(smem + (kt % Cfg::kStages) * L::kStage, acc, wm, wn, wk, lane);
  }

  if constexpr (Cfg::kWarpsK > 1) {
    // Reduce the K-split partial sums through shared memory (reusing the pipeline buffers).
    cp_async_wait<0>();
    __syncthreads();
    int* red = reinterpret_cast<int*>(smem);
    const int mn = wm + Cfg::kWarpsM * wn;
    constexpr int kMN = Cfg::kWarpsM * Cfg::kWarpsN;
    if (wk > 0) {
      int* dst = red + ((wk - 1) * kMN + mn) * L::kAcc * 32 + lane;
#pragma unroll
      for (int mi = 0; mi < Cfg::kMI; ++mi)
#pragma unroll
        for (int nj = 0; nj < Cfg::kNJ; ++nj)
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[((mi * Cfg::kNJ + nj) * 4 + e) * 32] = acc[mi][nj][e];
    }
    __syncthreads();
    if (wk > 0) return;
#pragma unroll
    for (int w = 0; w < Cfg::kWarpsK - 1; ++w) {
      const int* src = red + (w * kMN + mn) * L::kAcc * 32 + lane;
#pragma unroll
      for (int mi = 0; mi < Cfg::kMI; ++mi)
#pragma unroll
        for (int nj = 0; nj < Cfg::kNJ; ++nj)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mi][nj][e] += src[((mi * Cfg::kNJ + nj) * 4 + e) * 32];
    }
  }

  // Epilogue: the reference's fp32 operations in its order, each rounded once (no FMA contraction).
  OutT* out = static_cast<OutT*>(p.out);
  const int g = lane >> 2, t = lane & 3;
  float col_s[Cfg::kNJ][2], col_z[Cfg::kNJ][2], col_b[Cfg::kNJ][2];
#pragma unroll
  for (int nj = 0; nj < Cfg::kNJ; ++nj)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = n0 + wn * Cfg::kWarpN + nj * 8 + 2 * t + e;
      const bool v = col < p.N;
      col_s[nj][e] = v ? __half2float(static_cast<const half*>(p.col_scale)[col]) : 0.f;
      col_z[nj][e] = (MODE == Mode::kW4PerChannel && v) ? __half2float(static_cast<const half*>(p.szeros)[col]) : 0.f;
      col_b[nj][e] = (p.bias_kind && v) ? load_bias(p.bias, p.bias_kind, col) : 0.f;
    }
#pragma unroll
  for (int mi = 0; mi < Cfg::kMI; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + wm * Cfg::kWarpM + mi * 16 + g + 8 * h;
      if (row >= p.M) continue;
      const float sx = p.sx[row];
      const float xs = MODE == Mode::kW4PerChannel ? p.xsum[row] : 0.f;
      OutT* orow = out + (int64_t)row * p.N;
#pragma unroll
      for (int nj = 0; nj < Cfg::kNJ; ++nj) {
        const int col = n0 + wn * Cfg::kWarpN + nj * 8 + 2 * t;
        if (col >= p.N) continue;
        float v[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float o = __fmul_rn(__fmul_rn(__int2float_rn(acc[mi][nj][2 * h + e]), sx), col_s[nj][e]);
          if constexpr (MODE == Mode::kW4PerChannel) o = __fsub_rn(o, __fmul_rn(xs, col_z[nj][e]));
          if (p.bias_kind) o = __fadd_rn(o, col_b[nj][e]);
          v[e] = o;
        }
        *reinterpret_cast<typename Pair<OutT>::type*>(orow + col) = Pair<OutT>::make(v[0], v[1]);
      }
    }
}

}  // namespace gemm
}  // namespace qserve
