"""K/V caches that are strided views (issue #18 item 3): every backend takes pages with any strides along blocks,
slots and heads — K and V as the two halves of one ``[num_blocks, 2, block_size, Hkv, D]`` tensor (vLLM's and
FlashInfer's layout), HND storage ``[num_blocks, Hkv, block_size, D]`` permuted to NHD, a K and a V with different
strides, K and V heads interleaved in one pool — for reshape_and_cache, copy_blocks and paged decode / prefill
attention.

Each case runs the same call on the views and on contiguous copies of them, on the same backend, and wants the same
bits; the cache writes must land in the caller's storage (and nowhere else in it). The C++ kernels run on every
instruction set this CPU has (and with the vectorised attention kernels switched off). A cache whose head_dim is not
contiguous (last-dim stride other than 1) is refused, by name, on every backend."""

import contextlib
import os

import pytest
import torch

import llmkern
from llmkern import _ext, backends, paged_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ["contiguous", "kv_split", "hnd", "mixed", "interleaved"]
# Small on purpose: the Triton cases run in the interpreter on CPU.
NB, BS, HKV, G, D = 7, 4, 2, 2, 64


# ---------------------------------------------------------------------------------------------------------------------
# Caches: storage tensors and the [NB, BS, Hkv, D] views a layout makes of them.


