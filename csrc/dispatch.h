// Small helpers shared by every kernel file: dtype dispatch and argument checks with messages that name the
// problem (a bad tensor never reaches a kernel).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define QSERVE_CHECK(cond, ...) TORCH_CHECK(cond, "qserve: ", __VA_ARGS__)

#define QSERVE_CHECK_CUDA_CONTIG(t)                                                       \
  QSERVE_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got ", (t).device());          \
  QSERVE_CHECK((t).is_contiguous(), #t " must be contiguous")

// Calls the lambda with scalar_t bound to half / nv_bfloat16 / float for the activation dtype.
#define QSERVE_DISPATCH_ACT(dtype, name, ...)                                             \
  [&] {                                                                                   \
    switch (dtype) {                                                                      \
      case at::ScalarType::Half: { using scalar_t = half; return __VA_ARGS__(); }          \
      case at::ScalarType::BFloat16: { using scalar_t = nv_bfloat16; return __VA_ARGS__(); } \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }        \
      default: TORCH_CHECK(false, "qserve: ", name, ": unsupported activation dtype ", dtype, \
                           " (fp16, bf16 or fp32)");                                       \
    }                                                                                     \
  }()
