// Paged decode attention over the KV4 / KV8 cache (one query token per sequence), flash-decoding style.
//
// Grid: (sequence b, KV head x head-chunk, split).  One CTA = 4 warps that stream the K/V tiles of one KV head of
// one sequence over its split of the context, for all query heads of the GQA group at once (8 per n8 tile, NT
// tiles), so each K/V byte is read from DRAM once per sequence and group.  Each warp owns every 4th 16-token tile
// of the split: its own cp.async pipeline in shared memory, its own online softmax, no CTA barrier in the loop.
// The warps are merged through shared memory at the end; with more than one split, a second kernel merges the
// splits.  The number of splits comes from the host (shapes only), the tokens of each split from seq_len
// (split_tokens), so the launch is CUDA-graph capturable.
//
// Math.  With c the codes of a token, s/z its fp16 scale/zero, q the query (fp16):
//   q . k = s * (sum_d q_d c_d - z * sum_d q_d)
//   sum_t p_t v_t = sum_t (p_t s_t) c_t - sum_t (p_t s_t) z_t
// so the tensor cores multiply the integer codes (exact in fp16) -- no per-element dequantization -- and the
// per-token scale/zero are applied to the 16 logits / 16 softmax weights of a tile in fp32.  Both MMAs are
// m16n8k16 f16 -> f32 with the *tokens* as M (16 tokens per tile) and the query heads as N (8 per tile):
//   S^T[16 tok x 8 heads] = K[16 tok x D] . Q^T            A = K codes (ldmatrix), B = Q (registers)
//   O^T[D x 8 heads]     += V^T[D x 16 tok] . P'^T        A = V codes (ldmatrix.trans), B = P' (movmatrix)
// P' = p * s_v * 2^ev rounded to fp16 (the only rounding of the weights, 2^-11 relative); ev is a per-warp
// power of two that keeps the largest s_v * 2^ev of the tiles seen so far in [2^14, 2^15), so P' never
// overflows and never loses precision to fp16 subnormals; it is folded into the online-softmax rescale.
// bf16 queries are converted to fp16 after an exact power-of-two scaling (2^-e) that puts max |q| in
// [2^14, 2^15); that factor returns in the logit scale.  Softmax, sums and the zero corrections are fp32.
//
// Shared-memory tiles hold whole token rows (D*bits/8 bytes); 16-byte segments are XOR-swizzled per row so that
// every 8-row ldmatrix phase hits 8 distinct bank groups.  Channel order: ldmatrix gives lane (g, t) = (lane/4,
// lane%4) bytes 4t..4t+3 of each 16-byte K segment (KV4: channels 32s + 8t + 0..7), and the Q fragments are built
// in the matching order, so no data is ever permuted in the main loop.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../smem_opt_in.cuh"
#include "kv_params.h"
#include "kv_ptx.cuh"

namespace qserve {
namespace kv {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kTile = kDecodeTileTokens;  // tokens per warp tile (the M of both MMAs)

template <int D, int BITS, int NT>
struct DecodeCfg {
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
  static_assert(BITS == 4 || BITS == 8, "4 or 8 bits");
  static constexpr int kRowBytes = D * BITS / 8;         // one token of one head
  static constexpr int kSegs = kRowBytes / 16;           // 16-byte segments per row (2 per ldmatrix.x4)
  static_assert(kSegs % 2 == 0, "rows must be a multiple of 32 bytes");
  static constexpr int kTileBytes = kTile * kRowBytes;
  static constexpr int kScaleBytes = 4 * kTile * 2;      // s_k, z_k, s_v, z_v: 16 fp16 each
  static constexpr int kStageBytes = 2 * kTileBytes + kScaleBytes;
  // Per-warp pipeline depth: ~4-8 KB of K/V in flight per warp; with >= 8 warps per SM that is well above the
  // ~20-30 KB per SM that H100's DRAM latency x bandwidth needs.
  static constexpr int kStages = kStageBytes <= 2304 ? 4 : (kStageBytes <= 4352 ? 3 : 2);
  static constexpr int kHeads = 8 * NT;                  // query heads per CTA
  static constexpr int kPipeBytes = kDecodeWarps * kStages * kStageBytes;
  static constexpr int kCombineBytes = kDecodeWarps * kHeads * (D + 2) * 4;
  static constexpr int kSmem = kPipeBytes > kCombineBytes ? kPipeBytes : kCombineBytes;
  static_assert(kSmem <= 99 * 1024, "exceeds sm_89's 99 KB of shared memory per block");
  static constexpr int kKSteps = D / 16;                 // k16 steps of S^T = K Q^T
  static constexpr int kMTiles = D / 16;                 // m16 tiles (channels) of O^T
  static constexpr int kQWords = D / 8;                  // 32-bit words of Q per lane and head (D/4 channels)
  static constexpr int kMinBlocks = (D >= 256 || NT == 2) ? 2 : 4;

