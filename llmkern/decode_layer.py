"""A decoder layer's decode step (one new token per sequence, CPU) in one Python function instead of the module tree.

Why: at short context a patched SmolLM2-135M decode step spent about 4.8 ms of ~17 ms outside every kernel (AMD
EPYC, 2 threads, bf16, 128 tokens), ~135 µs per layer: eleven ``nn.Module.__call__``s (hook checks, kwargs),
transformers' attention forward (views, config lookups, the attention-interface lookup) and llmkern's wrappers.
Measured with a 30-layer model of 64-wide projections, where the kernels cost nearly nothing (README.md, "Where a
128-context decode step goes"). This path runs the same kernels, on the same inputs, in the same order, with the
Python in between cut to what the arithmetic needs, so its result is bit for bit the module path's.

When it runs (``run``; anything else takes the module path, which is always correct):

* ``llmkern.patch`` installed every kernel on the layer (RMSNorm, the fused residual norm, RoPE, SwiGLU, the CPU
  Linear, paged attention) and the layer's attention class has the Llama/Qwen2/Mistral/Qwen3 shape (q/k/v/o
  projections, optional q_norm/k_norm over head_dim). ``install`` records that per layer; ``uninstall`` removes it.
* This call: one token per row on CPU, no grad mode, not traced or compiled, no TorchFunctionMode, the layer in
  eval mode, the cache a ``PagedKVCache`` whose plan is a decode step, no ``output_attentions``, and no hook
  anywhere in the layer (forward/backward hooks or pre-hooks on any of its modules, global module hooks, a
  forward set on an instance): a hook must see its module called, so the layer then takes the module path.
* The lookahead: once a layer of the step ran this path with its C++ calls, the verified layers after it run in one
  more C++ call, each taking its output when the model's loop calls it (see the comment above ``_take``).
* Verified: a layer's first decode step runs the module path, records the attention's scale, sliding window and
  softcap as transformers passed them, and runs this path beside it; q/k/v and the layer's output must be equal bit
  for bit. Only then do later steps take it. A transformers release whose attention forward does something this
  path does not (another projection, another norm) therefore gets a ``UserWarning`` naming the layer and keeps the
  module path — never a silent difference.
"""

from __future__ import annotations

import collections
import itertools
import operator
import warnings

import torch
from torch.nn.modules import module as _module_mod
from torch.utils.hooks import RemovableHandle as _RemovableHandle

from llmkern import attention, backends, ops
from llmkern.cache import PagedKV, PagedKVCache

_ATTR = "_llmkern_decode_layer"

_is_compiling = torch.compiler.is_compiling
_function_mode = torch._C._is_torch_function_mode_enabled
_grad_enabled = torch.is_grad_enabled
_tracing = torch._C._get_tracing_state
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_FORWARD = itertools.repeat("forward")  # a forward set on an instance is in its __dict__
_DICT = operator.attrgetter("__dict__")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


class LayerState:
    """What ``run`` needs of one patched decoder layer, gathered once at patch time."""

    __slots__ = ("layer", "attn", "config_vars", "modules", "classes", "hooks_seen", "params", "in_norm",
                 "post_norm", "q_norm", "k_norm", "layer_idx", "head_dim", "scalars", "verified", "disabled", "steps",
                 "fused_steps", "stack", "index")

    def __init__(self, layer, q_norm, k_norm):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn = layer, attn
        # The config's instance dict: transformers' config __getattribute__ costs ~1 µs per read, even of __dict__.
        self.config_vars = vars(attn.config)
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        norms = (self.in_norm, self.post_norm) + tuple(n for n in (q_norm, k_norm) if n is not None)
        self.modules = (layer, attn, mlp) + linears + norms
        self.classes = tuple(type(m) for m in self.modules)
        self.hooks_seen = None  # RemovableHandle.next_id when the modules last had no hook (see _hooked)
        # Each Linear's parameter dict: read at every call (a weight assigned anew is seen), without
        # nn.Module.__getattr__ (about 1 µs per attribute, 10 per layer).
        self.params = tuple(m._parameters for m in linears)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scalars = None  # (scale, window, softcap) as the module path passed them, once verified
        self.verified = False
        self.disabled = False
        self.steps = 0  # decode steps this layer ran through the fast path (tests read it)
        self.fused_steps = 0  # of which both C++ calls (decode_layer_qkv / decode_layer_rest) ran
        self.stack: Stack | None = None  # the model's patched layers in order (install), and this one's place
        self.index = 0


