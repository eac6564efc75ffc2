// Launchers of the sm_90a W4A8 wgmma GEMM (kernel: w4a8_wgmma_kernel.cuh; checks and dispatch: gemm_sm90_ops.cpp).
// Built only for sm_90a (setup.py's vllm_qserve._C_sm90 extension).  Launchers never throw: they return the
// launch's cudaError_t.
#include "w4a8_wgmma_kernel.cuh"
#include "w4a8_wgmma_launch.h"

namespace qserve {
namespace gemm_sm90 {
namespace {

// Tile table, by M (tokens).  A CTA is kWGs warpgroups x 128 channels by kBN tokens; the grid is
// ceil(M/kBN) x ceil(N/(128*kWGs)) CTAs on 132 SMs:
//  * M > 512: 2 warpgroups (256 channels) x 128 tokens, 5 stages (175 KB of shared memory, 1 CTA/SM): the most
//    MACs per byte staged (the weight tile is 4-bit, so wide channel tiles are cheap).
//  * 128 < M <= 512: 1 warpgroup x 128 tokens, 4 stages (~100 KB, 2 CTAs/SM): twice the CTAs along N.
//  * M <= 128: 1 warpgroup x 64 tokens (wgmma n64), 4 stages.
using CfgSmall = Config<1, 64, 4>;
using CfgMid = Config<1, 128, 4>;
using CfgLarge = Config<2, 128, 5>;

template <Mode MODE, class Cfg, typename OutT>
cudaError_t launch_cfg(const GemmParams& p, cudaStream_t stream) {
  constexpr int kSmem = Smem<MODE, Cfg>::kTotal;
  static_assert(kSmem <= 227 * 1024, "tile config exceeds sm_90's 227 KB of shared memory per block");
  auto kernel = w4a8_wgmma_kernel<MODE, Cfg, OutT>;
  // Opt in to > 48 KB of dynamic shared memory once per device (idempotent, so a race is benign).
  static bool done[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev >= 64 || !done[dev]) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (e != cudaSuccess) return e;
    if (dev < 64) done[dev] = true;
  }
  const dim3 grid((p.M + Cfg::kBN - 1) / Cfg::kBN, (p.N + Cfg::kChannels - 1) / Cfg::kChannels);
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <Mode MODE, typename OutT>
cudaError_t launch_by_m(const GemmParams& p, cudaStream_t stream) {
  if (p.M <= 128) return launch_cfg<MODE, CfgSmall, OutT>(p, stream);
  if (p.M <= 512) return launch_cfg<MODE, CfgMid, OutT>(p, stream);
  return launch_cfg<MODE, CfgLarge, OutT>(p, stream);
}

}  // namespace

cudaError_t launch_w4a8_wgmma(const GemmParams& p, bool per_group, bool out_bf16, cudaStream_t stream) {
  if (per_group)
    return out_bf16 ? launch_by_m<Mode::kPerGroup, nv_bfloat16>(p, stream) : launch_by_m<Mode::kPerGroup, half>(p, stream);
  return out_bf16 ? launch_by_m<Mode::kPerChannel, nv_bfloat16>(p, stream)
                  : launch_by_m<Mode::kPerChannel, half>(p, stream);
}

}  // namespace gemm_sm90
}  // namespace qserve
