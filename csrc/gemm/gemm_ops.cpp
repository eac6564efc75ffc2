// torch ops for the int8 GEMMs: every argument check (messages name the problem), the output allocation and the
// launch on the current stream.  Host C++ only (g++): all checks run before anything is allocated, and the CUDA
// launchers (w4a8_per_channel.cu, w4a8_per_group.cu, w8a8_gemm.cu) never throw; they return a cudaError_t.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <string>

#include "qgemm_params.h"

#define GCHECK(cond, ...) TORCH_CHECK(cond, "qserve: ", op, ": ", __VA_ARGS__)

namespace qserve {
namespace {

constexpr int64_t kGroup = 128;

// Integers reach the messages as std::string (std::to_string), never through ostream::operator<<(long): on the
// GPU image the extension's own instantiation of that operator crashed (SIGSEGV inside
// basic_ostream::_M_insert<long>, a libstdc++ header/runtime mismatch), so a bad shape segfaulted instead of raising.
std::string S(int64_t v) { return std::to_string(v); }
std::string shape(const at::Tensor& t) {
  std::string r = "[";
  for (int64_t i = 0; i < t.dim(); ++i) r += (i ? ", " : "") + std::to_string(t.size(i));
  return r + "]";
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& xq, at::ScalarType dt) {
  GCHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  GCHECK(t.device() == xq.device(), name, " is on ", t.device(), " but xq on ", xq.device());
  GCHECK(t.is_contiguous(), name, " must be contiguous");
  GCHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
}

void check_vec(const char* op, const char* name, const at::Tensor& t, const at::Tensor& xq, at::ScalarType dt,
               int64_t len, const char* what) {
  check_tensor(op, name, t, xq, dt);
  GCHECK(t.numel() == len, name, " must have ", what, "=", S(len), " elements, got ", S(t.numel()));
}

// Checks shared by the three ops; fills everything of p but the weight pointers.
void check_common(const char* op, const at::Tensor& xq, const at::Tensor& sx, int64_t n,
                  const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, gemm::GemmParams& p) {
  GCHECK(xq.is_cuda(), "xq must be a CUDA tensor, got ", xq.device());
  GCHECK(xq.is_contiguous(), "xq must be contiguous");
  GCHECK(xq.dim() == 2, "xq must be 2-D [M, K], got shape ", shape(xq));
  GCHECK(xq.scalar_type() == at::kChar, "xq must be int8, got ", xq.scalar_type());
  const int64_t m = xq.size(0), k = xq.size(1);
  check_vec(op, "sx", sx, xq, at::kFloat, m, "M");
  GCHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16, "out_dtype must be float16 or bfloat16, got ",
         out_dtype);
  GCHECK(n > 0 && n % 32 == 0, "N (output features) must be a positive multiple of 32, got ", S(n));
  GCHECK(k > 0 && k < (int64_t(1) << 30) && n < (int64_t(1) << 30) && m < (int64_t(1) << 31),
         "sizes out of range (M=", S(m), ", N=", S(n), ", K=", S(k), ")");
  GCHECK(aligned16(xq), "xq's data must be 16-byte aligned");
  p = gemm::GemmParams{};
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    GCHECK(b.is_cuda() && b.device() == xq.device(), "bias is on ", b.device(), " but xq on ", xq.device());
    GCHECK(b.is_contiguous(), "bias must be contiguous");
    GCHECK(b.numel() == n, "bias must have N=", S(n), " elements, got ", S(b.numel()));
    switch (b.scalar_type()) {
      case at::kHalf: p.bias_kind = 1; break;
      case at::kBFloat16: p.bias_kind = 2; break;
      case at::kFloat: p.bias_kind = 3; break;
      default: GCHECK(false, "bias must be float16, bfloat16 or float32, got ", b.scalar_type());
    }
    p.bias = b.data_ptr();
  }
  p.a = xq.data_ptr<int8_t>();
  p.sx = sx.data_ptr<float>();
  p.M = static_cast<int>(m);
  p.N = static_cast<int>(n);
  p.K = static_cast<int>(k);
}

void check_w4(const char* op, const at::Tensor& qweight, const at::Tensor& xq, int64_t k) {
  check_tensor(op, "qweight", qweight, xq, at::kChar);
  GCHECK(qweight.dim() == 2 && qweight.size(1) * 2 == k, "qweight is ", shape(qweight), " but xq has K=", S(k),
         " (expected [N, K/2])");
  GCHECK(aligned16(qweight), "qweight's data must be 16-byte aligned");
}

