// v2 of the sm_90a W4A8 wgmma GEMM: warp-specialized.  Same math, fragments and epilogue as
// w4a8_wgmma_kernel.cuh (read its header first); what changes is how stages reach shared memory:
//
//  * warpgroup 0 is the producer: one thread issues, per stage, one TMA tensor copy of the activation tile
//    (2-D tensor map, 128-byte swizzle, rows >= M zero-filled by the copy engine) and one 1-D bulk copy per
//    packed weight column (a 32-channel x 128-k slice of the checkpoint is 4 consecutive 512-byte tiles =
//    2 KB contiguous), plus the group's s2 scales / zeros, all completing on the stage's "full" mbarrier.
//    It gives its registers away (setmaxnreg.dec) to the consumers.
//  * warpgroups 1 and 2 are consumers (128 channels each): wait on "full", convert A, issue the 8 wgmmas,
//    wait for them (wgmma.wait_group 0, see consume_stage) and release the slot on its "empty" mbarrier; the
//    other consumer's wgmmas keep the tensor cores busy while one converts.
// There is no CTA-wide barrier in the main loop, so the two consumers and the copies drift freely, and the
// copies cost no consumer instructions (v1 spent 8 cp.async per thread per stage).
#pragma once

#include <cuda.h>

#include "w4a8_wgmma_kernel.cuh"

