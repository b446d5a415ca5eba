"""llmkern's paged attention under transformers' continuous batching (``generate_batch``, ``init_continuous_batching``
managers, ``transformers serve``, ``python -m llmkern serve``).

transformers' engine owns the KV pages, the scheduler and the request states; llmkern's kernels only do the attention
over those pages. How a patched model gets there (``attach``, called by the ``init_continuous_batching`` hook of
``llmkern/attention.py`` once transformers has built the manager on 'sdpa'):

* The manager validates the attention name when it is built, so it is built on 'sdpa'; then the model is switched to
  ``CB_NAME``, a name registered with ``AttentionInterface`` (``cb_attention_forward``) and ``AttentionMaskInterface``
  (SDPA's mask, for a forward outside the engine). Since the name is neither 'sdpa' nor 'paged|eager', the engine's
  inputs carry no dense attention mask (``continuous_batching/utils.py``, ``attn_mask_is_needed``), and mask creation
  exits early on the engine's ``PagedAttentionCache`` (``masking_utils._preprocess_mask_arguments``).
* The manager's ``_create_batch_processor`` is wrapped on the instance: the engine's ``PagedAttentionCache`` it builds
  gets two instance methods (``_Engine``):
  - ``extend_read_and_write_indices(request_id, past_length, query_length, read_index, write_index)``, which the
    engine calls per request of a batch, in batch order, while it prepares the step: the batch's composition is
    recorded there (host-side ints) and transformers computes the write index as before, but no read index (nothing
    reads the cache by index any more).
  - ``update(key_states, value_states, layer_idx, kwargs)``, which each attention module calls before the attention:
    it returns a handle (``_NewKV``) instead of gathering the layer's cache into dense K/V.
* ``cb_attention_forward`` gets the handle. At the first layer of a step (the step is the identity of the
  ``write_index`` list the engine passes to every layer) it turns the recorded batch and the allocators' per-request
  block lists into block tables, sequence lengths and query lengths, once per attention group (full / sliding), as
  host-built tensors (no read-back from the device). Each layer then writes its new K/V into the engine's pages with
  ``reshape_and_cache`` (slot mapping = the engine's write index) and runs ``paged_decode_attention`` for the
  requests with one new token and ``paged_prefill_attention`` (varlen: left-padded rows, q_lens / seq_lens per request)
  for the others.

The engine's page layout (``FullAttentionCacheAllocator.register_cache_tensor``): a block holds, per layer of its
group, a page of K then a page of V (``tokens_per_page`` rows each); a layer's token view
(``allocator._kv_token_views[layer]``) indexed by the write index is a ``[rows, Hkv, D]`` tensor, and viewed as
``[-1, tokens_per_page, Hkv, D]`` it is an NHD page pool in which slot = write index and the page of block ``b`` is
``b * block_physical_stride // tokens_per_page``.

Sliding-window groups keep a ring of ``sliding_window`` slots per request (token ``p`` at ring slot
``p % sliding_window``). With the window a multiple of the page size, logical page ``j`` of a request is ring page
``j % (window / page)``, so the kernels read the ring through a block table directly, after the write: a decode
step's write only evicts the token that just left the window. A chunk of several tokens whose request has grown past
the window would overwrite, while it writes, keys its own first rows still see: for such requests (and for those
only) the window's older tokens, at most ``window - 1`` per request, are copied with the chunk into scratch pages
before the write, and the prefill kernel reads those.

transformers 5.17 (the engine then switches the model to 'paged|sdpa' itself, and 'paged|<name>' attention functions
are handed the cache as ``kwargs["cache"]`` and update it themselves): the model is switched to ``PREFIXED_NAME``
instead, the cache's ``update`` is left alone (nothing calls it), and its layout is read from
``cache.group_cache_managers`` (block lists), ``layer_index_to_group_indices`` and ``key_cache[j]`` /
``value_cache[j]`` (``[rows, Hkv, D]``, block ``b`` = rows ``b * block_size ...``); the rest is the same.

Anything else (CUDA graphs or torch.compile configured for the engine, tensor parallelism, a layer spread over
devices, a page size or head_dim the kernels lack, a window that is not a multiple of the page size, a transformers
release whose internals named above changed) keeps transformers' own 'sdpa' path, with a warning naming the reason.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import warnings
import weakref

import torch

from llmkern import backends, paged_ops

CB_NAME = "llmkern_cb"  # no "flash", "sdpa", "flex", "paged|" or "/": transformers special-cases those
PREFIXED_NAME = "paged|" + CB_NAME  # releases whose engine runs 'paged|<name>' attention functions (5.17)
_MARK = "_llmkern_cb"  # the session on a manager, the engine on a transformers PagedAttentionCache

_FULL, _SLIDING = "full_attention", "sliding_attention"

__all__ = ["CB_NAME", "PREFIXED_NAME", "attach", "cb_attention_forward", "detach", "missing_hooks", "register"]


# ---------------------------------------------------------------------------------------------------------------------
# Registration and the attention function


def register() -> None:
    """Register ``CB_NAME`` (and ``PREFIXED_NAME``) with transformers' attention interface, and ``CB_NAME`` with its
    mask interface (SDPA's mask, for a forward outside the engine); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CB_NAME, cb_attention_forward)
    AttentionInterface.register(PREFIXED_NAME, cb_attention_forward)
    AttentionMaskInterface.register(CB_NAME, sdpa_mask)


@dataclasses.dataclass
class _NewKV:
    """What the engine's cache ``update`` hands the attention instead of dense K/V (5.25): the layer's new K/V,
    unwritten."""

    engine: "_Engine"
    layer_idx: int
    key: torch.Tensor  # [1, Hkv, T, D]
    value: torch.Tensor


def cb_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``AttentionInterface`` function for ``CB_NAME`` / ``PREFIXED_NAME``. Under the engine ``key`` is a ``_NewKV``
    (5.25), or the engine's cache comes as ``kwargs["cache"]`` (5.17); on any other forward (the model called directly
    while the name is set) transformers' SDPA runs."""
    if isinstance(key, _NewKV):
        engine, layer_idx, key, value = key.engine, key.layer_idx, key.key, key.value
    else:
        cache = kwargs.get("cache")
        engine = getattr(cache, "__dict__", {}).get(_MARK)
        layer_idx = getattr(module, "layer_idx", None)
        if engine is None or layer_idx is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            kwargs.pop("cache", None)
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"llmkern paged attention is for inference: attention dropout must be 0, got {dropout}")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    if softcap is None:
        softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    return engine.attend(query, layer_idx, key, value, float(scaling), softcap, kwargs["write_index"]), None


