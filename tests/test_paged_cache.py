"""PagedKVCache and its block allocator, driven directly (no model): allocation, padding, sharing, copy-on-write,
exhaustion, crop, memory report. Pages are written by the real ops (Triton under the interpreter on CPU)."""

import pytest
import torch

import llmkern
from llmkern import testing
from llmkern.cache import BlockAllocator, CacheExhaustedError, PagedKVCache

CFG = testing.tiny_config("llama-tiny")  # 2 layers, 2 KV heads, head_dim 32
L, HKV, D = 2, 2, 32


def _step(cache, mask, seed=0, layers=L, S=None):
    """One forward's worth of cache traffic: update every layer, plan at the first, write each. ``mask`` is HF's
    2-D padding mask ``[B, past + S]``; S defaults to the new columns ``mask.shape[1] - get_seq_length()``.
    Returns the new keys/values per layer ([B, Hkv, S, D])."""
    g = torch.Generator().manual_seed(seed)
    B = mask.shape[0]
    S = S or mask.shape[1] - cache.get_seq_length()
    mask = mask.to(cache.device)
    new = []
    for layer in range(layers):
        k = torch.randn(B, HKV, S, D, generator=g).to(cache.device)
        v = torch.randn(B, HKV, S, D, generator=g).to(cache.device)
        h, _ = cache.update(k, v, layer)
        plan = cache.plan(h, mask)
        cache.write(h, plan)
        new.append((k, v))
    return new


