"""Pure-torch references for every op, written the way Hugging Face eager computes them.

They are the correctness oracle of the tests and the last-resort implementation when no kernel backend fits.
Casting order is copied from transformers' modules (LlamaRMSNorm, apply_rotary_pos_emb, LlamaMLP): the row ops here
are bit-equal to eager, RoPE included (the kernels round RoPE once from fp32; README.md, "Where fp16/bf16 results are
rounded"). The paged attention references are not eager's order: they compute in fp32 and round only the output.
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    # fp32 as HF does for fp32/fp16/bf16 inputs; fp64 inputs stay fp64 so tests can build an exact oracle.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * h.to(x.dtype)
    return (h * (offset + weight.to(h.dtype))).to(x.dtype)


def fused_add_rms_norm(x, residual, weight, eps: float):
    s = residual + x
    return rms_norm(s, weight, eps), s


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(q, k, cos, sin):
    rd = cos.shape[-1]
    c = cos.unsqueeze(1)
    s = sin.unsqueeze(1)

    def one(x):
        xr, xp = x[..., :rd], x[..., rd:]
        out = (xr * c) + (_rotate_half(xr) * s)
        return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out

    return one(q), one(k)


def silu_and_mul(gate, up):
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------------------------
# Paged KV cache. Pages are ``[num_blocks, block_size, Hkv, D]`` (NHD); slot = block * block_size + offset.


# 8-bit pages (``kv_dtype`` int8 or fp8_e4m3): each token's row of one KV head, ``D`` elements, is stored as
# ``round(x / s)`` with one scale ``s`` per (token, KV head), kept beside the pages in ``k_scales``/``v_scales``
# ``[num_blocks, block_size, Hkv]`` float16 (2 bytes per row: at head_dim 64, 8-bit pages + scales are 0.516 x the
# bf16 pages' bytes). Symmetric: ``s = amax(|x|) / QMAX`` rounded to fp16, clamped to [SCALE_MIN, SCALE_MAX] (a zero
# row gets SCALE_MIN and stores zeros), then ``x / s`` rounded to nearest (int8: clamped to +-127; fp8: clamped to
# +-448, then rounded to e4m3). Dequantized value: ``q * s`` in fp32. Every backend quantizes this way; quotients
# exactly halfway between two codes may round either way on GPUs (approximate division), so tests compare codes
# within one step and dequantized values within the rounding bound.
KV_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
KV_DTYPES = tuple(KV_QMAX)
SCALE_DTYPE = torch.float16
SCALE_MIN = 2.0 ** -14  # fp16's smallest normal number
SCALE_MAX = 65504.0  # fp16's largest


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> (codes ``[..., D]`` of ``dtype``, scales ``[...]`` float16), one scale per row."""
    qmax = KV_QMAX[dtype]
    xf = x.float()
    s = (xf.abs().amax(-1) / qmax).clamp(SCALE_MIN, SCALE_MAX).to(SCALE_DTYPE)
    y = (xf / s.float().unsqueeze(-1)).clamp(-qmax, qmax)
    q = y.round().to(torch.int8) if dtype == torch.int8 else y.to(dtype)
    return q, s


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes ``[..., D]`` times their row's scale ``[...]``, in fp32, then ``dtype`` (fp64 stays exact)."""
    acc = torch.promote_types(dtype, torch.float32)
    return (codes.to(acc) * scales.to(acc).unsqueeze(-1)).to(dtype)


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into the pages at ``slot_mapping`` ``[T]``; slots < 0 are skipped.
    8-bit pages (``k_scales``/``v_scales`` given): quantized as ``quantize_kv`` says, codes and scales together."""
    bs = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blk, off = slots // bs, slots % bs
    if k_scales is None:
        k_cache[blk, off] = key[valid].to(k_cache.dtype)
        v_cache[blk, off] = value[valid].to(v_cache.dtype)
        return
    for x, cache, scales in ((key, k_cache, k_scales), (value, v_cache, v_scales)):
        q, s = quantize_kv(x[valid], cache.dtype)
        # index_put on float8 pages is not implemented everywhere: written as int8 bits.
        cache.view(torch.int8)[blk, off] = q.view(torch.int8)
        scales[blk, off] = s


def gather_rows(cache, scales, index, dtype):
    """Token rows ``cache[index]`` (``index``: a tuple indexing the leading dimensions) in ``dtype``, dequantized
    when ``scales`` is given (8-bit pages are gathered as int8 bits: float8 indexing is not implemented everywhere)."""
    if scales is None:
        return cache[index].to(dtype)
    return dequantize_kv(cache.view(torch.int8)[index].view(cache.dtype), scales[index], dtype)


def copy_blocks(k_cache, v_cache, src, dst) -> None:
    """Copy whole pages ``src[i] -> dst[i]`` in both caches (copy-on-write); bits, any dtype."""
    for c in (k_cache, v_cache):
        c = c.view(torch.int8) if c.element_size() == 1 else c
        c[dst] = c[src]


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale: float,
                            sliding_window=None, softcap=None, k_scales=None, v_scales=None):
    """Gather the pages into ``[B, Hkv, L, D]`` and run masked softmax attention, accumulating in fp32 (fp64 stays
    fp64). Row ``s`` of ``q[b]`` is at position ``seq_lens[b] - S + s``; rows ``s < S - q_lens[b]`` are left padding
    and return zeros. A query at position p sees keys ``max(0, p - window + 1) .. p``."""
    B, Hq, S, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    L = int(seq_lens.max().item()) if B else 0
    if L == 0:
        return torch.zeros_like(q)
    if L > block_tables.shape[1] * bs:
        raise ValueError(f"seq_lens reach {L} tokens but block_tables holds only {block_tables.shape[1]} pages of "
                         f"{bs}")
    kpos = torch.arange(L, device=dev)
    blocks = block_tables.long()[:, kpos // bs].clamp(0, k_cache.shape[0] - 1)  # [B, L]; junk past seq_len, masked
    k = gather_rows(k_cache, k_scales, (blocks, kpos % bs), acc).permute(0, 2, 1, 3)  # [B, Hkv, L, D]
    v = gather_rows(v_cache, v_scales, (blocks, kpos % bs), acc).permute(0, 2, 1, 3)
    # Rows past a sequence's length are whatever the pages hold (NaN, stale codes): zeroed, as the kernels never
    # read them (a masked logit is dropped, but 0 * NaN in P @ V is not).
    junk = (kpos[None, :] >= seq_lens.long()[:, None])[:, None, :, None]  # [B, 1, L, 1]
    k, v = k.masked_fill(junk, 0), v.masked_fill(junk, 0)
    qf = q.to(acc).reshape(B, Hkv, G, S, D)
    logits = torch.einsum("bhgsd,bhld->bhgsl", qf, k) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    seq = seq_lens.long()[:, None]
    s_idx = torch.arange(S, device=dev)[None, :]
    qpos = seq - S + s_idx  # [B, S]
    row_ok = s_idx >= S - q_lens.long()[:, None]  # [B, S]
    mask = kpos[None, None, :] <= qpos[:, :, None]
    if sliding_window is not None:
        mask = mask & (kpos[None, None, :] > qpos[:, :, None] - sliding_window)
    mask = (mask & row_ok[:, :, None])[:, None, None]  # [B, 1, 1, S, L]
    logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    p = torch.where(mask.any(-1, keepdim=True), p, torch.zeros((), dtype=acc, device=dev))
    out = torch.einsum("bhgsl,bhld->bhgsd", p, v).reshape(B, Hq, S, D)
    return out.to(q.dtype)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale: float, sliding_window=None,
                           softcap=None, k_scales=None, v_scales=None):
    """Decode is prefill with one query row per sequence: ``q [B, Hq, D]`` sits at position ``seq_lens[b] - 1``."""
    q_lens = torch.ones_like(seq_lens)
    out = paged_prefill_attention(q.unsqueeze(2), k_cache, v_cache, block_tables, seq_lens, q_lens, scale,
                                  sliding_window, softcap, k_scales, v_scales)
    return out.squeeze(2)