at::Tensor run(const char* op, const at::Tensor& xq, gemm::GemmParams& p, at::ScalarType out_dtype,
               cudaError_t (*launcher)(const gemm::GemmParams&, bool, cudaStream_t)) {
  const at::cuda::CUDAGuard guard(xq.device());
  auto out = at::empty({xq.size(0), static_cast<int64_t>(p.N)}, xq.options().dtype(out_dtype));
  if (p.M == 0) return out;
  p.out = out.data_ptr();
  const cudaError_t e = launcher(p, out_dtype == at::kBFloat16, at::cuda::getCurrentCUDAStream());
  GCHECK(e == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(e));
  return out;
}

}  // namespace

at::Tensor w4a8_gemm_per_channel(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& xsum,
                                 const at::Tensor& qweight, const at::Tensor& s1_scales,
                                 const at::Tensor& s1_szeros, const std::optional<at::Tensor>& bias,
                                 at::ScalarType out_dtype) {
  constexpr const char* op = "w4a8_gemm_per_channel";
  gemm::GemmParams p;
  GCHECK(qweight.dim() == 2, "qweight must be 2-D [N, K/2], got shape ", shape(qweight));
  check_common(op, xq, sx, qweight.size(0), bias, out_dtype, p);
  check_w4(op, qweight, xq, p.K);
  GCHECK(p.K % 64 == 0, "K (input features) must be a multiple of 64, got ", S(p.K));
  check_vec(op, "xsum", xsum, xq, at::kFloat, p.M, "M");
  check_vec(op, "s1_scales", s1_scales, xq, at::kHalf, p.N, "N");
  check_vec(op, "s1_szeros", s1_szeros, xq, at::kHalf, p.N, "N");
  p.b = qweight.data_ptr<int8_t>();
  p.xsum = xsum.data_ptr<float>();
  p.col_scale = s1_scales.data_ptr();
  p.szeros = s1_szeros.data_ptr();
  return run(op, xq, p, out_dtype, gemm::launch_w4a8_per_channel);
}

at::Tensor w4a8_gemm_per_group(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& qweight,
                               const at::Tensor& s1_scales, const at::Tensor& s2_scales,
                               const at::Tensor& s2_zeros, const std::optional<at::Tensor>& bias,
                               at::ScalarType out_dtype) {
  constexpr const char* op = "w4a8_gemm_per_group";
  gemm::GemmParams p;
  GCHECK(qweight.dim() == 2, "qweight must be 2-D [N, K/2], got shape ", shape(qweight));
  check_common(op, xq, sx, qweight.size(0), bias, out_dtype, p);
  check_w4(op, qweight, xq, p.K);
  GCHECK(p.K % kGroup == 0, "K (input features) must be a multiple of the group size 128, got ", S(p.K));
  check_vec(op, "s1_scales", s1_scales, xq, at::kHalf, p.N, "N");
  for (const at::Tensor* t : {&s2_scales, &s2_zeros}) {
    const char* name = t == &s2_scales ? "s2_scales" : "s2_zeros";
    check_tensor(op, name, *t, xq, at::kChar);
    GCHECK(t->dim() == 2 && t->size(0) == p.K / kGroup && t->size(1) == p.N, name, " must be [K/128, N] = [",
           S(p.K / kGroup), ", ", S(p.N), "], got ", shape(*t));
    GCHECK(aligned16(*t), name, "'s data must be 16-byte aligned");
  }
  p.b = qweight.data_ptr<int8_t>();
  p.col_scale = s1_scales.data_ptr();
  p.s2_scales = s2_scales.data_ptr<int8_t>();
  p.s2_zeros = s2_zeros.data_ptr<int8_t>();
  return run(op, xq, p, out_dtype, gemm::launch_w4a8_per_group);
}

at::Tensor w8a8_gemm(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& weight,
                     const at::Tensor& dequant_scale, const std::optional<at::Tensor>& bias,
                     at::ScalarType out_dtype) {
  constexpr const char* op = "w8a8_gemm";
  gemm::GemmParams p;
  GCHECK(weight.dim() == 2, "weight must be 2-D [N, K], got shape ", shape(weight));
  check_common(op, xq, sx, weight.size(0), bias, out_dtype, p);
  check_tensor(op, "weight", weight, xq, at::kChar);
  GCHECK(weight.size(1) == p.K, "weight is ", shape(weight), " but xq has K=", S(p.K));
  GCHECK(p.K % 64 == 0, "K (input features) must be a multiple of 64, got ", S(p.K));
  GCHECK(aligned16(weight), "weight's data must be 16-byte aligned");
  check_vec(op, "dequant_scale", dequant_scale, xq, at::kHalf, p.N, "N");
  p.b = weight.data_ptr<int8_t>();
  p.col_scale = dequant_scale.data_ptr();
  return run(op, xq, p, out_dtype, gemm::launch_w8a8);
}

}  // namespace qserve
