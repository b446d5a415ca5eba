"""Rotary position embedding (NeoX / rotate-half, as Hugging Face applies it) on q and k in one launch.

HF computes ``q * cos + rotate_half(q) * sin`` with ``cos``/``sin`` of shape ``[b or 1, s, rotary_dim]`` straight
from the model's rotary embedding, so every rope type (default, linear, dynamic, yarn, llama3) reaches the kernel
already folded into cos/sin. With ``h = rotary_dim // 2`` and ``x1 = x[:h]``, ``x2 = x[h:rotary_dim]``::

    out[:h]          = x1 * cos[:h]  - x2 * sin[:h]
    out[h:rotary_dim] = x2 * cos[h:] + x1 * sin[h:]
    out[rotary_dim:] = x[rotary_dim:]          (partial rotary: passed through)

Rounding: in fp32, then once to x's dtype. For fp16/bf16 inputs both products are exact in fp32, so the result is
the exact value rounded to fp32 and then to the dtype (an FMA changes nothing). Eager rounds each product to the
dtype before the sum, so this is not bit-equal to eager but never further from the exact value, element by element,
up to twice the fp32 rounding (README.md, "Where fp16/bf16 results are rounded"; tests/test_ops.py,
``test_rope_rounding_*``).

Grid: axis 0 is the token (b, s); axis 1 walks head blocks of q first, then of k. q and k keep whatever strides
they come with (HF passes ``[b, s, H, d]`` buffers viewed as ``[b, H, s, d]``); every dim is strided
(Triton specialises the usual last-dim stride of 1 at compile time, so it costs nothing).
"""

import triton
import triton.language as tl

from llmkern.kernels import _launch


