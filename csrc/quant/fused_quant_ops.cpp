// torch ops for the fused activation quantization (kernels in fused_quant_kernels.cu): schemas, argument checks
// with messages that name the problem, output allocation (at::empty only) and the launch on the current stream.
// Fake (meta) implementations for torch.compile live in vllm_qserve/fusion/fused_ops.py.
//
// All three ops are functional: add_rms_norm_quant returns the new residual instead of updating `residual` in
// place, so Inductor can plan its buffer like any other output and the pattern pass needs no auto_functionalized
// bookkeeping.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "fused_quant_params.h"
#include "sum_mode.h"

#define FCHECK(cond, ...) TORCH_CHECK(cond, "qserve: ", op, ": ", __VA_ARGS__)

namespace qserve {
namespace {

using fused_quant::Dtype;
using fused_quant::Params;
using fused_quant::Prologue;

// Integers go through std::to_string: ostream << int64 crashed on the GPU image (see csrc/gemm/gemm_ops.cpp).
std::string S(int64_t v) { return std::to_string(v); }
std::string shape(const at::Tensor& t) {
  std::string r = "[";
  for (int64_t i = 0; i < t.dim(); ++i) r += (i ? ", " : "") + std::to_string(t.size(i));
  return r + "]";
}

Dtype act_dtype(const char* op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kFloat: return Dtype::kFloat;
    default: FCHECK(false, "x must be float16, bfloat16 or float32, got ", x.scalar_type());
  }
  return Dtype::kHalf;  // unreachable
}

// A [..., W] activation read as rows: last dim contiguous; 2-D tensors may have a row stride (e.g. a slice),
// higher-rank ones must be contiguous.  Returns (rows, row stride in elements).
std::pair<int64_t, int64_t> rows_of(const char* op, const char* name, const at::Tensor& t) {
  FCHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  FCHECK(t.dim() >= 1, name, " must have at least one dim");
  const int64_t w = t.size(-1);
  FCHECK(w > 0 && w < (int64_t(1) << 30), name, ": bad last dim ", S(w), " (shape ", shape(t), ")");
  const int64_t rows = t.numel() / w;
  FCHECK(rows < (int64_t(1) << 31), name, ": too many rows (", S(rows), ")");
  if (t.dim() == 2 && rows > 0) {
    FCHECK(t.stride(1) == 1 && t.stride(0) >= w, name, " must have a contiguous last dim, got strides [",
           S(t.stride(0)), ", ", S(t.stride(1)), "]");
    return {rows, t.stride(0)};
  }
  FCHECK(t.is_contiguous(), name, " must be contiguous (or 2-D with a contiguous last dim), got shape ", shape(t));
  return {rows, w};
}

std::vector<int64_t> lead_dims(const at::Tensor& t) {
  auto lead = t.sizes().vec();
  lead.pop_back();
  return lead;
}

void check_weight(const char* op, const at::Tensor& weight, const at::Tensor& x, int64_t k) {
  FCHECK(weight.is_cuda() && weight.device() == x.device(), "weight is on ", weight.device(), " but x on ",
         x.device());
  FCHECK(weight.dim() == 1 && weight.size(0) == k, "weight must be 1-D with K=", S(k), " elements, got shape ",
         shape(weight));
  FCHECK(weight.is_contiguous(), "weight must be contiguous");
  FCHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(), ", got ",
         weight.scalar_type());
}

