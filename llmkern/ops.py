"""Public ops: validation, torch custom-op registration, and dispatch to a backend.

Each op is one name in the ``llmkern`` torch library (``torch.ops.llmkern.rms_norm`` ...; see ``llmkern._library``)
with a schema and a fake implementation, so ``torch.compile`` traces through it without graph breaks, and
``torch.library.opcheck`` holds.
The real implementation picks a backend per call (``llmkern.backends.select``): Triton for CUDA tensors, Triton in
the interpreter for CPU tensors under ``TRITON_INTERPRET=1``, else the C++ extension's CPU kernels, else the
pure-torch reference.

Inputs are validated in one function per op, called by both the fake and the real implementation, so bad input
raises the same ``TypeError``/``ValueError`` in eager mode and while ``torch.compile`` traces.

Eager fast path (decode calls these ~150 times per token, at a few µs each): a public function called on plain
tensors outside torch.compile calls the implementation without the dispatcher round trip, and the implementation
calls the C++ CPU kernel directly when ``backends.local.direct`` says cpp is the choice. That call skips the Python
checks: the C++ kernel checks every input too (TORCH_CHECK), and when it raises, the call is repeated on the full
path, whose Python checks raise the error that names the argument. The few conditions the kernel does not check
(finite eps and offset, a row at most ``_MAX_NORM_N`` wide, a non-empty ``cos``) are tested before the direct call.

``linear`` is ``F.linear`` with a C++ kernel for decode-sized inputs on CPU (``linear_max_rows``); there is no
Triton linear: on CUDA, and for larger inputs, ``F.linear`` (the reference backend) runs.

Training: ``rms_norm``, ``fused_add_rms_norm``, ``apply_rope``, ``silu_and_mul`` (so ``silu_and_mul_fused``) and
``linear`` have backward formulas (``torch.library.register_autograd``, section "Autograd" below). An input that
requires grad under grad mode never takes the eager fast path: it goes through ``torch.ops.llmkern``, whose autograd
kernel records the op for the backward. The paged attention ops and the cache writes (``llmkern.paged_ops``) have no
backward and raise when asked for one.
"""

import math
from numbers import Real

import torch
import torch.nn.functional as F

from llmkern import _library, backends, reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Backends served by the C++/CUDA extension: same schemas under torch.ops.llmkern_C.
_NATIVE = ("cpp", "cuda")

# Widest row one normalisation tile holds (kernels/rms_norm.py MAX_N); kept here so validation does not import triton.
_MAX_NORM_N = 65536


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers: each names the argument, what was expected and what came. Each op's check starts with a
# one-expression fast test of the common valid case (a decode step makes ~150 op calls; the detailed checks cost
# more than the C++ kernels they guard) and falls through to the detailed checks, which raise, otherwise.

_FLOATS = frozenset(FLOAT_DTYPES)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_INF = math.inf
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled  # with a requires-grad input: the dispatcher path, so autograd sees the op
_function_mode = torch._C._is_torch_function_mode_enabled  # a TorchFunctionMode must see the C++ op: full path
_local = backends.local  # .direct: {op: C++ CPU kernel} for the direct path (module docstring)
_counts, _trackers = backends._counts, backends._trackers  # the direct path records its calls (backends docstring)


def _call_direct(fn, key: tuple, *args):
    """The eager fast path's C++ call (module docstring): the kernel's result, recorded for ``track()`` as
    ``select`` would; None when the kernel raised, so the caller takes the full path, whose checks raise the error
    that names the argument."""
    try:
        out = fn(*args)
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    _counts[key] += 1
    for t in _trackers:
        t[key] += 1
    return out


def _require_tensors(**named) -> None:
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_tensor(t, name: str, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = [str(d).replace("torch.", "") for d in dtypes]
        allowed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{name} must have dtype {allowed}, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar (0-d) tensor")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def _check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{_and(devices)} must be on one device, got "
                         f"{_and({f'{n} on {d}': 0 for n, d in devices.items()})}")


