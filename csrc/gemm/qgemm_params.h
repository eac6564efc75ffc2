// Plain-C++ view of the GEMM launchers: the parameter block and the three entry points.  Included by the .cu
// launchers and by gemm_ops.cpp (host C++: argument checks, output allocation).  All argument checking and every
// exception live in gemm_ops.cpp; the launchers only launch and report a cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace qserve {
namespace gemm {

struct GemmParams {
  const int8_t* a;          // xq [M, K]
  const int8_t* b;          // qweight [N, K/2] (W4) or weight [N, K] (W8)
  const float* sx;          // [M]
  const float* xsum;        // [M] (per-channel only)
  const void* col_scale;    // fp16 s1_scales / dequant_scale [N]
  const void* szeros;       // fp16 s1_szeros [N] (per-channel only)
  const int8_t* s2_scales;  // [K/128, N] permuted (per-group only)
  const int8_t* s2_zeros;   // [K/128, N] permuted (per-group only)
  const void* bias;         // [N] or nullptr
  int bias_kind;            // 0 none, 1 fp16, 2 bf16, 3 fp32
  void* out;                // [M, N], fp16 or bf16
  int M, N, K;
  // The channel range [n_begin, n_end) this launch computes (sm_90 wgmma kernels only; N is still the row stride
  // and the bound of every check).  n_end == 0 means N.  The launcher splits a wave-quantized layer into a head
  // and a tail launch with these (w4a8_wgmma_launch.cu, launch_head_and_tail).  The kernels bound channels by N,
  // not n_end, so a range that ends before N must end on a CTA tile boundary (the head: whole 256-channel tiles);
  // v3 (persistent) ignores the range and must be given the whole of N.
  int n_begin, n_end;
};

// out_bf16: false -> fp16 output.  Return the launch's error (cudaSuccess when queued).
cudaError_t launch_w4a8_per_channel(const GemmParams& p, bool out_bf16, cudaStream_t stream);
cudaError_t launch_w4a8_per_group(const GemmParams& p, bool out_bf16, cudaStream_t stream);
cudaError_t launch_w8a8(const GemmParams& p, bool out_bf16, cudaStream_t stream);

}  // namespace gemm
}  // namespace qserve
