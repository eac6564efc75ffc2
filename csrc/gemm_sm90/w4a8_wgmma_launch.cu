// Launchers of the sm_90a W4A8 wgmma GEMM (kernel: w4a8_wgmma_kernel.cuh; checks and dispatch: gemm_sm90_ops.cpp).
// Built only for sm_90a (setup.py's vllm_qserve._C_sm90 extension).  Launchers never throw: they return the
// launch's cudaError_t.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <algorithm>

#include "../smem_opt_in.cuh"
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
//    CTAs take their tiles in grouped order (grouped_tile: the activation rows of a wave stay in L2 at large M).
//    Where v2 gives few tiles (4096-channel layers at a few hundred tokens: 32-48 CTAs for 132 SMs): K split 4
//    ways across a thread-block cluster where the clusters fit in one wave (w4a8_wgmma_splitk_kernel.cuh,
//    use_split4 below: exact int32 partial sums added through distributed shared memory), else, while its CTAs
//    fit one per SM, v2-1wg: one consumer warpgroup x 128 channels, 2 CTAs per SM (session 10; it replaced the
//    2-way split).  Where v2's last wave would be mostly empty: v2 on the full waves' channels and the 4-way split
//    on the rest (launch_head_and_tail, session 11).
//  * M <= 128: v1, 1 warpgroup x 64 tokens (wgmma n64), 4 stages, 2-3 CTAs/SM, grid ceil(M/64) x ceil(N/128).
// QSERVE_WGMMA_IMPL (read by the op per call, so that a benchmark or a test can compare kernels in one process;
// passed here as `impl`) forces, at M > 128: "v2" = v2 alone (no split, no head-and-tail launch); "v2-serial" = that with session 7's
// consume_stage (all 4 k32 steps converted before the stage's wgmmas, no step pipelining); "v2-1wg" = v2 with one
// consumer warpgroup (128 channels x 128 tokens, 4 stages) and two CTAs per SM; "split2" / "split4" =
// the cluster split-K kernel with that split whatever the occupancy (2 / 1 where K has fewer stages); "v3" = v2's CTA on a persistent grid (w4a8_wgmma_persistent_kernel.cuh:
// next tile prefetched during the epilogue, output through async bulk stores, 4 stages); "v1" = the cp.async
// kernel's larger tiles (CfgMid: 1 warpgroup x 128 tokens up to M = 512; CfgLarge: 2 warpgroups x 128 tokens
// above).  Measured (docs/kernels/gemm_sm90.md): v2 beat CfgMid at every M = 192-512 (run 5); v3 was up to 8% slower
// than v2 on the Llama shapes at M = 256-4096 (g128 up to 11%) and the split took down at M = 256-512 from 84 to 65 us
// (run 7).
using CfgSmall = Config<1, 64, 4>;
using CfgMid = Config<1, 128, 4>;
using CfgLarge = Config<2, 128, 5>;
using CfgLargeWs = WsConfig<128, 5>;
using CfgLargeWsSerial = WsConfig<128, 5, /*step_pipelined=*/false>;
using CfgPersistent = WsConfig<128, 4>;
using CfgLargeWsOneWg = WsConfig<128, 4, /*step_pipelined=*/true, /*consumer_wgs=*/1>;

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

// The TMA kernels (v2, v3): opt in to their shared memory, encode the activation map, launch `grid` CTAs.
template <class Cfg, typename Kernel>
cudaError_t launch_tma(Kernel kernel, int smem, bool (&done)[64], dim3 grid, const GemmParams& p,
                       cudaStream_t stream) {
  cudaError_t e = opt_in_dynamic_smem(kernel, smem, done);
  if (e != cudaSuccess) return e;
  CUtensorMap map;
  e = make_act_map<Cfg>(p, &map);
  if (e != cudaSuccess) return e;
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(map, p);
  return cudaGetLastError();
}

// One CTA per output tile (kBN tokens x kChannels channels of the launch's range [n_begin, n_end)), times `z`
// (the K split).
template <class Cfg>
dim3 tile_grid(const GemmParams& p, int z = 1) {
  return dim3((p.M + Cfg::kBN - 1) / Cfg::kBN, (p.n_end - p.n_begin + Cfg::kChannels - 1) / Cfg::kChannels, z);
}
template <class Cfg>
int tile_count(const GemmParams& p) {
  const dim3 g = tile_grid<Cfg>(p);
  return static_cast<int>(g.x * g.y);
}