# ---------------------------------------------------------------------------------------------------------------------
# What is supported


def missing_hooks(manager, prefixed: bool = False) -> list[str]:
    """The transformers internals this module relies on that the installed release lacks (empty: all there).
    ``prefixed``: the engine runs 'paged|<name>' attention functions, which are handed the cache (5.17); otherwise
    the modules call the cache's ``update(key_states, value_states, layer_idx, kwargs)`` first (5.25)."""
    missing = []
    if not callable(getattr(manager, "_create_batch_processor", None)):
        missing.append("ContinuousBatchingManager._create_batch_processor()")
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
    except ImportError:
        return missing + ["transformers.generation.continuous_batching.cache.PagedAttentionCache"]
    wanted = [("extend_read_and_write_indices",
               ["request_id", "past_length", "query_length", "read_index", "write_index"])]
    if not prefixed:
        wanted.append(("update", ["key_states", "value_states", "layer_idx", "kwargs"]))
    for name, params in wanted:
        fn = getattr(PagedAttentionCache, name, None)
        try:
            got = list(inspect.signature(fn).parameters)[1:] if callable(fn) else None
        except (TypeError, ValueError):
            got = None
        if got != params:
            missing.append(f"PagedAttentionCache.{name}({', '.join(params)})"
                           + ("" if got is None else f" (found {name}({', '.join(got)}))"))
    return missing


def _pow2(n) -> bool:
    return isinstance(n, int) and 0 < n <= paged_ops.MAX_BLOCK_SIZE and not n & (n - 1)


