"""A paged KV cache for Hugging Face decoders: a block allocator and ``PagedKVCache``, a ``transformers.Cache``.

Storage (per layer, docs/design.md "Paged KV cache"): K and V pages ``[num_blocks, block_size, Hkv, D]``. A sequence
(one batch row) owns a list of pages, its *block table*; token ``p`` of the sequence lives in page
``table[p // block_size]`` at row ``p % block_size``. Only real tokens are stored: HF left padding
(``attention_mask == 0``) gets slot -1 and is skipped, so position ``p`` in the cache is the token's real position,
the one HF's ``position_ids`` (``cumsum(mask) - 1``) gave it RoPE with.

How a forward runs through it (``llmkern.attention`` holds the other half):

1. The model's mask creation calls the registered mask function, which hands the 2-D padding mask on, unchanged,
   as the ``attention_mask`` every attention call receives.
2. Each layer calls ``update(k, v, layer_idx)``. Nothing is written yet: ``update`` returns a ``PagedKV`` handle
   (the new K/V plus a reference to this cache) in place of the ``(keys, values)`` tensors. transformers passes no
   cache arguments to the attention function, so the handle is how the cache reaches it.
3. The first attention call of the forward calls ``plan(handle, mask)``: from the padding mask it checks the whole
   step's block demand against the free list (and raises ``CacheExhaustedError`` before touching anything), copies
   shared partial pages (copy-on-write), allocates pages, and builds the step's slot mapping, block tables, seq_lens
   and q_lens on the device — once; every later layer of the forward reuses the plan (docs/design.md "Code habits",
   FlashInfer's plan/run). Each layer then writes its K/V (``write``) and runs the paged attention op on
   ``pages(layer_idx)``.

The write is deferred from ``update`` to the attention call because the slot mapping depends on the padding mask,
which only the attention call has; both run back to back in the same layer, so nothing can observe the difference.

Beam search: ``reorder_cache(beam_idx)`` reorders block tables and reference counts, never pages. Beams that share
a partial last page get a private copy of it when they next write to it (``copy_blocks``); full shared pages are
never written again and stay shared.

Reserved mode (``max_cache_len=``, what ``generate(cache_implementation="static")`` creates on a patched model): the
decode step can be captured (``torch.compile(fullgraph=True)``, CUDA graphs) because it makes no host sync, no
host-to-device copy and no allocation. Every sequence holds, from its first forward on, pages for ``max_cache_len``
tokens; the block tables ``[B, pages_per_sequence]``, the lengths, the column count and the history of which
columns were real live in persistent device buffers, one set per device (``_Reserved``), and a decode step computes
its slot mapping and advances the lengths there, from the padding mask's column, with device ops only. The host
mirror (``_lens``, ``_history``, ``_seen``) is then stale; it is read back (one sync) only when host code asks
(``seq_lens()``, ``memory()``, ``crop``, beam reorders, a prefill on top of the cache), and pushed to the device
buffers again after the host changed it. A decode step past ``max_cache_len`` columns cannot raise inside a captured
step: in eager it raises ``CacheExhaustedError`` before the step; a captured one stores nothing, keeps the lengths,
and the error is raised at the next host read-back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from llmkern import paged_ops

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the paged ops take
_MAX_BLOCK_SIZE = 256  # paged_ops.MAX_BLOCK_SIZE: a block is one tile of the attention kernels

__all__ = ["BlockAllocator", "CacheExhaustedError", "CacheMemory", "PagedKV", "PagedKVCache", "StepPlan"]


class CacheExhaustedError(RuntimeError):
    """The paged KV cache has fewer free blocks than a step needs. Raised before anything is allocated or written,
    so the cache still holds exactly what it held before the failed step."""

    def __init__(self, message: str, *, capacity: int, free: int, demand: int):
        super().__init__(message)
        self.capacity = capacity
        self.free = free
        self.demand = demand


# ---------------------------------------------------------------------------------------------------------------------
# Block allocator


class BlockAllocator:
    """Free list and reference counts over block ids ``0 .. num_blocks - 1``.

    A block is free when its count is 0. ``allocate`` hands out blocks with count 1; sharing a block between
    sequences (beam search) is ``incref``; a sequence letting go of it is ``decref``, which returns it to the free
    list at 0. Lowest ids are handed out first.

        >>> a = BlockAllocator(4)
        >>> a.allocate(2)
        [0, 1]
        >>> a.incref([1]); a.decref([0, 1]); a.num_free
        3
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheExhaustedError(
                f"block allocator: {n} blocks requested, {len(self._free)} of {self.num_blocks} free",
                capacity=self.num_blocks, free=len(self._free), demand=n)
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def incref(self, blocks) -> None:
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} is free; it cannot be shared")
            self._ref[b] += 1

    def decref(self, blocks) -> None:
        for b in blocks:
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} is already free")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def grow(self, num_blocks: int) -> None:
        """Add free blocks ``self.num_blocks .. num_blocks - 1``."""
        if num_blocks < self.num_blocks:
            raise ValueError(f"cannot shrink the allocator from {self.num_blocks} to {num_blocks} blocks")
        self._ref.extend([0] * (num_blocks - self.num_blocks))
        self._free.extend(range(self.num_blocks, num_blocks))
        self._free.sort(reverse=True)  # keep handing out the lowest id first
        self.num_blocks = num_blocks

    def reset(self) -> None:
        self.__init__(self.num_blocks)


# ---------------------------------------------------------------------------------------------------------------------
# Per-forward objects


@dataclasses.dataclass
class PagedKV:
    """What ``PagedKVCache.update`` returns in place of the ``(keys, values)`` tensors; the attention function gets
    it as ``key`` (and ``value``)."""

    cache: "PagedKVCache"
    layer_idx: int
    key: torch.Tensor  # [B, Hkv, S, D], the new tokens only
    value: torch.Tensor  # [B, Hkv, S, D]
    step: int

    def __getattr__(self, name: str):
        # Only reached for attributes a PagedKV lacks: some attention code other than llmkern's took the handle for
        # a key tensor (`.shape`, `.dtype`, ...). Say what happened and what to do instead of "has no attribute".
        if name.startswith("__"):
            raise AttributeError(name)
        raise TypeError(_not_llmkern_attention(f"it asked the key for `.{name}`"))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # The same mistake where the foreign attention hands the handle straight to a torch function (transformers
        # 5.4's SDPA path calls torch's scaled_dot_product_attention with it, touching no attribute first).
        raise TypeError(_not_llmkern_attention(f"it passed the key to {getattr(func, '__name__', func)}"))


def _not_llmkern_attention(how: str) -> str:
    return (f"a PagedKVCache reached an attention implementation that is not llmkern's ({how}): a PagedKVCache "
            f"works only on a model whose attention runs llmkern's paged attention. Call llmkern.patch(model) (or "
            f"llmkern.attention.install(model)) first, or pass a transformers DynamicCache (or no cache) to this "
            f"model.")


