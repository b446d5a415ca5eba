"""Sequence bookkeeping of a ``PagedKVCache`` (llmkern/cache/__init__.py): which pages each batch row owns.

Per batch row: its block table (its pages, in order; token ``p`` lives in page ``table[p // block_size]`` at row
``p % block_size``) and its length (real tokens held); per step, which columns were real tokens (``history``), and
the column count HF calls the cache's sequence length (``seen``, padding included). The operations on them: a step's
page demand and its commit (new pages, copy-on-write of shared partial last pages), the slot mapping of a step's real
tokens, crop, row remaps (beam reorder, repeat, select), the reserved mode's per-row page reservation, and where each
row's tokens are (for the dense read and the memory report).

Host-side only (Python lists and CPU tensors). It may touch the allocator's reference counts (llmkern/cache/pool.py's
``BlockAllocator``), never the pages: where pages must be copied it returns the ``(src, dst)`` block ids and the
caller has the pool copy them. Device tensors and the reserved mode's device buffers are llmkern/cache/plan.py's.
"""

from __future__ import annotations

import torch

from llmkern.cache.pool import BlockAllocator


class Sequences:
    """Block tables, lengths and column history of the cache's batch rows (module docstring)."""

    def __init__(self, block_size: int, allocator: BlockAllocator):
        self.block_size = block_size
        self.allocator = allocator  # the pool's, for the whole life of the cache (it grows and resets in place)
        self.clear()

    def clear(self) -> None:
        self.tables: list[list[int]] = []  # per batch row: its pages, in order
        self.lens: list[int] = []  # per batch row: real tokens held
        self.history: list[torch.Tensor] = []  # per step: bool [B, S] on CPU, which columns were real tokens
        self.seen = 0  # columns processed (padding included): what HF calls the cache's sequence length
        self.bt_host = torch.zeros((0, 0), dtype=torch.int32)  # mirror of tables, padded with 0

    # -- the host block-table mirror -------------------------------------------------------------------------------

    def rebuild_bt_host(self) -> None:
        width = max([len(t) for t in self.tables], default=0)
        bt = torch.zeros((len(self.tables), max(width, 1)), dtype=torch.int32)
        for b, t in enumerate(self.tables):
            if t:
                bt[b, :len(t)] = torch.tensor(t, dtype=torch.int32)
        self.bt_host = bt

    def set_bt(self, b: int, j: int, block: int) -> None:
        if j >= self.bt_host.shape[1]:
            grown = torch.zeros((self.bt_host.shape[0], max(2 * self.bt_host.shape[1], j + 1)), dtype=torch.int32)
            grown[:, :self.bt_host.shape[1]] = self.bt_host
            self.bt_host = grown
        self.bt_host[b, j] = block

    # -- a step: demand, commit, slots -----------------------------------------------------------------------------

    def demand(self, n_new: list[int], pages_per_sequence: int | None) -> tuple[list[int], int]:
        """Pages a step adding ``n_new[b]`` real tokens to each of its rows needs, before touching anything: per row
        the new pages (``pages_per_sequence``: every row holds that many, the reserved mode), and the private copies
        of shared partial last pages (copy-on-write) in all."""
        B, bs = len(n_new), self.block_size
        lens = self.lens if self.lens else [0] * B
        tables = self.tables if self.tables else [[] for _ in range(B)]
        if pages_per_sequence is not None:
            new_blocks = [pages_per_sequence - len(tables[b]) for b in range(B)]
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
        return new_blocks, cow

    def commit(self, n_new: list[int], new_blocks: list[int]) -> tuple[list[int], list[int]]:
        """Take the pages ``demand`` counted: private copies of shared partial last pages the step writes to, then
        new pages. Returns the ``(src, dst)`` pages the pool must copy."""
        B, bs = len(n_new), self.block_size
        if not self.tables:
            self.tables, self.lens = [[] for _ in range(B)], [0] * B
            self.bt_host = torch.zeros((B, 1), dtype=torch.int32)
        src, dst = [], []
        for b in range(B):
            if n_new[b] and self.lens[b] % bs:
                j = self.lens[b] // bs
                last = self.tables[b][j]
                if self.allocator.refcount(last) > 1:
                    (fresh,) = self.allocator.allocate(1)
                    self.allocator.decref([last])
                    self.tables[b][j] = fresh
                    self.set_bt(b, j, fresh)
                    src.append(last)
                    dst.append(fresh)
        for b in range(B):
            if new_blocks[b]:
                for blk in self.allocator.allocate(new_blocks[b]):
                    self.set_bt(b, len(self.tables[b]), blk)
                    self.tables[b].append(blk)
        return src, dst

    def append(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a step's columns ``real`` (bool ``[B, S]`` on CPU, True = real token) whose pages are committed:
        returns the slot mapping (int64 ``[B, S]``, -1 = padding; real token t of row b goes to position
        ``lens[b]`` + its rank among the row's real tokens) and the block tables (int32 ``[B, width]``, a view of the
        host mirror), and moves the lengths, history and column count on."""
        bs = self.block_size
        old = torch.tensor(self.lens, dtype=torch.long)
        pos = old[:, None] + real.long().cumsum(1) - 1  # [B, S]
        pos = torch.where(real, pos, torch.zeros((), dtype=torch.long))
        width = max(len(t) for t in self.tables)
        bt_host = self.bt_host[:, :max(width, 1)]
        blk = torch.gather(bt_host.long(), 1, pos // bs)
        slots = torch.where(real, blk * bs + pos % bs, torch.full((), -1, dtype=torch.long))
        for b, n in enumerate(real.sum(1).tolist()):
            self.lens[b] += n
        self.history.append(real)
        self.seen += real.shape[1]
        return slots, bt_host

    # -- host edits: crop, row remaps, reservation -----------------------------------------------------------------

    def crop(self, n: int) -> None:
        """Drop the last ``n`` columns (0 < n <= seen) and the pages no row needs any more."""
        removed = [0] * len(self.lens)
        left = n
        while left:
            last = self.history[-1]
            take = min(left, last.shape[1])
            for b, c in enumerate(last[:, last.shape[1] - take:].sum(1).tolist()):
                removed[b] += c
            if take == last.shape[1]:
                self.history.pop()
            else:
                self.history[-1] = last[:, :last.shape[1] - take]
            left -= take
        for b, r in enumerate(removed):
            self.lens[b] -= r
            keep = -(-self.lens[b] // self.block_size)
            self.allocator.decref(self.tables[b][keep:])
            del self.tables[b][keep:]
        self.seen -= n
        self.rebuild_bt_host()

    def remap(self, rows: list[int]) -> None:
        """Batch row i becomes old row ``rows[i]``; pages are shared by reference count, never copied here."""
        new_tables = [list(self.tables[r]) for r in rows]
        for t in new_tables:
            self.allocator.incref(t)
        for t in self.tables:
            self.allocator.decref(t)
        self.tables = new_tables
        self.lens = [self.lens[r] for r in rows]
        idx = torch.tensor(rows, dtype=torch.long)
        self.history = [h.index_select(0, idx) for h in self.history]
        self.rebuild_bt_host()

    def reserve(self, pages_per_sequence: int) -> tuple[list[int], list[int]]:
        """Reserved mode, after a crop or a row remap: every row gets private pages from the one its next token goes
        to on, and pages up to ``pages_per_sequence`` again. Returns the ``(src, dst)`` pages the pool must copy (a
        shared partial page the row's next token goes to)."""
        bs, src, dst = self.block_size, [], []
        for b, t in enumerate(self.tables):
            start = self.lens[b] // bs
            for j in range(start, len(t)):
                if self.allocator.refcount(t[j]) > 1:
                    (fresh,) = self.allocator.allocate(1)
                    self.allocator.decref([t[j]])
                    if j == start and self.lens[b] % bs:
                        src.append(t[j])
                        dst.append(fresh)
                    t[j] = fresh
            if len(t) < pages_per_sequence:
                t.extend(self.allocator.allocate(pages_per_sequence - len(t)))
        self.rebuild_bt_host()
        return src, dst

    # -- where tokens are ------------------------------------------------------------------------------------------

    def real_columns(self) -> torch.Tensor:
        """bool ``[B, seen]``: which columns of each row were real tokens."""
        if self.history:
            return torch.cat(self.history, 1)
        return torch.zeros((len(self.lens), 0), dtype=torch.bool)

    def row_slots(self, b: int) -> torch.Tensor:
        """int64 ``[lens[b]]``: the slot (``block * block_size + row``) of each of row ``b``'s tokens, in order."""
        offsets = torch.arange(self.block_size)
        table = torch.tensor(self.tables[b], dtype=torch.long)
        return (table[:, None] * self.block_size + offsets).flatten()[:self.lens[b]]

    def tokens_held(self) -> int:
        """Distinct token slots held (a prefix shared by beams counts once)."""
        filled: dict[int, int] = {}
        for t, n in zip(self.tables, self.lens):
            for j, blk in enumerate(t):
                filled[blk] = max(filled.get(blk, 0), min(self.block_size, n - j * self.block_size))
        return sum(filled.values())
