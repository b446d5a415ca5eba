"""Attention over a paged KV cache: flash-decoding (split-KV decode + reduce) and causal paged prefill.

Pages are ``[num_blocks, BLOCK_SIZE, Hkv, D]`` (NHD), any strides; ``block_tables [B, max_blocks]`` int32 maps a
sequence's i-th page to a page id. Every kernel walks a sequence's tokens in ``BLOCK_N`` tiles of *positions*:
token ``pos`` lives in page ``block_tables[b, pos // BLOCK_SIZE]`` at row ``pos % BLOCK_SIZE``. When
``BLOCK_SIZE >= BLOCK_N`` a tile lies inside one page (tiles start at multiples of BLOCK_N) and the page id is one
scalar load; for small pages (down to 1) a tile gathers ``BLOCK_N / BLOCK_SIZE`` pages through the table, so the
``tl.dot`` tiles stay full whatever the page size. Page offsets are int64: ``num_blocks * BLOCK_SIZE * Hkv * D``
passes 2^31 for big pools.

Decode (flash-decoding), two launches:
  * stage 1, grid ``(B, Hkv, num_splits)``: one program serves all ``G = Hq / Hkv`` query heads of one KV head (the
    GQA group), so each K/V byte is read once per (sequence, KV head) for any group size. The group's rows are
    padded to ``BLOCK_G >= 16`` (``tl.dot``'s minimum) and masked. Sequence b's visible range (all tokens, or the last
    ``window``) is cut into BLOCK_N tiles and the tiles into ``num_splits`` contiguous chunks, per sequence, so a
    ragged batch spreads each sequence's own work evenly; the last splits of a short sequence hold no tiles. Online
    softmax in base 2 (``exp2``; the scale carries log2(e), applied after the max is subtracted); fp32 accumulation.
    Writes the normalised partial output ``[B, Hq, num_splits, D]`` and each split's running max m and sum l
    ``[B, Hq, 2, num_splits]``. A split with no tokens writes m = -inf, l = 0 and a zero partial, never 0/0.
  * stage 2, grid ``(B, Hq)``, walks the splits 16 at a time: weights ``l_i * exp2((m_i - max m) * c)`` (an empty
    split weighs exactly 0), fixed order, so the result is deterministic. With ``num_splits == 1`` stage 1 writes
    the final output itself and stage 2 is skipped.

Prefill, one launch, grid ``(cdiv(S * G, BLOCK_M), Hkv, B)`` (row tiles on x, the only axis past 65535): the GQA
group's query rows are flattened with the sequence rows (row r = s * G + g) so again one program's K/V tiles serve
the whole group. Row s of sequence b is at position ``seq_lens[b] - S + s``; rows ``s < S - q_lens[b]`` are left
padding and get zeros. Each program walks only the K/V tiles its rows can see (causal, and the window), and masks
per element.

Casting follows flash-attention practice, not eager's rounding points: logits in fp32, the unnormalised probabilities
cast to the K/V dtype before the PV product (eager rounds the logits, the scaled logits and the normalised softmax to
the input dtype), fp32 accumulation. fp32
inputs compute the logits in fp64 (q and k widened, so products are exact and the sum is fp64, rounded once to
fp32) and P @ V as an fp32 FMA dot (``input_precision="ieee"``). With GPU numerics emulated in the tests, 3xTF32
dots used up to 97% of eager's fp32 tolerance and plain fp32 logits (whose rounding error grows with |logit|) up to
85%; fp64 logits bring the worst case near 50%. Decode is memory-bound, so the wider arithmetic costs little there.
The final normalisations divide with div.rn (``/`` is div.full.f32, 2 ulp).

8-bit pages (``KV_QUANT`` constexpr; 0, the float path, compiles as before): int8 or fp8 e4m3fn codes (fp8 read as
uint8 bit patterns, widened by bit operations: sm_80 has no fp8 conversions, the interpreter no fp8 type) with one
fp16 scale per (token, KV head) in ``k_scales``/``v_scales [num_blocks, BLOCK_SIZE, Hkv]`` (llmkern/reference.py's
format). q and out keep the model's dtype. The codes are exact in fp16/bf16/fp32, so the dots run on them directly;
the K scale multiplies the logits' columns, the V scale P's columns (``_attend_tile_q8``). With 16-bit q, P x V-scale
goes to the tensor cores as a hi + lo pair of 16-bit parts (two dots), so P @ V carries no 16-bit rounding of its own
and the output is about one rounding from the fp32 reference; 16-bit prefill takes 32-token K/V tiles for the
registers the second dot needs. With Triton < 3.7 most 8-bit variants compile with 1 stage instead of 2, which spill
there (``decode_config``, ``prefill_config``).
"""

import bisect
import functools
import itertools

import torch
import triton
import triton.language as tl

from llmkern.kernels import _launch
from llmkern.kernels._specs import CompileSpec

LOG2E = 1.4426950408889634
# SM count used by the split heuristic when the tensors are not on a GPU (interpreter runs): an A100's.
NOMINAL_SMS = 108
MAX_NUM_SPLITS = 256
# The split counts the heuristic picks: powers of two and 1.5x powers of two up to MAX_NUM_SPLITS. The count it
# computes is rounded down to this ladder (at most 25% fewer splits than asked for), so a whole generation meets
# at most these 16 launch shapes (scratch buffers, CUDA-graph captures) instead of one per context length, and
# ``llmkern.warmup`` can list them without scanning lengths. The split count is not specialised on
# (``_DECODE_NO_SPEC``), so the compiled kernels are the same for every value > 1: one split kernel with
# STORE_LSE and one reduce kernel, plus the single-split kernel.
SPLIT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# A split should hold at least this many BLOCK_N tiles: below that the q load, the partial write and the reduce
# cost more than the parallelism gains.
MIN_TILES_PER_SPLIT = 4


