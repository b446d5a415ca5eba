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
