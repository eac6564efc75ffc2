"""Builds vllm_qserve._C (CUDA kernels, TORCH_LIBRARY ops, one abi3 build per torch) when nvcc and a CUDA build
of torch are present; otherwise installs the pure-Python package (the reference kernels) and says so.

    QSERVE_BUILD_CUDA=0|1    force the extension off / on (default: auto)
    TORCH_CUDA_ARCH_LIST     default "8.0;8.9;9.0"  (sm80 and newer: int8 mma.sync)
    MAX_JOBS                 parallel nvcc jobs (ninja)
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _want_cuda() -> tuple[bool, str]:
    # torch guesses CUDA_HOME from `which nvcc`; a /usr/local/bin/nvcc wrapper makes that /usr/local (no libs).
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    flag = os.environ.get("QSERVE_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False, "QSERVE_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False, "torch is not importable at build time (use --no-build-isolation)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__}, CUDA {torch.version.cuda}, nvcc at {CUDA_HOME}"


ext_modules, cmdclass, options = [], {}, {}
build_cuda, why = _want_cuda()
if build_cuda:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0")
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True)) + sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    # csrc/gemm_sm90/ is the Hopper-only wgmma GEMM: its own extension below, compiled for sm_90a alone.
    sm90_sources = [s for s in sources if s.startswith(os.path.join("csrc", "gemm_sm90") + os.sep)]
    sources = [s for s in sources if s not in sm90_sources]
    # Minimal CUDA installs (nvcc without the math-library headers that torch's CUDA headers include) are
    # completed by the headers of the nvidia-* wheels torch depends on.
    import importlib.util

    include_dirs = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        include_dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    ext_modules.append(CUDAExtension(
        name="vllm_qserve._C",
        sources=sources,
        include_dirs=include_dirs,
        py_limited_api=True,
        define_macros=[("Py_LIMITED_API", "0x03090000")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    ))
    # vllm_qserve._C_sm90: the wgmma kernel (csrc/gemm_sm90/), built when 9.0 is in the arch list.  An explicit
    # -gencode replaces TORCH_CUDA_ARCH_LIST for this extension (wgmma needs the arch-specific sm_90a target).
    archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";")
    if sm90_sources and any(a.split("+")[0] in ("9.0", "9.0a") for a in archs):
        ext_modules.append(CUDAExtension(
            name="vllm_qserve._C_sm90",
            sources=sm90_sources,
            include_dirs=include_dirs,
            py_limited_api=True,
            define_macros=[("Py_LIMITED_API", "0x03090000")],
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17"],
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                         "-gencode=arch=compute_90a,code=sm_90a",
                         "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                         "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
            },
        ))
    cmdclass["build_ext"] = BuildExtension  # ninja is used when installed
    options["bdist_wheel"] = {"py_limited_api": "cp39"}
    print(f"[vllm-qserve] building the CUDA extension vllm_qserve._C ({why}; "
          f"archs {os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
else:
    print(f"[vllm-qserve] NOT building the CUDA extension: {why}. Installing the pure-Python package; "
          f"linear layers run the PyTorch reference kernels.", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
