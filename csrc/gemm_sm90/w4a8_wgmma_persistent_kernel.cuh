// v3 of the sm_90a W4A8 wgmma GEMM: v2 (w4a8_wgmma_ws_kernel.cuh, read it first) on a persistent grid.
//
// v2 launches one CTA per 256-channel x 128-token output tile.  Each CTA fills its pipeline from nothing,
// computes, then spends its epilogue (fp32 math, the output tile staged in shared memory, 64 KB of row stores)
// with the tensor cores idle; with K = 4096 (32 stages) that fixed cost is a visible share of every tile, which
// is why the 4096-deep layers reach ~1100-1200 TOP/s where down (K = 14336) reaches ~1400.
//
// v3 launches one CTA per SM and walks the tiles (tile = blockIdx.x, + gridDim.x, ...; tokens fastest, so the
// CTAs working at the same time share weight columns in L2):
//  * the producer's stage counter runs on across tiles, so it fills the free slots with the next tile's stages
//    while the consumers are still in the previous tile's epilogue: no pipeline refill bubble per tile;
//  * the output tile has its own shared-memory buffer (not the pipeline's), and leaves it through bulk async
//    copies (cp.async.bulk shared -> global, one per token row, issued by one warp): the consumers start the next
//    tile's main loop while the copy engine writes the previous tile out.  Before they write the buffer again,
//    the issuing warp waits until those copies have *read* it (wait_group.read).
// The cost: the buffer (66 KB) leaves room for 4 pipeline stages instead of v2's 5.
#pragma once

#include "w4a8_wgmma_ws_kernel.cuh"

namespace qserve {
namespace gemm_sm90 {

template <Mode MODE, class Cfg>
struct PersistentSmem {
  using Base = Smem<MODE, Cfg>;
  static constexpr int kStage = Base::kStage;
  static constexpr int kPipe = Base::kPipe;
  static constexpr int kOutRow = Base::kOutRow;
  static constexpr int kOut = Base::kOut;        // [kBN tokens][kChannels] staged output, rows padded by 16 bytes
  static constexpr int kBars = kPipe + kOut;     // full + empty mbarriers
  static constexpr int kEpi = kBars + 16 * Cfg::kStages;  // the epilogue's factors of the current tile
  static constexpr int kTotal = kEpi + EpiFactors<Cfg>::kBytes + 1024;  // + slack to align the base to 1024
};

// Shared -> global bulk copy (async proxy), tracked by the issuing thread's bulk groups.
__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The source buffers of this thread's committed bulk stores may be overwritten.
__device__ __forceinline__ void bulk_wait_read_all() {
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// This thread's committed bulk stores are complete (written to global memory).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

template <Mode MODE, class Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    w4a8_wgmma_persistent_kernel(const __grid_constant__ CUtensorMap act_map, const GemmParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#else
  using L = PersistentSmem<MODE, Cfg>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* const out_tile = smem_raw + (base - raw) + L::kPipe;
  const uint32_t out_tile_addr = base + L::kPipe;
  const uint32_t full_bar = base + L::kBars;
  const uint32_t empty_bar = full_bar + 8 * Cfg::kStages;

  const int tid = threadIdx.x, wg = tid >> 7;
  const int ktiles = p.K / kStageK;
  const int m_tiles = (p.M + Cfg::kBN - 1) / Cfg::kBN;
  const int tiles = m_tiles * ((p.N + Cfg::kChannels - 1) / Cfg::kChannels);

  if (tid == 0) init_stage_barriers<Cfg>(full_bar, empty_bar);
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Cfg::kProducerRegs));
    if (tid == 0) {
      int s = 0;  // stages issued so far by this CTA, across tiles: slot s % kStages, phase s / kStages
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int m0 = (tile % m_tiles) * Cfg::kBN, n0 = (tile / m_tiles) * Cfg::kChannels;
        for (int kt = 0; kt < ktiles; ++kt, ++s) {
          const int slot = s % Cfg::kStages;
          if (s >= Cfg::kStages) mbar_wait(empty_bar + 8 * slot, ((s / Cfg::kStages) - 1) & 1);
          issue_stage_copies<MODE, Cfg>(p, &act_map, base + slot * L::kStage, full_bar + 8 * slot, kt, m0, n0);
        }
      }
    }
  } else {
    // ------------------------------------------------------------------ consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Cfg::kConsumerRegs));
    const int ctid = tid - 128, cwg = wg - 1, lane = tid & 31, warp = (tid >> 5) & 3;
    const bool store_warp = ctid < 32;  // issues (and later waits for) the output tile's bulk stores
    OutT* const out = static_cast<OutT*>(p.out);
    float* const ep = reinterpret_cast<float*>(smem_raw + (base - raw) + L::kEpi);
    int acc[2][Cfg::kAccPerBlock];  // each tile's first k32 step overwrites (scale-d = false)
    int s = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int m0 = (tile % m_tiles) * Cfg::kBN, n0 = (tile / m_tiles) * Cfg::kChannels;
      // This tile's epilogue factors (the previous tile's epilogue is past the barrier that ended it), published by
      // the barrier before this tile's epilogue.
      load_epilogue_factors<MODE, Cfg, 128 * Cfg::kWGs>(p, ep, m0, n0, ctid);
      for (int kt = 0; kt < ktiles; ++kt, ++s) {
        const int slot = s % Cfg::kStages;
        mbar_wait(full_bar + 8 * slot, (s / Cfg::kStages) & 1);
        consume_stage<MODE, Cfg>(base + slot * L::kStage, cwg, warp, lane, kt == 0, acc);
        if ((tid & 127) == 0) mbar_arrive(empty_bar + 8 * slot);
      }
      // The previous tile's bulk stores must have read the staging buffer before it is overwritten.
      if (store_warp) bulk_wait_read_all();
      asm volatile("bar.sync 1, %0;\n" ::"n"(128 * Cfg::kWGs) : "memory");
      epilogue_to_smem<MODE, Cfg, OutT>(p, acc, ep, out_tile, cwg, warp, lane);
      fence_proxy_async_smem();  // this thread's generic-proxy writes -> visible to the bulk copies
      asm volatile("bar.sync 1, %0;\n" ::"n"(128 * Cfg::kWGs) : "memory");
      if (store_warp) {
        const int rows = min(Cfg::kBN, p.M - m0);
        const uint32_t bytes = min(Cfg::kChannels, p.N - n0) * sizeof(OutT);  // N % 32 == 0: a multiple of 64
        for (int r = lane; r < rows; r += 32)
          bulk_store(out + (int64_t)(m0 + r) * p.N + n0, out_tile_addr + r * L::kOutRow, bytes);
        bulk_commit();
      }
    }
    // Shared memory must outlive the copies reading it; waiting for completion also keeps the kernel's end
    // ordered after its last writes.
    if (store_warp) bulk_wait_all();
  }
#endif
}

}  // namespace gemm_sm90
}  // namespace qserve