@dataclasses.dataclass
class StepPlan:
    """Host-side metadata of one forward, computed once and used by every layer."""

    step: int
    batch_size: int
    q_len: int  # S, query columns of this forward (padding included)
    device: torch.device  # where the tensors below live (PagedKVCache.plan gives one plan per device)
    slot_mapping: torch.Tensor  # int64 [B * S], row-major over (b, s); -1 = padding
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B], real tokens of each sequence, this step's included
    q_lens: torch.Tensor  # int32 [B], real tokens of this step
    max_seq_len: int
    decode: bool  # every sequence adds exactly one token (S == 1): the decode kernel applies
    q_index: torch.Tensor | None  # int64 [B, S]: gathers q rows so real rows are the last q_lens[b] (None = as is)
    # Nothing was held before this step and each row's real tokens are the last of its S columns (left padding or
    # none): the attention is a causal one over this step's own K/V, which dense attention can serve
    # (llmkern.attention, "fresh prefill"). real: bool [B, S] on the device when some column is padding, else None.
    fresh: bool = False
    real: torch.Tensor | None = None
    # Per-step state of the attention function (llmkern.attention), filled at the step's first layer:
    num_splits: dict = dataclasses.field(default_factory=dict)  # sliding_window -> decode split count
    direct: set = dataclasses.field(default_factory=set)  # (scale, window, softcap) cleared for direct C++ calls


@dataclasses.dataclass
class CacheMemory:
    """``PagedKVCache.memory()``: what the pages reserve and how much of that holds tokens."""

    reserved_bytes: int  # all pages, K and V, all layers
    per_layer_bytes: int  # K + V pages of one layer
    used_bytes: int  # pages handed out to sequences (shared pages counted once)
    token_bytes: int  # the slots of those pages that hold a token
    num_blocks: int
    used_blocks: int
    block_size: int
    num_tokens: int  # distinct token slots held (a prefix shared by beams counts once)
    bytes_per_token: int  # K + V of one token over all layers
    peak_bytes: int = 0  # most bytes the pages ever held at once, a pool growth's transient included

    def __str__(self) -> str:
        return (f"{_fmt_bytes(self.reserved_bytes)} reserved ({self.num_blocks} blocks x {self.block_size} tokens, "
                f"{_fmt_bytes(self.per_layer_bytes)} per layer; peak {_fmt_bytes(self.peak_bytes)}), "
                f"{_fmt_bytes(self.used_bytes)} in {self.used_blocks} used blocks, {_fmt_bytes(self.token_bytes)} "
                f"holding {self.num_tokens} tokens")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclasses.dataclass(eq=False)
class _Reserved:
    """The reserved mode's persistent buffers on one device (module docstring). A decode step updates them in place,
    so their addresses never change while the batch keeps its size (what CUDA graphs and compiled steps need)."""

    device: torch.device
    block_tables: torch.Tensor  # int32 [B, pages_per_sequence]
    seq_lens: torch.Tensor  # int32 [B], real tokens held
    slot_mapping: torch.Tensor  # int64 [B], the decode step's slots (-1: not stored)
    seen: torch.Tensor  # int64 0-d, columns processed (padding included)
    history: torch.Tensor  # bool [B, max_cache_len], which columns were real tokens
    overflow: torch.Tensor  # bool 0-d, a decode step ran past max_cache_len (raised at the next read-back)
    plan: "StepPlan"  # the decode plan over these buffers, the same object every step
    first_layer: int  # the first layer on this device: it advances the buffers once per step


# ---------------------------------------------------------------------------------------------------------------------
# The HF Cache


