"""Attention over the paged KV cache, as a transformers attention implementation, and ``install``/``uninstall`` that
put ONE model instance on it.

The pieces, in the order a forward meets them:

* ``paged_mask`` — registered with ``AttentionMaskInterface`` under ``NAME``. ``create_causal_mask`` (and
  ``create_sliding_window_causal_mask``) call it with the 2-D padding mask HF carries through ``generate``
  (``[B, past + S]``, or None when there is no padding). It builds no 4-D mask: it returns a ``PagedMask`` that keeps
  that 2-D mask, which the model then passes unchanged to every attention call as ``attention_mask``. This is where
  the padding information is captured: it is the only place transformers 5.23 shows it to custom attention.
* ``PagedKVCache.update`` returns a ``PagedKV`` handle instead of tensors (see ``llmkern.cache``); it arrives here as
  ``key``.
* ``paged_attention_forward`` — registered with ``AttentionInterface`` under ``NAME``. With a handle it asks the cache
  for the step's plan (computed at the first layer from the ``PagedMask``, reused by the others), writes the layer's
  K/V (``reshape_and_cache``; left padding gets slot -1 and is not stored) and runs ``paged_decode_attention`` (one
  new token per sequence) or ``paged_prefill_attention`` (a chunk). With plain tensors (no cache, or an HF cache
  such as ``DynamicCache``) it falls back to transformers' SDPA with the 4-D mask HF would have built, so a model
  with llmkern attention installed still runs any forward correctly.

Decode fast path (plan once, run per layer — FlashInfer's plan/run; docs/design.md, "Code habits"): the public
paged ops cost ~20 µs of Python each (validation, dispatcher round trip), ~1.5 ms per token for 30 layers, against
a C++ write of ~2 µs.
Every layer of a decode step passes the same plan tensors and caches of one shape, dtype and device, so the step's
first layer runs both ops on the full path (validated, backend chosen and recorded); when both ran on the C++ CPU
backend, the later layers with the same scalar arguments call the C++ kernels directly and record each call as
``llmkern.ops``' direct path does. The C++ kernels check every input again (TORCH_CHECK); when one raises, the layer
is redone on the full path, whose checks raise the error that names the argument (the K/V write is idempotent).
Under torch.compile or a TorchFunctionMode every layer takes the full path.

``install(model)`` gives the instance private copies of its configs (a config object shared with another model is
left alone), switches the copies' attention implementation, and makes ``generate`` create a
``PagedKVCache`` when the caller passes none; ``uninstall(model)`` restores both exactly. That cache is laid out the
way the model is (``placement``): each layer's pages on the device its K/V come out on (``device_map``), and sized
for the KV heads this process holds (a rank's shard under tensor parallelism, ``tp_plan``), read from the
projections' shapes, not from the config.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import warnings

import torch

from llmkern import backends, paged_ops
from llmkern.cache import LayerPages, PagedKV, PagedKVCache, StepPlan, _decoder_dims
from llmkern.cache.pool import write as write_pages

NAME = "llmkern_paged"  # no "flash", "sdpa", "flex" or "/": transformers special-cases those
_STATE_ATTR = "_llmkern_paged_state"

__all__ = ["NAME", "PagedMask", "Placement", "install", "is_installed", "paged_attention_forward", "paged_mask",
           "placement", "register", "uninstall"]


# ---------------------------------------------------------------------------------------------------------------------
# Mask function


@dataclasses.dataclass
class PagedMask:
    """What the model passes to ``paged_attention_forward`` as ``attention_mask``: the 2-D padding mask (None = no
    padding) and what is needed to build HF's dense mask for the non-paged fallback."""

    attention_mask: torch.Tensor | None  # bool [B, kv_length or shorter], True = real token
    batch_size: int
    q_length: int
    kv_length: int
    custom: bool  # the model overlaid its own mask function (or/and masks): only the dense fallback honours it
    _dense_kwargs: dict

    def dense(self) -> torch.Tensor | None:
        """The mask ``create_causal_mask`` would have given SDPA (None = use ``is_causal``)."""
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(**self._dense_kwargs)