def _unsupported(model, manager, prefixed: bool) -> str | None:
    """Why llmkern's attention cannot run under ``manager`` (None: it can)."""
    missing = missing_hooks(manager, prefixed)
    if missing:
        return ("this transformers release lacks what llmkern hooks into: " + "; ".join(missing)
                + " (llmkern/continuous.py)")
    cfg = getattr(manager, "continuous_batching_config", None)
    if cfg is None:
        return "the manager has no continuous_batching_config (llmkern/continuous.py)"
    graphs = getattr(cfg, "use_cuda_graph", None)
    if graphs is True or (isinstance(graphs, tuple) and any(graphs)):
        return "the engine is set to capture CUDA graphs (use_cuda_graph), which would replay without llmkern's " \
               "per-step planning"
    if getattr(cfg, "varlen_compile_config", None) is not None or getattr(cfg, "decode_compile_config", None):
        return "the engine is set to torch.compile its forward (varlen/decode compile configs)"
    helper = getattr(manager, "distributed_helper", None)
    if getattr(helper, "tp_size", 1) > 1:
        return "tensor parallelism"
    text = model.config.get_text_config()
    page = getattr(cfg, "page_size", getattr(cfg, "block_size", None))
    if not _pow2(page):
        return f"page_size={page}: llmkern's paged kernels take a power of two up to {paged_ops.MAX_BLOCK_SIZE}"
    if getattr(text, "kv_lora_rank", None) is not None:
        return "latent (MLA) attention pages"
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim > paged_ops.MAX_HEAD_DIM:
        return f"head_dim={head_dim} (llmkern's paged kernels take up to {paged_ops.MAX_HEAD_DIM})"
    if model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the model's dtype {model.dtype}"
    if model.device.type not in ("cpu", "cuda"):
        return f"the model is on {model.device.type}"
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1:
        return f"the model is spread over several devices ({sorted(devices)}), the engine's cache over one"
    # The engine's grouping (continuous_batching/cache.py, group_layers_by_attn_type): config.layer_types, else every
    # layer sliding when the config has a sliding_window.
    window = getattr(text, "sliding_window", None)
    kinds = set(getattr(text, "layer_types", None) or [_FULL if window is None else _SLIDING])
    if kinds - {_FULL, _SLIDING}:
        return f"attention types {sorted(kinds - {_FULL, _SLIDING})}"
    if _SLIDING in kinds and (not isinstance(window, int) or window % page):
        return (f"sliding_window={window} is not a multiple of page_size={page} (the engine keeps a ring of "
                f"sliding_window slots, which llmkern's kernels read through a block table only page by page)")
    return None


# ---------------------------------------------------------------------------------------------------------------------
# attach / detach


@dataclasses.dataclass
class _Session:
    """What ``attach`` left on a manager (``manager._llmkern_cb``)."""

    model: object  # weakref to the model
    reason: str | None  # None: llmkern's attention runs under this manager; else why not
    engine_name: str  # the attention name transformers gave the model for the manager ('sdpa', 'paged|sdpa')
    name: str  # llmkern's name under this manager: CB_NAME, or PREFIXED_NAME where the engine wants 'paged|'
    forced_backend: str | None  # the llmkern backend forced in the thread that made the manager
    thread: int  # that thread
    original: object = None  # the manager's own _create_batch_processor (bound)


def attach(model, manager) -> str | None:
    """Put ``model``'s attention under ``manager`` (just built on 'sdpa') on llmkern's kernels. Returns None when it
    does, else the reason it does not: the manager then keeps transformers' attention (the caller warns). A manager
    attached before (the cached manager of a persistent session) keeps its decision."""
    session = vars(manager).get(_MARK)
    if session is not None and session.model() is model:
        session.engine_name = model.config._attn_implementation
        session.forced_backend, session.thread = backends.local.forced, threading.get_ident()
        if session.reason is None:
            model.set_attn_implementation(session.name)
        return session.reason
    engine_name = model.config._attn_implementation
    prefixed = engine_name.startswith("paged|")
    reason = _unsupported(model, manager, prefixed)
    session = _Session(model=weakref.ref(model), reason=reason, engine_name=engine_name,
                       name=PREFIXED_NAME if prefixed else CB_NAME, forced_backend=backends.local.forced,
                       thread=threading.get_ident())
    vars(manager)[_MARK] = session
    if reason is not None:
        return reason
    register()
    session.original = manager._create_batch_processor

    def _create_batch_processor():
        return _make_processor(manager, session)

    vars(manager)["_create_batch_processor"] = _create_batch_processor
    model.set_attn_implementation(session.name)
    return None