class PagedLayer(CacheLayerMixin):
    """One layer of a ``PagedKVCache``. Sequence bookkeeping is shared by all layers and lives in the cache; a layer
    holds its pages, ``k_pages``/``v_pages`` ``[num_blocks, block_size, Hkv, D]`` (None before the first step).

    ``keys``/``values`` read as a transformers cache layer's do: ``[batch, Hkv, columns, head_dim]``, gathered from
    the pages on each read (a new tensor, ``PagedKVCache.dense``; writing to it does not change the cache). Columns
    are the cache's ``get_seq_length()``, padding included, as in a ``DynamicCache``; a padding column, whose K/V
    the paged cache never stores, reads as zeros. They cannot be assigned: the pages are the cache's."""

    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: "PagedKVCache", layer_idx: int):
        self._cache = cache
        self.layer_idx = layer_idx
        self.k_pages = self.v_pages = None
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.k_pages is None else self._cache.dense(self.layer_idx)[0]

    @keys.setter
    def keys(self, value) -> None:
        self._refuse_set("keys", value)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.v_pages is None else self._cache.dense(self.layer_idx)[1]

    @values.setter
    def values(self, value) -> None:
        self._refuse_set("values", value)

    def _refuse_set(self, name: str, value) -> None:
        if value is not None or self.k_pages is not None:  # CacheLayerMixin.__init__ sets both to None
            raise AttributeError(f"PagedLayer.{name} is a view gathered from the paged cache's pages and cannot be "
                                 f"assigned; the pages are k_pages / v_pages, written by the attention "
                                 f"(PagedKVCache.write)")

    @property
    def is_compileable(self) -> bool:  # transformers asks the layers too
        return self._cache.reserved

    def lazy_initialization(self, key_states, value_states) -> None:
        self._cache._ensure_layer(self.layer_idx, key_states)

    def update(self, key_states, value_states, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_max_cache_shape(self) -> int:  # abstract in transformers' CacheLayerMixin up to 5.2x: no fixed maximum
        return -1

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:  # the cache resets all layers at once
        pass

    def reorder_cache(self, beam_idx) -> None:
        pass

    def offload(self):
        raise NotImplementedError("PagedKVCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("PagedKVCache does not support offloading")

    def __repr__(self) -> str:
        return f"PagedLayer({self.layer_idx})"


def _decoder_dims(config) -> tuple[int, int, int]:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return n_layers, n_kv, head_dim


def _config_dtype(config) -> torch.dtype | None:
    dt = getattr(config, "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else None


class PagedKVCache(Cache):
    """A paged KV cache usable as ``past_key_values`` of ``generate`` and ``forward`` in transformers 5.23, for
    models whose attention implementation is llmkern's (``llmkern.attention.install(model)``).

    Args:
        config: the model's config (layers, KV heads, head_dim are read from it).
        block_size: tokens per page, a power of two in 1..256.
        num_blocks: pages per layer. Fixed capacity (a step that needs more raises ``CacheExhaustedError``) unless
            ``growable=True``, when it is the initial size.
        memory_fraction: alternative to ``num_blocks``/``max_memory_bytes``, as vLLM's ``gpu_memory_utilization``
            sizes its pool: a fixed pool of this fraction (0 < f <= 1) of the memory free on the pages' device(s) at
            construction (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of /proc/meminfo), allocated up
            front; with a device map, each device gives its share for the layers it holds and the smallest pool
            wins. Needs every layer's device (``device=`` a device or a map without None; None alone means CPU).
        max_memory_bytes: alternative to ``num_blocks``: a fixed pool of as many pages as fit, K and V of all layers
            included, allocated up front. Too small for one block of every layer is a ``ValueError``.
        dtype, device: of the pages. Default: the first K/V written (a cache with a fixed capacity allocates at
            construction with ``dtype`` or the config's dtype and ``device`` or CPU, and moves to the K/V's dtype and
            device on the first write when those were not given explicitly). ``device`` may also map every layer
            index to a device (a model spread over devices, ``device_map``): each layer's pages live on its own
            device, and the step's block tables and lengths are copied once to each device that needs them; a
            ``None`` entry means "where the layer's first K/V are" (allocated then, not at construction). K/V on
            another device than the one given for its layer is a ``ValueError``.
        num_kv_heads: KV heads this process holds per layer. Default: the config's. Under tensor parallelism each
            rank holds a shard (``tp_plan``: config's count / number of ranks); pass it to size the pool for the
            shard. Without it, a layer whose first K/V hold fewer heads than the config's (a shard) gets pages of
            that many heads when it is first written (the pool keeps its block count).
        max_batch_size: largest batch accepted. Without ``num_blocks``/``max_memory_bytes`` it also sizes the cache:
            ``max_batch_size`` sequences of ``config.max_position_embeddings`` tokens. When none of the three is
            given the pool grows (doubling) whenever a step needs more pages.
        max_cache_len: with ``max_batch_size``, the reserved (capturable) mode of the module docstring, transformers'
            ``StaticCache`` sizing: up to ``max_batch_size`` sequences of up to ``max_cache_len`` columns each (padding
            included), every sequence's pages reserved at its first forward, ``max_batch_size * ceil(max_cache_len /
            block_size)`` pages per layer. ``is_compileable`` is then True and the decode step makes no host sync.
            Excludes ``num_blocks``, ``max_memory_bytes`` and ``growable=True``.
        growable: whether the pool grows when a step needs more pages than are free. Default: only when none of
            ``num_blocks``, ``max_memory_bytes`` and ``max_batch_size`` is given. ``num_blocks=n, growable=True`` starts
            with n pages (what ``generate`` creates on its own: sized for the call, and able to serve a longer next
            turn). Growth is layer by layer: at no moment do the pages hold more than the new pool plus one layer's
            K or V pages of the old one (``memory().peak_bytes``).

    Example:
        >>> cache = PagedKVCache(model.config, block_size=16, num_blocks=256)
        >>> out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
        >>> cache.memory().token_bytes, cache
    """

    def __init__(self, config, *, block_size: int = 16, num_blocks: int | None = None,
                 max_memory_bytes: int | None = None, dtype: torch.dtype | None = None,
                 device=None, max_batch_size: int | None = None, growable: bool | None = None,
                 num_kv_heads: int | None = None, max_cache_len: int | None = None,
                 memory_fraction: float | None = None):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or not (
                1 <= block_size <= _MAX_BLOCK_SIZE) or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two in 1..{_MAX_BLOCK_SIZE}, got {block_size!r}")
        if num_blocks is not None and max_memory_bytes is not None:
            raise ValueError(f"pass num_blocks or max_memory_bytes, not both; got num_blocks={num_blocks} and "
                             f"max_memory_bytes={max_memory_bytes}")
        if memory_fraction is not None:
            if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)) or not (
                    0 < memory_fraction <= 1):
                raise ValueError(f"memory_fraction must be a number in (0, 1], the share of the device's free memory "
                                 f"the pool takes, got {memory_fraction!r}")
            given = [n for n, v in (("num_blocks", num_blocks), ("max_memory_bytes", max_memory_bytes),
                                    ("max_cache_len", max_cache_len)) if v is not None]
            if given or growable:
                raise ValueError(f"memory_fraction={memory_fraction} sizes a fixed pool; it cannot be combined with "
                                 f"{', '.join(given) or 'growable=True'}")
        for name, v in (("num_blocks", num_blocks), ("max_memory_bytes", max_memory_bytes),
                        ("max_batch_size", max_batch_size), ("max_cache_len", max_cache_len)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of float32, float16, bfloat16 (or None: the model's), got {dtype}")
        if growable is not None and not isinstance(growable, bool):
            raise TypeError(f"growable must be True, False or None, got {type(growable).__name__}")
        if growable and max_memory_bytes is not None:
            raise ValueError(f"max_memory_bytes={max_memory_bytes} sizes a fixed pool; it cannot be growable=True")
        if max_cache_len is not None:
            if max_batch_size is None:
                raise ValueError(f"max_cache_len={max_cache_len} reserves pages per sequence: pass max_batch_size "
                                 f"too (the most sequences the cache takes at once)")
            clash = [f"{n}={v}" for n, v in (("num_blocks", num_blocks), ("max_memory_bytes", max_memory_bytes),
                                             ("growable", growable)) if v is not None and v is not False]
            if clash:
                raise ValueError(f"max_cache_len={max_cache_len} sizes a reserved pool of max_batch_size x "
                                 f"max_cache_len tokens; it cannot be combined with {', '.join(clash)}")

        self.num_layers, self.config_kv_heads, self.head_dim = _decoder_dims(config)
        if num_kv_heads is not None and (isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int)
                                         or not 1 <= num_kv_heads <= self.config_kv_heads):
            raise ValueError(f"num_kv_heads must be an int in 1..{self.config_kv_heads} (the config's KV heads, or "
                             f"the shard this process holds under tensor parallelism) or None, got {num_kv_heads!r}")
        self._explicit_kv_heads = num_kv_heads
        self._kv_heads = num_kv_heads or self.config_kv_heads  # what the pool is sized with before pages exist
        self.block_size = block_size
        self._max_batch_size = max_batch_size
        self._explicit_dtype = dtype
        self._layer_devices = self._parse_device(device)  # per layer: the device asked for, None = the K/V's
        self._default_dtype = dtype or _config_dtype(config) or torch.float32
        # Pages of a layer whose device is not known yet are made at its first K/V; a cache given no device at all
        # allocates a fixed pool up front on CPU, as before device maps (and moves on the first write).
        self._default_device = (torch.device("cpu") if device is None
                                else next((d for d in self._layer_devices if d is not None), torch.device("cpu")))
        upfront = ([torch.device("cpu")] * self.num_layers if device is None else self._layer_devices)
        if memory_fraction is not None:
            num_blocks = self._blocks_for_fraction(memory_fraction, upfront, self._default_dtype)

        if max_memory_bytes is not None:
            per_block = self._bytes_per_block(self._default_dtype)
            num_blocks = max_memory_bytes // per_block
            if num_blocks < 1:
                raise ValueError(f"max_memory_bytes must hold at least one block of every layer, {per_block} bytes "
                                 f"here (K and V of {block_size} tokens x {self.num_layers} layers x "
                                 f"{self._kv_heads} KV heads x head_dim {self.head_dim} in "
                                 f"{str(self._default_dtype).replace('torch.', '')}), got {max_memory_bytes}")
        elif max_cache_len is not None:
            num_blocks = max_batch_size * math.ceil(max_cache_len / block_size)
        elif num_blocks is None and max_batch_size is not None:
            max_pos = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
            if max_pos is None:
                raise ValueError("max_batch_size sizes the cache from the config's max_position_embeddings, which "
                                 "this config does not have; pass num_blocks or max_memory_bytes as well")
            num_blocks = max_batch_size * math.ceil(max_pos / block_size)
        self.growable = num_blocks is None if growable is None else growable
        self._peak_bytes = 0
        self._max_cache_len = max_cache_len
        self.reserved = max_cache_len is not None  # the capturable mode (module docstring)
        self.pages_per_sequence = -(-max_cache_len // block_size) if self.reserved else None
        self._rsv: dict = {}  # device -> _Reserved, the device buffers of the reserved mode
        self._rsv_by_layer: list = [None] * _decoder_dims(config)[0]  # layer -> its device's _Reserved
        self._dirty = False  # decode steps advanced the device buffers past the host mirror

        super().__init__(layers=[PagedLayer(self, i) for i in range(self.num_layers)])
        self.allocator = BlockAllocator(0 if num_blocks is None else num_blocks)
        # Per layer, K and V pages [num_blocks, block_size, Hkv, D] (None until made): each layer has its own
        # device, dtype and KV head count, taken from the K/V it is handed unless given.
        self._k_pages: list[torch.Tensor | None] = [None] * self.num_layers
        self._v_pages: list[torch.Tensor | None] = [None] * self.num_layers
        self._clear_sequences()
        if self.allocator.num_blocks:
            for i, dev in enumerate(upfront):
                if dev is not None:
                    self._make_layer(i, self._kv_heads, self._default_dtype, dev)

    def _parse_device(self, device) -> list:
        if device is None:
            return [None] * self.num_layers
        if not isinstance(device, Mapping):
            return [torch.device(device)] * self.num_layers
        keys = set(device)
        if keys != set(range(self.num_layers)):
            raise ValueError(f"device, as a mapping, must name every layer index 0..{self.num_layers - 1} (a device "
                             f"or None each), got keys {sorted(keys, key=str)}")
        return [None if device[i] is None else torch.device(device[i]) for i in range(self.num_layers)]

    # -- sizes -----------------------------------------------------------------------------------------------------

    def _blocks_for_fraction(self, fraction: float, devices: list, dtype: torch.dtype) -> int:
        if any(d is None for d in devices):
            raise ValueError("memory_fraction needs every layer's device: pass device= a device, or a map without "
                             "None entries (or max_memory_bytes instead)")
        per_layer_block = self._bytes_per_block(dtype) // self.num_layers  # K + V of one block of one layer
        blocks = []
        for dev in dict.fromkeys(devices):
            layers = sum(d == dev for d in devices)
            free = _free_bytes(dev)
            blocks.append(int(fraction * free) // (per_layer_block * layers))
        n = min(blocks)
        if n < 1:
            free = ", ".join(f"{d}: {_free_bytes(d)} bytes" for d in dict.fromkeys(devices))
            raise ValueError(f"memory_fraction={fraction} of the free memory ({free}) does not hold one block of "
                             f"every layer ({per_layer_block} bytes per layer and block)")
        return n

    def _bytes_per_block(self, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.block_size * self._kv_heads * self.head_dim * itemsize

    def _pages_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k_pages, *self._v_pages) if t is not None)

    def _first_pages(self) -> torch.Tensor | None:
        return next((k for k in self._k_pages if k is not None), None)

    @property
    def dtype(self) -> torch.dtype:
        """The pages' dtype (the first layer that has pages; before any: what they will be made with)."""
        k = self._first_pages()
        return self._default_dtype if k is None else k.dtype

    @property
    def device(self) -> torch.device:
        """The device of the first layer's pages (``devices`` lists every layer's)."""
        k = self._first_pages()
        return self._default_device if k is None else k.device

    @property
    def devices(self) -> list:
        """Per layer, the device of its pages (None for a layer that has none yet)."""
        return [None if k is None else k.device for k in self._k_pages]

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer's pages (a rank's shard under tensor parallelism); before any pages exist, or when
        layers differ, the count the pool is sized with (``num_kv_heads`` given, else the config's)."""
        heads = {k.shape[2] for k in self._k_pages if k is not None}
        return heads.pop() if len(heads) == 1 else self._kv_heads

    # -- pages -----------------------------------------------------------------------------------------------------

    def _make_layer(self, i: int, heads: int, dtype: torch.dtype, device) -> None:
        # Zeroed, not empty: a kernel never reads past seq_len, but garbage pages would make a bug look random.
        shape = (self.allocator.num_blocks, self.block_size, heads, self.head_dim)
        self._k_pages[i] = self._v_pages[i] = None  # the old pages (another dtype, device, heads) go first
        self._sync_layer_view(i)
        with torch.inference_mode(False):  # normal tensors: a crop or reorder outside inference mode writes them
            self._k_pages[i] = torch.zeros(shape, dtype=dtype, device=device)
            self._v_pages[i] = torch.zeros(shape, dtype=dtype, device=device)
        if self.reserved:  # fixed addresses: a compiled step may treat them as static (CUDA graphs)
            torch._dynamo.mark_static_address(self._k_pages[i])
            torch._dynamo.mark_static_address(self._v_pages[i])
        self._sync_layer_view(i)
        self._peak_bytes = max(self._peak_bytes, self._pages_bytes())

    def _sync_layer_view(self, i: int) -> None:
        layer, k = self.layers[i], self._k_pages[i]
        layer.k_pages, layer.v_pages, layer.is_initialized = k, self._v_pages[i], k is not None
        if k is not None:
            layer.dtype, layer.device = k.dtype, k.device

    def _ensure_layer(self, i: int, key: torch.Tensor) -> None:
        """Make layer ``i``'s pages match its K/V ``key [B, Hkv, S, D]`` (heads, dtype, device), before anything of
        the step is written: created at its first K/V, re-created while it holds no tokens."""
        k = self._k_pages[i]
        heads, dtype, device = key.shape[1], key.dtype, key.device
        if k is not None and k.shape[2] == heads and k.dtype == dtype and k.device == device:
            return
        if self._explicit_dtype is not None and dtype != self._explicit_dtype:
            raise TypeError(f"PagedKVCache was created with dtype={self._explicit_dtype} but the model's keys are "
                            f"{dtype}")
        want = self._layer_devices[i]
        if want is not None and not _same_device(device, want):
            raise ValueError(f"PagedKVCache was created with device={want} for layer {i} but the model's keys of "
                             f"that layer are on {device}")
        if self._explicit_kv_heads is not None and heads != self._explicit_kv_heads:
            raise ValueError(f"PagedKVCache was created with num_kv_heads={self._explicit_kv_heads} but the keys of "
                             f"layer {i} hold {heads} KV heads")
        if k is not None and i in self._filled and self.allocator.num_used:
            raise RuntimeError(f"PagedKVCache layer {i} holds tokens as {k.dtype} with {k.shape[2]} KV heads on "
                               f"{k.device}; it cannot take {dtype} keys with {heads} KV heads on {device} (reset() "
                               f"it first)")
        self._make_layer(i, heads, dtype, device)

    def _grow(self, min_blocks: int) -> None:
        """Grow the pool to at least ``min_blocks`` (doubling), one layer's K or V pages at a time: each is copied
        into its larger replacement (on its own device) and released before the next, so the pages never hold more
        than the new pool plus one old layer's K (or V) pages. (A ``torch.cat`` of every layer would hold old and
        new pools at once.) Layers without pages yet get the new size when they are made."""
        old = self.allocator.num_blocks
        new = max(min_blocks, 2 * old, 1)
        one_old = max((t.numel() * t.element_size() for t in self._k_pages if t is not None), default=0)
        for pages in (self._k_pages, self._v_pages):
            for i, t in enumerate(pages):
                if t is None:
                    continue
                with torch.inference_mode(False):  # normal tensors, as _make_layer makes them
                    grown = torch.empty((new, *t.shape[1:]), dtype=t.dtype, device=t.device)
                    grown[:old].copy_(t)
                    grown[old:].zero_()
                pages[i] = grown  # the last references to the old pages: this list and the layer's view
                del t
                self._sync_layer_view(i)
        self.allocator.grow(new)
        self._peak_bytes = max(self._peak_bytes, self._pages_bytes() + one_old)

    def pages(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_pages, v_pages)`` of a layer, each ``[num_blocks, block_size, Hkv, D]`` on the layer's device."""
        k = self._k_pages[layer_idx]
        if k is None:
            raise RuntimeError(f"layer {layer_idx} of the PagedKVCache has no pages yet: they are made from the first "
                               f"K/V it is handed (update)")
        return k, self._v_pages[layer_idx]

    def dense(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of a layer as a transformers ``DynamicCache`` holds them: ``[batch, Hkv, columns, D]``
        with ``columns = get_seq_length()`` (padding included, zeros there: the paged cache does not store padding),
        each row's tokens at the columns where they were real. Gathered from the pages: a new tensor of
        ``2 * batch * Hkv * columns * D`` elements, for callers that read a cache (``PagedLayer.keys``) and for the
        eager attention that ``output_attentions=True`` runs; the kernels never use it. Reserved mode: one sync."""
        k_pages, v_pages = self.pages(layer_idx)
        self._pull()
        B, cols = len(self._lens), self._seen
        H, D = k_pages.shape[2], k_pages.shape[3]
        keys = k_pages.new_zeros((B, H, cols, D))
        values = v_pages.new_zeros((B, H, cols, D))
        if not B or not cols:
            return keys, values
        real = torch.cat(self._history, 1) if self._history else torch.zeros((B, 0), dtype=torch.bool)
        offsets = torch.arange(self.block_size)
        for b in range(B):
            n = self._lens[b]
            where = real[b].nonzero().flatten()
            if where.numel() != n:  # the bookkeeping is inconsistent: say so rather than misplace tokens
                raise RuntimeError(f"PagedKVCache row {b} holds {n} tokens but its history marks {where.numel()} "
                                   f"real columns")
            if not n:
                continue
            slots = (torch.tensor(self._tables[b], dtype=torch.long)[:, None] * self.block_size + offsets).flatten()[:n]
            slots, where = slots.to(k_pages.device), where.to(k_pages.device)
            keys[b][:, where] = k_pages.flatten(0, 1)[slots].transpose(0, 1)
            values[b][:, where] = v_pages.flatten(0, 1)[slots].transpose(0, 1)
        return keys, values

    # -- sequences -------------------------------------------------------------------------------------------------

    def _clear_sequences(self) -> None:
        self._tables: list[list[int]] = []  # per batch row: its pages, in order
        self._lens: list[int] = []  # per batch row: real tokens held
        self._history: list[torch.Tensor] = []  # per step: bool [B, S] on CPU, which columns were real tokens
        self._seen = 0  # columns processed (padding included): what HF calls the cache's sequence length
        self._bt_host = torch.zeros((0, 0), dtype=torch.int32)  # mirror of _tables, padded with 0
        self._step = 0
        self._step_layers: set[int] = set()
        self._plan: StepPlan | None = None  # on the device of the step's first layer
        self._plans: dict = {}  # device -> the step's plan there (other devices of a device_map)
        self._filled: set[int] = set()  # layers handed K/V since the last reset: their pages may hold tokens
        self._primed = False  # reserved mode: the device buffers hold this batch (decode steps run on the device)
        self._dirty = False
        self._cols_bound = 0  # reserved mode: columns as the host counts them (eager decode steps raise past it)

    def _new_step(self) -> None:
        self._step += 1
        self._step_layers = set()
        self._plan = None
        self._plans = {}

    def _rebuild_bt_host(self) -> None:
        width = max([len(t) for t in self._tables], default=0)
        bt = torch.zeros((len(self._tables), max(width, 1)), dtype=torch.int32)
        for b, t in enumerate(self._tables):
            if t:
                bt[b, :len(t)] = torch.tensor(t, dtype=torch.int32)
        self._bt_host = bt

    def _set_bt(self, b: int, j: int, block: int) -> None:
        if j >= self._bt_host.shape[1]:
            grown = torch.zeros((self._bt_host.shape[0], max(2 * self._bt_host.shape[1], j + 1)), dtype=torch.int32)
            grown[:, :self._bt_host.shape[1]] = self._bt_host
            self._bt_host = grown
        self._bt_host[b, j] = block

    @property
    def num_sequences(self) -> int:
        return len(self._lens)

    def seq_lens(self) -> list[int]:
        """Real tokens held per batch row (reserved mode: read back from the device, one sync)."""
        self._pull()
        return list(self._lens)

    def block_tables(self) -> list[list[int]]:
        """Pages of each batch row (copies)."""
        return [list(t) for t in self._tables]

    # -- HF Cache API ----------------------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Return a ``PagedKV`` handle (twice, for ``key`` and ``value``). The write happens in the attention call
        (``write``), once the step's slot mapping is planned from the padding mask."""
        if not 0 <= layer_idx < self.num_layers:
            raise IndexError(f"layer_idx must be in 0..{self.num_layers - 1}, got {layer_idx}")
        if (key_states.dim() != 4 or not 1 <= key_states.shape[1] <= self.config_kv_heads
                or key_states.shape[3] != self.head_dim):
            raise ValueError(f"key_states must be 4-D (batch, KV heads, seq, head_dim) with head_dim "
                             f"{self.head_dim} and the config's {self.config_kv_heads} KV heads or fewer (the shard "
                             f"of a rank under tensor parallelism), got shape {tuple(key_states.shape)}")
        if value_states.shape != key_states.shape:
            raise ValueError(f"value_states must have key_states' shape {tuple(key_states.shape)}, got "
                             f"{tuple(value_states.shape)}")
        if self._primed and key_states.shape[2] == 1:
            # Reserved mode, decode: the step runs on the device buffers (plan -> _advance); no host state is read
            # or written here, so a compiled step sees the same Python state every time. step -1 marks it.
            handle = PagedKV(self, layer_idx, key_states, value_states, -1)
            return handle, handle
        if layer_idx in self._step_layers:  # layers run in order: seeing one again means a new forward
            self._new_step()
        self._ensure_layer(layer_idx, key_states)
        self._filled.add(layer_idx)
        self._step_layers.add(layer_idx)
        handle = PagedKV(self, layer_idx, key_states, value_states, self._step)
        return handle, handle

    def get_seq_length(self, layer_idx: int = 0):
        """Columns processed so far, padding included (HF's notion: ``input_ids[:, get_seq_length():]`` is new).
        Reserved mode, once a batch is in: a 0-d int64 tensor on the device, as transformers' ``StaticCache``
        returns (an int would need a sync per step, or freeze into a compiled graph)."""
        if self._primed:
            return self._lead_rsv().seen
        return self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self.reserved:  # fixed, as transformers' StaticCache: masks of max_cache_len columns
            return self.max_cache_len, 0
        return self._seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def max_batch_size(self) -> int | None:
        """Largest batch accepted (None: any). A property because transformers 5.0-5.x's ``Cache`` defines
        ``max_batch_size`` as a read-only property of its own."""
        return self._max_batch_size

    @property
    def max_cache_len(self) -> int | None:
        """Columns reserved per sequence (reserved mode), else None. A property for the same reason as
        ``max_batch_size``: transformers up to 5.2x's ``Cache`` defines a read-only ``max_cache_len``."""
        return self._max_cache_len

    @property
    def is_compileable(self) -> bool:
        """True in the reserved mode: its decode step can be captured (torch.compile fullgraph, CUDA graphs)."""
        return self.reserved

    @property
    def is_sliding(self) -> list[bool]:
        # Every layer stores all its tokens; sliding windows are applied by the attention kernel.
        return [False] * self.num_layers

    @property
    def batch_size(self) -> int:
        return len(self._lens) if self._lens else -1

    def reset(self) -> None:
        """Release every block; pages stay allocated (and are not cleared). A pending reserved-mode overflow is
        dropped with the sequences it concerned."""
        self.allocator.reset()
        self._clear_sequences()
        for st in self._rsv.values():
            st.overflow.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` columns (HF convention: the argument is <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of columns to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0:
            return
        self._pull()
        if n > self._seen:
            raise ValueError(f"cannot crop {n} columns from a cache holding {self._seen}")
        removed = [0] * len(self._lens)
        while n:
            last = self._history[-1]
            take = min(n, last.shape[1])
            for b, c in enumerate(last[:, last.shape[1] - take:].sum(1).tolist()):
                removed[b] += c
            if take == last.shape[1]:
                self._history.pop()
            else:
                self._history[-1] = last[:, :last.shape[1] - take]
            n -= take
        for b, r in enumerate(removed):
            self._lens[b] -= r
            keep = -(-self._lens[b] // self.block_size)
            self.allocator.decref(self._tables[b][keep:])
            del self._tables[b][keep:]
        self._seen += tokens_to_remove
        self._rebuild_bt_host()
        self._new_step()
        if self._primed:
            self._reserve_rows()

    def _remap_rows(self, rows: list[int]) -> None:
        """Batch row i becomes old row ``rows[i]``; pages are shared by reference count, never copied here."""
        self._pull()
        if any(not 0 <= r < len(self._lens) for r in rows):
            raise IndexError(f"row indices must be in 0..{len(self._lens) - 1}, got {rows}")
        if self.max_batch_size is not None and len(rows) > self.max_batch_size:
            raise ValueError(f"a batch of {len(rows)} sequences exceeds the cache's max_batch_size="
                             f"{self.max_batch_size}")
        new_tables = [list(self._tables[r]) for r in rows]
        for t in new_tables:
            self.allocator.incref(t)
        for t in self._tables:
            self.allocator.decref(t)
        self._tables = new_tables
        self._lens = [self._lens[r] for r in rows]
        idx = torch.tensor(rows, dtype=torch.long)
        self._history = [h.index_select(0, idx) for h in self._history]
        self._rebuild_bt_host()
        self._new_step()
        if self._primed:
            self._reserve_rows()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues beam ``beam_idx[i]``. Block tables are reordered, pages are shared."""
        if self._lens:
            self._remap_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._lens:
            self._remap_rows([b for b in range(len(self._lens)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._lens:
            self._remap_rows(torch.as_tensor(indices).flatten().tolist())

    # -- planning and writing --------------------------------------------------------------------------------------

    def plan(self, handle: PagedKV, attention_mask: torch.Tensor | None) -> StepPlan:
        """The step's metadata, computed at the first call of a forward and returned as is to the later layers.

        ``attention_mask``: HF's 2-D padding mask ``[B, >= S]`` (1/True = real token), its last S columns being this
        step's (reserved mode: columns ``seen .. seen + S - 1`` of a mask that may be right-padded to
        ``max_cache_len``, as ``generate`` passes it there); None = no padding. Checks the whole step's demand first:
        on ``CacheExhaustedError`` nothing changed.
        """
        if handle.step == -1:
            return self._decode_plan(handle, attention_mask)
        plan = self._host_plan(handle, attention_mask)
        if self.reserved:
            self._bind(handle.layer_idx, handle.key.device)
        return plan

    def _host_plan(self, handle: PagedKV, attention_mask: torch.Tensor | None) -> StepPlan:
        if self._plan is not None and self._plan.step == handle.step:
            if handle.key.device == self._plan.device:
                return self._plan
            return self._plan_on(handle.key.device)
        if handle.step != self._step:
            raise RuntimeError("stale PagedKV handle: the cache has moved on to a later forward since this handle was "
                               "made (a handle is only valid within the forward whose update() returned it)")
        key = handle.key
        B, S = key.shape[0], key.shape[2]
        dev = key.device
        if self.max_batch_size is not None and B > self.max_batch_size:
            raise ValueError(f"batch of {B} sequences exceeds the cache's max_batch_size={self.max_batch_size}")
        if self._lens and B != len(self._lens):
            raise ValueError(f"the cache holds {len(self._lens)} sequences but this forward has a batch of {B}; "
                             f"reset() the cache to start a new batch")

        self._pull()
        if self.reserved and self._seen + S > self.max_cache_len:
            raise CacheExhaustedError(
                f"PagedKVCache (reserved, max_cache_len={self.max_cache_len}) holds {self._seen} columns; this step's "
                f"{S} more do not fit. Nothing was written. Create the cache with a larger max_cache_len, or reset() "
                f"it.", capacity=self.allocator.num_blocks, free=self.allocator.num_free, demand=S)

        # Which of this step's columns are real tokens (one device->host copy of [B, S] bools).
        if attention_mask is None:
            real = torch.ones((B, S), dtype=torch.bool)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < S:
                raise ValueError(f"attention_mask must be 2-D with one row per sequence ({B}) and at least this "
                                 f"step's {S} columns, got shape {tuple(attention_mask.shape)}")
            if self.reserved and attention_mask.shape[1] > self._seen + S:  # right-padded to max_cache_len
                real = attention_mask[:, self._seen:self._seen + S].to(device="cpu", dtype=torch.bool)
            else:
                real = attention_mask[:, -S:].to(device="cpu", dtype=torch.bool)
            if S > 1 and self._lens and attention_mask.shape[1] == self._seen + S:
                # Prefill on top of a filled cache (multi-turn): the mask's past must describe what is stored.
                held = attention_mask[:, :self._seen].to("cpu").long().sum(1).tolist()
                if held != self._lens:
                    raise ValueError(f"the attention mask's past columns count {held} real tokens per sequence but "
                                     f"the cache holds {self._lens}")
        lens = self._lens if self._lens else [0] * B
        tables = self._tables if self._tables else [[] for _ in range(B)]
        n_new = real.sum(1).tolist()
        bs = self.block_size

        # 1. Demand, before touching anything: new pages, plus private copies of shared partial last pages. (Reserved
        # mode: every sequence holds all its pages from its first forward on.)
        if self.reserved:
            new_blocks = [self.pages_per_sequence - len(tables[b]) for b in range(B)]
        else:
            new_blocks = [max(0, -(-(lens[b] + n_new[b]) // bs) - len(tables[b])) for b in range(B)]
        writers: dict[int, int] = {}
        for b in range(B):
            if n_new[b] and lens[b] % bs:
                last = tables[b][lens[b] // bs]
                if self.allocator.refcount(last) > 1:
                    writers[last] = writers.get(last, 0) + 1
        # A shared page written by w of its r holders: w copies if someone keeps the original, else w - 1.
        cow = sum(w if w < self.allocator.refcount(blk) else w - 1 for blk, w in writers.items())
        demand = sum(new_blocks) + cow
        if demand > self.allocator.num_free:
            if self.growable:
                self._grow(self.allocator.num_used + demand)
            else:
                raise CacheExhaustedError(
                    f"PagedKVCache is out of blocks: this step needs {demand} more blocks of {bs} tokens "
                    f"({sum(new_blocks)} for {sum(n_new)} new tokens, {cow} for copy-on-write) but only "
                    f"{self.allocator.num_free} of its {self.allocator.num_blocks} blocks are free "
                    f"(sequence lengths {lens}). Nothing was written. Create the cache with a larger num_blocks or "
                    f"max_memory_bytes, or reset() it.",
                    capacity=self.allocator.num_blocks, free=self.allocator.num_free, demand=demand)

        # 2. Commit: copy-on-write, then new pages.
        if not self._tables:
            self._tables, self._lens = tables, list(lens)
            self._bt_host = torch.zeros((B, 1), dtype=torch.int32)
        src, dst = [], []
        for b in range(B):
            if n_new[b] and lens[b] % bs:
                j = lens[b] // bs
                last = self._tables[b][j]
                if self.allocator.refcount(last) > 1:
                    (fresh,) = self.allocator.allocate(1)
                    self.allocator.decref([last])
                    self._tables[b][j] = fresh
                    self._set_bt(b, j, fresh)
                    src.append(last)
                    dst.append(fresh)
        if src:
            self._copy_pages(src, dst)
        for b in range(B):
            if new_blocks[b]:
                for blk in self.allocator.allocate(new_blocks[b]):
                    self._set_bt(b, len(self._tables[b]), blk)
                    self._tables[b].append(blk)

        # 3. Slot mapping: real token t of row b goes to position lens[b] + (its rank among the row's real tokens).
        nothing_held = not any(lens)  # before the lengths move on (lens may alias them)
        old = torch.tensor(lens, dtype=torch.long)
        pos = old[:, None] + real.long().cumsum(1) - 1  # [B, S]
        pos = torch.where(real, pos, torch.zeros((), dtype=torch.long))
        width = max(len(t) for t in self._tables)
        bt_host = self._bt_host[:, :max(width, 1)]
        blk = torch.gather(bt_host.long(), 1, pos // bs)
        slots = torch.where(real, blk * bs + pos % bs, torch.full((), -1, dtype=torch.long))

        for b in range(B):
            self._lens[b] += n_new[b]
        self._history.append(real)
        self._seen += S

        # 4. Rows of q to gather so that each row's real tokens are its last q_lens[b] (HF left padding already is).
        q_index = None
        is_suffix = real.long().cummax(1).values.bool().eq(real).all().item()  # no real token before a padding one
        if not is_suffix:
            order = torch.argsort(real.long(), dim=1, stable=True)  # padding columns first, then real in order
            q_index = order.to(dev)

        self._plans = {}
        self._plan = StepPlan(
            step=self._step, batch_size=B, q_len=S, device=dev,
            slot_mapping=slots.reshape(-1).to(dev),
            # A copy on purpose (B x blocks int32, once per step): the slice aliases the mutable host mirror.
            block_tables=bt_host.contiguous().to(dev),
            seq_lens=torch.tensor(self._lens, dtype=torch.int32).to(dev),
            q_lens=torch.tensor(n_new, dtype=torch.int32).to(dev),
            max_seq_len=max(self._lens),
            decode=S == 1 and all(n == 1 for n in n_new),
            q_index=q_index,
            fresh=nothing_held and q_index is None,
            real=real.to(dev) if nothing_held and q_index is None and not all(n == S for n in n_new) else None,
        )
        if self.reserved:
            self._primed = True
            self._push()
        return self._plan

    def _copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Copy pages ``src[i] -> dst[i]`` in every layer (on each layer's device)."""
        index: dict = {}  # device -> (src, dst) there
        for k, v in zip(self._k_pages, self._v_pages):
            if k is None:  # made later at its first K/V, zeroed: it holds nothing to copy
                continue
            if k.device not in index:
                index[k.device] = (torch.tensor(src, dtype=torch.int64, device=k.device),
                                   torch.tensor(dst, dtype=torch.int64, device=k.device))
            paged_ops.copy_blocks(k, v, *index[k.device])

    # -- reserved mode: the device buffers -------------------------------------------------------------------------

    def _decode_plan(self, handle: PagedKV, attention_mask) -> StepPlan:
        """Reserved mode, a decode step: the plan over the layer's device buffers, advanced once per step (by the
        first layer on each device) with device ops only."""
        st = self._rsv_by_layer[handle.layer_idx]
        if st is None or st.device != handle.key.device:
            raise RuntimeError(f"PagedKVCache layer {handle.layer_idx} has no reserved buffers on "
                               f"{handle.key.device}: its first forward (the prefill) did not run on that device")
        B = st.seq_lens.shape[0]
        if handle.key.shape[0] != B:
            raise ValueError(f"the cache holds {B} sequences but this forward has a batch of {handle.key.shape[0]}; "
                             f"reset() the cache to start a new batch")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B):
            raise ValueError(f"attention_mask must be 2-D with one row per sequence ({B}), got shape "
                             f"{tuple(attention_mask.shape)}")
        if handle.layer_idx == st.first_layer:
            if handle.layer_idx == 0 and not torch.compiler.is_compiling():
                # Eager: the host knows the column count without a sync (captured steps rely on the device flag).
                if self._cols_bound >= self.max_cache_len:
                    raise CacheExhaustedError(
                        f"PagedKVCache (reserved, max_cache_len={self.max_cache_len}) is full: this decode step "
                        f"needs column {self._cols_bound + 1}. Nothing was written. Create the cache with a larger "
                        f"max_cache_len (generate: max_length), or reset() it.",
                        capacity=self.allocator.num_blocks, free=self.allocator.num_free, demand=1)
                self._cols_bound += 1
            self._advance(st, attention_mask)
        return st.plan

    def _advance(self, st: _Reserved, attention_mask) -> None:
        """One decode column on ``st``'s buffers, in place: which rows' tokens are real (the mask's column ``seen``:
        the last one of a ``[B, seen + 1]`` mask, or inside one right-padded to max_cache_len), their slots, the
        lengths, the history. Past max_cache_len nothing is stored and ``overflow`` is set."""
        B, W, bs = st.seq_lens.shape[0], self.max_cache_len, self.block_size
        col = st.seen.clamp(max=W - 1).view(1, 1).expand(B, 1)
        if attention_mask is None:
            real = torch.ones((B,), dtype=torch.bool, device=st.device)
        else:
            mask = attention_mask.to(st.device)
            real = mask.gather(1, st.seen.clamp(max=mask.shape[1] - 1).view(1, 1).expand(B, 1)).squeeze(1).bool()
        fits = st.seen < W
        ok = real & fits
        pos = st.seq_lens.long()
        page = st.block_tables.gather(1, (pos.clamp(max=self.pages_per_sequence * bs - 1) // bs).unsqueeze(1))
        st.slot_mapping.copy_(torch.where(ok, page.squeeze(1).long() * bs + pos % bs, torch.full_like(pos, -1)))
        st.seq_lens.add_(ok.to(torch.int32))
        st.history.scatter_(1, col, torch.where(fits, real, st.history.gather(1, col).squeeze(1)).unsqueeze(1))
        st.overflow.logical_or_(~fits)
        st.seen.add_(fits.to(torch.int64))
        self._dirty = True

    def _lead_rsv(self) -> _Reserved:
        """The buffers of the lowest layer's device (every device's hold the same values)."""
        return next(st for st in self._rsv_by_layer if st is not None)

    def _pull(self) -> None:
        """Reserved mode: read the device buffers back into the host mirror after decode steps (one sync)."""
        if not self._dirty:
            return
        st = self._lead_rsv()
        self._lens = st.seq_lens.tolist()
        self._seen = int(st.seen)
        self._history = [st.history[:, :self._seen].cpu()]
        self._cols_bound = self._seen
        self._dirty = False
        if bool(st.overflow):
            for s in self._rsv.values():
                s.overflow.zero_()
            raise CacheExhaustedError(
                f"PagedKVCache (reserved, max_cache_len={self.max_cache_len}): a captured decode step ran past "
                f"{self.max_cache_len} columns; its token was not stored and its output did not see it. The cache "
                f"holds what it held before that step. Create the cache with a larger max_cache_len (generate: "
                f"max_length), or reset() it.", capacity=self.allocator.num_blocks, free=self.allocator.num_free,
                demand=1)

    def _host_buffers(self) -> tuple:
        B, W = len(self._lens), self.max_cache_len
        history = torch.zeros((B, W), dtype=torch.bool)
        if self._seen:
            history[:, :self._seen] = torch.cat(self._history, 1)
        return (self._bt_host[:, :self.pages_per_sequence], torch.tensor(self._lens, dtype=torch.int32), history)

    def _new_rsv(self, device: torch.device, first_layer: int) -> _Reserved:
        with torch.inference_mode(False):  # normal tensors: host code outside inference mode updates them in place
            return self._make_rsv(device, first_layer)

    def _make_rsv(self, device: torch.device, first_layer: int) -> _Reserved:
        bt, lens, history = self._host_buffers()
        B = lens.shape[0]
        bufs = dict(block_tables=bt.to(device, copy=True), seq_lens=lens.to(device),
                    slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=device),
                    seen=torch.tensor(self._seen, dtype=torch.int64, device=device), history=history.to(device),
                    overflow=torch.zeros((), dtype=torch.bool, device=device))
        for t in bufs.values():
            torch._dynamo.mark_static_address(t)
        plan = StepPlan(step=-1, batch_size=B, q_len=1, device=device, slot_mapping=bufs["slot_mapping"],
                        block_tables=bufs["block_tables"], seq_lens=bufs["seq_lens"],
                        q_lens=torch.ones((B,), dtype=torch.int32, device=device),
                        max_seq_len=self.pages_per_sequence * self.block_size, decode=True, q_index=None)
        return _Reserved(device=device, plan=plan, first_layer=first_layer, **bufs)

    def _bind(self, layer_idx: int, device: torch.device) -> None:
        """Reserved mode: layer ``layer_idx`` runs on ``device``; its decode steps use that device's buffers."""
        st = self._rsv.get(device)
        if st is None or st.seq_lens.shape[0] != len(self._lens):
            first = layer_idx if st is None else min(st.first_layer, layer_idx)
            st = self._rsv[device] = self._new_rsv(device, first)
            self._rsv_by_layer = [st if (o is not None and o.device == device) else o for o in self._rsv_by_layer]
        elif layer_idx < st.first_layer:
            st.first_layer = layer_idx
        self._rsv_by_layer[layer_idx] = st

    def _push(self) -> None:
        """Reserved mode: copy the host mirror into every device's buffers (in place while the batch keeps its
        size, so their addresses hold), after the host changed it (a prefill, crop, beam reorder)."""
        self._cols_bound = self._seen
        self._dirty = False
        if not self._rsv:
            return
        bt, lens, history = self._host_buffers()
        for device, st in list(self._rsv.items()):
            if st.seq_lens.shape[0] != lens.shape[0]:  # another batch size: new buffers
                new = self._rsv[device] = self._new_rsv(device, st.first_layer)
                self._rsv_by_layer = [new if o is st else o for o in self._rsv_by_layer]
                continue
            st.block_tables.copy_(bt)
            st.seq_lens.copy_(lens)
            st.seen.fill_(self._seen)
            st.history.copy_(history)
            st.overflow.zero_()
            st.slot_mapping.fill_(-1)

    def _reserve_rows(self) -> None:
        """Reserved mode, after a crop or a beam reorder: every sequence gets private pages from the one its next
        token goes to on (a shared partial page is copied), and pages up to pages_per_sequence again."""
        bs, src, dst = self.block_size, [], []
        for b, t in enumerate(self._tables):
            start = self._lens[b] // bs
            for j in range(start, len(t)):
                if self.allocator.refcount(t[j]) > 1:
                    (fresh,) = self.allocator.allocate(1)
                    self.allocator.decref([t[j]])
                    if j == start and self._lens[b] % bs:
                        src.append(t[j])
                        dst.append(fresh)
                    t[j] = fresh
            if len(t) < self.pages_per_sequence:
                t.extend(self.allocator.allocate(self.pages_per_sequence - len(t)))
        if src:
            self._copy_pages(src, dst)
        self._rebuild_bt_host()
        self._push()

    def _plan_on(self, device: torch.device) -> StepPlan:
        """The step's plan with its tensors on ``device`` (a layer of a device_map on another device than the
        step's first layer): copied once per step and device, shared by every layer there."""
        plan = self._plans.get(device)
        if plan is None:
            p = self._plan
            plan = dataclasses.replace(
                p, device=device, slot_mapping=p.slot_mapping.to(device), block_tables=p.block_tables.to(device),
                seq_lens=p.seq_lens.to(device), q_lens=p.q_lens.to(device),
                q_index=None if p.q_index is None else p.q_index.to(device), num_splits={}, direct=set(),
                real=None if p.real is None else p.real.to(device))
            self._plans[device] = plan
        return plan

    def write(self, handle: PagedKV, plan: StepPlan) -> None:
        """Write a layer's new K/V into its pages at the plan's slots (padding skipped)."""
        k, v = handle.key, handle.value
        B, H, S, D = k.shape
        kc, vc = self.pages(handle.layer_idx)
        # [B, Hkv, S, D] -> [B*S, Hkv, D]: a view for S == 1 (decode), one copy for a prefill chunk.
        paged_ops.reshape_and_cache(k.transpose(1, 2).reshape(B * S, H, D), v.transpose(1, 2).reshape(B * S, H, D),
                                    kc, vc, plan.slot_mapping)

    # -- reporting -------------------------------------------------------------------------------------------------

    def memory(self) -> CacheMemory:
        """Bytes reserved by the pages vs bytes holding tokens (see ``CacheMemory``)."""
        self._pull()
        per_token = 0  # K + V of one token over all layers (a layer without pages yet: as it will be made)
        for k in self._k_pages:
            if k is None:
                per_token += 2 * self._kv_heads * self.head_dim * self._default_dtype.itemsize
            else:
                per_token += 2 * k.shape[2] * self.head_dim * k.element_size()
        per_block = per_token * self.block_size
        reserved = self._pages_bytes()
        filled: dict[int, int] = {}
        for t, n in zip(self._tables, self._lens):
            for j, blk in enumerate(t):
                filled[blk] = max(filled.get(blk, 0), min(self.block_size, n - j * self.block_size))
        tokens = sum(filled.values())
        return CacheMemory(
            reserved_bytes=reserved, per_layer_bytes=reserved // max(self.num_layers, 1),
            used_bytes=per_block * self.allocator.num_used, token_bytes=per_token * tokens,
            num_blocks=self.allocator.num_blocks, used_blocks=self.allocator.num_used, block_size=self.block_size,
            num_tokens=tokens, bytes_per_token=per_token, peak_bytes=self._peak_bytes)

    def __repr__(self) -> str:
        # One short line that does not change from step to step (transformers puts it in messages); the contents
        # are in memory() and seq_lens().
        kind = (f"reserved {self.max_batch_size} x {self.max_cache_len}" if self.reserved else
                "growable" if self.growable else "fixed")
        return (f"PagedKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, {str(self.dtype).replace('torch.', '')}, {kind})")


def _free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: CUDA from the driver, CPU from the kernel's MemAvailable (Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    raise ValueError(f"memory_fraction sizes pools on CUDA or CPU devices, got {device}; pass max_memory_bytes")


def _same_device(a: torch.device, b: torch.device) -> bool:  # "cuda" (None index) matches any cuda:i
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
