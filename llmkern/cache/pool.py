"""The page pool of a ``PagedKVCache`` (llmkern/cache/__init__.py): which pages exist, where, in what format.

Holds the block allocator (free list and reference counts over block ids) and, per layer, the K and V pages
``[num_blocks, block_size, Hkv, D]`` on that layer's device, in that layer's dtype and KV head count: making them at
a layer's first K/V, growing the pool (doubling, one layer at a time), copying pages (copy-on-write), writing a
step's K/V at its slots and reading token rows back, and what all of it costs in bytes.

Page formats: the model's dtype (K/V bit for bit), or 8-bit (``kv_dtype`` int8 or float8_e4m3fn): codes in the pages
and one float16 scale per (token, KV head) in ``k_scales``/``v_scales`` ``[num_blocks, block_size, Hkv]`` beside them
(llmkern/reference.py, ``quantize_kv``). Pages and scales are made, grown, copied and written together.

Page layout (``kv_layout``): every page is handed out as ``[num_blocks, block_size, Hkv, D]``; what differs is where
its elements sit in memory. "NHD" (token-major, the tensor contiguous): a token's rows of all KV heads together, as
transformers' and vLLM's GPU pools store them. "HND" (head-major): the memory is ``[num_blocks, Hkv, block_size, D]``
and the page a strided view of it, so one KV head's rows of a page are ``block_size * D`` contiguous elements, the
run a decode kernel streams. The kernels take either (any strides along blocks, slots and heads). Default per layer
device: "HND" on CPU, where the decode attention took 0.45-1.03x the time of "NHD" pages (cold caches, AMD EPYC
AVX-512, 2 threads: README.md, "Decode attention: page layout and prefetch"), "NHD" elsewhere (the GPU kernels were
tuned on it and nothing was measured on a GPU).

This is the only module that knows the page format (llmkern/paged_ops.py holds the kernels that read and write it):
a new format changes this module and the kernels. It may touch the pages and the
allocator; it knows nothing of sequences, block tables or plans (llmkern/cache/sequences.py, llmkern/cache/plan.py),
which hand it block ids and slots.
"""

from __future__ import annotations

import os

import torch

from typing import NamedTuple

from llmkern import paged_ops, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the paged ops take
KV_DTYPES = reference.KV_DTYPES  # 8-bit page formats: int8, float8_e4m3fn (with float16 scales)
_KV_NAMES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn}


def parse_kv_dtype(kv_dtype) -> torch.dtype | None:
    """``kv_dtype`` as the cache and ``patch`` take it -> the pages' 8-bit dtype, or None (the model's dtype)."""
    if kv_dtype is None or kv_dtype == "auto":
        return None
    if isinstance(kv_dtype, torch.dtype) and kv_dtype in KV_DTYPES:
        return kv_dtype
    if isinstance(kv_dtype, str) and kv_dtype in _KV_NAMES:
        return _KV_NAMES[kv_dtype]
    raise ValueError(f"kv_dtype must be None or 'auto' (pages in the model's dtype), 'int8' or 'fp8_e4m3' (8-bit "
                     f"pages with one float16 scale per token and KV head), got {kv_dtype!r}")


def row_bytes(head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype | None) -> int:
    """Bytes of one token's K (or V) row of one KV head: D elements, plus its scale for 8-bit pages."""
    if kv_dtype is None:
        return head_dim * dtype.itemsize
    return head_dim * kv_dtype.itemsize + reference.SCALE_DTYPE.itemsize


KV_LAYOUTS = ("NHD", "HND")


def parse_kv_layout(kv_layout) -> str | None:
    """``kv_layout`` as the cache takes it -> "NHD", "HND" or None (the default of each layer's device)."""
    if kv_layout is None or kv_layout == "auto":
        return None
    if isinstance(kv_layout, str) and kv_layout.upper() in KV_LAYOUTS:
        return kv_layout.upper()
    raise ValueError(f"kv_layout must be None or 'auto' (head-major 'HND' on CPU, 'NHD' elsewhere), 'NHD' "
                     f"(pages token-major in memory) or 'HND' (each KV head's rows of a page contiguous), got "
                     f"{kv_layout!r}")


def layout_for(kv_layout: str | None, device: torch.device) -> str:
    """The layout a layer's pages get on ``device``."""
    return kv_layout or ("HND" if torch.device(device).type == "cpu" else "NHD")