def _stored(cache, layer, b):
    """Sequence b's K and V as [n, Hkv, D], read back through its block table."""
    kc, vc = cache.pages(layer)
    n, bs = cache.seq_lens()[b], cache.block_size
    t = torch.tensor(cache.block_tables()[b], dtype=torch.long)
    pos = torch.arange(n)
    return kc.cpu()[t[pos // bs], pos % bs], vc.cpu()[t[pos // bs], pos % bs]


def _consistent(cache):
    """Reference counts equal the number of tables holding each block; free + used = capacity."""
    a = cache.allocator
    held = {}
    for t, n in zip(cache.block_tables(), cache.seq_lens()):
        assert len(t) == -(-n // cache.block_size)
        for blk in t:
            held[blk] = held.get(blk, 0) + 1
    for blk in range(a.num_blocks):
        assert a.refcount(blk) == held.get(blk, 0), (blk, a.refcount(blk), held.get(blk, 0))
    assert a.num_free + len(held) == a.num_blocks


def _layout(pages):
    """The memory order of ``[num_blocks, block_size, Hkv, D]`` pages, read from their strides."""
    nb, bs, h, d = pages.shape
    if pages.stride() == (bs * h * d, h * d, d, 1):
        return "NHD"
    assert pages.stride() == (bs * h * d, d, bs * d, 1), pages.stride()  # [nb, h, bs, d] memory, transposed
    return "HND"


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_kv_layout_default_per_device_and_explicit(kv_dtype):
    from llmkern.cache.pool import layout_for

    cache = PagedKVCache(CFG, block_size=4, num_blocks=3, kv_dtype=kv_dtype)  # CPU pages, made up front
    assert cache.kv_layout == "HND"  # CPU's default: one KV head's rows of a page contiguous
    for i in range(L):
        k, v, ks, vs = cache.layer_pages(i)
        assert k.shape == (3, 4, HKV, D) and _layout(k) == _layout(v) == "HND"
        if kv_dtype:  # the scales [nb, bs, Hkv] follow their pages
            assert ks.shape == (3, 4, HKV) and ks.stride() == (4 * HKV, 1, 4) and vs.stride() == ks.stride()
    nhd = PagedKVCache(CFG, block_size=4, num_blocks=3, kv_dtype=kv_dtype, kv_layout="nhd")
    assert nhd.kv_layout == "NHD"
    assert all(t.is_contiguous() for i in range(L) for t in nhd.layer_pages(i) if t is not None)
    assert nhd.memory().reserved_bytes == cache.memory().reserved_bytes  # same bytes either way
    assert layout_for(None, torch.device("cuda")) == "NHD" and layout_for(None, torch.device("cpu")) == "HND"
    assert layout_for("NHD", torch.device("cpu")) == "NHD"
    with pytest.raises(ValueError, match="kv_layout must be"):
        PagedKVCache(CFG, num_blocks=1, kv_layout="HDN")


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_layouts_hold_and_return_the_same_tokens(kv_dtype, device):
    # The same traffic (padding, beams sharing and copying a partial page, growth, crop) through both layouts:
    # the same tokens in the same slots, read back the same, and the same attention over them.
    from llmkern import paged_ops

    caches = {lay: PagedKVCache(CFG, block_size=4, num_blocks=2, growable=True, device=device, kv_dtype=kv_dtype,
                                kv_layout=lay) for lay in ("NHD", "HND")}
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, :3] = 0
    for cache in caches.values():
        _step(cache, mask)
        cache.reorder_cache(torch.tensor([1, 1, 0]))
        for i in range(3):
            _step(cache, torch.ones(3, 7 + i, dtype=torch.long), seed=i + 1)
        cache.crop(-1)
    nhd, hnd = caches["NHD"], caches["HND"]
    assert nhd.block_tables() == hnd.block_tables() and nhd.seq_lens() == hnd.seq_lens()
    assert hnd.allocator.num_blocks > 2 and all(_layout(t) == "HND" for i in range(L) for t in hnd.pages(i))
    q = torch.randn(3, 4, D).to(device)
    bt = torch.tensor(hnd.block_tables(), dtype=torch.int32, device=device)
    sl = torch.tensor(hnd.seq_lens(), dtype=torch.int32, device=device)
    for i in range(L):
        for a, b in zip(nhd.layer_pages(i), hnd.layer_pages(i)):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        assert all(torch.equal(a, b) for a, b in zip(nhd.dense(i), hnd.dense(i)))
        outs = [paged_ops.paged_decode_attention(q, *c.pages(i), bt, sl, 0.2, k_scales=c.layer_pages(i).k_scales,
                                                 v_scales=c.layer_pages(i).v_scales) for c in (nhd, hnd)]
        assert torch.equal(*outs)


def test_allocator_free_list_refcounts_grow():
    a = BlockAllocator(4)
    assert a.allocate(2) == [0, 1] and a.num_free == 2
    a.incref([1])
    a.decref([0, 1])
    assert a.num_free == 3 and a.refcount(1) == 1
    a.decref([1])
    assert a.num_free == 4
    with pytest.raises(CacheExhaustedError) as e:
        a.allocate(5)
    assert (e.value.capacity, e.value.free, e.value.demand) == (4, 4, 5)
    assert isinstance(e.value, RuntimeError)
    a.grow(6)
    assert a.allocate(6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="already free"):
        BlockAllocator(2).decref([0])


def test_memory_report_and_repr(device):
    cache = PagedKVCache(CFG, block_size=16, num_blocks=10, device=device)
    m = cache.memory()
    assert m.reserved_bytes == 2 * L * 10 * 16 * HKV * D * 4
    assert m.per_layer_bytes == m.reserved_bytes // L
    assert m.used_bytes == 0 and m.token_bytes == 0
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0  # 20 and 13 real tokens: 2 + 1 blocks
    _step(cache, mask)
    m = cache.memory()
    per_token = 2 * L * HKV * D * 4
    assert m.used_blocks == 3 and m.used_bytes == 3 * 16 * per_token
    assert m.num_tokens == 33 and m.token_bytes == 33 * per_token
    assert m.reserved_bytes == sum(t.numel() * t.element_size() for i in range(L) for t in cache.pages(i))
    s = str(m)
    assert "reserved" in s and "holding 33 tokens" in s and "3 used blocks" in s

    # max_memory_bytes: as many whole blocks as fit; bf16 halves the block size.
    per_block = 2 * L * 16 * HKV * D * 2
    c2 = PagedKVCache(CFG, block_size=16, max_memory_bytes=5 * per_block + per_block // 2, dtype=torch.bfloat16,
                      device=device)
    assert c2.allocator.num_blocks == 5 and c2.memory().reserved_bytes == 5 * per_block
    with pytest.raises(ValueError, match=r"max_memory_bytes must hold at least one block of every layer, \d+ bytes "
                                         r"here .*got 100"):
        PagedKVCache(CFG, max_memory_bytes=100, device=device)
    with pytest.raises(ValueError, match="max_memory_bytes must be a positive int"):
        PagedKVCache(CFG, max_memory_bytes=-5, device=device)
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache(CFG, block_size=12, device=device)
    with pytest.raises(ValueError, match="not both"):
        PagedKVCache(CFG, num_blocks=4, max_memory_bytes=1 << 20, device=device)


def test_padding_not_stored_and_tokens_land_in_order(device):
    cache = PagedKVCache(CFG, block_size=4, num_blocks=16, device=device)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 1, 1]])  # row 2: a hole mid-prompt
    with llmkern.track() as ran:
        new = _step(cache, mask)
    assert ran.backends("reshape_and_cache") == {"triton"}
    assert cache.get_seq_length() == 6 and cache.seq_lens() == [6, 3, 4]
    for layer, (k, v) in enumerate(new):
        for b in range(3):
            cols = mask[b].nonzero().flatten()
            sk, sv = _stored(cache, layer, b)
            assert torch.equal(sk, k[b, :, cols].transpose(0, 1))
            assert torch.equal(sv, v[b, :, cols].transpose(0, 1))
    # Decode: one column, all real; the plan is made once and shared by the layers.
    new2 = _step(cache, torch.ones(3, 7, dtype=torch.long), seed=1)
    plan = cache._plan
    assert plan.decode and plan.seq_lens.tolist() == [7, 4, 5] and plan.max_seq_len == 7
    for layer, (k, _v) in enumerate(new2):
        for b in range(3):
            assert torch.equal(_stored(cache, layer, b)[0][-1], k[b, :, 0])
    _consistent(cache)


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_reorder_shares_blocks_and_copies_partial_block_on_write(device, kv_layout):
    cache = PagedKVCache(CFG, block_size=4, num_blocks=16, device=device, kv_layout=kv_layout)
    _step(cache, torch.ones(3, 6, dtype=torch.long))  # 6 tokens: one full block + a partial one per row
    before = [[_stored(cache, layer, b) for b in range(3)] for layer in range(L)]
    tables = cache.block_tables()
    cache.reorder_cache(torch.tensor([1, 1, 0]))  # rows 0 and 1 continue beam 1; row 2 continues beam 0
    assert cache.block_tables() == [tables[1], tables[1], tables[0]]
    assert cache.allocator.refcount(tables[1][0]) == 2 and cache.allocator.refcount(tables[2][0]) == 0
    _consistent(cache)
    with llmkern.track() as ran:
        new = _step(cache, torch.ones(3, 7, dtype=torch.long), seed=3)
    assert "copy_blocks" in ran.ops()
    after = cache.block_tables()
    # The full first block stays shared; the shared partial block was copied for one row, written in place by
    # the other (its last holder).
    assert after[0][0] == after[1][0] == tables[1][0]
    assert after[0][1] != after[1][1] and tables[1][1] in (after[0][1], after[1][1])
    _consistent(cache)
    for layer, (k, _v) in enumerate(new):
        for b, src in enumerate([1, 1, 0]):
            sk, _ = _stored(cache, layer, b)
            assert torch.equal(sk[:6], before[layer][src][0])  # the prefix each beam inherited
            assert torch.equal(sk[6], k[b, :, 0])


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_exhaustion_checks_whole_step_first_and_changes_nothing(device, kv_layout):
    cache = PagedKVCache(CFG, block_size=4, num_blocks=5, device=device, kv_layout=kv_layout)
    _step(cache, torch.ones(2, 7, dtype=torch.long))  # 2 blocks per row, 1 free
    snap_pages = [t.clone() for i in range(L) for t in cache.pages(i)]
    snap = (cache.block_tables(), cache.seq_lens(), cache.get_seq_length(), cache.allocator.num_free)
    # Row 0 needs its free slot only; row 1's prefill of 6 more tokens needs 2 blocks: 2 > 1 free.
    mask = torch.ones(2, 7 + 6, dtype=torch.long)
    mask[0, 7:12] = 0
    with pytest.raises(CacheExhaustedError, match=r"needs 2 more blocks .* only 1 of its 5 blocks are free") as e:
        _step(cache, mask)
    assert (e.value.capacity, e.value.free, e.value.demand) == (5, 1, 2)
    assert (cache.block_tables(), cache.seq_lens(), cache.get_seq_length(), cache.allocator.num_free) == snap
    assert all(torch.equal(a, b) for a, b in zip(snap_pages, [t for i in range(L) for t in cache.pages(i)]))
    _consistent(cache)
    # A step that fits still works after the failure, and reset frees everything.
    _step(cache, torch.ones(2, 8, dtype=torch.long))
    assert cache.seq_lens() == [8, 8]
    cache.reset()
    assert cache.allocator.num_free == 5 and cache.get_seq_length() == 0 and cache.seq_lens() == []
    _step(cache, torch.ones(1, 20, dtype=torch.long))
    assert cache.seq_lens() == [20]
    _consistent(cache)


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_crop_and_growable_pool(device, kv_layout):
    cache = PagedKVCache(CFG, block_size=4, device=device, kv_layout=kv_layout)  # no capacity given: the pool grows
    assert cache.growable and cache.memory().reserved_bytes == 0
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    _step(cache, mask)
    for i in range(5):
        _step(cache, torch.ones(2, 10 + i, dtype=torch.long), seed=i + 1)
    assert cache.seq_lens() == [14, 11] and cache.get_seq_length() == 14
    assert cache.allocator.num_blocks >= 7
    _consistent(cache)
    k_before = _stored(cache, 0, 1)[0]
    cache.crop(-7)  # the 5 decode columns and 2 prompt columns
    assert cache.get_seq_length() == 7 and cache.seq_lens() == [7, 4]
    assert torch.equal(_stored(cache, 0, 1)[0], k_before[:4])
    _consistent(cache)
    with pytest.raises(ValueError):
        cache.crop(3)


