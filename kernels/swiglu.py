"""SwiGLU activation: ``silu(gate) * up`` as Hugging Face's LlamaMLP computes it.

Eager runs ``act_fn(gate)`` as its own op, which rounds silu's result to the storage dtype before the multiply;
the kernel rounds at the same point (STYLE.md #7), so in fp16/bf16 it matches eager to the bit wherever the
fp32 silu does. Launchers see 2-D views ``[M, I]``; gate and up may be any strided views — in particular the two
halves of one ``[M, 2I]`` gate_up projection, which is how ``silu_and_mul_fused`` reaches this kernel without a copy.
"""

import triton
import triton.language as tl


@triton.jit
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
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gi, mask=mask, other=0.0)
    u = tl.load(u_ptr + rows[:, None] * stride_um + cols[None, :] * stride_ui, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    out = act.to(tl.float32) * u.to(tl.float32)
    tl.store(o_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oi, out.to(o_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_config(M: int, I: int) -> dict:
    """2-D tiles of up to 2K elements: wide rows split across programs (decode: M = batch, I = 4864..28672),
    many short rows packed into one program (prefill)."""
    block_i = min(1024, triton.next_power_of_2(I))
    block_m = max(1, min(triton.next_power_of_2(M), 2048 // block_i))
    num_warps = max(1, min(8, block_m * block_i // 256))
    return {"BLOCK_M": block_m, "BLOCK_I": block_i, "num_warps": num_warps}


def silu_and_mul_fwd(gate2d, up2d, out2d) -> None:
    """Launch ``_silu_and_mul_kernel`` on 2-D views; the caller validated everything."""
    M, I = gate2d.shape
    cfg = silu_and_mul_config(M, I)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(I, cfg["BLOCK_I"]))
    _silu_and_mul_kernel[grid](
        gate2d, up2d, out2d, M, I, *gate2d.stride(), *up2d.stride(), *out2d.stride(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_I=cfg["BLOCK_I"], num_warps=cfg["num_warps"],
    )


# Shapes of the supported models, for the GPU compile check (llmkern.inspect): intermediate sizes of SmolLM2 (1536),
# Qwen2.5-0.5B (4864), Llama-2-7B (11008), Llama-3-8B/Mistral-7B (14336), Qwen2.5-7B (18944), Llama-3-70B (28672).
_SPEC_INTERMEDIATE = (1536, 4864, 11008, 14336, 18944, 28672)
_SPEC_TOKENS = (1, 2, 8, 64, 512, 4096, 16384)
_SPEC_DTYPES = ("fp32", "fp16", "bf16")


def compile_specs() -> list:
    """Every (launch config, dtype) ``silu_and_mul_config`` picks for the supported models' shapes, specialised as a
    launch on contiguous ``[M, I]`` rows is (``M == 1`` and unit strides become constants, multiples of 16 are listed
    in ``meta["divisible_by_16"]``). The fused ``[M, 2I]`` gate/up halves specialise identically: 2I and I are both
    multiples of 16 for every supported I, and so is the up half's byte offset."""
    from ._specs import CompileSpec

    fn = _silu_and_mul_kernel
    specs = {}
    for dt in _SPEC_DTYPES:
        for I in _SPEC_INTERMEDIATE:
            for M in _SPEC_TOKENS:
                cfg = silu_and_mul_config(M, I)
                bm, bi, nw = cfg["BLOCK_M"], cfg["BLOCK_I"], cfg["num_warps"]
                ints = {"M": M, "I": I}
                ints.update({a: 1 if a[-1] == "i" else I for a in fn.arg_names if a[:7] == "stride_"})
                div16 = tuple(a for a, v in ints.items() if v != 1 and v % 16 == 0)
                sig = {a: "*" + dt for a in ("g_ptr", "u_ptr", "o_ptr")}
                sig.update({a: "i32" for a, v in ints.items() if v != 1})
                cx = {a: 1 for a, v in ints.items() if v == 1}
                cx.update(BLOCK_M=bm, BLOCK_I=bi)
                key = (dt, tuple(cx.items()), nw, div16)
                if key not in specs:
                    tags = [f"BLOCK_M={bm}", f"BLOCK_I={bi}", f"warps={nw}", dt]
                    tags += [f"{a}=1" for a, v in ints.items() if v == 1 and a[:7] != "stride_"]
                    tags += [f"{a}%16!=0" for a, v in ints.items() if v % 16 and v != 1]
                    specs[key] = CompileSpec(f"silu_and_mul[{','.join(tags)}]", fn, sig, cx, nw, 3,
                                             {"divisible_by_16": div16, "shapes": []})
                specs[key].meta["shapes"].append(f"M={M},I={I}")
    return list(specs.values())