def empty_pages(shape: tuple, layout: str, *, dtype: torch.dtype, device, zero: bool) -> torch.Tensor:
    """Pages (or scales) of logical ``shape`` ``[num_blocks, block_size, Hkv, ...]`` stored in ``layout``: for "HND"
    a ``[num_blocks, Hkv, block_size, ...]`` tensor, transposed back to the logical shape (a strided view)."""
    make = torch.zeros if zero else torch.empty
    if layout == "NHD":
        return make(shape, dtype=dtype, device=device)
    return make((shape[0], shape[2], shape[1], *shape[3:]), dtype=dtype, device=device).transpose(1, 2)


class LayerPages(NamedTuple):
    """One layer's pages as the ops take them: ``k``, ``v`` ``[num_blocks, block_size, Hkv, D]`` and, for 8-bit
    pages, their scales ``k_scales``, ``v_scales`` ``[num_blocks, block_size, Hkv]`` (None for float pages)."""
    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None
    v_scales: torch.Tensor | None
MAX_BLOCK_SIZE = 256  # paged_ops.MAX_BLOCK_SIZE: a block is one tile of the attention kernels


class CacheExhaustedError(RuntimeError):
    """The paged KV cache has fewer free blocks than a step needs. Raised before anything is allocated or written,
    so the cache still holds exactly what it held before the failed step."""

    def __init__(self, message: str, *, capacity: int, free: int, demand: int):
        super().__init__(message)
        self.capacity = capacity
        self.free = free
        self.demand = demand


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