def test_batch_change_needs_reset(device):
    cache = PagedKVCache(CFG, block_size=4, num_blocks=8, device=device)
    _step(cache, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="reset"):
        _step(cache, torch.ones(3, 4, dtype=torch.long))


def test_repr_is_one_short_line_that_does_not_change_per_step(device):
    # transformers puts the cache's repr into warnings; a repr with lengths and byte counts made each step's message
    # new (issue 13: 248 FutureWarnings for 8 tokens).
    cache = PagedKVCache(CFG, block_size=16, device=device)
    r = repr(cache)
    assert "\n" not in r and len(r) <= 120, r
    assert r.startswith("PagedKVCache(") and f"layers={L}" in r and "growable" in r
    mask = torch.ones(2, 20, dtype=torch.long)
    _step(cache, mask)
    _step(cache, torch.ones(2, 21, dtype=torch.long), seed=1)
    assert repr(cache) == r


@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_growth_is_layer_by_layer_and_reports_its_peak(device, kv_layout):
    import weakref

    cache = PagedKVCache(CFG, block_size=4, num_blocks=2, growable=True, device=device, kv_layout=kv_layout)
    assert cache.growable and cache.allocator.num_blocks == 2
    _step(cache, torch.ones(1, 8, dtype=torch.long))  # fills both blocks
    before = _stored(cache, 1, 0)
    old = [weakref.ref(t) for i in range(L) for t in cache.pages(i)]
    m0 = cache.memory()
    _step(cache, torch.ones(1, 9, dtype=torch.long), seed=1)  # one more token: the pool doubles to 4 blocks
    m = cache.memory()
    assert m.num_blocks == 4 and m.reserved_bytes == 2 * m0.reserved_bytes
    # Nothing keeps the old pages alive (the layers' views moved to the new ones as well).
    assert all(r() is None for r in old)
    assert all(layer.k_pages is cache.pages(i)[0] and layer.v_pages is cache.pages(i)[1]
               for i, layer in enumerate(cache.layers))
    # The peak is the new pool plus one old layer's K (or V) pages, never old pool + new pool.
    one_old_tensor = m0.reserved_bytes // (2 * L)
    assert m.peak_bytes == m.reserved_bytes + one_old_tensor < m.reserved_bytes + m0.reserved_bytes
    k, v = _stored(cache, 1, 0)
    assert torch.equal(k[:8], before[0]) and torch.equal(v[:8], before[1])
    assert all(_layout(t) == kv_layout for i in range(L) for t in cache.pages(i))  # grown in the same layout
    _consistent(cache)


