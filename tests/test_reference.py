"""The oracles cannot drift (issue #23 item 2): llmkern.reference and transformers' eager modules against the fp64
formulas of llmkern.testing (``oracle_*``, written from the math, not from the reference).

The reference is an implementation under test — the ``reference`` backend, the formula the row ops' backward
differentiates (llmkern/ops.py) and the yardstick of the C++ attention tests in fp16/bf16 — so it is held to the oracle
here: in fp64 it must compute the same function, in the test dtypes it must be bit-equal to transformers' eager (its
docstring's promise). Eager itself is bounded against the oracle too, so the tolerance rule's allowance (1.5x eager's
error) cannot grow because either side went wrong. Inputs make every parameter matter: rows whose mean square is near
eps, cos/sin with independent halves, partial rotary, windows that start mid-page, a softcap that bites, GQA groups.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

try:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
except ImportError:  # pragma: no cover - depends on the transformers build
    GemmaRMSNorm = None

from llmkern import reference
from llmkern.testing import (oracle_paged_attention, oracle_rms_norm, oracle_rope, oracle_silu_and_mul, rope_scale,
                             ulp)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close64(got, want, what, scale=None):
    """fp64 against fp64: the same function up to fp64 rounding, |got - want| <= 1e-12 * scale at every element
    (``scale`` what the element's rounding errors scale with; default |want|)."""
    scale = want.abs() if scale is None else scale
    err = (got - want).abs()
    bad = err > 1e-12 * scale
    assert got.shape == want.shape and not bad.any(), (
        f"{what}: {int(bad.sum())} of {err.numel()} elements differ, the first at {tuple(bad.nonzero()[0].tolist())}: "
        f"{got[bad][0].item()!r} against the oracle's {want[bad][0].item()!r}")


def _within(eager, oracle, scale, ulps, what):
    """|eager - oracle| <= ulps * eps(dtype) * scale at every element."""
    err = (eager.double() - oracle).abs()
    bound = ulps * ulp(eager.dtype) * scale
    bad = err > bound
    assert not bad.any(), (f"{what}: eager is {err[bad].max().item():.3e} from the oracle at "
                           f"{tuple(bad.nonzero()[0].tolist())}, more than {ulps} eps of the element "
                           f"({int(bad.sum())} of {err.numel()} elements)")


def _rows(n, dtype, seed):
    """[4, n] rows: two of ordinary size, two whose mean square is ~eps (there eps changes the result by ~30%)."""
    g = _gen(seed)
    x = torch.randn(4, n, generator=g)
    x[2:] *= 1e-3
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# rms_norm, fused_add_rms_norm


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_reference_rms_norm_fp64_is_the_oracle(eps, offset):
    x, w = _rows(777, torch.float64, 1), torch.randn(777, generator=_gen(2), dtype=torch.float64)
    _close64(reference.rms_norm(x, w, eps, offset), oracle_rms_norm(x, w, eps, offset), f"eps {eps} offset {offset}")
    # eps matters on these rows: the oracle itself tells 1e-6 from 1e-5
    assert (oracle_rms_norm(x, w, 1e-6) - oracle_rms_norm(x, w, 1e-5)).abs()[2:].max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_reference_rms_norm_is_hf_eager(dtype, eps):
    x, w = _rows(896, dtype, 3), (1 + 0.1 * torch.randn(896, generator=_gen(4))).to(dtype)
    m = LlamaRMSNorm(896, eps=eps).to(dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        assert torch.equal(reference.rms_norm(x, w, eps), m(x))


@pytest.mark.skipif(GemmaRMSNorm is None, reason="transformers has no Gemma: no eager for offset=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_reference_rms_norm_offset_is_gemma_eager(dtype, eps):
    x = _rows(896, dtype, 3)
    g = GemmaRMSNorm(896, eps=eps).to(dtype)
    w0 = (0.1 * torch.randn(896, generator=_gen(5))).to(dtype)
    with torch.no_grad():
        g.weight.copy_(w0)
        assert torch.equal(reference.rms_norm(x, w0, eps, 1.0), g(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_reference_fused_add_rms_norm_is_hf_eager(dtype):
    x, r = _rows(384, dtype, 6), _rows(384, dtype, 7)
    w = (1 + 0.1 * torch.randn(384, generator=_gen(8))).to(dtype)
    normed, s = reference.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(s, r + x)
    m = LlamaRMSNorm(384, eps=EPS).to(dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        assert torch.equal(normed, m(r + x))


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_hf_rms_norm_is_within_two_eps_of_the_oracle(dtype):
    """Eager's own error bounded element by element (two roundings in fp16/bf16, rstd's few in fp32): the allowance
    1.5x eager's error cannot hide a wrong oracle, nor a wrong eager."""
    x, w = _rows(4864, dtype, 9), (1 + 0.1 * torch.randn(4864, generator=_gen(10))).to(dtype)
    m = LlamaRMSNorm(4864, eps=EPS).to(dtype)
    with torch.no_grad():
        m.weight.copy_(w)
        eager = m(x)
    oracle = oracle_rms_norm(x, w, EPS)
    _within(eager, oracle, oracle.abs(), 2, f"LlamaRMSNorm {_name(dtype)}")


# ---------------------------------------------------------------------------------------------------------------------
# apply_rope


def _rope_inputs(dtype, rd, seed):
    g = _gen(seed)
    q = torch.randn(2, 5, 4, 64, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(2, 5, 2, 64, generator=g).to(dtype).transpose(1, 2)
    # independent halves (a model's cos has cos[:h] == cos[h:]): a formula reading the wrong half shows
    cos = (torch.rand(2, 5, rd, generator=g) * 2 - 1).to(dtype)
    sin = (torch.rand(2, 5, rd, generator=g) * 2 - 1).to(dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("rd", [64, 32, 2])
def test_reference_rope_fp64_is_the_oracle(rd):
    q, k, cos, sin = _rope_inputs(torch.float64, rd, 11)
    for got, x in zip(reference.apply_rope(q, k, cos, sin), (q, k)):
        _close64(got, oracle_rope(x, cos, sin), f"rotary {rd}", rope_scale(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("rd", [64, 32])
def test_reference_rope_is_hf_eager(dtype, rd):
    q, k, cos, sin = _rope_inputs(dtype, rd, 12)
    if rd == 64:
        want = apply_rotary_pos_emb(q, k, cos, sin)
    else:  # HF's partial rotary: rotate the first rd dims, pass the rest through
        qr, kr = apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos, sin)
        want = torch.cat((qr, q[..., rd:]), -1), torch.cat((kr, k[..., rd:]), -1)
    for got, w in zip(reference.apply_rope(q, k, cos, sin), want):
        assert torch.equal(got, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_hf_rope_is_within_two_eps_of_the_oracle(dtype):
    q, k, cos, sin = _rope_inputs(dtype, 64, 13)
    for eager, x in zip(apply_rotary_pos_emb(q, k, cos, sin), (q, k)):
        _within(eager, oracle_rope(x, cos, sin), rope_scale(x, cos, sin), 2, f"apply_rotary_pos_emb {_name(dtype)}")


# ---------------------------------------------------------------------------------------------------------------------
# silu_and_mul


def test_reference_silu_and_mul_fp64_is_the_oracle():
    g = _gen(14)
    gate, up = torch.randn(3, 999, generator=g, dtype=torch.float64) * 6, torch.randn(3, 999, generator=g,
                                                                                       dtype=torch.float64)
    _close64(reference.silu_and_mul(gate, up), oracle_silu_and_mul(gate, up), "silu_and_mul")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_reference_silu_and_mul_is_hf_eager(dtype):
    g = _gen(15)
    gate, up = (torch.randn(3, 999, generator=g) * 6).to(dtype), torch.randn(3, 999, generator=g).to(dtype)
    assert torch.equal(reference.silu_and_mul(gate, up), ACT2FN["silu"](gate) * up)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_hf_silu_and_mul_is_within_two_eps_of_the_oracle(dtype):
    g = _gen(16)
    gate, up = (torch.randn(3, 4864, generator=g) * 4).to(dtype), torch.randn(3, 4864, generator=g).to(dtype)
    oracle = oracle_silu_and_mul(gate, up)
    _within(ACT2FN["silu"](gate) * up, oracle, oracle.abs().clamp(min=torch.finfo(dtype).tiny), 2,
            f"silu * up {_name(dtype)}")


# ---------------------------------------------------------------------------------------------------------------------
# linear: F.linear is both eager and the reference


def test_linear_fp64_is_the_sum_of_products():
    g = _gen(17)
    x, w, b = (torch.randn(3, 100, generator=g, dtype=torch.float64), torch.randn(7, 100, generator=g,
                                                                                   dtype=torch.float64),
               torch.randn(7, generator=g, dtype=torch.float64))
    xs, ws, bs = x.tolist(), w.tolist(), b.tolist()  # math.fsum: the correctly rounded sum of the exact products
    want = torch.tensor([[math.fsum([a * c for a, c in zip(xr, wr)] + [bj]) for wr, bj in zip(ws, bs)] for xr in xs],
                        dtype=torch.float64)
    _close64(F.linear(x, w, b), want, "linear", F.linear(x.abs(), w.abs(), b.abs()))


# ---------------------------------------------------------------------------------------------------------------------
# paged attention


def _paged(lens, bs, Hkv, D, dtype, seed):
    """Pages of every sequence on shuffled page ids; unused slots hold 1e4 (a stray read dominates its row; not NaN:
    the reference multiplies masked values by a zero weight, and 0 * NaN is NaN)."""
    g = _gen(seed)
    need = [-(-n // bs) for n in lens]
    pool = sum(need) + 3
    ids = torch.randperm(pool, generator=g).to(torch.int32)
    tables = torch.full((len(lens), max(need + [1])), pool - 1, dtype=torch.int32)
    kc = torch.full((pool, bs, Hkv, D), 1e4, dtype=dtype)
    vc = torch.full_like(kc, 1e4)
    start = 0
    for b, n in enumerate(lens):
        tables[b, :need[b]] = ids[start:start + need[b]]
        start += need[b]
        t = torch.arange(n)
        pages = tables[b, t // bs].long()
        kc[pages, t % bs] = torch.randn(n, Hkv, D, generator=g).to(dtype)
        vc[pages, t % bs] = torch.randn(n, Hkv, D, generator=g).to(dtype)
    return kc, vc, tables, torch.tensor(lens, dtype=torch.int32)


ATTENTION_CASES = {
    # lens, q_lens, S, Hq, Hkv, D, bs, window, softcap
    "decode-gqa7": ([5, 17, 100], [1, 1, 1], 1, 14, 2, 64, 16, None, None),
    "prefill-left-padded": ([6, 20, 40, 4], [6, 1, 5, 0], 6, 8, 2, 32, 16, None, None),
    "window-mid-page": ([40, 70], [40, 9], 40, 7, 1, 48, 16, 13, None),
    "softcap-page1": ([30, 9], [30, 3], 30, 4, 4, 32, 1, None, 2.0),
    "window-softcap-empty": ([0, 33, 64], [0, 4, 2], 4, 6, 3, 16, 8, 5, 3.0),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_reference_paged_attention_fp64_is_the_oracle(case):
    lens, q_lens, S, Hq, Hkv, D, bs, window, softcap = ATTENTION_CASES[case]
    kc, vc, tables, seq_lens = _paged(lens, bs, Hkv, D, torch.float64, 18)
    q = torch.randn(len(lens), Hq, S, D, generator=_gen(19), dtype=torch.float64) * 2
    ql = torch.tensor(q_lens, dtype=torch.int32)
    want, mag = oracle_paged_attention(q, kc, vc, tables, seq_lens, ql, D ** -0.5, window, softcap)
    got = reference.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql, D ** -0.5, window, softcap)
    _close64(got, want, case, mag)
    if S == 1:
        dec = reference.paged_decode_attention(q[:, :, 0], kc, vc, tables, seq_lens, D ** -0.5, window, softcap)
        _close64(dec, want[:, :, 0], f"{case} decode", mag[:, :, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("case", ["prefill-left-padded", "window-softcap-empty"])
def test_reference_paged_attention_rounds_once(dtype, case):
    """In fp16/bf16 the reference computes in fp32 and rounds its output once: within one eps of S_i = sum p|v|
    (llmkern.testing.check_cpu_paged_attention relies on it as the C++ kernels' yardstick)."""
    lens, q_lens, S, Hq, Hkv, D, bs, window, softcap = ATTENTION_CASES[case]
    kc, vc, tables, seq_lens = _paged(lens, bs, Hkv, D, dtype, 20)
    q = (torch.randn(len(lens), Hq, S, D, generator=_gen(21)) * 2).to(dtype)
    ql = torch.tensor(q_lens, dtype=torch.int32)
    oracle, mag = oracle_paged_attention(q, kc, vc, tables, seq_lens, ql, D ** -0.5, window, softcap)
    got = reference.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql, D ** -0.5, window, softcap)
    _within(got, oracle, mag, 1, f"reference attention {case} {_name(dtype)}")


@pytest.mark.parametrize("dtype", [torch.float32], ids=_name)  # named, so the mutation check's report sees it
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_reference_paged_attention_fp32_near_the_oracle(case, dtype):
    """The reference is also a backend (what runs where no kernel serves): in fp32 it must be near the oracle too,
    decode and prefill, every window/softcap/GQA/page case. The fp32 kernel tests no longer compare against it, so a
    wrong window or GQA mapping in it would otherwise pass them in fp32. The allowance, 32 eps of S_i = sum p|v|
    (the scores' fp32 rounding comes on top of the sums': the worst case used 7.9 on an AVX-512 AMD machine, and
    another CPU's matmul blocking may round differently), is far below what one key more or less, or another
    head's keys, changes."""
    lens, q_lens, S, Hq, Hkv, D, bs, window, softcap = ATTENTION_CASES[case]
    kc, vc, tables, seq_lens = _paged(lens, bs, Hkv, D, dtype, 22)
    q = (torch.randn(len(lens), Hq, S, D, generator=_gen(23)) * 2).to(dtype)
    ql = torch.tensor(q_lens, dtype=torch.int32)
    oracle, mag = oracle_paged_attention(q, kc, vc, tables, seq_lens, ql, D ** -0.5, window, softcap)
    got = reference.paged_prefill_attention(q, kc, vc, tables, seq_lens, ql, D ** -0.5, window, softcap)
    _within(got, oracle, mag, 32, f"reference attention {case} float32")
    if S == 1:
        dec = reference.paged_decode_attention(q[:, :, 0], kc, vc, tables, seq_lens, D ** -0.5, window, softcap)
        _within(dec, oracle[:, :, 0], mag[:, :, 0], 32, f"reference decode {case} float32")
