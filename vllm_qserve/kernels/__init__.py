"""Kernel selection for QServe linear layers: the first kernel that can implement a layer wins."""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_qserve.kernels.base import LinearSpec, QServeLinearKernel
from vllm_qserve.kernels.cuda import CudaW4A8Kernel
from vllm_qserve.kernels.cuda_sm90 import CudaSm90WgmmaKernel
from vllm_qserve.kernels.torch_reference import TorchReferenceKernel

logger = init_logger(f"vllm.{__name__}")  # under "vllm." so vLLM's log handlers print it

# Fastest first.  Compiled CUDA kernels are inserted ahead of the reference when the extension is built.
# CudaW4A8Kernel declines (with its reason) when the extension is missing or the device is not sm80+ CUDA;
# CudaSm90WgmmaKernel (W4A8 on Hopper: wgmma for large M, mma.sync below) when not sm_90 or _C_sm90 is missing.
KERNELS: list[type[QServeLinearKernel]] = [CudaSm90WgmmaKernel, CudaW4A8Kernel, TorchReferenceKernel]
_logged: set = set()


def choose_kernel(spec: LinearSpec) -> QServeLinearKernel:
    reasons = []
    for cls in KERNELS:
        ok, why = cls.can_implement(spec)
        if ok:
            key = (cls.name, spec.mode, spec.device_type, tuple(reasons))
            if key not in _logged:
                _logged.add(key)
                skipped = "; ".join(reasons)
                logger.info("qserve: %s linears on %s run on the %s kernel%s", spec.mode, spec.device_type,
                            cls.name, f" (skipped: {skipped})" if skipped else "")
            return cls(spec)
        reasons.append(f"{cls.name}: {why}")
    raise ValueError(f"no QServe kernel can run a {spec.mode} layer of {spec.out_features}x{spec.in_features} "
                     f"on {spec.device_type}: " + "; ".join(reasons))


__all__ = ["KERNELS", "LinearSpec", "QServeLinearKernel", "choose_kernel"]
