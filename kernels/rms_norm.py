"""RMSNorm and residual-add + RMSNorm: Triton kernels and their launchers.

Shapes: the launchers see a 2-D view ``[M, N]`` (M rows = tokens, N = hidden size); rows may be strided
(``stride_m``) and so may columns (``stride_n``; Triton specialises a stride of 1, so the
common case costs nothing). One program normalises ``BLOCK_M`` rows; a row up to ``MAX_TILE_N`` wide is loaded
whole (``BLOCK_N = next_pow2(N)``), so memory is read once and written once. A wider row (``CHUNKED``) is walked
in ``MAX_TILE_N`` chunks twice, sum of squares then output (the second pass re-reads the row, from L2), so
registers stay those of one chunk: a whole 32K-wide row spilled.

Rounding points follow Hugging Face eager (docs/design.md, "Numerics"; the fp32 arithmetic between them, the sum of
squares' order and ``rstd``, is this kernel's own, so a rare element can differ from eager's by one ulp):
  * Llama/Qwen2 (``OFFSET == 0``): ``w * (x_f32 * rstd).to(x.dtype)`` — the normalised value is rounded to the
    input dtype before the weight multiply.
  * Gemma (``OFFSET != 0``): ``((x_f32 * rstd) * (OFFSET + w_f32)).to(x.dtype)`` — fp32 throughout.
"""

import triton
import triton.language as tl

from llmkern.kernels import _launch

# Widest row llmkern.ops accepts; no supported model comes near it (Llama-3-70B hidden is 8192).
MAX_N = 65536
# Widest row held in registers as one tile (16 warps, 16 fp32 values per thread); wider rows loop over chunks.
MAX_TILE_N = 8192


@triton.jit
def _rstd(sum_sq, N, eps):
    """``1 / sqrt(sum_sq / N + eps)`` correctly rounded at each step (div.rn, sqrt.rn), once per row: ``/`` and
    ``tl.sqrt`` compile to div.full / sqrt.approx (1-2 ulp each), which would use up fp32's tolerance."""
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(sum_sq, N * 1.0) + eps))


