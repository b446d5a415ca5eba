"""A paged KV cache for Hugging Face decoders: ``PagedKVCache``, a ``transformers.Cache``, and its memory report.

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

Where things live (one job per module; this one is the transformers face composed of the others):

* llmkern/cache/pool.py: the pages of every layer (on its device, in its dtype and page format) and the block
  allocator: making, growing, copying, writing and reading pages, and their bytes. ``PagePool``.
* llmkern/cache/sequences.py: block tables, lengths and column history of the batch rows: a step's page demand and
  commit (copy-on-write), slot mapping, crop, beam reorders. ``Sequences``.
* llmkern/cache/plan.py: the step: ``StepPlan`` and ``PagedKV``, planning in host and reserved mode, the reserved
  mode's device buffers. ``Planner``.
* here: ``PagedKVCache`` (construction and sizing, the transformers ``Cache`` API, the dense read) and
  ``CacheMemory``, the memory report. It touches the rooms only through their operations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from llmkern.cache.plan import PagedKV, Planner, StepPlan
from llmkern.cache.pool import DTYPES as _DTYPES
from llmkern.cache.pool import MAX_BLOCK_SIZE as _MAX_BLOCK_SIZE
from llmkern.cache.pool import (BlockAllocator, CacheExhaustedError, LayerPages, PagePool, blocks_for_fraction,
                                bytes_per_block, layout_for, parse_kv_dtype, parse_kv_layout)
from llmkern.cache.pool import free_bytes as _free_bytes  # a module attribute: tests stand in for the free memory
from llmkern.cache.sequences import Sequences

__all__ = ["BlockAllocator", "CacheExhaustedError", "CacheMemory", "PagedKV", "PagedKVCache", "StepPlan"]


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
        self.k_scales = self.v_scales = None  # 8-bit pages: their float16 scales [num_blocks, block_size, Hkv]
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
        kv_dtype: the pages' format. None or ``"auto"``: the model's dtype, K/V stored bit for bit. ``"int8"`` or
            ``"fp8_e4m3"`` (or ``torch.int8`` / ``torch.float8_e4m3fn``): 8-bit codes, symmetric, with one float16
            scale per token and KV head beside the pages (llmkern/reference.py, ``quantize_kv``); written by
            ``reshape_and_cache``, dequantized in registers by the attention kernels. At head_dim 64 a token costs
            0.52 x its bf16 bytes (``memory().bytes_per_token``), so a fixed byte budget holds 1.9 x the tokens.
            ``dtype`` stays the model's: what the cache takes and reads back (``dense``).
        kv_layout: where a page's elements sit in memory; every page is ``[num_blocks, block_size, Hkv, D]`` to the
            kernels either way. None or ``"auto"``: ``"HND"`` on CPU, ``"NHD"`` elsewhere (per layer device).
            ``"HND"``: each KV head's rows of a page are contiguous (memory ``[num_blocks, Hkv, block_size, D]``, the
            pages a transposed view of it; FlashInfer's name for it), what a decode kernel streams; ``"NHD"``:
            token-major, the tensor contiguous (transformers' and vLLM's GPU layout). Same bytes, same results.
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
                 memory_fraction: float | None = None, kv_dtype=None, kv_layout=None):
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

        self._kv_dtype = parse_kv_dtype(kv_dtype)
        self._kv_layout = parse_kv_layout(kv_layout)
        self.num_layers, self.config_kv_heads, self.head_dim = _decoder_dims(config)
        if num_kv_heads is not None and (isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int)
                                         or not 1 <= num_kv_heads <= self.config_kv_heads):
            raise ValueError(f"num_kv_heads must be an int in 1..{self.config_kv_heads} (the config's KV heads, or "
                             f"the shard this process holds under tensor parallelism) or None, got {num_kv_heads!r}")

        self._explicit_kv_heads = num_kv_heads
        self._kv_heads = num_kv_heads or self.config_kv_heads  # what the pool is sized with before pages exist
        self.block_size = block_size
        layer_devices = self._parse_device(device)  # per layer: the device asked for, None = the K/V's
        default_dtype = dtype or _config_dtype(config) or torch.float32
        # Pages of a layer whose device is not known yet are made at its first K/V; a cache given no device at all
        # allocates a fixed pool up front on CPU, as before device maps (and moves on the first write).
        default_device = (torch.device("cpu") if device is None
                          else next((d for d in layer_devices if d is not None), torch.device("cpu")))
        upfront = ([torch.device("cpu")] * self.num_layers if device is None else layer_devices)
        if memory_fraction is not None:
            per_layer_block = self._bytes_per_block(default_dtype) // self.num_layers  # K + V, one block, one layer
            num_blocks = blocks_for_fraction(memory_fraction, upfront, per_layer_block, _free_bytes)

        if max_memory_bytes is not None:
            per_block = self._bytes_per_block(default_dtype)
            num_blocks = max_memory_bytes // per_block
            if num_blocks < 1:
                raise ValueError(f"max_memory_bytes must hold at least one block of every layer, {per_block} bytes "
                                 f"here (K and V of {block_size} tokens x {self.num_layers} layers x "
                                 f"{self._kv_heads} KV heads x head_dim {self.head_dim} in "
                                 f"{str(self._kv_dtype or default_dtype).replace('torch.', '')}), got "
                                 f"{max_memory_bytes}")
        elif max_cache_len is not None:
            num_blocks = max_batch_size * math.ceil(max_cache_len / block_size)
        elif num_blocks is None and max_batch_size is not None:
            max_pos = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
            if max_pos is None:
                raise ValueError("max_batch_size sizes the cache from the config's max_position_embeddings, which "
                                 "this config does not have; pass num_blocks or max_memory_bytes as well")
            num_blocks = max_batch_size * math.ceil(max_pos / block_size)

        # The rooms (module docstring): the pages, the batch rows' bookkeeping, the steps.
        self._pool = PagePool(
            num_layers=self.num_layers, block_size=block_size, head_dim=self.head_dim, kv_heads=self._kv_heads,
            num_blocks=0 if num_blocks is None else num_blocks, default_dtype=default_dtype,
            default_device=default_device, layer_devices=layer_devices, explicit_dtype=dtype,
            explicit_kv_heads=num_kv_heads, static_addresses=max_cache_len is not None, on_layer=self._sync_layer_view,
            kv_dtype=self._kv_dtype, kv_layout=self._kv_layout)
        self._seqs = Sequences(block_size, self._pool.allocator)
        self._planner = Planner(self._pool, self._seqs, num_layers=self.num_layers,
                                growable=num_blocks is None if growable is None else growable,
                                max_batch_size=max_batch_size, max_cache_len=max_cache_len)
        self.reserved = self._planner.reserved  # the capturable mode (module docstring)
        self.pages_per_sequence = self._planner.pages_per_sequence
        super().__init__(layers=[PagedLayer(self, i) for i in range(self.num_layers)])
        if self.allocator.num_blocks:
            for i, dev in enumerate(upfront):
                if dev is not None:
                    self._pool.make_layer(i, self._kv_heads, default_dtype, dev)

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

    def _bytes_per_block(self, dtype: torch.dtype) -> int:
        return bytes_per_block(self.num_layers, self.block_size, self._kv_heads, self.head_dim, dtype, self._kv_dtype)

    # -- the rooms' state, as read from outside --------------------------------------------------------------------

    @property
    def allocator(self) -> BlockAllocator:
        """The pool's block allocator (free list and reference counts)."""
        return self._pool.allocator

    @property
    def growable(self) -> bool:
        """Whether the pool grows when a step needs more pages than are free."""
        return self._planner.growable

    @property
    def _seen(self) -> int:  # columns processed as the host mirror holds them (reserved mode: maybe stale)
        return self._seqs.seen

    @property
    def _plan(self) -> StepPlan | None:  # the current step's plan on its first layer's device
        return self._planner.plan

    @property
    def dtype(self) -> torch.dtype:
        """The K/V dtype the cache takes and reads back (the first layer that has pages; before any: what they will
        be made for). The pages' own format is ``kv_dtype``."""
        return next((d for d in self._pool.dtypes if d is not None), self._pool.default_dtype)

    @property
    def kv_dtype(self) -> torch.dtype:
        """The pages' dtype: ``dtype`` for float pages, or torch.int8 / torch.float8_e4m3fn (8-bit codes with
        float16 scales)."""
        return self._pool.kv_dtype or self.dtype

    @property
    def kv_layout(self) -> str:
        """Where a page's elements sit in memory (the pages are ``[num_blocks, block_size, Hkv, D]`` either way):
        "HND" (each KV head's rows of a page contiguous: a strided view of ``[num_blocks, Hkv, block_size, D]``
        memory) or "NHD" (token-major, contiguous). Asked for with ``kv_layout=``, else per device: "HND" on CPU,
        "NHD" elsewhere (llmkern/cache/pool.py). The first layer that has pages; before any, what they will be."""
        return next((lay for lay in self._pool.layouts if lay is not None),
                    layout_for(self._kv_layout, self._pool.default_device))

    @property
    def device(self) -> torch.device:
        """The device of the first layer's pages (``devices`` lists every layer's)."""
        k = self._pool.first_pages()
        return self._pool.default_device if k is None else k.device

    @property
    def devices(self) -> list:
        """Per layer, the device of its pages (None for a layer that has none yet)."""
        return [None if k is None else k.device for k in self._pool.k]

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer's pages (a rank's shard under tensor parallelism); before any pages exist, or when
        layers differ, the count the pool is sized with (``num_kv_heads`` given, else the config's)."""
        heads = {k.shape[2] for k in self._pool.k if k is not None}
        return heads.pop() if len(heads) == 1 else self._kv_heads

    # -- pages -----------------------------------------------------------------------------------------------------

    def _sync_layer_view(self, i: int) -> None:
        """The pool replaced layer ``i``'s pages: mirror them in its transformers layer object."""
        layer, k = self.layers[i], self._pool.k[i]
        layer.k_pages, layer.v_pages, layer.is_initialized = k, self._pool.v[i], k is not None
        layer.k_scales, layer.v_scales = self._pool.ks[i], self._pool.vs[i]
        if k is not None:
            layer.dtype, layer.device = k.dtype, k.device

    def _ensure_layer(self, i: int, key: torch.Tensor) -> None:
        self._pool.ensure_layer(i, key)

    def pages(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_pages, v_pages)`` of a layer, each ``[num_blocks, block_size, Hkv, D]`` on the layer's device."""
        return self._pool.pages(layer_idx)

    def layer_pages(self, layer_idx: int) -> LayerPages:
        """A layer's pages and, for 8-bit pages, their scales (``k``, ``v``, ``k_scales``, ``v_scales``), as the
        paged ops take them."""
        return self._pool.layer(layer_idx)

    def dense(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of a layer as a transformers ``DynamicCache`` holds them: ``[batch, Hkv, columns, D]``
        with ``columns = get_seq_length()`` (padding included, zeros there: the paged cache does not store padding),
        each row's tokens at the columns where they were real. Gathered from the pages: a new tensor of
        ``2 * batch * Hkv * columns * D`` elements, for callers that read a cache (``PagedLayer.keys``) and for the
        eager attention that ``output_attentions=True`` runs; the kernels never use it. Reserved mode: one sync."""
        k_pages, v_pages = self.pages(layer_idx)
        self._planner.pull()
        seqs = self._seqs
        B, cols = len(seqs.lens), seqs.seen
        H, D = k_pages.shape[2], k_pages.shape[3]
        dtype = self._pool.dtypes[layer_idx]
        keys = k_pages.new_zeros((B, H, cols, D), dtype=dtype)
        values = v_pages.new_zeros((B, H, cols, D), dtype=dtype)
        if not B or not cols:
            return keys, values
        real = seqs.real_columns()
        for b in range(B):
            n = seqs.lens[b]
            where = real[b].nonzero().flatten()
            if where.numel() != n:  # the bookkeeping is inconsistent: say so rather than misplace tokens
                raise RuntimeError(f"PagedKVCache row {b} holds {n} tokens but its history marks {where.numel()} "
                                   f"real columns")
            if not n:
                continue
            k, v = self._pool.read(layer_idx, seqs.row_slots(b))
            where = where.to(k_pages.device)
            keys[b][:, where] = k.transpose(0, 1)
            values[b][:, where] = v.transpose(0, 1)
        return keys, values

    # -- sequences -------------------------------------------------------------------------------------------------

    @property
    def num_sequences(self) -> int:
        return len(self._seqs.lens)

    def seq_lens(self) -> list[int]:
        """Real tokens held per batch row (reserved mode: read back from the device, one sync)."""
        self._planner.pull()
        return list(self._seqs.lens)

    def block_tables(self) -> list[list[int]]:
        """Pages of each batch row (copies)."""
        return [list(t) for t in self._seqs.tables]

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
        if self._planner.primed and key_states.shape[2] == 1:
            # Reserved mode, decode: the step runs on the device buffers (plan -> _advance); no host state is read
            # or written here, so a compiled step sees the same Python state every time. step -1 marks it.
            handle = PagedKV(self, layer_idx, key_states, value_states, -1)
            return handle, handle
        step = self._planner.enter(layer_idx)
        self._pool.ensure_layer(layer_idx, key_states)
        self._pool.filled.add(layer_idx)
        handle = PagedKV(self, layer_idx, key_states, value_states, step)
        return handle, handle

    def get_seq_length(self, layer_idx: int = 0):
        """Columns processed so far, padding included (HF's notion: ``input_ids[:, get_seq_length():]`` is new).
        Reserved mode, once a batch is in: a 0-d int64 tensor on the device, as transformers' ``StaticCache``
        returns (an int would need a sync per step, or freeze into a compiled graph)."""
        if self._planner.primed:
            return self._planner.lead_rsv().seen
        return self._seqs.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self.reserved:  # fixed, as transformers' StaticCache: masks of max_cache_len columns
            return self.max_cache_len, 0
        return self._seqs.seen + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def max_batch_size(self) -> int | None:
        """Largest batch accepted (None: any). A property because transformers 5.0-5.x's ``Cache`` defines
        ``max_batch_size`` as a read-only property of its own."""
        return self._planner.max_batch_size

    @property
    def max_cache_len(self) -> int | None:
        """Columns reserved per sequence (reserved mode), else None. A property for the same reason as
        ``max_batch_size``: transformers up to 5.2x's ``Cache`` defines a read-only ``max_cache_len``."""
        return self._planner.max_cache_len

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
        return len(self._seqs.lens) if self._seqs.lens else -1

    def reset(self) -> None:
        """Release every block; pages stay allocated (and are not cleared). A pending reserved-mode overflow is
        dropped with the sequences it concerned."""
        self.allocator.reset()
        self._seqs.clear()
        self._pool.filled.clear()
        self._planner.reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` columns (HF convention: the argument is <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of columns to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n == 0:
            return
        self._planner.pull()
        if n > self._seqs.seen:
            raise ValueError(f"cannot crop {n} columns from a cache holding {self._seqs.seen}")
        self._seqs.crop(n)
        self._planner.edited()

    def _remap_rows(self, rows: list[int]) -> None:
        """Batch row i becomes old row ``rows[i]``; pages are shared by reference count, never copied here."""
        self._planner.pull()
        lens = self._seqs.lens
        if any(not 0 <= r < len(lens) for r in rows):
            raise IndexError(f"row indices must be in 0..{len(lens) - 1}, got {rows}")
        if self.max_batch_size is not None and len(rows) > self.max_batch_size:
            raise ValueError(f"a batch of {len(rows)} sequences exceeds the cache's max_batch_size="
                             f"{self.max_batch_size}")
        self._seqs.remap(rows)
        self._planner.edited()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues beam ``beam_idx[i]``. Block tables are reordered, pages are shared."""
        if self._seqs.lens:
            self._remap_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._seqs.lens:
            self._remap_rows([b for b in range(len(self._seqs.lens)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._seqs.lens:
            self._remap_rows(torch.as_tensor(indices).flatten().tolist())

    # -- a step: plan once, then each layer writes and reads its pages ---------------------------------------------

    def plan(self, handle: PagedKV, attention_mask: torch.Tensor | None) -> StepPlan:
        """The step's metadata, computed at the first call of a forward and returned as is to the later layers
        (llmkern/cache/plan.py).

        ``attention_mask``: HF's 2-D padding mask ``[B, >= S]`` (1/True = real token), its last S columns being this
        step's (reserved mode: columns ``seen .. seen + S - 1`` of a mask that may be right-padded to
        ``max_cache_len``, as ``generate`` passes it there); None = no padding. Checks the whole step's demand first:
        on ``CacheExhaustedError`` nothing changed.
        """
        return self._planner.plan_step(handle, attention_mask)

    def can_enter(self, handle: PagedKV, layer_ids) -> bool:
        """Whether ``layer_ids`` may run this step's decode inside one C++ call over the plan ``handle``'s layer
        made (llmkern/decode_layer.py, the lookahead): none of them has been handed K/V in this step yet, their
        pages exist, and in the reserved mode none of them is the layer that advances the device buffers. Records
        nothing (``enter``)."""
        planner = self._planner
        if handle.step == -1:  # reserved mode, decode: update() keeps no host state either
            st = planner.rsv_by_layer[handle.layer_idx]
            return all(planner.rsv_by_layer[i] is st and i != st.first_layer for i in layer_ids)
        seen, filled = planner.step_layers, self._pool.filled
        return handle.step == planner.step and not any(i in seen or i not in filled for i in layer_ids)

    def enter(self, handle: PagedKV, layer_ids) -> None:
        """What ``update`` records of a layer, for ``layer_ids`` that ``can_enter`` cleared and whose K/V the C++
        call wrote."""
        if handle.step != -1:
            self._planner.step_layers.update(layer_ids)

    def leave(self, handle: PagedKV, layer_ids) -> None:
        """Undo ``enter`` for ``layer_ids`` whose outputs the model did not take (the lookahead was dropped): if the
        step is still the one ``handle`` belongs to, their ``update`` is still to come in it, and must not be
        taken for the start of a new forward."""
        planner = self._planner
        if handle.step != -1 and handle.step == planner.step:
            planner.step_layers.difference_update(layer_ids)

    def write(self, handle: PagedKV, plan: StepPlan) -> None:
        """Write a layer's new K/V into its pages at the plan's slots (padding skipped)."""
        self._pool.write(handle.layer_idx, handle.key, handle.value, plan.slot_mapping)

    # -- reporting -------------------------------------------------------------------------------------------------

    def memory(self) -> CacheMemory:
        """Bytes reserved by the pages vs bytes holding tokens (see ``CacheMemory``)."""
        self._planner.pull()
        per_token = self._pool.bytes_per_token()
        per_block = per_token * self.block_size
        reserved = self._pool.bytes()
        tokens = self._seqs.tokens_held()
        allocator = self.allocator
        return CacheMemory(
            reserved_bytes=reserved, per_layer_bytes=reserved // max(self.num_layers, 1),
            used_bytes=per_block * allocator.num_used, token_bytes=per_token * tokens,
            num_blocks=allocator.num_blocks, used_blocks=allocator.num_used, block_size=self.block_size,
            num_tokens=tokens, bytes_per_token=per_token, peak_bytes=self._pool.peak_bytes)

    def __repr__(self) -> str:
        # One short line that does not change from step to step (transformers puts it in messages); the contents
        # are in memory() and seq_lens().
        kind = (f"reserved {self.max_batch_size} x {self.max_cache_len}" if self.reserved else
                "growable" if self.growable else "fixed")
        return (f"PagedKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={self.block_size}, {str(self.kv_dtype).replace('torch.', '')}, {kind})")
