"""Test setup. On a machine without CUDA the Triton kernels run in the Triton interpreter on CPU tensors: the
variable must be set before any @triton.jit function is defined, i.e. before llmkern.kernels is imported."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Deterministic CPU timing noise is not our business, but thread count is: keep tests from oversubscribing 2 cores.
torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where kernels run for real: CUDA when present, else CPU (Triton through the interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------------------------------------------------
# The Triton interpreter's fp32 -> bf16 cast
#
# Triton 3.8's interpreter (triton/runtime/interpreter.py, ``_convert_float``) casts fp32 -> bf16 by truncation and
# mangles bf16 subnormals; on a GPU the same ``.to(tl.bfloat16)`` (and the implicit cast in ``tl.store``) is
# round-to-nearest-even (cvt.rn.bf16.f32), like torch. Left alone, every bf16 result run here would carry up to one
# extra ulp that the GPU kernel does not have: the fused residual could not be bit-equal to eager, and SwiGLU's two
# roundings exceed the tolerance rule. While tests run, the interpreter's cast rounds to nearest even — the GPU's
# semantics — and tests/test_ops.py ``test_interpreter_bf16_cast_rounds_to_nearest_even`` checks that it does.


def _fp32_to_bf16_bits_rtne(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, round to nearest even (what torch and cvt.rn.bf16.f32 do); NaN stays NaN."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(np.isnan(a), quiet_nan, rounded).reshape(np.shape(a))


@pytest.fixture(autouse=True)
def _interpreter_bf16_rtne(monkeypatch):
    try:
        from triton.runtime import interpreter
        import triton.language as tl
    except ImportError:  # pragma: no cover - no triton: nothing to fix
        yield
        return
    convert = getattr(interpreter, "_convert_float", None)
    if convert is None or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        yield
        return
    rtne = getattr(getattr(interpreter, "_ir", None), "ROUNDING_MODE", None)
    rtne = getattr(rtne, "RTNE", None)

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode in (None, rtne):
            return _fp32_to_bf16_bits_rtne(input)
        return convert(input, input_dtype, output_dtype, rounding_mode)

    monkeypatch.setattr(interpreter, "_convert_float", _convert_float)
    yield
