"""Every CPU kernel path of the extension, forced by instruction set: paged decode, paged prefill and the decode-sized
Linear on avx512, avx2 and the baseline ISA (decode's portable kernel; prefill and Linear then have no C++ kernel and
llmkern runs the torch reference), and the row ops on each, against fp64 oracles written from the math
(llmkern.testing) under the tolerance rule, on awkward shapes — GQA groups 1/4/7/8, head dims
64/80/96/128/256 (and 48, which only the portable kernel takes), pages of 1 and 16 tokens, ragged batches whose short
sequences leave splits empty, sliding window, softcap, strided q, fp32/bf16/fp16 — and which kernel served each.
ISA forcing: ``torch.ops.llmkern_C.set_cpu_isa`` here, ``LLMKERN_CPU_ISA`` in a fresh interpreter.

An ISA this CPU cannot run is skipped with the extension's reason, never replaced by another."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

import llmkern
from llmkern import _ext, paged_ops
from llmkern.testing import (assert_no_worse_than_eager, check_cpu_paged_attention, oracle_rms_norm, oracle_rope,
                             oracle_silu_and_mul, rope_scale, silu_and_mul_scale)

if not _ext.load():
    if os.environ.get("LLMKERN_NO_EXT") == "1":
        pytest.skip(f"LLMKERN_NO_EXT=1: {_ext.why_not()}", allow_module_level=True)
    raise RuntimeError(f"the llmkern extension must be built for these tests: {_ext.why_not()}")

C = torch.ops.llmkern_C
ISAS = ["avx512", "avx2", "generic"]
RANK = {name: i for i, name in enumerate(reversed(ISAS))}
# Head dims each vectorised attention kernel has (kernels.h); any other runs the portable decode kernel.
VEC_DIMS = {"avx512": (64, 96, 128, 256), "avx2": (64, 80, 96, 128, 256)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def running_on(isa: str):
    """The CPU kernels on `isa` for the block; skips the test (with the extension's reason) where it cannot run."""
    try:
        prev = C.set_cpu_isa(isa)
    except RuntimeError as e:
        pytest.skip(str(e).splitlines()[0])
    try:
        if isa == "avx512" and C.cpu_kernel("linear", torch.float32) != "avx512":
            pytest.skip("this CPU has AVX-512 but not AVX512-BF16: the AVX-512 attention and Linear kernels cannot run")
        yield
    finally:
        C.set_cpu_isa(prev)


@pytest.fixture(params=ISAS)
def isa(request):
    with running_on(request.param):
        yield request.param


def kernel_for(op: str, isa: str, D: int = 0) -> str:
    """The kernel kernels.h's dispatch must pick for `op` under `isa` (fp32/bf16/fp16 alike for attention)."""
    if op == "linear":
        return isa if isa != "generic" else "reference"
    for path in ("avx512", "avx2"):
        if RANK[isa] >= RANK[path] and D in VEC_DIMS[path]:
            return path
    return "portable" if op == "paged_decode_attention" else "reference"


def paged_kv(lens, Hkv, D, bs, dtype, gen):
    """K/V pages [pool, bs, Hkv, D] holding sequences of `lens` tokens on shuffled page ids (spare pages in the pool),
    int32 block tables padded with page 0, int32 seq_lens."""
    need = [-(-n // bs) for n in lens]
    pool = sum(need) + 5
    ids = torch.randperm(pool, generator=gen).to(torch.int32)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    for b, (start, n) in enumerate(zip([0, *torch.tensor(need).cumsum(0).tolist()], need)):
        tables[b, :n] = ids[start:start + n]
    k, v = (torch.randn(pool, bs, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    return k, v, tables, torch.tensor(lens, dtype=torch.int32)


def query(shape, dtype, gen, strided: bool):
    """A query of `shape` (..., H, D); strided: head-dim stride H (a transposed [..., D, H] buffer)."""
    if not strided:
        return torch.randn(*shape, generator=gen).to(dtype)
    return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).to(dtype).transpose(-1, -2)


def check_attention(record, out, kernel, what, *args, **kw):
    """The C++ attention tolerance (llmkern.testing.check_cpu_paged_attention: fp32 within the error bound of the
    algorithm, fp16/bf16 no worse than eager), its share of the allowance recorded for the run's report."""
    record(kernel, out.dtype, check_cpu_paged_attention(out, *args, kernel=kernel, what=what, **kw))


# ---------------------------------------------------------------------------------------------------------------------
# Decode


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("bs", [1, 16], ids=lambda b: f"page{b}")
@pytest.mark.parametrize("Hq,Hkv,D", [
    pytest.param(4, 4, 80, id="g1-d80"),  # MHA; head_dim 80: AVX2 only
    pytest.param(8, 2, 64, id="g4-d64"),
    pytest.param(14, 2, 64, id="g7-d64"),  # Qwen2.5-0.5B
    pytest.param(14, 2, 128, id="g7-d128"),
    pytest.param(16, 2, 96, id="g8-d96"),
    pytest.param(8, 2, 256, id="g4-d256"),  # Gemma's head_dim: four register pieces of the output row
    pytest.param(6, 3, 48, id="g2-d48"),  # no vectorised kernel: portable on every ISA
])
def test_decode(isa, dtype, bs, Hq, Hkv, D, cpu_tolerance):
    gen = torch.Generator().manual_seed(Hq * 1000 + D + bs)
    dt = DTYPES[dtype]
    # Lengths around the W-token score blocks and the 64-token chunks; 9 splits over 300 tokens leave most of the
    # 1- and 17-token sequences' splits empty (LSE -inf, weight 0 in the reduce).
    k, v, tables, lens = paged_kv([1, 17, 300, 65], Hkv, D, bs, dt, gen)
    q = query((4, Hq, D), dt, gen, strided=False)
    want = kernel_for("paged_decode_attention", isa, D)
    assert C.cpu_kernel("paged_decode_attention", dt, D) == want
    for splits in (None, 9):
        with llmkern.use_backend("cpp"), llmkern.track() as ran:
            out = paged_ops.paged_decode_attention(q, k, v, tables, lens, D ** -0.5, num_splits=splits)
        assert ran.backends("paged_decode_attention") == {"cpp"}
        check_attention(cpu_tolerance, out, want, f"decode on {want} ({isa}), {dtype}, splits {splits}", q, k, v,
                        tables, lens, D ** -0.5, num_splits=splits)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("window,softcap", [(7, None), (None, 30.0), (40, 5.0)], ids=["window", "softcap", "both"])
def test_decode_window_softcap_strided_q(isa, dtype, window, softcap, cpu_tolerance):
    gen = torch.Generator().manual_seed(7)
    dt = DTYPES[dtype]
    k, v, tables, lens = paged_kv([3, 50, 301], 2, 64, 16, dt, gen)
    q = query((3, 14, 64), dt, gen, strided=True)
    assert q.stride(-1) == 14
    with llmkern.use_backend("cpp"):
        out = paged_ops.paged_decode_attention(q, k, v, tables, lens, 0.125, sliding_window=window, softcap=softcap,
                                               num_splits=4)
    check_attention(cpu_tolerance, out, kernel_for("paged_decode_attention", isa, 64),
                    f"decode window {window} softcap {softcap} ({isa}, {dtype})", q, k, v, tables, lens, 0.125,
                    num_splits=4, sliding_window=window, softcap=softcap)


# ---------------------------------------------------------------------------------------------------------------------
# Prefill


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("lens,q_lens,S,Hq,Hkv,D,bs,window,softcap", [
    pytest.param([40, 7, 100], [40, 7, 30], 40, 14, 2, 64, 16, None, None, id="g7-d64-leftpad-chunked"),
    pytest.param([21, 9], [21, 0], 21, 4, 4, 80, 1, None, None, id="g1-d80-page1-noquery"),
    pytest.param([70, 33], [70, 20], 70, 16, 2, 96, 16, 24, 3.0, id="g8-d96-window-softcap"),
    pytest.param([33, 18], [33, 18], 33, 8, 2, 256, 16, None, 20.0, id="g4-d256-softcap"),
    pytest.param([66], [66], 66, 32, 8, 128, 1, 9, None, id="g4-d128-page1-window"),  # Llama-3-8B heads
])
def test_prefill(isa, dtype, lens, q_lens, S, Hq, Hkv, D, bs, window, softcap, cpu_tolerance):
    gen = torch.Generator().manual_seed(S + D)
    dt = DTYPES[dtype]
    k, v, tables, seq_lens = paged_kv(lens, Hkv, D, bs, dt, gen)
    ql = torch.tensor(q_lens, dtype=torch.int32)
    q = query((len(lens), S, Hq, D), dt, gen, strided=S % 2 == 1).transpose(1, 2)  # [B, Hq, S, D] as HF's view
    want = kernel_for("paged_prefill_attention", isa, D)
    assert C.cpu_kernel("paged_prefill_attention", dt, D) == want
    with llmkern.use_backend("cpp"), llmkern.track() as ran:
        out = paged_ops.paged_prefill_attention(q, k, v, tables, seq_lens, ql, D ** -0.5, sliding_window=window,
                                                softcap=softcap)
    assert ran.backends("paged_prefill_attention") == {"cpp" if want != "reference" else "reference"}
    if want == "reference":  # comparing the reference with itself could not fail
        pytest.skip(f"no C++ prefill kernel on {isa} for head_dim {D}: the reference ran (checked above)")
    check_attention(cpu_tolerance, out, want, f"prefill on {want} ({isa}, {dtype})", q, k, v, tables, seq_lens,
                    D ** -0.5, q_lens=ql, sliding_window=window, softcap=softcap)
    padding = torch.arange(S)[None, :] < (S - ql)[:, None]
    assert (out.transpose(1, 2)[padding] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Row ops: every ISA's rms_norm, fused_add_rms_norm, apply_rope and silu_and_mul (kernels_impl.h per translation unit),
# not only the active one's; widths around the vector widths and past rms_norm's 8192-element chunk.

ROW_WIDTHS = [1, 7, 63, 111, 769, 5125, 9000]


def _hf_rms_norm(x, w):
    """Eager: transformers' LlamaRMSNorm with weight ``w``."""
    m = LlamaRMSNorm(w.shape[0], eps=1e-6).to(w.dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        return m(x)


def _hf_rope(q, k, cos, sin):
    """Eager: transformers' apply_rotary_pos_emb, on the first cos.shape[-1] dims (the rest pass through)."""
    rd = cos.shape[-1]
    if rd == q.shape[-1]:
        return apply_rotary_pos_emb(q, k, cos, sin)
    qr, kr = apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos, sin)
    return torch.cat((qr, q[..., rd:]), -1), torch.cat((kr, k[..., rd:]), -1)


def _row_check(out, eager, oracle, what, scale=None):
    """Eager is transformers' own module or function in the dtype; the oracle the fp64 formula of llmkern.testing
    (neither is llmkern.reference, which is an implementation under test)."""
    assert_no_worse_than_eager(out, eager, oracle, what=what, scale=scale)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("M,I", [(1, 14336), (1, 4097), (2, 9000), (3, 8192)])
def test_silu_and_mul_row_split_across_threads(isa, dtype, M, I):
    """Fewer rows than threads: the binding splits each row into column pieces (torch_bindings.cpp); the result must
    be the one-thread result bit for bit (the op is elementwise), on column-strided inputs too."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(M * I)
    gate = (torch.randn(M, 2 * I, generator=gen) * 4).to(dt)[:, ::2]  # column stride 2
    up = torch.randn(M, I, generator=gen).to(dt)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.silu_and_mul(gate, up)
        torch.set_num_threads(4)  # more threads than rows: split (4 on a 2-core machine is fine for a check)
        split = C.silu_and_mul(gate, up)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(split, one), f"silu_and_mul split across threads differs from one thread ({isa}, {dtype})"
    _row_check(split, ACT2FN["silu"](gate) * up, oracle_silu_and_mul(gate, up), f"silu_and_mul split {isa} {dtype}",
               scale=silu_and_mul_scale(gate, up))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("N", ROW_WIDTHS)
def test_row_ops(isa, dtype, N):
    from llmkern import ops

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(3, N, generator=gen).to(dt)
    r = torch.randn(3, N, generator=gen).to(dt)
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(dt)
    with llmkern.use_backend("cpp"), llmkern.track() as ran:
        normed = ops.rms_norm(x, w, 1e-6)
        fused, res = ops.fused_add_rms_norm(x, r, w, 1e-6)
        act = ops.silu_and_mul(x * 4, r)
    assert all(ran.backends(op) == {"cpp"} for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul")), ran
    what = f"on {isa}, {dtype}, N={N}"
    _row_check(normed, _hf_rms_norm(x, w), oracle_rms_norm(x, w, 1e-6), f"rms_norm {what}")
    assert torch.equal(res, r + x), f"fused_add_rms_norm residual {what}: not eager's rounded sum"
    _row_check(fused, _hf_rms_norm(res, w), oracle_rms_norm(res, w, 1e-6), f"fused_add_rms_norm {what}")
    _row_check(act, ACT2FN["silu"](x * 4) * r, oracle_silu_and_mul(x * 4, r), f"silu_and_mul {what}",
               scale=silu_and_mul_scale(x * 4, r))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("D,rot", [(64, 64), (128, 128), (80, 40), (256, 256)], ids=lambda v: str(v))
def test_rope(isa, dtype, D, rot):
    from llmkern import ops

    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(D + rot)
    q = torch.randn(2, 5, 14, D, generator=gen).to(dt).transpose(1, 2)  # [b, H, s, d] views, as HF passes them
    k = torch.randn(2, 5, 2, D, generator=gen).to(dt).transpose(1, 2)
    ang = torch.rand(2, 5, rot // 2, generator=gen) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    with llmkern.use_backend("cpp"), llmkern.track() as ran:
        qo, ko = ops.apply_rope(q, k, cos, sin)
    assert ran.backends("apply_rope") == {"cpp"}, ran
    for out, eager, x, name in zip((qo, ko), _hf_rope(q, k, cos, sin), (q, k), "qk"):
        # ulp terms at |x1 cos| + |x2 sin| per element: what the rotation's rounding scales with
        _row_check(out, eager, oracle_rope(x, cos, sin), f"apply_rope {name} on {isa}, {dtype}, D={D}, rotary {rot}",
                   scale=rope_scale(x, cos, sin))


# ---------------------------------------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("dtype", ["fp32", "bf16"], ids=str)
@pytest.mark.parametrize("M,N,K", [pytest.param(*mnk, id="M{}-N{}-K{}".format(*mnk)) for mnk in [
    (1, 1, 1), (1, 7, 9), (2, 24, 31), (3, 33, 100), (4, 40, 70), (4, 19, 224), (6, 21, 67), (16, 17, 4111),
    (1, 1536, 576), (1, 20, 2100), (5, 36, 2100),
    # More rows than one pass over a block (16) and than one walk over the range (64): every pass of every walk
    (17, 40, 70), (33, 21, 67), (64, 36, 100), (65, 19, 224), (130, 17, 31)]])
def test_linear(isa, dtype, M, N, K):
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(M + N + K)
    x = torch.randn(M, 2 * K, generator=gen).to(dt)[:, ::2]  # last stride 2: the binding packs it
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dt)
    bias = torch.randn(N, generator=gen).to(dt)
    want = kernel_for("linear", isa)
    assert C.cpu_kernel("linear", dt) == want
    assert C.cpu_linear_supported(dt) == (want != "reference")
    if want == "reference":
        with pytest.raises(RuntimeError, match=r"no C\+\+ kernel for \w+ on this CPU \(generic\)"):
            C.linear(x, w, bias)
        return
    for b in (None, bias):
        out = C.linear(x, w, b)
        bd = None if b is None else b.double()
        magnitude = F.linear(x.double().abs(), w.double().abs(), None if b is None else bd.abs())
        assert_no_worse_than_eager(out, F.linear(x, w, b), F.linear(x.double(), w.double(), bd),
                                   what=f"linear on {want}, {dtype} [{M}, {K}] x [{N}, {K}]", scale=magnitude)


def test_linear_fp16_has_no_kernel(isa):
    assert C.cpu_kernel("linear", torch.float16) == "reference" and not C.cpu_linear_supported(torch.float16)


# ---------------------------------------------------------------------------------------------------------------------
# Forcing the ISA


def test_set_cpu_isa_rejects_unknown_names_and_reports_the_active_one():
    before = C.cpu_isa()
    with pytest.raises(ValueError, match="unknown instruction set 'avx3', expected avx512, avx2 or generic"):
        C.set_cpu_isa("avx3")
    assert C.cpu_isa() == before
    with pytest.raises(ValueError, match="op must be paged_decode_attention"):
        C.cpu_kernel("matmul", torch.float32, 64)
    prev = C.set_cpu_isa("generic")  # every CPU runs the baseline
    try:
        assert prev == before and C.cpu_isa() == "generic"
        assert C.cpu_kernel("paged_decode_attention", torch.float32, 64) == "portable"
        assert not C.cpu_fast_attention(torch.float32, 64)
    finally:
        assert C.set_cpu_isa(prev) == "generic"


def test_set_cpu_isa_refuses_what_this_cpu_cannot_run():
    order = ["generic", "avx2", "avx512"]
    best = _ext.cpu_isa() if "LLMKERN_CPU_ISA" not in os.environ else None
    if best is None or best == "avx512":
        pytest.skip("this CPU runs every ISA llmkern has (or LLMKERN_CPU_ISA caps it): nothing to refuse")
    above = order[order.index(best) + 1]
    with pytest.raises(RuntimeError, match=f"this CPU cannot run {above} kernels \\(it runs up to {best}\\)"):
        C.set_cpu_isa(above)


def _python(code: str, isa_env: str):
    env = {**os.environ, "LLMKERN_CPU_ISA": isa_env}
    env.pop("TRITON_INTERPRET", None)  # the cpp backend is the automatic one for CPU tensors then
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


_REPORT = """
import torch, llmkern
from llmkern import _ext
C = torch.ops.llmkern_C
x, w = torch.randn(1, 64), torch.randn(8, 64)
with llmkern.track() as t:
    llmkern.ops.linear(x, w)
print(_ext.cpu_isa(), C.cpu_kernel("paged_decode_attention", torch.float32, 80), sorted(t.backends("linear")))
try:
    C.set_cpu_isa("avx512")
except RuntimeError as e:
    print("refused:", str(e).splitlines()[0])
"""


def test_env_var_caps_the_isa_at_load():
    p = _python(_REPORT, "generic")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    # Baseline: decode runs the portable kernel, Linear the reference (ops.linear sees no C++ kernel for fp32).
    assert lines[0] == "generic portable ['reference']", p.stdout
    assert lines[1].startswith("refused: set_cpu_isa: ") and "avx512" in lines[1], p.stdout


def test_env_var_avx2():
    with running_on("avx2"):  # skips where this CPU cannot run AVX2
        pass
    p = _python(_REPORT, "avx2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "avx2 avx2 ['cpp']", p.stdout


def test_env_var_naming_no_isa_is_an_error():
    p = _python("from llmkern import _ext\n_ext.load()", "avx3")
    assert p.returncode != 0
    assert "ValueError: LLMKERN_CPU_ISA=avx3 names no instruction set" in p.stderr, p.stderr