@triton.jit
def _tanh(x, ACCURATE: tl.constexpr):
    """tanh for the softcap, whose cap multiplies its error into every logit.

    ``ACCURATE`` (fp32 inputs): to about an ulp of the result. |x| < 0.25: odd Taylor series to x^9 (the next term is
    below 2^-26 of the result); above, (e - 1) / (e + 1) with e = exp(2|x|) and a correctly rounded divide; |x| is
    clamped at 15, where tanh is 1 in fp32 and e stays finite. Otherwise (16-bit inputs, whose tolerance is far
    looser, and whose 64 x 64 prefill tiles spill with the longer form): 1 - 2 / (exp(2x) + 1), which saturates to
    +-1 without inf/inf but loses relative accuracy to cancellation as tanh approaches 0."""
    if ACCURATE:
        a = tl.minimum(tl.abs(x), 15.0)
        a2 = a * a
        small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (-0.05396825396825397
                                                                                       + a2 * 0.021869488536155203))))
        e = tl.exp(2.0 * a)
        t = tl.where(a < 0.25, small, tl.math.div_rn(e - 1.0, e + 1.0))
        return tl.where(x < 0.0, -t, t)
    else:
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _page_offsets(
    bt_row_ptr,  # [max_blocks] int32: this sequence's block table row
    stride_btn,
    pos,  # [BLOCK_N] int32 token positions of this tile (tile starts at a multiple of BLOCK_N)
    tile_start,
    valid,  # [BLOCK_N] positions that exist (and are visible)
    stride_cb,
    stride_cs,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """int64 offsets of the tile's token rows inside a cache ``[num_blocks, BLOCK_SIZE, ...]``."""
    if BLOCK_SIZE >= BLOCK_N:
        # The whole tile lies in one page: one scalar page id.
        page = tl.load(bt_row_ptr + (tile_start // BLOCK_SIZE) * stride_btn).to(tl.int64)
        off = page * stride_cb + (pos % BLOCK_SIZE).to(tl.int64) * stride_cs
    else:
        page = tl.load(bt_row_ptr + (pos // BLOCK_SIZE) * stride_btn, mask=valid, other=0).to(tl.int64)
        off = page * stride_cb + (pos % BLOCK_SIZE).to(tl.int64) * stride_cs
    return off


@triton.jit
def _online_softmax_pv(
    s,  # [R, BLOCK_N] fp32 logits of this tile in the units of m_i (see c), -inf where not visible
    c,  # base-2 factor: exp(scaled logit) = exp2((s - m) * c)
    m_i,  # [R] running max of s
    l_i,  # [R] running sum of exp2
    acc,  # [R, BLOCK_D] fp32 running P @ V
    vc_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] value pages
    k_off,  # [BLOCK_N] int64 offsets of the tile's rows in the key pages
    kvh64,  # int64 KV head
    bt_row,  # [max_blocks] int32 block table row
    stride_btn,
    pos,  # [BLOCK_N] token positions
    tile_start,
    valid,  # [BLOCK_N] positions that exist
    d,  # [BLOCK_D] head-dim lanes
    kv_mask,  # [BLOCK_N, BLOCK_D]
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Fold one tile into the online softmax and accumulate P @ V; shared by the decode and prefill kernels. A row
    that has seen only -inf keeps m = -inf and shifts by 0, so it never produces NaN.

    The max is subtracted before the scale is applied: ``exp2((s - m) * c)``, not ``exp2(s * c - m * c)``. The
    rounding error of a scaled logit is relative to its size, so scaling first puts an error of |logit| x 2^-24 in
    every exponent (several ulp of the probabilities at logits of ~10); ``s - m`` is exact for the logits close to
    the max, the ones that weigh."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_safe) * c)
    p = tl.exp2((s - m_safe[:, None]) * c)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = k_off
    if (stride_vb != stride_kb) | (stride_vs != stride_ks):
        v_off = _page_offsets(bt_row, stride_btn, pos, tile_start, valid, stride_vb, stride_vs, BLOCK_SIZE,
                              BLOCK_N)
    v = tl.load(vc_ptr + (v_off + kvh64 * stride_vh)[:, None] + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if F32_DOT:
        p_in = p.to(vc_ptr.dtype.element_ty).to(tl.float32)  # rounded as the native path rounds it
        acc = acc * alpha[:, None] + tl.dot(p_in, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


# ---------------------------------------------------------------------------------------------------------------------
# 8-bit pages (KV_QUANT 1: int8, 2: fp8 e4m3fn read as uint8 bit patterns), one fp16 scale per (token, KV head) in
# ``k_scales``/``v_scales [num_blocks, BLOCK_SIZE, Hkv]`` (llmkern/reference.py). The codes are widened in registers
# and the scales folded in where they cost least: a K row's scale multiplies its column of logits after the q . code
# dot, a V row's scale multiplies its column of P before the P @ V dot. No dequantized copy of a page exists.


@triton.jit
def _page_rows(bt_row_ptr, stride_btn, pos, tile_start, valid, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(page, row)`` int64 of the tile's positions (page a scalar when the tile lies in one page), from which the
    pages' and the scales' offsets are both formed (``_page_offsets`` with the page ids loaded once)."""
    if BLOCK_SIZE >= BLOCK_N:
        page = tl.load(bt_row_ptr + (tile_start // BLOCK_SIZE) * stride_btn).to(tl.int64)
    else:
        page = tl.load(bt_row_ptr + (pos // BLOCK_SIZE) * stride_btn, mask=valid, other=0).to(tl.int64)
    return page, (pos % BLOCK_SIZE).to(tl.int64)


@triton.jit
def _codes_to(c, KV_QUANT: tl.constexpr, dtype: tl.constexpr):
    """8-bit codes -> ``dtype`` values (exact in fp32, fp16 and bf16: int8 has 7 significant bits, e4m3 3 bits and
    exponents 2^-9..2^8). fp8 by bit operations, the same on every GPU (sm_80 has no fp8 conversions) and in the
    interpreter: sign and the 7 magnitude bits moved into an fp16 pattern (exponent bias 15 instead of 7, so the
    value is 2^-8 of the e4m3 one, subnormals included: e4m3's map onto fp16 subnormals, which the fp16 -> fp32
    conversion keeps), then times 256 in fp32, where every result is a normal number."""
    if KV_QUANT == 1:
        return c.to(tl.float32).to(dtype)  # through fp32: the interpreter casts int8 -> bf16 as bit patterns
    else:
        b = c.to(tl.int32)
        h = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
        return (h.to(tl.float32) * 256.0).to(dtype)


@triton.jit
def _attend_tile_q8(
    q,  # [R, BLOCK_D] queries (T = q's dtype)
    m_i,
    l_i,
    acc,
    vis,  # [R or 1, BLOCK_N] which logits are visible
    qk_scale,
    softcap,
    kc_ptr,  # 8-bit pages: int8 or uint8 (fp8 bits)
    vc_ptr,
    ks_ptr,  # [num_blocks, BLOCK_SIZE, Hkv] fp16
    vs_ptr,
    bt_row,
    stride_btn,
    pos,
    tile_start,
    valid,
    d,
    kv_mask,
    kvh64,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ksb,
    stride_kss,
    stride_ksh,
    stride_vsb,
    stride_vss,
    stride_vsh,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ACCURATE_TANH: tl.constexpr,
    F32_DOT: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    """One K/V tile of 8-bit pages folded into the online softmax: the 8-bit counterpart of the float path's
    logits + ``_online_softmax_pv``, shared by decode and prefill.

    Logits: ``ks_j * (q . code_j)``, the K scale folded into the scores (the codes are exact in q's dtype, so the
    dot sees the stored values unrounded). F32_DOT: ``q . (code_j ks_j)`` as an fp64 dot (the dequantized row is
    exact in fp32), rounded once to fp32.

    P @ V: ``sum_j (p_j vs_j) code_j``, the V scale folded into P (F32_DOT: in fp32, an FMA dot). With 16-bit q the
    factors go to the tensor cores as two 16-bit parts, ``hi = T(p_j vs_j)`` and ``lo = T(p_j vs_j - hi)``, two dots
    on the same exact codes: P @ V to about 2^-16 (bf16) instead of 2^-9. One rounded part is not enough: rounding
    either ``p_j vs_j`` or the dequantized ``v`` (the float path rounds p only; its V is exact data) adds a rounding
    to every output that eager over a 16-bit dequantized cache does not have for short rows (a one-token sequence:
    eager rounds v once, the kernel twice), and the paged attention tests' rule counts that (tests/test_kv8_triton.py;
    the float kernel run on the dequantized pages fails it the same way). The factors are first divided by the
    power of two 2^e <= max_j vs_j of the tile and the dot multiplied back (both exact), so they stay in [0, 2):
    fp16's subnormals would otherwise swallow small p_j vs_j (and their lo parts)."""
    page, row = _page_rows(bt_row, stride_btn, pos, tile_start, valid, BLOCK_SIZE, BLOCK_N)
    k = tl.load(kc_ptr + (page * stride_kb + row * stride_ks + kvh64 * stride_kh)[:, None] + d[None, :] * stride_kd,
                mask=kv_mask, other=0)
    ks = tl.load(ks_ptr + page * stride_ksb + row * stride_kss + kvh64 * stride_ksh, mask=valid, other=0.0)
    if F32_DOT:
        # The K tile dequantized (code x scale is exact in fp32: 8 and 11 significant bits) for the fp64 dot, so the
        # logits are rounded once, as the float path's. The sum over a length-1 axis (free) ends the chain of
        # elementwise ops back to the 8-bit load: Triton 3.8 otherwise lays the fp64 operand out for the 8-bit
        # width, which its fp64 MMA rejects ("Currently fp64 don't support largeK MMA").
        kf = _codes_to(k, KV_QUANT, tl.float32) * ks.to(tl.float32)[:, None]
        kf = tl.sum(kf[:, :, None], 2)
        s = tl.dot(q.to(tl.float64), tl.trans(kf.to(tl.float64)), input_precision="ieee").to(tl.float32)
    else:
        s = tl.dot(q, tl.trans(_codes_to(k, KV_QUANT, q.dtype))) * ks.to(tl.float32)[None, :]
    c = qk_scale  # s stays unscaled: the max is subtracted first (see _online_softmax_pv)
    if SOFTCAP:
        s = softcap * _tanh(s * qk_scale / softcap, ACCURATE_TANH)
        c = 1.4426950408889634
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_safe) * c)
    p = tl.exp2((s - m_safe[:, None]) * c)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(vc_ptr + (page * stride_vb + row * stride_vs + kvh64 * stride_vh)[:, None] + d[None, :] * stride_vd,
                mask=kv_mask, other=0)
    vs = tl.load(vs_ptr + page * stride_vsb + row * stride_vss + kvh64 * stride_vsh, mask=valid,
                 other=0.0).to(tl.float32)
    if F32_DOT:
        pv = p * vs[None, :]
        acc = acc * alpha[:, None] + tl.dot(pv, _codes_to(v, KV_QUANT, tl.float32), input_precision="ieee")
    else:
        # 2^e <= max_j vs_j: the exponent bits of the tile's largest scale (0 when no row is valid, where every
        # p_j vs_j is 0 too); p_j vs_j / 2^e lies in [0, 2) (exact: a power of two).
        e = tl.max(vs, 0).to(tl.int32, bitcast=True) & 0x7F800000
        pw = e.to(tl.float32, bitcast=True)
        inv = (0x7F000000 - e).to(tl.float32, bitcast=True)  # 2^-e
        pv = p * (vs * inv)[None, :]
        hi = pv.to(q.dtype)
        lo = (pv - hi.to(tl.float32)).to(q.dtype)
        cv = _codes_to(v, KV_QUANT, q.dtype)
        acc = acc * alpha[:, None] + tl.dot(lo, cv, tl.dot(hi, cv)) * pw
    return m_new, l_i, acc


# Integer arguments Triton would otherwise specialise on (== 1 -> constant, % 16 == 0 -> divisibility) although the
# code gains nothing from it: each would double the compiled variants (and the compile gate's specs) for nothing.
# The q/out and cache strides stay specialised: their divisibility decides vectorised loads and stores (without it
# the 16-bit D = 256 prefill and the fp32 D = 128 prefill spill).
# The scales' strides too: one scale per row, whatever their layout (8-bit pages only; 0 for float pages).
_SCALE_STRIDES = ("stride_ksb", "stride_kss", "stride_ksh", "stride_vsb", "stride_vss", "stride_vsh")
_DECODE_NO_SPEC = ("window", "num_splits", "G", "stride_btb", "stride_lb", "stride_lh") + _SCALE_STRIDES
_REDUCE_NO_SPEC = ("Hq", "num_splits")
_PREFILL_NO_SPEC = ("window", "S", "G", "stride_btb") + _SCALE_STRIDES


@triton.jit(do_not_specialize=_DECODE_NO_SPEC)
def _paged_decode_split_kernel(
    q_ptr,  # [B, Hq, D] strided
    kc_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] strided
    vc_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] strided
    bt_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    o_ptr,  # [B, Hq, num_splits, D]: fp32 partials (or the final [B, Hq, D] output when STORE_LSE is False)
    lse_ptr,  # [B, Hq, 2, num_splits] fp32: each split's running max m (logit units), then its sum l
    qk_scale,  # scale * log2(e), or scale alone when SOFTCAP
    softcap,
    window,
    num_splits,
    G,
    D,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_btn,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    stride_lb,
    stride_lh,
    ks_ptr,  # [num_blocks, BLOCK_SIZE, Hkv] fp16 K scales (8-bit pages); None for float pages
    vs_ptr,  # [num_blocks, BLOCK_SIZE, Hkv] fp16 V scales; None for float pages
    stride_ksb,
    stride_kss,
    stride_ksh,
    stride_vsb,
    stride_vss,
    stride_vsh,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    STORE_LSE: tl.constexpr,
    F32_DOT: tl.constexpr,  # fp32 inputs (or bf16 in a plain interpreter run): fp64 logits, fp32 FMA P @ V
    KV_QUANT: tl.constexpr,  # 0: float pages (q's dtype); 1: int8, 2: fp8 e4m3fn (uint8 bits) + fp16 scales
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b64 = b.to(tl.int64)

    seq_len = tl.load(seq_lens_ptr + b)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    start_al = (start // BLOCK_N) * BLOCK_N
    n_tiles = tl.cdiv(seq_len - start_al, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, num_splits)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, n_tiles)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    gmask = g < G
    dmask = d < D
    heads = (kvh * G + g).to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b64 * stride_btb
    kvh64 = kvh.to(tl.int64)
    for t in range(t_lo, t_hi):
        tile_start = start_al + t * BLOCK_N
        pos = tile_start + n
        valid = (pos >= start) & (pos < seq_len)
        kv_mask = valid[:, None] & dmask[None, :]
        if KV_QUANT != 0:
            m_i, l_i, acc = _attend_tile_q8(
                q, m_i, l_i, acc, valid[None, :], qk_scale, softcap, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row,
                stride_btn, pos, tile_start, valid, d, kv_mask, kvh64, stride_kb, stride_ks, stride_kh, stride_kd,
                stride_vb, stride_vs, stride_vh, stride_vd, stride_ksb, stride_kss, stride_ksh, stride_vsb,
                stride_vss, stride_vsh, BLOCK_SIZE, BLOCK_N, SOFTCAP, q_ptr.dtype.element_ty == tl.float32, F32_DOT,
                KV_QUANT)
        else:
            k_off = _page_offsets(bt_row, stride_btn, pos, tile_start, valid, stride_kb, stride_ks, BLOCK_SIZE,
                                  BLOCK_N)
            k = tl.load(kc_ptr + (k_off + kvh64 * stride_kh)[:, None] + d[None, :] * stride_kd, mask=kv_mask,
                        other=0.0)  # [BLOCK_N, BLOCK_D]
            if F32_DOT:
                s = tl.dot(q.to(tl.float64), tl.trans(k.to(tl.float64)), input_precision="ieee").to(tl.float32)
            else:
                s = tl.dot(q, tl.trans(k))  # [BLOCK_G, BLOCK_N] fp32
            c = qk_scale  # s stays unscaled: _online_softmax_pv subtracts the max first
            if SOFTCAP:
                s = softcap * _tanh(s * qk_scale / softcap, q_ptr.dtype.element_ty == tl.float32)
                c = 1.4426950408889634
            s = tl.where(valid[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_pv(s, c, m_i, l_i, acc, vc_ptr, k_off, kvh64, bt_row, stride_btn, pos,
                                               tile_start, valid, d, kv_mask, stride_kb, stride_ks, stride_vb,
                                               stride_vs, stride_vh, stride_vd, BLOCK_SIZE, BLOCK_N, F32_DOT)

    has = l_i > 0.0
    # Correctly rounded division (div.rn), once per output element: `/` compiles to div.full.f32 (2 ulp), which
    # alone would use up fp32's tolerance.
    out = tl.where(has[:, None], tl.math.div_rn(acc, tl.where(has, l_i, 1.0)[:, None]), 0.0)
    o_mask = gmask[:, None] & dmask[None, :]
    tl.store(o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=o_mask)
    if STORE_LSE:
        # m and l, not a log-sum-exp: log2 then exp2 in the reduce would add errors relative to |m * c|.
        ml = lse_ptr + b64 * stride_lb + heads * stride_lh + split
        tl.store(ml, m_i, mask=gmask)
        tl.store(ml + num_splits, l_i, mask=gmask)


@triton.jit(do_not_specialize=_REDUCE_NO_SPEC)
def _paged_decode_reduce_kernel(
    po_ptr,  # [B, Hq, num_splits, D] fp32 contiguous partial outputs, each normalised by its own l
    lse_ptr,  # [B, Hq, 2, num_splits] fp32 contiguous: m (logit units), then l, of each split
    o_ptr,  # [B, Hq, D] output
    c,  # base-2 factor of the logits (as in the split kernel)
    Hq,
    D,
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Splits are walked BLOCK_S at a time (two passes: the max m, then the weighted sum), so the registers held
    # are one [BLOCK_S, BLOCK_D] chunk whatever the split count (a whole [num_splits, BLOCK_D] tile spilled on sm_90
    # at 128+ splits).
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    row = (b.to(tl.int64) * Hq + h) * num_splits
    ml = lse_ptr + 2 * row
    m = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m = tl.maximum(m, tl.load(ml + s0 + sp, mask=s0 + sp < num_splits, other=float("-inf")))
    m = tl.max(m, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        smask = s0 + sp < num_splits
        m_s = tl.load(ml + s0 + sp, mask=smask, other=float("-inf"))
        l_s = tl.load(ml + num_splits + s0 + sp, mask=smask, other=0.0)
        w = tl.exp2((m_s - m_safe) * c) * l_s  # exactly 0 for empty splits (m = -inf, l = 0)
        used = smask & (w > 0.0)
        po = tl.load(po_ptr + (row + s0 + sp)[:, None] * D + d[None, :], mask=used[:, None] & dmask[None, :],
                     other=0.0)
        acc += tl.sum(w[:, None] * po, 0)
        total += w
    total_s = tl.sum(total, 0)
    out = tl.math.div_rn(acc, tl.where(total_s > 0.0, total_s, 1.0))  # div.rn: see the split kernel
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=dmask)


@triton.jit(do_not_specialize=_PREFILL_NO_SPEC)
def _paged_prefill_kernel(
    q_ptr,  # [B, Hq, S, D] strided
    kc_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] strided
    vc_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] strided
    bt_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    q_lens_ptr,  # [B] int32
    o_ptr,  # [B, Hq, S, D] strided
    qk_scale,  # scale * log2(e), or scale alone when SOFTCAP
    softcap,
    window,
    S,
    G,
    D,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_btn,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    ks_ptr,  # [num_blocks, BLOCK_SIZE, Hkv] fp16 K scales (8-bit pages); None for float pages
    vs_ptr,  # [num_blocks, BLOCK_SIZE, Hkv] fp16 V scales; None for float pages
    stride_ksb,
    stride_kss,
    stride_ksh,
    stride_vsb,
    stride_vss,
    stride_vsh,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    F32_DOT: tl.constexpr,  # fp32 inputs (or bf16 in a plain interpreter run): fp64 logits, fp32 FMA P @ V
    KV_QUANT: tl.constexpr,  # 0: float pages (q's dtype); 1: int8, 2: fp8 e4m3fn (uint8 bits) + fp16 scales
):
    mt = tl.program_id(0)  # row tiles on x: up to 2^31 - 1 of them (y and z stop at 65535)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    q_len = tl.load(q_lens_ptr + b)

    r = mt * BLOCK_M + tl.arange(0, BLOCK_M)  # flattened (s, g)
    srow = r // G
    rmask = r < S * G
    first_real = S - q_len
    real = rmask & (srow >= first_real)
    qpos = seq_len - S + srow  # [BLOCK_M]
    heads = (kvh * G + r % G).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < D
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + srow.to(tl.int64)[:, None] * stride_qs
                + d[None, :] * stride_qd, mask=real[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    # K/V positions this tile's real rows can see: [lo, hi).
    s_min = tl.maximum(mt * BLOCK_M // G, first_real)
    s_max = tl.minimum((mt * BLOCK_M + BLOCK_M - 1) // G, S - 1)
    hi = tl.minimum(seq_len - S + s_max + 1, seq_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - S + s_min - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.where(s_max < s_min, lo, hi)  # no real rows in this tile: it only writes zeros

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b64 * stride_btb
    kvh64 = kvh.to(tl.int64)
    for tile_start in range(lo, hi, BLOCK_N):
        pos = tile_start + n
        valid = (pos < hi) & (pos >= 0)
        kv_mask = valid[:, None] & dmask[None, :]
        vis = real[:, None] & valid[None, :] & (pos[None, :] <= qpos[:, None])
        if USE_WINDOW:
            vis = vis & (pos[None, :] > qpos[:, None] - window)
        if KV_QUANT != 0:
            m_i, l_i, acc = _attend_tile_q8(
                q, m_i, l_i, acc, vis, qk_scale, softcap, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_row, stride_btn, pos,
                tile_start, valid, d, kv_mask, kvh64, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb,
                stride_vs, stride_vh, stride_vd, stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss,
                stride_vsh, BLOCK_SIZE, BLOCK_N, SOFTCAP, q_ptr.dtype.element_ty == tl.float32, F32_DOT, KV_QUANT)
        else:
            k_off = _page_offsets(bt_row, stride_btn, pos, tile_start, valid, stride_kb, stride_ks, BLOCK_SIZE,
                                  BLOCK_N)
            k = tl.load(kc_ptr + (k_off + kvh64 * stride_kh)[:, None] + d[None, :] * stride_kd, mask=kv_mask,
                        other=0.0)
            if F32_DOT:
                s = tl.dot(q.to(tl.float64), tl.trans(k.to(tl.float64)), input_precision="ieee").to(tl.float32)
            else:
                s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
            c = qk_scale  # s stays unscaled: _online_softmax_pv subtracts the max first
            if SOFTCAP:
                s = softcap * _tanh(s * qk_scale / softcap, q_ptr.dtype.element_ty == tl.float32)
                c = 1.4426950408889634
            s = tl.where(vis, s, float("-inf"))
            m_i, l_i, acc = _online_softmax_pv(s, c, m_i, l_i, acc, vc_ptr, k_off, kvh64, bt_row, stride_btn, pos,
                                               tile_start, valid, d, kv_mask, stride_kb, stride_ks, stride_vb,
                                               stride_vs, stride_vh, stride_vd, BLOCK_SIZE, BLOCK_N, F32_DOT)

    has = l_i > 0.0
    # Correctly rounded division (div.rn), once per output element: `/` compiles to div.full.f32 (2 ulp), which
    # alone would use up fp32's tolerance.
    out = tl.where(has[:, None], tl.math.div_rn(acc, tl.where(has, l_i, 1.0)[:, None]), 0.0)
    tl.store(o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + srow.to(tl.int64)[:, None] * stride_os
             + d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------------------------------------------------
# Heuristics


def num_sms(device) -> int:
    """Streaming multiprocessors of ``device``; ``NOMINAL_SMS`` off-GPU (interpreter runs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return NOMINAL_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
_TRITON_BEFORE_3_7 = _TRITON_VERSION < (3, 7)


def decode_config(G: int, D: int, fp32: bool = False, kv8: bool = False) -> dict:
    """Stage-1 tiles for group size ``G``, head_dim ``D`` and input width.

    ``BLOCK_G = max(16, next_pow2(G))`` (tl.dot needs 16 rows); ``BLOCK_D = next_pow2(D)`` (80 and 96 pad to 128).
    16-bit inputs: ``BLOCK_N`` 64 tokens (32 for D = 256) so a K and a V tile stay at 16 KB, 4 warps for D = 128 and
    8 otherwise. fp32 inputs (logits from an fp64 dot, P @ V an fp32 FMA dot): ``BLOCK_N`` 32 (16 for D = 256), 4
    warps; D = 256 on Triton < 3.7 (the lent H200's 3.6): 8 warps, since 4 spill there (up to 136 bytes with
    splits > 1) while 8 spill with 3.8.
    2 stages: with 3, ptxas spills a few bytes in some variants (fp32 D = 64 / 256 on sm_80, 16-bit D = 128 with
    1-token pages on sm_90); the compile gate checks every config on sm_80 and sm_90, with Triton 3.6 too
    (``make test-compat``).
    8-bit pages (``kv8``): the same tiles (so the same split heuristic); at D = 128 8 warps, as 4 spill on sm_90 (up
    to 20 bytes with 16-bit inputs, where the codes' conversion and the two-part P @ V come on top and ptxas caps 4
    warps at 168 registers; up to 24 bytes at 255 registers with fp32 inputs). That is enough with Triton 3.8. With
    Triton < 3.7 (the lent H200's 3.6) every 8-bit head_dim spilled with 2 stages (16-bit D = 64 on sm_90 at 80
    registers, D = 128 on sm_80 at 128, D = 256 on both; fp32 D = 64 and 128 on sm_90 at 255), so there the 8-bit
    variants take 1 stage (no software pipelining of the K/V loads), plus 4 warps for 16-bit D = 64: that keeps the
    full BLOCK_N (decode is memory-bound), where halving BLOCK_N with 2 stages still spilled for fp32 D = 64. fp32
    D = 256 still spills with 3.6 (200 to 400 bytes of spill stores on sm_80 and sm_90) with every BLOCK_N (16, 32),
    warps (2 to 16) and stages (1 to 3) tried; 16 tokens, 8 warps and 2 stages spill least, so they stay.
    Triton >= 3.9 (its ptxas): 16-bit inputs on 8 warps spilled 4 to 24 bytes on sm_90 in 54 of the 252 decode
    specs (D = 64 at 64-80 registers, 8-bit pages at D = 128 and 256 at 80-128), each below the 255 registers a
    thread of a 256-thread block may have: ptxas capped itself for occupancy. Those classes (16-bit, 8 warps, D = 64
    or 8-bit pages) get ``maxnreg`` 255, no cap below the hardware's, and compile clean; that trades occupancy for
    the spills (up to ~168 registers: one 8-warp block per SM where ptxas had kept two), not measured on a GPU.
    16-bit D = 256 on 16-bit pages did not spill and keeps ptxas's choice, as do older Tritons (clean without it).
    """
    block_d = max(16, triton.next_power_of_2(D))
    block_g = max(16, triton.next_power_of_2(G))
    if fp32:
        block_n = 32 if block_d <= 128 else 16
        num_warps = 8 if (block_d > 128 and _TRITON_BEFORE_3_7) or (kv8 and block_d == 128) else 4
    else:
        block_n = 64 if block_d <= 128 else 32
        # 4 warps are enough for D = 128; for D = 64 ptxas then caps some variants at 64 registers and spills a
        # few bytes (sliding window + softcap, small pages), and D = 256 needs the room: 8 warps there.
        num_warps = 4 if block_d == 128 and not kv8 else 8
    if block_g >= 64:  # very wide groups (no supported model): keep the S tile and accumulator in registers
        block_n = min(block_n, 32)
    num_stages = 2
    if kv8 and _TRITON_BEFORE_3_7 and not (fp32 and block_d > 128):  # see the docstring
        num_stages = 1
        if not fp32 and block_d <= 64:
            num_warps = 4
    cfg = {"BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps,
           "num_stages": num_stages}
    if not fp32 and num_warps == 8 and (block_d <= 64 or kv8) and _TRITON_VERSION >= (3, 9):  # see the docstring
        cfg["maxnreg"] = 255
    return cfg


@functools.lru_cache(maxsize=None)
def _block_n(G: int, D: int) -> int:
    """16-bit ``decode_config(G, D)["BLOCK_N"]``, cached: the split heuristic runs once per decode step and a test
    scans it over every context length."""
    return decode_config(G, D)["BLOCK_N"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit-aware wrapper, ~30x slower: the split heuristic runs every step


def _splits_for_occupancy(B: int, Hkv: int, sms: int) -> int:
    """Splits that give about two waves of the GPU: ``2 * sms`` programs over ``B * Hkv``."""
    return _cdiv(2 * sms, max(1, B * Hkv))


def _splits_for_length(max_seq_len: int, D: int, sliding_window, G: int) -> int:
    """Splits that keep ``MIN_TILES_PER_SPLIT`` BLOCK_N tiles each over the longest visible range."""
    visible = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window + 64)
    block_n = _block_n(G, D)
    return _cdiv(max(visible, 1), block_n) // MIN_TILES_PER_SPLIT


def bucket_splits(n: int) -> int:
    """The largest ``SPLIT_BUCKETS`` value ``<= n`` (1 for ``n <= 1``)."""
    return SPLIT_BUCKETS[max(0, bisect.bisect_right(SPLIT_BUCKETS, n) - 1)]


def _clamp_splits(by_occupancy: int, by_length: int) -> int:
    return bucket_splits(int(max(1, min(by_occupancy, by_length, MAX_NUM_SPLITS))))


def decode_num_splits(B: int, Hkv: int, max_seq_len: int, D: int, sliding_window=None, sms: int = NOMINAL_SMS,
                      G: int = 1) -> int:
    """Splits per sequence: enough programs for about two waves of the GPU (``2 * sms`` over ``B * Hkv``
    programs), but every split keeps at least ``MIN_TILES_PER_SPLIT`` tiles of the longest visible range; at most
    ``MAX_NUM_SPLITS``; rounded down to ``SPLIT_BUCKETS``. A large batch gets 1 split (no reduce launch); one long
    sequence gets many. Non-increasing in ``B``, non-decreasing in ``max_seq_len``."""
    return _clamp_splits(_splits_for_occupancy(B, Hkv, sms), _splits_for_length(max_seq_len, D, sliding_window, G))


def reduce_config(num_splits: int, D: int) -> dict:
    """Stage 2 walks the splits ``BLOCK_S = 16`` at a time whatever their number; warps so that a thread holds at
    most 32 fp32 values of the ``[BLOCK_S, BLOCK_D]`` chunk."""
    block_d = max(16, triton.next_power_of_2(D))
    return {"BLOCK_S": 16, "BLOCK_D": block_d, "num_warps": max(1, min(8, 16 * block_d // 1024))}


def decode_grids(B: int, Hq: int, Hkv: int, num_splits: int) -> tuple:
    """``(stage-1 grid, stage-2 grid or None)``."""
    return (B, Hkv, num_splits), ((B, Hq) if num_splits > 1 else None)


def prefill_grid(B: int, Hkv: int, S: int, G: int, block_m: int) -> tuple:
    """Row tiles of the flattened (s, group head) rows on x (up to 2^31 - 1), KV heads on y, sequences on z."""
    return (triton.cdiv(S * G, block_m), Hkv, B)


def prefill_config(G: int, D: int, fp32: bool = False, kv8: bool = False) -> dict:
    """Prefill tiles: ``BLOCK_M`` flattened (query row, group head) rows, ``BLOCK_N`` tokens,
    ``BLOCK_D = next_pow2(D)``, 8 warps (4 warps reach 255 registers: the per-row position/mask vectors and the
    gathered int64 K/V row offsets come on top of the usual flash-attention tiles). 16-bit: 64 x 64 (64 x 16 for
    D = 256). fp32 (fp64 logits, FMA dots): 16 x 32 for D <= 128, 16 x 16 for D = 256. These compile without spills
    for sm_80 and sm_90 with Triton 3.6 and 3.8; 32-row fp32 tiles and 64 x 32 for 16-bit D = 256 spill with 3.6
    (up to 48 bytes). 8-bit pages (``kv8``) with 16-bit inputs: 64 x 32 for D <= 128 and 32 x 32 for D = 256, since
    the codes' conversion and the two-part P @ V (``_attend_tile_q8``) spill at 64 x 64 (24 bytes) and 64 x 16 (268
    bytes on sm_90). 8-bit pages with fp32 inputs: the float tiles, clean with Triton 3.8. With Triton < 3.7 (the lent
    H200's 3.6) D = 128 takes 1 stage (no software pipelining): 2 stages spill on sm_80 and sm_90, and 1 stage keeps
    the 32-token tile (16 x 16 with 2 stages is clean too); D = 256 spills there (200 to 650 bytes of spill stores)
    whatever the warps (4, 8, 16) or stages (1 to 3), and 8 warps with 2 stages spill least."""
    block_d = max(16, triton.next_power_of_2(D))
    if fp32:
        block_m, block_n = (16, 32) if block_d <= 128 else (16, 16)
    else:
        block_m, block_n = (64, 64) if block_d <= 128 else (64, 16)
        if kv8:
            block_m, block_n = (64, 32) if block_d <= 128 else (32, 32)
    num_stages = 1 if kv8 and fp32 and block_d == 128 and _TRITON_BEFORE_3_7 else 2  # see the docstring
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": 8, "num_stages": num_stages}


# --------------------------------------------------------------------------------------------------------------------
# Launchers (inputs validated by llmkern.paged_ops)


# The Triton interpreter's tl.dot multiplies numpy arrays and numpy has no bf16: left alone it cannot run a bf16
# dot, so on CPU tensors bf16 takes the F32_DOT path (the operands go in as fp32 copies: the same numbers a bf16
# tensor-core dot computes, since bf16 products are exact in fp32 and accumulation is fp32). tests/conftest.py teaches
# the interpreter bf16 dots and sets this, so the tests run the bf16 tensor-core path a GPU compiles.
INTERPRETER_BF16_DOT = False


def _f32_dot(q) -> bool:
    # fp32 inputs: fp64 logits and fp32 FMA dots, to keep a margin within eager's fp32 error (see the module doc).
    # Meta tensors stand for GPU tensors (launches planned without running: llmkern.warmup, the grid checks), so
    # bf16 on meta takes the GPU's tensor-core path: warmup must compile the variant the GPU launches.
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type not in ("cuda", "meta")
                                        and not INTERPRETER_BF16_DOT)


def _scales(scale: float, softcap):
    # With softcap the tanh needs natural-unit logits; the log2(e) factor is applied after it.
    return (float(scale), float(softcap)) if softcap is not None else (float(scale) * LOG2E, 1.0)


def _kv8_args(k_cache, v_cache, k_scales, v_scales) -> tuple:
    """``(k pages, v pages, KV_QUANT, scale arguments)`` for the kernels: float pages pass through with no scales
    (``None`` pointers, which Triton makes constexprs, and zero strides); 8-bit pages get KV_QUANT 1 (int8) or 2 (fp8
    e4m3fn, passed as a uint8 view of the same bytes) and their fp16 scales with 3 strides each."""
    if k_scales is None:
        return k_cache, v_cache, 0, (None, None, 0, 0, 0, 0, 0, 0)
    from llmkern.kernels.cache_ops import kv_pages, kv_quant

    return (kv_pages(k_cache), kv_pages(v_cache), kv_quant(k_cache),
            (k_scales, v_scales, *k_scales.stride(), *v_scales.stride()))


def paged_decode_fwd(q, k_cache, v_cache, block_tables, seq_lens, out, scale: float, sliding_window, softcap,
                     num_splits: int, k_scales=None, v_scales=None) -> None:
    """Stage 1 over (B, Hkv, num_splits), then stage 2 over (B, Hq) unless ``num_splits == 1``. 8-bit pages (int8 or
    fp8 e4m3fn) come with their fp16 ``k_scales``/``v_scales [num_blocks, block_size, Hkv]``, any strides."""
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    cfg = decode_config(G, D, q.dtype == torch.float32, k_scales is not None)
    qk_scale, cap = _scales(scale, softcap)
    window = int(sliding_window) if sliding_window is not None else 0
    kc, vc, quant, sc = _kv8_args(k_cache, v_cache, k_scales, v_scales)
    consts = dict(BLOCK_SIZE=bs, BLOCK_G=cfg["BLOCK_G"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                  USE_WINDOW=sliding_window is not None, SOFTCAP=softcap is not None, F32_DOT=_f32_dot(q),
                  KV_QUANT=quant, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if "maxnreg" in cfg:
        consts["maxnreg"] = cfg["maxnreg"]
    common = (*q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride())
    grid, reduce_grid = decode_grids(B, Hq, Hkv, num_splits)
    with _launch.device_guard(q):
        if num_splits == 1:
            _launch.launch(
                _paged_decode_split_kernel, grid, q, kc, vc, block_tables, seq_lens, out, out, qk_scale,
                cap, window, 1, G, D, *common, out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, *sc,
                STORE_LSE=False, **consts)
            return
        part = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, Hq, 2, num_splits), dtype=torch.float32, device=q.device)
        _launch.launch(
            _paged_decode_split_kernel, grid, q, kc, vc, block_tables, seq_lens, part, lse, qk_scale, cap,
            window, num_splits, G, D, *common, *part.stride(), lse.stride(0), lse.stride(1), *sc, STORE_LSE=True,
            **consts)
        rcfg = reduce_config(num_splits, D)
        _launch.launch(
            _paged_decode_reduce_kernel, reduce_grid, part, lse, out, qk_scale if softcap is None else LOG2E, Hq, D,
            num_splits, *out.stride(), BLOCK_S=rcfg["BLOCK_S"], BLOCK_D=rcfg["BLOCK_D"],
            num_warps=rcfg["num_warps"])


def paged_prefill_fwd(q, k_cache, v_cache, block_tables, seq_lens, q_lens, out, scale: float, sliding_window,
                      softcap, k_scales=None, v_scales=None) -> None:
    """One launch over (B, Hkv, query-row tiles of the flattened (s, group head) rows). 8-bit pages as for
    ``paged_decode_fwd``."""
    B, Hq, S, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    cfg = prefill_config(G, D, q.dtype == torch.float32, k_scales is not None)
    qk_scale, cap = _scales(scale, softcap)
    window = int(sliding_window) if sliding_window is not None else 0
    grid = prefill_grid(B, Hkv, S, G, cfg["BLOCK_M"])
    kc, vc, quant, sc = _kv8_args(k_cache, v_cache, k_scales, v_scales)
    with _launch.device_guard(q):
        _launch.launch(
            _paged_prefill_kernel, grid, q, kc, vc, block_tables, seq_lens, q_lens, out, qk_scale, cap,
            window, S, G, D, *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
            *out.stride(), *sc,
            BLOCK_SIZE=bs, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            USE_WINDOW=sliding_window is not None, SOFTCAP=softcap is not None, F32_DOT=_f32_dot(q),
            KV_QUANT=quant, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# --------------------------------------------------------------------------------------------------------------------
# Compile specs (kernels/_specs.py): the configs the heuristics pick for the supported head layouts.

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(fn, name: str, args: dict, constexprs: dict, cfg: dict, meta: dict, no_spec=()) -> CompileSpec:
    """A spec as a launch with these argument values would specialise it: integer args equal to 1 become constexprs,
    multiples of 16 are marked divisible (Triton does both at launch), except the kernel's ``do_not_specialize``
    arguments (``no_spec``). ``args``: name -> (type, value or None)."""
    sig, const, div = {}, dict(constexprs), []
    for a, (ty, val) in args.items():
        if ty in ("i32", "i64") and val == 1 and a not in no_spec:
            const[a] = 1
            continue
        sig[a] = ty
        if ty in ("i32", "i64") and val is not None and val % 16 == 0 and a not in no_spec:
            div.append(a)
    return CompileSpec(name=name, fn=fn, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                       num_stages=cfg.get("num_stages", 3), maxnreg=cfg.get("maxnreg"),
                       meta={**meta, "divisible_by_16": div})


def _cache_args(Hkv: int, D: int, bs: int) -> dict:
    c = {}
    for x in ("k", "v"):
        for s, val in zip("bshd", (bs * Hkv * D, Hkv * D, D, 1)):
            c[f"stride_{x}{s}"] = ("i32", val)
    return c


# Page kinds of the compile specs: (name, KV_QUANT, page pointer type or None for q's). 8-bit pages come with fp16
# scales (contiguous [num_blocks, block_size, Hkv]; their strides are not specialised, so any layout compiles alike).
KV_KINDS = (("", 0, None), ("int8", 1, "*i8"), ("fp8", 2, "*u8"))


def _kv_args(kv_quant: int, page_ptr, ptr: str, Hkv: int, bs: int) -> tuple:
    """``(args, constexprs)`` of the page and scale arguments for one page kind."""
    pages = page_ptr or ptr
    args = {"kc_ptr": (pages, None), "vc_ptr": (pages, None)}
    if kv_quant == 0:
        return args, {"ks_ptr": None, "vs_ptr": None}, {a: ("i32", 0) for a in _SCALE_STRIDES}
    args.update({"ks_ptr": ("*fp16", None), "vs_ptr": ("*fp16", None)})
    strides = {f"stride_{x}s{s}": ("i32", v) for x in "kv" for s, v in zip("bsh", (bs * Hkv, Hkv, 1))}
    return args, {}, strides


def reachable_splits(Hkv: int, D: int, G: int, max_context: int, sliding_window=None) -> set:
    """Every split count ``decode_num_splits`` picks for this head layout over the compile gate's grid (each SM
    count, batch 1..MAX_BATCH, context 1..max_context). Its two factors are independent (one of batch and SMs, one
    of the context), so the set is the clamp of every pair of their values: the same set as the full product.
    Always a subset of ``SPLIT_BUCKETS``."""
    from llmkern.kernels import _layouts as L

    occ = {_splits_for_occupancy(B, Hkv, sms) for sms in L.SM_COUNTS for B in L.batches()}
    length = {_splits_for_length(c, D, sliding_window, G) for c in L.contexts(max_context)}
    return {_clamp_splits(o, n) for o in occ for n in length}


def _key(spec: CompileSpec) -> tuple:
    """What decides the compiled code: kernel, argument types, constexprs, divisibility, warps, stages."""
    return (spec.fn.__name__, tuple(sorted(spec.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())),
            tuple(sorted(spec.meta["divisible_by_16"])), spec.num_warps, spec.num_stages, spec.maxnreg)


def compile_specs() -> list:
    """The launch configs the heuristics (``decode_config``, ``decode_num_splits``, ``reduce_config``,
    ``prefill_config``) pick for every layout of ``kernels/_layouts.py`` at every SM count, batch 1..256 and context
    up to the layout's max_position_embeddings, in fp32/fp16/bf16, page sizes 16 and 1; one spec per distinct
    compiled kernel. ``meta["serves"]`` names the layouts a spec serves. The sliding window comes with the layouts
    that have one; a window + softcap variant (no supported model uses softcap) is compiled for every head_dim."""
    from llmkern.kernels import _layouts as L

    specs = {}

    def add(spec, layout):
        spec = specs.setdefault(_key(spec), spec)
        if layout not in spec.meta["serves"]:
            spec.meta["serves"].append(layout)

    max_blocks = 131  # a block-table row length with no special divisibility (not specialised anyway)
    for lname, Hq, Hkv, D, max_ctx, window in L.head_layouts():
        G = Hq // Hkv
        splits = reachable_splits(Hkv, D, G, max_ctx, window)
        for dtype, ptr in _PTR.items():
            dt = _DT[dtype]
            fp32 = dtype == torch.float32
            meta = {"dtype": dt, "serves": []}
            variants = [(window is not None, False), (True, True)]
            for bs, (use_window, use_softcap), (kvname, quant, page_ptr) in itertools.product(
                    L.BLOCK_SIZES, variants, KV_KINDS):
                tag = ("W" if use_window else "") + ("C" if use_softcap else "")
                win = (window or 4096) if use_window else 0
                kv_args, kv_const, scale_strides = _kv_args(quant, page_ptr, ptr, Hkv, bs)
                kmeta = {**meta, "kv": kvname or dt}
                pcfg = prefill_config(G, D, fp32, quant != 0)
                dcfg = decode_config(G, D, fp32, quant != 0)
                kvtag = "," + kvname if kvname else ""
                for store_lse in sorted({n > 1 for n in splits}):
                    S_ = max(splits) if store_lse else 1
                    out_ptr = "*fp32" if store_lse else ptr
                    args = {
                        "q_ptr": (ptr, None), **kv_args,
                        "bt_ptr": ("*i32", None), "seq_lens_ptr": ("*i32", None), "o_ptr": (out_ptr, None),
                        "lse_ptr": ("*fp32" if store_lse else ptr, None), "qk_scale": ("fp32", None),
                        "softcap": ("fp32", None), "window": ("i32", win),
                        "num_splits": ("i32", S_), "G": ("i32", G), "D": ("i32", D),
                        "stride_qb": ("i32", Hq * D), "stride_qh": ("i32", D), "stride_qd": ("i32", 1),
                        **_cache_args(Hkv, D, bs),
                        "stride_btb": ("i32", max_blocks), "stride_btn": ("i32", 1),
                        "stride_ob": ("i32", Hq * S_ * D), "stride_oh": ("i32", S_ * D),
                        "stride_os": ("i32", D if store_lse else 0), "stride_od": ("i32", 1),
                        "stride_lb": ("i32", Hq * 2 * S_ if store_lse else 0),
                        "stride_lh": ("i32", 2 * S_ if store_lse else 0), **scale_strides,
                    }
                    const = dict(BLOCK_SIZE=bs, BLOCK_G=dcfg["BLOCK_G"], BLOCK_N=dcfg["BLOCK_N"],
                                 BLOCK_D=dcfg["BLOCK_D"], USE_WINDOW=use_window, SOFTCAP=use_softcap,
                                 STORE_LSE=store_lse, F32_DOT=fp32, KV_QUANT=quant, **kv_const)
                    add(_spec(_paged_decode_split_kernel,
                              f"paged_decode_split[G={G},D={D},BLOCK_SIZE={bs},"
                              f"{'splits>1' if store_lse else 'splits=1'}{tag and ',' + tag},{dt}{kvtag}]",
                              args, const, dcfg, kmeta, _DECODE_NO_SPEC), lname)
                S = 64
                args = {
                    "q_ptr": (ptr, None), **kv_args, "bt_ptr": ("*i32", None),
                    "seq_lens_ptr": ("*i32", None), "q_lens_ptr": ("*i32", None), "o_ptr": (ptr, None),
                    "qk_scale": ("fp32", None), "softcap": ("fp32", None),
                    "window": ("i32", win), "S": ("i32", S), "G": ("i32", G), "D": ("i32", D),
                    # HF's q is a [b, s, H, d] buffer viewed as [b, H, s, d].
                    "stride_qb": ("i32", S * Hq * D), "stride_qh": ("i32", D), "stride_qs": ("i32", Hq * D),
                    "stride_qd": ("i32", 1), **_cache_args(Hkv, D, bs),
                    "stride_btb": ("i32", max_blocks), "stride_btn": ("i32", 1),
                    "stride_ob": ("i32", Hq * S * D), "stride_oh": ("i32", S * D), "stride_os": ("i32", D),
                    "stride_od": ("i32", 1), **scale_strides,
                }
                const = dict(BLOCK_SIZE=bs, BLOCK_M=pcfg["BLOCK_M"], BLOCK_N=pcfg["BLOCK_N"],
                             BLOCK_D=pcfg["BLOCK_D"], USE_WINDOW=use_window, SOFTCAP=use_softcap, F32_DOT=fp32,
                             KV_QUANT=quant, **kv_const)
                add(_spec(_paged_prefill_kernel,
                          f"paged_prefill[BLOCK_M={pcfg['BLOCK_M']},D={D},BLOCK_SIZE={bs}{tag and ',' + tag},"
                          f"{dt}{kvtag}]", args, const, pcfg, kmeta, _PREFILL_NO_SPEC), lname)
            for n in sorted(x for x in splits if x > 1):
                rcfg = reduce_config(n, D)
                args = {"po_ptr": ("*fp32", None), "lse_ptr": ("*fp32", None), "o_ptr": (ptr, None),
                        "c": ("fp32", None), "Hq": ("i32", Hq), "D": ("i32", D), "num_splits": ("i32", n),
                        "stride_ob": ("i32", Hq * D), "stride_oh": ("i32", D), "stride_od": ("i32", 1)}
                spec = _spec(_paged_decode_reduce_kernel,
                             f"paged_decode_reduce[BLOCK_S={rcfg['BLOCK_S']},D={D},{dt}]", args,
                             {"BLOCK_S": rcfg["BLOCK_S"], "BLOCK_D": rcfg["BLOCK_D"]}, rcfg,
                             {"dtype": dt, "serves": [], "num_splits": []}, _REDUCE_NO_SPEC)
                spec = specs.setdefault(_key(spec), spec)
                if lname not in spec.meta["serves"]:
                    spec.meta["serves"].append(lname)
                if n not in spec.meta["num_splits"]:
                    spec.meta["num_splits"].append(n)
    return list(specs.values())
