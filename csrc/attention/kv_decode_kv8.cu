// KV8 decode instantiations (fp16/bf16 x D 64/128/256 x 8 or 16 heads per CTA); see kv_decode.cuh.
#include "kv_decode.cuh"

namespace qserve {
namespace kv {

cudaError_t launch_kv_decode_kv8(const DecodeParams& p, int head_dim, int dtype, cudaStream_t stream) {
  return launch_decode_bits<8>(p, head_dim, dtype, stream);
}

}  // namespace kv
}  // namespace qserve
