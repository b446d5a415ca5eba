"""Which implementation of an op runs, and a record of which one did.

Backends:
  ``triton``    — the Triton kernels in ``llmkern.kernels``. Default for CUDA tensors. On CPU tensors only under
                  the Triton interpreter (``TRITON_INTERPRET=1`` set before import), which is how tests run them here.
  ``reference`` — the pure-torch code in ``llmkern.reference``; the default for CPU tensors otherwise.

The choice can be forced for a block of code (``with llmkern.use_backend("reference"): ...``) or for the process
(``LLMKERN_BACKEND=reference``). Every op call records ``(op, backend)``; ``track()`` exposes the record so a test can
prove the kernel it meant to test is the one that ran, and the demo can say which op ran where.
"""

import collections
import contextlib
import os
import threading

import torch

BACKENDS = ("triton", "reference")

_local = threading.local()
_counts: collections.Counter = collections.Counter()
_trackers: list = []


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors), i.e. ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device``; when not, a reason a user can act on."""
    if backend == "reference":
        return True, ""
    if backend == "triton":
        if not _triton_importable():
            return False, "triton is not installed"
        if device.type == "cuda" or triton_interpret():
            return True, ""
        return False, (f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before llmkern "
                       f"is imported (got a {device.type} tensor)")
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _forced() -> str | None:
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced
    env = os.environ.get("LLMKERN_BACKEND", "").strip()
    return env or None


def select(op: str, device: torch.device) -> str:
    """The backend ``op`` runs on for tensors on ``device``, and record it."""
    forced = _forced()
    if forced is not None:
        ok, why = available(forced, device)
        if not ok:
            raise RuntimeError(f"llmkern backend {forced!r} was requested for {op} but cannot run: {why}")
        backend = forced
    elif device.type == "cuda" or (device.type == "cpu" and triton_interpret() and _triton_importable()):
        backend = "triton"
    else:
        backend = "reference"
    _counts[(op, backend)] += 1
    for t in _trackers:
        t[(op, backend)] += 1
    return backend


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Force every llmkern op in this thread onto ``backend`` (``None`` restores the automatic choice)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    prev = getattr(_local, "forced", None)
    _local.forced = backend
    try:
        yield
    finally:
        _local.forced = prev


class Tracker(collections.Counter):
    """Counts ``(op, backend)`` calls made while it is active."""

    def backends(self, op: str) -> set[str]:
        return {b for (o, b), n in self.items() if o == op and n}

    def ops(self) -> set[str]:
        return {o for (o, _b), n in self.items() if n}


@contextlib.contextmanager
def track():
    """``with track() as t: ...`` then ``t.backends("rms_norm") == {"triton"}``."""
    t = Tracker()
    _trackers.append(t)
    try:
        yield t
    finally:
        _trackers.remove(t)


def counts() -> dict:
    """Process-wide ``{(op, backend): calls}`` since import."""
    return dict(_counts)
