"""SwiGLU activation: ``silu(gate) * up`` as Hugging Face's LlamaMLP computes it.

Eager runs ``act_fn(gate)`` as its own op, which rounds silu's result to the storage dtype before the multiply;
the kernel rounds at the same point (docs/design.md, "Numerics"), so in fp16/bf16 it matches eager to the bit
wherever the fp32 silu does. Launchers see 2-D views ``[M, I]``; gate and up may be any strided views — in
particular the two halves of one ``[M, 2I]`` gate_up projection, which is how ``silu_and_mul_fused`` reaches this
kernel without a copy.
"""

import triton
import triton.language as tl

from llmkern.kernels import _launch


@triton.jit(do_not_specialize=("M",))  # M == 1 (one decode token) gains nothing from a separate compile
def _silu_and_mul_kernel(
    g_ptr,  # [M, I] gate
    u_ptr,  # [M, I] up
    o_ptr,  # [M, I] out
    M,
    I,
    stride_gm,
    stride_gi,
    stride_um,
    stride_ui,
    stride_om,
    stride_oi,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)  # rows on x: the only grid axis past 65535
    pid_i = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gi, mask=mask, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :] * stride_ui, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    # div.rn: `/` compiles to div.full.f32 (2 ulp), too coarse for fp32's tolerance on top of exp's ex2.approx.
    act = tl.math.div_rn(gf, 1.0 + tl.exp(-gf)).to(g.dtype)
    out = act.to(tl.float32) * u.to(tl.float32)
    tl.store(o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oi, out.to(o_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_config(M: int, I: int) -> dict:
    """2-D tiles of up to 2K elements: wide rows split across programs (decode: M = batch, I = 4864..28672),
    many short rows packed into one program (prefill)."""
    block_i = min(1024, triton.next_power_of_2(I))
    block_m = max(1, min(triton.next_power_of_2(M), 2048 // block_i))
    num_warps = max(1, min(8, block_m * block_i // 256))
    return {"BLOCK_M": block_m, "BLOCK_I": block_i, "num_warps": num_warps}


def silu_and_mul_grid(M: int, I: int) -> tuple:
    cfg = silu_and_mul_config(M, I)
    return (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(I, cfg["BLOCK_I"]))


def silu_and_mul_fwd(gate2d, up2d, out2d) -> None:
    """Launch ``_silu_and_mul_kernel`` on 2-D views; the caller validated everything."""
    M, I = gate2d.shape
    cfg = silu_and_mul_config(M, I)
    grid = silu_and_mul_grid(M, I)
    with _launch.device_guard(gate2d):
        _launch.launch(
            _silu_and_mul_kernel, grid, gate2d, up2d, out2d, M, I, *gate2d.stride(), *up2d.stride(), *out2d.stride(),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_I=cfg["BLOCK_I"], num_warps=cfg["num_warps"],
        )


_SPEC_DTYPES = ("fp32", "fp16", "bf16")


def compile_specs() -> list:
    """Every (launch config, dtype) ``silu_and_mul_config`` picks for the layouts of ``kernels/_layouts.py`` (their
    intermediate sizes; every decode batch and prefill up to batch x max context tokens), specialised as a launch on
    contiguous ``[M, I]`` rows is (unit strides become constants, multiples of 16 are listed in
    ``meta["divisible_by_16"]``; ``M`` is never specialised). The fused ``[M, 2I]`` gate/up halves specialise
    identically: 2I and I are both multiples of 16 for every supported I, and so is the up half's byte offset."""
    from ._specs import CompileSpec
    from llmkern.kernels import _layouts as L

    fn = _silu_and_mul_kernel
    served = {}
    for lay in L.LAYOUTS:
        for M in L.token_counts(L.MAX_BATCH * lay.max_pos):
            key = (lay.intermediate, "i64" if M >= 2**31 else "i32", tuple(silu_and_mul_config(M, lay.intermediate).items()))
            served.setdefault(key, [])
            if lay.name not in served[key]:
                served[key].append(lay.name)
    specs = {}
    for dt in _SPEC_DTYPES:
        for (I, m_ty, cfg_items), layouts in served.items():
            cfg = dict(cfg_items)
            bm, bi, nw = cfg["BLOCK_M"], cfg["BLOCK_I"], cfg["num_warps"]
            ints = {"I": I}
            ints.update({a: 1 if a[-1] == "i" else I for a in fn.arg_names if a[:7] == "stride_"})
            div16 = tuple(a for a, v in ints.items() if v != 1 and v % 16 == 0)
            sig = {a: "*" + dt for a in ("g_ptr", "u_ptr", "o_ptr")}
            sig["M"] = m_ty
            sig.update({a: "i32" for a, v in ints.items() if v != 1})
            cx = {a: 1 for a, v in ints.items() if v == 1}
            cx.update(BLOCK_M=bm, BLOCK_I=bi)
            key = (dt, m_ty, tuple(cx.items()), nw, div16)
            if key not in specs:
                tags = [f"BLOCK_M={bm}", f"BLOCK_I={bi}", f"warps={nw}", dt] + (["M:i64"] if m_ty == "i64" else [])
                tags += [f"{a}%16!=0" for a, v in ints.items() if v % 16 and v != 1]
                specs[key] = CompileSpec(f"silu_and_mul[{','.join(tags)}]", fn, sig, cx, nw, 3,
                                         {"divisible_by_16": div16, "serves": []})
            specs[key].meta["serves"] += [x for x in layouts if x not in specs[key].meta["serves"]]
    return list(specs.values())
