// torch ops of the Hopper W4A8 GEMM (vllm_qserve._C_sm90): argument checks with clear messages, the choice
// between this wgmma kernel and the mma.sync kernels by M, the output allocation and the launch on the current
// stream.  Host C++ only.
//
//   w4a8_gemm_per_channel_sm90(..., int wgmma_min_m)  same schema and numerics as w4a8_gemm_per_channel
//   w4a8_gemm_per_group_sm90(..., int wgmma_min_m)    same schema and numerics as w4a8_gemm_per_group
//
// M < wgmma_min_m runs the mma.sync op (torch.ops.qserve.w4a8_gemm_per_*, from vllm_qserve._C) through the
// dispatcher: both kernels read the checkpoint's packed weights as they are, so one weight copy serves both.
// The choice is a function of the input's shape only (no host sync), so it is fixed per captured CUDA graph.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "w4a8_wgmma_launch.h"

#define GCHECK(cond, ...) TORCH_CHECK(cond, "qserve: ", op, ": ", __VA_ARGS__)

namespace qserve {
namespace {

// Integers go through std::to_string (see csrc/gemm/gemm_ops.cpp: streaming a long crashed on the GPU image).
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

// Every check of the wgmma path; fills p except the mode-specific pointers.
void check_common(const char* op, const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& qweight,
                  const at::Tensor& s1_scales, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                  gemm::GemmParams& p) {
  GCHECK(xq.is_cuda(), "xq must be a CUDA tensor, got ", xq.device());
  const auto* prop = at::cuda::getDeviceProperties(xq.device().index());
  GCHECK(prop->major == 9 && prop->minor == 0, "the wgmma kernel needs an sm_90 (Hopper) GPU, got compute capability ",
         S(prop->major), ".", S(prop->minor), " (use w4a8_gemm_per_channel / w4a8_gemm_per_group)");
  GCHECK(xq.is_contiguous(), "xq must be contiguous");
  GCHECK(xq.dim() == 2, "xq must be 2-D [M, K], got shape ", shape(xq));
  GCHECK(xq.scalar_type() == at::kChar, "xq must be int8, got ", xq.scalar_type());
  GCHECK(qweight.dim() == 2, "qweight must be 2-D [N, K/2], got shape ", shape(qweight));
  const int64_t m = xq.size(0), k = xq.size(1), n = qweight.size(0);
  check_vec(op, "sx", sx, xq, at::kFloat, m, "M");
  GCHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16, "out_dtype must be float16 or bfloat16, got ",
         out_dtype);
  GCHECK(n > 0 && n % 32 == 0, "N (output features) must be a positive multiple of 32, got ", S(n));
  GCHECK(k > 0 && k % 128 == 0, "K (input features) must be a positive multiple of 128 for the wgmma kernel, got ",
         S(k));
  GCHECK(k < (int64_t(1) << 30) && n < (int64_t(1) << 30) && m < (int64_t(1) << 31), "sizes out of range (M=", S(m),
         ", N=", S(n), ", K=", S(k), ")");
  check_tensor(op, "qweight", qweight, xq, at::kChar);
  GCHECK(qweight.size(1) * 2 == k, "qweight is ", shape(qweight), " but xq has K=", S(k), " (expected [N, K/2])");
  GCHECK(aligned16(xq) && aligned16(qweight), "xq's and qweight's data must be 16-byte aligned");
  check_vec(op, "s1_scales", s1_scales, xq, at::kHalf, n, "N");
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
  p.b = qweight.data_ptr<int8_t>();
  p.sx = sx.data_ptr<float>();
  p.col_scale = s1_scales.data_ptr();
  p.M = static_cast<int>(m);
  p.N = static_cast<int>(n);
  p.K = static_cast<int>(k);
}

// QSERVE_WGMMA_IMPL: unset / empty = the launcher's choice; v1, v2, v2-serial, v2-1wg, v3, split2 or split4 force that
// kernel at M > 128 (benchmarks' and tests' A/B switch; w4a8_wgmma_launch.cu says what each is).  Read per call so one process can compare them.
gemm_sm90::Impl impl_from_env(const char* op) {
  const char* env = std::getenv("QSERVE_WGMMA_IMPL");
  if (env == nullptr || *env == '\0') return gemm_sm90::Impl::kDefault;
  const std::string v(env);
  if (v == "v1") return gemm_sm90::Impl::kV1;
  if (v == "v2") return gemm_sm90::Impl::kV2;
  if (v == "v3") return gemm_sm90::Impl::kV3;
  if (v == "v2-serial") return gemm_sm90::Impl::kV2Serial;
  if (v == "v2-1wg") return gemm_sm90::Impl::kV2OneWg;
  if (v == "split2") return gemm_sm90::Impl::kSplit2;
  if (v == "split4") return gemm_sm90::Impl::kSplit4;
  GCHECK(false, "QSERVE_WGMMA_IMPL must be v1, v2, v2-serial, v2-1wg, v3, split2 or split4 (or unset), got '", v, "'");
  return gemm_sm90::Impl::kDefault;
}

at::Tensor run(const char* op, const at::Tensor& xq, gemm::GemmParams& p, bool per_group, at::ScalarType out_dtype) {
  const gemm_sm90::Impl impl = impl_from_env(op);
  const at::cuda::CUDAGuard guard(xq.device());
  auto out = at::empty({xq.size(0), static_cast<int64_t>(p.N)}, xq.options().dtype(out_dtype));
  if (p.M == 0) return out;
  p.out = out.data_ptr();
  const cudaError_t e =
      gemm_sm90::launch_w4a8_wgmma(p, per_group, out_dtype == at::kBFloat16, impl, at::cuda::getCurrentCUDAStream());
  GCHECK(e == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(e));
  return out;
}

using PerChannelFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                at::ScalarType);
using PerGroupFn = PerChannelFn;  // same arity and types

}  // namespace