template <Mode MODE, class Cfg, typename OutT>
cudaError_t launch_ws(const GemmParams& p, cudaStream_t stream) {
  constexpr int kSmem = Smem<MODE, Cfg>::kTotal;
  static_assert(kSmem <= 227 * 1024, "tile config exceeds sm_90's 227 KB of shared memory per block");
  // sm_90: 228 KB of shared memory per SM, of which each resident CTA reserves 1 KB
  static_assert(Cfg::kCtasPerSm * (kSmem + 1024) <= 228 * 1024, "tile config does not fit kCtasPerSm CTAs per SM");
  static bool done[64] = {};
  return launch_tma<Cfg>(w4a8_wgmma_ws_kernel<MODE, Cfg, OutT>, kSmem, done, tile_grid<Cfg>(p), p, stream);
}

template <Mode MODE, class Cfg, typename OutT>
cudaError_t launch_persistent(const GemmParams& p, int dev, cudaStream_t stream) {
  constexpr int kSmem = PersistentSmem<MODE, Cfg>::kTotal;
  static_assert(kSmem <= 227 * 1024, "tile config exceeds sm_90's 227 KB of shared memory per block");
  static bool done[64] = {};
  const int grid = std::min(tile_count<Cfg>(p), sm_count(dev));
  return launch_tma<Cfg>(w4a8_wgmma_persistent_kernel<MODE, Cfg, OutT>, kSmem, done, dim3(grid), p, stream);
}

// after_head: launched with programmatic stream serialization (PDL) behind a head launch, so its CTAs start on the
// SMs the head's CTAs leave instead of after the head's grid has completed and this launch has been processed.
template <Mode MODE, class Cfg, int kSplit>
void fill_cluster_launch(cudaLaunchConfig_t& cfg, cudaLaunchAttribute (&attr)[2], dim3 grid, cudaStream_t stream,
                         bool after_head = false) {
  cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(Cfg::kThreads);
  cfg.dynamicSmemBytes = SplitKSmem<MODE, Cfg, kSplit>::kTotal;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = kSplit;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = after_head ? 2 : 1;
}

// The split-K kernel and its opt-in flags, one per instantiation (shared by the occupancy query and the launch).
template <Mode MODE, class Cfg, typename OutT, int kSplit>
struct SplitK {
  static constexpr auto kernel = w4a8_wgmma_splitk_kernel<MODE, Cfg, OutT, kSplit>;
  static constexpr int kSmem = SplitKSmem<MODE, Cfg, kSplit>::kTotal;
  static_assert(kSmem <= 227 * 1024, "tile config exceeds sm_90's 227 KB of shared memory per block");
  static cudaError_t prepare() {
    static bool done[64] = {};
    return opt_in_dynamic_smem(kernel, kSmem, done);
  }
};

// How many clusters of this kernel can be resident at once (cached per device).  Clusters must fit inside a GPC,
// so this is below SMs / kSplit when GPCs have SM counts that kSplit does not divide; a grid of more clusters
// than this runs in two waves, which costs more than the split gains.  The query is not made while `stream` is
// capturing a CUDA graph (the launch then goes unsplit: same numbers, bit for bit); a failed query is not cached.
template <Mode MODE, class Cfg, typename OutT, int kSplit>
int max_active_clusters(int dev, cudaStream_t stream) {
  using K = SplitK<MODE, Cfg, OutT, kSplit>;
  static int counts[64] = {};
  if (dev < 64 && counts[dev] > 0) return counts[dev];
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) return -1;
  if (K::prepare() != cudaSuccess) return -1;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[2];
  fill_cluster_launch<MODE, Cfg, kSplit>(cfg, attr, dim3(1, 1, kSplit), nullptr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, K::kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();  // the failed query's own error (not sticky): clear it, use no split
    return -1;
  }
  if (n > 0 && dev < 64) counts[dev] = n;
  return n > 0 ? n : -1;
}

