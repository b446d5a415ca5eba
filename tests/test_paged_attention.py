"""Paged decode / prefill attention (llmkern.paged_ops) against Hugging Face's eager attention.

Each case writes per-sequence K/V ``[B, Hkv, L, D]`` into randomly permuted pages whose unused rows are NaN (a stray
read of an unwritten slot shows up as a non-finite output), then compares the kernel with
``transformers.models.llama.modeling_llama.eager_attention_forward`` in the test dtype (Gemma-2's for softcap) under
the tolerance rule of ``llmkern.testing``: an fp64 oracle, and no worse than eager, element by element.
Under the Triton interpreter the kernels are slow: shapes are small except for a few targeted cases.
"""

import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

import llmkern
from llmkern import _ext, paged_ops
from llmkern.testing import assert_no_worse_than_eager

I32 = torch.int32


# ---------------------------------------------------------------------------------------------------------------------
# Building paged caches and the references


class _Attn(nn.Module):
    """The two attributes eager_attention_forward reads from the attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.training = False


def make_paged(lens, bs, Hkv, D, dtype, device, *, extra_blocks=3, seed=0):
    """Per-sequence K/V ``[B, Hkv, L, D]`` (L = max(lens), junk past each length) scattered into permuted pages.
    Unwritten cache rows hold NaN; unused block-table entries hold an out-of-range page id."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lens), max(max(lens), 1)
    K = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    V = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    pages = [-(-n // bs) for n in lens]
    nb = sum(pages) + extra_blocks
    perm = torch.randperm(nb, generator=g)
    max_blocks = max(max(pages), 1) + 1
    bt = torch.full((B, max_blocks), 1 << 30, dtype=I32)
    kc = torch.full((nb, bs, Hkv, D), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    used = 0
    for b, n in enumerate(lens):
        ids = perm[used:used + pages[b]]
        used += pages[b]
        bt[b, :pages[b]] = ids.to(I32)
        pos = torch.arange(n)
        kc[ids[pos // bs], pos % bs] = K[b, :, :n].transpose(0, 1)
        vc[ids[pos // bs], pos % bs] = V[b, :, :n].transpose(0, 1)
    to = dict(device=device)
    return kc.to(**to), vc.to(**to), bt.to(**to), torch.tensor(lens, dtype=I32, device=device), K, V


def _visible(lens, q_lens, S, L, window):
    """``[B, S, L]`` bool: query row s of sequence b (position lens[b] - S + s, real iff s >= S - q_lens[b]) sees
    key position j."""
    lens_t = torch.tensor(lens)[:, None, None]
    s = torch.arange(S)[None, :, None]
    j = torch.arange(L)[None, None, :]
    qpos = lens_t - S + s
    vis = (j <= qpos) & (s >= S - torch.tensor(q_lens)[:, None, None])
    if window is not None:
        vis &= j > qpos - window
    return vis


def _probs(q4, K, lens, q_lens, scale, window=None, softcap=None):
    """fp64 ``(p, logits, visible)`` ``[B, Hq, S, L]``: softmax weights (rows that see nothing: 0) and their logits."""
    G = q4.shape[1] // K.shape[1]
    k = K.double().repeat_interleave(G, 1)
    logits = q4.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    vis = _visible(lens, q_lens, q4.shape[2], K.shape[2], window)[:, None]
    p = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    return p, logits, vis


def oracle(q4, K, V, lens, q_lens, scale, window=None, softcap=None):
    """fp64 attention ``[B, Hq, S, D]``; rows that see nothing (padding) are zero."""
    G = q4.shape[1] // K.shape[1]
    p, _, _ = _probs(q4, K, lens, q_lens, scale, window, softcap)
    return p @ V.double().repeat_interleave(G, 1)


def error_scale(q4, K, V, lens, q_lens, scale, window=None, softcap=None):
    """The magnitude an output's rounding errors scale with (the ``scale`` of
    ``llmkern.testing.assert_no_worse_than_eager``), per output element:
    ``S_i = sum_j p_j |v_ji|``, plus ``k * sum_j p_j |v_ji - o_i| (a_j + |x_j - m| + 1)`` with ``k = eps(fp32) /
    eps(dtype)``. ``max|out|`` is the wrong one for attention: averaging many values of mixed sign makes an output far
    smaller than the terms it was rounded from (a row over 300 keys comes out ~3x smaller), and the 1.5 x eager term
    then compares two single rounding errors, which differ with the CPU's instruction set (AVX-512 against AVX2 torch
    kernels). The second term is the fp32 scores' own error (llmkern/testing.py, the fp32 derivation: a score x_j's
    dot product errs in proportion to a_j = scale * sum_d |q_d k_jd|, its exp in proportion to |x_j - m|), which
    reaches output i weighted by p_j |v_ji - o_i|; it matters in fp32 only (k = 1; 2^-13 and 2^-16 in fp16 and
    bf16)."""
    G = q4.shape[1] // K.shape[1]
    p, x, vis = _probs(q4, K, lens, q_lens, scale, window, softcap)
    v = V.double().repeat_interleave(G, 1)
    o = p @ v
    a = q4.double().abs() @ K.double().abs().repeat_interleave(G, 1).transpose(-1, -2) * scale
    m = x.masked_fill(~vis, float("-inf")).amax(-1, keepdim=True)
    pe = p * torch.where(vis, a + (x - m).abs() + 1, 0.0)  # [B, Hq, S, L]
    spread = torch.stack([torch.einsum("hsl,hsld->hsd", pe[i], (v[i, :, None] - o[i, :, :, None]).abs())
                          for i in range(len(lens))])  # one sequence at a time: [Hq, S, L, D] each
    k = torch.finfo(torch.float32).eps / torch.finfo(q4.dtype).eps
    return p @ v.abs() + k * spread


def eager(q4, K, V, lens, q_lens, scale, window=None, softcap=None):
    """HF eager attention in q4's dtype, ``[B, Hq, S, D]`` (padding rows: whatever eager gives)."""
    dtype = q4.dtype
    G = q4.shape[1] // K.shape[1]
    vis = _visible(lens, q_lens, q4.shape[2], K.shape[2], window)[:, None]
    mask = torch.zeros(vis.shape, dtype=dtype).masked_fill(~vis, torch.finfo(dtype).min)
    if softcap is None:
        out, _ = llama_eager(_Attn(G), q4, K, V, mask, scaling=scale)
    else:
        out, _ = gemma2_eager(_Attn(G), q4, K, V, mask, scaling=scale, softcap=softcap)
    return out.transpose(1, 2)


def check_decode(q, kc, vc, bt, seq_lens, K, V, lens, scale, *, what, **kw):
    opts = {k: v for k, v in kw.items() if k in ("sliding_window", "softcap")}
    with llmkern.track() as ran:
        out = paged_ops.paged_decode_attention(q, kc, vc, bt, seq_lens, scale, **kw)
    assert ran.backends("paged_decode_attention") == {"triton"}
    assert out.shape == q.shape and out.dtype == q.dtype
    q4 = q.cpu().unsqueeze(2)
    ones = [1] * len(lens)
    w, c = opts.get("sliding_window"), opts.get("softcap")
    ref = oracle(q4, K, V, lens, ones, scale, w, c).squeeze(2)
    eag = eager(q4, K, V, lens, ones, scale, w, c).squeeze(2)
    mag = error_scale(q4, K, V, lens, ones, scale, w, c).squeeze(2)
    live = torch.tensor(lens) > 0
    assert_no_worse_than_eager(out.cpu()[live], eag[live], ref[live], what=what, scale=mag[live])
    assert (out.cpu()[~live] == 0).all()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Decode


LENS = [1, 17, 300]


@pytest.mark.parametrize("bs", [1, 16, 64])
@pytest.mark.parametrize("G", [1, 2, 4, 7, 8])
def test_decode_block_sizes_and_groups(bs, G, device):
    Hkv, D = 2, 64
    kc, vc, bt, sl, K, V = make_paged(LENS, bs, Hkv, D, torch.float32, device)
    q = torch.randn(len(LENS), G * Hkv, D, device=device)
    check_decode(q, kc, vc, bt, sl, K, V, LENS, D ** -0.5, num_splits=3, what=f"bs={bs} G={G}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_decode_head_dims_dtypes(D, dtype, device):
    lens, Hkv, G = [5, 17, 128], 2, 7  # 128: a whole number of pages and of BLOCK_N tiles
    kc, vc, bt, sl, K, V = make_paged(lens, 16, Hkv, D, dtype, device)
    q = torch.randn(len(lens), G * Hkv, D).to(dtype)
    check_decode(q.to(device), kc, vc, bt, sl, K, V, lens, D ** -0.5, num_splits=2, what=f"D={D} {dtype}")


def test_decode_head_dim_256(device):
    lens, Hkv, G, D = [3, 70], 1, 4, 256
    kc, vc, bt, sl, K, V = make_paged(lens, 16, Hkv, D, torch.bfloat16, device)
    q = torch.randn(len(lens), G * Hkv, D).to(torch.bfloat16)
    check_decode(q.to(device), kc, vc, bt, sl, K, V, lens, D ** -0.5, num_splits=2, what="D=256")


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, None])
def test_decode_splits(num_splits, device):
    # 300 tokens in pages of 64: 5 pages, 5 tiles; 16 splits leave 11 empty splits for the long sequence and all but
    # one for the short ones (they must weigh 0 in the reduce, not NaN).
    Hkv, G, D = 2, 7, 64
    kc, vc, bt, sl, K, V = make_paged(LENS, 64, Hkv, D, torch.float32, device)
    q = torch.randn(len(LENS), G * Hkv, D, device=device)
    check_decode(q, kc, vc, bt, sl, K, V, LENS, D ** -0.5, num_splits=num_splits, what=f"splits={num_splits}")


def test_decode_deterministic_and_split_invariant(device):
    Hkv, G, D = 2, 4, 64
    kc, vc, bt, sl, K, V = make_paged(LENS, 16, Hkv, D, torch.float32, device)
    q = torch.randn(len(LENS), G * Hkv, D, device=device)
    a = paged_ops.paged_decode_attention(q, kc, vc, bt, sl, 0.125, num_splits=4)
    b = paged_ops.paged_decode_attention(q, kc, vc, bt, sl, 0.125, num_splits=4)
    c = paged_ops.paged_decode_attention(q, kc, vc, bt, sl, 0.125, num_splits=1, max_seq_len=300)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bs,window,num_splits", [(16, 45, 3), (1, 45, 2), (64, 7, 4), (256, 45, 2), (16, 1, 1),
                                                  (16, 1000, 2)])
def test_decode_sliding_window(bs, window, num_splits, dtype, device):
    # window 45 on 300 tokens: first visible 255 = mid-page (255 % 16 = 15) and mid-split; 1000 > every length.
    # Every dtype: tests/mutation/run.py's off-by-one window survived in fp16, where no window case ran.
    Hkv, G, D = 2, 7, 64
    kc, vc, bt, sl, K, V = make_paged(LENS, bs, Hkv, D, dtype, device)
    q = torch.randn(len(LENS), G * Hkv, D, generator=torch.Generator().manual_seed(bs + window)).to(dtype).to(device)
    check_decode(q, kc, vc, bt, sl, K, V, LENS, D ** -0.5, sliding_window=window, num_splits=num_splits,
                 what=f"window={window}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_softcap(dtype, device):
    Hkv, G, D = 2, 4, 64
    kc, vc, bt, sl, K, V = make_paged(LENS, 16, Hkv, D, dtype, device)
    q = (3 * torch.randn(len(LENS), G * Hkv, D)).to(dtype).to(device)  # large logits, so the cap matters
    check_decode(q, kc, vc, bt, sl, K, V, LENS, D ** -0.5, softcap=5.0, sliding_window=100, num_splits=2,
                 what="softcap")


def test_decode_empty_sequence_and_strided_q(device):
    # q as a slice of a fused qkv projection output (row stride (Hq + 2 Hkv) * D); seq_len 0 gives a zero row.
    lens, Hkv, G, D = [0, 9, 33], 2, 2, 64
    kc, vc, bt, sl, K, V = make_paged(lens, 16, Hkv, D, torch.float32, device)
    qkv = torch.randn(len(lens), (G * Hkv + 2 * Hkv) * D, device=device)
    q = qkv[:, : G * Hkv * D].view(len(lens), G * Hkv, D)
    assert not q.is_contiguous()
    check_decode(q, kc, vc, bt, sl, K, V, lens, D ** -0.5, num_splits=3, what="strided q")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_decode_long_qwen2_layout(device, dtype):
    # Qwen2.5-0.5B's head layout (14 / 2, head_dim 64) at 2k tokens, heuristic split count. q is drawn from its own
    # generator: with the global one seeded like make_paged's, q[0, h] equalled K[0, 0, h] and every head attended to
    # one key, so a kernel that skipped a whole page still passed.
    lens, Hkv, G, D = [2048, 100], 2, 7, 64
    kc, vc, bt, sl, K, V = make_paged(lens, 16, Hkv, D, dtype, device)
    q = torch.randn(len(lens), G * Hkv, D, generator=torch.Generator().manual_seed(1234)).to(dtype).to(device)
    check_decode(q, kc, vc, bt, sl, K, V, lens, D ** -0.5, what=f"long {dtype}")


def test_split_heuristic():
    from llmkern.kernels.paged_attention import MAX_NUM_SPLITS, decode_num_splits

    assert decode_num_splits(1, 2, 100, 64) == 1  # short: nothing to split
    assert decode_num_splits(64, 8, 8192, 128) == 1  # 512 programs already fill the GPU
    many = decode_num_splits(1, 2, 32768, 64)
    assert 1 < many <= MAX_NUM_SPLITS
    assert decode_num_splits(1, 2, 32768, 64, sliding_window=256) < many  # the window bounds the work
    assert decode_num_splits(1, 2, 32768, 64, sms=132) >= decode_num_splits(1, 2, 32768, 64, sms=20)
    assert paged_ops.decode_num_splits(1, 14, 2, 64, 32768, device="cpu") == decode_num_splits(1, 2, 32768, 64, G=7)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_ops.decode_num_splits(1, 14, 4, 64, 100, device="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# KV bytes read by the decode kernel


def test_decode_reads_each_kv_byte_once_per_kv_head(device, monkeypatch):
    """Count the bytes the interpreter loads from the k/v cache storage: for group size 7 every K/V byte of every
    sequence is read exactly once (one program serves the whole GQA group), and nothing else of the cache is."""
    if device != "cpu":
        pytest.skip("counts loads inside the Triton interpreter")
    from triton.runtime import interpreter

    lens, bs, Hkv, G, D = [5, 17, 100], 16, 2, 7, 64
    kc, vc, bt, sl, K, V = make_paged(lens, bs, Hkv, D, torch.float16, device)
    q = torch.randn(len(lens), G * Hkv, D).to(torch.float16)
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (kc, vc)]
    seen = []
    builder = interpreter.interpreter_builder
    orig = builder.create_masked_load

    def counting_load(ptrs, mask, *args, **kwargs):
        addr = np.asarray(ptrs.data).astype(np.uint64).ravel()
        m = np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape).ravel()
        addr = addr[m]
        for lo, hi in ranges:
            seen.append(addr[(addr >= lo) & (addr < hi)])
        return orig(ptrs, mask, *args, **kwargs)

    monkeypatch.setattr(builder, "create_masked_load", counting_load)
    for splits in (1, 3):
        seen.clear()
        paged_ops.paged_decode_attention(q, kc, vc, bt, sl, D ** -0.5, num_splits=splits)
        addrs = np.concatenate(seen)
        loaded = addrs.size * kc.element_size()
        held = 2 * sum(lens) * Hkv * D * kc.element_size()
        assert loaded == held, f"splits={splits}: loaded {loaded} bytes of K/V, the sequences hold {held}"
        assert np.unique(addrs).size == addrs.size, f"splits={splits}: some K/V element was loaded twice"


# ---------------------------------------------------------------------------------------------------------------------
# int64 page offsets


def test_decode_and_prefill_int64_page_offsets(device):
    """A cache with more than 2^31 elements (a sparse memory-mapped file: only the pages used are ever touched),
    sequences living in its last pages: int32 offsets would wrap."""
    if device != "cpu":
        pytest.skip("builds the big cache as a sparse CPU file mapping")
    bs, Hkv, D = 16, 8, 128
    per_block = bs * Hkv * D
    nb = (1 << 31) // per_block + 8
    fd, path = tempfile.mkstemp(dir="/tmp", suffix=".kvcache")
    os.close(fd)
    try:
        with open(path, "wb") as f:
            f.truncate(2 * nb * per_block * 2)
        storage = torch.from_file(path, shared=True, size=2 * nb * per_block, dtype=torch.float16)
        kc = storage[: nb * per_block].view(nb, bs, Hkv, D)
        vc = storage[nb * per_block:].view(nb, bs, Hkv, D)
        lens, G = [20, 3], 2
        g = torch.Generator().manual_seed(0)
        K = torch.randn(2, Hkv, 20, D, generator=g).half()
        V = torch.randn(2, Hkv, 20, D, generator=g).half()
        bt = torch.tensor([[nb - 1, nb - 3], [nb - 2, 0]], dtype=I32)
        slots = torch.tensor([(nb - 1) * bs + i for i in range(16)] + [(nb - 3) * bs + i for i in range(4)]
                             + [(nb - 2) * bs + i for i in range(3)])
        key = torch.cat([K[0, :, :20].transpose(0, 1), K[1, :, :3].transpose(0, 1)])
        val = torch.cat([V[0, :, :20].transpose(0, 1), V[1, :, :3].transpose(0, 1)])
        with llmkern.track() as ran:
            paged_ops.reshape_and_cache(key, val, kc, vc, slots)
        assert ran.backends("reshape_and_cache") == {"triton"}
        sl = torch.tensor(lens, dtype=I32)
        q = torch.randn(2, G * Hkv, D).half()
        check_decode(q, kc, vc, bt, sl, K, V, lens, D ** -0.5, num_splits=2, what="int64 offsets")
        q4 = torch.randn(2, G * Hkv, 3, D).half()
        out = paged_ops.paged_prefill_attention(q4, kc, vc, bt, sl, torch.tensor([3, 2], dtype=I32), D ** -0.5)
        ref = oracle(q4, K, V, lens, [3, 2], D ** -0.5)
        eag = eager(q4, K, V, lens, [3, 2], D ** -0.5)
        mag = error_scale(q4, K, V, lens, [3, 2], D ** -0.5)
        assert_no_worse_than_eager(out[0], eag[0], ref[0], what="int64 prefill", scale=mag[0])
        del storage, kc, vc
    finally:
        os.remove(path)


# ---------------------------------------------------------------------------------------------------------------------
# Prefill


def check_prefill(q4, kc, vc, bt, sl, ql, K, V, lens, q_lens, scale, *, what, **kw):
    with llmkern.track() as ran:
        out = paged_ops.paged_prefill_attention(q4, kc, vc, bt, sl, ql, scale, **kw)
    assert ran.backends("paged_prefill_attention") == {"triton"}
    assert out.shape == q4.shape and out.dtype == q4.dtype
    out = out.cpu()
    q4 = q4.cpu()
    w, c = kw.get("sliding_window"), kw.get("softcap")
    ref = oracle(q4, K, V, lens, q_lens, scale, w, c)
    eag = eager(q4, K, V, lens, q_lens, scale, w, c)
    mag = error_scale(q4, K, V, lens, q_lens, scale, w, c)
    S = q4.shape[2]
    for b, n in enumerate(q_lens):
        if n:
            assert_no_worse_than_eager(out[b, :, S - n:], eag[b, :, S - n:], ref[b, :, S - n:], what=f"{what} b={b}",
                                       scale=mag[b, :, S - n:])
        assert (out[b, :, : S - n] == 0).all(), f"{what}: padding rows of sequence {b} are not zero"


@pytest.mark.parametrize("bs,G,dtype", [(16, 7, torch.float32), (1, 1, torch.float32), (64, 2, torch.bfloat16),
                                        (16, 4, torch.float16)])
def test_prefill_left_padded(bs, G, dtype, device):
    # Sequence 0: a full prompt; 1: one new token after 19 cached (left padded); 2: 4 new after 296 cached;
    # 3: nothing new (all padding).
    lens, q_lens, S, Hkv, D = [6, 20, 300, 5], [6, 1, 4, 0], 6, 2, 64
    kc, vc, bt, sl, K, V = make_paged(lens, bs, Hkv, D, dtype, device)
    q4 = torch.randn(len(lens), S, G * Hkv, D).to(dtype).transpose(1, 2)  # HF's [b, s, H, d] viewed as [b, H, s, d]
    ql = torch.tensor(q_lens, dtype=I32, device=device)
    check_prefill(q4.to(device), kc, vc, bt, sl, ql, K, V, lens, q_lens, D ** -0.5, what=f"bs={bs} G={G}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D", [80, 128])
def test_prefill_window_softcap(D, dtype, device):
    # Every dtype: tests/mutation/run.py's off-by-one prefill window survived in fp16 and bf16, where none ran.
    lens, q_lens, S, Hkv, G = [40, 70], [40, 9], 40, 1, 7
    kc, vc, bt, sl, K, V = make_paged(lens, 16, Hkv, D, dtype, device)
    q4 = torch.randn(len(lens), G * Hkv, S, D, generator=torch.Generator().manual_seed(D)).to(dtype).to(device)
    ql = torch.tensor(q_lens, dtype=I32, device=device)
    check_prefill(q4, kc, vc, bt, sl, ql, K, V, lens, q_lens, D ** -0.5, sliding_window=13, what="window")
    check_prefill(q4 * 3, kc, vc, bt, sl, ql, K, V, lens, q_lens, D ** -0.5, softcap=4.0, what="softcap")


def test_prefill_one_row_equals_decode(device):
    Hkv, G, D = 2, 7, 64
    kc, vc, bt, sl, K, V = make_paged(LENS, 16, Hkv, D, torch.float32, device)
    q = torch.randn(len(LENS), G * Hkv, D, device=device)
    dec = paged_ops.paged_decode_attention(q, kc, vc, bt, sl, 0.125, num_splits=1)
    pre = paged_ops.paged_prefill_attention(q.unsqueeze(2), kc, vc, bt, sl, torch.ones_like(sl), 0.125)
    torch.testing.assert_close(pre.squeeze(2), dec, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and opcheck


def _decode_args(device, **over):
    kc, vc, bt, sl, _, _ = make_paged([5, 9], 16, 2, 64, torch.float32, device)
    args = dict(q=torch.randn(2, 4, 64, device=device), k_cache=kc, v_cache=vc, block_tables=bt, seq_lens=sl,
                scale=0.125)
    args.update(over)
    return args


BAD_DECODE = [
    ("q", lambda a: a["q"][None], ValueError, "q must be 3-D"),
    ("q", lambda a: a["q"].double(), TypeError, "q must have dtype"),
    ("q", lambda a: a["q"].half(), TypeError, "same dtype"),
    ("q", lambda a: torch.randn(2, 3, 64), ValueError, "multiple of"),
    ("q", lambda a: torch.randn(2, 4, 32), ValueError, "head_dim"),
    ("q", lambda a: [1.0], TypeError, "q must be a torch.Tensor"),
    ("q", lambda a: a["q"][:0], ValueError, "q must not be empty"),
    ("k_cache", lambda a: a["k_cache"][:, :12], ValueError, "block_size"),
    ("k_cache", lambda a: a["k_cache"][0], ValueError, "k_cache must be 4-D"),
    ("v_cache", lambda a: a["v_cache"][:, :, :1], ValueError, "v_cache"),
    ("block_tables", lambda a: a["block_tables"].long(), TypeError, "block_tables must have dtype int32"),
    ("block_tables", lambda a: a["block_tables"][:1], ValueError, "block_tables must have shape"),
    ("block_tables", lambda a: a["block_tables"][:, :0], ValueError, "block_tables must have shape"),
    ("seq_lens", lambda a: a["seq_lens"].long(), TypeError, "seq_lens must have dtype int32"),
    ("seq_lens", lambda a: a["seq_lens"][:1], ValueError, "seq_lens must have shape"),
    ("seq_lens", lambda a: a["seq_lens"].to("meta"), ValueError, "one device"),
    ("scale", lambda a: 0.0, ValueError, "scale"),
    ("scale", lambda a: "x", TypeError, "scale"),
    ("sliding_window", lambda a: 0, ValueError, "sliding_window"),
    ("sliding_window", lambda a: 2.5, TypeError, "sliding_window"),
    ("softcap", lambda a: -1.0, ValueError, "softcap"),
    ("num_splits", lambda a: 0, ValueError, "num_splits"),
    ("num_splits", lambda a: 100000, ValueError, "num_splits"),
    ("max_seq_len", lambda a: -1, ValueError, "max_seq_len"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_DECODE, ids=[f"{b[0]}-{b[3]}" for b in BAD_DECODE])
def test_decode_bad_input(name, make, exc, match, device):
    args = _decode_args(device)
    args[name] = make(args)
    with pytest.raises(exc, match=match):
        paged_ops.paged_decode_attention(**args)


def _cpp_direct():
    """cpp forced (the automatic CPU choice under the Triton interpreter is triton): the eager fast path of
    llmkern/paged_ops.py runs only where cpp is in force."""
    if not _ext.load():
        if os.environ.get("LLMKERN_NO_EXT") == "1":
            pytest.skip(f"LLMKERN_NO_EXT=1: {_ext.why_not()}")
        pytest.fail(f"the llmkern extension must be built for these tests: {_ext.why_not()}")
    return llmkern.use_backend("cpp")


def _prefill_args(**over):
    a = _decode_args("cpu")
    a.update(q=torch.randn(2, 4, 3, 64), q_lens=torch.tensor([3, 1], dtype=I32))
    a.update(over)
    return a


BAD_PREFILL = [
    ("q", lambda a: a["q"][:, :, :, :32], ValueError, "head_dim"),
    ("q", lambda a: a["q"][0], ValueError, "q must be 4-D"),
    ("q_lens", lambda a: a["q_lens"].long(), TypeError, "q_lens must have dtype int32"),
    ("q_lens", lambda a: a["q_lens"][:1], ValueError, "q_lens must have shape"),
    ("k_cache", lambda a: a["k_cache"][:, :12], ValueError, "block_size"),
    ("scale", lambda a: float("inf"), ValueError, "scale"),
    ("sliding_window", lambda a: -3, ValueError, "sliding_window"),
    ("softcap", lambda a: float("nan"), ValueError, "softcap"),
]


@pytest.mark.parametrize("op,name,make,exc,match",
                         [("decode", *b) for b in BAD_DECODE] + [("prefill", *b) for b in BAD_PREFILL],
                         ids=[f"decode-{b[0]}-{b[3]}" for b in BAD_DECODE] + [f"prefill-{b[0]}-{b[3]}"
                                                                              for b in BAD_PREFILL])
def test_direct_path_bad_input_names_argument(op, name, make, exc, match):
    """Once a good call has filled the thread's direct table (llmkern/paged_ops.py, eager fast path), a bad call
    still raises the Python error that names the argument, and no backend records a run: what the C++ kernel refuses
    goes to the full path's checks, and what it does not check (scalars, emptiness) never reaches it."""
    fn = paged_ops.paged_decode_attention if op == "decode" else paged_ops.paged_prefill_attention
    args = _decode_args("cpu") if op == "decode" else _prefill_args()
    with _cpp_direct():
        fn(**args)
        assert f"paged_{op}_attention" in llmkern.backends.local.direct
        args[name] = make(args)
        with llmkern.track() as ran, pytest.raises(exc, match=match):
            fn(**args)
    assert not ran.backends(f"paged_{op}_attention")


def test_direct_path_refuses_what_only_python_checks():
    """Empty inputs the C++ kernels would take (a batch of none, a pool of no pages with nothing to read) are refused by
    the full path's checks on the fast path too."""
    a = _decode_args("cpu")
    none = dict(a, q=a["q"][:0], block_tables=a["block_tables"][:0], seq_lens=a["seq_lens"][:0])
    no_pages = dict(a, k_cache=a["k_cache"][:0], v_cache=a["v_cache"][:0], seq_lens=torch.zeros_like(a["seq_lens"]))
    with _cpp_direct():
        paged_ops.paged_decode_attention(**a)
        for bad, match in ((none, "q must not be empty"), (no_pages, "k_cache must not be empty")):
            with llmkern.track() as ran, pytest.raises(ValueError, match=match):
                paged_ops.paged_decode_attention(**bad)
            assert not ran.backends("paged_decode_attention")
            with llmkern.track() as ran, pytest.raises(ValueError, match=match):
                paged_ops.paged_prefill_attention(**dict(bad, q=bad["q"][:, :, None]),
                                                  q_lens=torch.zeros_like(bad["seq_lens"]))
            assert not ran.backends("paged_prefill_attention")


def test_direct_path_equals_full_path(monkeypatch):
    """The fast path runs the C++ kernels without the Python checks (none is called), records each run for
    ``track()``, and gives the full path's bits: decode (window, softcap, fixed splits), prefill, and the page write."""
    from llmkern import backends

    calls = []
    for check in ("_check_attention", "_check_reshape_and_cache"):
        real = getattr(paged_ops, check)
        monkeypatch.setattr(paged_ops, check, lambda *a, _real=real, _n=check, **k: (calls.append(_n), _real(*a, **k)))
    d, p = _decode_args("cpu"), _prefill_args()
    key, value = torch.randn(2, 2, 64), torch.randn(2, 2, 64)
    slots = torch.tensor([5, 40])
    with _cpp_direct():
        for kw in ({}, dict(sliding_window=4, softcap=3.0, num_splits=2, max_seq_len=9)):
            paged_ops.paged_decode_attention(**d, **kw)  # fills the direct table
            calls.clear()
            with llmkern.track() as ran:
                fast = paged_ops.paged_decode_attention(**d, **kw)
            assert not calls and ran == {("paged_decode_attention", "cpp"): 1}, (calls, ran)
            full = torch.ops.llmkern.paged_decode_attention(*d.values(), kw.get("sliding_window"), kw.get("softcap"),
                                                            kw.get("num_splits"), kw.get("max_seq_len"))
            assert calls, "the dispatcher path ran no Python checks"
            assert torch.equal(fast, full), f"decode {kw}"
        paged_ops.paged_prefill_attention(**p)
        calls.clear()
        with llmkern.track() as ran:
            fast = paged_ops.paged_prefill_attention(**p)
        assert not calls and ran == {("paged_prefill_attention", "cpp"): 1}, (calls, ran)
        assert torch.equal(fast, torch.ops.llmkern.paged_prefill_attention(
            p["q"], p["k_cache"], p["v_cache"], p["block_tables"], p["seq_lens"], p["q_lens"], 0.125, None, None))
        kc, vc = d["k_cache"].clone(), d["v_cache"].clone()
        paged_ops.reshape_and_cache(key, value, kc, vc, slots)
        calls.clear()
        kc2, vc2 = d["k_cache"].clone(), d["v_cache"].clone()
        with llmkern.track() as ran:
            paged_ops.reshape_and_cache(key, value, kc2, vc2, slots)
        assert not calls and ran == {("reshape_and_cache", "cpp"): 1}, (calls, ran)
        assert torch.equal(kc2.nan_to_num(7.0), kc.nan_to_num(7.0)) and torch.equal(vc2.nan_to_num(7.0),
                                                                                     vc.nan_to_num(7.0))
        assert torch.equal(kc2[2, 8], key[1]) and torch.equal(vc2[0, 5], value[0])
    # Another backend forced: no fast path (its table is empty), the checks run.
    with llmkern.use_backend("reference"):
        assert not backends.local.direct
        calls.clear()
        paged_ops.paged_decode_attention(**d)
        assert calls


def test_bad_device_and_prefill_input(device):
    args = _decode_args(device)
    with pytest.raises(ValueError, match="one device"):
        paged_ops.paged_decode_attention(**{**args, "seq_lens": args["seq_lens"].to("meta")})
    pargs = {**args, "q": torch.randn(2, 4, 3, 64, device=device), "q_lens": torch.tensor([3, 1], device=device)}
    with pytest.raises(TypeError, match="q_lens must have dtype int32"):
        paged_ops.paged_prefill_attention(**pargs)
    with pytest.raises(ValueError, match="q_lens must have shape"):
        paged_ops.paged_prefill_attention(**{**pargs, "q_lens": torch.tensor([3], dtype=I32, device=device)})
    with pytest.raises(ValueError, match="q must be 4-D"):
        paged_ops.paged_prefill_attention(**{**pargs, "q": args["q"], "q_lens": pargs["q_lens"].int()})


def test_opcheck(device):
    a = _decode_args(device)
    torch.library.opcheck(torch.ops.llmkern.paged_decode_attention.default,
                          (a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"], 0.125, None, None,
                           2, None))
    torch.library.opcheck(torch.ops.llmkern.paged_decode_attention.default,
                          (a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"], 0.125, 4, 3.0,
                           None, 9))
    q4 = torch.randn(2, 4, 3, 64, device=device)
    ql = torch.tensor([3, 2], dtype=I32, device=device)
    torch.library.opcheck(torch.ops.llmkern.paged_prefill_attention.default,
                          (q4, a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"], ql, 0.125, None, None))
