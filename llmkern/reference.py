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


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into the pages at ``slot_mapping`` ``[T]``; slots < 0 are skipped."""
    bs = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blk, off = slots // bs, slots % bs
    k_cache[blk, off] = key[valid].to(k_cache.dtype)
    v_cache[blk, off] = value[valid].to(v_cache.dtype)


def copy_blocks(k_cache, v_cache, src, dst) -> None:
    """Copy whole pages ``src[i] -> dst[i]`` in both caches (copy-on-write)."""
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]


def paged_prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, q_lens, scale: float,
                            sliding_window=None, softcap=None):
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
    k = k_cache[blocks, kpos % bs].permute(0, 2, 1, 3).to(acc)  # [B, Hkv, L, D]
    v = v_cache[blocks, kpos % bs].permute(0, 2, 1, 3).to(acc)
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
                           softcap=None):
    """Decode is prefill with one query row per sequence: ``q [B, Hq, D]`` sits at position ``seq_lens[b] - 1``."""
    q_lens = torch.ones_like(seq_lens)
    out = paged_prefill_attention(q.unsqueeze(2), k_cache, v_cache, block_tables, seq_lens, q_lens, scale,
                                  sliding_window, softcap)
    return out.squeeze(2)
