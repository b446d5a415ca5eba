"""Paged KV cache writes: ``reshape_and_cache`` (new tokens' K/V into their slots) and ``copy_blocks`` (whole pages,
for copy-on-write). Triton kernels and their launchers; the caller (``llmkern.paged_ops``) validated everything.

Pages are ``[num_blocks, BLOCK_SIZE, H, D]`` (NHD) with arbitrary strides; slot = block * BLOCK_SIZE + offset.
One program moves ``[BLOCK_H, BLOCK_D]`` of one token (all of its heads when they fit ~4K elements), so a token's
row is read once and written once. Page offsets are computed in int64: ``num_blocks * BLOCK_SIZE * H * D`` passes
2^31 for big pools.

8-bit pages (int8 or fp8 e4m3fn, one fp16 scale per (token, head) in ``[num_blocks, BLOCK_SIZE, H]`` scales):
``_reshape_and_cache_q8_kernel`` quantizes each row on its way in, bit for bit as ``llmkern.reference.quantize_kv``
(div.rn divisions, round-to-nearest-even by integer and bit operations, so the interpreter, sm_80 and sm_90 agree;
fp8 pages are written through a uint8 view). ``copy_blocks`` copies bits: 1-byte pages through an int8 view, the
scales as ``[num_blocks, BLOCK_SIZE, H, 1]`` views.
"""

import torch
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


# 8-bit pages (``KV_QUANT`` 1: int8, 2: fp8 e4m3fn written as its bit pattern through a uint8 view of the pages).
# The scale strides are plain integers (any layout of ``[num_blocks, BLOCK_SIZE, H]``): one scale per row, so their
# specialisation would only multiply the compiled variants.
_Q8_NO_SPEC = ("num_slots", "H", "stride_kt", "stride_vt", "stride_ksb", "stride_kss", "stride_ksh", "stride_vsb",
               "stride_vss", "stride_vsh")


@triton.jit
def _f32_bits(x):
    return x.to(tl.int32, bitcast=True)


@triton.jit
def _quantize_rows(x, KV_QUANT: tl.constexpr):
    """``x [BLOCK_H, BLOCK_D]`` fp32 (masked lanes 0) -> (codes int32 ``[BLOCK_H, BLOCK_D]``: the int8 value, or the
    e4m3fn bit pattern 0..255; scales ``[BLOCK_H]`` fp16), exactly as ``llmkern.reference.quantize_kv``: the row's
    amax / QMAX correctly rounded to fp32, clamped, rounded to fp16 (RNE); ``x / s`` correctly rounded (div.rn, not
    the 2-ulp ``/``), clamped to +-QMAX, rounded to nearest even. Integer and bit operations only after the divide,
    so the interpreter and every GPU (sm_80 has no fp8 conversions) give the same bits."""
    QMAX: tl.constexpr = 127.0 if KV_QUANT == 1 else 448.0
    amax = tl.max(tl.abs(x), 1)
    s = tl.math.div_rn(amax, QMAX)
    s = tl.minimum(tl.maximum(s, 6.103515625e-05), 65504.0).to(tl.float16)  # [2^-14, fp16 max]
    y = tl.math.div_rn(x, s.to(tl.float32)[:, None])
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if KV_QUANT == 1:
        # |y| <= 127: adding 1.5 * 2^23 rounds to an integer (RNE) held in the low mantissa bits.
        code = _f32_bits(y + 12582912.0) - 0x4B400000
    else:
        u = _f32_bits(y)
        sign = (u >> 24) & 0x80  # arithmetic shift: bit 31 lands on bit 7
        a = u & 0x7FFFFFFF
        # |y| >= 2^-6 (e4m3 normal): drop 20 of fp32's 23 mantissa bits with RNE (a carry bumps the exponent), then
        # rebias the exponent from 127 to 7. |y| <= 448 never rounds past 448 (0x7E), so NaN (0x7F) never appears.
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        # Below: subnormal steps of 2^-9, i.e. round(|y| * 512) (0..8; 8 is the smallest normal, 0x08): adding 2^23
        # rounds to an integer (RNE) held in the low mantissa bits.
        sub = _f32_bits(tl.abs(y) * 512.0 + 8388608.0) - 0x4B000000
        code = sign | tl.where(a >= 0x3C800000, normal, sub)
    return code, s