def test_fixed_pool_from_memory_budget_is_allocated_up_front(device):
    per_block = 2 * L * 16 * HKV * D * 4
    cache = PagedKVCache(CFG, block_size=16, max_memory_bytes=3 * per_block, device=device)
    m = cache.memory()
    assert not cache.growable and m.reserved_bytes == m.peak_bytes == 3 * per_block
    with pytest.raises(ValueError, match="cannot be growable"):
        PagedKVCache(CFG, max_memory_bytes=3 * per_block, growable=True, device=device)


def test_fixed_pool_from_a_fraction_of_free_memory(monkeypatch):
    """memory_fraction sizes the pool from the memory free on each device (vLLM's gpu_memory_utilization): with a
    device map each device pays for the layers it holds, and the smallest pool wins."""
    from llmkern import cache as C

    per_block = 2 * L * 16 * HKV * D * 4
    real = C._free_bytes("cpu")
    assert 0 < real <= 1 << 50  # this machine's MemAvailable, read for real
    cache = PagedKVCache(CFG, block_size=16, memory_fraction=1e-6, device="cpu")
    assert abs(cache.allocator.num_blocks - int(1e-6 * real) // per_block) <= 1  # free memory moves a little
    free = {"cpu": 10 * per_block, "meta": 3 * per_block}
    monkeypatch.setattr(C, "_free_bytes", lambda d: free[torch.device(d).type])
    cache = PagedKVCache(CFG, block_size=16, memory_fraction=0.5, device="cpu")
    assert cache.allocator.num_blocks == 5 and not cache.growable
    assert cache.memory().reserved_bytes == 5 * per_block
    # layer 0 on cpu (10 blocks' worth free, one layer: 20 blocks fit in half), layer 1 on meta (3: 3 fit in half)
    cache = PagedKVCache(CFG, block_size=16, memory_fraction=0.5, device={0: "cpu", 1: "meta"})
    assert cache.allocator.num_blocks == 3
    with pytest.raises(ValueError, match="does not hold one block of every layer"):
        PagedKVCache(CFG, block_size=16, memory_fraction=0.01, device="cpu")
    with pytest.raises(ValueError, match="needs every layer's device"):
        PagedKVCache(CFG, memory_fraction=0.5, device={0: "cpu", 1: None})
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="memory_fraction must be a number in"):
            PagedKVCache(CFG, memory_fraction=bad)
    for extra in (dict(num_blocks=4), dict(max_memory_bytes=per_block), dict(growable=True)):
        with pytest.raises(ValueError, match="sizes a fixed pool; it cannot be combined"):
            PagedKVCache(CFG, memory_fraction=0.5, **extra)
