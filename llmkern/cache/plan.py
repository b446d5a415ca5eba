"""Planning a step of a ``PagedKVCache`` (llmkern/cache/__init__.py): the ``StepPlan`` every layer of a forward reads.

A forward's first attention call plans the step once (``Planner.plan``); every later layer gets the same plan (a
copy per further device of a device map). Two modes:

* Host mode: from the padding mask, check the whole step's page demand against the free list (growing the pool when
  it may, else ``CacheExhaustedError`` before touching anything), commit copy-on-write and new pages
  (llmkern/cache/sequences.py), and put the step's slot mapping, block tables, seq_lens and q_lens on the device.
* Reserved mode (``max_cache_len=``; the capturable decode step of the package docstring): persistent device buffers
  per device (``_Reserved``), advanced in place by a decode step with device ops only; the host mirror (the
  sequences) is read back (``pull``, one sync) when host code asks and pushed to the buffers (``push``) after the
  host changed it.

Also here: ``PagedKV``, the handle ``PagedKVCache.update`` returns and the attention function plans from. This
module may touch the sequences (through their operations) and ask the pool (llmkern/cache/pool.py) to grow or copy
pages; it never reads or writes page contents.
"""

from __future__ import annotations

import dataclasses

import torch

from llmkern.cache.pool import CacheExhaustedError, PagePool
from llmkern.cache.sequences import Sequences


@dataclasses.dataclass
class PagedKV:
    """What ``PagedKVCache.update`` returns in place of the ``(keys, values)`` tensors; the attention function gets
    it as ``key`` (and ``value``)."""

    cache: "PagedKVCache"  # noqa: F821 (llmkern/cache/__init__.py)
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