template <Mode MODE, class Cfg, typename OutT, int kSplit>
cudaError_t launch_splitk(const GemmParams& p, cudaStream_t stream, bool after_head = false) {
  using K = SplitK<MODE, Cfg, OutT, kSplit>;
  cudaError_t e = K::prepare();
  if (e != cudaSuccess) return e;
  CUtensorMap map;
  e = make_act_map<Cfg>(p, &map);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[2];
  fill_cluster_launch<MODE, Cfg, kSplit>(cfg, attr, tile_grid<Cfg>(p, kSplit), stream, after_head);
  return cudaLaunchKernelEx(&cfg, K::kernel, map, p);
}

// The split-K kernel gives rank r the stages [r per, (r+1) per), per = ceil(ktiles / split): the last rank is
// empty unless (split - 1) per < ktiles (K = 5 stages split 4 ways: 2, 2, 1, 0).
constexpr bool every_rank_has_stages(int ktiles, int split) {
  return (split - 1) * ((ktiles + split - 1) / split) < ktiles;
}

// Whether v2 splits K 4 ways: when the 4-CTA clusters all fit at once (one wave) and every CTA keeps at least
// kMinStagesPerSplit stages (the pipeline's depth plus a few, to amortize the reduction).  One wave only, measured:
// a wave-count rule (session 8) also split shapes with several waves of clusters and made them 1.4-1.8x slower
// than unsplit (qkv M = 1024: 73.8 vs 54.1 us; gate_up M = 512: 164.7 vs 104.8 us).  The 2-way split, which this
// rule also chose until session 10, lost to v2-1wg on every shape where it applied (run 9); it stays forceable.
constexpr int kMinStagesPerSplit = 8;
template <Mode MODE, class Cfg, typename OutT>
bool use_split4(const GemmParams& p, int dev, cudaStream_t stream) {
  return p.K / kStageK >= 4 * kMinStagesPerSplit &&
         tile_count<Cfg>(p) <= max_active_clusters<MODE, Cfg, OutT, 4>(dev, stream);
}