def _check_same(attr: str, **tensors) -> None:
    vals = {name: getattr(t, attr) for name, t in tensors.items()}
    first = next(iter(vals.values()))
    # ``!=``, not their text: under torch.compile with dynamic shapes two equal sizes can be different symbols.
    if any(v != first for v in vals.values()):
        def show(v):
            return f"shape {tuple(v)}" if attr == "shape" else str(v).replace("torch.", "")

        raise ValueError(f"expected equal {attr}s of {_and(vals)}, got "
                         f"{_and({f'{n} {show(v)}': 0 for n, v in vals.items()})}")


def _and(names) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _check_positive_float(value, name: str, *, optional: bool = False) -> float | None:
    """``value`` as a float after checking it is a real, positive, finite number (``None`` allowed if optional)."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float{' or None' if optional else ''}, got {type(value).__name__}")
    value = float(value)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return value


def _check_eps(eps) -> float:
    return _check_positive_float(eps, "eps")


def _check_offset(offset) -> float:
    if isinstance(offset, bool) or not isinstance(offset, Real):
        raise TypeError(f"offset must be a float, got {type(offset).__name__}")
    offset = float(offset)
    if not math.isfinite(offset):
        raise ValueError(f"offset must be a finite float, got {offset}")
    return offset


def _check_norm_weight(x, weight) -> None:
    _check_tensor(weight, "weight")
    _check_same_device(x=x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be 1-D with as many elements as x's last dimension ({x.shape[-1]}), got "
                         f"weight of shape {tuple(weight.shape)} for x of shape {tuple(x.shape)}")
    if x.shape[-1] > _MAX_NORM_N:
        raise ValueError(f"x's last dimension must be at most {_MAX_NORM_N} (one normalisation tile), got "
                         f"{x.shape[-1]}")


def _check_rms_norm(x, weight, eps, offset=0.0) -> None:
    if (type(eps) is float and 0.0 < eps < math.inf and type(offset) is float and math.isfinite(offset)
            and type(x) in _PLAIN and type(weight) in _PLAIN
            and x.dtype in _FLOATS and weight.dtype in _FLOATS and weight.dim() == 1 and x.dim() > 0
            and x.shape[-1] == weight.shape[0] and 0 < x.shape[-1] <= _MAX_NORM_N and x.device == weight.device
            and x.numel() > 0):
        return
    _check_tensor(x, "x")
    _check_norm_weight(x, weight)
    _check_eps(eps)
    _check_offset(offset)


def _check_fused_add_rms_norm(x, residual, weight, eps) -> None:
    if (type(eps) is float and 0.0 < eps < math.inf and type(x) in _PLAIN and type(residual) in _PLAIN
            and type(weight) in _PLAIN and x.dtype in _FLOATS and residual.dtype == x.dtype
            and weight.dtype in _FLOATS and weight.dim() == 1 and x.dim() > 0 and x.shape == residual.shape
            and x.shape[-1] == weight.shape[0] and 0 < x.shape[-1] <= _MAX_NORM_N and x.device == weight.device
            and residual.device == x.device and x.numel() > 0):
        return
    _check_tensor(x, "x")
    _check_tensor(residual, "residual")
    _check_same_device(x=x, residual=residual)
    _check_same("shape", x=x, residual=residual)
    _check_same("dtype", x=x, residual=residual)
    _check_norm_weight(x, weight)
    _check_eps(eps)


def _check_rope(q, k, cos, sin) -> None:
    if (type(q) in _PLAIN and type(k) in _PLAIN and type(cos) in _PLAIN and type(sin) in _PLAIN
            and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and q.dtype in _FLOATS and k.dtype == q.dtype
            and cos.dtype in _FLOATS and sin.dtype in _FLOATS and cos.shape == sin.shape and q.numel() > 0
            and k.numel() > 0 and cos.numel() > 0 and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:]
            and cos.shape[0] in (1, q.shape[0]) and cos.shape[1] == q.shape[2] and cos.shape[2] % 2 == 0
            and cos.shape[2] <= q.shape[3] and k.device == q.device and cos.device == q.device
            and sin.device == q.device):
        return
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_tensor(t, name)
    _check_same_device(q=q, k=k, cos=cos, sin=sin)
    _check_same("dtype", q=q, k=k)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D (batch, heads, seq, head_dim), got q of shape {tuple(q.shape)} "
                         f"and k of shape {tuple(k.shape)}")
    b, _, s, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, s, d):
        raise ValueError(f"k must have q's batch ({b}), seq ({s}) and head_dim ({d}), got k of shape "
                         f"{tuple(k.shape)} for q of shape {tuple(q.shape)}")
    _check_same("shape", cos=cos, sin=sin)
    if cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1] != s:
        raise ValueError(f"cos and sin must be 3-D (batch, seq, rotary_dim) with batch 1 or q's batch ({b}) and "
                         f"seq equal to q's ({s}), got cos and sin of shape {tuple(cos.shape)} for q of shape "
                         f"{tuple(q.shape)}")
    rd = cos.shape[-1]
    if rd % 2 or rd > d:
        raise ValueError(f"the rotary dim (cos and sin's last dimension) must be even and at most q's head_dim "
                         f"({d}), got {rd}")


def _check_silu_and_mul(gate, up) -> None:
    if (type(gate) in _PLAIN and type(up) in _PLAIN and gate.dtype in _FLOATS and up.dtype == gate.dtype
            and gate.shape == up.shape and gate.dim() > 0 and gate.device == up.device and gate.numel() > 0):
        return
    _check_tensor(gate, "gate")
    _check_tensor(up, "up")
    _check_same_device(gate=gate, up=up)
    _check_same("shape", gate=gate, up=up)
    _check_same("dtype", gate=gate, up=up)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, last]``: a view whenever the leading dims collapse (always for HF's activations); a copy
    only for layouts whose leading dims cannot be described by one stride."""
    return t.reshape(-1, t.shape[-1])


