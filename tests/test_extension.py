"""The C++/CUDA extension (torch.ops.llmkern_C): CPU kernels against the references, bad input through the C++ path,
and the built CUDA code's resource usage (no spills) read from the library with cuobjdump."""

import glob
import os
import re
import subprocess

import pytest
import torch

import llmkern
from llmkern import _ext, paged_ops, reference
from llmkern.testing import assert_no_worse_than_eager, check_cpu_paged_attention

if not _ext.load():
    if os.environ.get("LLMKERN_NO_EXT") == "1":
        pytest.skip(f"LLMKERN_NO_EXT=1: {_ext.why_not()}", allow_module_level=True)
    raise RuntimeError(f"the llmkern extension must be built for these tests: {_ext.why_not()}")

C = torch.ops.llmkern_C
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_isa_is_detected_at_run_time():
    assert _ext.cpu_isa() in ("avx512", "avx2", "generic")


# ---------------------------------------------------------------------------------------------------------------------
# Paged decode attention on the C++ backend


def _paged_problem(lens, Hq, Hkv, D, bs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    max_blocks = max(-(-n // bs) for n in lens)
    num_blocks = B * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[: B * max_blocks]  # pages scattered through the pool
    tables = perm.view(B, max_blocks).to(torch.int32)
    k_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, Hkv, D, generator=g).to(dtype)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32)


# Attention paths of the C++ backend -> the instruction set that selects them (set_cpu_isa).
ATTENTION_PATHS = {"avx512": "avx512", "avx2": "avx2", "portable": "generic"}


def _served(path: str, D: int) -> str:
    """The kernel that serves head_dim D on ``path``: the AVX-512 kernel has no head_dim 80, the AVX2 one takes it."""
    return "avx2" if path == "avx512" and D == 80 else path


@pytest.fixture(params=list(ATTENTION_PATHS))
def cpu_attention(request):
    """Run the C++ attention tests on every CPU kernel: attention_vec.h for AVX-512 (+BF16; vec_avx512.cpp) and for
    AVX2 (vec_avx2.cpp), and the portable one (kernels_impl.h, baseline ISA). A path this CPU cannot run is skipped with
    the reason, never replaced by another."""
    path = request.param
    try:
        prev_isa = C.set_cpu_isa(ATTENTION_PATHS[path])
    except RuntimeError as e:
        pytest.skip(str(e))
    prev_fast = C.set_cpu_fast_attention(True)
    try:
        served = C.cpu_kernel("paged_decode_attention", torch.float32, 64)
        if served != path:
            pytest.skip(f"the {path} attention kernel cannot run on this CPU ({served} would serve): "
                        f"it needs AVX512-BF16" if path == "avx512" else f"{served} serves {path}")
        yield path
    finally:
        C.set_cpu_fast_attention(prev_fast)
        C.set_cpu_isa(prev_isa)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,Hq,Hkv,D,bs", [
    ([1, 17, 300], 14, 2, 64, 16),  # Qwen2.5-0.5B heads (group 7), ragged
    ([129], 32, 8, 128, 16),  # Llama-3-8B heads
    ([5, 64], 4, 4, 80, 1),  # MHA, head_dim 80, page size 1
    ([48, 33], 16, 2, 96, 32),  # group 8, head_dim 96, seq_len a multiple of the page size
    ([700], 9, 3, 64, 256),  # SmolLM2 heads, one big page
    ([2, 15, 16, 17, 65, 200], 8, 2, 256, 16),  # Gemma head_dim 256; lengths around the 16/64-token blocks
    ([4000, 1000], 14, 2, 64, 16),  # long context: eager's blocked sums are at their most accurate here
])
@pytest.mark.parametrize("num_splits", [0, 1, 7])
def test_cpp_decode_attention(dtype, lens, Hq, Hkv, D, bs, num_splits, cpu_attention, cpu_tolerance):
    q, kc, vc, tables, seq_lens = _paged_problem(lens, Hq, Hkv, D, bs, dtype)
    scale = D ** -0.5
    assert C.cpu_kernel("paged_decode_attention", dtype, D) == _served(cpu_attention, D)
    with llmkern.use_backend("cpp"), llmkern.track() as ran:
        out = paged_ops.paged_decode_attention(q, kc, vc, tables, seq_lens, scale,
                                                       num_splits=num_splits or None)
    assert ran.backends("paged_decode_attention") == {"cpp"}
    kernel = _served(cpu_attention, D)
    cpu_tolerance(kernel, dtype, check_cpu_paged_attention(out, q, kc, vc, tables, seq_lens, scale, kernel=kernel,
                                                           num_splits=num_splits or None, what=f"decode {dtype}"))