def make_storage(layout: str, dtype, device, gen) -> tuple:
    """The tensors a cache of `layout` lives in, filled with random values."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    if layout == "contiguous":
        return rnd(NB, BS, HKV, D), rnd(NB, BS, HKV, D)
    if layout == "kv_split":  # one KV tensor per layer, K and V interleaved per block (vLLM, FlashInfer)
        return (rnd(NB, 2, BS, HKV, D),)
    if layout == "hnd":  # head-major pages, seen as NHD
        return rnd(NB, HKV, BS, D), rnd(NB, HKV, BS, D)
    if layout == "mixed":  # K and V with different strides: K from a KV tensor (its V half unused), V head-major
        return rnd(NB, 2, BS, HKV, D), rnd(NB, HKV, BS, D)
    if layout == "interleaved":  # K and V heads alternating in one pool: a page's rows do not fill a dense span
        return (rnd(NB, BS, 2 * HKV, D),)
    raise ValueError(layout)


def cache_views(layout: str, store: tuple) -> tuple:
    """(k_cache, v_cache) ``[NB, BS, Hkv, D]`` views of `store`."""
    if layout == "contiguous":
        return store
    if layout == "kv_split":
        return store[0][:, 0], store[0][:, 1]
    if layout == "hnd":
        return store[0].permute(0, 2, 1, 3), store[1].permute(0, 2, 1, 3)
    if layout == "mixed":
        return store[0][:, 0], store[1].permute(0, 2, 1, 3)
    if layout == "interleaved":
        return store[0][:, :, 0::2], store[0][:, :, 1::2]
    raise ValueError(layout)


def caches(layout: str, dtype, device, gen):
    """Storage, its views, and contiguous copies of the views (separate memory)."""
    store = make_storage(layout, dtype, device, gen)
    k, v = cache_views(layout, store)
    assert k.shape == v.shape == (NB, BS, HKV, D) and k.stride(-1) == v.stride(-1) == 1
    if layout != "contiguous":
        assert not k.is_contiguous() and not v.is_contiguous()
    if layout == "mixed":
        assert k.stride() != v.stride()
    kc, vc = (t.clone(memory_format=torch.contiguous_format) for t in (k, v))
    assert kc.is_contiguous() and kc.data_ptr() != k.data_ptr()
    return store, (k, v), (kc, vc)


# ---------------------------------------------------------------------------------------------------------------------
# Backends: cpp per instruction set (and with the vectorised attention kernels off), triton, reference, cuda.

CPP_PATHS = ["avx512", "avx2", "generic", "portable"]  # portable: best ISA, set_cpu_fast_attention(False)


@contextlib.contextmanager
def cpp_on(path: str):
    """The C++ CPU kernels on `path` for the block (tests/test_cpu_isa.py's running_on); skips with the extension's
    reason where this CPU cannot run it."""
    C = torch.ops.llmkern_C
    prev_fast = None
    try:
        prev = C.set_cpu_isa(path) if path != "portable" else C.cpu_isa()
    except RuntimeError as e:
        pytest.skip(str(e).splitlines()[0])
    try:
        if path == "avx512" and C.cpu_kernel("linear", torch.float32) != "avx512":
            pytest.skip("this CPU has AVX-512 but not AVX512-BF16: the AVX-512 attention kernels cannot run")
        if path == "portable":
            prev_fast = C.set_cpu_fast_attention(False)
        yield
    finally:
        if prev_fast is not None:
            C.set_cpu_fast_attention(prev_fast)
        C.set_cpu_isa(prev)


BACKEND_PARAMS = [*(f"cpp-{p}" for p in CPP_PATHS), "triton", "reference",
                  pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """(backend name, device, cpp path or None), with the backend forced for the test."""
    name, _, path = request.param.partition("-")
    device = "cpu" if name in ("cpp", "reference") else DEVICE
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("the cuda backend needs a CUDA device")
    if name == "triton" and device == "cpu" and not backends.triton_interpret():
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set: Triton cannot run here")
    if name == "cpp" and not _ext.load():
        if os.environ.get("LLMKERN_NO_EXT") == "1":
            pytest.skip(f"LLMKERN_NO_EXT=1: {_ext.why_not()}")
        pytest.fail(f"the llmkern extension must be built for these tests: {_ext.why_not()}")
    ok, why = backends.available(name, device)
    if not ok:
        pytest.skip(why) if name == "cuda" else pytest.fail(f"backend {name} cannot run: {why}")
    with cpp_on(path) if path else contextlib.nullcontext(), llmkern.use_backend(name):
        yield name, device, path or None


@pytest.fixture(params=list(DTYPES))
def dtype(request):
    return DTYPES[request.param]


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


def _same(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        raise AssertionError(f"{what}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}")


# ---------------------------------------------------------------------------------------------------------------------
# Cache writes


def test_reshape_and_cache(backend, dtype, layout):
    name, device, _ = backend
    gen = torch.Generator().manual_seed(1)
    store, (k, v), (kc, vc) = caches(layout, dtype, device, gen)
    T = 6
    key = torch.randn(T, HKV, D, generator=gen).to(dtype).to(device)
    value = torch.randn(HKV, T, D, generator=gen).to(dtype).to(device).transpose(0, 1)  # HF-style strided rows
    slots = torch.tensor([5, -1, 0, 27, 13, 14], device=device)  # a padding token; first and last slot of the pool
    # What the storage must hold afterwards: the same layout over a copy, written by plain indexing.
    want = tuple(s.clone() for s in store)
    wk, wv = cache_views(layout, want)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            wk[s // BS, s % BS] = key[t]
            wv[s // BS, s % BS] = value[t]
    with llmkern.track() as ran:
        paged_ops.reshape_and_cache(key, value, k, v, slots)
        paged_ops.reshape_and_cache(key, value, kc, vc, slots)
    assert ran.backends("reshape_and_cache") == {name}
    _same(k, kc, f"k_cache ({layout}) vs the contiguous copy")
    _same(v, vc, f"v_cache ({layout}) vs the contiguous copy")
    for i, (s, w) in enumerate(zip(store, want)):
        _same(s, w, f"storage {i} of the {layout} cache (writes land in the caller's pages, and only there)")


def test_copy_blocks(backend, dtype, layout):
    name, device, _ = backend
    gen = torch.Generator().manual_seed(2)
    store, (k, v), (kc, vc) = caches(layout, dtype, device, gen)
    src, dst = torch.tensor([1, 6, 0], device=device), torch.tensor([4, 2, 5], device=device)
    with pytest.raises(AssertionError):  # the pages differ before the copy, so the test can see it happen
        _same(k[dst], k[src], "")
    want = tuple(s.clone() for s in store)
    wk, wv = cache_views(layout, want)
    for a, b in zip(src.tolist(), dst.tolist()):
        wk[b], wv[b] = k[a], v[a]  # from the caller's pages before the call (no dst is a src)
    with llmkern.track() as ran:
        paged_ops.copy_blocks(k, v, src, dst)
        paged_ops.copy_blocks(kc, vc, src, dst)
    assert ran.backends("copy_blocks") == {name}
    _same(k, kc, f"k_cache ({layout}) vs the contiguous copy")
    _same(v, vc, f"v_cache ({layout}) vs the contiguous copy")
    for i, (s, w) in enumerate(zip(store, want)):
        _same(s, w, f"storage {i} of the {layout} cache (writes land in the caller's pages, and only there)")


# ---------------------------------------------------------------------------------------------------------------------
# Attention: the views and their contiguous copies give the same bits.


def _tables(device):
    # Sequences of 11, 3 and 8 tokens on shuffled pages; unused table entries point at page 0.
    tables = torch.tensor([[5, 2, 6], [3, 0, 0], [1, 4, 0]], dtype=torch.int32, device=device)
    return tables, torch.tensor([11, 3, 8], dtype=torch.int32, device=device)


def _attention_ran(ran, op: str, name: str, path, dtype):
    if name == "cpp":  # the kernel of the path under test served both calls
        kernel = torch.ops.llmkern_C.cpu_kernel(op, dtype, D)
        want = {"avx512": "avx512", "avx2": "avx2", "generic": "portable", "portable": "portable"}[path]
        assert kernel == want, f"{op} under cpp-{path} ran the {kernel} kernel"
    assert ran.backends(op) == {name}


def _skip_no_attention(name, path, op):
    if name == "cuda":
        pytest.skip("the cuda backend has no attention kernels (CUDA attention is Triton's)")
    if name == "cpp" and path in ("generic", "portable") and op == "paged_prefill_attention":
        pytest.skip("no C++ prefill kernel without the vectorised attention kernels: the reference runs "
                    "(covered by the reference backend's cases)")


@pytest.mark.parametrize("window", [None, 5])
def test_paged_decode_attention(backend, dtype, layout, window):
    name, device, path = backend
    _skip_no_attention(name, path, "paged_decode_attention")
    gen = torch.Generator().manual_seed(3)
    _, (k, v), (kc, vc) = caches(layout, dtype, device, gen)
    tables, lens = _tables(device)
    q = torch.randn(3, HKV * G, D, generator=gen).to(dtype).to(device)
    with llmkern.track() as ran:
        got = paged_ops.paged_decode_attention(q, k, v, tables, lens, D ** -0.5, sliding_window=window, num_splits=2)
        want = paged_ops.paged_decode_attention(q, kc, vc, tables, lens, D ** -0.5, sliding_window=window,
                                                num_splits=2)
    _attention_ran(ran, "paged_decode_attention", name, path, dtype)
    assert got.isfinite().all()
    _same(got, want, f"decode over the {layout} cache vs its contiguous copy")


def test_paged_prefill_attention(backend, dtype, layout):
    name, device, path = backend
    _skip_no_attention(name, path, "paged_prefill_attention")
    gen = torch.Generator().manual_seed(4)
    _, (k, v), (kc, vc) = caches(layout, dtype, device, gen)
    tables, lens = _tables(device)
    S = 4
    q = torch.randn(3, S, HKV * G, D, generator=gen).to(dtype).to(device).transpose(1, 2)  # HF's view
    q_lens = torch.tensor([4, 2, 3], dtype=torch.int32, device=device)
    with llmkern.track() as ran:
        got = paged_ops.paged_prefill_attention(q, k, v, tables, lens, q_lens, D ** -0.5, softcap=30.0)
        want = paged_ops.paged_prefill_attention(q, kc, vc, tables, lens, q_lens, D ** -0.5, softcap=30.0)
    _attention_ran(ran, "paged_prefill_attention", name, path, dtype)
    assert got.isfinite().all()
    _same(got, want, f"prefill over the {layout} cache vs its contiguous copy")


# ---------------------------------------------------------------------------------------------------------------------
# The C++ kernels read a block of a chunk's rows in place (no packing) where the rows follow one another in the
# pages (head-major pages; one KV head) and are read as stored (fp32; bf16 K): those blocks, the packed ones around
# them (partial last blocks, blocks across pages, window starts off the block grid) and the same values in pages
# whose rows never follow give the same bits.


@pytest.mark.parametrize("block_size", [8, 16, 64])
@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("path", ["avx512", "avx2"])
@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
def test_blocks_read_in_place_equal_packed_blocks(dt, path, hkv, block_size):
    if not _ext.load():
        pytest.fail(f"the llmkern extension must be built for these tests: {_ext.why_not()}")
    dtype, gen, bs = DTYPES[dt], torch.Generator().manual_seed(5), block_size
    lens = [5 * bs + 7, bs, 3 * bs + 1, 70]
    pages = [-(-n // bs) for n in lens]
    nb = sum(pages) + 1
    # Head-major pages: a page's rows of one KV head follow one another (with one KV head, across pages too).
    hnd = torch.randn(nb, hkv, bs, D, generator=gen).to(dtype)
    k_in, v_in = hnd.transpose(1, 2), hnd.flip(0).transpose(1, 2)
    # The same values where no two rows follow: every row padded to two head_dims.
    k_pk = torch.zeros(nb, bs, hkv, 2, D, dtype=dtype)[..., 0, :]
    v_pk = torch.zeros(nb, bs, hkv, 2, D, dtype=dtype)[..., 0, :]
    k_pk.copy_(k_in)
    v_pk.copy_(v_in)
    order = torch.randperm(nb - 1, generator=gen).tolist()
    rows, at = [], 0
    for b, n in enumerate(pages):  # sequence 1 on consecutive pages (1, 2, ...), the others shuffled
        rows.append(list(range(1, 1 + n)) if b == 1 else [1 + order[(at + i) % (nb - 1)] for i in range(n)])
        at += n
    width = max(pages)
    tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    B, Hq = len(lens), hkv * 3
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    S = 5
    qp = torch.randn(B, Hq, S, D, generator=gen).to(dtype)
    q_lens = torch.tensor([5, 3, 5, 1], dtype=torch.int32)
    with cpp_on(path), llmkern.use_backend("cpp"), llmkern.track() as ran:
        for window in (None, 13):
            for splits in (1, 3):
                got, want = (paged_ops.paged_decode_attention(q, k, v, tables, seq_lens, D ** -0.5, num_splits=splits,
                                                              sliding_window=window)
                             for k, v in ((k_in, v_in), (k_pk, v_pk)))
                _same(got, want, f"decode, window {window}, {splits} splits: in place vs packed")
            got, want = (paged_ops.paged_prefill_attention(qp, k, v, tables, seq_lens, q_lens, D ** -0.5,
                                                           sliding_window=window)
                         for k, v in ((k_in, v_in), (k_pk, v_pk)))
            _same(got, want, f"prefill, window {window}: in place vs packed")
        _attention_ran(ran, "paged_decode_attention", "cpp", path, dtype)  # the path's kernels, asked while set
        _attention_ran(ran, "paged_prefill_attention", "cpp", path, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# A cache whose head_dim is not contiguous is refused, by name, whatever the backend.


def _bad_cache(device):
    good = torch.zeros(NB, BS, HKV, D, device=device)
    bad = torch.zeros(NB, BS, HKV, 2 * D, device=device)[..., ::2]  # last-dim stride 2
    return good, bad


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
def test_cache_with_strided_head_dim_is_refused(backend, which):
    name, device, path = backend
    good, bad = _bad_cache(device)
    kv = {"k_cache": bad, "v_cache": good} if which == "k_cache" else {"k_cache": good, "v_cache": bad}
    before = bad.clone()
    msg = rf"{which} must have last-dim stride 1"
    key = torch.randn(2, HKV, D, device=device)
    with pytest.raises(ValueError, match=msg):
        paged_ops.reshape_and_cache(key, key, kv["k_cache"], kv["v_cache"], torch.tensor([0, 1], device=device))
    with pytest.raises(ValueError, match=msg):
        paged_ops.copy_blocks(kv["k_cache"], kv["v_cache"], torch.tensor([0], device=device),
                              torch.tensor([1], device=device))
    tables, lens = _tables(device)
    with pytest.raises(ValueError, match=msg):
        paged_ops.paged_decode_attention(torch.randn(3, HKV * G, D, device=device), kv["k_cache"], kv["v_cache"],
                                         tables, lens, 0.125)
    with pytest.raises(ValueError, match=msg):
        paged_ops.paged_prefill_attention(torch.randn(3, HKV * G, 2, D, device=device), kv["k_cache"],
                                          kv["v_cache"], tables, lens, torch.full((3,), 2, dtype=torch.int32,
                                                                                  device=device), 0.125)
    assert torch.equal(bad, before)


@pytest.mark.parametrize("which", ["k_cache", "v_cache"])
def test_extension_refuses_strided_head_dim(which):
    """The extension's own ops (what the cpp and cuda backends call) check it too: a TORCH_CHECK naming the cache."""
    if not _ext.load():
        pytest.skip(f"no extension: {_ext.why_not()}")
    C = torch.ops.llmkern_C
    good, bad = _bad_cache("cpu")
    kc, vc = (bad, good) if which == "k_cache" else (good, bad)
    strides = ", ".join(map(str, bad.stride()))
    msg = rf"{which} must have last-dim stride 1 \(head_dim contiguous\), got strides .{strides}."
    key = torch.randn(2, HKV, D)
    tables, lens = _tables("cpu")
    with pytest.raises(RuntimeError, match=msg):
        C.reshape_and_cache(key, key, kc, vc, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match=msg):
        C.copy_blocks(kc, vc, torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match=msg):
        C.paged_decode_attention(torch.randn(3, HKV * G, D), kc, vc, tables, lens, 0.125, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match=msg):
        C.paged_prefill_attention(torch.randn(3, HKV * G, 2, D), kc, vc, tables, lens,
                                  torch.full((3,), 2, dtype=torch.int32), 0.125, 0, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# The CUDA copy_blocks' choice between raw words and strided elements (csrc/cuda/launch.h, host-only): checked on the
# host, so it holds where no GPU runs the kernels.

_HOST_PROGRAM = r"""
#include <cstdio>
#include "cuda/launch.h"
using namespace llmkern::cuda;
static void dense(const char* what, CacheStrides cs, long long BS, long long H, long long D) {
  std::printf("dense %s %d\n", what, page_is_dense(cs, BS, H, D) ? 1 : 0);
}
int main() {
  const long long BS = 16, H = 4, D = 64;
  dense("nhd", {BS * H * D, H * D, D}, BS, H, D);
  dense("kv_split", {2 * BS * H * D, H * D, D}, BS, H, D);
  dense("hnd", {H * BS * D, D, BS * D}, BS, H, D);
  dense("hnd_kv_split", {2 * H * BS * D, D, BS * D}, BS, H, D);
  dense("heads_interleaved", {BS * 2 * H * D, 2 * H * D, 2 * D}, BS, H, D);
  dense("padded_head", {BS * H * (D + 8), H * (D + 8), D + 8}, BS, H, D);
  dense("one_head_any_stride", {BS * D, D, 12345}, BS, 1, D);
  dense("page_of_one", {H * D, 999, D}, 1, H, D);
  alignas(16) static char pool[4096];
  std::printf("word kv_split %d\n", copy_blocks_word_bytes(pool, pool + 1024, BS * H * D * 2, 2 * BS * H * D * 2,
                                                           2 * BS * H * D * 2));
  std::printf("word odd_stride %d\n", copy_blocks_word_bytes(pool, pool + 1024, BS * H * D * 2, BS * H * D * 2 + 2,
                                                             BS * H * D * 2));
  return 0;
}
"""


def test_cuda_copy_blocks_picks_words_only_for_dense_pages(tmp_path):
    import shutil
    import subprocess

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    inc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    if cxx is None or not os.path.exists(os.path.join(inc, "cuda_runtime.h")):
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "dense.cpp").write_text(_HOST_PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O0", f"-I{os.path.join(root, 'csrc')}", f"-I{inc}",
                    str(tmp_path / "dense.cpp"), "-o", str(tmp_path / "dense")], check=True, capture_output=True,
                   text=True)
    out = subprocess.run([str(tmp_path / "dense")], check=True, capture_output=True, text=True).stdout
    got = {ln.split()[0] + " " + ln.split()[1]: int(ln.split()[2]) for ln in out.splitlines()}
    assert got == {
        "dense nhd": 1, "dense kv_split": 1, "dense hnd": 1, "dense hnd_kv_split": 1, "dense heads_interleaved": 0,
        "dense padded_head": 0, "dense one_head_any_stride": 1, "dense page_of_one": 1,
        "word kv_split": 16, "word odd_stride": 2,
    }, got
