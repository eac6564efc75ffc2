// W4A8 group-128 launcher (progressive quantization): the 4-bit codes are rebuilt into int8 weights in registers,
// w8 = (q*s2 + s2_zero) byte-wise mod 256 (one 32-bit multiply + a byte-wise add per four weights), then a pure
// int8 MMA main loop; out = acc*sx*s1 (+ bias).  Kernel: qgemm_kernel.cuh; checks: gemm_ops.cpp.
#include "qgemm_launch.cuh"

namespace qserve {
namespace gemm {
cudaError_t launch_w4a8_per_group(const GemmParams& p, bool out_bf16, cudaStream_t stream) {
  return launch<Mode::kW4PerGroup>(p, out_bf16, stream);
}
}  // namespace gemm
}  // namespace qserve