def _norm_out_dtype(x, weight, offset: float) -> torch.dtype:
    # Llama: `weight * h.to(x.dtype)` promotes; Gemma: `.type_as(x)`.
    return torch.promote_types(x.dtype, weight.dtype) if offset == 0.0 else x.dtype


# --------------------------------------------------------------------------------------------------------------------
# rms_norm


_K_RMS_NORM = ("rms_norm", "cpp")


def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    fn = _local.direct.get("rms_norm")
    if (fn is not None and x.is_cpu and not _function_mode() and 0.0 < eps < _INF and -_INF < offset < _INF
            and weight.numel() <= _MAX_NORM_N):
        out = _call_direct(fn, _K_RMS_NORM, x, weight, eps, offset)
        if out is not None:
            return out
    _check_rms_norm(x, weight, eps, offset)
    backend = backends.select("rms_norm", x.device)
    if backend in _NATIVE:
        return torch.ops.llmkern_C.rms_norm(x, weight, eps, offset)
    if backend == "reference":
        return reference.rms_norm(x, weight, eps, offset)
    from llmkern.kernels import rms_norm as K

    out = torch.empty(x.shape, dtype=_norm_out_dtype(x, weight, offset), device=x.device)
    K.rms_norm_fwd(_rows(x), weight, _rows(out), eps, offset)
    return out


def _rms_norm_fake(x, weight, eps, offset):
    _check_rms_norm(x, weight, eps, offset)
    return x.new_empty(x.shape, dtype=_norm_out_dtype(x, weight, offset))


