// Plain-C++ parameter block shared by the fused activation-quantization ops (fused_quant_ops.cpp, host checks)
// and their kernels (fused_quant_kernels.cu).  The launchers never throw: they return a cudaError_t.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qserve {
namespace fused_quant {

// What runs in front of the per-token int8 quantization.
enum class Prologue : int {
  kRmsNorm = 0,     // y = rms_norm(x) * weight
  kAddRmsNorm = 1,  // r = x + residual (written out), y = rms_norm(r) * weight
  kSiluMul = 2,     // y = silu(x[:, :d]) * x[:, d:]
  kGeluTanhMul = 3, // y = gelu_tanh(x[:, :d]) * x[:, d:]   (GeGLU: Gemma)
};

enum class Dtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

struct Params {
  // Inputs.  Rows may be strided (row_stride elements apart); the last dim is contiguous.
  const void* x = nullptr;         // [M, K] (kSiluMul: [M, 2K], gate then up)
  int64_t x_row_stride = 0;
  const void* residual = nullptr;  // kAddRmsNorm: [M, K]
  int64_t residual_row_stride = 0;
  const void* weight = nullptr;    // rms kinds: [K], same dtype as x
  float eps = 0.f;
  // Outputs (contiguous, freshly allocated).
  void* residual_out = nullptr;  // kAddRmsNorm: [M, K], x + residual in the activation dtype
  int8_t* xq = nullptr;          // [M, K]
  float* scale = nullptr;        // [M]  amax / 127
  float* xsum = nullptr;         // [M]  activation sum (per-channel W4A8), or nullptr
  bool xsum_of_quantized = false;  // xsum = float(sum(xq)) * scale, else sum of the operand (sum_mode.h)
  int64_t m = 0;
  int k = 0;  // quantized width (kSiluMul: half the input width)
};

// Launches on `stream`; returns the launch error (cudaSuccess when m == 0).  gated_batch: kSiluMul at m >= 1024,
// vectors per thread of the batched launch (1, 2 or 4; 0 = the default, 2), from QSERVE_FUSED_QUANT_GATED_BATCH
// (a benchmark's A/B switch, read by the op; fused_quant_kernels.cu, docs/kernels/fused_quant.md).
cudaError_t launch(Prologue prologue, Dtype dtype, const Params& p, cudaStream_t stream, int gated_batch = 0);

}  // namespace fused_quant
}  // namespace qserve
