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
    softmax in base 2 (``exp2``; the scale carries log2(e)); fp32 accumulation. Writes the normalised partial output
    ``[B, Hq, num_splits, D]`` and its log-sum-exp (base 2) ``[B, Hq, num_splits]``. A split with no tokens writes
    LSE = -inf and a zero partial, never 0/0.
  * stage 2, grid ``(B, Hq)``: weights ``exp2(lse_i - max lse)`` (an empty split weighs exactly 0), fixed order, so
    the result is deterministic. With ``num_splits == 1`` stage 1 writes the final output itself and stage 2 is
    skipped.

Prefill, one launch, grid ``(B, Hkv, cdiv(S * G, BLOCK_M))``: the GQA group's query rows are flattened with the
sequence rows (row r = s * G + g) so again one program's K/V tiles serve the whole group. Row s of sequence b is at
position ``seq_lens[b] - S + s``; rows ``s < S - q_lens[b]`` are left padding and get zeros. Each program walks only
the K/V tiles its rows can see (causal, and the window), and masks per element.

Casting follows flash-attention practice and matches eager's rounding points: logits in fp32, probabilities cast to
the K/V dtype before the PV product (eager casts softmax output to the input dtype too), fp32 accumulation. fp32
inputs use ``input_precision="tf32x3"`` (three TF32 tensor-core products, near-fp32 accuracy; plain TF32 would
exceed eager's fp32 error and IEEE FMA dots spill at these tile sizes).
"""

import functools

import torch
import triton
import triton.language as tl

from llmkern.kernels._specs import CompileSpec

LOG2E = 1.4426950408889634
# SM count used by the split heuristic when the tensors are not on a GPU (interpreter runs): an A100's.
NOMINAL_SMS = 108
MAX_NUM_SPLITS = 256
# A split should hold at least this many BLOCK_N tiles: below that the q load, the partial write and the reduce
# cost more than the parallelism gains.
MIN_TILES_PER_SPLIT = 4


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates to +-1 without inf/inf for large |x|.
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
    s,  # [R, BLOCK_N] fp32 base-2 logits of this tile, -inf where not visible
    m_i,  # [R] running max
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
    that has seen only -inf keeps m = -inf and shifts by 0, so it never produces NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = k_off
    if (stride_vb != stride_kb) | (stride_vs != stride_ks):
        v_off = _page_offsets(bt_row, stride_btn, pos, tile_start, valid, stride_vb, stride_vs, BLOCK_SIZE,
                              BLOCK_N)
    v = tl.load(vc_ptr + (v_off + kvh64 * stride_vh)[:, None] + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if F32_DOT:
        p_in = p.to(vc_ptr.dtype.element_ty).to(tl.float32)  # rounded as the native path rounds it
        acc = acc * alpha[:, None] + tl.dot(p_in, v.to(tl.float32), input_precision="tf32x3")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,  # [B, Hq, D] strided
    kc_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] strided
    vc_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D] strided
    bt_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    o_ptr,  # [B, Hq, num_splits, D]: fp32 partials (or the final [B, Hq, D] output when STORE_LSE is False)
    lse_ptr,  # [B, Hq, num_splits] fp32, base-2 log-sum-exp of each split
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
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    STORE_LSE: tl.constexpr,
    F32_DOT: tl.constexpr,  # dots on fp32 operands, 3xTF32 (fp32 inputs; bf16 in the interpreter)
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
        k_off = _page_offsets(bt_row, stride_btn, pos, tile_start, valid, stride_kb, stride_ks, BLOCK_SIZE, BLOCK_N)
        k = tl.load(kc_ptr + (k_off + kvh64 * stride_kh)[:, None] + d[None, :] * stride_kd, mask=kv_mask,
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))  # [BLOCK_G, BLOCK_N] fp32
        if SOFTCAP:
            s = (softcap * _tanh(s * qk_scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_pv(s, m_i, l_i, acc, vc_ptr, k_off, kvh64, bt_row, stride_btn, pos,
                                           tile_start, valid, d, kv_mask, stride_kb, stride_ks, stride_vb,
                                           stride_vs, stride_vh, stride_vd, BLOCK_SIZE, BLOCK_N, F32_DOT)

    has = l_i > 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    o_mask = gmask[:, None] & dmask[None, :]
    tl.store(o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=o_mask)
    if STORE_LSE:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b64 * stride_lb + heads * stride_lh + split, lse, mask=gmask)


@triton.jit
def _paged_decode_reduce_kernel(
    po_ptr,  # [B, Hq, num_splits, D] fp32 contiguous partial outputs
    lse_ptr,  # [B, Hq, num_splits] fp32 contiguous, base 2
    o_ptr,  # [B, Hq, D] output
    Hq,
    D,
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = sp < num_splits
    dmask = d < D
    row = (b.to(tl.int64) * Hq + h) * num_splits
    lse = tl.load(lse_ptr + row + sp, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # exactly 0 for empty splits (lse = -inf)
    used = smask & (w > 0.0)
    po = tl.load(po_ptr + (row + sp)[:, None] * D + d[None, :], mask=used[:, None] & dmask[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * po, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=dmask)


@triton.jit
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
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    F32_DOT: tl.constexpr,  # dots on fp32 operands, 3xTF32 (fp32 inputs; bf16 in the interpreter)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    mt = tl.program_id(2)
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
        k_off = _page_offsets(bt_row, stride_btn, pos, tile_start, valid, stride_kb, stride_ks, BLOCK_SIZE, BLOCK_N)
        k = tl.load(kc_ptr + (k_off + kvh64 * stride_kh)[:, None] + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
        if SOFTCAP:
            s = (softcap * _tanh(s * qk_scale / softcap)) * 1.4426950408889634
        else:
            s = s * qk_scale
        vis = real[:, None] & valid[None, :] & (pos[None, :] <= qpos[:, None])
        if USE_WINDOW:
            vis = vis & (pos[None, :] > qpos[:, None] - window)
        s = tl.where(vis, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_pv(s, m_i, l_i, acc, vc_ptr, k_off, kvh64, bt_row, stride_btn, pos,
                                           tile_start, valid, d, kv_mask, stride_kb, stride_ks, stride_vb,
                                           stride_vs, stride_vh, stride_vd, BLOCK_SIZE, BLOCK_N, F32_DOT)

    has = l_i > 0.0
    out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
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


def decode_config(G: int, D: int, fp32: bool = False) -> dict:
    """Stage-1 tiles for group size ``G``, head_dim ``D`` and input width.

    ``BLOCK_G = max(16, next_pow2(G))`` (tl.dot needs 16 rows); ``BLOCK_D = next_pow2(D)`` (80 and 96 pad to 128).
    16-bit inputs: ``BLOCK_N`` 64 tokens (32 for D = 256) so a K and a V tile stay at 16 KB, 4 warps for D = 128 and
    8 otherwise, 3 stages (the combination that compiles with no spill for every spec on sm_80 and sm_90). fp32
    inputs run 3xTF32 dots, whose hi/lo operand splits double the operand registers: ``BLOCK_N`` 32 (16 for
    D = 256) and 8 warps keep them out of local memory.
    """
    block_d = max(16, triton.next_power_of_2(D))
    block_g = max(16, triton.next_power_of_2(G))
    if fp32:
        block_n = 32 if block_d <= 128 else 16
        num_warps = 8
    else:
        block_n = 64 if block_d <= 128 else 32
        # 4 warps are enough for D = 128; for D = 64 ptxas then caps some variants at 64 registers and spills a
        # few bytes (sliding window + softcap, small pages), and D = 256 needs the room: 8 warps there.
        num_warps = 4 if block_d == 128 else 8
    if block_g >= 64:  # very wide groups (no supported model): keep the S tile and accumulator in registers
        block_n = min(block_n, 32)
    return {"BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps, "num_stages": 3}


def decode_num_splits(B: int, Hkv: int, max_seq_len: int, D: int, sliding_window=None, sms: int = NOMINAL_SMS,
                      G: int = 1) -> int:
    """Splits per sequence: enough programs for about two waves of the GPU (``2 * sms`` over ``B * Hkv`` programs),
    but every split keeps at least ``MIN_TILES_PER_SPLIT`` tiles of the longest visible range; at most
    ``MAX_NUM_SPLITS``. A large batch gets 1 split (no reduce launch); one long sequence gets many."""
    visible = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window + 64)
    block_n = decode_config(G, D)["BLOCK_N"]
    tiles = triton.cdiv(max(visible, 1), block_n)
    want = triton.cdiv(2 * sms, max(1, B * Hkv))
    return int(max(1, min(want, tiles // MIN_TILES_PER_SPLIT, MAX_NUM_SPLITS)))


def reduce_config(num_splits: int, D: int) -> dict:
    return {"BLOCK_S": max(2, triton.next_power_of_2(num_splits)), "BLOCK_D": max(16, triton.next_power_of_2(D)),
            "num_warps": 8 if num_splits * D >= 8192 else (4 if num_splits * D >= 2048 else 2)}


def prefill_config(G: int, D: int, fp32: bool = False) -> dict:
    """Prefill tiles: ``BLOCK_M`` flattened (query row, group head) rows, ``BLOCK_N`` tokens,
    ``BLOCK_D = next_pow2(D)``, 8 warps (4 warps reach 255 registers: the per-row position/mask vectors and the
    gathered int64 K/V row offsets come on top of the usual flash-attention tiles). 16-bit: 64 x 64 (64 x 32 for
    D = 256). fp32 (3xTF32 dots, operand registers doubled): 32 x 32 for D <= 64, 32 x 16 for D = 128, 16 x 16 for
    D = 256 -- the largest tiles that compile without spills for sm_80 and sm_90."""
    block_d = max(16, triton.next_power_of_2(D))
    if fp32:
        block_m, block_n = (32, 32) if block_d <= 64 else ((32, 16) if block_d <= 128 else (16, 16))
    else:
        block_m, block_n = (64, 64) if block_d <= 128 else (64, 32)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 2}


# --------------------------------------------------------------------------------------------------------------------
# Launchers (inputs validated by llmkern.paged_ops)


def _f32_dot(q) -> bool:
    # fp32 inputs: 3xTF32 dots (near-fp32 accuracy on tensor cores), to stay within eager's fp32 error. bf16 under
    # the interpreter (CPU tensors): its tl.dot multiplies numpy arrays and numpy has no bf16, so the operands go in
    # as fp32 copies -- the same numbers a bf16 tensor-core dot computes (bf16 products are exact in fp32,
    # accumulation is fp32).
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type != "cuda")


def _scales(scale: float, softcap):
    # With softcap the tanh needs natural-unit logits; the log2(e) factor is applied after it.
    return (float(scale), float(softcap)) if softcap is not None else (float(scale) * LOG2E, 1.0)


def paged_decode_fwd(q, k_cache, v_cache, block_tables, seq_lens, out, scale: float, sliding_window, softcap,
                     num_splits: int) -> None:
    """Stage 1 over (B, Hkv, num_splits), then stage 2 over (B, Hq) unless ``num_splits == 1``."""
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    cfg = decode_config(G, D, q.dtype == torch.float32)
    qk_scale, cap = _scales(scale, softcap)
    window = int(sliding_window) if sliding_window is not None else 0
    consts = dict(BLOCK_SIZE=bs, BLOCK_G=cfg["BLOCK_G"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                  USE_WINDOW=sliding_window is not None, SOFTCAP=softcap is not None, F32_DOT=_f32_dot(q),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    common = (*q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride())
    grid = (B, Hkv, num_splits)
    if num_splits == 1:
        _paged_decode_split_kernel[grid](
            q, k_cache, v_cache, block_tables, seq_lens, out, out, qk_scale, cap, window, 1, G, D, *common,
            out.stride(0), out.stride(1), 0, out.stride(2), 0, 0, STORE_LSE=False, **consts)
        return
    part = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
    _paged_decode_split_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse, qk_scale, cap, window, num_splits, G, D, *common,
        *part.stride(), lse.stride(0), lse.stride(1), STORE_LSE=True, **consts)
    rcfg = reduce_config(num_splits, D)
    _paged_decode_reduce_kernel[(B, Hq)](
        part, lse, out, Hq, D, num_splits, *out.stride(),
        BLOCK_S=rcfg["BLOCK_S"], BLOCK_D=rcfg["BLOCK_D"], num_warps=rcfg["num_warps"])


def paged_prefill_fwd(q, k_cache, v_cache, block_tables, seq_lens, q_lens, out, scale: float, sliding_window,
                      softcap) -> None:
    """One launch over (B, Hkv, query-row tiles of the flattened (s, group head) rows)."""
    B, Hq, S, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    cfg = prefill_config(G, D, q.dtype == torch.float32)
    qk_scale, cap = _scales(scale, softcap)
    window = int(sliding_window) if sliding_window is not None else 0
    grid = (B, Hkv, triton.cdiv(S * G, cfg["BLOCK_M"]))
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, q_lens, out, qk_scale, cap, window, S, G, D,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        BLOCK_SIZE=bs, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        USE_WINDOW=sliding_window is not None, SOFTCAP=softcap is not None, F32_DOT=_f32_dot(q),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# --------------------------------------------------------------------------------------------------------------------
# Compile specs (kernels/_specs.py): the configs the heuristics pick for the supported head layouts.

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (Hq, Hkv, D): SmolLM2-135M, Qwen2.5-0.5B, Qwen2.5-7B, Llama-3-8B, Llama-2-7B, and head_dim 80/96/256 variants.
SPEC_LAYOUTS = [(9, 3, 64), (14, 2, 64), (28, 4, 128), (32, 8, 128), (32, 32, 128), (32, 8, 80), (32, 32, 96),
                (16, 8, 256)]
SPEC_BLOCK_SIZES = (16, 1)


def _spec(fn, name: str, args: dict, constexprs: dict, cfg: dict, meta: dict) -> CompileSpec:
    """A spec as a launch with these argument values would specialise it: integer args equal to 1 become constexprs,
    multiples of 16 are marked divisible (Triton does both at launch). ``args``: name -> (type, value or None)."""
    sig, const, div = {}, dict(constexprs), []
    for a, (ty, val) in args.items():
        if ty in ("i32", "i64") and val == 1:
            const[a] = 1
            continue
        sig[a] = ty
        if ty in ("i32", "i64") and val is not None and val % 16 == 0:
            div.append(a)
    return CompileSpec(name=name, fn=fn, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                       num_stages=cfg.get("num_stages", 3), meta={**meta, "divisible_by_16": div})


def _cache_args(Hkv: int, D: int, bs: int) -> dict:
    c = {}
    for x in ("k", "v"):
        for s, val in zip("bshd", (bs * Hkv * D, Hkv * D, D, 1)):
            c[f"stride_{x}{s}"] = ("i32", val)
    return c


def compile_specs() -> list:
    specs = []
    max_blocks = 131  # a block-table row length with no special divisibility
    for dtype, ptr in _PTR.items():
        dt = _DT[dtype]
        for Hq, Hkv, D in SPEC_LAYOUTS:
            G = Hq // Hkv
            meta = {"Hq": Hq, "Hkv": Hkv, "D": D, "dtype": dt}
            fp32 = dtype == torch.float32
            dcfg = decode_config(G, D, fp32)
            pcfg = prefill_config(G, D, fp32)
            for bs in SPEC_BLOCK_SIZES:
                # Sliding window + softcap only for one layout per dtype: they add a mask and a tanh, not registers.
                variants = [(False, False)] + ([(True, True)] if (Hq, Hkv, D) == (14, 2, 64) else [])
                for use_window, use_softcap in variants:
                    tag = ("W" if use_window else "") + ("C" if use_softcap else "")
                    for splits in (1, 8):
                        store_lse = splits > 1
                        S_ = splits
                        out_ptr = "*fp32" if store_lse else ptr
                        args = {
                            "q_ptr": (ptr, None), "kc_ptr": (ptr, None), "vc_ptr": (ptr, None),
                            "bt_ptr": ("*i32", None), "seq_lens_ptr": ("*i32", None), "o_ptr": (out_ptr, None),
                            "lse_ptr": ("*fp32" if store_lse else ptr, None), "qk_scale": ("fp32", None),
                            "softcap": ("fp32", None), "window": ("i32", 4096 if use_window else 0),
                            "num_splits": ("i32", splits), "G": ("i32", G), "D": ("i32", D),
                            "stride_qb": ("i32", Hq * D), "stride_qh": ("i32", D), "stride_qd": ("i32", 1),
                            **_cache_args(Hkv, D, bs),
                            "stride_btb": ("i32", max_blocks), "stride_btn": ("i32", 1),
                            "stride_ob": ("i32", Hq * S_ * D), "stride_oh": ("i32", S_ * D),
                            "stride_os": ("i32", D if store_lse else 0), "stride_od": ("i32", 1),
                            "stride_lb": ("i32", Hq * S_ if store_lse else 0),
                            "stride_lh": ("i32", S_ if store_lse else 0),
                        }
                        const = dict(BLOCK_SIZE=bs, BLOCK_G=dcfg["BLOCK_G"], BLOCK_N=dcfg["BLOCK_N"],
                                     BLOCK_D=dcfg["BLOCK_D"], USE_WINDOW=use_window, SOFTCAP=use_softcap,
                                     STORE_LSE=store_lse, F32_DOT=dtype == torch.float32)
                        specs.append(_spec(
                            _paged_decode_split_kernel,
                            f"paged_decode_split[{Hq}/{Hkv}/{D},BLOCK_SIZE={bs},splits={splits}{tag and ',' + tag},"
                            f"{dt}]", args, const, dcfg, meta))
                    S = 64
                    args = {
                        "q_ptr": (ptr, None), "kc_ptr": (ptr, None), "vc_ptr": (ptr, None), "bt_ptr": ("*i32", None),
                        "seq_lens_ptr": ("*i32", None), "q_lens_ptr": ("*i32", None), "o_ptr": (ptr, None),
                        "qk_scale": ("fp32", None), "softcap": ("fp32", None),
                        "window": ("i32", 4096 if use_window else 0), "S": ("i32", None), "G": ("i32", G),
                        "D": ("i32", D),
                        # HF's q is a [b, s, H, d] buffer viewed as [b, H, s, d].
                        "stride_qb": ("i32", S * Hq * D), "stride_qh": ("i32", D), "stride_qs": ("i32", Hq * D),
                        "stride_qd": ("i32", 1), **_cache_args(Hkv, D, bs),
                        "stride_btb": ("i32", max_blocks), "stride_btn": ("i32", 1),
                        "stride_ob": ("i32", Hq * S * D), "stride_oh": ("i32", S * D), "stride_os": ("i32", D),
                        "stride_od": ("i32", 1),
                    }
                    const = dict(BLOCK_SIZE=bs, BLOCK_M=pcfg["BLOCK_M"], BLOCK_N=pcfg["BLOCK_N"],
                                 BLOCK_D=pcfg["BLOCK_D"], USE_WINDOW=use_window, SOFTCAP=use_softcap,
                                 F32_DOT=dtype == torch.float32)
                    specs.append(_spec(_paged_prefill_kernel,
                                       f"paged_prefill[{Hq}/{Hkv}/{D},BLOCK_SIZE={bs}{tag and ',' + tag},{dt}]",
                                       args, const, pcfg, meta))
        for D in sorted({d for _, _, d in SPEC_LAYOUTS}):
            for splits in (8, 64):
                rcfg = reduce_config(splits, D)
                args = {"po_ptr": ("*fp32", None), "lse_ptr": ("*fp32", None), "o_ptr": (ptr, None),
                        "Hq": ("i32", None), "D": ("i32", D), "num_splits": ("i32", splits),
                        "stride_ob": ("i32", None), "stride_oh": ("i32", D), "stride_od": ("i32", 1)}
                specs.append(_spec(_paged_decode_reduce_kernel, f"paged_decode_reduce[D={D},splits={splits},{dt}]",
                                   args, {"BLOCK_S": rcfg["BLOCK_S"], "BLOCK_D": rcfg["BLOCK_D"]}, rcfg,
                                   {"D": D, "dtype": dt}))
    return specs
