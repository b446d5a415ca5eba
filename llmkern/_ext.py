"""Loading the C++/CUDA extension ``llmkern._C`` (ops under ``torch.ops.llmkern_C``).

Built ahead of time by ``pip install --no-build-isolation -e .`` (what ``make`` runs). When it is missing, llmkern
still works on its Triton and reference paths; ``LLMKERN_JIT=1`` builds it on first use with
``torch.utils.cpp_extension.load`` (cached under ~/.cache/torch_extensions, a few minutes the first time).

The CPU kernels pick their instruction set at run time: the best this CPU runs (avx512, avx2, generic), capped by
``LLMKERN_CPU_ISA=avx512|avx2|generic`` (read when the extension loads). ``set_cpu_isa(name)`` below switches it
in a running process (returns the previous one; an ISA the CPU cannot run is an error);
``torch.ops.llmkern_C.cpu_kernel(op, dtype, head_dim)`` says which kernel serves an op ("avx512", "avx2",
"portable" or "reference").
The raw op ``torch.ops.llmkern_C.set_cpu_isa`` switches the kernels alone: ``llmkern.ops.linear``'s row limits
(which depend on the kernel: ``ops.linear_max_rows``) then follow at its next call that takes the full path.
"""

from __future__ import annotations

import os

_state: dict = {}


def _jit_build():
    from torch.utils.cpp_extension import load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        raise RuntimeError(f"cannot JIT-build the llmkern extension: sources not found at {csrc}")
    sources = [os.path.join(csrc, p) for p in ("torch_bindings.cpp", "cpu/dispatch.cpp", "cpu/kernels_avx512.cpp",
                                               "cpu/kernels_avx2.cpp", "cpu/kernels_generic.cpp",
                                               "cpu/vec_avx2.cpp", "cpu/vec_avx512.cpp")]
    load("llmkern_C_jit", sources, extra_include_paths=[csrc], is_python_module=False,
         extra_cflags=["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"])


def _check_cpu_isa_env() -> None:
    """``LLMKERN_CPU_ISA`` (avx512|avx2|generic, read by the library when it loads) caps the instruction set of the
    CPU kernels; a value naming none raises here, on first use, instead of being ignored."""
    import torch

    if hasattr(torch.ops.llmkern_C, "set_cpu_isa"):  # a build that predates the variable does not read it
        torch.ops.llmkern_C.cpu_isa()  # ValueError naming the bad value


def load() -> bool:
    """Load the extension once; True when its ops are registered. The reason it is not is in ``why_not()``."""
    if "ok" in _state:
        return _state["ok"]
    try:
        from llmkern import _C  # noqa: F401  (registers torch.ops.llmkern_C.*)

        _check_cpu_isa_env()
        _state.update(ok=True, why="")
    except ImportError as e:
        if os.environ.get("LLMKERN_JIT") == "1":
            try:
                _jit_build()
            except Exception as jit_error:  # a compiler error is a reason to report, not to crash import
                _state.update(ok=False, why=f"JIT build failed: {jit_error}")
                return False
            _check_cpu_isa_env()
            _state.update(ok=True, why="")
        else:
            _state.update(ok=False, why=f"the C++ extension is not built ({e}); run `pip install "
                                        f"--no-build-isolation -e .` (or `make install`), or set LLMKERN_JIT=1")
    return _state["ok"]


def why_not() -> str:
    load()
    return _state["why"]


def has_cuda() -> bool:
    if not load():
        return False
    import torch

    return bool(torch.ops.llmkern_C.has_cuda())


def cpu_isa() -> str:
    import torch

    return torch.ops.llmkern_C.cpu_isa() if load() else "none"


def set_cpu_isa(name: str) -> str:
    """Cap the CPU kernels' instruction set at ``name`` (avx512|avx2|generic) for the whole process, as
    ``LLMKERN_CPU_ISA`` does at load, and make ``llmkern.ops.linear`` take its row limits from the new kernels at
    its next call. Returns the previous ISA's name."""
    import torch

    if not load():
        raise RuntimeError(f"set_cpu_isa: {why_not()}")
    prev = torch.ops.llmkern_C.set_cpu_isa(name)
    from llmkern import ops

    ops._LINEAR_ROWS.clear()  # the direct path serves nothing until the full path refills it for this ISA
    ops._LINEAR_ISA.clear()
    return prev
