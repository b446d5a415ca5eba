"""Paged KV cache writes (llmkern.paged_ops.reshape_and_cache, copy_blocks) against plain torch indexing."""

import pytest
import torch

import llmkern
from llmkern import paged_ops


def _expected_write(k_cache, key, slots):
    out = k_cache.clone()
    bs = k_cache.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            out[s // bs, s % bs] = key[t]
    return out


@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,D", [(2, 64), (3, 80), (1, 96)])
def test_reshape_and_cache(bs, dtype, H, D, device):
    nb, T = 12, 9
    kc = torch.randn(nb, bs, H, D).to(dtype).to(device)
    vc = torch.randn(nb, bs, H, D).to(dtype).to(device)
    # HF hands K/V as [b, H, s, d] views of [b, s, H, d] buffers: feed [T, H, D] strided views.
    key = torch.randn(H, T, D + 16).to(dtype).to(device).transpose(0, 1)[..., :D]
    value = torch.randn(T, H, 2 * D).to(dtype).to(device)[..., ::2]
    assert not key.is_contiguous() and not value.is_contiguous()
    slots = torch.randperm(nb * bs)[:T]
    slots[[0, 4]] = -1  # padding tokens
    slots = slots.to(device)
    want_k = _expected_write(kc.cpu(), key.cpu(), slots.cpu())
    want_v = _expected_write(vc.cpu(), value.cpu(), slots.cpu())
    with llmkern.track() as ran:
        paged_ops.reshape_and_cache(key, value, kc, vc, slots)
    assert ran.backends("reshape_and_cache") == {"triton"}
    assert torch.equal(kc.cpu(), want_k)
    assert torch.equal(vc.cpu(), want_v)


def test_reshape_and_cache_strided_cache_and_all_padding(device):
    # A cache that is a view of a bigger per-layer pool ([nb, bs, 2 * H, D] with K and V heads interleaved).
    pool = torch.zeros(4, 16, 4, 64, device=device)
    kc, vc = pool[:, :, 0::2], pool[:, :, 1::2]
    key = torch.randn(3, 2, 64, device=device)
    value = torch.randn(3, 2, 64, device=device)
    paged_ops.reshape_and_cache(key, value, kc, vc, torch.tensor([63, 0, 17], device=device))
    assert torch.equal(kc[3, 15], key[0]) and torch.equal(vc[0, 0], value[1]) and torch.equal(vc[1, 1], value[2])
    before = pool.clone()
    paged_ops.reshape_and_cache(key, value, kc, vc, torch.full((3,), -1, device=device))
    assert torch.equal(pool, before)


@pytest.mark.parametrize("bs", [1, 16])
def test_copy_blocks(bs, device):
    kc = torch.randn(8, bs, 3, 80, device=device)
    vc = torch.randn(8, bs, 3, 80, device=device)
    want_k, want_v = kc.clone(), vc.clone()
    src, dst = torch.tensor([1, 5, 0], device=device), torch.tensor([6, 2, 7], device=device)
    want_k[dst] = kc[src]
    want_v[dst] = vc[src]
    with llmkern.track() as ran:
        paged_ops.copy_blocks(kc, vc, src, dst)
    assert ran.backends("copy_blocks") == {"triton"}
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def _cache_args(device):
    kc = torch.zeros(4, 16, 2, 64, device=device)
    return dict(key=torch.randn(3, 2, 64, device=device), value=torch.randn(3, 2, 64, device=device), k_cache=kc,
                v_cache=torch.zeros_like(kc), slot_mapping=torch.tensor([0, 1, 2], device=device))


BAD_WRITE = [
    ("slot_mapping", lambda a: a["slot_mapping"].int(), TypeError, "slot_mapping must have dtype int64"),
    ("slot_mapping", lambda a: a["slot_mapping"][:2], ValueError, "slot_mapping must have shape"),
    ("key", lambda a: a["key"].half(), TypeError, "key and value must have k_cache's dtype"),
    ("key", lambda a: a["key"][:, :1], ValueError, "expected equal shapes"),
    ("value", lambda a: a["value"][:, :, :32], ValueError, "expected equal shapes"),
    ("key", lambda a: "k", TypeError, "key must be a torch.Tensor"),
    ("k_cache", lambda a: torch.zeros(4, 12, 2, 64), ValueError, "block_size"),
    ("k_cache", lambda a: torch.zeros(4, 16, 2, 64).half(), ValueError, "expected equal dtypes"),
    ("v_cache", lambda a: torch.zeros(4, 16, 1, 64), ValueError, "expected equal shapes"),
    ("slot_mapping", lambda a: a["slot_mapping"].to("meta"), ValueError, "one device"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_WRITE, ids=[f"{b[0]}-{b[3]}" for b in BAD_WRITE])
def test_reshape_and_cache_bad_input(name, make, exc, match, device):
    args = _cache_args(device)
    args[name] = make(args)
    with pytest.raises(exc, match=match):
        paged_ops.reshape_and_cache(**args)


def test_reshape_and_cache_key_shape_must_match_cache(device):
    args = _cache_args(device)
    args["key"] = args["value"] = torch.randn(3, 2, 32, device=device)
    with pytest.raises(ValueError, match=r"key and value must be 3-D .*num_kv_heads \(2\) and head_dim \(64\)"):
        paged_ops.reshape_and_cache(**args)


def test_copy_blocks_bad_input(device):
    kc = torch.zeros(4, 16, 2, 64, device=device)
    src = torch.tensor([0, 1], device=device)
    with pytest.raises(TypeError, match="src must have dtype int64"):
        paged_ops.copy_blocks(kc, kc.clone(), src.int(), src)
    with pytest.raises(ValueError, match="expected equal shapes"):
        paged_ops.copy_blocks(kc, kc.clone(), src, src[:1])
    with pytest.raises(ValueError, match="dst must be 1-D"):
        paged_ops.copy_blocks(kc, kc.clone(), src, src[None])


def test_opcheck(device):
    a = _cache_args(device)
    a["slot_mapping"] = torch.tensor([5, -1, 40], device=device)
    torch.library.opcheck(torch.ops.llmkern.reshape_and_cache.default,
                          (a["key"], a["value"], a["k_cache"], a["v_cache"], a["slot_mapping"]))
    torch.library.opcheck(torch.ops.llmkern.copy_blocks.default,
                          (a["k_cache"], a["v_cache"], torch.tensor([0, 1], device=device),
                           torch.tensor([2, 3], device=device)))


# ---------------------------------------------------------------------------------------------------------------------
# A slot past the pool (issue #12): an error on CPU tensors whatever the backend; on CUDA tensors (where checking
# would sync) the triton and cuda kernels skip it. Never an out-of-bounds write.


@pytest.mark.parametrize("backend", ["triton", "cpp", "reference"])
def test_reshape_and_cache_slot_past_pool_is_an_error_on_cpu(backend):
    args = _cache_args("cpu")
    args["slot_mapping"] = torch.tensor([0, 64, 1])  # 4 blocks of 16: slot 64 is one past the end
    before = args["k_cache"].clone()
    with llmkern.use_backend(backend), pytest.raises((ValueError, RuntimeError), match="past the"):
        paged_ops.reshape_and_cache(**args)
    assert torch.equal(args["k_cache"], before), "nothing is written when a slot is bad"


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernel on CPU tensors in the interpreter")
@pytest.mark.parametrize("bs", [1, 16])
def test_reshape_and_cache_kernel_skips_slot_past_pool(bs):
    """The Triton kernel itself (what CUDA tensors reach, unchecked) writes nothing for a slot past the pool: the
    pool is a view of a bigger buffer, and the row right after it stays untouched."""
    from llmkern.kernels import cache_ops as K

    nb, H, D = 3, 2, 64
    kbuf, vbuf = torch.zeros(nb + 1, bs, H, D), torch.zeros(nb + 1, bs, H, D)
    key, value = torch.randn(3, H, D), torch.randn(3, H, D)
    K.reshape_and_cache_fwd(key, value, kbuf[:nb], vbuf[:nb], torch.tensor([nb * bs, 0, nb * bs + bs - 1]))
    assert (kbuf[nb] == 0).all() and (vbuf[nb] == 0).all(), "wrote past the pool"
    assert torch.equal(kbuf[0, 0], key[1]) and torch.equal(vbuf[0, 0], value[1])