def _make_processor(manager, session: _Session):
    model = session.model()
    if session.reason is None and model is not None:
        # Set before the batch processor builds its inputs: under llmkern's name they carry no dense mask.
        model.set_attn_implementation(session.name)
    processor = session.original()
    cache = getattr(processor, "cache", None)
    if session.reason is None and (cache is None or vars(cache).get(_MARK) is None):
        why = _Engine.check(cache) if cache is not None else "the batch processor has no cache"
        if why is None:
            _Engine(cache, hand_over_update=session.name == CB_NAME).install()
        else:
            session.reason = f"the engine's cache is not laid out as llmkern expects: {why} (llmkern/continuous.py)"
            warnings.warn(f"continuous batching: llmkern's paged attention cannot run under this manager "
                          f"({session.reason}); the model runs transformers' {session.engine_name!r} attention "
                          f"under it instead, and switches back to llmkern's attention when the manager stops.",
                          UserWarning)
            if model is not None:
                model.set_attn_implementation(session.engine_name)
            processor = session.original()  # rebuilt on transformers' attention: with the masks it needs
    if threading.get_ident() != session.thread:
        # The manager's generation thread: llmkern ops there run on the backend the caller forced (use_backend is
        # per thread).
        backends.local.forced = session.forced_backend
        backends.local.direct = backends._direct_table(session.forced_backend or backends._ENV_BACKEND)
    return processor


def detach(model) -> None:
    """``unpatch``: a manager kept on the model for a next session (``persistent_manager=True``) forgets llmkern:
    its batch processor (built without masks, over an instrumented cache) is dropped, so its next session builds one
    for transformers' own attention."""
    manager = vars(model).get("_cached_continuous_batching_manager")
    session = vars(manager).get(_MARK) if manager is not None else None
    if session is None:
        return
    processor = getattr(manager, "batch_processor", None)
    cache = getattr(processor, "cache", None)
    engine = vars(cache).get(_MARK) if cache is not None else None
    if engine is not None:
        engine.uninstall()
    manager.batch_processor = None
    if session.original is not None:
        vars(manager).pop("_create_batch_processor", None)
    vars(manager).pop(_MARK, None)


# ---------------------------------------------------------------------------------------------------------------------
# The engine's cache, instrumented


@dataclasses.dataclass
class _Group:
    """One attention group of the engine (one allocator): its layers share block lists and write indices."""

    index: int  # the group's row in write_index
    block_table: dict  # the allocator's request_id -> [block ids], read at each step
    sliding: bool
    page: int  # tokens per page
    page_stride: int  # pages between two blocks in a layer's page view
    block_rows: int  # rows between two blocks in a layer's token view
    window: int | None


@dataclasses.dataclass
class _Layer:
    group: _Group
    k_rows: torch.Tensor  # [rows, Hkv, D], indexed by the write index
    v_rows: torch.Tensor
    k_pages: torch.Tensor  # [num_pages, page, Hkv, D], slot = write index
    v_pages: torch.Tensor


def _row_views(views, page: int) -> bool:
    return isinstance(views, (tuple, list)) and len(views) == 2 and all(
        isinstance(v, torch.Tensor) and v.dim() == 3 and v.stride(-1) == 1 and v.stride(0) == v.shape[1] * v.shape[2]
        and v.shape[0] % page == 0 for v in views)