namespace qserve {
namespace gemm_sm90 {

// WGS_ = 2 (v2): 2 consumer warpgroups share each stage's activation tile (256 channels x BN tokens), 1 CTA/SM.
// WGS_ = 1 ("v2-1wg", session 10): 1 consumer warpgroup (128 channels) and 2 CTAs per SM, so that one CTA's
// per-tile fixed cost (pipeline fill, epilogue, stores, CTA launch: ~5 us of a ~25 us K = 4096 tile, docs/kernels/
// gemm_sm90.md run 9) can run under the other CTA's wgmmas; the price is 1.5x the L2 -> shared traffic per MAC
// (the activation tile is no longer shared by 256 channels).  Registers: 2 x (128 x 232 + 128 x 24) = 65536.
template <int BN_, int STAGES_, bool STEP_PIPELINED_ = true, int WGS_ = 2>
struct WsConfig {
  static_assert(WGS_ == 1 || WGS_ == 2, "1 or 2 consumer warpgroups");
  static constexpr int kWGs = WGS_;                // consumer warpgroups
  static constexpr int kBN = BN_;
  static constexpr int kStages = STAGES_;
  static constexpr int kThreads = 128 * (kWGs + 1);  // + the producer warpgroup
  static constexpr int kChannels = 128 * kWGs;
  static constexpr int kNTiles = kChannels / 32;
  static constexpr int kKTiles = kStageK / 32;
  static constexpr int kAccPerBlock = kBN / 2;
  static constexpr bool kStepPipelined = STEP_PIPELINED_;  // convert k32 step ks+1 under step ks's wgmmas
  static constexpr int kCtasPerSm = kWGs == 2 ? 1 : 2;     // __launch_bounds__ minimum blocks per SM
  // setmaxnreg: 2 x 128 x 232 + 128 x 40 <= 65536 (one CTA); 2 x (128 x 232 + 128 x 24) = 65536 (two CTAs)
  static constexpr int kConsumerRegs = 232;
  static constexpr int kProducerRegs = kWGs == 2 ? 40 : 24;
};

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Wait for the completion of the barrier phase with the given parity (0 for the first phase, 1, 0, ...).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

// Thread 0: the stage barriers of a warp-specialized pipeline ("full": the producer's arrive.expect_tx, completed by
// the copies' bytes; "empty": one arrive per consumer warpgroup).  The caller then synchronizes the CTA.
template <class Cfg>
__device__ __forceinline__ void init_stage_barriers(uint32_t full_bar, uint32_t empty_bar) {
  for (int s = 0; s < Cfg::kStages; ++s) {
    mbar_init(full_bar + 8 * s, 1);
    mbar_init(empty_bar + 8 * s, Cfg::kWGs);
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Producer thread: the copies of K stage `kt` for the tile at (m0 tokens, n0 channels) into `stage`, all completing
// on `bar`: the activation box by TMA (rows >= M zero-filled), one 2 KB bulk copy per packed 32-channel weight column
// inside N, and for group 128 the stage's s2 scales and zeros.
template <Mode MODE, class Cfg>
__device__ __forceinline__ void issue_stage_copies(const GemmParams& p, const CUtensorMap* act_map, uint32_t stage,
                                                   uint32_t bar, int kt, int m0, int n0) {
  using L = Smem<MODE, Cfg>;
  const int ntiles = min(Cfg::kNTiles, p.N / 32 - n0 / 32);  // weight columns inside N
  const uint32_t bytes = Cfg::kBN * kStageK + ntiles * (Cfg::kKTiles * 512) +
                         (MODE == Mode::kPerGroup ? 2 * 32 * ntiles : 0);
  mbar_arrive_expect_tx(bar, bytes);
  tma_load_2d(stage, act_map, kt * kStageK, m0, bar);
  const int k32_total = p.K / 32;
  for (int t = 0; t < ntiles; ++t) {
    const int8_t* src = p.b + ((int64_t)(n0 / 32 + t) * k32_total + kt * Cfg::kKTiles) * 512;
    bulk_load(stage + L::kAct + t * Cfg::kKTiles * 512, src, Cfg::kKTiles * 512, bar);
  }
  if constexpr (MODE == Mode::kPerGroup) {
    const int64_t off = (int64_t)kt * p.N + n0;
    bulk_load(stage + L::kAct + L::kW, p.s2_scales + off, 32 * ntiles, bar);
    bulk_load(stage + L::kAct + L::kW + Cfg::kChannels, p.s2_zeros + off, 32 * ntiles, bar);
  }
}

template <Mode MODE, class Cfg, typename OutT>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm)
    w4a8_wgmma_ws_kernel(const __grid_constant__ CUtensorMap act_map, const GemmParams p) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#else
  using L = Smem<MODE, Cfg>;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* const base_ptr = smem_raw + (base - raw);
  const uint32_t full_bar = base + L::kPipeAndOut;  // kStages x 8 bytes, then the "empty" barriers
  const uint32_t empty_bar = full_bar + 8 * Cfg::kStages;

  const int tid = threadIdx.x, wg = tid >> 7;
  int m0, n0;  // first token and channel of this CTA's tile (grouped order, w4a8_wgmma_kernel.cuh)
  grouped_tile<Cfg>(p, m0, n0);
  const int ktiles = p.K / kStageK;
  // A head launch (its channel range ends before N): the tail launch may be scheduled now, onto SMs as they free up.
  if (p.n_end < p.N) pdl_launch_dependents();

  if (tid == 0) init_stage_barriers<Cfg>(full_bar, empty_bar);
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Cfg::kProducerRegs));
    if (tid == 0) {
      for (int kt = 0; kt < ktiles; ++kt) {
        const int slot = kt % Cfg::kStages;
        if (kt >= Cfg::kStages) mbar_wait(empty_bar + 8 * slot, ((kt / Cfg::kStages) - 1) & 1);
        issue_stage_copies<MODE, Cfg>(p, &act_map, base + slot * L::kStage, full_bar + 8 * slot, kt, m0, n0);
      }
    }
  } else {
    // ------------------------------------------------------------------ consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Cfg::kConsumerRegs));
    const int ctid = tid - 128, cwg = wg - 1, lane = tid & 31, warp = (tid >> 5) & 3;
    // The epilogue's factors, loaded while the first stages are in flight; published by the barrier below.
    float* const ep = reinterpret_cast<float*>(base_ptr + L::kEpi);
    load_epilogue_factors<MODE, Cfg, 128 * Cfg::kWGs>(p, ep, m0, n0, ctid);
    int acc[2][Cfg::kAccPerBlock];  // first k32 step overwrites (scale-d = false)
    for (int kt = 0; kt < ktiles; ++kt) {
      const int slot = kt % Cfg::kStages;
      mbar_wait(full_bar + 8 * slot, (kt / Cfg::kStages) & 1);
      consume_stage<MODE, Cfg>(base + slot * L::kStage, cwg, warp, lane, kt == 0, acc);
      // this stage's wgmmas are done: hand its slot back to the producer (one arrive per warpgroup)
      if ((tid & 127) == 0) mbar_arrive(empty_bar + 8 * slot);
    }
    // Both consumers are done reading every stage (all copies completed: each was waited on), so the pipeline
    // buffers can hold the output tile; the factors are staged.  Named barrier 1 = the 256 consumer threads only.
    asm volatile("bar.sync 1, %0;\n" ::"n"(128 * Cfg::kWGs) : "memory");
    epilogue_to_smem<MODE, Cfg, OutT>(p, acc, ep, base_ptr, cwg, warp, lane);
    asm volatile("bar.sync 1, %0;\n" ::"n"(128 * Cfg::kWGs) : "memory");
    store_tile<Cfg, OutT>(p, base_ptr, m0, n0, ctid, 128 * Cfg::kWGs);
  }
#endif
}

}  // namespace gemm_sm90
}  // namespace qserve