  // Row t's logical 16-byte segment s lives at segment s ^ swizzle(t).  Rows per 128 bytes: R = 128/kRowBytes;
  // the XOR walks the 8 bank groups across the 8 rows of an ldmatrix phase (checked for 2, 4, 8, 16 segments).
  __device__ __forceinline__ static int swizzle(int t) {
    constexpr int kRowsPer128 = kSegs >= 8 ? 1 : 8 / kSegs;
    constexpr int kMask = (kSegs >= 8 ? 8 : kSegs) - 1;
    return (t / kRowsPer128) & kMask;
  }
  // Output channel of O^T fragment element (m-tile i, row r or r+8 = `hi`) for lane row r.
  __device__ __forceinline__ static int out_channel(int i, int r, int hi) {
    if constexpr (BITS == 4) return (i >> 1) * 32 + 4 * r + 2 * (i & 1) + hi;
    else return i * 16 + 2 * r + hi;
  }
};

template <typename T> struct Vec4;  // 4 output elements
template <> struct Vec4<half> {
  __device__ __forceinline__ static void store(half* p, float4 v) {
    const __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t*>(&a);
    u.y = *reinterpret_cast<const uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  }
};
template <> struct Vec4<nv_bfloat16> {
  __device__ __forceinline__ static void store(nv_bfloat16* p, float4 v) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t*>(&a);
    u.y = *reinterpret_cast<const uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  }
};

__device__ __forceinline__ float warp_max_rows(float v) {  // max over the 8 lanes of equal lane % 4
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
}
__device__ __forceinline__ float warp_sum_rows(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  return v + __shfl_xor_sync(0xffffffffu, v, 16);
}

// Block-table column and offset of token position t (a shift for power-of-two block sizes: no integer division in
// the main loop).
__device__ __forceinline__ int block_col(const CacheGeometry& g, int t) {
  return g.block_size_log2 >= 0 ? t >> g.block_size_log2 : t / g.block_size;
}

__device__ __forceinline__ int clamped_seq_len(const DecodeParams& p, int b) {
  return min(max(p.seq_lens[b], 0), p.max_blocks * p.g.block_size);
}

// Lane (g, t)'s Q words for head row g: KV4 segment s -> channels 32s + 8t .. +7 (4 words), KV8 segment s ->
// channels 16s + 4t .. +3 (2 words): the channels this lane's K words hold (see the K loop).
template <typename T, int D, int BITS>
__device__ __forceinline__ void load_q_words(const T* qrow, int t, uint32_t (&w)[D / 8]) {
  if constexpr (BITS == 4) {
#pragma unroll
    for (int s = 0; s < D / 32; ++s) {
      const uint4 v = *reinterpret_cast<const uint4*>(qrow + s * 32 + 8 * t);
      w[4 * s] = v.x, w[4 * s + 1] = v.y, w[4 * s + 2] = v.z, w[4 * s + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
      const uint2 v = *reinterpret_cast<const uint2*>(qrow + s * 16 + 4 * t);
      w[2 * s] = v.x, w[2 * s + 1] = v.y;
    }
  }
}

template <typename T, int D, int BITS, int NT>
__global__ void __launch_bounds__(kDecodeThreads, DecodeCfg<D, BITS, NT>::kMinBlocks)
kv_decode_kernel(const DecodeParams p) {
  using Cfg = DecodeCfg<D, BITS, NT>;
  constexpr int kRowBytes = Cfg::kRowBytes, kSegs = Cfg::kSegs, kTileBytes = Cfg::kTileBytes;
  constexpr int kStages = Cfg::kStages, kStageBytes = Cfg::kStageBytes, kHeads = Cfg::kHeads;
  extern __shared__ __align__(16) uint8_t smem[];

  const int b = blockIdx.x;
  const int kvh = blockIdx.y / p.head_chunks;
  const int chunk = blockIdx.y - kvh * p.head_chunks;
  const int split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r = lane >> 2, t = lane & 3;
  const int qh0 = kvh * p.group + chunk * kHeads;  // first query head of this CTA
  const int nheads = min(kHeads, p.group - chunk * kHeads);

  const int seq_len = clamped_seq_len(p, b);
  // Sliding window: the splits cover [t_read, seq_len) only; positions t_read .. t_first - 1 are masked below.
  const int t_first = window_first(seq_len, p.sliding_window);
  const int t_read = window_read_start(seq_len, p.sliding_window, kTile);
  const int per_split = split_tokens(seq_len - t_read, p.num_splits);
  const int t_begin = t_read + split * per_split;
  const int t_end = min(seq_len, t_begin + per_split);
  if (t_begin >= t_end) {
    // Empty split.  seq_len == 0 without splits: the output is zeros (with splits the reduction writes them).
    if (p.num_splits == 1) {
      T* ob = reinterpret_cast<T*>(p.out) + (int64_t)b * p.o_stride0;
      for (int idx = threadIdx.x; idx < nheads * (D / 4); idx += kDecodeThreads) {
        const int head = idx / (D / 4), c4 = (idx % (D / 4)) * 4;
        Vec4<T>::store(ob + (int64_t)(qh0 + head) * p.o_stride1 + c4, make_float4(0.f, 0.f, 0.f, 0.f));
      }
    }
    return;
  }

  // ---- Q fragments (B operand of S^T = K Q^T: k = channel slot, n = head), per-head sums, logit scale.
  uint32_t qf[NT][Cfg::kKSteps][2];
  float qsum[NT][2];  // sum of head (8j + 2t + c)'s fp16 query values (the z_k correction), c = 0, 1
  float logit_scale = p.scale_log2;
  {
    uint32_t w[NT][Cfg::kQWords];
    const T* qb = reinterpret_cast<const T*>(p.query) + (int64_t)b * p.q_stride0;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int g = 8 * j + r;
      if (g < nheads) {
        load_q_words<T, D, BITS>(qb + (int64_t)(qh0 + g) * p.q_stride1, t, w[j]);
      } else {
#pragma unroll
        for (int i = 0; i < Cfg::kQWords; ++i) w[j][i] = 0u;  // padding heads: zero query, never written out
      }
    }
    if constexpr (std::is_same<T, nv_bfloat16>::value) {
      // bf16 -> fp16 exactly: scale by 2^-e so that max |q| lands in [2^14, 2^15) (fp16 keeps bf16's 8 bits for
      // every value down to 2^-28 of the maximum); the logits get 2^e back.
      float amax = 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < Cfg::kQWords; ++i) {
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j][i]));
          amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
        }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      int e = 0;
      if (amax > 0.f && amax <= 3.0e38f) e = min(max(ilogbf(amax) - 14, -126), 127);
      const float down = __int_as_float((127 - e) << 23);  // 2^-e
      logit_scale *= __int_as_float((127 + e) << 23);      // 2^e
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < Cfg::kQWords; ++i) {
          const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j][i]));
          const __half2 h = __floats2half2_rn(f.x * down, f.y * down);
          w[j][i] = *reinterpret_cast<const uint32_t*>(&h);
        }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float own = 0.f;  // this lane's D/4 channels of head 8j + r