class Stack:
    """The layers ``install`` was given, in the model's order (None where a layer is not eligible), and the outputs
    of a lookahead that has run ahead of the model's loop (``run``)."""

    __slots__ = ("states", "pending", "lookahead", "runs")

    def __init__(self, states: list):
        self.states = states
        self.pending: _Pending | None = None
        self.lookahead = True  # tests turn it off to compare
        self.runs = 0  # lookaheads run (tests read it)


class _Pending:
    """A lookahead's outputs: layer ``states[start + j]``'s is ``outs[j]``, handed out while the model's loop calls
    the next layer with the previous output and the same step arguments."""

    __slots__ = ("start", "next", "outs", "expect", "pe", "cache", "mask", "hooks", "handle", "ids")

    def __init__(self, start, outs, expect, pe, cache, mask, hooks, handle, ids):
        self.start = self.next = start
        self.outs, self.expect, self.pe, self.cache, self.mask, self.hooks = outs, expect, pe, cache, mask, hooks
        self.handle, self.ids = handle, ids  # the plan's layer handle, and the cache's layer of each output

    def drop(self) -> None:
        """Give the cache back the layers not taken: their own update() comes next (llmkern/cache, leave)."""
        self.cache.leave(self.handle, self.ids[self.next - self.start:])


def eligible(layer) -> tuple[bool, str]:
    """Whether ``install`` can record ``layer`` (after ``patch`` swapped its classes), and why not."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim"):
        if not hasattr(attn, name):
            return False, f"its attention has no {name}"
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if (q_norm is None) != (k_norm is None):
        return False, "its attention has one of q_norm/k_norm but not the other"
    # Every module must run llmkern's kernel (its class is a patched one) so that both paths call the same ops.
    labels = {"linear": (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                         mlp.down_proj),
              "rms_norm": (layer.input_layernorm,) + ((q_norm, k_norm) if q_norm is not None else ()),
              "silu_and_mul": (mlp,), "apply_rope": (attn,), "fused_add_rms_norm": (layer,)}
    for label, mods in labels.items():
        for m in mods:
            if f"llmkern={label}" not in m.extra_repr():
                return False, f"{type(m).__name__} does not run llmkern's {label}"
    return True, ""


def states(model) -> list:
    """The ``LayerState`` of each of ``model``'s layers that ``patch`` recorded (empty when none)."""
    return [m.__dict__[_ATTR] for m in model.modules() if _ATTR in m.__dict__]


def install(layers) -> list:
    """Record the eligible ``layers``; returns the undo callables (one per layer)."""
    undo, states = [], []
    stack = Stack(states)
    for layer in layers:
        ok, _ = eligible(layer)
        if not ok:
            states.append(None)
            continue
        attn = layer.self_attn
        state = LayerState(layer, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
        state.stack, state.index = stack, len(states)
        states.append(state)
        layer.__dict__[_ATTR] = state
        undo.append(lambda m=layer: m.__dict__.pop(_ATTR, None))
    return undo


def _hooked(state: LayerState) -> bool:
    """Whether a hook, a class change or an instance ``forward`` means the layer's modules must be called.

    The hook dicts of the layer's modules are read only when a hook was registered anywhere since they were last
    found empty: every ``register_*hook`` takes a ``RemovableHandle``, whose class counter ``next_id`` moves (1.6 µs
    per call instead of 3.4 for reading 56 dicts, measured on Qwen3's 14 modules). A hook put into a module's hook
    dict by hand, without ``register_*hook``, is not seen until the next registration anywhere."""
    for name in _GLOBAL_HOOKS:
        if getattr(_module_mod, name, None):
            return True
    mods = state.modules
    if tuple(map(type, mods)) != state.classes or any(map(dict.__contains__, map(_DICT, mods), _FORWARD)):
        return True
    registered = _RemovableHandle.next_id
    if state.hooks_seen == registered:
        return False
    for m in mods:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
    state.hooks_seen = registered
    return False


def _usable(state: LayerState, x, kwargs) -> PagedKVCache | None:
    """The call's cache when this call may take the fast path (module docstring), else None."""
    if (state.disabled or type(x) not in _PLAIN or x.dim() != 3 or x.shape[1] != 1 or not x.is_cpu
            or _grad_enabled() or _is_compiling() or _function_mode() or _tracing() is not None
            or state.layer.training or kwargs.get("output_attentions")):
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if not isinstance(cache, PagedKVCache):
        return None
    pe = kwargs.get("position_embeddings")
    if not isinstance(pe, tuple) or len(pe) != 2 or pe[0].dim() != 3:
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, attention.PagedMask) and not mask.custom):
        return None
    # config._attn_implementation is a property over this attribute (patching.HF_INTERNALS["attention_interface"]);
    # read directly, it costs 0.05 µs instead of 2.
    if state.config_vars.get("_attn_implementation_internal") != attention.NAME or _hooked(state):
        return None
    return cache


