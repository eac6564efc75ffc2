// Epilogue helpers shared by the mma.sync GEMM (qgemm_kernel.cuh) and the Hopper wgmma GEMM (csrc/gemm_sm90/):
// rounding fp32 results to the output dtype (one value or a pair for a 4-byte store) and reading the optional bias
// in its own dtype (GemmParams::bias_kind: 1 fp16, 2 bf16, 3 fp32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qserve {
namespace gemm {

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ half from_float<half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ nv_bfloat16 from_float<nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> struct Pair;
template <> struct Pair<half> {
  using type = half2;
  static __device__ __forceinline__ half2 make(float a, float b) { return __halves2half2(__float2half_rn(a), __float2half_rn(b)); }
};
template <> struct Pair<nv_bfloat16> {
  using type = nv_bfloat162;
  static __device__ __forceinline__ nv_bfloat162 make(float a, float b) {
    return __halves2bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(b));
  }
};

__device__ __forceinline__ float load_bias(const void* bias, int kind, int j) {
  switch (kind) {
    case 1: return __half2float(static_cast<const half*>(bias)[j]);
    case 2: return __bfloat162float(static_cast<const nv_bfloat16*>(bias)[j]);
    case 3: return static_cast<const float*>(bias)[j];
    default: return 0.f;
  }
}

}  // namespace gemm
}  // namespace qserve
