"""Builds the C++/CUDA extension ``llmkern._C``; everything else is in pyproject.toml.

    pip install --no-build-isolation -e .      # what `make` runs: builds against the installed torch

* CPU kernels (csrc/cpu) are always built: one translation unit per instruction set (AVX-512, AVX2, baseline),
  picked at run time — no -march=native, no hardware detection at install time.
* CUDA kernels (csrc/cuda) are built when a CUDA toolkit is found and torch is a CUDA build, for sm_80 and sm_90
  (override with TORCH_CUDA_ARCH_LIST). LLMKERN_CUDA=0 skips them.
* LLMKERN_NO_EXT=1 installs the pure-Python package, and so does `pip install .` with build isolation (torch is not
  importable in pip's isolated build environment). llmkern then runs its Triton and reference paths and says so
  (llmkern.backends.available); with LLMKERN_JIT=1 in the environment it JIT-builds the extension on first use
  (torch.utils.cpp_extension.load, cached under ~/.cache/torch_extensions; a few minutes the first time).
"""

import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = ["csrc/torch_bindings.cpp", "csrc/cpu/dispatch.cpp", "csrc/cpu/kernels_avx512.cpp",
               "csrc/cpu/kernels_avx2.cpp", "csrc/cpu/kernels_generic.cpp",
               "csrc/cpu/vec_avx2.cpp", "csrc/cpu/vec_avx512.cpp"]
CUDA_SOURCES = ["csrc/cuda/row_ops.cu", "csrc/cuda/cache_ops.cu"]
# -fopenmp at compile time only: at::parallel_for is an inline `#pragma omp parallel` in ATen's headers (serial
# without the flag). Not at link time: the GOMP symbols then resolve to the OpenMP runtime torch itself loads, so the
# extension shares torch's thread pool and torch.set_num_threads instead of bringing a second runtime.
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unused-function"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]


def _fail(msg: str):
    sys.stderr.write(f"\nllmkern: {msg}\n\n")
    raise SystemExit(1)


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script on PATH (as on this project's machines, where
    /usr/local/bin/nvcc forwards to /usr/local/cuda) makes it guess /usr/local. Prefer a real toolkit directory."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for d in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(d, "bin", "nvcc")) and os.path.exists(os.path.join(d, "include",
                                                                                          "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = d
            return


def extensions():
    if os.environ.get("LLMKERN_NO_EXT") == "1":
        return [], {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.stderr.write("llmkern: torch is not importable in the build environment (use pip install "
                         "--no-build-isolation); installing without the C++ extension — it will be JIT-built on "
                         "first use.\n")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        _fail(f"no C++ compiler found ({cxx!r} is not on PATH). Install g++ (Debian: apt-get install g++) or set "
              f"LLMKERN_NO_EXT=1 to install without the extension.")
    with_cuda = (os.environ.get("LLMKERN_CUDA", "1") != "0" and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None
                 and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
                 and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h"))
                 and all(os.path.exists(os.path.join(HERE, s)) for s in CUDA_SOURCES))
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # +PTX: JIT-compiled on sm_100/sm_120
        ext = cpp_extension.CUDAExtension(
            "llmkern._C", CPU_SOURCES + CUDA_SOURCES, include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("LLMKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
    else:
        ext = cpp_extension.CppExtension(
            "llmkern._C", CPU_SOURCES, include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": CXX_FLAGS})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