def write(pages: LayerPages, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write a step's ``key``/``value`` ``[B, Hkv, S, D]`` into a layer's ``pages`` at ``slot_mapping`` ``[B * S]``
    (-1 skipped), quantizing for 8-bit pages."""
    B, H, S, D = key.shape
    # [B, Hkv, S, D] -> [B*S, Hkv, D]: a view for S == 1 (decode), one copy for a prefill chunk.
    paged_ops.reshape_and_cache(key.transpose(1, 2).reshape(B * S, H, D), value.transpose(1, 2).reshape(B * S, H, D),
                                pages.k, pages.v, slot_mapping, pages.k_scales, pages.v_scales)


def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                    kv_dtype: torch.dtype | None = None) -> int:
    """K + V of one block over all layers (scales included for 8-bit pages)."""
    return 2 * num_layers * block_size * kv_heads * row_bytes(head_dim, dtype, kv_dtype)


def blocks_for_fraction(fraction: float, devices: list, per_layer_block: int, free_bytes) -> int:
    """Blocks per layer of a fixed pool taking ``fraction`` of the memory free on ``devices`` (one per layer; each
    device pays for the layers it holds, the smallest pool wins). ``free_bytes(device)`` reads the free memory."""
    if any(d is None for d in devices):
        raise ValueError("memory_fraction needs every layer's device: pass device= a device, or a map without "
                         "None entries (or max_memory_bytes instead)")
    blocks = []
    for dev in dict.fromkeys(devices):
        layers = sum(d == dev for d in devices)
        blocks.append(int(fraction * free_bytes(dev)) // (per_layer_block * layers))
    n = min(blocks)
    if n < 1:
        free = ", ".join(f"{d}: {free_bytes(d)} bytes" for d in dict.fromkeys(devices))
        raise ValueError(f"memory_fraction={fraction} of the free memory ({free}) does not hold one block of "
                         f"every layer ({per_layer_block} bytes per layer and block)")
    return n


def free_bytes(device: torch.device) -> int:
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
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    raise ValueError(f"memory_fraction sizes pools on CUDA or CPU devices, got {device}; pass max_memory_bytes")


def same_device(a: torch.device, b: torch.device) -> bool:  # "cuda" (None index) matches any cuda:i
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class PagePool:
    """Per layer, K and V pages ``[num_blocks, block_size, Hkv, D]`` (None until made), and the allocator over their
    block ids. Each layer has its own device, dtype and KV head count, taken from the K/V it is handed unless given
    (``explicit_*``; ``layer_devices[i]`` None = the K/V's).

    ``on_layer(i)`` is called whenever layer ``i``'s pages are replaced (made, re-made, grown): the cache's
    transformers-facing layer objects mirror them. ``static_addresses``: mark the pages as fixed addresses for
    compiled steps (the reserved mode). ``kv_dtype``: 8-bit pages (int8 / float8_e4m3fn) with scales, whatever the
    model's dtype; None: pages in the layer's dtype. ``kv_layout``: "NHD", "HND" or None (the layer device's
    default, ``layout_for``)."""

    def __init__(self, *, num_layers: int, block_size: int, head_dim: int, kv_heads: int, num_blocks: int,
                 default_dtype: torch.dtype, default_device: torch.device, layer_devices: list,
                 explicit_dtype: torch.dtype | None, explicit_kv_heads: int | None, static_addresses: bool,
                 on_layer=None, kv_dtype: torch.dtype | None = None, kv_layout: str | None = None):
        self.num_layers = num_layers
        self.block_size = block_size
        self.head_dim = head_dim
        self.kv_heads = kv_heads  # what the pool is sized with before pages exist
        self.default_dtype = default_dtype
        self.default_device = default_device
        self.layer_devices = layer_devices
        self.explicit_dtype = explicit_dtype
        self.explicit_kv_heads = explicit_kv_heads
        self.static_addresses = static_addresses
        self.on_layer = on_layer or (lambda i: None)
        self.allocator = BlockAllocator(num_blocks)
        self.kv_dtype = kv_dtype
        self.kv_layout = kv_layout
        self.layouts: list[str | None] = [None] * num_layers  # per layer, the layout its pages were made in
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.ks: list[torch.Tensor | None] = [None] * num_layers  # 8-bit pages: their scales
        self.vs: list[torch.Tensor | None] = [None] * num_layers
        self.dtypes: list[torch.dtype | None] = [None] * num_layers  # the K/V dtype a layer takes and reads back
        self.filled: set[int] = set()  # layers handed K/V since the last reset: their pages may hold tokens
        self.peak_bytes = 0

    # -- what exists -----------------------------------------------------------------------------------------------

    def _all(self) -> tuple:
        return (self.k, self.v, self.ks, self.vs)

    def bytes(self) -> int:
        """Every layer's pages and scales."""
        return sum(t.numel() * t.element_size() for pages in self._all() for t in pages if t is not None)

    def first_pages(self) -> torch.Tensor | None:
        return next((k for k in self.k if k is not None), None)

    def bytes_per_token(self) -> int:
        """K + V of one token over all layers (a layer without pages yet: as it will be made)."""
        per_token = 0
        for k, dtype in zip(self.k, self.dtypes):
            heads = self.kv_heads if k is None else k.shape[2]
            per_token += 2 * heads * row_bytes(self.head_dim, dtype or self.default_dtype, self.kv_dtype)
        return per_token

    def pages(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_pages, v_pages)`` of a layer, each ``[num_blocks, block_size, Hkv, D]`` on the layer's device."""
        k = self.k[layer_idx]
        if k is None:
            raise RuntimeError(f"layer {layer_idx} of the PagedKVCache has no pages yet: they are made from the first "
                               f"K/V it is handed (update)")
        return k, self.v[layer_idx]

    def layer(self, layer_idx: int) -> LayerPages:
        """A layer's pages and (8-bit) scales, as the ops take them."""
        k, v = self.pages(layer_idx)
        return LayerPages(k, v, self.ks[layer_idx], self.vs[layer_idx])

    # -- making and growing ----------------------------------------------------------------------------------------

    def make_layer(self, i: int, heads: int, dtype: torch.dtype, device) -> None:
        # Zeroed, not empty: a kernel never reads past seq_len, but garbage pages would make a bug look random.
        shape = (self.allocator.num_blocks, self.block_size, heads, self.head_dim)
        for pages in self._all():  # the old pages (another dtype, device, heads) go first
            pages[i] = None
        self.on_layer(i)
        self.dtypes[i] = dtype
        layout = self.layouts[i] = layout_for(self.kv_layout, device)
        with torch.inference_mode(False):  # normal tensors: a crop or reorder outside inference mode writes them
            self.k[i] = empty_pages(shape, layout, dtype=self.kv_dtype or dtype, device=device, zero=True)
            self.v[i] = empty_pages(shape, layout, dtype=self.kv_dtype or dtype, device=device, zero=True)
            if self.kv_dtype is not None:
                self.ks[i] = empty_pages(shape[:3], layout, dtype=reference.SCALE_DTYPE, device=device, zero=True)
                self.vs[i] = empty_pages(shape[:3], layout, dtype=reference.SCALE_DTYPE, device=device, zero=True)
        if self.static_addresses:  # fixed addresses: a compiled step may treat them as static (CUDA graphs)
            for pages in self._all():
                if pages[i] is not None:
                    torch._dynamo.mark_static_address(pages[i])
        self.on_layer(i)
        self.peak_bytes = max(self.peak_bytes, self.bytes())

    def ensure_layer(self, i: int, key: torch.Tensor) -> None:
        """Make layer ``i``'s pages match its K/V ``key [B, Hkv, S, D]`` (heads, dtype, device), before anything of
        the step is written: created at its first K/V, re-created while it holds no tokens."""
        k = self.k[i]
        heads, dtype, device = key.shape[1], key.dtype, key.device
        if k is not None and k.shape[2] == heads and self.dtypes[i] == dtype and k.device == device:
            return
        if self.explicit_dtype is not None and dtype != self.explicit_dtype:
            raise TypeError(f"PagedKVCache was created with dtype={self.explicit_dtype} but the model's keys are "
                            f"{dtype}")
        want = self.layer_devices[i]
        if want is not None and not same_device(device, want):
            raise ValueError(f"PagedKVCache was created with device={want} for layer {i} but the model's keys of "
                             f"that layer are on {device}")
        if self.explicit_kv_heads is not None and heads != self.explicit_kv_heads:
            raise ValueError(f"PagedKVCache was created with num_kv_heads={self.explicit_kv_heads} but the keys of "
                             f"layer {i} hold {heads} KV heads")
        if k is not None and i in self.filled and self.allocator.num_used:
            raise RuntimeError(f"PagedKVCache layer {i} holds tokens as {self.dtypes[i]} with {k.shape[2]} KV heads on "
                               f"{k.device}; it cannot take {dtype} keys with {heads} KV heads on {device} (reset() "
                               f"it first)")
        self.make_layer(i, heads, dtype, device)

    def grow(self, min_blocks: int) -> None:
        """Grow the pool to at least ``min_blocks`` (doubling), one layer's K or V pages at a time: each is copied
        into its larger replacement (on its own device) and released before the next, so the pages never hold more
        than the new pool plus one old layer's K (or V) pages. (A ``torch.cat`` of every layer would hold old and
        new pools at once.) Layers without pages yet get the new size when they are made."""
        old = self.allocator.num_blocks
        new = max(min_blocks, 2 * old, 1)
        one_old = max((t.numel() * t.element_size() for t in self.k if t is not None), default=0)
        for pages in self._all():
            for i, t in enumerate(pages):
                if t is None:
                    continue
                with torch.inference_mode(False):  # normal tensors, as make_layer makes them
                    grown = empty_pages((new, *t.shape[1:]), self.layouts[i], dtype=t.dtype, device=t.device,
                                        zero=False)
                    grown[:old].copy_(t)
                    grown[old:].zero_()
                pages[i] = grown  # the last references to the old pages: this list and the layer's view
                del t
                self.on_layer(i)
        self.allocator.grow(new)
        self.peak_bytes = max(self.peak_bytes, self.bytes() + one_old)

    # -- reading and writing pages ---------------------------------------------------------------------------------

    def copy(self, src: list[int], dst: list[int]) -> None:
        """Copy pages ``src[i] -> dst[i]`` in every layer (on each layer's device)."""
        index: dict = {}  # device -> (src, dst) there
        for k, v, ks, vs in zip(*self._all()):
            if k is None:  # made later at its first K/V, zeroed: it holds nothing to copy
                continue
            if k.device not in index:
                index[k.device] = (torch.tensor(src, dtype=torch.int64, device=k.device),
                                   torch.tensor(dst, dtype=torch.int64, device=k.device))
            paged_ops.copy_blocks(k, v, *index[k.device])
            if ks is not None:  # the scales go with their pages (as [num_blocks, block_size, Hkv, 1] pages)
                paged_ops.copy_blocks(ks.unsqueeze(-1), vs.unsqueeze(-1), *index[k.device])

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write a layer's new ``key``/``value`` ``[B, Hkv, S, D]`` at ``slot_mapping`` (``[B * S]``, -1 skipped)."""
        write(self.layer(layer_idx), key, value, slot_mapping)

    def read(self, layer_idx: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows ``[len(slots), Hkv, D]`` of a layer at token ``slots`` (``block * block_size + row``), in the
        layer's dtype (8-bit pages: dequantized)."""
        k, v, ks, vs = self.layer(layer_idx)
        slots = slots.to(k.device)
        index, dtype = (slots // self.block_size, slots % self.block_size), self.dtypes[layer_idx]
        return reference.gather_rows(k, ks, index, dtype), reference.gather_rows(v, vs, index, dtype)
