// Host side shared by the GEMM launchers: tile choice by M and the launch (argument checks: gemm_ops.cpp).
#pragma once

#include "../smem_opt_in.cuh"
#include "qgemm_kernel.cuh"

namespace qserve {
namespace gemm {

// Tile table (CTA M x N x K-per-stage / warps M x N x K-split / stages), picked by M.  Sizes are chosen for
// 132-SM Hopper with mma.sync:
//  * M <= 32 (decode) is weight-bandwidth bound: a 32-column CTA gives N/32 CTAs (128 for N=4096), and 8 warps
//    split each stage's K so that one CTA keeps (kStages-1) x 8 KB of W4 weights in flight (the DRAM latency x
//    bandwidth product is ~20-25 KB per SM on H100).  W8 weights are twice the bytes per K, so half the K.
//  * M <= 64: same shape, 4 warps of 64 rows.
//  * 64 < M <= 256: 64x64 tiles (>= 128 CTAs on N=4096).  (128x64 tiles with 64x32 warps were tried for
//    128 < M <= 512: slower for per-channel and W8A8, mixed for g128; see docs/kernels/gemm.md.)
//  * M > 256: 128x128 tiles (8 warps of 64x32) for operand reuse.
// Every config fits the 99 KB dynamic shared-memory limit of sm_89 (and sm_80's 163 KB).
template <Mode MODE> struct Tiles {
  using M16 = TileConfig<16, 32, 512, 1, 1, 8, 4>;
  using M32 = TileConfig<32, 32, 512, 1, 1, 8, 3>;
};
template <> struct Tiles<Mode::kW8> {
  using M16 = TileConfig<16, 32, 256, 1, 1, 8, 5>;
  using M32 = TileConfig<32, 32, 256, 1, 1, 8, 4>;
};
using CfgM64 = TileConfig<64, 32, 128, 1, 1, 4, 4>;
using CfgM256 = TileConfig<64, 64, 128, 2, 2, 1, 4>;
using CfgLarge = TileConfig<128, 128, 64, 2, 4, 1, 4>;

template <Mode MODE, class Cfg, typename OutT>
cudaError_t launch_cfg(const GemmParams& p, cudaStream_t stream) {
  constexpr int kSmem = SmemLayout<MODE, Cfg>::kTotal;
  auto kernel = qgemm_kernel<MODE, Cfg, OutT>;
  static_assert(kSmem <= 99 * 1024, "tile config exceeds sm_89's 99 KB of shared memory per block");
  if constexpr (kSmem > 48 * 1024) {
    static bool done[64] = {};
    const cudaError_t e = opt_in_dynamic_smem(kernel, kSmem, done);
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((p.M + Cfg::kM - 1) / Cfg::kM, (p.N + Cfg::kN - 1) / Cfg::kN);
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

template <Mode MODE, typename OutT>
cudaError_t launch_by_m(const GemmParams& p, cudaStream_t stream) {
  if (p.M <= 16) return launch_cfg<MODE, typename Tiles<MODE>::M16, OutT>(p, stream);
  if (p.M <= 32) return launch_cfg<MODE, typename Tiles<MODE>::M32, OutT>(p, stream);
  if (p.M <= 64) return launch_cfg<MODE, CfgM64, OutT>(p, stream);
  if (p.M <= 256) return launch_cfg<MODE, CfgM256, OutT>(p, stream);
  return launch_cfg<MODE, CfgLarge, OutT>(p, stream);
}

template <Mode MODE>
cudaError_t launch(const GemmParams& p, bool out_bf16, cudaStream_t stream) {
  return out_bf16 ? launch_by_m<MODE, nv_bfloat16>(p, stream) : launch_by_m<MODE, half>(p, stream);
}

}  // namespace gemm
}  // namespace qserve