#pragma unroll
      for (int i = 0; i < Cfg::kQWords; ++i) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[j][i]));
        own += f.x + f.y;
      }
      own += __shfl_xor_sync(0xffffffffu, own, 1);
      own += __shfl_xor_sync(0xffffffffu, own, 2);
      // S^T columns of this lane are heads 2t and 2t+1 (rows of lanes 4*(2t) and 4*(2t+1)).
      qsum[j][0] = __shfl_sync(0xffffffffu, own, 8 * t);
      qsum[j][1] = __shfl_sync(0xffffffffu, own, 8 * t + 4);
#pragma unroll
      for (int s = 0; s < kSegs; ++s) {
        if constexpr (BITS == 4) {
          // K k-step 2s holds channels (c0, c4 | c1, c5), k-step 2s+1 (c2, c6 | c3, c7) of 32s + 8t + c_i.
          const uint32_t w01 = w[j][4 * s], w23 = w[j][4 * s + 1], w45 = w[j][4 * s + 2], w67 = w[j][4 * s + 3];
          qf[j][2 * s][0] = __byte_perm(w01, w45, 0x5410);
          qf[j][2 * s][1] = __byte_perm(w01, w45, 0x7632);
          qf[j][2 * s + 1][0] = __byte_perm(w23, w67, 0x5410);
          qf[j][2 * s + 1][1] = __byte_perm(w23, w67, 0x7632);
        } else {
          // K k-step s holds channels (c0, c1 | c2, c3) of 16s + 4t + c_i: the natural pairs.
          qf[j][s][0] = w[j][2 * s];
          qf[j][s][1] = w[j][2 * s + 1];
        }
      }
    }
  }

  // ---- Per-warp cp.async pipeline over this warp's tiles: warp w takes tiles w, w + 4, ... of the split.
  const int n_tiles = (t_end - t_begin + kTile - 1) / kTile;
  const int my_tiles = warp < n_tiles ? (n_tiles - warp + kDecodeWarps - 1) / kDecodeWarps : 0;
  uint8_t* const wsm = smem + warp * kStages * kStageBytes;
  const int* const bt = p.block_table + (int64_t)b * p.bt_stride0;
  const int bs = p.g.block_size;
  const int64_t head_row0 = (int64_t)kvh * bs;  // first row of this head in a page's [H][bs] arrays
  const int64_t scales_off = (int64_t)p.g.num_kv_heads * bs * kRowBytes;
  const int64_t zeros_off = scales_off + (int64_t)p.g.num_kv_heads * bs * 2;

  auto issue = [&](int k) {
    const int t0 = t_begin + (warp + k * kDecodeWarps) * kTile;
    const int col = block_col(p.g, t0);
    const int blk = __ldg(bt + col);
    const bool ok = (unsigned)blk < (unsigned)p.g.num_blocks;  // bad ids: read nothing (tile is skipped)
    const uint8_t* pk = p.g.cache + (ok ? (int64_t)blk * p.g.block_stride : 0);
    const uint8_t* pv = pk + p.g.page_bytes;
    const int64_t row = head_row0 + (t0 - col * bs);
    const uint8_t* srck = pk + row * kRowBytes;
    const uint8_t* srcv = pv + row * kRowBytes;
    uint8_t* st = wsm + (k % kStages) * kStageBytes;
#pragma unroll
    for (int i = lane; i < kTileBytes / 16; i += 32) {
      const int tok = i / kSegs, seg = i % kSegs;
      const int dst = tok * kRowBytes + ((seg ^ Cfg::swizzle(tok)) << 4);
      cp_async_16(smem_addr(st + dst), srck + i * 16, ok);
      cp_async_16(smem_addr(st + kTileBytes + dst), srcv + i * 16, ok);
    }
    if (lane < 8) {  // s_k, z_k, s_v, z_v of the 16 tokens: 32 bytes each
      const int which = lane >> 1, half_idx = lane & 1;
      const uint8_t* src = (which < 2 ? pk : pv) + ((which & 1) ? zeros_off : scales_off) + row * 2 + half_idx * 16;
      cp_async_16(smem_addr(st + 2 * kTileBytes + lane * 16), src, ok);
    }
  };

  float acc[NT][Cfg::kMTiles][4];
  float m_run[NT][2], l_run[NT][2], corr[NT][2];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < Cfg::kMTiles; ++i) acc[j][i][0] = acc[j][i][1] = acc[j][i][2] = acc[j][i][3] = 0.f;
    m_run[j][0] = m_run[j][1] = -INFINITY;
    l_run[j][0] = l_run[j][1] = corr[j][0] = corr[j][1] = 0.f;
  }
  int ev_run = 64;  // V-weight exponent (see the header); 64 = no tile seen yet

  // ldmatrix row addresses: lane l -> row l % 8 of matrix l / 8; matrices = (tokens 0-7 | 8-15) x (segment s, s+1).
  const int ld_tok = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int ld_seg = lane >> 4;
  const uint32_t ld_row = ld_tok * kRowBytes;
  const int ld_swz = Cfg::swizzle(ld_tok);

