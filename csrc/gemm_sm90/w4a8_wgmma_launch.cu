// Launchers of the sm_90a W4A8 wgmma GEMM (kernel: w4a8_wgmma_kernel.cuh; checks and dispatch: gemm_sm90_ops.cpp).
// Built only for sm_90a (setup.py's vllm_qserve._C_sm90 extension).  Launchers never throw: they return the
// launch's cudaError_t.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstdlib>
#include <cstring>

#include "w4a8_wgmma_kernel.cuh"
#include "w4a8_wgmma_launch.h"
#include "w4a8_wgmma_persistent_kernel.cuh"
#include "w4a8_wgmma_splitk_kernel.cuh"
#include "w4a8_wgmma_ws_kernel.cuh"

namespace qserve {
namespace gemm_sm90 {
namespace {

// Tile table, by M (tokens).  A CTA is kWGs consumer warpgroups x 128 channels by kBN tokens:
//  * M > 128: v2 (w4a8_wgmma_ws_kernel.cuh): a producer warpgroup (TMA / bulk copies) and 2 consumer warpgroups
//    (256 channels) x 128 tokens, 5 stages (175 KB of shared memory, 1 CTA/SM): the most MACs per byte staged
//    (the weight tile is 4-bit, so wide channel tiles are cheap), and two consumers hide each other's conversion.
//    Where that gives few tiles (4096-channel layers at a few hundred tokens: 32-48 CTAs for 132 SMs), K is split
//    4 or 2 ways across a thread-block cluster (w4a8_wgmma_splitk_kernel.cuh, choose_split below): exact int32
//    partial sums added through distributed shared memory.
//  * M <= 128: v1, 1 warpgroup x 64 tokens (wgmma n64), 4 stages, 2-3 CTAs/SM, grid ceil(M/64) x ceil(N/128).
// QSERVE_WGMMA_IMPL (read per launch, so that a benchmark or a test can compare kernels in one process) forces,
// at M > 128: "v2" = v2 without the split; "v3" = v2's CTA on a persistent grid (w4a8_wgmma_persistent_kernel.cuh:
// next tile prefetched during the epilogue, output through async bulk stores, 4 stages); "v1" = the cp.async
// kernel's larger tiles (CfgMid: 1 warpgroup x 128 tokens up to M = 512; CfgLarge: 2 warpgroups x 128 tokens
// above).  Measured (docs/kernels/gemm_sm90.md): v2 beat CfgMid at every M = 192-512 (run 5); v3 was up to 8% slower
// than v2 on the Llama shapes at M = 256-4096 (g128 up to 11%) and the split took down at M = 256-512 from 84 to 65 us
// (run 7).
using CfgSmall = Config<1, 64, 4>;
using CfgMid = Config<1, 128, 4>;
using CfgLarge = Config<2, 128, 5>;
using CfgLargeWs = WsConfig<128, 5>;
using CfgPersistent = WsConfig<128, 4>;

enum class Impl { kDefault, kV1, kV2, kV3 };

Impl forced_impl() {
  const char* v = std::getenv("QSERVE_WGMMA_IMPL");
  if (v == nullptr) return Impl::kDefault;
  if (std::strcmp(v, "v1") == 0) return Impl::kV1;
  if (std::strcmp(v, "v2") == 0) return Impl::kV2;
  if (std::strcmp(v, "v3") == 0) return Impl::kV3;
  return Impl::kDefault;
}

// Streaming multiprocessors of the current device (cached per device: one attribute query per process).
int sm_count(int dev) {
  static int counts[64] = {};
  if (dev >= 0 && dev < 64 && counts[dev] > 0) return counts[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
  if (dev >= 0 && dev < 64) counts[dev] = n;
  return n;
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
cudaError_t launch_persistent(const GemmParams& p, cudaStream_t stream) {
  constexpr int kSmem = PersistentSmem<MODE, Cfg>::kTotal;
  static_assert(kSmem <= 227 * 1024, "tile config exceeds sm_90's 227 KB of shared memory per block");
  auto kernel = w4a8_wgmma_persistent_kernel<MODE, Cfg, OutT>;
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
  const int tiles = ((p.M + Cfg::kBN - 1) / Cfg::kBN) * ((p.N + Cfg::kChannels - 1) / Cfg::kChannels);
  const int grid = tiles < sm_count(dev) ? tiles : sm_count(dev);
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(map, p);
  return cudaGetLastError();
}

template <Mode MODE, class Cfg, typename OutT, int kSplit>
cudaError_t prepare_splitk(int dev) {
  static bool done[64] = {};
  if (dev < 64 && done[dev]) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(w4a8_wgmma_splitk_kernel<MODE, Cfg, OutT, kSplit>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             SplitKSmem<MODE, Cfg, kSplit>::kTotal);
  if (e == cudaSuccess && dev < 64) done[dev] = true;
  return e;
}

template <Mode MODE, class Cfg, int kSplit>
void fill_cluster_launch(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, dim3 grid, cudaStream_t stream) {
  cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(Cfg::kThreads);
  cfg.dynamicSmemBytes = SplitKSmem<MODE, Cfg, kSplit>::kTotal;
  cfg.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 1;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = kSplit;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
}

// How many clusters of this kernel can be resident at once (cached per device).  Clusters must fit inside a GPC,
// so this is below SMs / kSplit when GPCs have SM counts that kSplit does not divide; a grid of more clusters
// than this runs in two waves, which costs more than the split gains.  The query is not made while `stream` is
// capturing a CUDA graph (the launch then goes unsplit: same numbers, bit for bit); a failed query is not cached.
template <Mode MODE, class Cfg, typename OutT, int kSplit>
int max_active_clusters(int dev, cudaStream_t stream) {
  static int counts[64] = {};
  if (dev < 64 && counts[dev] > 0) return counts[dev];
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) return -1;
  if (prepare_splitk<MODE, Cfg, OutT, kSplit>(dev) != cudaSuccess) return -1;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  fill_cluster_launch<MODE, Cfg, kSplit>(cfg, attr, dim3(1, 1, kSplit), nullptr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, w4a8_wgmma_splitk_kernel<MODE, Cfg, OutT, kSplit>, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // the failed query's own error (not sticky): clear it, use no split
    return -1;
  }
  if (n > 0 && dev < 64) counts[dev] = n;
  return n > 0 ? n : -1;
}

template <Mode MODE, class Cfg, typename OutT, int kSplit>
cudaError_t launch_splitk(const GemmParams& p, cudaStream_t stream) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = prepare_splitk<MODE, Cfg, OutT, kSplit>(dev);
  if (e != cudaSuccess) return e;
  CUtensorMap map;
  e = make_act_map<Cfg>(p, &map);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  const dim3 grid((p.M + Cfg::kBN - 1) / Cfg::kBN, (p.N + Cfg::kChannels - 1) / Cfg::kChannels, kSplit);
  fill_cluster_launch<MODE, Cfg, kSplit>(cfg, attr, grid, stream);
  return cudaLaunchKernelEx(&cfg, w4a8_wgmma_splitk_kernel<MODE, Cfg, OutT, kSplit>, map, p);
}

// How many ways v2 splits K (1 = no split): the largest of 4 / 2 whose clusters all fit at once (one wave) and
// that leaves every CTA at least kMinStagesPerSplit stages (the pipeline's depth plus a few, to amortize the
// reduction).
constexpr int kMinStagesPerSplit = 8;
template <Mode MODE, class Cfg, typename OutT>
int choose_split(const GemmParams& p, int dev, cudaStream_t stream) {
  const int tiles = ((p.M + Cfg::kBN - 1) / Cfg::kBN) * ((p.N + Cfg::kChannels - 1) / Cfg::kChannels);
  const int ktiles = p.K / kStageK;
  if (ktiles >= 4 * kMinStagesPerSplit && tiles <= max_active_clusters<MODE, Cfg, OutT, 4>(dev, stream)) return 4;
  if (ktiles >= 2 * kMinStagesPerSplit && tiles <= max_active_clusters<MODE, Cfg, OutT, 2>(dev, stream)) return 2;
  return 1;
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
  switch (forced_impl()) {
    case Impl::kV1:
      if (p.M <= 512) return launch_cfg<MODE, CfgMid, OutT>(p, stream);
      return launch_cfg<MODE, CfgLarge, OutT>(p, stream);
    case Impl::kV3: return launch_persistent<MODE, CfgPersistent, OutT>(p, stream);
    case Impl::kV2: return launch_ws<MODE, CfgLargeWs, OutT>(p, stream);
    default: break;
  }
  int dev = 0;
  const cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  switch (choose_split<MODE, CfgLargeWs, OutT>(p, dev, stream)) {
    case 4: return launch_splitk<MODE, CfgLargeWs, OutT, 4>(p, stream);
    case 2: return launch_splitk<MODE, CfgLargeWs, OutT, 2>(p, stream);
    default: return launch_ws<MODE, CfgLargeWs, OutT>(p, stream);
  }
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