_library.define("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor", _rms_norm_op, _rms_norm_fake)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0) -> torch.Tensor:
    """Root-mean-square normalisation over the last dim, exactly as Hugging Face's ``LlamaRMSNorm``.

    Rounding (fp16/bf16): at eager's two points, the normalised row ``x * rstd`` (fp32) cast to x's dtype, then the
    product with the weight; Gemma's ``offset`` form rounds once, at the end, as eager does. Not always bit-equal to
    eager: the fp32 ``rstd`` comes from another summation order and square root, so a rare element differs by one
    ulp. Guarantee: the tolerance rule (README.md, "Where fp16/bf16 results are rounded").

    Args:
        x: ``[..., N]`` fp32/fp16/bf16, any strides.
        weight: ``[N]``, on x's device.
        eps: added to the mean square, > 0.
        offset: 0 for Llama/Qwen2/Mistral (``w * norm(x).to(x.dtype)``); 1.0 for Gemma (``norm(x) * (1 + w)`` in fp32).

    Returns:
        ``[..., N]`` contiguous, dtype ``promote(x.dtype, weight.dtype)`` (offset 0) or ``x.dtype`` (offset != 0).

    Example:
        >>> x = torch.randn(2, 5, 896); w = torch.ones(896)
        >>> y = llmkern.ops.rms_norm(x, w, 1e-6)
    """
    if (type(x) in _PLAIN and type(weight) in _PLAIN and type(eps) is float and type(offset) is float
            and not _is_compiling() and not (_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return _rms_norm_op(x, weight, eps, offset)
    # Under torch.compile, or for tensor subclasses (FakeTensor, ...), go through torch.ops.llmkern so tracing sees
    # the op and its fake implementation.
    _require_tensors(x=x, weight=weight)
    return torch.ops.llmkern.rms_norm(x, weight, _check_eps(eps), _check_offset(offset))


# --------------------------------------------------------------------------------------------------------------------
# fused_add_rms_norm


_K_FUSED_ADD_RMS_NORM = ("fused_add_rms_norm", "cpp")


def _fused_add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _local.direct.get("fused_add_rms_norm")
    if (fn is not None and x.is_cpu and not _function_mode() and 0.0 < eps < _INF
            and weight.numel() <= _MAX_NORM_N):
        out = _call_direct(fn, _K_FUSED_ADD_RMS_NORM, x, residual, weight, eps)
        if out is not None:
            return out
    _check_fused_add_rms_norm(x, residual, weight, eps)
    backend = backends.select("fused_add_rms_norm", x.device)
    if backend in _NATIVE:
        return torch.ops.llmkern_C.fused_add_rms_norm(x, residual, weight, eps)
    if backend == "reference":
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    from llmkern.kernels import rms_norm as K

    out = torch.empty(x.shape, dtype=_norm_out_dtype(x, weight, 0.0), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    K.fused_add_rms_norm_fwd(_rows(x), _rows(residual), weight, _rows(out), _rows(res_out), eps)
    return out, res_out


def _fused_add_rms_norm_fake(x, residual, weight, eps):
    _check_fused_add_rms_norm(x, residual, weight, eps)
    return x.new_empty(x.shape, dtype=_norm_out_dtype(x, weight, 0.0)), x.new_empty(x.shape)


_library.define("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
                _fused_add_rms_norm_op, _fused_add_rms_norm_fake)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual_out = x + residual`` and ``rms_norm(residual_out, weight, eps)`` in one pass over memory.

    This is a decoder layer's ``hidden = residual + attn_out; residual = hidden; hidden = post_attention_layernorm(hidden)``:
    the sum is rounded to x's dtype before it is normalised, as eager does.

    Rounding (fp16/bf16): ``residual_out`` is the sum rounded once, bit-equal to eager's ``residual + x``; ``normed``
    rounds as ``rms_norm`` does on that rounded sum (eager's points; a rare element one ulp apart).

    Args:
        x, residual: ``[..., N]``, same shape, dtype (fp32/fp16/bf16) and device; any strides.
        weight: ``[N]``.
        eps: > 0.

    Returns:
        ``(normed, residual_out)``, both ``[..., N]`` contiguous; ``normed`` has dtype ``promote(x, weight)``.
    """
    if (type(x) in _PLAIN and type(residual) in _PLAIN and type(weight) in _PLAIN and type(eps) is float
            and not _is_compiling()
            and not (_grad_enabled() and (x.requires_grad or residual.requires_grad or weight.requires_grad))):
        return _fused_add_rms_norm_op(x, residual, weight, eps)
    _require_tensors(x=x, residual=residual, weight=weight)
    return torch.ops.llmkern.fused_add_rms_norm(x, residual, weight, _check_eps(eps))


# --------------------------------------------------------------------------------------------------------------------
# apply_rope


_K_APPLY_ROPE = ("apply_rope", "cpp")


def _apply_rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fn = _local.direct.get("apply_rope")
    if fn is not None and q.is_cpu and not _function_mode() and cos.numel() > 0:
        out = _call_direct(fn, _K_APPLY_ROPE, q, k, cos, sin)
        if out is not None:
            return out
    _check_rope(q, k, cos, sin)
    backend = backends.select("apply_rope", q.device)
    if backend in _NATIVE:
        return torch.ops.llmkern_C.apply_rope(q, k, cos, sin)
    if backend == "reference":
        q_out, k_out = reference.apply_rope(q, k, cos, sin)
        # Keep the layout the fake implementation promises (empty_like of the inputs).
        return torch.empty_like(q).copy_(q_out), torch.empty_like(k).copy_(k_out)
    from llmkern.kernels import rope as K

    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    K.rope_fwd(q, k, cos, sin, q_out, k_out)
    return q_out, k_out


def _apply_rope_fake(q, k, cos, sin):
    _check_rope(q, k, cos, sin)
    return torch.empty_like(q), torch.empty_like(k)


_library.define("apply_rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)",
                _apply_rope_op, _apply_rope_fake)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding on q and k (rotate-half / NeoX style, as HF's ``apply_rotary_pos_emb``), one launch.

    Rounding (fp16/bf16) differs from eager's: the kernels (triton, cpp, cuda) compute ``x1 * cos - x2 * sin`` in
    fp32 (both products exact there) and round once to q's dtype, where eager rounds each product to the dtype and
    then their sum. The results are not bit-equal to eager's (about a third of the elements differ on random data)
    and never further from the exact value ``y``, element by element: ``|out - y| <= |eager - y| + 2|fp32(y) - y|``
    (tests/test_ops.py, ``test_rope_rounding_*``; README.md, "Where fp16/bf16 results are rounded"). The reference
    backend rounds as eager does and is bit-equal to it. In fp32 the order is eager's (bit-equal on CPU). This
    holds for cos/sin in q's dtype, as HF's rotary embedding returns them.

    Args:
        q: ``[b, Hq, s, d]``, any strides (HF passes ``[b, s, H, d]`` buffers transposed).
        k: ``[b, Hkv, s, d]``, same dtype and device as q.
        cos, sin: ``[b or 1, s, rotary_dim]`` exactly as the model's rotary embedding returns them; ``rotary_dim``
            even and ``<= d``; dims past ``rotary_dim`` pass through unchanged (partial rotary).

    Returns:
        ``(q_rot, k_rot)`` with q's and k's shapes, dtypes and memory layouts.

    Example:
        >>> q = torch.randn(1, 14, 5, 64); k = torch.randn(1, 2, 5, 64)
        >>> cos, sin = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
        >>> q2, k2 = llmkern.ops.apply_rope(q, k, cos, sin)
    """
    if (type(q) in _PLAIN and type(k) in _PLAIN and type(cos) in _PLAIN and type(sin) in _PLAIN
            and not _is_compiling() and not (_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                   or cos.requires_grad or sin.requires_grad))):
        return _apply_rope_op(q, k, cos, sin)
    _require_tensors(q=q, k=k, cos=cos, sin=sin)
    return torch.ops.llmkern.apply_rope(q, k, cos, sin)


# --------------------------------------------------------------------------------------------------------------------
# silu_and_mul


_K_SILU_AND_MUL = ("silu_and_mul", "cpp")


def _silu_and_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    fn = _local.direct.get("silu_and_mul")
    if fn is not None and gate.is_cpu and not _function_mode():
        out = _call_direct(fn, _K_SILU_AND_MUL, gate, up)
        if out is not None:
            return out
    _check_silu_and_mul(gate, up)
    backend = backends.select("silu_and_mul", gate.device)
    if backend in _NATIVE:
        return torch.ops.llmkern_C.silu_and_mul(gate, up)
    if backend == "reference":
        return reference.silu_and_mul(gate, up)
    from llmkern.kernels import swiglu as K

    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    K.silu_and_mul_fwd(_rows(gate), _rows(up), _rows(out))
    return out


def _silu_and_mul_fake(gate, up):
    _check_silu_and_mul(gate, up)
    return gate.new_empty(gate.shape)


_library.define("silu_and_mul(Tensor gate, Tensor up) -> Tensor", _silu_and_mul_op, _silu_and_mul_fake)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (SwiGLU), rounding like HF's ``LlamaMLP``: silu's result is cast to the dtype first.

    Rounding (fp16/bf16): at eager's two points, ``silu(gate)`` (fp32) and the product. Not always bit-equal to
    eager: the fp32 silu uses another ``exp``, so a rare element differs by one ulp. Guarantee: the tolerance rule
    (README.md, "Where fp16/bf16 results are rounded").

    Args:
        gate, up: ``[..., I]``, same shape, dtype and device; any strides.

    Returns:
        ``[..., I]`` contiguous.
    """
    if (type(gate) in _PLAIN and type(up) in _PLAIN and not _is_compiling()
            and not (_grad_enabled() and (gate.requires_grad or up.requires_grad))):
        return _silu_and_mul_op(gate, up)
    _require_tensors(gate=gate, up=up)
    return torch.ops.llmkern.silu_and_mul(gate, up)


def silu_and_mul_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused ``[..., 2*I]`` gate/up projection (gate first, then up), without copying the halves.
    Rounds as ``silu_and_mul``.

    Returns:
        ``[..., I]`` contiguous.
    """
    _check_tensor(gate_up, "gate_up")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension must be even (the gate half, then the up half), got "
                         f"{gate_up.shape[-1]}")
    gate, up = gate_up.chunk(2, dim=-1)
    return silu_and_mul(gate, up)


# --------------------------------------------------------------------------------------------------------------------
# linear

# Decode sizes. At a few rows a Linear is a matrix-vector product bound by streaming the weight from memory, which the
# C++ kernel does at memory speed (torch's GEMM reads such weights at ~9 GB/s here); as rows grow, each weight byte is
# reused more and torch's GEMM catches up (prefill), so inputs above this many rows run F.linear. fp32 keeps the C++
# kernel up to 64 rows (its register-blocked walk took 0.41-0.94x torch's time at 16-64 rows of SmolLM2-135M's and
# Llama-3-8B's weights, AVX-512 and forced AVX2, AMD EPYC, 2 threads, 2026-12-07). bf16 depends on the kernel: where
# it has the bf16 dot product (the "avx512" kernel, AVX512-BF16) up to LINEAR_MAX_ROWS_BF16_DOT rows: a decode step's
# worth of weights (SmolLM2-135M's 211 in bf16; 4 layers of Llama-3-8B's), called one after another, took 0.79 / 0.86x
# torch's time at 16 rows and 0.90 / 0.94x at 32 (each shape alone 0.92-1.03x at 32; AMD EPYC, AVX512-BF16,
# 2 threads, 2026-12-08); without it (AVX2: each bf16 step widened to fp32; 0.47-2.09x at 4-16 rows) up to 16.
LINEAR_MAX_ROWS = 16
LINEAR_MAX_ROWS_BF16_DOT = 32
LINEAR_MAX_ROWS_FP32 = 64


def linear_max_rows(dtype: torch.dtype) -> int:
    """How many rows of x (``x.numel() // K``) the C++ linear serves for ``dtype`` with the kernel this CPU runs for
    it (``torch.ops.llmkern_C.cpu_kernel("linear", dtype)``, which follows a forced instruction set); more rows run
    ``F.linear``."""
    if dtype == torch.float32:
        return LINEAR_MAX_ROWS_FP32
    dot = (dtype == torch.bfloat16 and backends._ext_loaded() and hasattr(torch.ops.llmkern_C, "cpu_kernel")
           and torch.ops.llmkern_C.cpu_kernel("linear", dtype) == "avx512")
    return LINEAR_MAX_ROWS_BF16_DOT if dot else LINEAR_MAX_ROWS


_K_LINEAR = ("linear", "cpp")
# Rows the C++ linear serves per dtype on this CPU, for the dtypes it has a kernel for (fp16 never). Filled in place on
# the first full path call and again whenever the active instruction set changed since (``_linear_rows``: a forced
# ISA, ``set_cpu_isa``, moves the bf16 limit); the direct path reads it as it stands (it only runs after a full path
# call chose cpp).
_LINEAR_ROWS: dict = {}
_LINEAR_ISA: list = []


def _linear_rows() -> dict:
    lib = torch.ops.llmkern_C
    # A build that predates the op has no cpu_linear_supported: then nothing is served (the table stays empty).
    if not (backends._ext_loaded() and hasattr(lib, "cpu_linear_supported")):
        return _LINEAR_ROWS
    isa = lib.cpu_isa() if hasattr(lib, "cpu_isa") else None
    if _LINEAR_ISA != [isa]:
        _LINEAR_ROWS.clear()
        _LINEAR_ROWS.update({d: linear_max_rows(d) for d in (torch.float32, torch.bfloat16)
                             if lib.cpu_linear_supported(d)})
        _LINEAR_ISA[:] = [isa]
    return _LINEAR_ROWS


def _linear_cpp_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the C++ kernel serves this (validated) call: CPU, a dtype it has, a weight with unit last stride (the
    rows it streams), a contiguous bias, and at most ``linear_max_rows(x.dtype)`` rows."""
    return (x.is_cpu and weight.stride(1) == 1 and x.numel() <= _linear_rows().get(x.dtype, 0) * weight.shape[1]
            and (bias is None or bias.is_contiguous()))


def _check_linear(x, weight, bias) -> None:
    if (type(x) in _PLAIN and type(weight) in _PLAIN and x.dtype in _FLOATS and weight.dtype == x.dtype
            and weight.dim() == 2 and x.dim() > 0 and x.shape[-1] == weight.shape[1] and x.numel() > 0
            and weight.numel() > 0 and x.device == weight.device
            and (bias is None or (type(bias) in _PLAIN and bias.dtype == x.dtype and bias.dim() == 1
                                  and bias.shape[0] == weight.shape[0] and bias.device == x.device))):
        return
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    if bias is not None:
        _check_tensor(bias, "bias")
        _check_same_device(x=x, weight=weight, bias=bias)
        _check_same("dtype", x=x, weight=weight, bias=bias)
    else:
        _check_same_device(x=x, weight=weight)
        _check_same("dtype", x=x, weight=weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must equal weight's in_features ({weight.shape[1]}), got x of shape "
                         f"{tuple(x.shape)} for weight of shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be 1-D with weight's out_features ({weight.shape[0]}) elements, got shape "
                         f"{tuple(bias.shape)}")


def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fn = _local.direct.get("linear")
    if (fn is not None and x.is_cpu and not _function_mode() and weight.dim() == 2 and weight.stride(1) == 1
            and 0 < x.numel() <= weight.shape[1] * _LINEAR_ROWS.get(x.dtype, 0)
            and (bias is None or bias.is_contiguous())):
        out = _call_direct(fn, _K_LINEAR, x, weight, bias)
        if out is not None:
            return out
    _check_linear(x, weight, bias)
    if backends.select("linear", x.device, cpp=_linear_cpp_ok(x, weight, bias)) == "cpp":
        return torch.ops.llmkern_C.linear(x, weight, bias)
    # The reference: no backend but cpp implements linear (backends.IMPLEMENTS). contiguous() is a no-op except for
    # the odd input layout where F.linear returns a strided result; the fake implementation promises a contiguous one.
    return F.linear(x, weight, bias).contiguous()


def _linear_fake(x, weight, bias):
    _check_linear(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_library.define("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", _linear_op, _linear_fake)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, as ``torch.nn.functional.linear``; on CPU, decode-sized inputs run a C++ kernel that
    streams the weight at memory speed.

    Args:
        x: ``[..., K]`` fp32/fp16/bf16, any strides.
        weight: ``[N, K]`` (``nn.Linear.weight``), x's dtype and device.
        bias: ``[N]`` or None, x's dtype and device.

    Returns:
        ``[..., N]`` contiguous, x's dtype.

    Backend: ``cpp`` for CPU tensors when the extension has a kernel for the dtype on this CPU (fp32 and bf16 on
    AVX2 and AVX-512 CPUs), ``weight.stride(1) == 1`` and x has at most ``linear_max_rows(dtype)`` rows
    (``x.numel() // K``; 64 in fp32; in bf16 32 where the CPU has AVX512-BF16, else 16); otherwise ``reference``
    (``F.linear``).

    Rounding (bf16): the C++ kernel accumulates in fp32, adds the bias in fp32 and rounds once, as torch's CPU GEMM
    does, but sums in another order, so a few elements differ from ``F.linear``'s by one ulp. Guarantee: the
    tolerance rule with the ulp of ``sum|x * w|`` (README.md, "Where fp16/bf16 results are rounded"). The reference
    path is ``F.linear`` itself.

    Example:
        >>> x = torch.randn(1, 1, 576); w = torch.randn(1536, 576)
        >>> y = llmkern.ops.linear(x, w)  # [1, 1, 1536]
    """
    if (type(x) in _PLAIN and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN)
            and not _is_compiling() and not (_grad_enabled() and (
                x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))):
        return _linear_op(x, weight, bias)
    _require_tensors(x=x, weight=weight)
    if bias is not None:
        _require_tensors(bias=bias)
    return torch.ops.llmkern.linear(x, weight, bias)


# --------------------------------------------------------------------------------------------------------------------
# Autograd. The row ops' backward recomputes the op's pure-torch reference (llmkern.reference: HF eager's formula and
# casting order) from the saved inputs and differentiates it, so a patched model's gradients are eager's gradients
# (the same graph, in the same dtypes). That costs one extra forward of the op in the backward, which is cheap next to
# the Linears; a fused backward kernel (Liger-Kernel's) would save it. linear's backward is closed form: two GEMMs.


def _vjp(reference_fn, inputs: tuple, needs: tuple, grads: tuple) -> tuple:
    """Gradients of ``reference_fn(*inputs)`` with respect to the inputs flagged in ``needs``, given the output
    gradients ``grads`` (None for an output nobody differentiated). None for an input that needs none."""
    if not any(needs):
        return (None,) * len(inputs)
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip(inputs, needs)]
        outs = reference_fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        # The reference may promote (fp32 cos/sin with bf16 q); the op returns its outputs in the grads' dtypes.
        pairs = [(o.to(g.dtype), g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [leaf for leaf, n in zip(leaves, needs) if n]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                   if pairs else [None] * len(wanted))
    return tuple(next(got) if n else None for n in needs)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))
    ctx.scalars = tuple(t for t in inputs if not isinstance(t, torch.Tensor))


