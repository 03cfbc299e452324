"""Build fluxrt and its C++/CUDA extension fluxrt._C (csrc/); metadata lives in pyproject.toml.

torch must already be installed: build with `pip install --no-build-isolation -e .` (an isolated build env would
pull a ~5 GB CUDA torch; DESIGN.md §5) or `python setup.py build_ext --inplace` for PYTHONPATH runs.
The CUDA kernels are compiled only when torch has CUDA (torch.version.cuda) and nvcc is found (CUDA_HOME);
TORCH_CUDA_ARCH_LIST picks the GPUs (default "8.0;9.0": A100, H100/H200). FLUXRT_SKIP_EXT=1 builds no extension
(fluxrt then runs the torch formulas, announced).
"""

import os

from setuptools import setup

CPU_SOURCES = ["csrc/module.cpp", "csrc/group_norm_silu.cpp"]
CUDA_SOURCES = ["csrc/group_norm_silu_cuda.cu"]


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
    # No -march=native: the wheel / editable build must run on any x86-64 CPU the CI or a GPU box has.
    cxx = ["-O3"]
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
