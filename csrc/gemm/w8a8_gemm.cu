// W8A8 launcher: out = acc*sx*s (+ bias), acc = xq . weight with weight int8 [N, K] row-major and s the per-channel
// fp16 dequant_scale.  Same kernel as W4A8 (qgemm_kernel.cuh), B read by ldmatrix; checks: gemm_ops.cpp.
#include "qgemm_launch.cuh"

namespace qserve {
namespace gemm {
cudaError_t launch_w8a8(const GemmParams& p, bool out_bf16, cudaStream_t stream) {
  return launch<Mode::kW8>(p, out_bf16, stream);
}
}  // namespace gemm
}  // namespace qserve