#pragma unroll
  for (int k = 0; k < kStages - 1; ++k) {
    if (k < my_tiles) issue(k);
    cp_async_commit();
  }
  for (int k = 0; k < my_tiles; ++k) {
    cp_async_wait<kStages - 2>();
    __syncwarp();  // tile k visible to all lanes; every lane is done with the stage refilled below
    if (k + kStages - 1 < my_tiles) issue(k + kStages - 1);
    cp_async_commit();

    const uint8_t* st = wsm + (k % kStages) * kStageBytes;
    const int t0 = t_begin + (warp + k * kDecodeWarps) * kTile;
    const int blk = __ldg(bt + block_col(p.g, t0));
    const int n_valid = (unsigned)blk < (unsigned)p.g.num_blocks ? min(kTile, t_end - t0) : 0;
    if (n_valid == 0) continue;  // only with block ids out of range
    // S^T rows of this lane: tokens r and r + 8; positions before the window (first tile only) are invalid too.
    const int n_before = t_first - t0;
    const bool v0 = r < n_valid && r >= n_before, v1 = r + 8 < n_valid && r + 8 >= n_before;

    const __half* sc = reinterpret_cast<const __half*>(st + 2 * kTileBytes);
    const float sk0 = __half2float(sc[r]), sk1 = __half2float(sc[r + 8]);
    const float zk0 = __half2float(sc[16 + r]), zk1 = __half2float(sc[24 + r]);
    // Invalid rows (past t_end: stale bytes of the block; before the window) get weight exactly 0: s_v = z_v = 0.
    const float sv0 = v0 ? __half2float(sc[32 + r]) : 0.f, sv1 = v1 ? __half2float(sc[40 + r]) : 0.f;
    const float zv0 = v0 ? __half2float(sc[48 + r]) : 0.f, zv1 = v1 ? __half2float(sc[56 + r]) : 0.f;

    // ---- S^T = K . Q^T over the codes.
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    const uint32_t kaddr = smem_addr(st) + ld_row;
#pragma unroll
    for (int s2 = 0; s2 < kSegs; s2 += 2) {
      uint32_t kw[4];  // (token r | r+8) x (segment s2 | s2+1): bytes 4t..4t+3 of the segment
      ldmatrix_x4(kw, kaddr + (((s2 + ld_seg) ^ ld_swz) << 4));
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int seg = s2 + u;
        const uint32_t w0 = kw[2 * u], w1 = kw[2 * u + 1];
        if constexpr (BITS == 4) {
          const uint32_t a[4] = {nib_lo(w0), nib_lo(w1), nib_hi(w0), nib_hi(w1)};
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_f16_16816(s[j], a, qf[j][2 * seg][0], qf[j][2 * seg][1]);
          const uint32_t x0 = w0 >> 8, x1 = w1 >> 8;
          const uint32_t a2[4] = {nib_lo(x0), nib_lo(x1), nib_hi(x0), nib_hi(x1)};
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_f16_16816(s[j], a2, qf[j][2 * seg + 1][0], qf[j][2 * seg + 1][1]);
        } else {
          const uint32_t a[4] = {byte_pair<0x4140>(w0), byte_pair<0x4140>(w1), byte_pair<0x4342>(w0),
                                 byte_pair<0x4342>(w1)};
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_f16_16816(s[j], a, qf[j][seg][0], qf[j][seg][1]);
        }
      }
    }

    // ---- V-weight exponent: largest s_v of the (valid) tile -> 2^ev keeps s_v * 2^ev < 2^15.
    const float svm = warp_max_rows(fmaxf(sv0, sv1));
    const int ev_tile = min(14 - (((__float_as_int(svm) >> 23) & 0xff) - 127), 64);
    const int ev_new = min(ev_run, ev_tile);
    const float ev_shift = (float)(ev_new - ev_run);
    ev_run = ev_new;
    const float two_ev = __int_as_float((ev_new + 127) << 23);
    const float svs0 = sv0 * two_ev, svs1 = sv1 * two_ev;
    const float ls0 = sk0 * logit_scale, ls1 = sk1 * logit_scale;

    // ---- Online softmax (log2 domain) and P' = p * s_v * 2^ev, transposed into the B fragment of O^T += V^T P'^T.
    uint32_t pb[NT][2];
    float aa[NT][2];          // rescale of acc / corr: 2^(m_old - m_new + ev_new - ev_old)
    bool changed = ev_shift != 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      // s[j]: {token r, head 2t}, {token r, head 2t+1}, {token r+8, head 2t}, {token r+8, head 2t+1}
      const float x0 = v0 ? fmaf(-zk0, qsum[j][0], s[j][0]) * ls0 : -INFINITY;
      const float x1 = v0 ? fmaf(-zk0, qsum[j][1], s[j][1]) * ls0 : -INFINITY;
      const float x2 = v1 ? fmaf(-zk1, qsum[j][0], s[j][2]) * ls1 : -INFINITY;
      const float x3 = v1 ? fmaf(-zk1, qsum[j][1], s[j][3]) * ls1 : -INFINITY;
      const float mn0 = fmaxf(m_run[j][0], warp_max_rows(fmaxf(x0, x2)));
      const float mn1 = fmaxf(m_run[j][1], warp_max_rows(fmaxf(x1, x3)));
      // Rescale factors are exactly 1 when neither the max nor the V exponent moved (most tiles after the first).
      const bool ch0 = m_run[j][0] != mn0, ch1 = m_run[j][1] != mn1;
      changed |= ch0 | ch1;
      const float al0 = ch0 ? ex2(m_run[j][0] - mn0) : 1.f;  // 0 on the first tile (m = -inf)
      const float al1 = ch1 ? ex2(m_run[j][1] - mn1) : 1.f;
      aa[j][0] = (ch0 || ev_shift != 0.f) ? ex2(m_run[j][0] - mn0 + ev_shift) : 1.f;
      aa[j][1] = (ch1 || ev_shift != 0.f) ? ex2(m_run[j][1] - mn1 + ev_shift) : 1.f;
      m_run[j][0] = mn0;
      m_run[j][1] = mn1;
      const float p0 = ex2(x0 - mn0), p1 = ex2(x1 - mn1), p2 = ex2(x2 - mn0), p3 = ex2(x3 - mn1);
      l_run[j][0] = fmaf(l_run[j][0], al0, p0 + p2);
      l_run[j][1] = fmaf(l_run[j][1], al1, p1 + p3);
      const __half2 w01 = __floats2half2_rn(p0 * svs0, p1 * svs0);  // 8x8 [token r][head 2t, 2t+1]
      const __half2 w23 = __floats2half2_rn(p2 * svs1, p3 * svs1);  // tokens 8-15
      const float2 f01 = __half22float2(w01), f23 = __half22float2(w23);
      corr[j][0] = fmaf(corr[j][0], aa[j][0], fmaf(f01.x, zv0, f23.x * zv1));
      corr[j][1] = fmaf(corr[j][1], aa[j][1], fmaf(f01.y, zv0, f23.y * zv1));
      // transpose -> lane (g, t) holds P'[head g][tokens 2t, 2t+1] and [tokens 2t+8, 2t+9]
      pb[j][0] = movmatrix_trans(*reinterpret_cast<const uint32_t*>(&w01));
      pb[j][1] = movmatrix_trans(*reinterpret_cast<const uint32_t*>(&w23));
    }
    if (__any_sync(0xffffffffu, changed)) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < Cfg::kMTiles; ++i) {
          acc[j][i][0] *= aa[j][0];
          acc[j][i][1] *= aa[j][1];
          acc[j][i][2] *= aa[j][0];
          acc[j][i][3] *= aa[j][1];
        }
    }

    // ---- O^T += V^T . P'^T over the codes.
    const uint32_t vaddr = smem_addr(st + kTileBytes) + ld_row;
