// v2 (w4a8_wgmma_ws_kernel.cuh, read it first) with K split across a thread-block cluster, for the shapes that
// give v2 too few tiles: a 4096-channel layer at 256 tokens is 16 x 2 = 32 CTAs of 256 x 128 on 132 SMs, so
// three quarters of the GPU idle (down at M = 256: 84 us where cuBLAS FP8 takes 47).
//
// Each output tile is computed by a cluster of kSplit CTAs (grid z = the split, cluster dims 1 x 1 x kSplit),
// CTA rank r running v2's pipeline over its own contiguous range of K stages into its own int32 accumulators.
// The partial sums are then added through distributed shared memory, which keeps the result exact (integer
// adds in any order give the same int32, so the output is bit-identical to v2 and to the reference):
//   1. each CTA stores its accumulators as an int32 [kBN tokens][kChannels (+4 pad)] tile in its own shared
//      memory (the pipeline buffers are free by then);
//   2. cluster barrier (release / acquire: the stores are visible cluster-wide);
//   3. CTA rank r sums tokens [r kBN/kSplit, (r+1) kBN/kSplit) over the kSplit tiles (ld.shared::cluster),
//      applies the fp32 epilogue (the same operations as epilogue_to_smem) and stores bf16/fp16 rows;
//   4. cluster barrier again, so that no CTA exits (freeing its shared memory) while another still reads it.
// No workspace in global memory, no atomics, no second kernel; the launcher picks kSplit so that the clusters fit in
// one wave (use_split4) and every CTA keeps enough stages to fill its pipeline.
#pragma once

#include "w4a8_wgmma_ws_kernel.cuh"

