// The activation sum that per-channel W4A8 consumes (out = acc * sx * s1 - s1_szeros * xsum, docs/format.md
// section 5), as the quantization ops' `sum_mode` argument.  Host and device code; no torch.
//   kNoSum           no sum (group-128 W4A8, W8A8): xsum is an empty tensor
//   kSumOfInput      xsum = sum(x), the unquantized operand in fp32: what QServe's kernels compute
//   kSumOfQuantized  xsum = float(sum(xq)) * scale: the GEMM then computes exactly x_hat . W (x_hat = xq * scale),
//                    what DeepCompressor simulates; checkpoints say which with quantization_config.activation_sum
#pragma once

#include <cstdint>
#include <string>

namespace qserve {

constexpr int kNoSum = 0;
constexpr int kSumOfInput = 1;
constexpr int kSumOfQuantized = 2;

// kSumOfQuantized adds int8 codes in int32: |sum| <= 127 * K must stay below 2^31.
constexpr int64_t kMaxQuantizedSumK = (int64_t(1) << 31) / 127 - 1;

inline bool valid_sum_mode(int64_t mode) { return mode >= kNoSum && mode <= kSumOfQuantized; }

inline std::string sum_mode_error(int64_t mode) {
  return "sum_mode must be 0 (no sum), 1 (sum of the input) or 2 (sum of the quantized input), got " +
         std::to_string(mode);
}

}  // namespace qserve
