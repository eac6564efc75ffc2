// Launchers of the sm_90a W4A8 wgmma GEMM (kernel: w4a8_wgmma_kernel.cuh; checks and dispatch: gemm_sm90_ops.cpp).
// Built only for sm_90a (setup.py's vllm_qserve._C_sm90 extension).  Launchers never throw: they return the
// launch's cudaError_t.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstdlib>
#include <cstring>

#include "w4a8_wgmma_kernel.cuh"
#include "w4a8_wgmma_launch.h"
#include "w4a8_wgmma_ws_kernel.cuh"

namespace qserve {
namespace gemm_sm90 {
namespace {

// Tile table, by M (tokens).  A CTA is kWGs consumer warpgroups x 128 channels by kBN tokens; the grid is
// ceil(M/kBN) x ceil(N/(128*kWGs)) CTAs on 132 SMs:
//  * M > 128: v2 (w4a8_wgmma_ws_kernel.cuh): a producer warpgroup (TMA / bulk copies) and 2 consumer warpgroups
//    (256 channels) x 128 tokens, 5 stages (175 KB of shared memory, 1 CTA/SM): the most MACs per byte staged (the
//    weight tile is 4-bit, so wide channel tiles are cheap), and two consumers hide each other's conversion.
//  * M <= 128: v1, 1 warpgroup x 64 tokens (wgmma n64), 4 stages, 2-3 CTAs/SM.
// v1's larger tiles (CfgMid: 1 warpgroup x 128 tokens; CfgLarge: 2 warpgroups x 128 tokens, cp.async) run only with
// QSERVE_WGMMA_IMPL=v1 (read per launch, so that a benchmark or a test can compare both kernels in one process).
// Run 5 (docs/kernels/gemm_sm90.md) measured v2 faster than CfgMid at every M = 192-512 and Llama shape.
using CfgSmall = Config<1, 64, 4>;
using CfgMid = Config<1, 128, 4>;
using CfgLarge = Config<2, 128, 5>;
using CfgLargeWs = WsConfig<128, 5>;

bool use_v1() {
  const char* v = std::getenv("QSERVE_WGMMA_IMPL");
  return v != nullptr && std::strcmp(v, "v1") == 0;
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) ==
            cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }
  return fn;
}

// xq [M, K] int8 as a 2-D tensor map: boxes of 128 bytes of K x kBN rows, 128-byte swizzle (the layout the
// wgmma descriptor reads), rows past M filled with zeros by the copy engine.
template <class Cfg>
cudaError_t make_act_map(const GemmParams& p, CUtensorMap* map) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.K), static_cast<cuuint64_t>(p.M)};
  cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.K)};
  cuuint32_t box[2] = {static_cast<cuuint32_t>(kStageK), static_cast<cuuint32_t>(Cfg::kBN)};
  cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(p.a), dims, strides, box, elem,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <Mode MODE, class Cfg, typename OutT>
cudaError_t launch_ws(const GemmParams& p, cudaStream_t stream) {
  constexpr int kSmem = Smem<MODE, Cfg>::kTotal;
  static_assert(kSmem <= 227 * 1024, "tile config exceeds sm_90's 227 KB of shared memory per block");
  auto kernel = w4a8_wgmma_ws_kernel<MODE, Cfg, OutT>;
  static bool done[64] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev >= 64 || !done[dev]) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (e != cudaSuccess) return e;
    if (dev < 64) done[dev] = true;
  }
  CUtensorMap map;
  e = make_act_map<Cfg>(p, &map);
  if (e != cudaSuccess) return e;
  const dim3 grid((p.M + Cfg::kBN - 1) / Cfg::kBN, (p.N + Cfg::kChannels - 1) / Cfg::kChannels);
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(map, p);
  return cudaGetLastError();
}

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
  if (use_v1()) {
    if (p.M <= 512) return launch_cfg<MODE, CfgMid, OutT>(p, stream);
    return launch_cfg<MODE, CfgLarge, OutT>(p, stream);
  }
  return launch_ws<MODE, CfgLargeWs, OutT>(p, stream);
}

}  // namespace

cudaError_t launch_w4a8_wgmma(const GemmParams& p, bool per_group, bool out_bf16, cudaStream_t stream) {
  if (per_group)
    return out_bf16 ? launch_by_m<Mode::kPerGroup, nv_bfloat16>(p, stream)
                    : launch_by_m<Mode::kPerGroup, half>(p, stream);
  return out_bf16 ? launch_by_m<Mode::kPerChannel, nv_bfloat16>(p, stream)
                  : launch_by_m<Mode::kPerChannel, half>(p, stream);
}

}  // namespace gemm_sm90
}  // namespace qserve