@triton.jit
def _rope_tile(
    x_ptr,  # [B, H, S, D] (strided) rows to rotate
    o_ptr,  # [B, H, S, D] (strided) output
    b,
    s,
    head0,
    H,
    stride_xb,
    stride_xh,
    stride_xs,
    stride_xd,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    c1,  # [BLOCK_HALF] fp32 cos[:h]
    c2,  # [BLOCK_HALF] fp32 cos[h:rd]
    s1,  # [BLOCK_HALF] fp32 sin[:h]
    s2,  # [BLOCK_HALF] fp32 sin[h:rd]
    HALF,
    PASS,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    hmask = heads < H
    mask = hmask[:, None] & (d < HALF)[None, :]
    heads64 = heads.to(tl.int64)
    x_row = x_ptr + b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs + heads64[:, None] * stride_xh
    o_row = o_ptr + b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + heads64[:, None] * stride_oh
    x1 = tl.load(x_row + d[None, :] * stride_xd, mask=mask, other=0.0)
    x2 = tl.load(x_row + (HALF + d[None, :]) * stride_xd, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    o1 = x1f * c1[None, :] - x2f * s1[None, :]
    o2 = x2f * c2[None, :] + x1f * s2[None, :]
    tl.store(o_row + d[None, :] * stride_od, o1.to(x1.dtype), mask=mask)
    tl.store(o_row + (HALF + d[None, :]) * stride_od, o2.to(x1.dtype), mask=mask)
    if BLOCK_PASS > 0:
        p = tl.arange(0, BLOCK_PASS)
        pmask = hmask[:, None] & (p < PASS)[None, :]
        xp = tl.load(x_row + (2 * HALF + p[None, :]) * stride_xd, mask=pmask, other=0.0)
        tl.store(o_row + (2 * HALF + p[None, :]) * stride_od, xp, mask=pmask)


# S == 1 (decode) and the head counts gain nothing from separate compiles.
@triton.jit(do_not_specialize=("S", "Hq", "Hk"))
def _rope_kernel(
    q_ptr,  # [B, Hq, S, D]
    k_ptr,  # [B, Hk, S, D]
    cos_ptr,  # [Bc, S, RD], Bc in {1, B} (stride_cb = 0 when broadcast)
    sin_ptr,  # [Bc, S, RD]
    qo_ptr,  # [B, Hq, S, D]
    ko_ptr,  # [B, Hk, S, D]
    S,
    Hq,
    Hk,
    HALF,  # rotary_dim // 2
    PASS,  # D - rotary_dim
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_qob, stride_qoh, stride_qos, stride_qod,
    stride_kob, stride_koh, stride_kos, stride_kod,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    tok = tl.program_id(0)
    hblk = tl.program_id(1)
    b = tok // S
    s = tok % S
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    c_row = cos_ptr + b.to(tl.int64) * stride_cb + s.to(tl.int64) * stride_cs
    s_row = sin_ptr + b.to(tl.int64) * stride_sb + s.to(tl.int64) * stride_ss
    c1 = tl.load(c_row + d * stride_cd, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + (HALF + d) * stride_cd, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d * stride_sd, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + (HALF + d) * stride_sd, mask=dmask, other=0.0).to(tl.float32)
    n_qblk = tl.cdiv(Hq, BLOCK_H)
    if hblk < n_qblk:
        _rope_tile(q_ptr, qo_ptr, b, s, hblk * BLOCK_H, Hq,
                   stride_qb, stride_qh, stride_qs, stride_qd, stride_qob, stride_qoh, stride_qos, stride_qod,
                   c1, c2, s1, s2, HALF, PASS, BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    else:
        _rope_tile(k_ptr, ko_ptr, b, s, (hblk - n_qblk) * BLOCK_H, Hk,
                   stride_kb, stride_kh, stride_ks, stride_kd, stride_kob, stride_koh, stride_kos, stride_kod,
                   c1, c2, s1, s2, HALF, PASS, BLOCK_H, BLOCK_HALF, BLOCK_PASS)


def rope_config(num_tokens: int, Hq: int, Hk: int, head_dim: int, rotary_dim: int) -> dict:
    """Heads per program so a tile holds ~2K elements of each half; decode (one token) still spreads q and k
    heads over several programs."""
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_pass = 0 if head_dim == rotary_dim else triton.next_power_of_2(head_dim - rotary_dim)
    block_h = max(1, min(triton.next_power_of_2(max(Hq, Hk)), 2048 // block_half))
    if num_tokens <= 4:
        # Few tokens: prefer more, smaller programs.
        block_h = min(block_h, 4)
    num_warps = max(1, min(8, block_h * block_half // 256))
    return {"BLOCK_H": block_h, "BLOCK_HALF": block_half, "BLOCK_PASS": block_pass, "num_warps": num_warps}


def rope_grid(num_tokens: int, Hq: int, Hk: int, head_dim: int, rotary_dim: int) -> tuple:
    """Tokens on x (the only axis past 65535), q then k head blocks on y."""
    bh = rope_config(num_tokens, Hq, Hk, head_dim, rotary_dim)["BLOCK_H"]
    return (num_tokens, triton.cdiv(Hq, bh) + triton.cdiv(Hk, bh))


def rope_fwd(q, k, cos, sin, q_out, k_out) -> None:
    """Launch ``_rope_kernel``. q/k/outs are 4-D ``[B, H, S, D]``; cos/sin are 3-D ``[Bc, S, RD]``."""
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    rd = cos.shape[-1]
    cfg = rope_config(B * S, Hq, Hk, D, rd)
    bh = cfg["BLOCK_H"]
    grid = rope_grid(B * S, Hq, Hk, D, rd)
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    with _launch.device_guard(q):
        _launch.launch(
            _rope_kernel, grid, q, k, cos, sin, q_out, k_out, S, Hq, Hk, rd // 2, D - rd,
            *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
            cb, cos.stride(1), cos.stride(2), sb, sin.stride(1), sin.stride(2),
            BLOCK_H=bh, BLOCK_HALF=cfg["BLOCK_HALF"], BLOCK_PASS=cfg["BLOCK_PASS"], num_warps=cfg["num_warps"],
        )


_SPEC_DTYPES = ("fp32", "fp16", "bf16")


def compile_specs() -> list:
    """Every (launch config, dtype) ``rope_config`` picks for the head layouts of ``kernels/_layouts.py`` (every
    decode batch, prefill up to batch x max context tokens), specialised as HF's launch is: q/k/outs are
    ``[b, s, H, d]`` buffers viewed as ``[b, H, s, d]``, cos/sin ``[b, s, d]`` in q's dtype (batch stride 0 when
    b == 1). Unit strides become constants, multiples of 16 are listed in ``meta["divisible_by_16"]``; ``S`` and the
    head counts are never specialised. All rotate the full head (rotary_dim == head_dim)."""
    from ._specs import CompileSpec
    from llmkern.kernels import _layouts as L

    fn = _rope_kernel
    served = {}
    for lname, Hq, Hk, D, max_ctx, _ in L.head_layouts():
        for tokens in L.token_counts(L.MAX_BATCH * max_ctx):
            for B, S in {(tokens, 1), (1, tokens)}:
                key = (Hq, Hk, D, B > 1, tuple(rope_config(B * S, Hq, Hk, D, D).items()))
                served.setdefault(key, [])
                if lname not in served[key]:
                    served[key].append(lname)
    specs = {}
    for dt in _SPEC_DTYPES:
        for (Hq, Hk, D, batched, cfg_items), layouts in served.items():
            cfg = dict(cfg_items)
            bh, bhalf, bpass, nw = cfg["BLOCK_H"], cfg["BLOCK_HALF"], cfg["BLOCK_PASS"], cfg["num_warps"]
            S = 64  # not specialised; the strides below are multiples of D whatever S is
            ints = {"HALF": D // 2, "PASS": 0}
            for t, H in (("q", Hq), ("k", Hk), ("qo", Hq), ("ko", Hk)):
                ints.update({f"stride_{t}b": S * H * D, f"stride_{t}h": D, f"stride_{t}s": H * D,
                             f"stride_{t}d": 1})
            for t in ("c", "s"):
                ints.update({f"stride_{t}b": S * D if batched else 0, f"stride_{t}s": D, f"stride_{t}d": 1})
            div16 = tuple(a for a, v in ints.items() if v != 1 and v % 16 == 0)
            sig = {a: "*" + dt for a in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr")}
            sig.update({"S": "i32", "Hq": "i32", "Hk": "i32"})
            sig.update({a: "i32" for a, v in ints.items() if v != 1})
            cx = {a: 1 for a, v in ints.items() if v == 1}
            cx.update(BLOCK_H=bh, BLOCK_HALF=bhalf, BLOCK_PASS=bpass)
            key = (dt, tuple(cx.items()), nw, div16)
            if key not in specs:
                tags = [f"BLOCK_H={bh}", f"BLOCK_HALF={bhalf}", f"warps={nw}", dt]
                tags += [f"{a}%16!=0" for a, v in ints.items() if v % 16 and v != 1]
                specs[key] = CompileSpec(f"rope[{','.join(tags)}]", fn, sig, cx, nw, 3,
                                         {"divisible_by_16": div16, "serves": []})
            specs[key].meta["serves"] += [x for x in layouts if x not in specs[key].meta["serves"]]
    return list(specs.values())