def _check_allocators(cache) -> str | None:
    """5.25's layout: ``cache.cache_allocators`` (one per attention type), pages of K then V per layer in a block."""
    allocators = cache.cache_allocators
    if not isinstance(allocators, dict) or not allocators or not isinstance(
            getattr(cache, "layer_to_allocator", None), dict):
        return "PagedAttentionCache.cache_allocators / layer_to_allocator are not dicts"
    for allocator in allocators.values():
        name = type(allocator).__name__
        for attr in ("index", "layer_type", "layer_indices", "tokens_per_page", "block_physical_stride",
                     "block_table", "_kv_token_views"):
            if not hasattr(allocator, attr):
                return f"no {name}.{attr}"
        if allocator.layer_type not in (_FULL, _SLIDING):
            return f"{name}.layer_type = {allocator.layer_type!r}"
        page = allocator.tokens_per_page
        if not _pow2(page) or allocator.block_physical_stride % page:
            return f"{name}: tokens_per_page={page}, block_physical_stride={allocator.block_physical_stride}"
        if allocator.layer_type == _SLIDING and (not isinstance(getattr(allocator, "sliding_window", None), int)
                                                 or allocator.sliding_window % page):
            return f"{name}.sliding_window = {getattr(allocator, 'sliding_window', None)!r}"
        for layer_idx in allocator.layer_indices:
            if not _row_views(allocator._kv_token_views.get(layer_idx), page):
                return f"{name}._kv_token_views[{layer_idx}] is not a pair of [rows, Hkv, D] row views"
    return None


def _layout_allocators(cache):
    groups, layers = [], {}
    for allocator in cache.cache_allocators.values():
        page = allocator.tokens_per_page
        sliding = allocator.layer_type == _SLIDING
        group = _Group(index=allocator.index, block_table=allocator.block_table, sliding=sliding, page=page,
                       page_stride=allocator.block_physical_stride // page, block_rows=allocator.block_physical_stride,
                       window=allocator.sliding_window if sliding else None)
        groups.append(group)
        for layer_idx in allocator.layer_indices:
            layers[layer_idx] = (group, *allocator._kv_token_views[layer_idx])
    return groups, layers


def _check_group_managers(cache) -> str | None:
    """5.17's layout: ``cache.group_cache_managers`` (one per layer group), one ``[rows, Hkv, D]`` K and V tensor per
    position in a group (``key_cache[j]``), block ``b`` = rows ``b * block_size ...``."""
    managers, where = cache.group_cache_managers, getattr(cache, "layer_index_to_group_indices", None)
    page = getattr(cache, "block_size", None)
    if not isinstance(managers, list) or not managers or not isinstance(where, dict):
        return "PagedAttentionCache.group_cache_managers / layer_index_to_group_indices are not a list and a dict"
    if not _pow2(page):
        return f"PagedAttentionCache.block_size = {page!r}"
    for cm in managers:
        name = type(cm).__name__
        if not isinstance(getattr(cm, "block_table", None), dict) or not isinstance(getattr(cm, "_index", None), int):
            return f"no {name}.block_table / _index"
        window = getattr(cm, "sliding_window", None)
        if window is not None and (not isinstance(window, int) or window % page):
            return f"{name}.sliding_window = {window!r}"
    for layer_idx, (g, j) in where.items():
        if not (0 <= g < len(managers)) or not _row_views((cache.key_cache[j], cache.value_cache[j]), page):
            return f"PagedAttentionCache.key_cache / value_cache[{j}] (layer {layer_idx}) are not [rows, Hkv, D] rows"
    return None


def _layout_group_managers(cache):
    page = cache.block_size
    groups = []
    for g, cm in enumerate(cache.group_cache_managers):
        window = getattr(cm, "sliding_window", None)
        groups.append(_Group(index=g, block_table=cm.block_table, sliding=window is not None, page=page,
                             page_stride=1, block_rows=page, window=window))
    layers = {layer_idx: (groups[g], cache.key_cache[j], cache.value_cache[j])
              for layer_idx, (g, j) in cache.layer_index_to_group_indices.items()}
    return groups, layers


