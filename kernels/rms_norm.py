"""RMSNorm and residual-add + RMSNorm: Triton kernels and their launchers.

Shapes: the launchers see a 2-D view ``[M, N]`` (M rows = tokens, N = hidden size); rows may be strided
(``stride_m``) and so may columns (``stride_n``; Triton specialises a stride of 1, so the
common case costs nothing). One program normalises ``BLOCK_M`` rows; each row is
loaded whole (``BLOCK_N = next_pow2(N)``), so memory is read once and written once.

Casting order follows Hugging Face eager exactly (STYLE.md #7):
  * Llama/Qwen2 (``OFFSET == 0``): ``w * (x_f32 * rstd).to(x.dtype)`` — the normalised value is rounded to the
    input dtype before the weight multiply.
  * Gemma (``OFFSET != 0``): ``((x_f32 * rstd) * (OFFSET + w_f32)).to(x.dtype)`` — fp32 throughout.
"""

import triton
import triton.language as tl

# A row longer than this does not fit one tile; no supported model comes near it (Llama-3-70B hidden is 8192).
MAX_N = 65536


@triton.jit
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
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    # int64 row offsets: M * stride can pass 2^31 for long prefills with wide rows.
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols * stride_w, mask=col_mask, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    h = xf * rstd[:, None]
    if OFFSET == 0.0:
        y = h.to(x.dtype).to(tl.float32) * w[None, :]
    else:
        y = h * (OFFSET + w[None, :])
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
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
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    r = tl.load(r_ptr + rows64[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols * stride_w, mask=cols < N, other=0.0).to(tl.float32)
    # Round the sum to the storage dtype first: eager normalises the rounded residual, and so must we.
    s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    tl.store(ro_ptr + rows64[:, None] * stride_rom + cols[None, :] * stride_ron, s, mask=mask)
    sf = s.to(tl.float32)
    var = tl.sum(sf * sf, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = (sf * rstd[:, None]).to(x.dtype).to(tl.float32) * w[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm_config(M: int, N: int) -> dict:
    """Launch config for an ``[M, N]`` norm: ``BLOCK_N``, ``BLOCK_M``, ``num_warps``.

    Decode has few rows (batch x 1), prefill thousands; both want ~4K elements per program so that narrow rows
    (Qwen3's per-head q/k norm, N = 128) still give each warp enough work, and wide rows (N = 8192) get 8+ warps
    without spilling (at most 32 fp32 values of x per thread).
    """
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(M)))
    # Keep enough programs to fill a GPU when there are many rows but not when there are few.
    num_warps = max(1, min(16, block_m * block_n // 256))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


def rms_norm_fwd(x2d, weight, out2d, eps: float, offset: float) -> None:
    """Launch ``_rms_norm_kernel`` on 2-D views; the caller validated shapes, dtypes and devices."""
    M, N = x2d.shape
    cfg = rms_norm_config(M, N)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _rms_norm_kernel[grid](
        x2d, weight, out2d, M, N, x2d.stride(0), x2d.stride(1), out2d.stride(0), out2d.stride(1),
        weight.stride(0), eps,
        OFFSET=float(offset), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )


def fused_add_rms_norm_fwd(x2d, r2d, weight, out2d, res_out2d, eps: float) -> None:
    """Launch ``_fused_add_rms_norm_kernel`` on 2-D views; the caller validated everything."""
    M, N = x2d.shape
    cfg = rms_norm_config(M, N)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _fused_add_rms_norm_kernel[grid](
        x2d, r2d, weight, out2d, res_out2d, M, N,
        *x2d.stride(), *r2d.stride(), *out2d.stride(), *res_out2d.stride(), weight.stride(0), eps,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )



# Shapes of the supported models, for the GPU compile check (llmkern.inspect). Hidden sizes: SmolLM2 576,
# Qwen2.5-0.5B 896, 2048, Qwen2.5-7B 3584, Llama/Mistral 4096, 5120, 8192. Qwen3's per-head q/k norm has N = 128 and
# tokens x heads rows, with 8..40 heads.
_SPEC_HIDDEN = (576, 896, 2048, 3584, 4096, 5120, 8192)
_SPEC_TOKENS = (1, 2, 8, 64, 512, 4096, 16384)
_SPEC_QK_NORM_HEADS = (8, 16, 32, 40)
_SPEC_DTYPES = ("fp32", "fp16", "bf16")


def compile_specs() -> list:
    """Every (kernel, launch config, dtype) ``rms_norm_config`` picks for the supported models' shapes, specialised
    as a launch on contiguous rows is: unit strides (and ``M == 1``) become constants, integer arguments that are
    multiples of 16 are listed in ``meta["divisible_by_16"]``. Weight and output share the input dtype (an HF model
    cast to one dtype). ``OFFSET = 1.0`` (Gemma-style) is compiled in bf16 only: no supported model uses it."""
    from ._specs import CompileSpec

    shapes = [(m, n) for n in _SPEC_HIDDEN for m in _SPEC_TOKENS]
    shapes += [(t * h, 128) for h in _SPEC_QK_NORM_HEADS for t in _SPEC_TOKENS]
    variants = (  # (kernel, name, number of pointer args, OFFSET values by dtype)
        (_rms_norm_kernel, "rms_norm", 3, lambda dt: (0.0, 1.0) if dt == "bf16" else (0.0,)),
        (_fused_add_rms_norm_kernel, "fused_add_rms_norm", 5, lambda dt: (None,)),
    )
    specs = {}
    for fn, kname, n_ptr, offsets in variants:
        for dt in _SPEC_DTYPES:
            for M, N in shapes:
                cfg = rms_norm_config(M, N)
                bm, bn, nw = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]
                # Contiguous rows: row strides N, column and weight strides 1.
                ints = {"M": M, "N": N}
                strides = [a for a in fn.arg_names if a.startswith("stride_")]
                ints.update({a: 1 if a.endswith("n") or a == "stride_w" else N for a in strides})
                div16 = tuple(a for a, v in ints.items() if v != 1 and v % 16 == 0)
                sig = {a: "*" + dt for a in fn.arg_names[:n_ptr]}
                sig.update({a: "i32" for a, v in ints.items() if v != 1})
                sig["eps"] = "fp32"
                for off in offsets(dt):
                    cx = {a: 1 for a, v in ints.items() if v == 1}
                    cx.update({} if off is None else {"OFFSET": off})
                    cx.update(BLOCK_M=bm, BLOCK_N=bn)
                    key = (kname, dt, tuple(cx.items()), nw, div16)
                    if key not in specs:
                        tags = [f"BLOCK_M={bm}", f"BLOCK_N={bn}", f"warps={nw}", dt] + (["OFFSET=1"] if off else [])
                        tags += [f"{a}=1" for a, v in ints.items() if v == 1 and a[:7] != "stride_"]
                        tags += [f"{a}%16!=0" for a, v in ints.items() if v % 16 and v != 1]
                        specs[key] = CompileSpec(f"{kname}[{','.join(tags)}]", fn, sig, cx, nw, 3,
                                                 {"divisible_by_16": div16, "shapes": []})
                    specs[key].meta["shapes"].append(f"M={M},N={N}")
    return list(specs.values())
