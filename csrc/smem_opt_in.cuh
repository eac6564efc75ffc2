// Opting a kernel in to more than 48 KB of dynamic shared memory, once per device: every launcher of a kernel with
// a large shared-memory footprint does this before its first launch on a device.
#pragma once

#include <cuda_runtime.h>

namespace qserve {

// `done` is the caller's flag array for this kernel (one `static bool done[64] = {};` per kernel instantiation).
// cudaFuncSetAttribute is idempotent, so two threads racing on a device's first launch is harmless.
template <typename Kernel>
cudaError_t opt_in_dynamic_smem(Kernel kernel, int bytes, bool (&done)[64]) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 64 && done[dev]) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess && dev < 64) done[dev] = true;
  return e;
}

}  // namespace qserve
