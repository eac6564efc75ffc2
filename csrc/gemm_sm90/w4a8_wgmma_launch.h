// Plain-C++ prototype of the sm_90a W4A8 wgmma launcher (shared by the .cu launcher and gemm_sm90_ops.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include "../gemm/qgemm_params.h"

namespace qserve {
namespace gemm_sm90 {
// Which kernel runs at M > 128: the launcher's own choice, or one forced (QSERVE_WGMMA_IMPL, read by the op).
enum class Impl : int { kDefault = 0, kV1 = 1, kV2 = 2, kV3 = 3, kV2Serial = 4, kSplit2 = 5, kSplit4 = 6, kV2OneWg = 7 };

// per_group: false = per-channel (uses xsum, szeros), true = group-128 (uses s2_scales, s2_zeros).
// Requires K % 128 == 0, N % 32 == 0 (checked by the op).  Returns the launch's error.
cudaError_t launch_w4a8_wgmma(const gemm::GemmParams& p, bool per_group, bool out_bf16, Impl impl,
                              cudaStream_t stream);
}  // namespace gemm_sm90
}  // namespace qserve
