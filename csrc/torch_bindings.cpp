// Registers every compiled op under torch.ops.qserve.*.  Schemas live here; fake (meta) implementations live in
// vllm_qserve/ops.py so that Dynamo / Inductor / CUDA-graph capture can trace the ops without running them.
// No Python C API is used beyond the empty module stub, so one abi3 build serves every CPython >= 3.9.
#include <Python.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace qserve {
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t sum_mode);
at::Tensor w4a8_gemm_per_channel(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& xsum,
                                 const at::Tensor& qweight, const at::Tensor& s1_scales,
                                 const at::Tensor& s1_szeros, const std::optional<at::Tensor>& bias,
                                 at::ScalarType out_dtype);
at::Tensor w4a8_gemm_per_group(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& qweight,
                               const at::Tensor& s1_scales, const at::Tensor& s2_scales,
                               const at::Tensor& s2_zeros, const std::optional<at::Tensor>& bias,
                               at::ScalarType out_dtype);
at::Tensor w8a8_gemm(const at::Tensor& xq, const at::Tensor& sx, const at::Tensor& weight,
                     const at::Tensor& dequant_scale, const std::optional<at::Tensor>& bias,
                     at::ScalarType out_dtype);
}  // namespace qserve

TORCH_LIBRARY(qserve, m) {
  // x [..., K] fp16/bf16/fp32 -> (xq int8 [..., K], scale fp32 [...], xsum fp32 [...] or [0]); sum_mode 0 = no
  // xsum, 1 = sum(x) (QServe's), 2 = float(sum(xq)) * scale (csrc/quant/sum_mode.h).  A Python bool is 0 / 1.
  m.def("quantize_per_token(Tensor x, int sum_mode) -> (Tensor, Tensor, Tensor)");
  // int8 tensor-core GEMMs (csrc/gemm/).  xq int8 [M, K], sx / xsum fp32 [M], per-channel fp16 scales [N],
  // bias fp16/bf16/fp32 [N] or None; out [M, N] in out_dtype (float16 or bfloat16).
  //   per-channel: out = acc*sx*s1 - s1_szeros*xsum (+bias); qweight = QServe-packed int8 [N, K/2]; K % 64 == 0
  m.def("w4a8_gemm_per_channel(Tensor xq, Tensor sx, Tensor xsum, Tensor qweight, Tensor s1_scales, "
        "Tensor s1_szeros, Tensor? bias, ScalarType out_dtype) -> Tensor");
  //   group-128: s2_scales / s2_zeros int8 [K/128, N] in QServe's permuted order; K % 128 == 0
  m.def("w4a8_gemm_per_group(Tensor xq, Tensor sx, Tensor qweight, Tensor s1_scales, Tensor s2_scales, "
        "Tensor s2_zeros, Tensor? bias, ScalarType out_dtype) -> Tensor");
  //   W8A8: weight int8 [N, K], dequant_scale fp16 [N]; K % 64 == 0
  m.def("w8a8_gemm(Tensor xq, Tensor sx, Tensor weight, Tensor dequant_scale, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(qserve, CUDA, m) {
  m.impl("quantize_per_token", &qserve::quantize_per_token);
  m.impl("w4a8_gemm_per_channel", &qserve::w4a8_gemm_per_channel);
  m.impl("w4a8_gemm_per_group", &qserve::w4a8_gemm_per_group);
  m.impl("w8a8_gemm", &qserve::w8a8_gemm);
}

// `import vllm_qserve._C` loads the library (running the registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
