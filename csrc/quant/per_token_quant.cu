// Dynamic per-token symmetric int8 quantization (the contract of vllm_qserve/reference/activation.py):
//   amax = max|x|, inv = 127 / max(amax, 1e-30), xq = clamp(rint(x * inv), -127, 127),
//   scale = amax / 127 (fp32), and for per-channel W4A8 the activation sum (sum_mode, sum_mode.h):
//   kSumOfInput: xsum = sum(x) (fp32, QServe's), kSumOfQuantized: xsum = float(sum(xq)) * scale.
// One CTA per token; the row is read twice (amax, then quantize), the second time from L1/L2.
#include "../dispatch.h"
#include "sum_mode.h"

#include <cub/block/block_reduce.cuh>
#include <string>

namespace qserve {

struct MaxOp {  // cub::Max is gone in CUDA 13's CCCL
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<half>(half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<nv_bfloat16>(nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }

template <typename scalar_t, int kThreads, int kSumMode>
__global__ void per_token_quant_kernel(const scalar_t* __restrict__ x, int8_t* __restrict__ xq,
                                       float* __restrict__ scale, float* __restrict__ xsum, int k) {
  constexpr bool kWithSum = kSumMode == kSumOfInput;
  using Reduce = cub::BlockReduce<float, kThreads>;
  using IntReduce = cub::BlockReduce<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage f;
    typename IntReduce::TempStorage i;
  } tmp;
  __shared__ float s_inv;
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * k;
  int8_t* qr = xq + row * k;

  float amax = 0.f, sum = 0.f;
  for (int i = threadIdx.x; i < k; i += kThreads) {
    float v = to_float(xr[i]);
    amax = fmaxf(amax, fabsf(v));
    if (kWithSum) sum += v;
  }
  amax = Reduce(tmp.f).Reduce(amax, MaxOp());
  __syncthreads();
  if (kWithSum) sum = Reduce(tmp.f).Sum(sum);
  if (threadIdx.x == 0) {
    s_inv = 127.f / fmaxf(amax, 1e-30f);  // IEEE division: must match the reference bit for bit
    scale[row] = amax / 127.f;
    if (kWithSum) xsum[row] = sum;
  }
  __syncthreads();
  const float inv = s_inv;
  int qsum = 0;  // exact: |sum| <= 127 * k < 2^31
  for (int i = threadIdx.x; i < k; i += kThreads) {
    float q = rintf(__fmul_rn(to_float(xr[i]), inv));  // __fmul_rn: no FMA contraction
    const int8_t c = static_cast<int8_t>(fminf(fmaxf(q, -127.f), 127.f));
    qr[i] = c;
    if (kSumMode == kSumOfQuantized) qsum += c;
  }
  if constexpr (kSumMode == kSumOfQuantized) {
    __syncthreads();  // tmp is reused
    qsum = IntReduce(tmp.i).Sum(qsum);
    // the reference's float(sum(xq)) * scale: one rounding of the integer, one fp32 product
    if (threadIdx.x == 0) xsum[row] = __fmul_rn(__int2float_rn(qsum), amax / 127.f);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t sum_mode) {
  QSERVE_CHECK_CUDA_CONTIG(x);
  QSERVE_CHECK(valid_sum_mode(sum_mode), "quantize_per_token: " + sum_mode_error(sum_mode));
  const bool with_sum = sum_mode != kNoSum;
  QSERVE_CHECK(x.dim() >= 1, "quantize_per_token: x must have at least one dim");
  const int64_t k = x.size(-1);
  const int64_t m = k ? x.numel() / k : 0;
  // std::to_string, not ostream << int64_t: see csrc/gemm/gemm_ops.cpp (that operator crashed on the GPU image).
  QSERVE_CHECK(k > 0 && k < (int64_t(1) << 31), "quantize_per_token: bad last dim " + std::to_string(k));
  QSERVE_CHECK(sum_mode != kSumOfQuantized || k <= kMaxQuantizedSumK,
               "quantize_per_token: sum_mode 2 sums int8 codes in int32, last dim " + std::to_string(k) +
                   " is over " + std::to_string(kMaxQuantizedSumK));
  const at::cuda::OptionalCUDAGuard guard(x.device());
  auto lead = x.sizes().vec();
  lead.pop_back();
  auto xq = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto scale = at::empty(lead, x.options().dtype(at::kFloat));
  auto xsum = at::empty(with_sum ? lead : std::vector<int64_t>{0}, x.options().dtype(at::kFloat));
  if (m == 0) return {xq, scale, xsum};
  constexpr int kThreads = 256;
  auto stream = at::cuda::getCurrentCUDAStream();
  QSERVE_DISPATCH_ACT(x.scalar_type(), "quantize_per_token", [&] {
    auto* xp = reinterpret_cast<const scalar_t*>(x.data_ptr());
    if (sum_mode == kSumOfInput)
      per_token_quant_kernel<scalar_t, kThreads, kSumOfInput><<<m, kThreads, 0, stream>>>(
          xp, xq.data_ptr<int8_t>(), scale.data_ptr<float>(), xsum.data_ptr<float>(), k);
    else if (sum_mode == kSumOfQuantized)
      per_token_quant_kernel<scalar_t, kThreads, kSumOfQuantized><<<m, kThreads, 0, stream>>>(
          xp, xq.data_ptr<int8_t>(), scale.data_ptr<float>(), xsum.data_ptr<float>(), k);
    else
      per_token_quant_kernel<scalar_t, kThreads, kNoSum><<<m, kThreads, 0, stream>>>(
          xp, xq.data_ptr<int8_t>(), scale.data_ptr<float>(), nullptr, k);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {xq, scale, xsum};
}

}  // namespace qserve
