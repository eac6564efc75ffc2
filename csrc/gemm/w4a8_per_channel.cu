// W4A8 per-channel launcher: out = acc*sx*s1 - s1_szeros*xsum (+ bias), acc = xq . q with q the raw 4-bit codes of
// QServe's packed qweight (the zero point lives only in the epilogue).  Kernel: qgemm_kernel.cuh; checks: gemm_ops.cpp.
#include "qgemm_launch.cuh"

namespace qserve {
namespace gemm {
cudaError_t launch_w4a8_per_channel(const GemmParams& p, bool out_bf16, cudaStream_t stream) {
  return launch<Mode::kW4PerChannel>(p, out_bf16, stream);
}
}  // namespace gemm
}  // namespace qserve
