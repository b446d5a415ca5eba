"""Paged KV cache writes (llmkern.paged_ops.reshape_and_cache, copy_blocks) on every backend, bit for bit.

Each case forces one backend and proves with ``llmkern.track()`` that the op ran there: the C++ kernels on every
instruction set this CPU runs (reshape_and_cache is csrc/cpu/kernels_impl.h, built once per ISA; copy_blocks is the
extension's op in csrc/torch_bindings.cpp), the Triton kernels (kernels/cache_ops.py; the interpreter on CPU tensors,
see tests/conftest.py), the torch reference (llmkern/reference.py), and the extension's CUDA kernels where a GPU is
present. The pages a call must leave are built by plain indexing and compared as bit patterns, with NaNs carrying
payloads, -0.0, infinities and subnormals among the values: the ops copy, they never convert.

Layouts: contiguous pages and pages that are a view of a bigger pool (a storage offset, spare heads, a padded head
stride, V's rows starting mid-row), whose untouched parts must keep their bits; pages of 1, 16 and 256 tokens (the
smallest, PagedKVCache's default and the largest accepted, where one page is larger than any kernel tile); the
(num_kv_heads, head_dim) of every layout in kernels/_layouts.py. The K/V layouts of other libraries (kv_split, HND
permuted to NHD, ...) are tests/test_strided_cache.py's.

Bad input — slots or block ids of the wrong dtype, a slot past the pool, ids outside it, mismatched shapes, src and
dst of different lengths — is refused with an exception that names the argument, on every backend, and the caches
are bit for bit unchanged afterwards. The public op validates before a backend is chosen, so each case also proves
that the backend it names was in force (a good call in the same context runs there); the cpp backend's own op is
also called directly, and the Triton kernels, which CUDA tensors reach unchecked, skip a slot or page outside the
pool instead of writing out of bounds.
"""

import contextlib
import os

import pytest
import torch

import llmkern
from llmkern import _ext, backends, paged_ops, reference
from llmkern.kernels import _layouts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPP_ISAS = ("avx512", "avx2", "generic")
# reshape_and_cache has one C++ kernel per instruction set; copy_blocks has one C++ implementation.
WRITE_BACKENDS = [*(f"cpp-{isa}" for isa in CPP_ISAS), "triton", "reference", pytest.param("cuda", marks=pytest.mark.gpu)]
COPY_BACKENDS = ["cpp", "triton", "reference", pytest.param("cuda", marks=pytest.mark.gpu)]
# (num_kv_heads, head_dim) of every layout the kernels serve: one H x D tile or several (40 heads of 128), head dims
# that are not powers of two (80, 96), the largest (256).
HEAD_SHAPES = sorted({(hkv, d) for _, _, hkv, d, _, _ in _layouts.head_layouts()})
BLOCK_SIZES = (1, 16, 256)
LAYOUTS = ("contiguous", "pool_view")


# ---------------------------------------------------------------------------------------------------------------------
# Forcing a backend


@contextlib.contextmanager
def _cpp_isa(isa: str):
    C = torch.ops.llmkern_C
    try:
        prev = C.set_cpu_isa(isa)
    except RuntimeError as e:  # an ISA this CPU cannot run: the extension says which
        pytest.skip(str(e).splitlines()[0])
    try:
        assert C.cpu_isa() == isa
        yield
    finally:
        C.set_cpu_isa(prev)


@contextlib.contextmanager
def forced(backend_id: str):
    """Force ``backend_id`` ("cpp-avx2", "triton", ...) for the block; yields (backend, device). Skips with the reason
    where this machine cannot run it; fails where it should (the extension not built, Triton not runnable)."""
    name, _, isa = backend_id.partition("-")
    device = DEVICE if name in ("triton", "cuda") else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("the cuda backend needs a CUDA device")
    if name == "cpp" and not _ext.load():
        if os.environ.get("LLMKERN_NO_EXT") == "1":
            pytest.skip(f"LLMKERN_NO_EXT=1: {_ext.why_not()}")
        pytest.fail(f"the llmkern extension must be built for these tests: {_ext.why_not()}")
    ok, why = backends.available(name, device)
    if not ok:
        pytest.skip(why) if name == "cuda" else pytest.fail(f"backend {name} cannot run: {why}")
    with _cpp_isa(isa) if isa else contextlib.nullcontext(), llmkern.use_backend(name):
        yield name, device