@triton.jit(do_not_specialize=("M",))  # M == 1 (one decode token) gains nothing from a separate compile
def _rms_norm_kernel(
    x_ptr,  # [M, N] input, rows strided by stride_xm
    w_ptr,  # [N] weight
    y_ptr,  # [M, N] output, rows strided by stride_ym
    M,
    N,
    stride_xm,
    stride_xn,
    stride_ym,
    stride_yn,
    stride_w,
    eps,
    OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,  # N > BLOCK_N: two passes over BLOCK_N chunks
):
    pid = tl.program_id(0).to(tl.int64)  # int64: Qwen3's per-head q/k norm can pass 2^31 rows
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    rows64 = rows  # int64 row offsets: M * stride can pass 2^31 for long prefills with wide rows
    if CHUNKED:
        ss = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            xf = tl.load(x_ptr + rows64[:, None] * stride_xm + c[None, :] * stride_xn, mask=mask, other=0.0)
            xf = xf.to(tl.float32)
            ss += xf * xf
        rstd = _rstd(tl.sum(ss, axis=1), N, eps)
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + c[None, :] * stride_xn, mask=mask, other=0.0)
            w = tl.load(w_ptr + c * stride_w, mask=c < N, other=0.0).to(tl.float32)
            h = x.to(tl.float32) * rstd[:, None]
            if OFFSET == 0.0:
                y = h.to(x.dtype).to(tl.float32) * w[None, :]
            else:
                y = h * (OFFSET + w[None, :])
            tl.store(y_ptr + rows64[:, None] * stride_ym + c[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
                     mask=mask)
        return
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]

    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    rstd = _rstd(tl.sum(xf * xf, axis=1), N, eps)
    h = xf * rstd[:, None]
    if OFFSET == 0.0:
        y = h.to(x.dtype).to(tl.float32) * w[None, :]
    else:
        y = h * (OFFSET + w[None, :])
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=("M",))
def _fused_add_rms_norm_kernel(
    x_ptr,  # [M, N] new activations (e.g. attention output)
    r_ptr,  # [M, N] residual stream
    w_ptr,  # [N] weight
    y_ptr,  # [M, N] normalised output
    ro_ptr,  # [M, N] residual out = x + r, rounded to the input dtype as eager's `residual + hidden` is
    M,
    N,
    stride_xm,
    stride_xn,
    stride_rm,
    stride_rn,
    stride_ym,
    stride_yn,
    stride_rom,
    stride_ron,
    stride_w,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,  # N > BLOCK_N: two passes over BLOCK_N chunks
):
    pid = tl.program_id(0).to(tl.int64)  # int64: Qwen3's per-head q/k norm can pass 2^31 rows
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    if CHUNKED:
        # Pass 1 writes the rounded residual and sums its squares; pass 2 recomputes it from x and r (bit-equal)
        # rather than reading back what other threads of this program stored.
        ss = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            mask = (rows < M)[:, None] & (c < N)[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + c[None, :] * stride_xn, mask=mask, other=0.0)
            r = tl.load(r_ptr + rows64[:, None] * stride_rm + c[None, :] * stride_rn, mask=mask, other=0.0)
            s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(ro_ptr + rows64[:, None] * stride_rom + c[None, :] * stride_ron, s, mask=mask)
            sf = s.to(tl.float32)
            ss += sf * sf
        rstd = _rstd(tl.sum(ss, axis=1), N, eps)
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            mask = (rows < M)[:, None] & (c < N)[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + c[None, :] * stride_xn, mask=mask, other=0.0)
            r = tl.load(r_ptr + rows64[:, None] * stride_rm + c[None, :] * stride_rn, mask=mask, other=0.0)
            w = tl.load(w_ptr + c * stride_w, mask=c < N, other=0.0).to(tl.float32)
            sf = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype).to(tl.float32)
            y = (sf * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]
            tl.store(y_ptr + rows64[:, None] * stride_ym + c[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
                     mask=mask)
        return
    mask = (rows < M)[:, None] & (cols < N)[None, :]

    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    r = tl.load(r_ptr + rows64[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols * stride_w, mask=cols < N, other=0.0).to(tl.float32)
    # Round the sum to the storage dtype first: eager normalises the rounded residual, and so must we.
    s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    tl.store(ro_ptr + rows64[:, None] * stride_rom + cols[None, :] * stride_ron, s, mask=mask)
    sf = s.to(tl.float32)
    rstd = _rstd(tl.sum(sf * sf, axis=1), N, eps)
    y = (sf * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_config(M: int, N: int) -> dict:
    """Launch config for an ``[M, N]`` norm: ``BLOCK_N``, ``BLOCK_M``, ``num_warps``, ``CHUNKED``.

    Decode has few rows (batch x 1), prefill thousands; both want ~4K elements per program so that narrow rows
    (Qwen3's per-head q/k norm, N = 128) still give each warp enough work, and wide rows (N = 8192) get 8+ warps
    without spilling (at most 32 fp32 values of x per thread). Rows wider than ``MAX_TILE_N`` are walked in chunks
    of ``MAX_TILE_N`` (``CHUNKED``), one row per program.
    """
    block_n = min(triton.next_power_of_2(N), MAX_TILE_N)
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(M)))
    # Keep enough programs to fill a GPU when there are many rows but not when there are few.
    num_warps = max(1, min(16, block_m * block_n // 256))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps, "CHUNKED": N > block_n}


def rms_norm_grid(M: int, N: int) -> tuple:
    return (triton.cdiv(M, rms_norm_config(M, N)["BLOCK_M"]),)


def rms_norm_fwd(x2d, weight, out2d, eps: float, offset: float) -> None:
    """Launch ``_rms_norm_kernel`` on 2-D views; the caller validated shapes, dtypes and devices."""
    M, N = x2d.shape
    cfg = rms_norm_config(M, N)
    grid = rms_norm_grid(M, N)
    with _launch.device_guard(x2d):
        _launch.launch(
            _rms_norm_kernel, grid, x2d, weight, out2d, M, N, x2d.stride(0), x2d.stride(1), out2d.stride(0),
            out2d.stride(1), weight.stride(0), eps,
            OFFSET=float(offset), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], CHUNKED=cfg["CHUNKED"],
            num_warps=cfg["num_warps"],
        )


def fused_add_rms_norm_fwd(x2d, r2d, weight, out2d, res_out2d, eps: float) -> None:
    """Launch ``_fused_add_rms_norm_kernel`` on 2-D views; the caller validated everything."""
    M, N = x2d.shape
    cfg = rms_norm_config(M, N)
    grid = rms_norm_grid(M, N)
    with _launch.device_guard(x2d):
        _launch.launch(
            _fused_add_rms_norm_kernel, grid, x2d, r2d, weight, out2d, res_out2d, M, N,
            *x2d.stride(), *r2d.stride(), *out2d.stride(), *res_out2d.stride(), weight.stride(0), eps,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], CHUNKED=cfg["CHUNKED"], num_warps=cfg["num_warps"],
        )



_SPEC_DTYPES = ("fp32", "fp16", "bf16")


def _spec_shapes():
    """``(layout, M, N)`` a norm launch sees for the layouts of ``kernels/_layouts.py``: the hidden size with every
    decode batch and prefill up to batch x max context tokens, Qwen3's per-head q/k norm (N = head_dim, tokens x
    heads rows), and the widest rows ``llmkern.ops`` accepts (up to ``MAX_N``, chunked)."""
    from llmkern.kernels import _layouts as L

    out = []
    for lay in L.LAYOUTS:
        tokens = L.token_counts(L.MAX_BATCH * lay.max_pos)
        out += [(lay.name, m, lay.hidden) for m in tokens]
        if lay.qk_norm:
            out += [(lay.name, m * h, lay.D) for m in tokens for h in (lay.Hq, lay.Hkv)]
    for n in (MAX_TILE_N + 16, 3 * MAX_TILE_N + 16, MAX_N):
        out += [("wide-rows", m, n) for m in (1, 2, 7, 4096)]
    return out


def compile_specs() -> list:
    """Every (kernel, launch config, dtype) ``rms_norm_config`` picks for the shapes of ``_spec_shapes()``,
    specialised as a launch on contiguous rows is (unit strides become constants, multiples of 16 are listed in
    ``meta["divisible_by_16"]``; ``M`` is never specialised). Weight and output share the input dtype (an HF model
    cast to one dtype). ``OFFSET = 1.0`` (Gemma-style) is compiled in bf16 only: no supported model uses it."""
    from ._specs import CompileSpec

    variants = (  # (kernel, name, number of pointer args, OFFSET values by dtype)
        (_rms_norm_kernel, "rms_norm", 3, lambda dt: (0.0, 1.0) if dt == "bf16" else (0.0,)),
        (_fused_add_rms_norm_kernel, "fused_add_rms_norm", 5, lambda dt: (None,)),
    )
    # What a launch specialises on, per shape: the config, N (its divisibility and the row strides') and M's type.
    served = {}
    for layout, M, N in _spec_shapes():
        cfg = rms_norm_config(M, N)
        key = (N, "i64" if M >= 2**31 else "i32", tuple(cfg.items()))
        served.setdefault(key, [])
        if layout not in served[key]:
            served[key].append(layout)
    specs = {}
    for fn, kname, n_ptr, offsets in variants:
        for dt in _SPEC_DTYPES:
            for (N, m_ty, cfg_items), layouts in served.items():
                cfg = dict(cfg_items)
                bm, bn, nw, ch = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["CHUNKED"]
                # Contiguous rows: row strides N, column and weight strides 1.
                ints = {"N": N}
                strides = [a for a in fn.arg_names if a.startswith("stride_")]
                ints.update({a: 1 if a.endswith("n") or a == "stride_w" else N for a in strides})
                div16 = tuple(a for a, v in ints.items() if v != 1 and v % 16 == 0)
                sig = {a: "*" + dt for a in fn.arg_names[:n_ptr]}
                sig["M"] = m_ty
                sig.update({a: "i32" for a, v in ints.items() if v != 1})
                sig["eps"] = "fp32"
                for off in offsets(dt):
                    cx = {a: 1 for a, v in ints.items() if v == 1}
                    cx.update({} if off is None else {"OFFSET": off})
                    cx.update(BLOCK_M=bm, BLOCK_N=bn, CHUNKED=ch)
                    key = (kname, dt, m_ty, tuple(cx.items()), nw, div16)
                    if key not in specs:
                        tags = [f"BLOCK_M={bm}", f"BLOCK_N={bn}", f"warps={nw}", dt] + (["OFFSET=1"] if off else [])
                        tags += (["CHUNKED"] if ch else []) + (["M:i64"] if m_ty == "i64" else [])
                        tags += [f"{a}%16!=0" for a, v in ints.items() if v % 16 and v != 1]
                        specs[key] = CompileSpec(f"{kname}[{','.join(tags)}]", fn, sig, cx, nw, 3,
                                                 {"divisible_by_16": div16, "serves": []})
                    specs[key].meta["serves"] += [x for x in layouts if x not in specs[key].meta["serves"]]
    return list(specs.values())