class _Engine:
    """llmkern's side of one transformers ``PagedAttentionCache`` (``cache._llmkern_cb``)."""

    def __init__(self, cache, hand_over_update: bool):
        self.cache = cache
        self.hand_over_update = hand_over_update  # 5.25: the modules call cache.update before the attention
        layout = _layout_allocators if hasattr(cache, "cache_allocators") else _layout_group_managers
        self.groups, rows = layout(cache)
        self.layers: dict = {}
        for layer_idx, (group, k_rows, v_rows) in rows.items():
            k_pages = k_rows.view(-1, group.page, *k_rows.shape[1:])
            v_pages = v_rows.view(-1, group.page, *v_rows.shape[1:])
            n = min(k_pages.shape[0], v_pages.shape[0])
            self.layers[layer_idx] = _Layer(group, k_rows, v_rows, k_pages[:n], v_pages[:n])
        self.batch: list = []  # (request_id, past_length, query_length) of the batch being prepared / run
        self._batch_key = None
        self._step_key = None
        self._step: _Step | None = None

    @staticmethod
    def check(cache) -> str | None:
        """Why the cache's instance is not what ``_Engine`` reads (None: it is)."""
        try:
            if hasattr(cache, "cache_allocators"):
                return _check_allocators(cache)
            if hasattr(cache, "group_cache_managers"):
                return _check_group_managers(cache)
        except Exception as e:  # an attribute of another shape: the same verdict, with what was met
            return f"{type(e).__name__}: {e}"
        return "neither PagedAttentionCache.cache_allocators (5.25) nor .group_cache_managers (5.17)"

    def install(self) -> None:
        d = vars(self.cache)
        self._own_extend = self.cache.extend_read_and_write_indices
        d["extend_read_and_write_indices"] = self.extend_read_and_write_indices
        if self.hand_over_update:
            d["update"] = self.update
        d[_MARK] = self

    def uninstall(self) -> None:
        d = vars(self.cache)
        for name in ("extend_read_and_write_indices", "update", _MARK):
            d.pop(name, None)

    # -- the two methods the engine calls --------------------------------------------------------------------------

    def extend_read_and_write_indices(self, request_id, past_length, query_length, read_index, write_index):
        if self._batch_key is not write_index:  # a new batch: the engine makes a new list per batch
            self._batch_key, self.batch = write_index, []
        self.batch.append((request_id, int(past_length), int(query_length)))
        # Only the write index: nothing reads the cache through a read index now.
        return self._own_extend(request_id, past_length, query_length, None, write_index)

    def update(self, key_states, value_states, layer_idx, kwargs=None):
        handle = _NewKV(self, layer_idx, key_states, value_states)
        return handle, handle

    # -- attention --------------------------------------------------------------------------------------------------

    def attend(self, query, layer_idx: int, key, value, scale: float, softcap, write_index) -> torch.Tensor:
        """One layer: write the new K/V (``[1, Hkv, T, D]``) into the engine's pages, attend over them. Returns
        ``[1, T, Hq, D]``."""
        T = query.shape[2]
        if self._step_key is not write_index:
            self._step = _Step(self.batch, T, query.device)
            self._step_key = write_index
        layer = self.layers[layer_idx]
        group = layer.group
        plan = self._step.group(group)
        k_new = key[0].transpose(0, 1)  # [T, Hkv, D]
        v_new = value[0].transpose(0, 1)
        q_all = query[0].transpose(0, 1)  # [T, Hq, D]
        window = group.window
        wrapped = None
        if plan.wrap is not None:
            # Before the write, which overwrites ring slots these rows still read.
            w = plan.wrap
            shape = (w.num_pages, group.page) + tuple(k_new.shape[1:])
            sk, sv = k_new.new_zeros(shape), v_new.new_zeros(shape)
            if w.ring_rows.numel():
                paged_ops.reshape_and_cache(layer.k_rows.index_select(0, w.ring_rows),
                                            layer.v_rows.index_select(0, w.ring_rows), sk, sv, w.old_slots)
            paged_ops.reshape_and_cache(k_new, v_new, sk, sv, w.new_slots)
            wrapped = (sk, sv)
        paged_ops.reshape_and_cache(k_new, v_new, layer.k_pages, layer.v_pages, write_index[group.index])

        if plan.decode is not None and plan.decode.tokens is None:  # a decode-only step
            d = plan.decode
            out = paged_ops.paged_decode_attention(q_all, layer.k_pages, layer.v_pages, d.block_tables, d.seq_lens,
                                                   scale, sliding_window=window, softcap=softcap,
                                                   max_seq_len=d.max_seq_len)
            return out.unsqueeze(0)
        parts = [(plan.prefill, layer.k_pages, layer.v_pages)]
        if plan.wrap is not None:
            parts.append((plan.wrap.rows, *wrapped))
        for rows, k_pages, v_pages in parts:
            if rows is not None and rows.whole:  # one request, every token of the step: q is [1, Hq, T, D] already
                part = paged_ops.paged_prefill_attention(query, k_pages, v_pages, rows.block_tables, rows.seq_lens,
                                                         rows.q_lens, scale, sliding_window=window, softcap=softcap)
                return part.transpose(1, 2)
        out = q_all.new_empty(q_all.shape)
        if plan.decode is not None:
            d = plan.decode
            part = paged_ops.paged_decode_attention(q_all.index_select(0, d.tokens), layer.k_pages, layer.v_pages,
                                                    d.block_tables, d.seq_lens, scale, sliding_window=window,
                                                    softcap=softcap, max_seq_len=d.max_seq_len)
            out.index_copy_(0, d.tokens, part)
        for rows, k_pages, v_pages in parts:
            if rows is None:
                continue
            B, S = rows.q_lens.shape[0], rows.width
            q_pad = q_all.new_zeros((B * S,) + tuple(q_all.shape[1:]))
            q_pad.index_copy_(0, rows.dest, q_all.index_select(0, rows.tokens))
            part = paged_ops.paged_prefill_attention(q_pad.view(B, S, *q_all.shape[1:]).transpose(1, 2), k_pages,
                                                     v_pages, rows.block_tables, rows.seq_lens, rows.q_lens, scale,
                                                     sliding_window=window, softcap=softcap)
            part = part.transpose(1, 2).reshape(B * S, *q_all.shape[1:]).index_select(0, rows.dest)
            out.index_copy_(0, rows.tokens, part)
        return out.unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------------------