template <Mode MODE, class Cfg, typename OutT>
cudaError_t launch_cfg(const GemmParams& p, cudaStream_t stream) {
  constexpr int kSmem = Smem<MODE, Cfg>::kTotal;
  static_assert(kSmem <= 227 * 1024, "tile config exceeds sm_90's 227 KB of shared memory per block");
  auto kernel = w4a8_wgmma_kernel<MODE, Cfg, OutT>;
  static bool done[64] = {};
  const cudaError_t e = opt_in_dynamic_smem(kernel, kSmem, done);
  if (e != cudaSuccess) return e;
  kernel<<<tile_grid<Cfg>(p), Cfg::kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

// Wave quantization (run 10, docs/kernels/gemm_sm90.md).  v2's tiles all take about the same time T, so W waves
// cost W T however empty the last one is (qkv at M = 768: 144 tiles on 132 SMs, 2 T for 1.09 waves of work).
// Head and tail: the first h channel tiles (every token tile of them, at most W - 1 full waves) run as v2; the
// remaining channels run as a second launch, the 4-way cluster split, when its clusters fit one wave: measured
// ~0.55-0.7 T for the tail (a quarter of the MACs, plus its launch, pipeline fill and reduction), so W - 1 + ~0.6
// waves instead of W (qkv M = 768 53.5 -> 46.6 us, o M = 1152 54.1 -> 46.4, down M = 1152 147.1 -> 112.5).  Tails
// of the 2-way split or of v2-1wg were measured too and cost as much as the wave they replace (~0.9-1.0 T: qkv
// M = 896 / 1024, o M = 1536, gate_up M = 512 / 640 ran 2-6% slower), so a tail too large for the 4-way split
// keeps plain v2 (qkv at M = 1024: 64 tail tiles for ~32 clusters of 4).  The tail is launched with PDL
// (programmatic stream serialization): the head triggers it at its start, so tail CTAs take SMs as head CTAs exit
// instead of after the head grid completes (the tail waits for the head only before it exits; wgmma_ptx.cuh).
// Both launches compute disjoint channel ranges with the same integer math: the output is bit-identical to one v2
// launch.  Returns false (nothing launched) where there is no head or the tail is not a use_split4 shape.
template <Mode MODE, typename OutT>
bool launch_head_and_tail(const GemmParams& p, int dev, cudaStream_t stream, cudaError_t& err) {
  using Big = CfgLargeWs;
  const int sms = sm_count(dev);
  const dim3 g = tile_grid<Big>(p);
  const int waves = (static_cast<int>(g.x * g.y) + sms - 1) / sms;
  // Channel tiles of the head; with waves >= 2 there are more than (waves - 1) sms tiles, so head < g.y.
  const int head = (waves - 1) * sms / static_cast<int>(g.x);
  if (waves < 2 || head < 1) return false;
  GemmParams h = p, t = p;
  h.n_end = p.n_begin + head * Big::kChannels;
  t.n_begin = h.n_end;
  if (!use_split4<MODE, Big, OutT>(t, dev, stream)) return false;
  err = launch_ws<MODE, Big, OutT>(h, stream);
  if (err == cudaSuccess) err = launch_splitk<MODE, Big, OutT, 4>(t, stream, /*after_head=*/true);
  return true;
}

template <Mode MODE, typename OutT>
cudaError_t launch_by_m(const GemmParams& p, Impl impl, cudaStream_t stream) {
  if (p.M <= 128) return launch_cfg<MODE, CfgSmall, OutT>(p, stream);
  if (impl == Impl::kV1) {
    if (p.M <= 512) return launch_cfg<MODE, CfgMid, OutT>(p, stream);
    return launch_cfg<MODE, CfgLarge, OutT>(p, stream);
  }
  if (impl == Impl::kV2) return launch_ws<MODE, CfgLargeWs, OutT>(p, stream);
  if (impl == Impl::kV2Serial) return launch_ws<MODE, CfgLargeWsSerial, OutT>(p, stream);
  if (impl == Impl::kV2OneWg) return launch_ws<MODE, CfgLargeWsOneWg, OutT>(p, stream);
  int dev = 0;
  const cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (impl == Impl::kV3) return launch_persistent<MODE, CfgPersistent, OutT>(p, dev, stream);
  // Forced splits (no occupancy check), as far as K allows: every rank must keep at least one stage.
  const int ktiles = p.K / kStageK;
  if (impl == Impl::kSplit4 && every_rank_has_stages(ktiles, 4))
    return launch_splitk<MODE, CfgLargeWs, OutT, 4>(p, stream);
  if ((impl == Impl::kSplit4 || impl == Impl::kSplit2) && every_rank_has_stages(ktiles, 2))
    return launch_splitk<MODE, CfgLargeWs, OutT, 2>(p, stream);
  if (impl == Impl::kSplit4 || impl == Impl::kSplit2) return launch_ws<MODE, CfgLargeWs, OutT>(p, stream);
  // Few tiles: v2's 256-channel tiles would leave most SMs idle.  The 4-way cluster split where it fits in one
  // wave; else v2-1wg's 128-channel tiles (twice the CTAs), which beat the 2-way split wherever that applied
  // (run 9, M = 256: qkv 23.2 vs 27.6 us, o 22.0 vs 26.3, down 54.8 vs 63.1) and tie v2 from ~128 tiles up.
  if (use_split4<MODE, CfgLargeWs, OutT>(p, dev, stream)) return launch_splitk<MODE, CfgLargeWs, OutT, 4>(p, stream);
  if (tile_count<CfgLargeWsOneWg>(p) <= sm_count(dev)) return launch_ws<MODE, CfgLargeWsOneWg, OutT>(p, stream);
  cudaError_t err = cudaSuccess;
  if (launch_head_and_tail<MODE, OutT>(p, dev, stream, err)) return err;
  return launch_ws<MODE, CfgLargeWs, OutT>(p, stream);
}

}  // namespace

cudaError_t launch_w4a8_wgmma(const GemmParams& params, bool per_group, bool out_bf16, Impl impl,
                              cudaStream_t stream) {
  GemmParams p = params;
  if (p.n_end == 0) p.n_end = p.N;
  if (per_group)
    return out_bf16 ? launch_by_m<Mode::kPerGroup, nv_bfloat16>(p, impl, stream)
                    : launch_by_m<Mode::kPerGroup, half>(p, impl, stream);
  return out_bf16 ? launch_by_m<Mode::kPerChannel, nv_bfloat16>(p, impl, stream)
                  : launch_by_m<Mode::kPerChannel, half>(p, impl, stream);
}

}  // namespace gemm_sm90
}  // namespace qserve