def _rms_norm_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    eps, offset = ctx.scalars
    return (*_vjp(lambda a, w: reference.rms_norm(a, w, eps, offset), (x, weight), ctx.needs_input_grad[:2],
                  (grad,)), None, None)


def _fused_add_rms_norm_backward(ctx, grad_normed, grad_residual):
    x, residual, weight = ctx.saved_tensors
    (eps,) = ctx.scalars
    return (*_vjp(lambda a, r, w: reference.fused_add_rms_norm(a, r, w, eps), (x, residual, weight),
                  ctx.needs_input_grad[:3], (grad_normed, grad_residual)), None)


def _apply_rope_backward(ctx, grad_q, grad_k):
    return _vjp(reference.apply_rope, ctx.saved_tensors, ctx.needs_input_grad, (grad_q, grad_k))


def _silu_and_mul_backward(ctx, grad):
    return _vjp(reference.silu_and_mul, ctx.saved_tensors, ctx.needs_input_grad, (grad,))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    g2 = grad.reshape(-1, grad.shape[-1])  # [rows, N]
    gx = (grad @ weight) if need_x else None  # [..., K]
    gw = (g2.t() @ x.reshape(-1, x.shape[-1])) if need_w else None  # [N, K]
    gb = g2.sum(0) if need_b and ctx.has_bias else None  # [N]
    return gx, gw, gb


for _name, _backward, _setup in (("rms_norm", _rms_norm_backward, _save_inputs),
                                 ("fused_add_rms_norm", _fused_add_rms_norm_backward, _save_inputs),
                                 ("apply_rope", _apply_rope_backward, _save_inputs),
                                 ("silu_and_mul", _silu_and_mul_backward, _save_inputs),
                                 ("linear", _linear_backward, _linear_setup)):
    torch.library.register_autograd(f"llmkern::{_name}", _backward, setup_context=_setup, lib=_library.LIB)
