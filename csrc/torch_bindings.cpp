// Registers every compiled op under torch.ops.qserve.*.  Schemas live here; fake (meta) implementations live in
// vllm_qserve/ops.py so that Dynamo / Inductor / CUDA-graph capture can trace the ops without running them.
// No Python C API is used beyond the empty module stub, so one abi3 build serves every CPython >= 3.9.
#include <Python.h>
#include <torch/library.h>

#include <tuple>

namespace qserve {
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, bool with_sum);
}

TORCH_LIBRARY(qserve, m) {
  // x [..., K] fp16/bf16/fp32 -> (xq int8 [..., K], scale fp32 [...], xsum fp32 [...] or [0])
  m.def("quantize_per_token(Tensor x, bool with_sum) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qserve, CUDA, m) { m.impl("quantize_per_token", &qserve::quantize_per_token); }

// `import vllm_qserve._C` loads the library (running the registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
