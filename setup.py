"""Build fluxrt and its C++/CUDA extension fluxrt._C (csrc/); metadata lives in pyproject.toml.

torch must already be installed: build with `pip install --no-build-isolation -e .` (an isolated build env would
pull a ~5 GB CUDA torch; DESIGN.md §5) or `python setup.py build_ext --inplace` for PYTHONPATH runs.
The CUDA kernels are compiled only when torch has CUDA (torch.version.cuda) and nvcc is found (CUDA_HOME);
TORCH_CUDA_ARCH_LIST picks the GPUs (default "8.0;9.0": A100, H100/H200). FLUXRT_SKIP_EXT=1 builds no extension
(fluxrt then runs the torch formulas, announced). The CPU kernels target the build host's AVX2/FMA when it has
them (`_cpu_vector_flags`; FLUXRT_CPU_BASELINE=1 for a portable build).
"""

import os

from setuptools import setup

CPU_SOURCES = ["csrc/module.cpp", "csrc/group_norm_silu.cpp"]
CUDA_SOURCES = ["csrc/group_norm_silu_cuda.cu"]


def _cpu_vector_flags() -> list[str]:
    """AVX2 + FMA builds of at::vec (and its Sleef exp, exported by libtorch_cpu) when the build host has them.

    at::vec picks its implementation from CPU_CAPABILITY macros at compile time; without them an extension gets
    the baseline Vectorized<float> (a loop over lanes, exp per lane via std::exp), which measured 3-9x slower than
    torch's own GroupNorm / SiLU here. fluxrt._C is built on the machine that runs it (editable install, or
    build_ext --inplace on a GPU box), so the host's ISA is the target; FLUXRT_CPU_BASELINE=1 forces a portable
    build (e.g. for a wheel to ship elsewhere)."""
    if os.environ.get("FLUXRT_CPU_BASELINE") == "1":
        return []
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= set(flags) and _torch_exports("Sleef_expf8_u10"):  # F16C: half conversions
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _torch_exports(symbol: str) -> bool:
    """Whether libtorch_cpu exports `symbol` (at::vec's AVX2 exp calls Sleef, linked from there)."""
    import ctypes
    import glob

    import torch

    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*"))
    try:
        return bool(libs) and hasattr(ctypes.CDLL(libs[0]), symbol)
    except OSError:
        return False


def extension_build():
    """(ext_modules, cmdclass) for fluxrt._C, or nothing with FLUXRT_SKIP_EXT=1."""
    if os.environ.get("FLUXRT_SKIP_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        raise SystemExit(f"building fluxrt._C needs torch installed first ({err}); install torch, then "
                         "`pip install --no-build-isolation -e .` (or set FLUXRT_SKIP_EXT=1 to build without it)")
    cxx = ["-O3"] + _cpu_vector_flags()
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "fluxrt._C", CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        )
    else:
        ext = cpp_extension.CppExtension("fluxrt._C", CPU_SOURCES, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