at::Tensor w4a8_gemm_per_channel_sm90(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& xsum,
                                      const at::Tensor& qweight, const at::Tensor& s1_scales,
                                      const at::Tensor& s1_szeros, const std::optional<at::Tensor>& bias,
                                      at::ScalarType out_dtype, int64_t wgmma_min_m) {
  constexpr const char* op = "w4a8_gemm_per_channel_sm90";
  if (xq.dim() >= 1 && xq.size(0) < wgmma_min_m) {
    static const auto mma_sync = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("qserve::w4a8_gemm_per_channel", "")
                                     .typed<PerChannelFn>();
    return mma_sync.call(xq, sx, xsum, qweight, s1_scales, s1_szeros, bias, out_dtype);
  }
  gemm::GemmParams p;
  check_common(op, xq, sx, qweight, s1_scales, bias, out_dtype, p);
  check_vec(op, "xsum", xsum, xq, at::kFloat, p.M, "M");
  check_vec(op, "s1_szeros", s1_szeros, xq, at::kHalf, p.N, "N");
  p.xsum = xsum.data_ptr<float>();
  p.szeros = s1_szeros.data_ptr();
  return run(op, xq, p, false, out_dtype);
}

at::Tensor w4a8_gemm_per_group_sm90(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& qweight,
                                    const at::Tensor& s1_scales, const at::Tensor& s2_scales,
                                    const at::Tensor& s2_zeros, const std::optional<at::Tensor>& bias,
                                    at::ScalarType out_dtype, int64_t wgmma_min_m) {
  constexpr const char* op = "w4a8_gemm_per_group_sm90";
  if (xq.dim() >= 1 && xq.size(0) < wgmma_min_m) {
    static const auto mma_sync = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("qserve::w4a8_gemm_per_group", "")
                                     .typed<PerGroupFn>();
    return mma_sync.call(xq, sx, qweight, s1_scales, s2_scales, s2_zeros, bias, out_dtype);
  }
  gemm::GemmParams p;
  check_common(op, xq, sx, qweight, s1_scales, bias, out_dtype, p);
  for (const at::Tensor* t : {&s2_scales, &s2_zeros}) {
    const char* name = t == &s2_scales ? "s2_scales" : "s2_zeros";
    check_tensor(op, name, *t, xq, at::kChar);
    GCHECK(t->dim() == 2 && t->size(0) == p.K / 128 && t->size(1) == p.N, name, " must be [K/128, N] = [",
           S(p.K / 128), ", ", S(p.N), "], got ", shape(*t));
    GCHECK(aligned16(*t), name, "'s data must be 16-byte aligned");
  }
  p.s2_scales = s2_scales.data_ptr<int8_t>();
  p.s2_zeros = s2_zeros.data_ptr<int8_t>();
  return run(op, xq, p, true, out_dtype);
}

}  // namespace qserve

// The schemas live here (not in csrc/torch_bindings.cpp) because this library is a separate extension that is
// only built for sm_90a; vllm_qserve/gemm_sm90_ops.py loads it and registers the fakes.
TORCH_LIBRARY_FRAGMENT(qserve, m) {
  m.def("w4a8_gemm_per_channel_sm90(Tensor xq, Tensor sx, Tensor xsum, Tensor qweight, Tensor s1_scales, "
        "Tensor s1_szeros, Tensor? bias, ScalarType out_dtype, int wgmma_min_m) -> Tensor");
  m.def("w4a8_gemm_per_group_sm90(Tensor xq, Tensor sx, Tensor qweight, Tensor s1_scales, Tensor s2_scales, "
        "Tensor s2_zeros, Tensor? bias, ScalarType out_dtype, int wgmma_min_m) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve, CUDA, m) {
  m.impl("w4a8_gemm_per_channel_sm90", &qserve::w4a8_gemm_per_channel_sm90);
  m.impl("w4a8_gemm_per_group_sm90", &qserve::w4a8_gemm_per_group_sm90);
}

// `import vllm_qserve._C_sm90` loads the library (running the registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C_sm90(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_sm90", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