def paged_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
               mask_function=None, attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True,
               local_size: int | None = None, use_vmap: bool = False, device="cpu", **_ignored) -> PagedMask:
    """``AttentionMaskInterface`` function for ``NAME``: keep the 2-D padding mask, build nothing."""
    from transformers.masking_utils import causal_mask_function

    dense_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                        attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip,
                        local_size=local_size, use_vmap=use_vmap, device=device)
    return PagedMask(attention_mask=attention_mask, batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     custom=use_vmap, _dense_kwargs=dense_kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Attention function


def _sliding_window(module, kwargs) -> int | None:
    # Mistral passes config.sliding_window, Qwen2/Qwen3 pass module.sliding_window (None on full layers).
    if "sliding_window" in kwargs:
        return kwargs["sliding_window"]
    return getattr(module, "sliding_window", None)


def _softcap(module, kwargs) -> float | None:
    if kwargs.get("softcap") is not None:
        return kwargs["softcap"]
    return getattr(getattr(module, "config", None), "attn_logit_softcapping", None)


_capture: dict | None = None  # set by llmkern/decode_layer.py while it verifies a layer: module -> the decode's inputs


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask,
                            scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """``AttentionInterface`` function for ``NAME``.

    Args:
        query: ``[B, Hq, S, D]`` (rope applied). key/value: a ``PagedKV`` handle from ``PagedKVCache.update``, or
            ``[B, Hkv, L, D]`` tensors (then SDPA runs, see the module docstring).
        attention_mask: the ``PagedMask`` from ``paged_mask`` (or a user-given 4-D mask on the fallback path).

    Returns:
        ``(out [B, S, Hq, D], None)``.
    """
    if kwargs.get("output_attentions"):
        return _eager_with_weights(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if not isinstance(key, PagedKV):
        return _dense_fallback(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("llmkern's PagedKVCache is for inference: its attention has no backward, but this forward "
                           "runs under grad mode with inputs that require grad. Generate under torch.no_grad() / "
                           "torch.inference_mode(); to train a patched model, call it without a cache "
                           "(use_cache=False): its attention then runs transformers' SDPA, which has a backward.")
    if module.training and dropout:
        raise ValueError(f"llmkern paged attention is for inference: attention dropout must be 0 with a "
                         f"PagedKVCache, got {dropout} (call model.eval(), or run without the cache)")
    if isinstance(attention_mask, PagedMask):
        if attention_mask.custom:
            raise ValueError("this model overlays its own mask function on the causal mask; the paged attention "
                             "path supports plain causal (and sliding-window) masks with padding only")
        mask2d = attention_mask.attention_mask
    elif attention_mask is None:
        mask2d = None
    else:
        raise ValueError(f"llmkern paged attention takes transformers' 2-D padding mask (through its mask "
                         f"function), not a precomputed {attention_mask.dim()}-D mask of shape "
                         f"{tuple(attention_mask.shape)}; pass the 2-D attention_mask (batch, length) to the model")

    handle: PagedKV = key
    cache: PagedKVCache = handle.cache
    plan = cache.plan(handle, mask2d)

    scale = scaling if scaling is not None else getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    window = _sliding_window(module, kwargs)
    softcap = _softcap(module, kwargs)
    if plan.decode and _capture is not None:  # llmkern/decode_layer.py verifies its fast path against this call
        _capture[module] = (scale, window, softcap, query, handle, plan)
    return attend_planned(cache, plan, handle, query, scale, window, softcap), None


def attend_planned(cache: PagedKVCache, plan: StepPlan, handle: PagedKV, query, scale: float, window, softcap):
    """The attention of one layer's step whose plan is made: ``query [B, Hq, S, D]`` -> ``[B, S, Hq, D]``.

    ``cache.plan`` is called once per layer and step: in the reserved mode the step's first layer advances the device
    buffers with it, so a caller that planned (llmkern/decode_layer.py) passes its plan here instead of planning
    again."""
    if plan.decode:
        return _decode(cache, plan, handle, query, scale, window, softcap).unsqueeze(1)  # [B, 1, Hq, D]
    B, Hq, S, D = query.shape

    # One way: the plan (made once per step, by the first layer) and this layer's pages; the layer writes its K/V
    # and reads the pages through the ops, never calling back into the cache.
    pages = cache.layer_pages(handle.layer_idx)
    write_pages(pages, handle.key, handle.value, plan.slot_mapping)
    if plan.fresh and _dense_prefill_ok(query, window, softcap):
        return _dense_prefill(handle, query, scale, plan.real)
    q = query
    if plan.q_index is not None:  # real tokens not all at the end of their row: gather them there
        q = torch.gather(query, 2, plan.q_index[:, None, :, None].expand(B, Hq, S, D))
    out = paged_ops.paged_prefill_attention(q, pages.k, pages.v, plan.block_tables, plan.seq_lens, plan.q_lens,
                                            scale, sliding_window=window, softcap=softcap, k_scales=pages.k_scales,
                                            v_scales=pages.v_scales)
    if plan.q_index is not None:
        out = torch.empty_like(out).scatter_(2, plan.q_index[:, None, :, None].expand(B, Hq, S, D), out)
    return out.transpose(1, 2)  # [B, S, Hq, D]


# ---------------------------------------------------------------------------------------------------------------------
# Fresh prefill: nothing cached before, whole prompts (left padding allowed), on CPU

_DENSE_PREFILL = ("dense_prefill_attention", "torch-sdpa")


def _dense_prefill_ok(query, window, softcap) -> bool:
    """Whether a fresh prefill (``StepPlan.fresh``) runs on torch's SDPA instead of the paged prefill kernel.

    On CPU the uncached part of a prompt is a plain causal attention over this step's own K/V, already in hand as
    dense tensors: torch's fused CPU attention (what an unpatched model runs there) serves it at eager's speed, which
    the paged kernel does not reach everywhere (it reads K/V through the block table, and has no AMX path; measured in
    benchmarks/README.md, "Prefill"). The K/V are still written to the pages first, so decode and later chunks read
    them there. Only when SDPA computes the same thing: no softcap, a sliding window (if any) wider than the prompt,
    and the automatic backend choice (a backend forced with ``llmkern.use_backend`` or ``LLMKERN_BACKEND`` runs the
    paged kernel, which is how tests and benchmarks reach it); never under the Triton interpreter.
    """
    if query.device.type != "cpu" or softcap or (window and window < query.shape[2]):
        return False
    return backends.local.forced is None and backends._ENV_BACKEND is None and not backends.triton_interpret()


def _dense_prefill(handle: PagedKV, query, scale: float, real) -> torch.Tensor:
    """SDPA over the step's K/V ``[B, Hkv, S, D]`` as transformers' SDPA integration calls it: ``query [B, Hq, S, D]``
    -> ``[B, S, Hq, D]``. No padding: ``is_causal`` with GQA by broadcast. Left padding (``real [B, S]``, False =
    padding): the causal mask and the padding of the keys as one boolean mask, K/V repeated per query head (what
    transformers does when there is a mask); a padding row sees no key, and its output is zero, as the paged
    kernel writes it."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    key, value = handle.key, handle.value
    if real is None:
        out = sdpa(query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    else:
        S, group = query.shape[2], query.shape[1] // key.shape[1]
        causal = torch.ones((S, S), dtype=torch.bool, device=query.device).tril()
        mask = causal[None, None] & real[:, None, None, :]
        if group > 1:
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        out = sdpa(query, key, value, attn_mask=mask, scale=scale).masked_fill(~real[:, None, :, None], 0)
    counts = backends._counts
    counts[_DENSE_PREFILL] = counts.get(_DENSE_PREFILL, 0) + 1
    for t in backends._trackers:
        t[_DENSE_PREFILL] += 1
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Decode: one new token per sequence


_WRITE_CPP = ("reshape_and_cache", "cpp")
_DECODE_CPP = ("paged_decode_attention", "cpp")
_C: dict = {}  # "write" / "decode" -> the C++ op overloads, resolved once the full path has run them
_is_compiling = torch.compiler.is_compiling
_function_mode = torch._C._is_torch_function_mode_enabled  # a TorchFunctionMode must see the llmkern ops


def _decode(cache: PagedKVCache, plan: StepPlan, handle: PagedKV, query, scale: float, window, softcap):
    """Write one layer's new K/V and attend: ``query [B, Hq, 1, D]`` -> ``[B, Hq, D]`` (module docstring: the
    direct path)."""
    pages = cache.layer_pages(handle.layer_idx)
    k_pages = pages.k
    q = query.squeeze(2)  # [B, Hq, D], a view
    scalars = (scale, window, softcap)
    if _is_compiling():
        # Traced: no Python state may change from step to step (it would be guarded on and recompile), so no plan
        # dict, no backend tracking; the split count is a constant of the shapes.
        sizes = (q.shape[0], q.shape[1], k_pages.shape[2], k_pages.shape[3], plan.max_seq_len)
        splits = None  # the op picks the count from the concrete sizes when it runs (CPU kernels: always)
        if (q.device.type != "cpu" or backends.triton_interpret()) and _CONSTANT_OF_SYMINTS:
            splits = _splits_constant(q.device.type, q.device.index, *sizes, window)
        write_pages(pages, handle.key, handle.value, plan.slot_mapping)
        return paged_ops.paged_decode_attention(q, pages.k, pages.v, plan.block_tables, plan.seq_lens, scale,
                                                sliding_window=window, softcap=softcap, num_splits=splits,
                                                max_seq_len=plan.max_seq_len, k_scales=pages.k_scales,
                                                v_scales=pages.v_scales)
    if not _function_mode() and scalars in plan.direct:
        out = _decode_direct(plan, handle, q, pages, scalars)
        if out is not None:
            return out
    if window not in plan.num_splits:
        plan.num_splits[window] = _decode_num_splits(query, k_pages, plan.max_seq_len, window)
    with backends.track() as ran:
        write_pages(pages, handle.key, handle.value, plan.slot_mapping)
        out = paged_ops.paged_decode_attention(q, pages.k, pages.v, plan.block_tables, plan.seq_lens, scale,
                                               sliding_window=window, softcap=softcap,
                                               num_splits=plan.num_splits[window], max_seq_len=plan.max_seq_len,
                                               k_scales=pages.k_scales, v_scales=pages.v_scales)
    if set(ran) == {_WRITE_CPP, _DECODE_CPP} and q.device.type == "cpu":
        if not _C:
            _C.update(write=torch.ops.llmkern_C.reshape_and_cache.default,
                      decode=torch.ops.llmkern_C.paged_decode_attention.default)
        plan.direct.add(scalars)
    return out


def _decode_direct(plan: StepPlan, handle: PagedKV, q, pages: LayerPages, scalars) -> torch.Tensor | None:
    """The C++ kernels called directly (the step's first layer cleared them); None when one raised."""
    scale, window, softcap = scalars
    k, v, ks, vs = pages
    try:
        _C["write"](handle.key.squeeze(2), handle.value.squeeze(2), k, v, plan.slot_mapping, ks, vs)
        out = _C["decode"](q, k, v, plan.block_tables, plan.seq_lens, scale, window or 0, softcap or 0.0,
                           plan.num_splits.get(window) or 0, ks, vs)
    except RuntimeError:
        return None
    counts = backends._counts
    for key in (_WRITE_CPP, _DECODE_CPP):
        counts[key] = counts.get(key, 0) + 1
        for t in backends._trackers:
            t[key] += 1
    return out


# torch < 2.12's assume_constant_result refuses a SymInt argument (dynamic=True: "SymNodeVariable() is not a
# constant"; dynamo cannot tell one from an int before it fails); newer torch specialises it. On an older torch the
# traced op picks its split count itself when it runs, from the same ladder (paged_ops.decode_num_splits).
_CONSTANT_OF_SYMINTS = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)


@torch.compiler.assume_constant_result
def _splits_constant(device_type: str, device_index, B: int, Hq: int, Hkv: int, D: int, max_seq_len: int,
                     window) -> int | None:
    """``_decode_num_splits`` from plain values, a constant to torch.compile (the heuristics are host Python)."""
    query = torch.empty((B, Hq, 1, D), device="meta")
    return _decode_num_splits(query, torch.empty((1, 1, Hkv, D), device="meta"), max_seq_len, window,
                              torch.device(device_type, device_index))


def _decode_num_splits(query, k_pages, max_seq_len: int, window, device=None) -> int | None:
    """The Triton decode kernel's split count for this step, computed once per (forward, window) instead of per
    layer. None lets the op decide: the C++ CPU kernel picks its own from the thread count (the Triton heuristic
    sizes for GPU SMs; on CPU it is only needed when Triton runs in the interpreter), the reference ignores it."""
    device = query.device if device is None else device
    if device.type == "cpu" and not backends.triton_interpret():
        return None
    try:
        return paged_ops.decode_num_splits(query.shape[0], query.shape[1], k_pages.shape[2], k_pages.shape[3],
                                           max_seq_len, sliding_window=window, device=device)
    except ImportError:  # no triton: the reference backend runs and needs no split count
        return None


def _eager_attention_of(module):
    """The ``eager_attention_forward`` of the modeling file ``module``'s (original) class comes from."""
    import sys

    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise RuntimeError(f"output_attentions=True: llmkern found no eager_attention_forward in the modeling file of "
                       f"{type(module).__name__}; call model.set_attn_implementation('eager') for attention weights")


def _eager_with_weights(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    """``output_attentions=True``: llmkern's kernels compute no attention weights, so this call runs the model's own
    eager attention (its modeling file's ``eager_attention_forward``) and returns its weights ``[B, Hq, S, columns]``
    as an unpatched eager model would. With a ``PagedKVCache`` the step's K/V are written to the pages first and the
    whole K/V are gathered from them (``PagedKVCache.dense``; padding columns are zeros there and masked)."""
    from transformers.masking_utils import eager_mask

    warnings.warn("output_attentions=True: llmkern's attention kernels compute no attention weights, so this "
                  "forward runs transformers' eager attention (the weights are returned as an eager model returns "
                  "them); drop output_attentions for llmkern's kernels", UserWarning, stacklevel=3)
    if isinstance(key, PagedKV):
        handle: PagedKV = key
        mask2d = attention_mask.attention_mask if isinstance(attention_mask, PagedMask) else None
        plan = handle.cache.plan(handle, mask2d)
        handle.cache.write(handle, plan)
        key, value = handle.cache.dense(handle.layer_idx)
    if isinstance(attention_mask, PagedMask):
        kw = dict(attention_mask._dense_kwargs, allow_is_causal_skip=False)
        # The columns held (a reserved cache's masks span max_cache_len), the queries the last of them: the mask's
        # own q_offset may be the reserved cache's live column counter, already advanced by plan().
        kw.update(kv_length=key.shape[2], q_offset=key.shape[2] - query.shape[2], kv_offset=0)
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = kw["attention_mask"][:, :key.shape[2]]
        attention_mask = eager_mask(dtype=query.dtype, **kw)
    kwargs = {k: v for k, v in kwargs.items() if k != "output_attentions"}
    return _eager_attention_of(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)


def _dense_fallback(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = attention_mask.dense() if isinstance(attention_mask, PagedMask) else attention_mask
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Registration and install / uninstall


def register() -> None:
    """Register ``NAME`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).
    Registering a new name changes no existing model: only configs set to ``NAME`` use it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, paged_attention_forward)
    AttentionMaskInterface.register(NAME, paged_mask)


@dataclasses.dataclass
class _InstallState:
    configs: "_PrivateConfigs"
    had_prepare_attr: bool
    prev_prepare_attr: object
    options: dict
    hooked: bool  # generate()'s cache hook was installed (the model has generate)
    warned: set = dataclasses.field(default_factory=set)  # fallbacks already said once for this model
    had_masks_attr: bool = False  # the instance had its own create_masks_for_generate before install
    prev_masks_attr: object = None
    had_cb_attr: bool = False  # the instance had its own init_continuous_batching before install
    prev_cb_attr: object = None
    cb_manager: object = None  # a continuous-batching manager running the model until its stop()


def is_installed(model) -> bool:
    return _STATE_ATTR in vars(model)


@dataclasses.dataclass
class _PrivateConfigs:
    """The model's modules that held a config, with the config each held before ``install`` gave it a private copy
    (``held``), and per original config ``(original, copy, snapshot of the copy's attributes after the switch)``."""

    held: list
    copies: list

    def restore(self) -> None:
        """Put the original config objects back, unchanged: llmkern's own switch lived on the copies only. A copy
        the caller changed while the model was installed (an attribute set or edited in place, or
        ``set_attn_implementation`` to another implementation) stays the model's config instead: writing those
        changes into the original would reach every other model built from it, which ``patch`` promises to leave
        alone. Its attention implementation is then the caller's switch, or the original's."""
        keep = set()
        for original, private, snapshot in self.copies:
            now = dict(vars(private))
            switched = now.get("_attn_implementation_internal")
            if switched == NAME:  # llmkern's switch, not the caller's
                now["_attn_implementation_internal"] = snapshot.get("_attn_implementation_internal")
            if now.keys() != snapshot.keys() or any(not _same(now[k], snapshot[k]) for k in now):
                if switched == NAME:
                    private._attn_implementation_internal = original._attn_implementation_internal
                keep.add(id(original))
        for module, original in self.held:
            if id(original) not in keep:
                vars(module)["config"] = original


def _same(a, b) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # a tensor, or a type whose == is not a bool: changed unless identical
        return False


def _private_configs(model) -> _PrivateConfigs:
    """Give every module of ``model`` that holds a config (the model, its base model, attention modules, rotary
    embeddings, ...) a private deep copy of it, one copy per distinct config object (a CausalLM and its base model
    keep sharing theirs; a composite config's sub-configs map to the copy's sub-configs). transformers'
    ``set_attn_implementation`` writes into the config object, and models built from one ``config`` share it: without
    the copy, switching this model would switch every other model built from that config."""
    try:
        from transformers import PreTrainedConfig as config_cls
    except ImportError:  # older spelling
        from transformers import PretrainedConfig as config_cls

    memo: dict = {}
    copies: dict = {}
    held = []
    for module in model.modules():
        cfg = vars(module).get("config")
        if not isinstance(cfg, config_cls):
            continue
        if id(cfg) not in copies:
            try:
                copies[id(cfg)] = (cfg, copy.deepcopy(cfg, memo))
            except Exception as e:  # an attribute that cannot be deep-copied: the attention switch would leak
                raise TypeError(f"llmkern: cannot copy {type(module).__name__}'s {type(cfg).__name__} ({e}); "
                                f"llmkern's attention switches a private copy so that another model sharing the "
                                f"config is untouched. Patch with attention=False to keep transformers' "
                                f"attention.") from e
        held.append((module, cfg))
        vars(module)["config"] = copies[id(cfg)][1]
    return _PrivateConfigs(held=held, copies=[(o, c, None) for o, c in copies.values()])


def check_no_batching_session(model, what: str) -> None:
    """Refuse ``what`` (patch, unpatch) while a continuous-batching manager runs ``model`` (its thread would meet
    another attention mid-run)."""
    state = vars(model).get(_STATE_ATTR)
    if state is not None and state.cb_manager is not None:
        raise RuntimeError(f"{what}: a continuous-batching manager is running this model (its attention is bound "
                           f"to the manager until its stop()); call manager.stop() first")


def is_active(model) -> bool:
    """Whether ``model``'s attention runs llmkern's paged attention now: installed, and its config still names
    ``NAME`` (``model.set_attn_implementation(...)`` can switch an installed model to another implementation and
    back)."""
    return is_installed(model) and model.config._attn_implementation == NAME


def _pages_for_generate(block_size: int, rows: int, max_cache_length: int) -> int:
    # Each row holds at most max_cache_length real tokens. Pages shared by beams are counted once and a
    # copy-on-write only replaces a page its row no longer references, so rows * pages-per-row always suffices.
    return max(1, rows * math.ceil(max(max_cache_length, 1) / block_size))


def install(model, *, block_size: int = 16, num_blocks: int | None = None,
            max_memory_bytes: int | None = None, kv_dtype=None) -> None:
    """Run ``model`` (this instance only) on llmkern paged attention.

    * ``model.set_attn_implementation(NAME)``: sets ``_attn_implementation`` on this model's config(s) only (a
      second model of the same class has its own config and is untouched).
    * ``model.generate(...)`` without ``past_key_values`` creates a ``PagedKVCache``: a fixed ``num_blocks`` /
      ``max_memory_bytes`` pool if given, else one sized for the call (batch x beams x max_length) that grows when
      it is passed back for a longer next turn (``out.past_key_values``, HF's multi-turn recipe).
    * A transformers cache handed to ``generate`` (or another ``cache_implementation`` than the default and
      "static"), dynamic or static, still works, on SDPA: said once per model with a warning.
    * ``kv_dtype``: the pages of the caches ``generate`` makes (``PagedKVCache``'s ``kv_dtype``: None, ``"int8"``,
      ``"fp8_e4m3"``).

    Calling it again replaces the options. ``uninstall(model)`` undoes everything.
    """
    if num_blocks is not None and max_memory_bytes is not None:
        raise ValueError(f"pass num_blocks or max_memory_bytes, not both; got num_blocks={num_blocks} and "
                         f"max_memory_bytes={max_memory_bytes}")
    # Validates block_size, kv_dtype and the config's dims.
    PagedKVCache(model.config, block_size=block_size, num_blocks=1, kv_dtype=kv_dtype)
    if is_installed(model):
        uninstall(model)
    register()

    private = _private_configs(model)
    try:
        model.set_attn_implementation(NAME)
    except BaseException:
        private.restore()
        raise
    # What the copies hold right after the switch, deep (an in-place edit of a nested dict must show), with the
    # implementation recorded as the original's: restore() tells the caller's changes from llmkern's own by it.
    private.copies = [(o, c, {**copy.deepcopy(vars(c)),
                              "_attn_implementation_internal": o._attn_implementation_internal})
                      for o, c, _ in private.copies]
    prev = private

    # Hook: `generate` asks `self._prepare_cache_for_generation(...)` for a cache (generation/utils.py, step 7).
    # An instance attribute shadows the class method for this object only, sees generate's batch size, beam count
    # and max length (so the auto cache is sized exactly), and leaves every path it does not handle — a cache the
    # caller passed, use_cache=False, a static/quantized cache_implementation — to the original method. The
    # alternatives are worse: generation_config.cache_implementation only accepts transformers' own names (and
    # rejects being combined with an explicit past_key_values), and `_get_cache` no longer exists in 5.23.
    d = vars(model)
    if not hasattr(type(model), "_prepare_cache_for_generation"):
        # A base *Model or a non-generating head (sequence classification, ...): no generate() to hook; a forward
        # with a PagedKVCache the caller made still runs the paged kernels.
        d[_STATE_ATTR] = _InstallState(configs=prev, had_prepare_attr=False, prev_prepare_attr=None,
                                       options=dict(block_size=block_size, num_blocks=num_blocks,
                                                    max_memory_bytes=max_memory_bytes, kv_dtype=kv_dtype),
                                       hooked=False)
        return
    had_attr = "_prepare_cache_for_generation" in d
    prev_attr = d.get("_prepare_cache_for_generation")
    options = dict(block_size=block_size, num_blocks=num_blocks, max_memory_bytes=max_memory_bytes, kv_dtype=kv_dtype)
    original = type(model)._prepare_cache_for_generation if not had_attr else prev_attr

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if self.config._attn_implementation != NAME:
            # Switched away with set_attn_implementation: transformers' attention runs, on transformers' caches.
            call = original if had_attr else types.MethodType(original, self)
            return call(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        key = _generate_cache_key(model_kwargs)
        given = next((model_kwargs[k] for k in ("cache", "past_key_values") if model_kwargs.get(k) is not None), None)
        impl = generation_config.cache_implementation
        if given is not None and not isinstance(given, PagedKVCache):
            _check_foreign_cache(self, given)
        elif given is not None and given.reserved and given.max_cache_len < max_cache_length:
            raise ValueError(f"generate() needs up to {max_cache_length} columns (max_length) but the PagedKVCache "
                             f"passed reserves max_cache_len={given.max_cache_len}: create it with max_cache_len >= "
                             f"{max_cache_length}, or generate fewer tokens")
        elif given is None and generation_config.use_cache is not False and impl == "static":
            # transformers' torch.compile recipe: a reserved PagedKVCache, the capturable one (llmkern.cache).
            rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            model_kwargs[key] = PagedKVCache(
                self.config, block_size=options["block_size"], max_batch_size=rows, max_cache_len=max_cache_length,
                dtype=self.dtype, device=dict.fromkeys(range(_decoder_dims(self.config)[0])),
                num_kv_heads=placement(self).kv_heads, kv_dtype=options["kv_dtype"])
            return None
        elif given is None and generation_config.use_cache is not False and impl not in (None, "dynamic"):
            _check_cache_implementation(self, impl)
        wants_default = (given is None and generation_config.use_cache is not False and impl in (None, "dynamic")
                         and not self.config.is_encoder_decoder and self._supports_default_dynamic_cache())
        if not wants_default:
            call = original if had_attr else types.MethodType(original, self)
            return call(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        n = options["num_blocks"]
        growable = None
        if n is None and options["max_memory_bytes"] is None:
            # Sized for this call, and growable: `out.past_key_values` fed back for the next turn (HF's multi-turn
            # recipe) must take a longer turn, though the caller never sized it.
            n = _pages_for_generate(options["block_size"], rows, max_cache_length)
            growable = True
        # Each layer's pages are made on the device its K/V come out on (a device_map spreads layers; accelerate
        # runs offloaded ones on an execution device), at its first K/V; sized for the KV heads this process holds.
        num_layers = _decoder_dims(self.config)[0]
        model_kwargs[key] = PagedKVCache(
            self.config, block_size=options["block_size"], num_blocks=n, growable=growable,
            max_memory_bytes=options["max_memory_bytes"], dtype=self.dtype, device=dict.fromkeys(range(num_layers)),
            num_kv_heads=placement(self).kv_heads, kv_dtype=options["kv_dtype"])
        return None

    d["_prepare_cache_for_generation"] = types.MethodType(_prepare_cache_for_generation, model)

    # With a compileable (reserved) cache, generate builds each step's mask ahead with `create_masks_for_generate`,
    # outside the forward, as a fixed-size 4-D tensor for transformers' attention. llmkern's attention takes the
    # 2-D padding mask: this hook hands it on, right-padded to max_cache_len, so a compiled step sees one shape.
    had_masks = "create_masks_for_generate" in d
    prev_masks = d.get("create_masks_for_generate")

    def create_masks_for_generate(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, PagedKVCache):
            return _padded_mask(kwargs.get("attention_mask"), cache)
        cfg = kwargs.get("config")
        if cfg is not None and cfg._attn_implementation == NAME:
            # A transformers cache (static ones build their masks here, ahead of the forward): the attention falls
            # back to SDPA over it (``_dense_fallback``), so it gets the masks SDPA would.
            kwargs["config"] = _as_sdpa(cfg)
        if had_masks:
            return prev_masks(*args, **kwargs)
        own = getattr(type(self), "create_masks_for_generate", None)
        if own is not None:
            return own(self, *args, **kwargs)
        from transformers.masking_utils import create_masks_for_generate as generic

        return generic(*args, **kwargs)

    # Bound methods, not closures over `model`: a deep copy of the model rebinds them to the copy.
    d["create_masks_for_generate"] = types.MethodType(create_masks_for_generate, model)

    # transformers' continuous batching (generate_batch, init_continuous_batching, `transformers serve`) accepts
    # only its own attention names ('paged|eager', 'sdpa', flash; 5.4 prefixes the name with 'paged|') and runs its
    # own paged cache: the manager is created with the model on 'sdpa', then llmkern.continuous.attach puts the
    # attention over the engine's pages on llmkern's kernels (or leaves 'sdpa', with a warning saying why); the
    # manager's stop() switches the model back to llmkern's attention.
    had_cb = "init_continuous_batching" in d
    prev_cb = d.get("init_continuous_batching")
    if hasattr(type(model), "init_continuous_batching"):
        def init_continuous_batching(self, *args, **kwargs):
            own_cb = prev_cb if had_cb else types.MethodType(type(self).init_continuous_batching, self)
            if self.config._attn_implementation != NAME:
                return own_cb(*args, **kwargs)
            from llmkern import continuous

            self.set_attn_implementation("sdpa")
            try:
                manager = own_cb(*args, **kwargs)
                why = continuous.attach(self, manager)
            except BaseException:
                self.set_attn_implementation(NAME)
                raise
            state = vars(self)[_STATE_ATTR]
            if why is not None:
                _warn_once(self, f"continuous batching: {why}", _CB_MESSAGE.format(why=why))
            elif state.options.get("kv_dtype") is not None:
                _warn_once(self, "continuous batching kv_dtype", _CB_KV_DTYPE_MESSAGE)
            state.cb_manager = manager
            if "stop" not in vars(manager):  # a cached manager, handed out again, is wrapped once
                _switch_back_at_stop(self, manager)
            return manager

        d["init_continuous_batching"] = types.MethodType(init_continuous_batching, model)
    d[_STATE_ATTR] = _InstallState(configs=prev, had_prepare_attr=had_attr, prev_prepare_attr=prev_attr,
                                   options=options, hooked=True, had_masks_attr=had_masks,
                                   prev_masks_attr=prev_masks, had_cb_attr=had_cb, prev_cb_attr=prev_cb)


def _switch_back_at_stop(model, manager) -> None:
    """Wrap ``manager.stop`` (on the instance): once transformers' own stop has run (which, from 5.17, restores the
    name it saw at the start, 'sdpa'), the model goes back to llmkern's attention if it is still installed."""
    stop = manager.stop

    def stop_then_switch_back(*args, **kwargs):
        try:
            return stop(*args, **kwargs)
        finally:
            state = vars(model).get(_STATE_ATTR)
            if state is not None and state.cb_manager is manager:
                state.cb_manager = None
                if model.config._attn_implementation != NAME:
                    model.set_attn_implementation(NAME)

    manager.stop = stop_then_switch_back


_CB_MESSAGE = ("continuous batching (generate_batch, init_continuous_batching, python -m llmkern serve): llmkern's "
               "paged attention cannot run under this manager: {why}. The model runs it on 'sdpa' attention over "
               "transformers' own paged cache (llmkern's RMSNorm, RoPE, SwiGLU and Linear still run; a kv_dtype given "
               "to patch() does not apply there) and switches back to llmkern's attention when the manager stops.")
_CB_KV_DTYPE_MESSAGE = ("continuous batching: the kv_dtype given to patch() does not apply under transformers' "
                        "continuous batching: llmkern's attention reads the engine's own pages, in the model's dtype.")


def _as_sdpa(config):
    """A shallow copy of ``config`` that names SDPA as its attention (for mask functions that read it)."""
    view = copy.copy(config)
    view._attn_implementation_internal = "sdpa"
    return view


def _padded_mask(mask, cache: PagedKVCache):
    """The 2-D padding mask, right-padded with zeros to the reserved cache's max_cache_len (what
    ``PagedKVCache.plan`` reads there: column ``seen`` is the step's)."""
    if mask is None or not cache.reserved or mask.dim() != 2 or mask.shape[1] >= cache.max_cache_len:
        return mask
    return torch.nn.functional.pad(mask, (0, cache.max_cache_len - mask.shape[1]))


# ---------------------------------------------------------------------------------------------------------------------
# Where the model is: devices per layer, tensor-parallel shards


@dataclasses.dataclass
class Placement:
    """How a model's decoder layers are laid out in this process (``placement(model)``)."""

    devices: list  # per decoder layer: where its K/V come out (None: not known before they do)
    kv_heads: int | None  # KV heads this process holds per layer (None: not readable, or layers differ)
    q_heads: int | None  # query heads this process holds per layer
    config_kv_heads: int
    config_q_heads: int
    tp_size: int = 1  # ranks the model is sharded over (1: not sharded)
    tp_rank: int = 0
    tp_plan: dict = dataclasses.field(default_factory=dict)  # module pattern -> style, as transformers applied it
    offloaded: list = dataclasses.field(default_factory=list)  # layers whose weights are off their device

    def notes(self) -> list:
        """``(what, how)`` lines for ``PatchReport.placement``: nothing for a model on one device."""
        out = []
        if self.tp_size > 1:
            styles: dict = {}
            for pattern, style in self.tp_plan.items():
                styles.setdefault(style, []).append(pattern.rsplit(".", 1)[-1])
            plan = "; ".join(f"{', '.join(names)} {style}" for style, names in styles.items())
            heads = (f"this rank holds {self.q_heads} of {self.config_q_heads} query heads and {self.kv_heads} of "
                     f"{self.config_kv_heads} KV heads per layer" if self.kv_heads is not None else
                     "the KV heads each rank holds are read from the first K/V each layer is handed")
            out.append(("tensor parallel", f"sharded over {self.tp_size} ranks by tp_plan (this is rank "
                                           f"{self.tp_rank}; {plan}): {heads}, and the paged KV cache holds "
                                           f"those"))
        known = [d for d in self.devices if d is not None]
        if len(set(known)) > 1 or self.offloaded:
            spans = []
            for i, d in enumerate(self.devices):
                if spans and spans[-1][0] == d:
                    spans[-1][2] = i
                else:
                    spans.append([d, i, i])
            where = ", ".join(f"{'the device of its K/V' if d is None else d} ({a}-{b})" if a != b else
                              f"{'the device of its K/V' if d is None else d} ({a})" for d, a, b in spans)
            text = f"decoder layers over {where}: each layer's KV pages live on its device"
            if self.offloaded:
                text += (f"; layers {self.offloaded} have offloaded weights (accelerate hooks): their pages live on "
                         f"the execution device")
            out.append(("device_map", text))
        return out


_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def find_decoder_stack(model) -> tuple:
    """``(base model, its ModuleList of decoder layers)`` found by structure, wherever a head keeps them: the base
    model transformers names (``model.base_model``: ``.model`` for CausalLM and most heads, ``.transformer`` for
    ``*ForQuestionAnswering``), else the first ModuleList in the module tree whose modules have the parts of a
    Llama-style decoder layer. ``(None, None)`` when there is none."""
    candidates = []
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module):
        candidates.append(base)
    candidates += [getattr(model, "model", None), model]
    for base in candidates:
        layers = getattr(base, "layers", None) if isinstance(base, torch.nn.Module) else None
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return base, layers
    for name, m in model.named_modules():
        if (isinstance(m, torch.nn.ModuleList) and len(m)
                and all(all(hasattr(layer, p) for p in _LAYER_PARTS) for layer in m)):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            return parent, m
    return None, None


def _decoder_layer_list(model) -> list:
    _base, layers = find_decoder_stack(model)
    return [] if layers is None else list(layers)


def _local_rows(linear) -> int | None:
    """Output features this process holds of a Linear (its shard when the weight is a DTensor)."""
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    local = w.to_local() if hasattr(w, "to_local") else w
    return local.shape[0]


def _layer_device(layer) -> tuple[torch.device | None, bool]:
    """Where a decoder layer's K/V come out, and whether its weights are offloaded (accelerate keeps them off the
    device, on meta here, and moves them in for each forward: its hook's execution_device is where it runs)."""
    hook = getattr(layer, "_hf_hook", None)
    param = next(layer.parameters(), None)
    offloaded = param is not None and param.device.type == "meta"
    run = getattr(hook, "execution_device", None)
    if run is not None:
        return torch.device(run if not isinstance(run, int) else f"cuda:{run}"), offloaded
    if param is None or offloaded:
        return None, offloaded
    return param.device, False


def placement(model) -> Placement:
    """How ``model``'s decoder layers sit in this process: each layer's device, and under tensor parallelism
    (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``) the query/KV heads this rank holds — read from
    the q/k projections' local shapes (a DTensor's shard), never from the config, which gives the whole model's."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    layers = _decoder_layer_list(model)
    devices, offloaded, kv, q = [], [], set(), set()
    for i, layer in enumerate(layers):
        dev, off = _layer_device(layer)
        devices.append(dev)
        if off:
            offloaded.append(i)
        attn = getattr(layer, "self_attn", None)
        head_dim = getattr(attn, "head_dim", None)
        rows_k, rows_q = _local_rows(getattr(attn, "k_proj", None)), _local_rows(getattr(attn, "q_proj", None))
        kv.add(rows_k // head_dim if rows_k and head_dim and rows_k % head_dim == 0 else None)
        q.add(rows_q // head_dim if rows_q and head_dim and rows_q % head_dim == 0 else None)
    tp_size, tp_rank = 1, 0
    for p in model.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            tp_size, tp_rank = mesh.size(), mesh.get_local_rank()
            break
    kv_heads = kv.pop() if len(kv) == 1 else None
    q_heads = q.pop() if len(q) == 1 else None
    if kv_heads is not None and not 1 <= kv_heads <= n_kv:
        kv_heads = None  # a packed or quantized weight whose rows are not heads: the first K/V will say
    tp_plan = dict(getattr(model, "tp_plan", None) or {}) if tp_size > 1 else {}
    return Placement(devices=devices, kv_heads=kv_heads, q_heads=q_heads, config_kv_heads=n_kv, config_q_heads=n_q,
                     tp_size=tp_size, tp_rank=tp_rank, tp_plan=tp_plan, offloaded=offloaded)


def _warn_once(model, what: str, message: str) -> None:
    """A fallback is said once per installed model (and again after a re-install)."""
    import warnings

    state: _InstallState | None = vars(model).get(_STATE_ATTR)
    if state is None or what not in state.warned:
        if state is not None:
            state.warned.add(what)
        warnings.warn(message, UserWarning, stacklevel=4)


def _check_foreign_cache(model, cache) -> None:
    """generate() on an installed model was handed a transformers cache. It works, dynamic or static (the
    attention falls back to SDPA over it; a static cache's masks, built ahead of the forward, are SDPA's: see
    ``create_masks_for_generate`` in ``install``), but the paged kernels do not run: said once per model."""
    name = type(cache).__name__
    _warn_once(model, name, f"generate() got a {name}: llmkern's paged attention kernels are not used for it (the "
                            f"attention runs transformers' SDPA over that cache). Pass no cache, or a "
                            f"llmkern.PagedKVCache, to use them.")


def _check_cache_implementation(model, impl: str) -> None:
    _warn_once(model, impl, f"cache_implementation={impl!r}: llmkern's paged attention kernels are not used for "
                            f"this call (the attention runs transformers' SDPA over its {impl} cache). Leave "
                            f"cache_implementation unset to use them.")


def _generate_cache_key(model_kwargs: dict) -> str:
    """The model_kwargs key under which the installed transformers' generate keeps the cache: ``cache`` from 5.24
    (``past_key_values`` is then a deprecated alias, and setting it beside ``cache`` is a FutureWarning per step),
    ``past_key_values`` before."""
    for key in ("cache", "past_key_values"):
        if key in model_kwargs:
            return key
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def uninstall(model) -> None:
    """Undo ``install``: the model's original config objects (with what the caller changed on the private copies
    meanwhile, ``_PrivateConfigs.restore``) and ``generate``'s own cache choice. A no-op on a model that is not
    installed."""
    state: _InstallState | None = vars(model).get(_STATE_ATTR)
    if state is None:
        return
    check_no_batching_session(model, "llmkern.unpatch")
    d = vars(model)
    if state.had_prepare_attr:
        d["_prepare_cache_for_generation"] = state.prev_prepare_attr
    elif state.hooked:
        d.pop("_prepare_cache_for_generation", None)
    if state.had_masks_attr:
        d["create_masks_for_generate"] = state.prev_masks_attr
    elif state.hooked:
        d.pop("create_masks_for_generate", None)
    from llmkern import continuous

    continuous.detach(model)
    if state.had_cb_attr:
        d["init_continuous_batching"] = state.prev_cb_attr
    elif state.hooked:
        d.pop("init_continuous_batching", None)
    del d[_STATE_ATTR]
    state.configs.restore()
