"""``llmkern.patch(model)`` / ``llmkern.unpatch(model)``: put fused kernels into ONE Hugging Face model instance.

How, without touching the model's class or any module global (another model of the same class in the same process
keeps running eager):

* Each patched submodule gets a new class: a subclass of its own class, made once per original class, whose
  ``forward`` calls the kernel (``module.__class__ = Llmkern<Orig>``). Parameters, buffers and state_dict keys are
  untouched, ``isinstance`` still holds, ``print(model)`` shows the new class names, and ``unpatch`` puts the
  original classes back — so the model computes bit for bit what it computed before.
* RMSNorm modules run ``ops.rms_norm``. A decoder layer's ``residual + attn_out`` and its post-attention norm run
  as one ``ops.fused_add_rms_norm``. The MLP's ``act(gate) * up`` runs ``ops.silu_and_mul``.
* RoPE: HF's attention ``forward`` calls the module-global ``apply_rotary_pos_emb`` at call time. The patched
  attention class gets a copy of that very ``forward`` whose globals map ``apply_rotary_pos_emb`` to
  ``ops.apply_rope`` — the module's globals themselves are not modified.
* The decoder layers' ``nn.Linear`` projections and the ``lm_head`` run ``ops.linear`` (a C++ GEMV for decode-sized
  inputs on CPU; ``F.linear`` otherwise).
* A CPU layer with every kernel installed also gets a fast path for its decode steps (``llmkern/decode_layer.py``:
  the same kernels in one function and two C++ calls, checked bit for bit against the module path on the layer's
  first decode step); ``unpatch`` removes it with the rest.

Nothing is skipped silently: a kernel that was asked for (explicitly or by default) and could not be installed on a
module is a warning naming the module and the reason, and ``patch(model, strict=True)`` raises ``PatchError``
instead.

What this file relies on in transformers' internals (``HF_INTERNALS`` below lists each with the versions it was
checked against; a test walks the list). When a release changes one of them, the kernel concerned is reported as not
installed — never silently dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
import weakref

import torch
from torch import nn

from llmkern import decode_layer, ops

# model_type -> modeling module; the same decoder structure holds for all four.
SUPPORTED = {
    "llama": "transformers.models.llama.modeling_llama",
    "qwen2": "transformers.models.qwen2.modeling_qwen2",
    "mistral": "transformers.models.mistral.modeling_mistral",
    "qwen3": "transformers.models.qwen3.modeling_qwen3",
}
SUPPORTED_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM",
                     "LlamaModel", "Qwen2Model", "MistralModel", "Qwen3Model")

_STATE_ATTR = "_llmkern_patch_state"
_DECODE_LAYER_ATTR = decode_layer._ATTR

# The transformers internals patch() depends on, with the releases each was checked against (tests/test_patch.py
# checks every entry on the installed release).
HF_INTERNALS = {
    "apply_rotary_pos_emb": "the attention forward (below any decorator, e.g. 5.24's @deprecate_kwarg) calls the "
                            "module-global apply_rotary_pos_emb(q, k, cos, sin) with q/k [B, H, S, D] and cos/sin "
                            "[B, S, rotary_dim]; a decorator holds the function it wraps in a closure cell "
                            "(functools.wraps). Checked: 5.4 (the floor, undecorated), 5.24 and 5.25 "
                            "(@deprecate_kwarg).",
    "decoder_layer": "a decoder layer has input_layernorm, self_attn, post_attention_layernorm, mlp and computes "
                     "x + attn(norm(x)), then h + mlp(norm(h)); its forward takes hidden_states plus keywords and "
                     "hands them to self_attn (the cache as past_key_values up to 5.23, as cache from 5.24); the "
                     "layers are `layers` of model.base_model (.model, or .transformer for *ForQuestionAnswering). "
                     "Checked: 5.4 (the floor), 5.24 and 5.25.",
    "rms_norm": "RMSNorm modules have .weight and .variance_epsilon; variance in fp32, cast back before the weight. "
                "Checked: 5.4 (the floor), 5.24 and 5.25.",
    "mlp": "the MLP has gate_proj/up_proj/down_proj and act_fn (SiLU): down(act(gate(x)) * up(x)). "
           "Checked: 5.4 (the floor), 5.24 and 5.25.",
    "attention_interface": "AttentionInterface / AttentionMaskInterface registration and "
                           "model.set_attn_implementation(name), which writes config._attn_implementation_internal "
                           "(llmkern/attention.py); each modeling file's eager_attention_forward and masking_utils' "
                           "eager_mask (output_attentions=True); create_masks_for_generate(config=..., ...). "
                           "Checked: 5.4 (the floor), 5.24 and 5.25.",
    "continuous_batching": "model.init_continuous_batching(...) (what generate_batch and transformers serve call) "
                           "builds a manager that accepts only transformers' attention names and ends a session "
                           "with manager.stop(...) (llmkern/attention.py wraps it on the instance). Checked: 5.4 "
                           "(switches to 'paged|sdpa'), 5.17 and 5.25. llmkern's kernels run the attention over the "
                           "engine's pages (llmkern/continuous.py, which lists what it reads: "
                           "manager._create_batch_processor, PagedAttentionCache.update(key_states, value_states, "
                           "layer_idx, kwargs) and .extend_read_and_write_indices(...), the allocators' block_table, "
                           "_kv_token_views, tokens_per_page, block_physical_stride, sliding_window) on 5.25, and "
                           "on 5.17 (whose engine hands 'paged|<name>' attention functions the cache) its "
                           "group_cache_managers, layer_index_to_group_indices and key_cache/value_cache; a release "
                           "with neither keeps 'sdpa' with a warning naming what is missing.",
    "decode_layer": "a decoder layer receives position_embeddings=(cos, sin) and the cache (cache or past_key_values) "
                    "as keywords, and its attention computes q/k/v projections (then q_norm/k_norm on the head view "
                    "where it has them), apply_rotary_pos_emb, cache.update, the attention function, o_proj "
                    "(llmkern/decode_layer.py runs that sequence itself, after checking it bit for bit against the "
                    "module path at each layer's first decode step). Checked: 5.25.",
    "generate_cache_hook": "generate() asks self._prepare_cache_for_generation(generation_config, model_kwargs, "
                           "generation_mode, batch_size, max_cache_length) for its cache (llmkern/attention.py). "
                           "Checked: 5.4 (the floor), 5.24 and 5.25.",
}


class PatchError(RuntimeError):
    """``patch(model, strict=True)`` could not install every kernel it was asked for (the model is left as it was)."""


@dataclasses.dataclass
class PatchReport:
    """What ``patch`` did: ``entries`` are ``(module name, kernel)``; ``skipped`` are ``(what, why)`` for kernels that
    were asked for and could not be installed (each was a warning, or ``PatchError`` with ``strict=True``);
    ``notes`` are ``(what, why)`` for kernels off by default on this model (nothing was asked for, nothing missed);
    ``placement`` are ``(what, how)`` for a model sharded by ``tp_plan`` or spread by ``device_map``
    (``llmkern.attention.Placement``)."""

    model_class: str
    options: dict
    entries: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    placement: list = dataclasses.field(default_factory=list)
    _model: object = dataclasses.field(default=None, repr=False, compare=False)  # weakref to the patched model

    @property
    def attention(self) -> str | None:
        """The attention implementation the model runs now, read from its config (``llmkern_paged`` while llmkern's
        paged attention runs; another name after ``model.set_attn_implementation(...)`` switched away, or with
        ``attention=False``). None once the model is gone."""
        model = self._model() if self._model is not None else None
        return None if model is None else model.config._attn_implementation

    def counts(self) -> dict:
        out: dict = {}
        for _name, kernel in self.entries:
            out[kernel] = out.get(kernel, 0) + 1
        return out

    def modules(self, kernel: str) -> list:
        return [name for name, k in self.entries if k == kernel]

    def __str__(self) -> str:
        lines = [f"llmkern patched {self.model_class}:"]
        for kernel, n in self.counts().items():
            example = self.modules(kernel)[0]
            lines.append(f"  {kernel:<20} {n:>4} modules  (e.g. {example})")
        for what, why in self.skipped:
            lines.append(f"  not patched: {what} — {why}")
        for what, why in self.notes:
            lines.append(f"  off: {what} — {why}")
        for what, how in self.placement:
            lines.append(f"  {what}: {how}")
        impl = self.attention
        if impl is not None:
            from llmkern.attention import NAME

            if not self.options.get("attention"):
                lines.append(f"  attention: transformers' {impl!r} (patched with attention=False)")
            elif impl == NAME:
                lines.append(f"  attention: {impl!r} (llmkern's paged attention; config._attn_implementation)")
            elif impl == "llmkern_cb":
                lines.append(f"  attention: {impl!r} (llmkern's paged attention over a continuous-batching "
                             f"manager's pages, until its stop())")
            else:
                lines.append(f"  attention: {impl!r}, set with set_attn_implementation: llmkern's paged attention is "
                             f"installed but not running (model.set_attn_implementation({NAME!r}) switches back)")
        return "\n".join(lines)


@dataclasses.dataclass
class _PatchState:
    report: PatchReport
    swapped: list  # (module, original class), in patch order
    extra_undo: list  # callables, run in reverse order by unpatch


# ---------------------------------------------------------------------------------------------------------------------
# Patched forwards


def _rms_norm_forward(self, hidden_states):
    return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(ops.silu_and_mul(self.gate_proj(x), self.up_proj(x)))


def _decoder_layer_forward(self, hidden_states, *args, **kwargs):
    # transformers' Llama/Qwen2/Mistral/Qwen3 decoder layer with `residual + attn` and the post-attention norm fused.
    # Every argument but hidden_states goes to self_attn as the model passed it, under the names the installed
    # transformers uses (the cache is `past_key_values` up to 5.23 and `cache` from 5.24): naming it here would hand
    # 5.24's attention both names and a FutureWarning per layer and step.
    if args:  # positional extras: name them by the original layer's signature
        kwargs = _name_args(self, args, kwargs)
    if _DECODE_LAYER_ATTR in self.__dict__:  # a fully patched CPU layer: decode steps may skip the module tree
        return decode_layer.run(self, hidden_states, kwargs, _decoder_layer_modules)
    return _decoder_layer_modules(self, hidden_states, kwargs)


def _decoder_layer_modules(self, hidden_states, kwargs):
    """The patched decoder layer's body through its modules (``llmkern/decode_layer.py`` is the fast path)."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    norm = self.post_attention_layernorm
    hidden_states, residual = ops.fused_add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


