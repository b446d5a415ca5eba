"""The one way the launchers start a Triton kernel: on the tensors' device, recordable.

* ``device_guard(t)``: every launcher runs its body under it. For a CUDA tensor it is ``torch.cuda.device(t.device)``
  (the current device becomes the tensor's, so Triton compiles for it and launches on *its* current stream, and
  scratch buffers land there); for CPU (interpreter) and meta tensors a null context.
* ``launch(fn, grid, *args, **kwargs)``: ``fn[grid](*args, **kwargs)``, unless a ``recording()`` block is active,
  in which case the launch is recorded and nothing runs. ``llmkern.warmup`` and tests/test_variants.py call the
  real launchers on meta tensors inside ``recording()`` to learn which kernels a shape launches, with exactly the
  arguments the launcher passes.
* ``variant_key(fn, args, kwargs)``: the compile identity Triton gives a launch (its cache key): each argument's
  type and specialisation (integers equal to 1 become constants, multiples of 16 and 16-byte aligned pointers are
  marked divisible, except ``do_not_specialize`` arguments), the constexprs, ``num_warps`` and ``num_stages``.
  Computed with Triton's own specialisation function, so it changes exactly when Triton would compile again.
"""

import contextlib
import contextvars
import inspect
from dataclasses import dataclass

import torch

_NULL = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor, else a null context."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return _NULL


@dataclass(frozen=True)
class Launch:
    fn: object  # the @triton.jit kernel
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def key(self) -> tuple:
        return variant_key(self.fn, self.args, self.kwargs)


_recorder: contextvars.ContextVar = contextvars.ContextVar("llmkern_launch_recorder", default=None)


def launch(fn, grid, *args, **kwargs) -> None:
    rec = _recorder.get()
    if rec is not None:
        rec.append(Launch(fn, tuple(grid), args, kwargs))
        return
    fn[grid](*args, **kwargs)


@contextlib.contextmanager
def recording():
    """Inside the block, ``launch`` records ``Launch`` objects into the yielded list instead of launching."""
    launches: list = []
    token = _recorder.set(launches)
    try:
        yield launches
    finally:
        _recorder.reset(token)


# Triton's defaults for the options that enter the compile key (NVIDIA backend).
_DEFAULT_OPTIONS = {"num_warps": 4, "num_stages": 3}


def _kernel_params(fn) -> list:
    """``[(name, is_constexpr, specialize, align)]`` of a ``@triton.jit`` kernel (compiled or interpreted)."""
    cached = getattr(fn, "_llmkern_params", None)
    if cached is not None:
        return cached
    py = getattr(fn, "fn", fn)
    params = list(inspect.signature(py).parameters.values())
    opts = getattr(fn, "kwargs", None) or {}
    no_spec = getattr(fn, "do_not_specialize", None)
    if no_spec is None:
        no_spec = opts.get("do_not_specialize")
    no_align = getattr(fn, "do_not_specialize_on_alignment", None)
    if no_align is None:
        no_align = opts.get("do_not_specialize_on_alignment")

    def names(xs):
        return {params[x].name if isinstance(x, int) else x for x in (xs or ())}

    no_spec, no_align = names(no_spec), names(no_align)
    out = []
    for p in params:
        ann = p.annotation
        is_cx = ann is not inspect.Parameter.empty and "constexpr" in str(getattr(ann, "__name__", ann))
        out.append((p.name, is_cx, p.name not in no_spec, p.name not in no_align))
    try:
        fn._llmkern_params = out
    except AttributeError:  # pragma: no cover - a kernel object that takes no attributes: recompute each time
        pass
    return out


def _specialize(arg, specialize: bool, align: bool) -> tuple:
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    return tuple(native_specialize_impl(BaseBackend, arg, False, specialize, align))


def variant_key(fn, args: tuple, kwargs: dict) -> tuple:
    """The compile identity of ``fn[grid](*args, **kwargs)``: ``(kernel name, ((arg, type, specialisation), ...),
    (option, value) ...)``. Two launches with equal keys share one compiled kernel."""
    params = _kernel_params(fn)
    bound = dict(zip((p[0] for p in params), args))
    options = dict(_DEFAULT_OPTIONS)
    for k, v in kwargs.items():
        if k in bound or any(p[0] == k for p in params):
            bound[k] = v
        else:
            options[k] = v
    spec = []
    for name, is_cx, specialize, align in params:
        v = bound[name]
        if is_cx:
            spec.append((name, "constexpr", v))
        else:
            spec.append((name, *_specialize(v, specialize, align)))
    name = getattr(getattr(fn, "fn", fn), "__name__", str(fn))
    return (name, tuple(spec), tuple(sorted(options.items())))


def describe(key: tuple) -> str:
    """A short human-readable form of a ``variant_key``: kernel name, constexprs, integer constants, options."""
    name, spec, options = key
    cx = [f"{a}={v}" for a, t, v in spec if t == "constexpr" and not a.startswith("stride_")]
    return f"{name.lstrip('_')}[{','.join(cx)},{','.join(f'{k}={v}' for k, v in options)}]"
