"""Which implementation of an op runs, and a record of which one did.

Backends:
  ``triton``    — the Triton kernels in ``llmkern.kernels``. Default for CUDA tensors. On CPU tensors only under
                  the Triton interpreter (``TRITON_INTERPRET=1`` set before import), which is how tests run them here.
  ``cpp``       — the C++ CPU kernels of the extension (``torch.ops.llmkern_C``). Default for CPU tensors otherwise.
  ``cuda``      — the extension's CUDA kernels, an alternative to Triton on CUDA tensors (row ops and cache writes).
  ``reference`` — the pure-torch code in ``llmkern.reference``; the last fallback.

Automatic choice: CUDA tensors → triton; CPU tensors → triton under the interpreter, else cpp when the extension is
built and implements the op, else reference. ``linear`` has no Triton kernel (on CUDA ``F.linear``/cuBLAS already
streams the weights at the memory limit): CUDA tensors → reference, CPU tensors → cpp when the extension is built,
under the interpreter too. ``with llmkern.use_backend("cpp"):`` (or ``LLMKERN_BACKEND=cpp`` in
the environment, read at import) forces a backend: ops it implements run on it, an op it does not implement falls
back to the automatic choice, and asking for a backend that cannot run on the tensors' device raises.

Every op call records ``(op, backend)``; ``track()`` exposes the record so a test can prove the kernel it meant to
test is the one that ran, and the demo can say which op ran where.

Eager fast path: a decode step makes ~150 row-op calls of a few µs each, so ``select`` (and a ``torch.device``
per call) is too slow for them. ``local.direct`` is, per thread, ``{op: C function}`` of the C++ CPU kernels that
the current choice (automatic or forced) runs for CPU tensors; ``llmkern.ops`` calls them directly and records each
call in ``_counts`` and the active trackers itself. The table fills as ``select`` picks ``cpp`` for an op (so the
first call of each op takes the full path, and ``_counts`` holds the op's key before any direct call) and is an
empty table while another backend is forced.
"""

import collections
import contextlib
import functools
import os
import threading

import torch

BACKENDS = ("triton", "cpp", "cuda", "reference")