@pytest.mark.parametrize("window,softcap", [(7, None), (40, None), (None, 30.0), (20, 5.0)])
def test_cpp_decode_attention_window_softcap(window, softcap, cpu_attention, cpu_tolerance):
    q, kc, vc, tables, seq_lens = _paged_problem([1, 50, 301], 14, 2, 64, 16, torch.float32)
    with llmkern.use_backend("cpp"):
        out = paged_ops.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125, sliding_window=window,
                                                       softcap=softcap, num_splits=5)
    kernel = _served(cpu_attention, 64)
    cpu_tolerance(kernel, torch.float32, check_cpu_paged_attention(
        out, q, kc, vc, tables, seq_lens, 0.125, kernel=kernel, num_splits=5, sliding_window=window, softcap=softcap,
        what="decode window/softcap"))


def test_cpp_decode_empty_splits_are_not_nan(cpu_attention):
    # 16 splits over a batch whose first sequence holds one token: most of its splits are empty.
    q, kc, vc, tables, seq_lens = _paged_problem([1, 400], 8, 2, 64, 16, torch.float32)
    out = C.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125, 0, 0.0, 16)
    assert torch.isfinite(out).all()
    ref = reference.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _fill_unwritten(kc, vc, tables, lens, value):
    """Copies of the pages with every row no sequence has written (past its length, or in a page no table names) set
    to ``value``, as an unwritten page holds anything."""
    bs = kc.shape[1]
    written = torch.zeros(kc.shape[0], bs, dtype=torch.bool)
    for b, n in enumerate(lens):
        for t in range(n):
            written[tables[b, t // bs], t % bs] = True
    kc, vc = kc.clone(), vc.clone()
    kc[~written] = value
    vc[~written] = value
    return kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_cpp_unwritten_rows_never_reach_the_output(dtype, D, cpu_attention):
    """Rows past each sequence's end hold NaN or a finite value: the outputs are bit for bit the same, and finite.
    Odd lengths end a chunk inside a pair of tokens (bf16 P @ V on the dot product pairs V rows, the last odd one with
    zeros, csrc/cpu/attention_vec.h), where a row past the end must not be read."""
    lens = [1, 17, 33, 95]
    q, kc, vc, tables, seq_lens = _paged_problem(lens, 14, 2, D, 16, dtype)
    outs = []
    for value in (float("nan"), 3.0):
        k2, v2 = _fill_unwritten(kc, vc, tables, lens, value)
        with llmkern.use_backend("cpp"):
            outs.append(paged_ops.paged_decode_attention(q, k2, v2, tables, seq_lens, D ** -0.5))
    assert torch.isfinite(outs[0]).all(), f"decode {cpu_attention} {dtype}: an unwritten row reached the output"
    assert torch.equal(outs[0], outs[1])
    if cpu_attention == "portable":
        return  # no portable C++ prefill kernel
    ql = torch.tensor([1, 17, 5, 33], dtype=torch.int32)
    qp = torch.randn(len(lens), 14, 33, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    outs = []
    for value in (float("nan"), 3.0):
        k2, v2 = _fill_unwritten(kc, vc, tables, lens, value)
        with llmkern.use_backend("cpp"), llmkern.track() as ran:
            outs.append(paged_ops.paged_prefill_attention(qp, k2, v2, tables, seq_lens, ql, D ** -0.5))
        assert ran.backends("paged_prefill_attention") == {"cpp"}
    assert torch.isfinite(outs[0]).all(), f"prefill {cpu_attention} {dtype}: an unwritten row reached the output"
    assert torch.equal(outs[0], outs[1])


def test_cpp_decode_kernels_agree(cpu_attention):
    """The CPU kernels are twins: on one problem each agrees with the portable one to fp32 rounding (different
    summation order)."""
    if cpu_attention == "portable":
        pytest.skip("the portable kernel is the yardstick here")
    q, kc, vc, tables, seq_lens = _paged_problem([1, 63, 64, 65, 1000], 32, 8, 128, 16, torch.float32)
    fast = C.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.1, 0, 0.0, 0)
    prev = C.set_cpu_fast_attention(False)
    try:
        assert C.cpu_kernel("paged_decode_attention", torch.float32, 128) == "portable"
        portable = C.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.1, 0, 0.0, 0)
    finally:
        C.set_cpu_fast_attention(prev)
    torch.testing.assert_close(fast, portable, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Paged prefill attention on the C++ backend


def _prefill_problem(lens, q_lens, S, Hq, Hkv, D, bs, dtype, seed=0):
    q1, kc, vc, tables, seq_lens = _paged_problem(lens, Hq, Hkv, D, bs, dtype, seed)
    q = torch.randn(len(lens), Hq, S, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return q, kc, vc, tables, seq_lens, torch.tensor(q_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,q_lens,S,Hq,Hkv,D,bs", [
    ([40, 7, 100], [40, 7, 30], 40, 14, 2, 64, 16),  # Qwen2.5-0.5B heads; left padding; chunked prefill (q < seq)
    ([130], [130], 130, 32, 8, 128, 16),  # Llama-3-8B heads, a full prompt
    ([65, 3], [65, 0], 65, 9, 3, 64, 1),  # SmolLM2 heads, page size 1, a sequence with no query rows
    ([17, 90], [17, 33], 33, 8, 2, 256, 32),  # head_dim 256
])
def test_cpp_prefill_attention(dtype, lens, q_lens, S, Hq, Hkv, D, bs, cpu_attention, cpu_tolerance):
    if cpu_attention == "portable":
        pytest.skip("no portable C++ prefill kernel: the reference runs (test_cpp_prefill_unsupported_head_dim...)")
    assert C.cpu_kernel("paged_prefill_attention", dtype, D) == _served(cpu_attention, D)
    q, kc, vc, tables, seq_lens, ql = _prefill_problem(lens, q_lens, S, Hq, Hkv, D, bs, dtype)
    scale = D ** -0.5
    with llmkern.use_backend("cpp"), llmkern.track() as ran:
        out = paged_ops.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql, scale)
    assert ran.backends("paged_prefill_attention") == {"cpp"}
    kernel = _served(cpu_attention, D)
    cpu_tolerance(kernel, dtype, check_cpu_paged_attention(out, q, kc, vc, tables, seq_lens, scale, kernel=kernel,
                                                           q_lens=ql, what=f"prefill {dtype}"))
    pad = torch.arange(S)[None, :] < (S - ql)[:, None]  # left-padding rows are zeros
    assert (out.permute(0, 2, 1, 3)[pad] == 0).all()


@pytest.mark.parametrize("window,softcap", [(5, None), (None, 20.0), (24, 3.0)])
def test_cpp_prefill_window_softcap(window, softcap, cpu_attention, cpu_tolerance):
    if cpu_attention == "portable":
        pytest.skip("no portable C++ prefill kernel: the reference runs")
    q, kc, vc, tables, seq_lens, ql = _prefill_problem([70, 33], [70, 20], 70, 14, 2, 64, 16, torch.float32)
    with llmkern.use_backend("cpp"):
        out = paged_ops.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql, 0.125, sliding_window=window,
                                                softcap=softcap)
    kernel = _served(cpu_attention, 64)
    cpu_tolerance(kernel, torch.float32, check_cpu_paged_attention(
        out, q, kc, vc, tables, seq_lens, 0.125, kernel=kernel, q_lens=ql, sliding_window=window, softcap=softcap,
        what="prefill window/softcap"))