# The per-step plan


@dataclasses.dataclass
class _DecodeRows:
    tokens: torch.Tensor | None  # int64, the rows' tokens in the step (None: every token, in order)
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int


@dataclasses.dataclass
class _PrefillRows:
    tokens: torch.Tensor  # int64 [n], the rows' tokens in the step
    dest: torch.Tensor  # int64 [n], where each goes in the left-padded [B * width] rows
    width: int
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    q_lens: torch.Tensor
    whole: bool  # one request holding every token of the step


@dataclasses.dataclass
class _WrapPlan:
    """Sliding rows of a chunk that overwrites its own window: scratch pages with the window's older tokens."""

    rows: _PrefillRows  # block tables into the scratch pages
    num_pages: int
    ring_rows: torch.Tensor  # int64, the older tokens' rows in the layer's token view
    old_slots: torch.Tensor  # int64, their slots in the scratch pages
    new_slots: torch.Tensor  # int64 [T], the step's tokens' slots in the scratch pages (-1: not there)


@dataclasses.dataclass
class _GroupPlan:
    decode: _DecodeRows | None
    prefill: _PrefillRows | None
    wrap: _WrapPlan | None


def _int32(rows, device) -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=1))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)


def _prefill_rows(requests, tables, device, total: int) -> _PrefillRows:
    """``requests``: (first token, past, q) per request."""
    width = max(q for _t, _p, q in requests)
    tokens, dest = [], []
    for b, (t0, _past, q) in enumerate(requests):
        tokens.extend(range(t0, t0 + q))
        dest.extend(range(b * width + width - q, (b + 1) * width))
    i64 = dict(dtype=torch.int64, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return _PrefillRows(tokens=torch.tensor(tokens, **i64), dest=torch.tensor(dest, **i64), width=width,
                        block_tables=_int32(tables, device),
                        seq_lens=torch.tensor([p + q for _t, p, q in requests], **i32),
                        q_lens=torch.tensor([q for _t, _p, q in requests], **i32),
                        whole=len(requests) == 1 and width == total)


class _Step:
    """A step's batch (host ints) and, per attention group, its tensors; built at the group's first layer."""

    def __init__(self, batch: list, num_tokens: int, device):
        if sum(q for _r, _p, q in batch) != num_tokens:
            raise RuntimeError(f"llmkern continuous batching: the step runs {num_tokens} tokens but the batch the "
                               f"engine prepared holds {sum(q for _r, _p, q in batch)} ({len(batch)} requests); "
                               f"padded inputs (CUDA graphs, torch.compile) are not supported on this path")
        self.batch = batch
        self.num_tokens = num_tokens
        self.device = device
        self.plans: dict = {}

    def group(self, group: _Group) -> _GroupPlan:
        plan = self.plans.get(group.index)
        if plan is None:
            plan = self.plans[group.index] = self._plan(group)
        return plan

    def _plan(self, g: _Group) -> _GroupPlan:
        page, stride, window = g.page, g.page_stride, g.window
        tables = g.block_table
        dec, dec_rows, pre, pre_rows, wrap = [], [], [], [], []
        t0 = 0
        for request_id, past, q in self.batch:
            total = past + q
            blocks = tables[request_id]
            n = -(-total // page)
            if g.sliding and q > 1 and total > window:
                wrap.append((t0, past, q, blocks))
            else:
                if g.sliding:
                    ring = window // page
                    row = [blocks[j % ring] * stride for j in range(n)]
                else:
                    if len(blocks) < n:
                        raise RuntimeError(f"llmkern continuous batching: request {request_id!r} holds "
                                           f"{len(blocks)} blocks for {total} tokens of {page}")
                    row = [b * stride for b in blocks[:n]]
                (dec if q == 1 else pre).append((t0, past, q))
                (dec_rows if q == 1 else pre_rows).append(row)
            t0 += q
        dev = self.device
        decode = prefill = wrapped = None
        if dec:
            every = len(dec) == self.num_tokens
            decode = _DecodeRows(
                tokens=None if every else torch.tensor([t for t, _p, _q in dec], dtype=torch.int64, device=dev),
                block_tables=_int32(dec_rows, dev),
                seq_lens=torch.tensor([p + 1 for _t, p, _q in dec], dtype=torch.int32, device=dev),
                max_seq_len=max(p + 1 for _t, p, _q in dec))
        if pre:
            prefill = _prefill_rows(pre, pre_rows, dev, self.num_tokens)
        if wrap:
            wrapped = self._wrap_plan(g, wrap)
        return _GroupPlan(decode=decode, prefill=prefill, wrap=wrapped)

    def _wrap_plan(self, g: _Group, wrap: list) -> _WrapPlan:
        page, window, bps = g.page, g.window, g.block_rows
        ring_rows, old_slots, rows = [], [], []
        new_slots = [-1] * self.num_tokens
        base = 1  # scratch page 0 stays zero: table entries before the window point there
        for t0, past, q, blocks in wrap:
            total = past + q
            lo = max(0, past - window + 1)  # the oldest token any row of the chunk sees
            first = lo // page
            pages = -(-total // page) - first
            rows.append([0] * first + list(range(base, base + pages)))

            def slot(x, base=base, first=first):
                return (base + x // page - first) * page + x % page

            for x in range(lo, past):
                r = x % window
                ring_rows.append(blocks[r // page] * bps + r % page)
                old_slots.append(slot(x))
            for i in range(q):
                new_slots[t0 + i] = slot(past + i)
            base += pages
        dev = self.device
        i64 = dict(dtype=torch.int64, device=dev)
        return _WrapPlan(rows=_prefill_rows([(t0, p, q) for t0, p, q, _b in wrap], rows, dev, self.num_tokens),
                         num_pages=base, ring_rows=torch.tensor(ring_rows, **i64),
                         old_slots=torch.tensor(old_slots, **i64), new_slots=torch.tensor(new_slots, **i64))