def _norm(m):
    return m._parameters["weight"], m.variance_epsilon


def _qkv(state: LayerState, x, cos, sin):
    """The attention's input norm, projections, q/k norms and RoPE: ``q, k [B, H, 1, D]`` (rope applied), ``v``."""
    B = x.shape[0]
    D = state.head_dim
    h = ops._rms_norm_op(x, *_norm(state.in_norm), 0.0)
    pq, pk, pv = state.params[:3]
    q = ops._linear_op(h, pq["weight"], pq.get("bias")).view(B, 1, -1, D)
    k = ops._linear_op(h, pk["weight"], pk.get("bias")).view(B, 1, -1, D)
    v = ops._linear_op(h, pv["weight"], pv.get("bias")).view(B, 1, -1, D)
    if state.q_norm is not None:
        q = ops._rms_norm_op(q, *_norm(state.q_norm), 0.0)
        k = ops._rms_norm_op(k, *_norm(state.k_norm), 0.0)
    q, k = ops._apply_rope_op(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v.transpose(1, 2)


def _rest(state: LayerState, x, attn_out):
    """o_proj, the residual add + post-attention norm, the MLP and the last residual add."""
    po, pg, pu, pd = state.params[3:]
    a = ops._linear_op(attn_out.reshape(x.shape[0], 1, -1), po["weight"], po.get("bias"))
    h, residual = ops._fused_add_rms_norm_op(a, x, *_norm(state.post_norm))
    m = ops._silu_and_mul_op(ops._linear_op(h, pg["weight"], pg.get("bias")),
                             ops._linear_op(h, pu["weight"], pu.get("bias")))
    return residual + ops._linear_op(m, pd["weight"], pd.get("bias"))


def _attend(state: LayerState, cache: PagedKVCache, plan, handle: PagedKV, q):
    """The paged attention over the step's plan (made once per layer: llmkern/attention.py, attend_planned)."""
    return attention.attend_planned(cache, plan, handle, q, *state.scalars)  # [B, 1, Hq, D]


def _plan(cache: PagedKVCache, handle: PagedKV, kwargs):
    mask = kwargs.get("attention_mask")
    return cache.plan(handle, None if mask is None else mask.attention_mask)


def run(layer, x: torch.Tensor, kwargs: dict, slow):
    """The layer's output for a decode step through the fast path, or ``slow(layer, x, kwargs)`` (the module
    path) where it may not run (module docstring). ``slow`` is the patched decoder layer's module-path body."""
    state = layer.__dict__.get(_ATTR)
    if state is None:
        return slow(layer, x, kwargs)
    if state.stack.pending is not None:
        out = _take(state, x, kwargs)
        if out is not None:
            return out
    cache = _usable(state, x, kwargs)
    if cache is None:
        return slow(layer, x, kwargs)
    if not state.verified:
        return _verify(state, layer, x, kwargs, cache, slow)
    cos, sin = kwargs["position_embeddings"]
    state.steps += 1
    fused = _fused_ok(x)
    qkv = _fused_qkv(state, x, cos, sin) if fused else None
    q, k, v = qkv if qkv is not None else _qkv(state, x, cos, sin)
    handle, _ = cache.update(k, v, state.layer_idx)
    plan = _plan(cache, handle, kwargs)
    if fused:
        out = _fused_rest(state, x, q, k, v, cache, plan)
        if out is not None:
            if qkv is not None:
                state.fused_steps += 1
                _record(_K_QKV[state.q_norm is not None][1])
                _ahead(state, out, handle, plan, cache, kwargs)
            else:
                _record(_K_REST)
            return out
    if qkv is not None:
        _record(_K_QKV[state.q_norm is not None][0])
    out = _rest(state, x, _attend(state, cache, plan, handle, q))
    if qkv is not None:  # the step's first layer: its attention cleared the direct C++ calls for the layers after it
        _ahead(state, out, handle, plan, cache, kwargs)
    return out


# --------------------------------------------------------------------------------------------------------------------
# The lookahead. The Python of a fused layer's call (the checks above, the cache's update and plan, two C++ calls and
# their argument lists) cost about 60 µs per layer, ~2 ms of an 11 ms SmolLM2 bf16 step at 128 tokens. So once a
# layer's step ran its C++ q/k/v call and its attention (directly, or at the step's first layer through the full
# path, which clears the direct calls for the layers after it), the layers after it run in one more C++ call,
# decode_layers, which chains the same two functions over them: the result of each layer is the one its own two calls
# would give, bit for bit. It stops before the first layer that is unverified, hooked, in training, or has an
# attention (scale, window, softcap) the step has not cleared for the direct calls. The model's loop still calls every
# layer: each takes its precomputed output when its input is the object the previous layer returned, the step's
# arguments (cache, rotary cos/sin, padding mask) are the same objects, and no hook was registered anywhere since;
# otherwise the rest of the lookahead is dropped, the cache gets those layers back, and they run as they would have
# (their page writes are the same slots of the same plan, written again).


def _cache_arg(kwargs):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _mask_arg(kwargs):
    mask = kwargs.get("attention_mask")
    return None if mask is None else mask.attention_mask


def _take(state: LayerState, x, kwargs):
    """This layer's output from the pending lookahead, or None (the lookahead is then dropped)."""
    stack = state.stack
    p = stack.pending
    if (p.next != state.index or x is not p.expect or kwargs.get("position_embeddings") is not p.pe
            or _cache_arg(kwargs) is not p.cache or _mask_arg(kwargs) is not p.mask
            or _RemovableHandle.next_id != p.hooks or _grad_enabled() or state.layer.training):
        stack.pending = None
        p.drop()
        return None
    out = p.outs[p.next - p.start]
    p.next += 1
    if p.next - p.start == len(p.outs):
        stack.pending = None
    else:
        p.expect = out
    state.steps += 1
    state.fused_steps += 1
    _record(_K_QKV[state.q_norm is not None][1])
    return out


def _joins(state: LayerState, s: LayerState | None, direct) -> bool:
    """Whether layer state ``s`` may join a lookahead after ``state``'s (the module docstring's conditions, which
    ``_usable`` checked for ``state`` and the step's arguments)."""
    return (s is not None and s.verified and not s.disabled and s.scalars in direct and s.head_dim == state.head_dim
            and not s.layer.training and s.config_vars.get("_attn_implementation_internal") == attention.NAME
            and not _hooked(s))


def _ahead(state: LayerState, out, handle: PagedKV, plan, cache: PagedKVCache, kwargs) -> None:
    """Run the layers after ``state``'s on ``out`` in one C++ call and keep their outputs (the lookahead)."""
    stack = state.stack
    if stack.pending is not None:  # not taken to its end (a layer the loop skipped): the cache gets the rest back
        stack.pending.drop()
        stack.pending = None
    states, direct = stack.states, plan.direct
    if not stack.lookahead or not plan.decode or "layers" not in _C:
        return
    i = j = state.index + 1
    while j < len(states) and _joins(state, states[j], direct):
        j += 1
    if j == i:
        return
    group = states[i:j]
    ids = [s.layer_idx for s in group]
    if not cache.can_enter(handle, ids):
        return
    rows = []
    for s in group:
        kv, scales, scalars, weights = _rest_args(s, cache, plan)
        rows.append((*_qkv_args(s), *kv, *scales, *scalars, *weights))
    cols = [list(c) for c in zip(*rows)]  # decode_layers' per-layer lists, in its order
    cos, sin = kwargs["position_embeddings"]
    try:
        outs = _C["layers"](out, cos, sin, state.head_dim, plan.slot_mapping, plan.block_tables, plan.seq_lens,
                            *cols)
    except RuntimeError:
        return  # the layers run one by one and raise the error that names the input (their page writes redone)
    cache.enter(handle, ids)
    stack.runs += 1
    stack.pending = _Pending(i, outs, out, kwargs.get("position_embeddings"), cache, _mask_arg(kwargs),
                             _RemovableHandle.next_id, handle, ids)


# --------------------------------------------------------------------------------------------------------------------
# The two C++ calls (csrc/torch_bindings.cpp, decode_layer_qkv / decode_layer_rest): the same kernels the ops above
# call, chained in C++, for when every one of those ops would take its C++ kernel directly (ops.py's direct path):
# the CPU backend chosen for all five row ops, a dtype the C++ Linear serves and at most linear_max_rows rows. Either
# call raising (an input a kernel refuses) falls back to the Python sequence, which raises the error that names it.

_ROW_OPS = frozenset({"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul", "linear"})
_C: dict = {}


def _fused_ok(x) -> bool:
    if not _ROW_OPS <= ops._local.direct.keys():
        return False
    return x.shape[0] <= ops._LINEAR_ROWS.get(x.dtype, 0) and (bool(_C) or _resolve())


def _resolve() -> bool:
    """Fill ``_C`` with the two ops; False for an extension built before them (the Python sequence then runs)."""
    lib = torch.ops.llmkern_C
    if not hasattr(lib, "decode_layer_rest"):
        return False
    _C.update(qkv=lib.decode_layer_qkv.default, rest=lib.decode_layer_rest.default)
    if hasattr(lib, "decode_layers"):  # an extension built before it: no lookahead
        _C["layers"] = lib.decode_layers.default
    return True


def _record(calls) -> None:
    """Count the kernel calls a C++ call made (``(op, backend), n`` pairs) as the ops would have counted them."""
    counts, trackers = backends._counts, backends._trackers
    for key, n in calls:
        counts[key] = counts.get(key, 0) + n
        for t in trackers:
            t[key] += n


def _calls(*keys) -> tuple:
    return tuple(collections.Counter(keys).items())


_QKV = (ops._K_RMS_NORM, ops._K_LINEAR, ops._K_LINEAR, ops._K_LINEAR, ops._K_APPLY_ROPE)
_NORMS = (ops._K_RMS_NORM, ops._K_RMS_NORM)
_REST = (attention._WRITE_CPP, attention._DECODE_CPP, ops._K_LINEAR, ops._K_FUSED_ADD_RMS_NORM, ops._K_LINEAR,
         ops._K_LINEAR, ops._K_SILU_AND_MUL, ops._K_LINEAR)
# [q/k norms][rest fused too]: what the layer's C++ calls ran, recorded once per layer and step.
_K_QKV = ((_calls(*_QKV), _calls(*_QKV, *_REST)), (_calls(*_QKV, *_NORMS), _calls(*_QKV, *_NORMS, *_REST)))
_K_REST = _calls(*_REST)


def _qkv_args(state: LayerState) -> tuple:
    """A layer's own arguments of decode_layer_qkv (between x and cos): the input norm, q/k/v weights and biases,
    the q/k norms (None and 0.0 without them). decode_layers takes the same, one list per position."""
    pq, pk, pv = state.params[:3]
    nw, ne = _norm(state.in_norm)
    if state.q_norm is not None:
        (qw, qe), (kw, ke) = _norm(state.q_norm), _norm(state.k_norm)
    else:
        qw = kw = None
        qe = ke = 0.0
    return (nw, ne, pq["weight"], pq.get("bias"), pk["weight"], pk.get("bias"), pv["weight"], pv.get("bias"), qw, kw,
            qe, ke)


def _rest_args(state: LayerState, cache: PagedKVCache, plan) -> tuple:
    """A layer's own arguments of decode_layer_rest: its pages (k, v), their 8-bit scales (k, v), the attention's
    scalars (scale, window, softcap, split count) and the o/norm/MLP weights, as four tuples."""
    scale, window, softcap = state.scalars
    pages = cache.layer_pages(state.layer_idx)
    po, pg, pu, pd = state.params[3:]
    pw, pe = _norm(state.post_norm)
    return ((pages.k, pages.v), (pages.k_scales, pages.v_scales),
            (scale, window or 0, softcap or 0.0, plan.num_splits.get(window) or 0),
            (po["weight"], po.get("bias"), pw, pe, pg["weight"], pg.get("bias"), pu["weight"], pu.get("bias"),
             pd["weight"], pd.get("bias")))


def _fused_qkv(state: LayerState, x, cos, sin):
    try:
        return _C["qkv"](x, *_qkv_args(state), cos, sin, state.head_dim)
    except RuntimeError:
        return None


def _fused_rest(state: LayerState, x, q, k, v, cache: PagedKVCache, plan):
    if not plan.decode or state.scalars not in plan.direct:
        return None  # the step's first layer: the attention's full path decides (llmkern/attention.py, _decode)
    kv, scales, scalars, weights = _rest_args(state, cache, plan)
    try:
        return _C["rest"](x, q, k, v, *kv, plan.slot_mapping, plan.block_tables, plan.seq_lens, *scalars, *scales,
                          *weights)
    except RuntimeError:
        return None  # the K/V write is idempotent: the Python sequence redoes it


def _verify(state: LayerState, layer, x, kwargs, cache, slow):
    """The layer's first decode step: the module path (its result is returned), then this path beside it."""
    seen = attention._capture = {}
    try:
        out = slow(layer, x, kwargs)
    finally:
        attention._capture = None
    got = seen.get(state.attn)
    if got is None:  # the module path did not reach the paged decode (not a decode plan): decide next time
        return out
    state.scalars, q_ref, handle_ref, plan = got[:3], got[3], got[4], got[5]
    cos, sin = kwargs["position_embeddings"]
    # The check's kernel calls are not the model's: llmkern.track() and llmkern.backends.counts() keep the module
    # path's counts only.
    counts, trackers = dict(backends._counts), [dict(t) for t in backends._trackers]
    try:
        why = _compare(state, x, cos, sin, q_ref, handle_ref, cache, plan, out)
    finally:
        backends._counts.clear()
        backends._counts.update(counts)
        for t, saved in zip(backends._trackers, trackers):
            t.clear()
            t.update(saved)
    if why is None:
        state.verified = True
    else:
        state.disabled = True
        warnings.warn(f"llmkern: the fused decode step of {type(layer).__name__} {state.layer_idx} is off: {why} "
                      f"on this transformers release (llmkern/decode_layer.py). The layer keeps the module path, "
                      f"which is correct but slower; please report it.", UserWarning, stacklevel=3)
    return out


def _compare(state: LayerState, x, cos, sin, q_ref, handle_ref, cache, plan, out) -> str | None:
    """Why this path's step differs from the module path's (``q_ref``, ``handle_ref``, ``out``), or None."""
    q, k, v = _qkv(state, x, cos, sin)
    why = None
    if not (torch.equal(q, q_ref) and torch.equal(k, handle_ref.key) and torch.equal(v, handle_ref.value)):
        why = "its query/key/value differ from the attention forward's"
    else:
        # Same K/V: the page write the attention repeats stores the same values again, over the module path's plan
        # (planning again would advance a reserved cache a second column).
        handle = PagedKV(cache, state.layer_idx, k, v, handle_ref.step)
        if not torch.equal(_rest(state, x, _attend(state, cache, plan, handle, q)), out):
            why = "its output differs from the module path's"
    return why
