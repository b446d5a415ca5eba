"""Paged KV cache writes: ``reshape_and_cache`` (new tokens' K/V into their slots) and ``copy_blocks`` (whole pages,
for copy-on-write). Triton kernels and their launchers; the caller (``llmkern.paged_ops``) validated everything.

Pages are ``[num_blocks, BLOCK_SIZE, H, D]`` (NHD) with arbitrary strides; slot = block * BLOCK_SIZE + offset.
One program moves ``[BLOCK_H, BLOCK_D]`` of one token (all of its heads when they fit ~4K elements), so a token's
row is read once and written once. Page offsets are computed in int64: ``num_blocks * BLOCK_SIZE * H * D`` passes
2^31 for big pools.
"""

import triton
import triton.language as tl

from llmkern.kernels import _launch
from llmkern.kernels._specs import CompileSpec

_TILE_ELEMS = 4096


@triton.jit(do_not_specialize=("num_slots", "H", "stride_kt", "stride_vt"))
def _reshape_and_cache_kernel(
    key_ptr,  # [T, H, D] strided
    value_ptr,  # [T, H, D] strided
    kc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    vc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    slot_ptr,  # [T] int64; < 0 = padding token; >= num_slots: skipped (see reshape_and_cache_fwd)
    num_slots,  # num_blocks * BLOCK_SIZE
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
    if (slot >= 0) & (slot < num_slots):
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        mask = (hs < H)[:, None] & (ds < D)[None, :]
        k = tl.load(key_ptr + t * stride_kt + hs[:, None] * stride_kh + ds[None, :] * stride_kd, mask=mask)
        v = tl.load(value_ptr + t * stride_vt + hs[:, None] * stride_vh + ds[None, :] * stride_vd, mask=mask)
        kc = kc_ptr + blk * stride_kcb + off * stride_kcs
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs
        tl.store(kc + hs[:, None] * stride_kch + ds[None, :] * stride_kcd, k, mask=mask)
        tl.store(vc + hs[:, None] * stride_vch + ds[None, :] * stride_vcd, v, mask=mask)


@triton.jit(do_not_specialize=("num_blocks", "H"))
def _copy_blocks_kernel(
    kc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    vc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    src_ptr,  # [n] int64 page ids; a pair with an id outside [0, num_blocks) is skipped (see copy_blocks_fwd)
    dst_ptr,  # [n] int64 page ids
    num_blocks,
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
    mask = mask & (src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks)
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


def reshape_and_cache_grid(T: int, H: int, D: int) -> tuple:
    return (T, triton.cdiv(H, cache_tile_config(H, D)["BLOCK_H"]))


def copy_blocks_grid(n: int, block_size: int, H: int, D: int) -> tuple:
    return (n, block_size * triton.cdiv(H, cache_tile_config(H, D)["BLOCK_H"]))


def reshape_and_cache_fwd(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Launch ``_reshape_and_cache_kernel`` over (token, head tile).

    A slot past the pool (``>= num_blocks * block_size``) is skipped, never written out of bounds: on CUDA tensors
    the public op cannot check the mapping without a device sync (it stays CUDA-graph capturable), so the kernel
    guards each write, as the CUDA kernel does. On CPU tensors ``llmkern.paged_ops`` raises before launching."""
    T, H, D = key.shape
    cfg = cache_tile_config(H, D)
    grid = reshape_and_cache_grid(T, H, D)
    with _launch.device_guard(k_cache):
        _launch.launch(
            _reshape_and_cache_kernel, grid, key, value, k_cache, v_cache, slot_mapping,
            k_cache.shape[0] * k_cache.shape[1], H, D, *key.stride(), *value.stride(), *k_cache.stride(),
            *v_cache.stride(),
            BLOCK_SIZE=k_cache.shape[1], BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )


def copy_blocks_fwd(k_cache, v_cache, src, dst) -> None:
    """Launch ``_copy_blocks_kernel`` over (pair, token row x head tile).

    A pair whose source or destination is not a block of the pool is skipped, never copied out of bounds (on CUDA
    tensors the public op cannot read the ids without a sync; on CPU tensors ``llmkern.paged_ops`` raises first)."""
    nb, bs, H, D = k_cache.shape
    cfg = cache_tile_config(H, D)
    num_hb = triton.cdiv(H, cfg["BLOCK_H"])
    grid = copy_blocks_grid(src.shape[0], bs, H, D)
    with _launch.device_guard(k_cache):
        _launch.launch(
            _copy_blocks_kernel, grid, k_cache, v_cache, src, dst, nb, H, D, *k_cache.stride(), *v_cache.stride(),
            NUM_HB=num_hb, BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        )


# --------------------------------------------------------------------------------------------------------------------
# Compile specs (kernels/_specs.py): every config the heuristic picks for the supported head layouts.

_TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def compile_specs() -> list:
    """The configs ``cache_tile_config`` picks for the (Hkv, head_dim) of every layout in ``kernels/_layouts.py``
    (no other input changes them), page sizes 16 and 1, fp32/fp16/bf16; one spec per distinct compiled kernel."""
    from llmkern.kernels import _layouts as L

    specs = {}
    for dt, ptr in _TY.items():
        for lname, _, H, D, _, _ in L.head_layouts():
            cfg = cache_tile_config(H, D)
            tile = dict(BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"])
            strides_c = {f"stride_{c}{s}": "i32" for c in ("kc", "vc") for s in "bsh"}
            # Contiguous [T, H, D] key/value and pages: every cache stride is a multiple of D (all of which are
            # multiples of 16 here), like D itself.
            div = tuple(strides_c) + ("D", "stride_kh", "stride_vh")
            for bs in L.BLOCK_SIZES:
                sig = {"key_ptr": ptr, "value_ptr": ptr, "kc_ptr": ptr, "vc_ptr": ptr, "slot_ptr": "*i64",
                       "num_slots": "i32", "H": "i32", "D": "i32", "stride_kt": "i32", "stride_kh": "i32",
                       "stride_vt": "i32", "stride_vh": "i32", **strides_c}
                const = {"stride_kd": 1, "stride_vd": 1, "stride_kcd": 1, "stride_vcd": 1, "BLOCK_SIZE": bs, **tile}
                name = f"reshape_and_cache[BLOCK_H={cfg['BLOCK_H']},BLOCK_D={cfg['BLOCK_D']},BLOCK_SIZE={bs},{dt}]"
                spec = specs.setdefault(name, CompileSpec(
                    name=name, fn=_reshape_and_cache_kernel, signature=sig, constexprs=const,
                    num_warps=cfg["num_warps"], meta={"divisible_by_16": div, "serves": []}))
                spec.meta["serves"].append(lname)
            sig = {"kc_ptr": ptr, "vc_ptr": ptr, "src_ptr": "*i64", "dst_ptr": "*i64", "num_blocks": "i32",
                   "H": "i32", "D": "i32",
                   **strides_c}
            const = {"stride_kcd": 1, "stride_vcd": 1, "NUM_HB": triton.cdiv(H, cfg["BLOCK_H"]), **tile}
            name = f"copy_blocks[BLOCK_H={cfg['BLOCK_H']},BLOCK_D={cfg['BLOCK_D']},NUM_HB={const['NUM_HB']},{dt}]"
            spec = specs.setdefault(name, CompileSpec(
                name=name, fn=_copy_blocks_kernel, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                meta={"divisible_by_16": tuple(strides_c) + ("D",), "serves": []}))
            spec.meta["serves"].append(lname)
    return list(specs.values())