namespace qserve {
namespace gemm_sm90 {

template <Mode MODE, class Cfg, int kSplit>
struct SplitKSmem {
  using Base = Smem<MODE, Cfg>;
  static constexpr int kPartRow = Cfg::kChannels + 4;      // int32s per staged token row: +4 = no bank conflicts
  static constexpr int kPart = Cfg::kBN * kPartRow * 4;    // bytes of the partial-sum tile
  static constexpr int kBars = Base::kPipe > kPart ? Base::kPipe : kPart;  // pipeline or partial tile, then barriers
  static constexpr int kEpi = kBars + 16 * Cfg::kStages;                    // then the epilogue's factors
  static constexpr int kTotal = kEpi + EpiFactors<Cfg>::kBytes + 1024;
  static_assert(Cfg::kBN % kSplit == 0, "each rank reduces a whole number of token rows");
};

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// Every thread of every CTA of the cluster arrives; release / acquire order the shared-memory stores before the
// barrier against the remote loads after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The shared::cluster address of `addr` (a shared::cta address of this CTA's layout) in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ int2 ld_cluster_s32x2(uint32_t addr) {
  int2 v;
  // volatile keeps it after the cluster barrier (also volatile asm); no "memory" clobber, so that the compiler may
  // issue the next rows' remote loads before this row's global stores.
  asm volatile("ld.shared::cluster.v2.s32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

template <Mode MODE, class Cfg, typename OutT, int kSplit>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    w4a8_wgmma_splitk_kernel(const __grid_constant__ CUtensorMap act_map, const GemmParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#else
  using L = SplitKSmem<MODE, Cfg, kSplit>;
  using S = Smem<MODE, Cfg>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  int* const part = reinterpret_cast<int*>(smem_raw + (base - raw));  // the partial-sum tile (after the loop)
  const uint32_t full_bar = base + L::kBars;
  const uint32_t empty_bar = full_bar + 8 * Cfg::kStages;

  const int tid = threadIdx.x, wg = tid >> 7;
  const int m0 = blockIdx.x * Cfg::kBN, n0 = p.n_begin + blockIdx.y * Cfg::kChannels;
  const uint32_t rank = cluster_ctarank();
  // This rank's K stages: a contiguous range, ceil-split (the launcher guarantees each rank at least one).
  const int ktiles = p.K / kStageK, per = (ktiles + kSplit - 1) / kSplit;
  const int kt_begin = static_cast<int>(rank) * per, kt_end = min(ktiles, kt_begin + per);

  if (tid == 0) init_stage_barriers<Cfg>(full_bar, empty_bar);
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer (v2's, over kt_begin..kt_end)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Cfg::kProducerRegs));
    if (tid == 0) {
      for (int kt = kt_begin, s = 0; kt < kt_end; ++kt, ++s) {
        const int slot = s % Cfg::kStages;
        if (s >= Cfg::kStages) mbar_wait(empty_bar + 8 * slot, ((s / Cfg::kStages) - 1) & 1);
        issue_stage_copies<MODE, Cfg>(p, &act_map, base + slot * S::kStage, full_bar + 8 * slot, kt, m0, n0);
      }
    }
    __syncwarp();
    // The producer warpgroup takes part in both cluster barriers (they count every thread of the cluster).
    cluster_sync();
    cluster_sync();
  } else {
    // ------------------------------------------------------------------ consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Cfg::kConsumerRegs));
    const int ctid = tid - 128, cwg = wg - 1, lane = tid & 31, warp = (tid >> 5) & 3;
    // The epilogue's factors, loaded while the first stages are in flight; published by the barrier after the loop.
    using E = EpiFactors<Cfg>;
    float* const ep = reinterpret_cast<float*>(smem_raw + (base - raw) + L::kEpi);
    load_epilogue_factors<MODE, Cfg, 128 * Cfg::kWGs>(p, ep, m0, n0, ctid);
    int acc[2][Cfg::kAccPerBlock];
    for (int kt = kt_begin, s = 0; kt < kt_end; ++kt, ++s) {
      const int slot = s % Cfg::kStages;
      mbar_wait(full_bar + 8 * slot, (s / Cfg::kStages) & 1);
      consume_stage<MODE, Cfg>(base + slot * S::kStage, cwg, warp, lane, s == 0, acc);
      if ((tid & 127) == 0) mbar_arrive(empty_bar + 8 * slot);
    }
    // Both consumers are done with every stage (the pipeline buffers take the int32 partial tile) and have staged
    // the factors.
    asm volatile("bar.sync 1, %0;\n" ::"n"(128 * Cfg::kWGs) : "memory");
    {
      const int g = lane >> 2, t = lane & 3;
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int i = 0; i < Cfg::kAccPerBlock; ++i) {
          const int ch = (cwg * 4 + warp) * 32 + 16 * b + g + 8 * ((i >> 1) & 1);  // see epilogue_to_smem
          const int tok = 8 * (i >> 2) + 2 * t + (i & 1);
          part[tok * L::kPartRow + ch] = acc[b][i];
        }
    }
    __syncwarp();  // the barrier is .aligned: every lane of the warp executes it together
    cluster_sync();
    // Reduce and store this rank's token rows: 2 channels per thread and step, a row = kChannels / 2 threads.  The
    // factors come from this CTA's shared memory; unrolled so that several steps' remote loads are in flight.
    constexpr int kRows = Cfg::kBN / kSplit, kPairs = Cfg::kChannels / 2;
    OutT* const out = static_cast<OutT*>(p.out);
    const uint32_t part_addr = base;
#pragma unroll 4
    for (int idx = ctid; idx < kRows * kPairs; idx += 128 * Cfg::kWGs) {
      const int tok = static_cast<int>(rank) * kRows + idx / kPairs, ch = 2 * (idx % kPairs);
      const int gm = m0 + tok, col = n0 + ch;
      if (gm < p.M && col < p.N) {  // N % 32 == 0: a pair is inside N or outside it
        const uint32_t off = part_addr + 4u * static_cast<uint32_t>(tok * L::kPartRow + ch);
        int s0 = 0, s1 = 0;
#pragma unroll
        for (int r = 0; r < kSplit; ++r) {
          const int2 v = ld_cluster_s32x2(map_to_rank(off, static_cast<uint32_t>(r)));
          s0 += v.x;
          s1 += v.y;
        }
        const float sx = ep[E::kSx + tok], xs = ep[E::kXs + tok];
        float o[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = __fmul_rn(__fmul_rn(__int2float_rn(e ? s1 : s0), sx), ep[E::kCs + ch + e]);
          if constexpr (MODE == Mode::kPerChannel) v = __fsub_rn(v, __fmul_rn(xs, ep[E::kCz + ch + e]));
          if (p.bias_kind) v = __fadd_rn(v, ep[E::kCb + ch + e]);
          o[e] = v;
        }
        *reinterpret_cast<typename Pair<OutT>::type*>(out + (int64_t)gm * p.N + col) = Pair<OutT>::make(o[0], o[1]);
      }
    }
    __syncwarp();  // lanes that skipped rows past M / N rejoin before the .aligned barrier
    cluster_sync();  // the other ranks have finished reading this CTA's partial tile
  }
  // A tail launch (PDL, after a head): do not complete before the head has (no-op for a plain launch).
  pdl_wait_prerequisites();
#endif
}

}  // namespace gemm_sm90
}  // namespace qserve
