"""Test setup. On a machine without CUDA the Triton kernels run in the Triton interpreter on CPU tensors: the
variable must be set before any @triton.jit function is defined, i.e. before llmkern.kernels is imported."""

import os

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