#pragma unroll
    for (int s2 = 0; s2 < kSegs; s2 += 2) {
      uint32_t vw[4];  // (tokens 2t,2t+1 | 2t+8,2t+9) x (segment s2 | s2+1): bytes 2r, 2r+1 of both tokens
      ldmatrix_x4_trans(vw, vaddr + (((s2 + ld_seg) ^ ld_swz) << 4));
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int seg = s2 + u;
        const uint32_t x0 = vw[2 * u], x1 = vw[2 * u + 1];
        if constexpr (BITS == 4) {
          // m-tile 2seg: rows r / r+8 = channels 32seg + 4r + 0 / + 1; m-tile 2seg+1: + 2 / + 3.
          const uint32_t a[4] = {nib_lo(x0), nib_hi(x0), nib_lo(x1), nib_hi(x1)};
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_f16_16816(acc[j][2 * seg], a, pb[j][0], pb[j][1]);
          const uint32_t y0 = x0 >> 8, y1 = x1 >> 8;
          const uint32_t a2[4] = {nib_lo(y0), nib_hi(y0), nib_lo(y1), nib_hi(y1)};
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_f16_16816(acc[j][2 * seg + 1], a2, pb[j][0], pb[j][1]);
        } else {
          // m-tile seg: rows r / r+8 = channels 16seg + 2r / + 1.
          const uint32_t a[4] = {byte_pair<0x4240>(x0), byte_pair<0x4341>(x0), byte_pair<0x4240>(x1),
                                 byte_pair<0x4341>(x1)};
#pragma unroll
          for (int j = 0; j < NT; ++j) mma_f16_16816(acc[j][seg], a, pb[j][0], pb[j][1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- Merge the 4 warps through shared memory (the pipeline buffers are reused: barrier first).
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      l_run[j][c] = warp_sum_rows(l_run[j][c]);
      corr[j][c] = warp_sum_rows(corr[j][c]);
    }
  __syncthreads();
  float* const s_o = reinterpret_cast<float*>(smem);              // [warp][head][D], unnormalised
  float* const s_ml = s_o + kDecodeWarps * kHeads * D;           // [warp][head][2]: max (log2), sum
  const float inv_two_ev = __int_as_float((127 - ev_run) << 23);  // 2^-ev
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < Cfg::kMTiles; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int head = 8 * j + 2 * t + (c & 1);
        s_o[(warp * kHeads + head) * D + Cfg::out_channel(i, r, c >> 1)] = (acc[j][i][c] - corr[j][c & 1]) * inv_two_ev;
      }
    if (r == 0)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        s_ml[(warp * kHeads + 8 * j + 2 * t + c) * 2] = m_run[j][c];
        s_ml[(warp * kHeads + 8 * j + 2 * t + c) * 2 + 1] = l_run[j][c];
      }
  }
  __syncthreads();

  T* const ob = reinterpret_cast<T*>(p.out) + (int64_t)b * p.o_stride0;
  for (int idx = threadIdx.x; idx < nheads * (D / 4); idx += kDecodeThreads) {
    const int head = idx / (D / 4), c4 = (idx % (D / 4)) * 4;
    float mw[kDecodeWarps];
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      mw[w] = s_ml[(w * kHeads + head) * 2];
      m_all = fmaxf(m_all, mw[w]);
    }
    float l_all = 0.f;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float wt = mw[w] == -INFINITY ? 0.f : ex2(mw[w] - m_all);  // warps without tiles weigh 0
      l_all = fmaf(wt, s_ml[(w * kHeads + head) * 2 + 1], l_all);
      const float4 v = *reinterpret_cast<const float4*>(s_o + (w * kHeads + head) * D + c4);
      o.x = fmaf(wt, v.x, o.x), o.y = fmaf(wt, v.y, o.y), o.z = fmaf(wt, v.z, o.z), o.w = fmaf(wt, v.w, o.w);
    }
    const float inv = l_all > 0.f ? 1.f / l_all : 0.f;
    o.x *= inv, o.y *= inv, o.z *= inv, o.w *= inv;
    const int qh = qh0 + head;
    if (p.num_splits == 1) {
      Vec4<T>::store(ob + (int64_t)qh * p.o_stride1 + c4, o);
    } else {
      const int64_t row = ((int64_t)split * p.batch + b) * p.num_q_heads + qh;
      *reinterpret_cast<float4*>(p.ws_o + row * D + c4) = o;
      if (c4 == 0) {
        p.ws_ml[row * 2] = m_all;
        p.ws_ml[row * 2 + 1] = l_all;
      }
    }
  }
}