def _name_args(layer, args: tuple, kwargs: dict) -> dict:
    """Positional arguments after hidden_states, as keywords of the original decoder layer's forward."""
    forward = inspect.unwrap(type(layer)._llmkern_original_class.forward)
    names = [p for p in inspect.signature(forward).parameters if p not in ("self", "hidden_states")]
    if len(args) > len(names):
        raise TypeError(f"{type(layer).__name__}.forward takes at most {len(names) + 1} positional arguments after "
                        f"self, got {len(args) + 1}")
    dup = set(names[:len(args)]) & set(kwargs)
    if dup:
        raise TypeError(f"{type(layer).__name__}.forward got multiple values for {sorted(dup)}")
    return {**dict(zip(names, args)), **kwargs}


def _linear_forward(self, input):
    return ops.linear(input, self.weight, self.bias)


def _make_rope_fn(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if unsqueeze_dim != 1 or q.dim() != 4 or cos.dim() != 3:
            return original(q, k, cos, sin, *args, **kwargs)
        return ops.apply_rope(q, k, cos, sin)

    return apply_rotary_pos_emb


class _CannotPatch(Exception):
    """Why a kernel cannot be installed on a module (becomes a ``skipped`` entry of the report)."""


def _copy_function(fn, *, globals_=None, closure=None):
    new = types.FunctionType(fn.__code__, fn.__globals__ if globals_ is None else globals_, fn.__name__,
                             fn.__defaults__, fn.__closure__ if closure is None else closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)  # functools.wraps' __wrapped__ and friends
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


def _rebind_global(fn, name: str, value):
    """A copy of ``fn`` that sees ``value`` where it looks up the global ``name``; ``fn``'s module is untouched.

    Decorators are seen through (HF_INTERNALS["apply_rotary_pos_emb"]): when ``fn`` wraps another function
    (``__wrapped__``), the innermost function gets the new globals and each wrapper is copied with a closure cell
    that holds the copy below it, so the wrappers (e.g. 5.24's ``@deprecate_kwarg`` renaming ``past_key_values`` to
    ``cache``) keep running. Raises ``_CannotPatch`` when no function in the chain looks ``name`` up or a wrapper
    does not hold what it wraps in a closure cell."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        code = getattr(fn, "__code__", None)
        if code is None or name not in code.co_names:
            raise _CannotPatch(f"its forward ({getattr(fn, '__qualname__', fn)}) does not call {name}")
        return _copy_function(fn, globals_={**fn.__globals__, name: value})
    new_inner = _rebind_global(inner, name, value)
    cells = getattr(fn, "__closure__", None) or ()
    at = [i for i, c in enumerate(cells) if _cell_value(c) is inner]
    if len(at) != 1 or not hasattr(fn, "__code__"):
        raise _CannotPatch(f"its forward is wrapped by {getattr(fn, '__qualname__', fn)!s}, which does not hold the "
                           f"function it wraps in a closure cell; llmkern cannot see through it")
    closure = tuple(types.CellType(new_inner) if i == at[0] else c for i, c in enumerate(cells))
    new = _copy_function(fn, closure=closure)
    new.__wrapped__ = new_inner
    return new


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _rope_forward(original_forward):
    """A copy of ``original_forward`` that sees ``ops.apply_rope`` where it looks up ``apply_rotary_pos_emb``."""
    inner = inspect.unwrap(original_forward)
    if not isinstance(inner, types.FunctionType):
        raise _CannotPatch(f"its forward is a {type(inner).__name__}, not a Python function llmkern can copy")
    original_rope = inner.__globals__.get("apply_rotary_pos_emb")
    if original_rope is None:
        raise _CannotPatch("its forward's module defines no apply_rotary_pos_emb")
    return _rebind_global(original_forward, "apply_rotary_pos_emb", _make_rope_fn(original_rope))


# One patched subclass per (original class, role), so patching many models makes no new classes.
_CLASS_CACHE: dict = {}


def _patched_class(cls: type, role: str, forward, label: str) -> type:
    key = (cls, role)
    if key not in _CLASS_CACHE:
        orig_extra = cls.extra_repr

        def extra_repr(self):
            base = orig_extra(self)
            return f"{base}, llmkern={label}" if base else f"llmkern={label}"

        _CLASS_CACHE[key] = type(f"Llmkern{cls.__name__}", (cls,), {
            "forward": forward, "extra_repr": extra_repr, "_llmkern_original_class": cls,
            "__module__": __name__, "__doc__": f"{cls.__name__} running llmkern's {label} (instance-level patch).",
        })
    return _CLASS_CACHE[key]


def _swap(state: _PatchState, module: nn.Module, new_cls: type) -> None:
    """Give ``module`` the patched class. A forward set on the instance shadows the class's: accelerate's hooks
    (``device_map`` dispatch, offload) keep the real forward in ``_old_forward``, which is pointed at the patched one
    (and back on unpatch); any other instance forward (a tensor-parallel plan's wrapper, a user's hook) would bypass
    the kernel, so the module is reported instead (``_CannotPatch``)."""
    inst = vars(module)
    if "forward" in inst:
        old = inst.get("_old_forward")
        if getattr(old, "__self__", None) is not module or getattr(old, "__func__", None) is not type(module).forward:
            fwd = inst["forward"]
            raise _CannotPatch(f"its forward is set on the instance ({getattr(fwd, '__qualname__', type(fwd).__name__)}"
                               f"), e.g. by a tensor-parallel plan or a hook, and would bypass the kernel")
        state.extra_undo.append(lambda m=module, o=old: setattr(m, "_old_forward", o))
        module._old_forward = types.MethodType(new_cls.forward, module)
    state.swapped.append((module, type(module)))
    module.__class__ = new_cls


def _install(state: _PatchState, report: PatchReport, name: str, module: nn.Module, new_cls: type,
             kernel: str) -> bool:
    """``_swap`` and record it in ``report``: an entry, or a skipped line with the reason. True when installed."""
    try:
        _swap(state, module, new_cls)
    except _CannotPatch as e:
        report.skipped.append((f"{name} ({kernel})", str(e)))
        return False
    report.entries.append((name, kernel))
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Structure checks


def _is_rms_norm(m: nn.Module) -> bool:
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and hasattr(m, "variance_epsilon"))


def _is_silu(act) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _check_supported(model: nn.Module) -> None:
    """A model is supported by its structure, not its class name: a transformers model of a supported model_type
    (any head, any subclass) whose decoder layers have the parts HF_INTERNALS["decoder_layer"] names."""
    from transformers import PreTrainedModel

    cls = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in SUPPORTED:
        raise ValueError(
            f"llmkern.patch supports Hugging Face Llama, Qwen2, Mistral and Qwen3 models "
            f"({', '.join(SUPPORTED_CLASSES)}, their other heads and subclasses: model_type one of "
            f"{sorted(SUPPORTED)}); got {cls} (model_type={model_type!r})")
    _base, layers = _decoder_layers(model)
    for i, layer in enumerate(layers):
        missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
        if missing:
            raise ValueError(f"llmkern.patch: decoder layer {i} of {cls} ({type(layer).__name__}) has no "
                             f"{', '.join(missing)}; expected a Llama-style layer with {', '.join(_LAYER_PARTS)}")


def _decoder_layers(model: nn.Module):
    from llmkern.attention import find_decoder_stack

    base, layers = find_decoder_stack(model)
    if layers is None:
        raise ValueError(f"llmkern.patch: {type(model).__name__} has no decoder layers: looked for a non-empty "
                         f"ModuleList `layers` on its base model ({type(getattr(model, 'base_model', model)).__name__}"
                         f") and for any ModuleList of modules with {', '.join(_LAYER_PARTS)}")
    return base, layers


def _cpp_linear_note(dtype: torch.dtype) -> str | None:
    """None when the C++ decode-sized Linear serves ``dtype`` on this CPU, else why not (in words)."""
    from llmkern import _ext

    if not _ext.load():
        return f"the C++ extension is not loaded ({_ext.why_not()})"
    if not torch.ops.llmkern_C.cpu_linear_supported(dtype):
        return (f"this CPU ({_ext.cpu_isa()}) has no C++ Linear kernel for {str(dtype).replace('torch.', '')}; "
                f"F.linear would run anyway")
    return None


def _device_type(model: nn.Module) -> str | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device.type


def _dtype(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return torch.float32 if param is None else param.dtype


def _check_memory_budget(model: nn.Module, block_size: int, max_memory_bytes: int, kv_dtype=None) -> None:
    """A paged cache of ``max_memory_bytes`` must hold at least one block in every layer (checked here, at patch
    time, rather than at the first generate)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    from llmkern.cache.pool import bytes_per_block, parse_kv_dtype

    per_block = bytes_per_block(cfg.num_hidden_layers, block_size, kv_heads, head_dim, _dtype(model),
                                parse_kv_dtype(kv_dtype))
    if max_memory_bytes < per_block:
        raise ValueError(f"max_memory_bytes must hold at least one {block_size}-token block of K and V in each of the "
                         f"{cfg.num_hidden_layers} layers ({per_block} bytes for this model), got {max_memory_bytes}")


def _check_options(block_size, num_blocks, max_memory_bytes) -> None:
    for name, value, optional in (("block_size", block_size, False), ("num_blocks", num_blocks, True),
                                  ("max_memory_bytes", max_memory_bytes, True)):
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    if num_blocks is not None and max_memory_bytes is not None:
        raise ValueError(f"give num_blocks or max_memory_bytes, not both (got {num_blocks} and {max_memory_bytes})")


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def _attention_active(model: nn.Module) -> bool:
    from llmkern.attention import is_active

    return is_active(model)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def patch(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
          attention: bool | None = None, linear: bool | None = None, block_size: int = 16,
          num_blocks: int | None = None, max_memory_bytes: int | None = None, strict: bool = False,
          kv_dtype: str | torch.dtype | None = None) -> PatchReport:
    """Run llmkern's fused kernels in ``model`` (this instance only). Returns a ``PatchReport``.

    Args:
        model: a Llama, Qwen2, Mistral or Qwen3 model of transformers: ``*ForCausalLM``, the base ``*Model``, other
            heads (``*ForSequenceClassification``, ...) and subclasses of them. Anything else raises ``ValueError``.
        rms_norm: RMSNorm modules → ``ops.rms_norm``; decoder layers' residual add + post-attention norm →
            ``ops.fused_add_rms_norm``.
        rope: the attention's ``apply_rotary_pos_emb`` → ``ops.apply_rope``.
        swiglu: the MLP's ``silu(gate) * up`` → ``ops.silu_and_mul``.
        attention: attention runs llmkern's paged attention (``llmkern.attention``): ``model.generate()`` without a
            ``past_key_values`` argument then decodes over a ``PagedKVCache`` of ``block_size``-token pages, sized
            by ``num_blocks`` / ``max_memory_bytes`` (a fixed pool) or, when neither is given, sized for the
            generate call and grown as a later turn needs (``out.past_key_values`` can be fed back).
            ``None`` (default): on for a model on CUDA or CPU; ``False`` keeps transformers' attention and cache.
        linear: every ``nn.Linear`` in the decoder layers (q/k/v/o and gate/up/down projections) and the
            ``lm_head`` → ``ops.linear``. ``None`` (default): on for a model on a CPU where the C++ decode-sized
            Linear serves the model's dtype (the report's notes say why not otherwise); off on CUDA, where cuBLAS
            already streams the weights at the memory limit.
        kv_dtype: the paged cache's page format (``PagedKVCache``'s ``kv_dtype``): None (the model's dtype, bit for
            bit), ``"int8"`` or ``"fp8_e4m3"`` (8-bit pages with a float16 scale per token and KV head: half the
            bytes at long context, quantization error within README.md's "8-bit KV cache" table).
        strict: raise ``PatchError`` (leaving the model as it was) when a kernel that was asked for cannot be
            installed on some module; by default that is a ``UserWarning`` naming the modules and the reasons.

    Patching twice with the same options returns the first report (unless ``set_attn_implementation`` switched the
    attention away meanwhile: then it patches again, which switches it back); with other options it re-patches, and
    a re-patch that fails leaves the previous patch in place. ``unpatch(model)`` restores the original behaviour bit
    for bit.

    Only this instance changes: its modules' classes, two instance attributes of the model (generate's cache hook)
    and, with attention on, its config — a private copy of it (``llmkern.attention.install``), so that another model
    built from the same config object keeps its attention. ``model.set_attn_implementation(name)`` switches a
    patched model to transformers' ``name`` and back to ``"llmkern_paged"``; ``report.attention`` (and
    ``print(report)``) says which one runs.

    Example:
        >>> report = llmkern.patch(model)
        >>> print(report)
        >>> model.generate(**inputs, max_new_tokens=32)
        >>> llmkern.unpatch(model)
    """
    _check_supported(model)
    _check_options(block_size, num_blocks, max_memory_bytes)
    from llmkern.cache.pool import parse_kv_dtype

    kv = parse_kv_dtype(kv_dtype)  # ValueError naming kv_dtype for anything else
    device_type = _device_type(model)
    if max_memory_bytes is not None and attention is not False:
        _check_memory_budget(model, block_size, max_memory_bytes, kv)
    if kv is not None and attention is False:
        raise ValueError(f"kv_dtype={kv_dtype!r} is the paged cache's page format; it needs attention (patch(model, "
                         f"attention=None or True)), got attention=False")
    if attention is None:
        attention = device_type in ("cpu", "cuda")
    linear_note = None
    if linear is None:
        if device_type == "cpu":
            linear_note = _cpp_linear_note(_dtype(model))
        elif device_type == "cuda":
            linear_note = ("off by default for a model on CUDA (cuBLAS already runs nn.Linear at the memory limit "
                           "there); patch(model, linear=True) uses it")
        linear = device_type == "cpu" and linear_note is None
    options = {"rms_norm": bool(rms_norm), "rope": bool(rope), "swiglu": bool(swiglu), "attention": bool(attention),
               "linear": bool(linear), "block_size": block_size, "num_blocks": num_blocks,
               "max_memory_bytes": max_memory_bytes, "strict": bool(strict),
               "kv_dtype": None if kv is None else str(kv).replace("torch.", "")}
    previous = getattr(model, _STATE_ATTR, None)
    if previous is not None:
        from llmkern.attention import NAME, check_no_batching_session

        check_no_batching_session(model, "llmkern.patch")
        if previous.report.options == options:
            if options["attention"] and not _attention_active(model):  # switched away: switch the copy back
                model.set_attn_implementation(NAME)
            return previous.report
        unpatch(model)
    try:
        report = _apply(model, options, linear_note)
    except BaseException:
        if previous is not None:  # put the previous patch back: a failed re-patch changes nothing
            _apply(model, previous.report.options, dict(previous.report.notes).get("linear"))
        raise
    if report.skipped:
        lines = "\n".join(f"  {what}: {why}" for what, why in report.skipped)
        warnings.warn(f"llmkern.patch({report.model_class}): {len(report.skipped)} requested kernel installation(s) "
                      f"did not happen; those modules run transformers' own code:\n{lines}\n"
                      f"patch(model, strict=True) raises instead; patch(model, <kernel>=False) asks for less.",
                      UserWarning, stacklevel=2)
    return report


def _apply(model: nn.Module, options: dict, linear_note: str | None) -> PatchReport:
    """Install the kernels ``options`` ask for; on any failure (or a skip under ``strict``) undo everything."""
    base, layers = _decoder_layers(model)
    report = PatchReport(model_class=type(model).__name__, options=options, _model=weakref.ref(model))
    from llmkern.attention import placement

    report.placement.extend(placement(model).notes())
    if linear_note is not None:
        report.notes.append(("linear", linear_note))
    state = _PatchState(report=report, swapped=[], extra_undo=[])
    names = {m: n for n, m in model.named_modules()}
    try:
        fused_layers = set()
        if options["rms_norm"]:
            for layer in layers:
                if "forward" in vars(layer.post_attention_layernorm):
                    # A hook of its own (accelerate's offload loads the weight in it): fusing would read the weight
                    # without running the hook. The norm gets the rms_norm kernel below, behind its hook.
                    report.notes.append((f"{names[layer]} (fused_add_rms_norm)",
                                         "its post-attention norm has a forward hook of its own; rms_norm runs there"))
                elif _is_rms_norm(layer.post_attention_layernorm):
                    cls = _patched_class(type(layer), "decoder", _decoder_layer_forward, "fused_add_rms_norm")
                    if _install(state, report, names[layer], layer, cls, "fused_add_rms_norm"):
                        fused_layers.add(layer.post_attention_layernorm)
                else:
                    norm_cls = type(layer.post_attention_layernorm).__name__
                    report.skipped.append((f"{names[layer]} (fused_add_rms_norm)",
                                           f"its post-attention norm is a {norm_cls}, not an RMSNorm with weight and "
                                           f"variance_epsilon"))
            for m in list(model.modules()):
                if m in fused_layers or not _is_rms_norm(m):
                    continue
                _install(state, report, names[m], m, _patched_class(type(m), "rms_norm", _rms_norm_forward,
                                                                     "rms_norm"), "rms_norm")
        if options["rope"]:
            for layer in layers:
                attn = layer.self_attn
                cls = type(attn)
                key = (cls, "rope")
                if key not in _CLASS_CACHE:
                    try:
                        forward = _rope_forward(cls.forward)
                    except _CannotPatch as e:
                        report.skipped.append((f"{names[attn]} (apply_rope)", str(e)))
                        continue
                    _patched_class(cls, "rope", forward, "apply_rope")
                _install(state, report, names[attn], attn, _CLASS_CACHE[key], "apply_rope")
        if options["swiglu"]:
            for layer in layers:
                mlp = layer.mlp
                if not (_is_silu(getattr(mlp, "act_fn", None)) and all(
                        hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))):
                    report.skipped.append((f"{names[mlp]} (silu_and_mul)",
                                           f"activation {type(getattr(mlp, 'act_fn', None)).__name__} is not SiLU "
                                           f"or the MLP lacks gate_proj/up_proj/down_proj"))
                    continue
                _install(state, report, names[mlp], mlp, _patched_class(type(mlp), "swiglu", _mlp_forward,
                                                                        "silu_and_mul"), "silu_and_mul")
        cpu_linear_missing = (options["linear"] and _device_type(model) == "cpu"
                              and _cpp_linear_note(_dtype(model)))
        if cpu_linear_missing:  # asked for explicitly: every Linear would run F.linear, recorded as the reference
            report.skipped.append(("linear (all nn.Linear modules)", cpu_linear_missing))
        elif options["linear"]:
            seen = set()
            for m in [m for layer in layers for m in layer.modules()] + [getattr(model, "lm_head", None)]:
                if not isinstance(m, nn.Linear) or m in seen:
                    continue
                seen.add(m)
                if type(m) is not nn.Linear:  # a subclass (quantized, LoRA, ...) has its own forward and weights
                    report.skipped.append((f"{names[m]} (linear)", f"{type(m).__name__} is a subclass of nn.Linear "
                                                                   f"with its own forward"))
                    continue
                _install(state, report, names[m], m, _patched_class(nn.Linear, "linear", _linear_forward, "linear"),
                         "linear")
        if options["attention"]:
            from llmkern import attention as paged

            paged.install(model, block_size=options["block_size"], num_blocks=options["num_blocks"],
                          max_memory_bytes=options["max_memory_bytes"], kv_dtype=options.get("kv_dtype"))
            state.extra_undo.append(lambda: paged.uninstall(model))
            for layer in layers:
                report.entries.append((names[layer.self_attn], "paged_attention"))
        if (all(options[k] for k in ("rms_norm", "rope", "swiglu", "linear", "attention"))
                and _device_type(model) == "cpu"):
            # Every kernel on every module of a layer: its decode steps may run as one function (decode_layer.py).
            state.extra_undo.extend(decode_layer.install(layers))
        if options["strict"] and report.skipped:
            lines = "; ".join(f"{what}: {why}" for what, why in report.skipped)
            raise PatchError(f"llmkern.patch(strict=True): {len(report.skipped)} requested kernel installation(s) "
                             f"could not be done, the model is left as it was: {lines}")
    except BaseException:
        _undo(state)
        raise
    object.__setattr__(model, _STATE_ATTR, state)
    return report


def _undo(state: _PatchState) -> None:
    for fn in reversed(state.extra_undo):
        fn()
    for module, cls in reversed(state.swapped):
        module.__class__ = cls


def unpatch(model: nn.Module) -> bool:
    """Undo ``patch(model)``. Returns False when the model was not patched."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return False
    from llmkern.attention import check_no_batching_session

    check_no_batching_session(model, "llmkern.unpatch")
    _undo(state)
    object.__delattr__(model, _STATE_ATTR)
    return True


def patch_report(model: nn.Module) -> PatchReport | None:
    """The report of the patch currently applied to ``model``, or None."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.report