def test_cpp_prefill_unsupported_head_dim_uses_reference():
    """head_dim 48 has no vectorised kernel on any ISA: the op runs (and records) the reference, it does not fail."""
    assert C.cpu_kernel("paged_prefill_attention", torch.float32, 48) == "reference"
    q, kc, vc, tables, seq_lens, ql = _prefill_problem([20], [20], 20, 4, 4, 48, 16, torch.float32)
    with llmkern.use_backend("cpp"), llmkern.track() as ran:
        out = paged_ops.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql, 0.1)
    assert ran.backends("paged_prefill_attention") == {"reference"}
    torch.testing.assert_close(out, reference.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql, 0.1))
    with pytest.raises(RuntimeError, match=r"no C\+\+ kernel for head_dim 48"):
        C.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql, 0.1, 0, 0.0)


def test_cpp_prefill_bad_input_raises():
    if not C.cpu_fast_attention(torch.float32, 64):
        pytest.skip(f"no C++ prefill kernel on this CPU ({C.cpu_isa()})")
    q, kc, vc, tables, seq_lens, ql = _prefill_problem([20, 9], [20, 9], 20, 4, 2, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match=r"q_lens\[1\] = 10 must be in \[0, 9\]"):
        C.paged_prefill_attention(q, kc, vc, tables, seq_lens, torch.tensor([20, 10], dtype=torch.int32), 0.1, 0, 0.0)
    with pytest.raises(RuntimeError, match="q_lens must be a contiguous int32"):
        C.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql.long(), 0.1, 0, 0.0)
    with pytest.raises(RuntimeError, match="is not a block of the cache"):
        C.paged_prefill_attention(q, kc, vc, tables + 1000, seq_lens, ql, 0.1, 0, 0.0)
    with pytest.raises(RuntimeError, match="q must have shape"):
        C.paged_prefill_attention(q[0], kc, vc, tables, seq_lens, ql, 0.1, 0, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input through the C++ path: a Python exception with a message, never a crash


def test_cpp_bad_input_raises():
    x, w = torch.randn(2, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        C.rms_norm(x, torch.randn(7), 1e-6, 0.0)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        C.rms_norm(x.to(torch.int32), w, 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        C.rms_norm(x, w, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="x must not be empty"):
        C.rms_norm(torch.randn(0, 8), w, 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="x and residual must have one shape"):
        C.fused_add_rms_norm(x, torch.randn(3, 8), w, 1e-6)
    q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 3, 64)
    with pytest.raises(RuntimeError, match="k must match q"):
        C.apply_rope(q, torch.randn(1, 2, 4, 64), torch.randn(1, 3, 64), torch.randn(1, 3, 64))
    with pytest.raises(RuntimeError, match="rotary_dim"):
        C.apply_rope(q, k, torch.randn(1, 3, 65), torch.randn(1, 3, 65))
    with pytest.raises(RuntimeError, match="gate and up must have one shape"):
        C.silu_and_mul(torch.randn(2, 8), torch.randn(2, 9))


def test_cpp_cache_write_bad_slot_leaves_cache_untouched():
    kc, vc = torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64)
    key, value = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    with pytest.raises(RuntimeError, match=r"slot_mapping\[2\] = 64 is past the cache's 64 slots"):
        C.reshape_and_cache(key, value, kc, vc, torch.tensor([0, 5, 64]))
    assert not kc.any() and not vc.any()
    C.reshape_and_cache(key, value, kc, vc, torch.tensor([0, -1, 63]))
    assert torch.equal(kc[0, 0], key[0]) and torch.equal(vc[3, 15], value[2]) and not kc[0, 1:].any()


def test_cpp_decode_bad_input_raises():
    q, kc, vc, tables, lens = _paged_problem([5, 9], 4, 2, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        C.paged_decode_attention(q, kc, vc, tables.long(), lens, 0.125, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"seq_lens\[1\] = 99 must be in \[0, 16\]"):
        C.paged_decode_attention(q, kc, vc, tables, torch.tensor([5, 99], dtype=torch.int32), 0.125, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="must be a multiple of the cache's KV heads"):
        C.paged_decode_attention(torch.randn(2, 3, 64), kc, vc, tables, lens, 0.125, 0, 0.0, 0)
    bad = tables.clone()
    bad[0, 0] = 1000
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 0\] = 1000 is not a block"):
        C.paged_decode_attention(q, kc, vc, bad, lens, 0.125, 0, 0.0, 0)


# ---------------------------------------------------------------------------------------------------------------------
# The CUDA code in the built library: compiled for sm_80 and sm_90, no register spills


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def test_built_cuda_kernels_do_not_spill():
    if not _ext.has_cuda():
        pytest.skip("the extension was built without CUDA kernels (no CUDA toolkit at build time)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump is not available")
    lib = glob.glob(os.path.join(os.path.dirname(llmkern.__file__), "_C*.so"))
    assert lib, "built extension library not found next to llmkern/__init__.py"
    out = subprocess.run([tool, "--dump-resource-usage", lib[0]], capture_output=True, text=True, check=True).stdout
    archs = set(re.findall(r"arch = (sm_\d+)", out))
    assert {"sm_80", "sm_90"} <= archs, archs
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    kernels = {name for name, *_ in usage}
    for needle in ("rms_norm", "fused_add_rms_norm", "rope", "silu_and_mul", "reshape_and_cache", "copy_blocks"):
        assert any(needle in k for k in kernels), f"no {needle} kernel in the library"
    spills = [(name, stack, local) for name, _reg, stack, _smem, local in usage if int(local) or int(stack)]
    assert not spills, f"kernels using local memory (spills or stack frames): {spills}"
    assert all(int(reg) <= 255 for _n, reg, *_ in usage)


# ---------------------------------------------------------------------------------------------------------------------
# Decode-sized Linear (linear_vec.h; every ISA in tests/test_cpu_isa.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 17, 100), (2, 16, 32), (3, 33, 48), (5, 576, 576), (1, 1536, 576)])
def test_cpp_linear_matches_eager_rule(dtype, M, N, K):
    if not C.cpu_linear_supported(dtype):
        pytest.skip(f"no C++ linear kernel on this CPU ({C.cpu_isa()}: needs AVX2 + FMA + F16C)")
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    for bias in (None, b):
        out = C.linear(x, w, bias)
        oracle = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        # ulp term at sum |x_k w_k| (+ |b|) per output: what its rounding errors scale with (cancellation can make
        # |oracle| far smaller)
        mag = torch.nn.functional.linear(x.double().abs(), w.double().abs(),
                                         None if bias is None else bias.double().abs())
        assert_no_worse_than_eager(out, torch.nn.functional.linear(x, w, bias), oracle, what=f"linear {dtype}",
                                   scale=mag)


def test_cpp_linear_strided_x_and_leading_dims():
    if not C.cpu_linear_supported(torch.float32):
        pytest.skip(f"no C++ linear kernel on this CPU ({C.cpu_isa()}: needs AVX2 + FMA + F16C)")
    x = torch.randn(2, 3, 128)[..., ::2]  # [2, 3, 64], last stride 2
    w = torch.randn(40, 64)
    torch.testing.assert_close(C.linear(x, w, None), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


def test_cpp_linear_bad_input_raises():
    if not C.cpu_linear_supported(torch.float32):
        pytest.skip(f"no C++ linear kernel on this CPU ({C.cpu_isa()}: needs AVX2 + FMA + F16C)")
    x, w = torch.randn(2, 64), torch.randn(8, 64)
    with pytest.raises(RuntimeError, match=r"x must have shape \[\.\.\., 64\]"):
        C.linear(torch.randn(2, 63), w, None)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        C.linear(x, w.t(), None)
    with pytest.raises(RuntimeError, match="must match weight dtype"):
        C.linear(x.double(), w, None)
    with pytest.raises(RuntimeError, match=r"bias must be a contiguous \[8\] tensor"):
        C.linear(x, w, torch.randn(9))
    with pytest.raises(RuntimeError, match="no C\\+\\+ kernel for Half"):
        C.linear(x.half(), w.half(), None)