// Merges the splits of one (sequence, query head): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(m_s - M) l_s.
template <typename T, int D>
__global__ void kv_decode_reduce_kernel(const DecodeParams p) {
  const int b = blockIdx.x, qh = blockIdx.y;
  const int seq_len = clamped_seq_len(p, b);
  const int len = seq_len - window_read_start(seq_len, p.sliding_window, kTile);  // what the splits cover
  const int per = split_tokens(len, p.num_splits);
  const int live = per > 0 ? (len + per - 1) / per : 0;  // splits that hold tokens (<= num_splits)
  const int64_t stride = (int64_t)p.batch * p.num_q_heads;
  const int64_t row0 = (int64_t)b * p.num_q_heads + qh;
  float m_all = -INFINITY;
  for (int s = 0; s < live; ++s) m_all = fmaxf(m_all, p.ws_ml[(s * stride + row0) * 2]);
  T* const o_ptr = reinterpret_cast<T*>(p.out) + (int64_t)b * p.o_stride0 + (int64_t)qh * p.o_stride1;
  for (int c4 = threadIdx.x * 4; c4 < D; c4 += blockDim.x * 4) {
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    float wsum = 0.f;
    for (int s = 0; s < live; ++s) {
      const int64_t row = s * stride + row0;
      const float m = p.ws_ml[row * 2];
      const float wt = m == -INFINITY ? 0.f : ex2(m - m_all) * p.ws_ml[row * 2 + 1];
      const float4 v = *reinterpret_cast<const float4*>(p.ws_o + row * D + c4);
      o.x = fmaf(wt, v.x, o.x), o.y = fmaf(wt, v.y, o.y), o.z = fmaf(wt, v.z, o.z), o.w = fmaf(wt, v.w, o.w);
      wsum += wt;
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    Vec4<T>::store(o_ptr + c4, make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv));
  }
}