void check_eps(const char* op, double eps) {
  // eps = 0 would turn an all-zero row into 0 * inf = NaN.
  FCHECK(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got ", std::to_string(eps));
}

// (scale, xsum) for `lead` rows: xsum is [0] when not requested (the fakes size it the same way).
std::pair<at::Tensor, at::Tensor> stats_outputs(const at::Tensor& x, const std::vector<int64_t>& lead,
                                                int64_t sum_mode) {
  auto f32 = x.options().dtype(at::kFloat);
  return {at::empty(lead, f32), at::empty(sum_mode != kNoSum ? lead : std::vector<int64_t>{0}, f32)};
}

// The sum outputs of Params for sum_mode (checked first: a bad mode is a clear error, not a silent "no sum").
void set_sum(const char* op, Params& p, at::Tensor& xsum, int64_t sum_mode, int64_t k) {
  FCHECK(valid_sum_mode(sum_mode), sum_mode_error(sum_mode));
  FCHECK(sum_mode != kSumOfQuantized || k <= kMaxQuantizedSumK, "sum_mode 2 sums int8 codes in int32: K ", S(k),
         " is over ", S(kMaxQuantizedSumK));
  p.xsum = sum_mode != kNoSum ? xsum.data_ptr<float>() : nullptr;
  p.xsum_of_quantized = sum_mode == kSumOfQuantized;
}

// QSERVE_FUSED_QUANT_GATED_BATCH (benchmarks' A/B switch for silu_mul_quant's launch at M >= 1024): 1, 2 or 4, or
// unset / empty for the default.  Read per call so that one process can time every variant.
int gated_batch_from_env(const char* op) {
  const char* env = std::getenv("QSERVE_FUSED_QUANT_GATED_BATCH");
  if (env == nullptr || *env == '\0') return 0;
  const std::string v(env);
  FCHECK(v == "1" || v == "2" || v == "4", "QSERVE_FUSED_QUANT_GATED_BATCH must be 1, 2 or 4 (or unset), got '", v,
         "'");
  return std::stoi(v);
}

void run(const char* op, Prologue prologue, const at::Tensor& x, Params& p) {
  const int gated_batch = prologue == Prologue::kSiluMul ? gated_batch_from_env(op) : 0;
  const cudaError_t err = fused_quant::launch(prologue, act_dtype(op, x), p,
                                              at::cuda::getCurrentCUDAStream(x.device().index()), gated_batch);
  FCHECK(err == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_quant(const at::Tensor& x, const at::Tensor& weight,
                                                              double eps, int64_t sum_mode) {
  const char* op = "rms_norm_quant";
  act_dtype(op, x);
  const auto [m, stride] = rows_of(op, "x", x);
  const int64_t k = x.size(-1);
  check_weight(op, weight, x, k);
  check_eps(op, eps);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const auto lead = lead_dims(x);
  auto xq = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto [scale, xsum] = stats_outputs(x, lead, sum_mode);
  Params p;
  p.x = x.data_ptr();
  p.x_row_stride = stride;
  p.weight = weight.data_ptr();
  p.eps = static_cast<float>(eps);
  p.xq = xq.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  set_sum(op, p, xsum, sum_mode, k);
  p.m = m;
  p.k = static_cast<int>(k);
  run(op, Prologue::kRmsNorm, x, p);
  return {xq, scale, xsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_rms_norm_quant(const at::Tensor& x,
                                                                              const at::Tensor& residual,
                                                                              const at::Tensor& weight, double eps,
                                                                              int64_t sum_mode) {
  const char* op = "add_rms_norm_quant";
  act_dtype(op, x);
  const auto [m, stride] = rows_of(op, "x", x);
  const int64_t k = x.size(-1);
  FCHECK(residual.sizes() == x.sizes(), "residual must have x's shape ", shape(x), ", got ", shape(residual));
  FCHECK(residual.scalar_type() == x.scalar_type(), "residual must have x's dtype ", x.scalar_type(), ", got ",
         residual.scalar_type());
  FCHECK(residual.is_cuda() && residual.device() == x.device(), "residual is on ", residual.device(), " but x on ",
         x.device());
  const auto [rm, rstride] = rows_of(op, "residual", residual);
  (void)rm;
  check_weight(op, weight, x, k);
  check_eps(op, eps);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const auto lead = lead_dims(x);
  auto xq = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto [scale, xsum] = stats_outputs(x, lead, sum_mode);
  auto residual_out = at::empty(x.sizes(), x.options());
  Params p;
  p.x = x.data_ptr();
  p.x_row_stride = stride;
  p.residual = residual.data_ptr();
  p.residual_row_stride = rstride;
  p.weight = weight.data_ptr();
  p.eps = static_cast<float>(eps);
  p.residual_out = residual_out.data_ptr();
  p.xq = xq.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  set_sum(op, p, xsum, sum_mode, k);
  p.m = m;
  p.k = static_cast<int>(k);
  run(op, Prologue::kAddRmsNorm, x, p);
  return {xq, scale, xsum, residual_out};
}

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_mul_quant(const char* op, Prologue prologue,
                                                               const at::Tensor& x, int64_t sum_mode) {
  act_dtype(op, x);
  const auto [m, stride] = rows_of(op, "x", x);
  const int64_t w = x.size(-1);
  FCHECK(w % 2 == 0, "the last dim of x (gate and up, concatenated) must be even, got ", S(w));
  const int64_t d = w / 2;
  const at::cuda::OptionalCUDAGuard guard(x.device());
  auto lead = lead_dims(x);
  auto out_shape = lead;
  out_shape.push_back(d);
  auto xq = at::empty(out_shape, x.options().dtype(at::kChar));
  auto [scale, xsum] = stats_outputs(x, lead, sum_mode);
  Params p;
  p.x = x.data_ptr();
  p.x_row_stride = stride;
  p.xq = xq.data_ptr<int8_t>();
  p.scale = scale.data_ptr<float>();
  set_sum(op, p, xsum, sum_mode, d);
  p.m = m;
  p.k = static_cast<int>(d);
  run(op, prologue, x, p);
  return {xq, scale, xsum};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> silu_mul_quant(const at::Tensor& x, int64_t sum_mode) {
  return gated_mul_quant("silu_mul_quant", Prologue::kSiluMul, x, sum_mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_tanh_mul_quant(const at::Tensor& x, int64_t sum_mode) {
  return gated_mul_quant("gelu_tanh_mul_quant", Prologue::kGeluTanhMul, x, sum_mode);
}

}  // namespace qserve

// csrc/torch_bindings.cpp owns TORCH_LIBRARY(qserve); these ops join the namespace as a fragment.
TORCH_LIBRARY_FRAGMENT(qserve, m) {
  // x [..., K], weight [K] (x's dtype) -> (xq int8 [..., K], scale fp32 [...], xsum fp32 [...] or [0]);
  // = quantize_per_token(rms_norm(x, weight, eps), sum_mode)
  m.def("rms_norm_quant(Tensor x, Tensor weight, float eps, int sum_mode) -> (Tensor, Tensor, Tensor)");
  // ... plus the new residual x + residual [..., K] (x's dtype), normalized in place of x:
  // = quantize_per_token(rms_norm(x + residual, weight, eps), sum_mode), x + residual
  m.def("add_rms_norm_quant(Tensor x, Tensor residual, Tensor weight, float eps, int sum_mode) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  // x [..., 2d] (gate, up) -> (xq int8 [..., d], scale, xsum) = quantize_per_token(silu(gate) * up, sum_mode)
  m.def("silu_mul_quant(Tensor x, int sum_mode) -> (Tensor, Tensor, Tensor)");
  // ... = quantize_per_token(gelu_tanh(gate) * up, sum_mode)   (GeGLU, Gemma)
  m.def("gelu_tanh_mul_quant(Tensor x, int sum_mode) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qserve, CUDA, m) {
  m.impl("rms_norm_quant", &qserve::rms_norm_quant);
  m.impl("add_rms_norm_quant", &qserve::add_rms_norm_quant);
  m.impl("silu_mul_quant", &qserve::silu_mul_quant);
  m.impl("gelu_tanh_mul_quant", &qserve::gelu_tanh_mul_quant);
}