# ---------------------------------------------------------------------------------------------------------------------
# Data and bit-exact comparison

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# NaNs with payloads (quiet, both signs), -0.0, +-inf, the smallest subnormal, the largest finite value.
_SPECIAL_BITS = {
    torch.float32: [0x7FC00001, -0x3E3EDCBB, -0x80000000, 0x7F800000, -0x00800000, 0x00000001, 0x7F7FFFFF],
    torch.float16: [0x7E01, -0x01FD, -0x8000, 0x7C00, -0x0400, 0x0001, 0x7BFF],
    torch.bfloat16: [0x7FC1, -0x003D, -0x8000, 0x7F80, -0x0080, 0x0001, 0x7F7F],
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.dtype])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    same = bits(got) == bits(want)
    if not bool(same.all()):
        bad = (~same).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} of {got.numel()} elements differ in their bits, first at {list(i)}"
                             f": got {got[i].item()!r} (0x{int(bits(got)[i]) & 0xFFFFFFFF:x}), want {want[i].item()!r} "
                             f"(0x{int(bits(want)[i]) & 0xFFFFFFFF:x})")


def randn(*shape, dtype, gen, special: bool = False) -> torch.Tensor:
    """Random values of `dtype` (on CPU); `special`: the first elements of the flattened tensor are the special bit
    patterns above."""
    t = torch.randn(*shape, generator=gen).to(dtype)
    if special:
        sp = torch.tensor(_SPECIAL_BITS[dtype], dtype=_INT[dtype]).view(dtype)
        t.view(-1)[:sp.numel()] = sp
    return t


def make_caches(layout: str, nb: int, bs: int, H: int, D: int, dtype, device, gen):
    """(storage tensors, k_cache, v_cache): `contiguous` pages, or `pool_view` pages that are views of bigger pools —
    K skipping the pool's first block and first head, with a padded head stride; V starting 8 elements into its rows
    — whose other elements must never be written."""
    if layout == "contiguous":
        k, v = (randn(nb, bs, H, D, dtype=dtype, gen=gen).to(device) for _ in range(2))
        return (k, v), k, v
    assert layout == "pool_view"
    kpool = randn(nb + 2, bs, H + 2, D + 8, dtype=dtype, gen=gen).to(device)
    vpool = randn(nb + 1, bs, H, D + 16, dtype=dtype, gen=gen).to(device)
    k, v = views(layout, (kpool, vpool), nb, H, D)
    assert not k.is_contiguous() and not v.is_contiguous() and k.stride(-1) == v.stride(-1) == 1
    assert k.storage_offset() > 0 and v.storage_offset() > 0
    return (kpool, vpool), k, v


def views(layout: str, store, nb: int, H: int, D: int):
    """The (k_cache, v_cache) views `make_caches` makes of `store` (applied again to a copy for the expected bits)."""
    if layout == "contiguous":
        return store
    kpool, vpool = store
    return kpool[1:nb + 1, :, 1:H + 1, :D], vpool[1:, :, :, 8:8 + D]


def token_rows(T: int, H: int, D: int, dtype, device, gen):
    """key and value [T, H, D] as Hugging Face hands them: views of [T, H, D] / [H, T, D] buffers (the transposed
    layout of its [b, H, s, d] tensors), special bit patterns among the values."""
    key = randn(T, H, D, dtype=dtype, gen=gen, special=True).to(device)
    value = randn(H, T, D, dtype=dtype, gen=gen, special=True).to(device).transpose(0, 1)
    return key, value