@triton.jit(do_not_specialize=_Q8_NO_SPEC)
def _reshape_and_cache_q8_kernel(
    key_ptr,  # [T, H, D] strided, fp32/fp16/bf16
    value_ptr,  # [T, H, D] strided
    kc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided int8 (KV_QUANT 1) or uint8 (fp8 e4m3fn bits, KV_QUANT 2)
    vc_ptr,  # [num_blocks, BLOCK_SIZE, H, D] strided
    ks_ptr,  # [num_blocks, BLOCK_SIZE, H] strided fp16: one scale per (token, head)
    vs_ptr,  # [num_blocks, BLOCK_SIZE, H] strided fp16
    slot_ptr,  # [T] int64; < 0 = padding token; >= num_slots: skipped
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
    stride_ksb,
    stride_kss,
    stride_ksh,
    stride_vsb,
    stride_vss,
    stride_vsh,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_QUANT: tl.constexpr,  # 1: int8 codes, 2: fp8 e4m3fn bit patterns
):
    """The 8-bit twin of ``_reshape_and_cache_kernel``: each (token, head) row of the ``[BLOCK_H, BLOCK_D]`` tile is
    quantized on its way to the pages (``_quantize_rows``) and its scale written beside it. A head dim larger than
    BLOCK_D cannot occur (BLOCK_D = next_pow2(D)), so a row's amax is one in-register reduction."""
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t)
    if (slot >= 0) & (slot < num_slots):
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        hmask = hs < H
        mask = hmask[:, None] & (ds < D)[None, :]
        hs64 = hs.to(tl.int64)
        k = tl.load(key_ptr + t * stride_kt + hs[:, None] * stride_kh + ds[None, :] * stride_kd, mask=mask, other=0.0)
        v = tl.load(value_ptr + t * stride_vt + hs[:, None] * stride_vh + ds[None, :] * stride_vd, mask=mask,
                    other=0.0)
        kq, ks = _quantize_rows(k.to(tl.float32), KV_QUANT)
        vq, vs = _quantize_rows(v.to(tl.float32), KV_QUANT)
        kc = kc_ptr + blk * stride_kcb + off * stride_kcs
        vc = vc_ptr + blk * stride_vcb + off * stride_vcs
        tl.store(kc + hs[:, None] * stride_kch + ds[None, :] * stride_kcd, kq.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc + hs[:, None] * stride_vch + ds[None, :] * stride_vcd, vq.to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(ks_ptr + blk * stride_ksb + off * stride_kss + hs64 * stride_ksh, ks, mask=hmask)
        tl.store(vs_ptr + blk * stride_vsb + off * stride_vss + hs64 * stride_vsh, vs, mask=hmask)


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
    # tl.where, not `mask & scalar`: Triton 3.9's interpreter widens a scalar bool splat against a block to an
    # integer mask, which its loads refuse ("mask has unsupported dtype"); compiled code is the same either way.
    mask = tl.where((src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks), mask, False)
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


def kv_quant(cache) -> int:
    """``KV_QUANT`` of a cache: 0 float pages, 1 int8, 2 fp8 e4m3fn (read and written as uint8 bit patterns: the
    interpreter has no fp8 and sm_80 no fp8 conversions)."""
    if cache.dtype == torch.int8:
        return 1
    if cache.dtype == torch.float8_e4m3fn:
        return 2
    return 0


def kv_pages(cache):
    """The pages as the kernels take them: fp8 e4m3fn pages as a uint8 view (same bytes), anything else as is."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def reshape_and_cache_fwd(key, value, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None) -> None:
    """Launch ``_reshape_and_cache_kernel`` (float pages) or ``_reshape_and_cache_q8_kernel`` (int8 / fp8 e4m3fn
    pages with fp16 ``k_scales``/``v_scales [num_blocks, block_size, H]``, any strides) over (token, head tile).

    A slot past the pool (``>= num_blocks * block_size``) is skipped, never written out of bounds: on CUDA tensors
    the public op cannot check the mapping without a device sync (it stays CUDA-graph capturable), so the kernel
    guards each write, as the CUDA kernel does. On CPU tensors ``llmkern.paged_ops`` raises before launching."""
    T, H, D = key.shape
    cfg = cache_tile_config(H, D)
    grid = reshape_and_cache_grid(T, H, D)
    tile = dict(BLOCK_SIZE=k_cache.shape[1], BLOCK_H=cfg["BLOCK_H"], BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["num_warps"])
    quant = kv_quant(k_cache)
    with _launch.device_guard(k_cache):
        if k_scales is None:
            _launch.launch(
                _reshape_and_cache_kernel, grid, key, value, k_cache, v_cache, slot_mapping,
                k_cache.shape[0] * k_cache.shape[1], H, D, *key.stride(), *value.stride(), *k_cache.stride(),
                *v_cache.stride(), **tile)
            return
        _launch.launch(
            _reshape_and_cache_q8_kernel, grid, key, value, kv_pages(k_cache), kv_pages(v_cache), k_scales,
            v_scales, slot_mapping, k_cache.shape[0] * k_cache.shape[1], H, D, *key.stride(), *value.stride(),
            *k_cache.stride(), *v_cache.stride(), *k_scales.stride(), *v_scales.stride(), KV_QUANT=quant, **tile)


def copy_blocks_fwd(k_cache, v_cache, src, dst) -> None:
    """Launch ``_copy_blocks_kernel`` over (pair, token row x head tile).

    A pair whose source or destination is not a block of the pool is skipped, never copied out of bounds (on CUDA
    tensors the public op cannot read the ids without a sync; on CPU tensors ``llmkern.paged_ops`` raises first).
    A bit copy for any dtype: 1-byte pages (int8, fp8 e4m3fn) go through an int8 view, and the fp16 scales of 8-bit
    pages are copied as ``[num_blocks, block_size, H, 1]`` views (``scales.unsqueeze(-1)``)."""
    if k_cache.element_size() == 1:
        k_cache, v_cache = k_cache.view(torch.int8), v_cache.view(torch.int8)
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
    (no other input changes them), page sizes 16 and 1, fp32/fp16/bf16; one spec per distinct compiled kernel.
    8-bit pages: the quantizing write for int8 and fp8 (uint8) pages from each input dtype, ``copy_blocks`` on int8
    views of the pages and on the fp16 scales' ``[nb, bs, Hkv, 1]`` views."""
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
            for kv, kptr in (("int8", "*i8"), ("fp8", "*u8")):
                strides_s = {f"stride_{c}s{s}": "i32" for c in "kv" for s in "bsh"}
                for bs in L.BLOCK_SIZES:
                    sig = {"key_ptr": ptr, "value_ptr": ptr, "kc_ptr": kptr, "vc_ptr": kptr, "ks_ptr": "*fp16",
                           "vs_ptr": "*fp16", "slot_ptr": "*i64", "num_slots": "i32", "H": "i32", "D": "i32",
                           "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32",
                           **strides_c, **strides_s}
                    const = {"stride_kd": 1, "stride_vd": 1, "stride_kcd": 1, "stride_vcd": 1, "BLOCK_SIZE": bs,
                             "KV_QUANT": 1 if kv == "int8" else 2, **tile}
                    name = (f"reshape_and_cache_q8[BLOCK_H={cfg['BLOCK_H']},BLOCK_D={cfg['BLOCK_D']},BLOCK_SIZE={bs},"
                            f"{dt},{kv}]")
                    spec = specs.setdefault(name, CompileSpec(
                        name=name, fn=_reshape_and_cache_q8_kernel, signature=sig, constexprs=const,
                        num_warps=cfg["num_warps"], meta={"divisible_by_16": div, "serves": [], "kv": kv}))
                    spec.meta["serves"].append(lname)
    # copy_blocks on 8-bit pages (int8 views: one kernel for int8 and fp8) and on their scales ([nb, bs, Hkv, 1]
    # fp16 views of contiguous [nb, bs, Hkv] scales: D = 1 and the head stride 1 are constants, the other strides
    # divisible by 16 as bs * Hkv and Hkv are).
    for lname, _, H, D, _, _ in L.head_layouts():
        cfg = cache_tile_config(H, D)
        const = {"stride_kcd": 1, "stride_vcd": 1, "NUM_HB": triton.cdiv(H, cfg["BLOCK_H"]),
                 "BLOCK_H": cfg["BLOCK_H"], "BLOCK_D": cfg["BLOCK_D"]}
        strides_c = {f"stride_{c}{s}": "i32" for c in ("kc", "vc") for s in "bsh"}
        sig = {"kc_ptr": "*i8", "vc_ptr": "*i8", "src_ptr": "*i64", "dst_ptr": "*i64", "num_blocks": "i32",
               "H": "i32", "D": "i32", **strides_c}
        name = f"copy_blocks[BLOCK_H={cfg['BLOCK_H']},BLOCK_D={cfg['BLOCK_D']},NUM_HB={const['NUM_HB']},int8]"
        spec = specs.setdefault(name, CompileSpec(
            name=name, fn=_copy_blocks_kernel, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
            meta={"divisible_by_16": tuple(strides_c) + ("D",), "serves": [], "kv": "int8/fp8 pages"}))
        spec.meta["serves"].append(lname)
        cfg = cache_tile_config(H, 1)
        for bs in L.BLOCK_SIZES:
            sig = {"kc_ptr": "*fp16", "vc_ptr": "*fp16", "src_ptr": "*i64", "dst_ptr": "*i64", "num_blocks": "i32",
                   "H": "i32", **{f"stride_{c}{s}": "i32" for c in ("kc", "vc") for s in "bs"}}
            const = {"D": 1, "stride_kch": 1, "stride_vch": 1, "stride_kcd": 1, "stride_vcd": 1,
                     "NUM_HB": triton.cdiv(H, cfg["BLOCK_H"]), "BLOCK_H": cfg["BLOCK_H"], "BLOCK_D": cfg["BLOCK_D"]}
            div = tuple(f"stride_{c}{s}" for c in ("kc", "vc") for s, v in (("b", bs * H), ("s", H)) if v % 16 == 0)
            name = (f"copy_blocks[BLOCK_H={cfg['BLOCK_H']},BLOCK_D=1,NUM_HB={const['NUM_HB']},scales,"
                    f"div={'b' * ('stride_kcb' in div)}{'s' * ('stride_kcs' in div)}]")
            spec = specs.setdefault(name, CompileSpec(
                name=name, fn=_copy_blocks_kernel, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                meta={"divisible_by_16": div, "serves": [], "kv": "scales"}))
            if lname not in spec.meta["serves"]:
                spec.meta["serves"].append(lname)
    return list(specs.values())