template <typename T, int D, int BITS, int NT>
cudaError_t launch_decode_cfg(const DecodeParams& p, cudaStream_t stream) {
  using Cfg = DecodeCfg<D, BITS, NT>;
  auto kernel = kv_decode_kernel<T, D, BITS, NT>;
  if constexpr (Cfg::kSmem > 48 * 1024) {
    static bool done[64] = {};
    const cudaError_t e = opt_in_dynamic_smem(kernel, Cfg::kSmem, done);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(p.batch, p.g.num_kv_heads * p.head_chunks, p.num_splits);
  kernel<<<grid, kDecodeThreads, Cfg::kSmem, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p.num_splits == 1) return e;
  kv_decode_reduce_kernel<T, D><<<dim3(p.batch, p.num_q_heads), D / 4, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t launch_decode_dtype(const DecodeParams& p, int head_dim, cudaStream_t stream) {
  const bool two = p.heads_per_cta == 16;
  switch (head_dim) {
    case 64: return two ? launch_decode_cfg<T, 64, BITS, 2>(p, stream) : launch_decode_cfg<T, 64, BITS, 1>(p, stream);
    case 128:
      return two ? launch_decode_cfg<T, 128, BITS, 2>(p, stream) : launch_decode_cfg<T, 128, BITS, 1>(p, stream);
    case 256: return launch_decode_cfg<T, 256, BITS, 1>(p, stream);  // 16 heads x D=256 would spill registers
    default: return cudaErrorInvalidValue;
  }
}

template <int BITS>
cudaError_t launch_decode_bits(const DecodeParams& p, int head_dim, int dtype, cudaStream_t stream) {
  if (dtype == 0) return launch_decode_dtype<half, BITS>(p, head_dim, stream);
  if (dtype == 1) return launch_decode_dtype<nv_bfloat16, BITS>(p, head_dim, stream);
  return cudaErrorInvalidValue;
}

}  // namespace kv
}  // namespace qserve