def pick_slots(nb: int, bs: int, T: int, gen) -> torch.Tensor:
    """T slots: the pool's first and last, the last row of page 0 and the first of the last page, the rest drawn
    without repeats; two of them padding (-1 and another negative), one of those first."""
    n = nb * bs
    must = sorted({0, n - 1, bs - 1, (nb - 1) * bs})
    rest = [s for s in torch.randperm(n, generator=gen).tolist() if s not in must]
    slots = must + rest[:T - 2 - len(must)]
    perm = torch.randperm(len(slots), generator=gen).tolist()
    return torch.tensor([-1] + [slots[i] for i in perm[:-1]] + [-7] + [slots[perm[-1]]], dtype=torch.int64)


def expected_write(store, layout, nb, H, D, key, value, slots, bs):
    want = tuple(s.clone() for s in store)
    wk, wv = views(layout, want, nb, H, D)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            wk[s // bs, s % bs] = key[t]
            wv[s // bs, s % bs] = value[t]
    return want


def expected_copy(store, layout, nb, H, D, src, dst):
    want = tuple(s.clone() for s in store)
    wk, wv = views(layout, want, nb, H, D)
    for a, b in zip(src.tolist(), dst.tolist()):
        wk[b], wv[b] = wk[a].clone(), wv[a].clone()  # no dst is a src: the order does not matter
    return want


# ---------------------------------------------------------------------------------------------------------------------
# reshape_and_cache


def _check_write(backend_id, dtype, layout, nb, bs, H, D, T, seed):
    gen = torch.Generator().manual_seed(seed)
    with forced(backend_id) as (name, device):
        store, k, v = make_caches(layout, nb, bs, H, D, dtype, device, gen)
        key, value = token_rows(T, H, D, dtype, device, gen)
        slots = pick_slots(nb, bs, T, gen).to(device)
        want = expected_write(store, layout, nb, H, D, key, value, slots, bs)
        with llmkern.track() as ran:
            paged_ops.reshape_and_cache(key, value, k, v, slots)
        assert ran.backends("reshape_and_cache") == {name}
    for i, (s, w) in enumerate(zip(store, want)):
        assert_same_bits(s, w, f"storage {i} after reshape_and_cache on {backend_id} ({layout}, {nb} pages of {bs}, "
                               f"Hkv {H}, D {D}, {dtype})")


@pytest.mark.parametrize("backend_id", WRITE_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bs", BLOCK_SIZES, ids=lambda b: f"page{b}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reshape_and_cache(backend_id, dtype, bs, layout):
    nb = {1: 24, 16: 4, 256: 2}[bs]
    _check_write(backend_id, DTYPES[dtype], layout, nb, bs, 3, 64, T=12, seed=bs)


@pytest.mark.parametrize("backend_id", WRITE_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H,D", HEAD_SHAPES, ids=lambda v: str(v))
def test_reshape_and_cache_head_shapes(backend_id, dtype, H, D):
    _check_write(backend_id, DTYPES[dtype], "contiguous", 3, 16, H, D, T=9, seed=H * 1000 + D)


@pytest.mark.parametrize("backend_id", WRITE_BACKENDS)
def test_reshape_and_cache_all_padding_writes_nothing(backend_id):
    gen = torch.Generator().manual_seed(3)
    with forced(backend_id) as (name, device):
        store, k, v = make_caches("pool_view", 4, 16, 2, 64, torch.float32, device, gen)
        before = tuple(s.clone() for s in store)
        key, value = token_rows(3, 2, 64, torch.float32, device, gen)
        with llmkern.track() as ran:
            paged_ops.reshape_and_cache(key, value, k, v, torch.tensor([-1, -1, -5], device=device))
        assert ran.backends("reshape_and_cache") == {name}
    for s, b in zip(store, before):
        assert_same_bits(s, b, f"a mapping of padding only wrote on {backend_id}")


@pytest.mark.parametrize("backend_id", WRITE_BACKENDS)
def test_reshape_and_cache_strided_rows_and_slots(backend_id):
    """Any views: key and value with strided head_dim (every other element of a wider row) and a slot_mapping that is
    every other element of a longer one (the cpp backend refused that one: its op wants a contiguous mapping)."""
    gen = torch.Generator().manual_seed(4)
    with forced(backend_id) as (name, device):
        store, k, v = make_caches("contiguous", 4, 16, 2, 64, torch.bfloat16, device, gen)
        key = randn(5, 2, 128, dtype=torch.bfloat16, gen=gen).to(device)[..., ::2]
        value = randn(5, 4, 64, dtype=torch.bfloat16, gen=gen).to(device)[:, 1::2]
        slots = torch.tensor([63, 99, 0, 99, -1, 99, 17, 99, 32, 99], device=device)[::2]
        assert key.stride(-1) == 2 and not value.is_contiguous() and not slots.is_contiguous()
        want = expected_write(store, "contiguous", 4, 2, 64, key, value, slots, 16)
        with llmkern.track() as ran:
            paged_ops.reshape_and_cache(key, value, k, v, slots)
        assert ran.backends("reshape_and_cache") == {name}
    for s, w in zip(store, want):
        assert_same_bits(s, w, f"strided key/value/slot_mapping on {backend_id}")


# ---------------------------------------------------------------------------------------------------------------------
# copy_blocks


def _check_copy(backend_id, dtype, layout, nb, bs, H, D, src, dst, seed):
    gen = torch.Generator().manual_seed(seed)
    with forced(backend_id) as (name, device):
        store, k, v = make_caches(layout, nb, bs, H, D, dtype, device, gen)
        # Special bit patterns in the first page that is copied, so they travel.
        sp = torch.tensor(_SPECIAL_BITS[dtype], dtype=_INT[dtype]).view(dtype).to(device)
        k[src[0], 0, 0, :sp.numel()] = sp
        v[src[0], -1, -1, -sp.numel():] = sp
        src, dst = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        want = expected_copy(store, layout, nb, H, D, src, dst)
        with llmkern.track() as ran:
            paged_ops.copy_blocks(k, v, src, dst)
        assert ran.backends("copy_blocks") == {name}
    for i, (s, w) in enumerate(zip(store, want)):
        assert_same_bits(s, w, f"storage {i} after copy_blocks on {backend_id} ({layout}, pages of {bs}, Hkv {H}, "
                               f"D {D}, {dtype})")


@pytest.mark.parametrize("backend_id", COPY_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bs", BLOCK_SIZES, ids=lambda b: f"page{b}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_blocks(backend_id, dtype, bs, layout):
    # The pool's last page copied to its first; pages 2 and 4 are neither read nor written.
    _check_copy(backend_id, DTYPES[dtype], layout, 6, bs, 3, 64, src=[5, 1], dst=[0, 3], seed=bs)


@pytest.mark.parametrize("backend_id", COPY_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H,D", HEAD_SHAPES, ids=lambda v: str(v))
def test_copy_blocks_head_shapes(backend_id, dtype, H, D):
    # The first page copied to the last.
    _check_copy(backend_id, DTYPES[dtype], "contiguous", 3, 16, H, D, src=[0], dst=[2], seed=H * 1000 + D)


@pytest.mark.parametrize("backend_id", COPY_BACKENDS)
def test_copy_blocks_strided_ids_and_no_pairs(backend_id):
    """src and dst may be any 1-D views (every other element of longer tensors); zero pairs copy nothing."""
    gen = torch.Generator().manual_seed(5)
    with forced(backend_id) as (name, device):
        store, k, v = make_caches("pool_view", 5, 16, 2, 64, torch.float16, device, gen)
        src = torch.tensor([4, -9, 0, -9], device=device)[::2]
        dst = torch.tensor([1, -9, 3, -9], device=device)[::2]
        want = expected_copy(store, "pool_view", 5, 2, 64, src, dst)
        with llmkern.track() as ran:
            paged_ops.copy_blocks(k, v, src, dst)
            paged_ops.copy_blocks(k, v, src[:0], dst[:0])
        assert ran.backends("copy_blocks") == {name}
    for s, w in zip(store, want):
        assert_same_bits(s, w, f"strided src/dst on {backend_id}")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: refused on every backend, by name, before anything is written.

NB, BS, H, D = 4, 16, 2, 64


def _write_args(device):
    gen = torch.Generator().manual_seed(6)
    kc = randn(NB, BS, H, D, dtype=torch.float32, gen=gen).to(device)
    return dict(key=randn(3, H, D, dtype=torch.float32, gen=gen).to(device),
                value=randn(3, H, D, dtype=torch.float32, gen=gen).to(device), k_cache=kc,
                v_cache=randn(NB, BS, H, D, dtype=torch.float32, gen=gen).to(device),
                slot_mapping=torch.tensor([0, 17, 63], device=device))


def _f32(*shape, dev):
    return torch.zeros(*shape, device=dev)


# (case id, argument, make the bad value from the good arguments, exception, message). `values`: the refusal reads
# values (slots, ids), which only CPU tensors can do without a sync.
BAD_WRITE = [
    ("slots-int32", "slot_mapping", lambda a: a["slot_mapping"].int(), TypeError, "slot_mapping must have dtype int64"),
    ("slots-float", "slot_mapping", lambda a: a["slot_mapping"].float(), TypeError,
     "slot_mapping must have dtype int64"),
    ("slots-2d", "slot_mapping", lambda a: a["slot_mapping"][None], ValueError, "slot_mapping must be 1-D"),
    ("slots-short", "slot_mapping", lambda a: a["slot_mapping"][:2], ValueError, r"slot_mapping must have shape \(3,\)"),
    ("slot-past-pool", "slot_mapping", lambda a: torch.tensor([0, NB * BS, 1], device=a["key"].device), ValueError,
     "slot_mapping holds slot 64, past the cache's 64 slots"),
    ("slot-far-past-pool", "slot_mapping", lambda a: torch.tensor([0, -1, 1 << 40], device=a["key"].device),
     ValueError, "slot_mapping holds slot 1099511627776"),
    ("key-heads", "key", lambda a: a["key"][:, :1], ValueError, "expected equal shapes of key and value"),
    ("key-value-heads", "key", lambda a: _f32(3, 1, D, dev=a["key"].device), ValueError,
     "expected equal shapes of key and value"),
    ("key-value-both-wrong", "key", None, ValueError,
     r"key and value must be 3-D \(num_tokens, num_kv_heads, head_dim\) with k_cache's num_kv_heads \(2\)"),
    ("value-head-dim", "value", lambda a: a["value"][:, :, :32], ValueError, "expected equal shapes of key and value"),
    ("key-dtype", "key", lambda a: a["key"].half(), TypeError, "key and value must have k_cache's dtype float32"),
    ("key-int", "key", lambda a: a["key"].int(), TypeError, "key must have dtype"),
    ("key-not-tensor", "key", lambda a: "k", TypeError, "key must be a torch.Tensor"),
    ("cache-shapes", "v_cache", lambda a: _f32(NB, BS, 1, D, dev=a["key"].device), ValueError,
     "expected equal shapes of k_cache and v_cache"),
    ("cache-dtypes", "v_cache", lambda a: a["v_cache"].half(), ValueError, "expected equal dtypes of k_cache and v_cache"),
    ("cache-3d", "k_cache", lambda a: a["k_cache"][0], ValueError, "k_cache must be 4-D"),
    ("block-size-3", "k_cache", lambda a: _f32(NB, 3, H, D, dev=a["key"].device), ValueError,
     "k_cache's block_size .* must be a power of two in 1..256, got 3"),
    ("block-size-12", "k_cache", lambda a: _f32(NB, 12, H, D, dev=a["key"].device), ValueError,
     "k_cache's block_size .* got 12"),
    ("block-size-512", "k_cache", lambda a: _f32(1, 512, H, D, dev=a["key"].device), ValueError,
     "k_cache's block_size .* got 512"),
    ("head-dim-512", "k_cache", lambda a: _f32(NB, BS, H, 512, dev=a["key"].device), ValueError,
     "k_cache's head_dim .* must be at most 256, got 512"),
    ("slots-on-meta", "slot_mapping", lambda a: a["slot_mapping"].to("meta"), ValueError,
     "must be on one device, got .*slot_mapping on meta"),
]
_VALUE_CASES = {"slot-past-pool", "slot-far-past-pool"}


def _bad_write_args(case, arg, make, device):
    a = _write_args(device)
    if make is None:  # both key and value of another head count than the cache's
        a["key"] = a["value"] = torch.randn(3, 1, D, device=device)
    else:
        a[arg] = make(a)
    return a


def _refused(call, exc, match, caches, what):
    """`call` raises `exc` matching `match`, the op ran on no backend, and `caches` kept every bit."""
    before = [c.clone() for c in caches]
    with llmkern.track() as ran, pytest.raises(exc, match=match):
        call()
    assert not ran.backends("reshape_and_cache") and not ran.backends("copy_blocks"), f"{what}: ran before refusing"
    for c, b in zip(caches, before):
        assert_same_bits(c, b, f"{what}: the cache changed although the call was refused")


@pytest.mark.parametrize("backend_id", WRITE_BACKENDS)
@pytest.mark.parametrize("case,arg,make,exc,match", BAD_WRITE, ids=[c[0] for c in BAD_WRITE])
def test_reshape_and_cache_bad_input(backend_id, case, arg, make, exc, match):
    with forced(backend_id) as (name, device):
        if case in _VALUE_CASES and device != "cpu":
            pytest.skip("slots on the device are not read back (a sync per layer): the kernels skip a slot past the "
                        "pool instead (test_triton_kernels_skip_slots_and_pages_past_the_pool)")
        # A good call first: on cpp it fills the thread's direct table, so the bad call takes the eager fast path
        # (llmkern/paged_ops.py), whose refusals must name the argument as the full path's do.
        paged_ops.reshape_and_cache(**_write_args(device))
        a = _bad_write_args(case, arg, make, device)
        caches = [t for t in (a["k_cache"], a["v_cache"]) if isinstance(t, torch.Tensor)]
        _refused(lambda: paged_ops.reshape_and_cache(**a), exc, match, caches, f"{case} on {backend_id}")
        # The backend this case names was in force: the same call with good arguments runs there.
        good = _write_args(device)
        with llmkern.track() as ran:
            paged_ops.reshape_and_cache(**good)
        assert ran.backends("reshape_and_cache") == {name}


def _copy_args(device):
    gen = torch.Generator().manual_seed(7)
    return dict(k_cache=randn(NB, BS, H, D, dtype=torch.bfloat16, gen=gen).to(device),
                v_cache=randn(NB, BS, H, D, dtype=torch.bfloat16, gen=gen).to(device),
                src=torch.tensor([0, 1], device=device), dst=torch.tensor([2, 3], device=device))


def _ids(device, *v):
    return torch.tensor(v, device=device)


BAD_COPY = [
    ("src-int32", "src", lambda a: a["src"].int(), TypeError, "src must have dtype int64, got int32"),
    ("dst-float", "dst", lambda a: a["dst"].float(), TypeError, "dst must have dtype int64, got float32"),
    ("dst-2d", "dst", lambda a: a["dst"][None], ValueError, "dst must be 1-D"),
    ("lengths", "dst", lambda a: a["dst"][:1], ValueError, r"expected equal shapes of src and dst, got src shape \(2,\) "
     r"and dst shape \(1,\)"),
    ("src-past-pool", "src", lambda a: _ids(a["src"].device, 0, NB), ValueError,
     r"src\[1\] = 4 is not a block of the cache: expected ids in \[0, 4\)"),
    ("dst-past-pool", "dst", lambda a: _ids(a["src"].device, 2, NB), ValueError, r"dst\[1\] = 4 is not a block"),
    ("src-negative", "src", lambda a: _ids(a["src"].device, -1, 1), ValueError, r"src\[0\] = -1 is not a block"),
    ("dst-negative", "dst", lambda a: _ids(a["src"].device, 2, -4), ValueError, r"dst\[1\] = -4 is not a block"),
    ("dst-far", "dst", lambda a: _ids(a["src"].device, 2, 1 << 40), ValueError, r"dst\[1\] = 1099511627776"),
    ("dst-twice", "dst", lambda a: _ids(a["src"].device, 3, 3), ValueError, "dst names a block more than once"),
    ("dst-is-src", "dst", lambda a: _ids(a["src"].device, 2, 0), ValueError, r"dst and src share blocks \[0\]"),
    ("cache-shapes", "v_cache", lambda a: a["v_cache"][:, :8], ValueError, "expected equal shapes of k_cache and "
     "v_cache"),
    ("cache-int", "k_cache", lambda a: a["k_cache"].view(torch.int16), TypeError, "k_cache must have dtype"),
    ("src-not-tensor", "src", lambda a: [0, 1], TypeError, "src must be a torch.Tensor, got list"),
]
_COPY_VALUE_CASES = {"src-past-pool", "dst-past-pool", "src-negative", "dst-negative", "dst-far", "dst-twice",
                     "dst-is-src"}


@pytest.mark.parametrize("backend_id", COPY_BACKENDS)
@pytest.mark.parametrize("case,arg,make,exc,match", BAD_COPY, ids=[c[0] for c in BAD_COPY])
def test_copy_blocks_bad_input(backend_id, case, arg, make, exc, match):
    with forced(backend_id) as (name, device):
        if case in _COPY_VALUE_CASES and device != "cpu":
            pytest.skip("block ids on the device are not read back (a sync): the kernels skip a pair outside the pool "
                        "instead (test_triton_kernels_skip_slots_and_pages_past_the_pool)")
        a = _copy_args(device)
        caches = [a["k_cache"], a["v_cache"]]
        a[arg] = make(a)
        _refused(lambda: paged_ops.copy_blocks(**a), exc, match, caches, f"{case} on {backend_id}")
        good = _copy_args(device)
        with llmkern.track() as ran:
            paged_ops.copy_blocks(**good)
        assert ran.backends("copy_blocks") == {name}


# The cpp backend's own ops (torch.ops.llmkern_C, csrc/torch_bindings.cpp) check what they are given too: a direct
# caller gets an error naming the argument, and nothing is written.
CPP_BAD_WRITE = [
    ("slots-int32", lambda a: {**a, "slot_mapping": a["slot_mapping"].int()}, "slot_mapping must be a contiguous int64"),
    ("slots-short", lambda a: {**a, "slot_mapping": a["slot_mapping"][:2]}, r"slot_mapping .* of shape \[3\]"),
    ("slots-strided", lambda a: {**a, "slot_mapping": a["slot_mapping"].repeat_interleave(2)[::2]},
     "slot_mapping must be a contiguous"),
    ("slot-past-pool", lambda a: {**a, "slot_mapping": torch.tensor([0, 64, 1])},
     r"slot_mapping\[1\] = 64 is past the cache's 64 slots"),
    ("key-heads", lambda a: {**a, "key": a["key"][:, :1]}, r"key and value must have shape \[num_tokens, 2, 64\]"),
    ("key-dtype", lambda a: {**a, "key": a["key"].half()}, "key/value dtype must match the cache dtype"),
    ("cache-shapes", lambda a: {**a, "v_cache": torch.zeros(NB, BS, 1, D)}, "k_cache and v_cache must be 4-D"),
]
CPP_BAD_COPY = [
    ("src-int32", lambda a: {**a, "src": a["src"].int()}, "src and dst must be int64 tensors"),
    ("lengths", lambda a: {**a, "dst": a["dst"][:1]}, "src and dst must be int64 tensors of one shape"),
    ("src-past-pool", lambda a: {**a, "src": torch.tensor([0, 4])}, r"src\[1\] = 4 is not a block of the cache"),
    ("src-negative", lambda a: {**a, "src": torch.tensor([-1, 1])}, r"src\[0\] = -1 is not a block"),
    ("dst-past-pool", lambda a: {**a, "dst": torch.tensor([2, 4])}, r"dst\[1\] = 4 is not a block of the cache"),
    ("dst-negative", lambda a: {**a, "dst": torch.tensor([-2, 3])}, r"dst\[0\] = -2 is not a block"),
]


@pytest.mark.parametrize("case,make,match", CPP_BAD_WRITE, ids=[c[0] for c in CPP_BAD_WRITE])
def test_extension_reshape_and_cache_refuses(case, make, match):
    with forced("cpp"):
        a = make(_write_args("cpu"))
        _refused(lambda: torch.ops.llmkern_C.reshape_and_cache(**a), (RuntimeError, ValueError, TypeError), match,
                 [a["k_cache"], a["v_cache"]], f"llmkern_C.reshape_and_cache, {case}")


@pytest.mark.parametrize("case,make,match", CPP_BAD_COPY, ids=[c[0] for c in CPP_BAD_COPY])
def test_extension_copy_blocks_refuses(case, make, match):
    with forced("cpp"):
        a = make(_copy_args("cpu"))
        _refused(lambda: torch.ops.llmkern_C.copy_blocks(**a), (RuntimeError, ValueError, TypeError), match,
                 [a["k_cache"], a["v_cache"]], f"llmkern_C.copy_blocks, {case}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors in the interpreter")
@pytest.mark.parametrize("bs", [1, 16])
def test_triton_kernels_skip_slots_and_pages_past_the_pool(bs):
    """The Triton kernels themselves (what CUDA tensors reach, unchecked) write nothing for a slot or a page id outside
    the pool: the pool is a view of a bigger buffer, and the pages around it keep their bits; the good rows and pairs
    of the same call are written."""
    from llmkern.kernels import cache_ops as K

    gen = torch.Generator().manual_seed(8)
    nb = 3
    kbuf, vbuf = (randn(nb + 2, bs, H, D, dtype=torch.float32, gen=gen) for _ in range(2))
    kc, vc = kbuf[1:nb + 1], vbuf[1:nb + 1]
    key, value = randn(3, H, D, dtype=torch.float32, gen=gen), randn(3, H, D, dtype=torch.float32, gen=gen)
    want_k, want_v = kbuf.clone(), vbuf.clone()
    want_k[1], want_v[1] = want_k[1].clone(), want_v[1].clone()
    want_k[1, 0], want_v[1, 0] = key[1], value[1]
    K.reshape_and_cache_fwd(key, value, kc, vc, torch.tensor([nb * bs, 0, nb * bs + bs - 1]))
    assert_same_bits(kbuf, want_k, "reshape_and_cache kernel, K buffer")
    assert_same_bits(vbuf, want_v, "reshape_and_cache kernel, V buffer")
    # Pairs reading or writing outside the pool ([nb] past its end, [-1] before its start) are skipped; 2 -> 0 is not.
    want_k[1], want_v[1] = want_k[3].clone(), want_v[3].clone()
    K.copy_blocks_fwd(kc, vc, torch.tensor([0, nb, 2, -1, 1]), torch.tensor([nb, 1, 0, 2, -1]))
    assert_same_bits(kbuf, want_k, "copy_blocks kernel, K buffer")
    assert_same_bits(vbuf, want_v, "copy_blocks kernel, V buffer")


def test_opcheck():
    a = _write_args(DEVICE)
    a["slot_mapping"] = torch.tensor([5, -1, 40], device=DEVICE)
    torch.library.opcheck(torch.ops.llmkern.reshape_and_cache.default,
                          (a["key"], a["value"], a["k_cache"], a["v_cache"], a["slot_mapping"]))
    torch.library.opcheck(torch.ops.llmkern.copy_blocks.default,
                          (a["k_cache"], a["v_cache"], torch.tensor([0, 1], device=DEVICE),
                           torch.tensor([2, 3], device=DEVICE)))