class Planner:
    """Steps of a ``PagedKVCache``: which forward is current, its plan(s), and the reserved mode's device buffers.

    ``max_cache_len`` not None: the reserved mode, every row holding ``pages_per_sequence`` pages. ``growable``:
    grow the pool when a step needs more pages than are free (else ``CacheExhaustedError``)."""

    def __init__(self, pool: PagePool, seqs: Sequences, *, num_layers: int, growable: bool,
                 max_batch_size: int | None, max_cache_len: int | None):
        self.pool = pool
        self.seqs = seqs
        self.growable = growable
        self.max_batch_size = max_batch_size
        self.max_cache_len = max_cache_len
        self.reserved = max_cache_len is not None
        self.pages_per_sequence = -(-max_cache_len // pool.block_size) if self.reserved else None
        self.rsv: dict = {}  # device -> _Reserved, the device buffers of the reserved mode
        self.rsv_by_layer: list = [None] * num_layers  # layer -> its device's _Reserved
        self.clear()

    def clear(self) -> None:
        """Forget the batch (the sequences are cleared with it); the reserved buffers stay for the next batch."""
        self.step = 0
        self.step_layers: set[int] = set()
        self.plan: StepPlan | None = None  # on the device of the step's first layer
        self.plans: dict = {}  # device -> the step's plan there (other devices of a device_map)
        self.primed = False  # reserved mode: the device buffers hold this batch (decode steps run on the device)
        self.dirty = False  # decode steps advanced the device buffers past the host mirror
        self.cols_bound = 0  # reserved mode: columns as the host counts them (eager decode steps raise past it)

    def reset(self) -> None:
        """``clear``, and drop a pending reserved-mode overflow with the sequences it concerned."""
        self.clear()
        for st in self.rsv.values():
            st.overflow.zero_()

    # -- steps -----------------------------------------------------------------------------------------------------

    def new_step(self) -> None:
        self.step += 1
        self.step_layers = set()
        self.plan = None
        self.plans = {}

    def enter(self, layer_idx: int) -> int:
        """A layer was handed this forward's K/V (``update``): the step it belongs to. Layers run in order, so seeing
        one again means a new forward."""
        if layer_idx in self.step_layers:
            self.new_step()
        self.step_layers.add(layer_idx)
        return self.step

    def edited(self) -> None:
        """The host changed the sequences (crop, row remap): the step's plans are stale, and in the reserved mode
        every row gets its pages back and the device buffers the new state."""
        self.new_step()
        if self.primed:
            src, dst = self.seqs.reserve(self.pages_per_sequence)
            if src:
                self.pool.copy(src, dst)
            self.push()

    # -- planning --------------------------------------------------------------------------------------------------

    def plan_step(self, handle: PagedKV, attention_mask: torch.Tensor | None) -> StepPlan:
        """``PagedKVCache.plan``: the step's plan for ``handle``'s layer (its device), made at the step's first call."""
        if handle.step == -1:
            return self._decode_plan(handle, attention_mask)
        plan = self._host_plan(handle, attention_mask)
        if self.reserved:
            self._bind(handle.layer_idx, handle.key.device)
        return plan

    def _host_plan(self, handle: PagedKV, attention_mask: torch.Tensor | None) -> StepPlan:
        if self.plan is not None and self.plan.step == handle.step:
            if handle.key.device == self.plan.device:
                return self.plan
            return self._plan_on(handle.key.device)
        if handle.step != self.step:
            raise RuntimeError("stale PagedKV handle: the cache has moved on to a later forward since this handle was "
                               "made (a handle is only valid within the forward whose update() returned it)")
        seqs, allocator = self.seqs, self.pool.allocator
        key = handle.key
        B, S = key.shape[0], key.shape[2]
        dev = key.device
        if self.max_batch_size is not None and B > self.max_batch_size:
            raise ValueError(f"batch of {B} sequences exceeds the cache's max_batch_size={self.max_batch_size}")
        if seqs.lens and B != len(seqs.lens):
            raise ValueError(f"the cache holds {len(seqs.lens)} sequences but this forward has a batch of {B}; "
                             f"reset() the cache to start a new batch")

        self.pull()
        if self.reserved and seqs.seen + S > self.max_cache_len:
            raise CacheExhaustedError(
                f"PagedKVCache (reserved, max_cache_len={self.max_cache_len}) holds {seqs.seen} columns; this step's "
                f"{S} more do not fit. Nothing was written. Create the cache with a larger max_cache_len, or reset() "
                f"it.", capacity=allocator.num_blocks, free=allocator.num_free, demand=S)

        # Which of this step's columns are real tokens (one device->host copy of [B, S] bools).
        if attention_mask is None:
            real = torch.ones((B, S), dtype=torch.bool)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < S:
                raise ValueError(f"attention_mask must be 2-D with one row per sequence ({B}) and at least this "
                                 f"step's {S} columns, got shape {tuple(attention_mask.shape)}")
            if self.reserved and attention_mask.shape[1] > seqs.seen + S:  # right-padded to max_cache_len
                real = attention_mask[:, seqs.seen:seqs.seen + S].to(device="cpu", dtype=torch.bool)
            else:
                real = attention_mask[:, -S:].to(device="cpu", dtype=torch.bool)
            if S > 1 and seqs.lens and attention_mask.shape[1] == seqs.seen + S:
                # Prefill on top of a filled cache (multi-turn): the mask's past must describe what is stored.
                held = attention_mask[:, :seqs.seen].to("cpu").long().sum(1).tolist()
                if held != seqs.lens:
                    raise ValueError(f"the attention mask's past columns count {held} real tokens per sequence but "
                                     f"the cache holds {seqs.lens}")
        n_new = real.sum(1).tolist()

        # 1. Demand, before touching anything: new pages, plus private copies of shared partial last pages. (Reserved
        # mode: every sequence holds all its pages from its first forward on.)
        new_blocks, cow = seqs.demand(n_new, self.pages_per_sequence)
        demand = sum(new_blocks) + cow
        if demand > allocator.num_free:
            if self.growable:
                self.pool.grow(allocator.num_used + demand)
            else:
                lens = seqs.lens if seqs.lens else [0] * B
                raise CacheExhaustedError(
                    f"PagedKVCache is out of blocks: this step needs {demand} more blocks of {seqs.block_size} tokens "
                    f"({sum(new_blocks)} for {sum(n_new)} new tokens, {cow} for copy-on-write) but only "
                    f"{allocator.num_free} of its {allocator.num_blocks} blocks are free "
                    f"(sequence lengths {lens}). Nothing was written. Create the cache with a larger num_blocks or "
                    f"max_memory_bytes, or reset() it.",
                    capacity=allocator.num_blocks, free=allocator.num_free, demand=demand)

        # 2. Commit: copy-on-write, then new pages.
        nothing_held = not any(seqs.lens)  # before the lengths move on
        src, dst = seqs.commit(n_new, new_blocks)
        if src:
            self.pool.copy(src, dst)

        # 3. Slot mapping: real token t of row b goes to position lens[b] + (its rank among the row's real tokens).
        slots, bt_host = seqs.append(real)

        # 4. Rows of q to gather so that each row's real tokens are its last q_lens[b] (HF left padding already is).
        q_index = None
        is_suffix = real.long().cummax(1).values.bool().eq(real).all().item()  # no real token before a padding one
        if not is_suffix:
            order = torch.argsort(real.long(), dim=1, stable=True)  # padding columns first, then real in order
            q_index = order.to(dev)

        self.plans = {}
        self.plan = StepPlan(
            step=self.step, batch_size=B, q_len=S, device=dev,
            slot_mapping=slots.reshape(-1).to(dev),
            # A copy on purpose (B x blocks int32, once per step): the slice aliases the mutable host mirror.
            block_tables=bt_host.contiguous().to(dev),
            seq_lens=torch.tensor(seqs.lens, dtype=torch.int32).to(dev),
            q_lens=torch.tensor(n_new, dtype=torch.int32).to(dev),
            max_seq_len=max(seqs.lens),
            decode=S == 1 and all(n == 1 for n in n_new),
            q_index=q_index,
            fresh=nothing_held and q_index is None,
            real=real.to(dev) if nothing_held and q_index is None and not all(n == S for n in n_new) else None,
        )
        if self.reserved:
            self.primed = True
            self.push()
        return self.plan

    def _plan_on(self, device: torch.device) -> StepPlan:
        """The step's plan with its tensors on ``device`` (a layer of a device_map on another device than the
        step's first layer): copied once per step and device, shared by every layer there."""
        plan = self.plans.get(device)
        if plan is None:
            p = self.plan
            plan = dataclasses.replace(
                p, device=device, slot_mapping=p.slot_mapping.to(device), block_tables=p.block_tables.to(device),
                seq_lens=p.seq_lens.to(device), q_lens=p.q_lens.to(device),
                q_index=None if p.q_index is None else p.q_index.to(device), num_splits={}, direct=set(),
                real=None if p.real is None else p.real.to(device))
            self.plans[device] = plan
        return plan

    # -- reserved mode: the device buffers -------------------------------------------------------------------------

    def _decode_plan(self, handle: PagedKV, attention_mask) -> StepPlan:
        """Reserved mode, a decode step: the plan over the layer's device buffers, advanced once per step (by the
        first layer on each device) with device ops only."""
        st = self.rsv_by_layer[handle.layer_idx]
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
                if self.cols_bound >= self.max_cache_len:
                    allocator = self.pool.allocator
                    raise CacheExhaustedError(
                        f"PagedKVCache (reserved, max_cache_len={self.max_cache_len}) is full: this decode step "
                        f"needs column {self.cols_bound + 1}. Nothing was written. Create the cache with a larger "
                        f"max_cache_len (generate: max_length), or reset() it.",
                        capacity=allocator.num_blocks, free=allocator.num_free, demand=1)
                self.cols_bound += 1
            self._advance(st, attention_mask)
        return st.plan

    def _advance(self, st: _Reserved, attention_mask) -> None:
        """One decode column on ``st``'s buffers, in place: which rows' tokens are real (the mask's column ``seen``:
        the last one of a ``[B, seen + 1]`` mask, or inside one right-padded to max_cache_len), their slots, the
        lengths, the history. Past max_cache_len nothing is stored and ``overflow`` is set."""
        B, W, bs = st.seq_lens.shape[0], self.max_cache_len, self.pool.block_size
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
        self.dirty = True

    def lead_rsv(self) -> _Reserved:
        """The buffers of the lowest layer's device (every device's hold the same values)."""
        return next(st for st in self.rsv_by_layer if st is not None)

    def pull(self) -> None:
        """Reserved mode: read the device buffers back into the host mirror after decode steps (one sync)."""
        if not self.dirty:
            return
        st, seqs = self.lead_rsv(), self.seqs
        seqs.lens = st.seq_lens.tolist()
        seqs.seen = int(st.seen)
        seqs.history = [st.history[:, :seqs.seen].cpu()]
        self.cols_bound = seqs.seen
        self.dirty = False
        if bool(st.overflow):
            for s in self.rsv.values():
                s.overflow.zero_()
            allocator = self.pool.allocator
            raise CacheExhaustedError(
                f"PagedKVCache (reserved, max_cache_len={self.max_cache_len}): a captured decode step ran past "
                f"{self.max_cache_len} columns; its token was not stored and its output did not see it. The cache "
                f"holds what it held before that step. Create the cache with a larger max_cache_len (generate: "
                f"max_length), or reset() it.", capacity=allocator.num_blocks, free=allocator.num_free,
                demand=1)

    def _host_buffers(self) -> tuple:
        seqs = self.seqs
        B, W = len(seqs.lens), self.max_cache_len
        history = torch.zeros((B, W), dtype=torch.bool)
        if seqs.seen:
            history[:, :seqs.seen] = torch.cat(seqs.history, 1)
        return (seqs.bt_host[:, :self.pages_per_sequence], torch.tensor(seqs.lens, dtype=torch.int32), history)

    def _new_rsv(self, device: torch.device, first_layer: int) -> _Reserved:
        with torch.inference_mode(False):  # normal tensors: host code outside inference mode updates them in place
            return self._make_rsv(device, first_layer)

    def _make_rsv(self, device: torch.device, first_layer: int) -> _Reserved:
        bt, lens, history = self._host_buffers()
        B = lens.shape[0]
        bufs = dict(block_tables=bt.to(device, copy=True), seq_lens=lens.to(device),
                    slot_mapping=torch.full((B,), -1, dtype=torch.int64, device=device),
                    seen=torch.tensor(self.seqs.seen, dtype=torch.int64, device=device), history=history.to(device),
                    overflow=torch.zeros((), dtype=torch.bool, device=device))
        for t in bufs.values():
            torch._dynamo.mark_static_address(t)
        plan = StepPlan(step=-1, batch_size=B, q_len=1, device=device, slot_mapping=bufs["slot_mapping"],
                        block_tables=bufs["block_tables"], seq_lens=bufs["seq_lens"],
                        q_lens=torch.ones((B,), dtype=torch.int32, device=device),
                        max_seq_len=self.pages_per_sequence * self.pool.block_size, decode=True, q_index=None)
        return _Reserved(device=device, plan=plan, first_layer=first_layer, **bufs)

    def _bind(self, layer_idx: int, device: torch.device) -> None:
        """Reserved mode: layer ``layer_idx`` runs on ``device``; its decode steps use that device's buffers."""
        st = self.rsv.get(device)
        if st is None or st.seq_lens.shape[0] != len(self.seqs.lens):
            first = layer_idx if st is None else min(st.first_layer, layer_idx)
            st = self.rsv[device] = self._new_rsv(device, first)
            self.rsv_by_layer = [st if (o is not None and o.device == device) else o for o in self.rsv_by_layer]
        elif layer_idx < st.first_layer:
            st.first_layer = layer_idx
        self.rsv_by_layer[layer_idx] = st

    def push(self) -> None:
        """Reserved mode: copy the host mirror into every device's buffers (in place while the batch keeps its
        size, so their addresses hold), after the host changed it (a prefill, crop, beam reorder)."""
        self.cols_bound = self.seqs.seen
        self.dirty = False
        if not self.rsv:
            return
        bt, lens, history = self._host_buffers()
        for device, st in list(self.rsv.items()):
            if st.seq_lens.shape[0] != lens.shape[0]:  # another batch size: new buffers
                new = self.rsv[device] = self._new_rsv(device, st.first_layer)
                self.rsv_by_layer = [new if o is st else o for o in self.rsv_by_layer]
                continue
            st.block_tables.copy_(bt)
            st.seq_lens.copy_(lens)
            st.seen.fill_(self.seqs.seen)
            st.history.copy_(history)
            st.overflow.zero_()
            st.slot_mapping.fill_(-1)