# Ops each kernel backend implements; the reference implements every op.
_ROW_OPS = {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul", "reshape_and_cache", "copy_blocks"}
_PAGED_OPS = {"paged_decode_attention", "paged_prefill_attention"}
IMPLEMENTS = {
    "triton": _ROW_OPS | _PAGED_OPS,
    "cpp": _ROW_OPS | _PAGED_OPS | {"linear"},
    "cuda": _ROW_OPS,
}

# Read once: TRITON_INTERPRET must be set before Triton kernels are defined anyway, and a per-call environment
# lookup costs more than a decode-sized kernel.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_ENV_BACKEND = os.environ.get("LLMKERN_BACKEND", "").strip() or None

# (op, backend) -> calls. A plain dict: a Counter's `+= 1` costs twice as much, and the fast path pays it per call.
# Only ever mutated in place (llmkern.ops holds references to it and to _trackers).
_counts: dict = {}
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
    triton = op in IMPLEMENTS["triton"] and _triton_importable()
    if device.type == "cuda":
        return "triton" if triton else "reference"
    if _INTERPRET and triton:
        return "triton"
    if device.type == "cpu" and op in IMPLEMENTS["cpp"]:
        if _ext_loaded():
            return "cpp"
        _warn_no_extension()
    return "reference"


def _warn_no_extension() -> None:
    """Once per process: CPU ops run the pure-torch reference because the C++ extension is not loaded."""
    if "warned_no_ext" in _cache:
        return
    _cache["warned_no_ext"] = True
    import warnings

    from llmkern import _ext

    warnings.warn(f"llmkern: CPU tensors run the pure-torch reference implementations (slower than eager for some "
                  f"ops): {_ext.why_not()}", RuntimeWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------------------------------
# Per-thread choice and the eager fast path (module docstring)

# Ops whose C++ CPU kernel ``llmkern.ops`` may call directly: functional, every input checked by the kernel.
DIRECT_OPS = frozenset({"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul", "linear", "reshape_and_cache",
                        "paged_decode_attention", "paged_prefill_attention"})
_CPP_DIRECT: dict = {}  # op -> torch.ops.llmkern_C.<op>.default's C function; filled by select()
_NO_DIRECT: dict = {}  # stays empty


def _boxed_call(overload):
    """``overload``'s kernel as a plain callable through the dispatcher's boxed entry point. About 0.6 µs cheaper
    per call than calling the ``OpOverload``: no ``__torch_function__`` handling (callers take this path only for
    plain tensors with no torch-function mode active) and no overload resolution. A private API: on a torch
    without it, the ``OpOverload`` itself (the public path, slower by that much)."""
    boxed = getattr(torch._C, "_dispatch_call_boxed", None)
    handle = getattr(overload, "_handle", None)
    if boxed is None or handle is None:
        return overload
    return functools.partial(boxed, handle)


def _direct_table(forced: str | None) -> dict:
    """The direct-call table for a thread whose effective forced backend is ``forced``: automatic CPU choice is cpp
    unless Triton runs in the interpreter."""
    return _CPP_DIRECT if forced == "cpp" or (forced is None and not _INTERPRET) else _NO_DIRECT


class _Local(threading.local):
    forced: str | None = None  # use_backend(...) in this thread; None: the environment's choice, else automatic
    direct: dict = _direct_table(_ENV_BACKEND)


local = _Local()


_auto_cache: dict = {}
_forced_cache: dict = {}


def select(op: str, device: torch.device, cpp: bool = True) -> str:
    """The backend ``op`` runs on for tensors on ``device``; records the choice. ``cpp=False``: the C++ kernel
    cannot serve this call (e.g. no kernel for this head_dim on this CPU), so where cpp would run, the reference
    runs (and is what is recorded)."""
    forced = local.forced or _ENV_BACKEND
    if forced is None:
        key = (op, device.type)
        backend = _auto_cache.get(key)
        if backend is None:
            backend = _auto_cache[key] = _automatic(op, device)
    elif forced == "reference" or op not in IMPLEMENTS.get(forced, ()):
        backend = forced if forced == "reference" else _automatic(op, device)
    else:
        # Availability depends on the device type only, and the extension's state is fixed once loaded.
        key = (forced, device.type)
        why = _forced_cache.get(key)
        if why is None:
            ok, why = available(forced, device)
            why = _forced_cache[key] = "" if ok else why
        if why:
            raise RuntimeError(f"llmkern backend {forced!r} was requested for {op} but cannot run: {why}")
        backend = forced
    if backend == "cpp" and not cpp:
        backend = "reference"
    if backend == "cpp" and op in DIRECT_OPS and op not in _CPP_DIRECT:
        _CPP_DIRECT[op] = _boxed_call(getattr(torch.ops.llmkern_C, op).default)
    key = (op, backend)
    _counts[key] = _counts.get(key, 0) + 1
    for t in _trackers:
        t[key] += 1
    return backend


class use_backend(contextlib.ContextDecorator):  # noqa: N801 (a function-like name, as before)
    """Force llmkern ops in this thread onto ``backend`` where it implements them (``None``: automatic).

    ``with use_backend("cpp"): ...`` or ``@use_backend("cpp")``. A class rather than a ``contextlib.contextmanager``:
    benchmarks enter it around every timed call, and a generator context manager costs about a µs."""

    def __init__(self, backend: str | None):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        self.backend = backend
        self._saved: list = []  # one (forced, direct) per active entry: the same object may be entered nested

    def _recreate_cm(self):  # ContextDecorator: a fresh manager per decorated call (thread-safe)
        return use_backend(self.backend)

    def __enter__(self):
        self._saved.append((local.forced, local.direct))
        local.forced = self.backend
        local.direct = _direct_table(self.backend or _ENV_BACKEND)

    def __exit__(self, *exc):
        local.forced, local.direct = self._saved.pop()
        return False


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
