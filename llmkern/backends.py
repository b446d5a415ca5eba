"""Which implementation of an op runs, and a record of which one did.

Backends:
  ``triton``    — the Triton kernels in ``llmkern.kernels``. Default for CUDA tensors. On CPU tensors only under
                  the Triton interpreter (``TRITON_INTERPRET=1`` set before import), which is how tests run them here.
  ``cpp``       — the C++ CPU kernels of the extension (``torch.ops.llmkern_C``). Default for CPU tensors otherwise.
  ``cuda``      — the extension's CUDA kernels, an alternative to Triton on CUDA tensors (row ops and cache writes).
  ``reference`` — the pure-torch code in ``llmkern.reference``; the last fallback.

Automatic choice: CUDA tensors → triton; CPU tensors → triton under the interpreter, else cpp when the extension is
built and implements the op, else reference. ``with llmkern.use_backend("cpp"):`` (or ``LLMKERN_BACKEND=cpp`` in
the environment, read at import) forces a backend: ops it implements run on it, an op it does not implement falls
back to the automatic choice, and asking for a backend that cannot run on the tensors' device raises.

Every op call records ``(op, backend)``; ``track()`` exposes the record so a test can prove the kernel it meant to
test is the one that ran, and the demo can say which op ran where.
"""

import collections
import contextlib
import os
import threading

import torch

BACKENDS = ("triton", "cpp", "cuda", "reference")

# Ops each native backend implements; the reference implements every op.
_ROW_OPS = {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul", "reshape_and_cache", "copy_blocks"}
IMPLEMENTS = {
    "cpp": _ROW_OPS | {"paged_decode_attention", "paged_prefill_attention"},
    "cuda": _ROW_OPS,
}

# Read once: TRITON_INTERPRET must be set before Triton kernels are defined anyway, and a per-call environment
# lookup costs more than a decode-sized kernel.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_ENV_BACKEND = os.environ.get("LLMKERN_BACKEND", "").strip() or None

_local = threading.local()
_counts: collections.Counter = collections.Counter()
_trackers: list = []
_cache: dict = {}


def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors), i.e. ``TRITON_INTERPRET=1`` at import."""
    return _INTERPRET


def _triton_importable() -> bool:
    if "triton" not in _cache:
        try:
            import triton  # noqa: F401

            _cache["triton"] = True
        except ImportError:
            _cache["triton"] = False
    return _cache["triton"]


def _ext_loaded() -> bool:
    if "ext" not in _cache:
        from llmkern import _ext

        _cache["ext"] = _ext.load()
    return _cache["ext"]


def available(backend: str, device) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device``; when not, a reason a user can act on."""
    device = torch.device(device)
    if backend == "reference":
        return True, ""
    if backend == "triton":
        if not _triton_importable():
            return False, "triton is not installed"
        if device.type == "cuda" or _INTERPRET:
            return True, ""
        return False, (f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before llmkern "
                       f"is imported (got a {device.type} tensor)")
    if backend == "cpp":
        if device.type != "cpu":
            return False, f"the cpp backend runs on CPU tensors (got a {device.type} tensor)"
        if not _ext_loaded():
            from llmkern import _ext

            return False, _ext.why_not()
        return True, ""
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors (got a {device.type} tensor)"
        from llmkern import _ext

        if not _ext.has_cuda():
            return False, "the extension was built without CUDA kernels" if _ext_loaded() else _ext.why_not()
        return True, ""
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _automatic(op: str, device: torch.device) -> str:
    if device.type == "cuda":
        return "triton" if _triton_importable() else "reference"
    if _INTERPRET and _triton_importable():
        return "triton"
    if device.type == "cpu" and op in IMPLEMENTS["cpp"] and _ext_loaded():
        return "cpp"
    return "reference"


_auto_cache: dict = {}


def select(op: str, device: torch.device, cpp: bool = True) -> str:
    """The backend ``op`` runs on for tensors on ``device``; records the choice. ``cpp=False``: the C++ kernel
    cannot serve this call (e.g. no kernel for this head_dim on this CPU), so where cpp would run, the reference
    runs (and is what is recorded)."""
    forced = getattr(_local, "forced", None) or _ENV_BACKEND
    if forced is None:
        key = (op, device.type)
        backend = _auto_cache.get(key)
        if backend is None:
            backend = _auto_cache[key] = _automatic(op, device)
    elif forced == "reference" or (forced != "triton" and op not in IMPLEMENTS.get(forced, ())):
        backend = forced if forced == "reference" else _automatic(op, device)
    else:
        ok, why = available(forced, device)
        if not ok:
            raise RuntimeError(f"llmkern backend {forced!r} was requested for {op} but cannot run: {why}")
        backend = forced
    if backend == "cpp" and not cpp:
        backend = "reference"
    key = (op, backend)
    _counts[key] += 1
    for t in _trackers:
        t[key] += 1
    return backend


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Force llmkern ops in this thread onto ``backend`` where it implements them (``None``: automatic)."""
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
