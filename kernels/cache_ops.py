"""Paged KV cache writes: ``reshape_and_cache`` (new tokens' K/V into their slots) and ``copy_blocks`` (whole pages,
for copy-on-write). Triton kernels and their launchers; the caller (``llmkern.paged_ops``) validated everything.

Pages are ``[num_blocks, BLOCK_SIZE, H, D]`` (NHD) with arbitrary strides; slot = block * BLOCK_SIZE + offset.
One program moves ``[BLOCK_H, BLOCK_D]`` of one token (all of its heads when they fit ~4K elements), so a token's
row is read once and written once. Page offsets are computed in int64: ``num_blocks * BLOCK_SIZE * H * D`` passes
2^31 for big pools.
"""

import triton
import triton.language as tl

from llmkern.kernels._specs import CompileSpec

_TILE_ELEMS = 4096


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [T, H, D] strided
    value_ptr,  # [T, H, D] strided
    kc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    vc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    slot_ptr,  # [T] int64; < 0 = padding token
    H,
    D,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        mask = (hs < H)[:, None] & (ds < D)[None, :]
        k = tl.load(key_ptr + t * stride_kt + hs[:, None] * stride_kh + ds[None, :] * stride_kd, mask=mask)
        v = tl.load(value_ptr + t * stride_vt + hs[:, None] * stride_vh + ds[None, :] * stride_vd, mask=mask)
        kc = kc_ptr + blk * stride_kcb + off * stride_kcs
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs
        tl.store(kc + hs[:, None] * stride_kch + ds[None, :] * stride_kcd, k, mask=mask)
        tl.store(vc + hs[:, None] * stride_vch + ds[None, :] * stride_vcd, v, mask=mask)


@triton.jit
def _copy_blocks_kernel(
    kc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    vc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    src_ptr,  # [n] int64 page ids
    dst_ptr,  # [n] int64 page ids
    H,
    D,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    NUM_HB: tl.constexpr,  # head tiles per token = cdiv(H, BLOCK_H)
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    r = tl.program_id(1)  # token row in the page * NUM_HB + head tile
    row = (r // NUM_HB).to(tl.int64)
    hs = (r % NUM_HB) * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    mask = (hs < H)[:, None] & (ds < D)[None, :]
    src = tl.load(src_ptr + i)
    dst = tl.load(dst_ptr + i)
    k_off = row * stride_kcs + hs[:, None] * stride_kch + ds[None, :] * stride_kcd
    v_off = row * stride_vcs + hs[:, None] * stride_vch + ds[None, :] * stride_vcd
    k = tl.load(kc_ptr + src * stride_kcb + k_off, mask=mask)
    v = tl.load(vc_ptr + src * stride_vcb + v_off, mask=mask)
    tl.store(kc_ptr + dst * stride_kcb + k_off, k, mask=mask)
    tl.store(vc_ptr + dst * stride_vcb + v_off, v, mask=mask)


def cache_tile_config(H: int, D: int) -> dict:
    """``BLOCK_D = next_pow2(D)``; ``BLOCK_H`` as many heads as fit ~4K elements (all of them for every supported
    model: 8 x 128 = 1024); ``num_warps`` so each thread moves 8-16 elements."""
    block_d = triton.next_power_of_2(D)
    block_h = max(1, min(triton.next_power_of_2(H), _TILE_ELEMS // block_d))
    num_warps = max(1, min(8, block_h * block_d // 512))
    return {"BLOCK_H": block_h, "BLOCK_D": block_d, "num_warps": num_warps}


def reshape_and_cache_fwd(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Launch ``_reshape_and_cache_kernel`` over (token, head tile)."""
    T, H, D = key.shape
    cfg = cache_tile_config(H, D)
    grid = (T, triton.cdiv(H, cfg["BLOCK_H"]))
    _reshape_and_cache_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping, H, D,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )


def copy_blocks_fwd(k_cache, v_cache, src, dst) -> None:
    """Launch ``_copy_blocks_kernel`` over (pair, token row x head tile)."""
    _, bs, H, D = k_cache.shape
    cfg = cache_tile_config(H, D)
    num_hb = triton.cdiv(H, cfg["BLOCK_H"])
    grid = (src.shape[0], bs * num_hb)
    _copy_blocks_kernel[grid](
        k_cache, v_cache, src, dst, H, D, *k_cache.stride(), *v_cache.stride(),
        NUM_HB=num_hb, BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )


# --------------------------------------------------------------------------------------------------------------------
# Compile specs (kernels/_specs.py): every config the heuristic picks for the supported head layouts.

_TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
# (Hkv, D) of SmolLM2 (3/64), Qwen2.5-0.5B (2/64), Qwen2.5-7B (4/128), Llama-3-8B (8/128), Llama-2-7B (32/128),
# and the head_dim 80/96/256 variants.
_LAYOUTS = [(3, 64), (2, 64), (4, 128), (8, 128), (32, 128), (4, 80), (4, 96), (8, 256)]


def compile_specs() -> list:
    specs = []
    for dt, ptr in _TY.items():
        for H, D in _LAYOUTS:
            cfg = cache_tile_config(H, D)
            tile = dict(BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"])
            strides_c = {f"stride_{c}{s}": "i32" for c in ("kc", "vc") for s in "bsh"}
            for bs in (16, 1):
                sig = {"key_ptr": ptr, "value_ptr": ptr, "kc_ptr": ptr, "vc_ptr": ptr, "slot_ptr": "*i64",
                       "H": "i32", "D": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32",
                       "stride_vh": "i32", **strides_c}
                const = {"stride_kd": 1, "stride_vd": 1, "stride_kcd": 1, "stride_vcd": 1, "BLOCK_SIZE": bs, **tile}
                specs.append(CompileSpec(
                    name=f"reshape_and_cache[H={H},D={D},BLOCK_SIZE={bs},{dt}]", fn=_reshape_and_cache_kernel,
                    signature=sig, constexprs=const, num_warps=cfg["num_warps"], meta={"Hkv": H, "D": D}))
            sig = {"kc_ptr": ptr, "vc_ptr": ptr, "src_ptr": "*i64", "dst_ptr": "*i64", "H": "i32", "D": "i32",
                   **strides_c}
            const = {"stride_kcd": 1, "stride_vcd": 1, "NUM_HB": triton.cdiv(H, cfg["BLOCK_H"]), **tile}
            specs.append(CompileSpec(name=f"copy_blocks[H={H},D={D},{dt}]", fn=_copy_blocks_kernel, signature=sig,
                                     constexprs=const, num_warps=cfg["num_warps"], meta={"Hkv": H, "D": D}))
    return specs
