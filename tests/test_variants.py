"""No JIT stalls in a generation (issue #9 item 4): the launch heuristics pick from a small, known set of kernel
variants, and ``llmkern.warmup`` compiles all of them before the first token.

A *variant* is one compiled kernel: ``llmkern.kernels._launch.variant_key`` of a launch, i.e. Triton's own
specialisation of every argument (constexprs, integers equal to 1 / divisible by 16 / past 2^31, pointer
alignment) plus ``num_warps`` and ``num_stages``. The launches are the real launchers' (``*_fwd``), called on meta
tensors inside ``_launch.recording()``, so nothing runs.

* Decode: for every supported layout of ``kernels/_layouts.py`` the split heuristic is evaluated at every context
  length 1..max_position_embeddings, at batch 1 and larger batches; every pick is a ``SPLIT_BUCKETS`` value (at
  most 16 distinct launch shapes, where the unbucketed heuristic met up to 128 per layout), and the launches of
  the picks, in each dtype and page size the compile specs cover, compile to at most 2 split kernels (STORE_LSE
  off for one split, on for several: the split count, window, group size and the m/l strides are
  ``do_not_specialize``, every other argument is fixed by the layout) and 1 reduce kernel.
* Prefill, RoPE and the row ops at prompt lengths / row counts over the whole range (dense where specialisations
  can change, sampled elsewhere): prefill compiles to at most 2 kernels per (layout, dtype, page size): i32 q/out
  strides, and i64 ones once ``S * Hq * D`` passes 2^31.
* ``warmup``'s enumeration (``llmkern.warmup.enumerate_variants``, built from buckets, never from a scan) contains
  every variant the scans meet: the test fails if a heuristic starts picking something warmup does not know.
* ``warmup`` on a CPU model compiles nothing and says so; bad arguments name themselves; on a GPU, a generation
  after warmup compiles nothing (``gpu`` marker).
"""

import collections
import importlib
import random

import pytest
import torch

import llmkern
from llmkern import testing
from llmkern.kernels import _launch, _layouts as L, paged_attention as PA, rms_norm, rope, swiglu

# The module, whether or not llmkern exports the function ``warmup`` under the same name.
W = importlib.import_module("llmkern.warmup")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCAN_BATCHES = (1, 3, 32, 256)
META = "meta"
MAX_SPLIT_VARIANTS, MAX_REDUCE_VARIANTS, MAX_PREFILL_VARIANTS = 2, 1, 2


def _shapes(lay) -> W.ModelShapes:
    return W.ModelShapes(Hq=lay.Hq, Hkv=lay.Hkv, D=lay.D, hidden=lay.hidden, intermediates=(lay.intermediate,),
                         windows=(lay.sliding_window,), qk_norm=lay.qk_norm)


def _heuristic_inputs(lay) -> tuple:
    return (lay.Hkv, lay.D, lay.Hq // lay.Hkv, lay.max_pos, lay.sliding_window)


@pytest.fixture(scope="module")
def split_scan() -> dict:
    """``{heuristic inputs: {batch: split counts picked over every context 1..max_position_embeddings}}``, each
    distinct (Hkv, D, G, max_pos, window) of the supported layouts scanned once."""
    out = {}
    for lay in L.LAYOUTS:
        k = _heuristic_inputs(lay)
        if k in out:
            continue
        Hkv, D, G, max_pos, win = k
        f = PA.decode_num_splits
        out[k] = {B: {f(B, Hkv, c, D, win, PA.NOMINAL_SMS, G) for c in range(1, max_pos + 1)}
                  for B in SCAN_BATCHES}
    return out


@pytest.fixture(scope="module")
def enumerated() -> dict:
    """``warmup``'s enumeration per (layout, dtype, page size), for batch 256 and the layout's whole context."""
    cache = {}

    def get(lay, dt, bs):
        key = (lay.name, dt, bs)
        if key not in cache:
            cache[key] = W.enumerate_variants(_shapes(lay), max_batch_size=L.MAX_BATCH, max_seq_len=lay.max_pos,
                                              block_size=bs, dtype=DTYPES[dt])
        return cache[key]

    return get


def _keys(fn, *args) -> set:
    with _launch.recording() as launches:
        fn(*args)
    return {lc.key for lc in launches}


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device=META)


def _decode_keys(lay, dtype, bs, splits_by_batch: dict) -> set:
    kc = _meta(64, bs, lay.Hkv, lay.D, dtype=dtype)
    keys = set()
    for B, splits in splits_by_batch.items():
        q = _meta(B, 1, lay.Hq, lay.D, dtype=dtype).transpose(1, 2).squeeze(2)
        bt, lens = _meta(B, 9, dtype=torch.int32), _meta(B, dtype=torch.int32)
        for n in splits:
            keys |= _keys(PA.paged_decode_fwd, q, kc, kc, bt, lens, _meta(*q.shape, dtype=dtype), 0.1,
                          lay.sliding_window, None, n)
    return keys


def _kernel(key) -> str:
    return key[0]


# --------------------------------------------------------------------------------------------------------------------
# Decode: every context length


def test_split_picks_come_from_the_buckets(split_scan):
    assert PA.SPLIT_BUCKETS[0] == 1 and PA.SPLIT_BUCKETS[-1] == PA.MAX_NUM_SPLITS
    assert list(PA.SPLIT_BUCKETS) == sorted(set(PA.SPLIT_BUCKETS)) and len(PA.SPLIT_BUCKETS) == 16
    for (Hkv, D, G, max_pos, win), by_batch in split_scan.items():
        picks = set().union(*by_batch.values())
        assert picks <= set(PA.SPLIT_BUCKETS), (Hkv, D, G, sorted(picks - set(PA.SPLIT_BUCKETS)))
        # warmup's list, from buckets, holds every pick the scan met, at every batch
        assert picks <= set(W.decode_split_counts(Hkv, D, G, max_pos, win)), (Hkv, D, G, max_pos, win)
        # one long batch-1 generation on a layout with many KV tiles reaches past one split
        assert 1 in by_batch[1]


@pytest.mark.parametrize("bs", L.BLOCK_SIZES)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("lay", L.LAYOUTS, ids=lambda l: l.name)
def test_decode_variants_over_every_length_are_few_and_warmed(lay, dt, bs, split_scan, enumerated):
    keys = _decode_keys(lay, DTYPES[dt], bs, split_scan[_heuristic_inputs(lay)])
    by = collections.Counter(_kernel(k) for k in keys)
    assert by["_paged_decode_split_kernel"] <= MAX_SPLIT_VARIANTS, by
    assert by["_paged_decode_reduce_kernel"] <= MAX_REDUCE_VARIANTS, by
    picks = set().union(*split_scan[_heuristic_inputs(lay)].values())
    if max(picks) > 1:  # both the single-split kernel and the split + reduce pair are met
        assert by["_paged_decode_split_kernel"] == 2 and by["_paged_decode_reduce_kernel"] == 1, by
    missing = keys - set(enumerated(lay, dt, bs))
    assert not missing, f"{lay.name} {dt} page {bs}: decode variants warmup does not list: " + \
        "; ".join(_launch.describe(k) for k in missing)


# --------------------------------------------------------------------------------------------------------------------
# Prefill, RoPE, row ops: prompt lengths and row counts over the whole range


def _prompt_lengths(max_pos: int, seed: int) -> list:
    """1..64, every power of two and its neighbours (``_layouts.contexts``), the largest, 64 random lengths."""
    rng = random.Random(seed)
    out = set(range(1, 65)) | set(L.contexts(max_pos)) | {rng.randint(1, max_pos) for _ in range(64)}
    return sorted(out)


@pytest.mark.parametrize("bs", L.BLOCK_SIZES)
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("lay", L.LAYOUTS, ids=lambda l: l.name)
def test_prefill_and_row_op_variants_are_few_and_warmed(lay, dt, bs, enumerated):
    dtype = DTYPES[dt]
    Hq, Hkv, D = lay.Hq, lay.Hkv, lay.D
    kc = _meta(64, bs, Hkv, D, dtype=dtype)
    bt, lens = _meta(1, 9, dtype=torch.int32), _meta(1, dtype=torch.int32)
    keys = set()
    for S in _prompt_lengths(lay.max_pos, seed=hash(lay.name) & 0xFFFF):
        q = _meta(1, S, Hq, D, dtype=dtype).transpose(1, 2)
        keys |= _keys(PA.paged_prefill_fwd, q, kc, kc, bt, lens, lens, _meta(*q.shape, dtype=dtype), 0.1,
                      lay.sliding_window, None)
        for B in (1, 2):
            qr, kr = _meta(B, S, Hq, D, dtype=dtype).transpose(1, 2), _meta(B, S, Hkv, D, dtype=dtype).transpose(1, 2)
            cos = _meta(B, S, D, dtype=dtype)
            keys |= _keys(rope.rope_fwd, qr, kr, cos, cos, torch.empty_like(qr), torch.empty_like(kr))
    prefill = {k for k in keys if _kernel(k) == "_paged_prefill_kernel"}
    assert 1 <= len(prefill) <= MAX_PREFILL_VARIANTS, [_launch.describe(k) for k in prefill]
    rows = L.token_counts(L.MAX_BATCH * lay.max_pos)
    for M in rows:
        x = _meta(M, lay.hidden, dtype=dtype)
        w = _meta(lay.hidden, dtype=dtype)
        keys |= _keys(rms_norm.rms_norm_fwd, x, w, x, 1e-6, 0.0)
        keys |= _keys(rms_norm.fused_add_rms_norm_fwd, x, x, w, x, x, 1e-6)
        g = _meta(M, lay.intermediate, dtype=dtype)
        keys |= _keys(swiglu.silu_and_mul_fwd, g, g, g)
        if lay.qk_norm:
            for H in (Hq, Hkv):
                xh = _meta(M * H, D, dtype=dtype)
                keys |= _keys(rms_norm.rms_norm_fwd, xh, _meta(D, dtype=dtype), xh, 1e-6, 0.0)
    by = collections.Counter(_kernel(k) for k in keys)
    # Row ops step at powers of two of the row count up to a ~4K-element tile: a handful each.
    for k in ("_rms_norm_kernel", "_fused_add_rms_norm_kernel", "_silu_and_mul_kernel", "_rope_kernel"):
        assert 1 <= by[k] <= 16, by
    missing = keys - set(enumerated(lay, dt, bs))
    assert not missing, f"{lay.name} {dt} page {bs}: variants warmup does not list: " + \
        "; ".join(_launch.describe(k) for k in sorted(missing, key=str)[:8])


def _spec_ident(spec) -> tuple:
    """A compile spec's identity in the form ``_key_ident`` gives a launch (cf. ``paged_attention._key``)."""
    return (getattr(spec.fn, "fn", spec.fn).__name__, tuple(sorted(spec.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())),
            tuple(sorted(spec.meta["divisible_by_16"])), spec.num_warps, spec.num_stages, spec.maxnreg)


def _key_ident(key) -> tuple:
    name, spec, opts = key
    opts = dict(opts)
    return (name, tuple(sorted((a, t) for a, t, _ in spec if t != "constexpr")),
            tuple(sorted((a, repr(s)) for a, t, s in spec if t == "constexpr")),
            tuple(sorted(a for a, t, s in spec if t in ("i32", "i64") and s == "D")), opts["num_warps"],
            opts["num_stages"], opts.get("maxnreg"))


@pytest.fixture(scope="module")
def spec_idents() -> set:
    from llmkern.kernels import cache_ops

    return {_spec_ident(s) for m in (PA, cache_ops, rms_norm, rope, swiglu) for s in m.compile_specs()}


def _i64_strides(key) -> bool:
    return any(t == "i64" and a.startswith("stride_") for a, t, _ in key[1])


@pytest.mark.parametrize("dt", list(DTYPES))
def test_warmed_variants_are_the_compile_gates(dt, spec_idents, monkeypatch):
    """Every variant warmup compiles for a supported layout is one the GPU compile gate (``compile_specs``,
    tests/test_gpu_compile.py) compiles and checks for spills, argument types and specialisations included.
    Known exception, listed so that any other gap fails: q/out strides past 2^31 (a single 262,144-token prefill
    of 64 x 128 query heads), which the gate's specs (S = 64) do not model. Runs with the user's
    ``INTERPRETER_BF16_DOT`` (off): bf16 meta launches must plan the GPU's tensor-core path."""
    monkeypatch.setattr(PA, "INTERPRETER_BF16_DOT", False)
    gaps, i64 = {}, set()
    for lay in L.LAYOUTS:
        for bs in L.BLOCK_SIZES:
            got = W.enumerate_variants(_shapes(lay), max_batch_size=L.MAX_BATCH, max_seq_len=lay.max_pos,
                                       block_size=bs, dtype=DTYPES[dt])
            for key, v in got.items():
                if _key_ident(key) in spec_idents:
                    continue
                if _i64_strides(key) and lay.Hq * lay.D * lay.max_pos > 2**31 - 1:
                    i64.add((lay.name, key[0]))
                    continue
                gaps.setdefault(_launch.describe(key), f"{lay.name} page {bs}: {v.where}")
    assert not gaps, f"{len(gaps)} warmed variants no compile spec covers:\n" + "\n".join(
        f"{k} ({w})" for k, w in list(gaps.items())[:10])
    assert i64 <= {("qwen3-235b-a22b-2507", "_paged_prefill_kernel"), ("qwen3-235b-a22b-2507", "_rope_kernel")}, i64


def test_enumeration_is_small():
    """The whole list for the biggest context of all (262,144 tokens, batch 256): a few dozen kernels."""
    lay = next(l for l in L.LAYOUTS if l.name == "qwen3-235b-a22b-2507")
    got = W.enumerate_variants(_shapes(lay), max_batch_size=256, max_seq_len=lay.max_pos, dtype=torch.bfloat16)
    by = collections.Counter(v.kernel for v in got.values())
    assert by["paged_decode_split"] == 2 and by["paged_decode_reduce"] == 1, by
    assert len(got) <= 80, by


def test_variant_key_matches_triton_specialisation():
    """The key follows Triton's rules: an integer 1 becomes a constant, a multiple of 16 is marked, a
    ``do_not_specialize`` argument is neither, and a pointer at a 2-byte offset loses its alignment mark."""
    kc = _meta(4, 16, 2, 64)
    q = _meta(1, 4, 64)
    bt, lens = _meta(1, 3, dtype=torch.int32), _meta(1, dtype=torch.int32)
    (one,) = _keys(PA.paged_decode_fwd, q, kc, kc, bt, lens, _meta(1, 4, 64), 0.1, None, None, 1)
    spec = {a: (t, s) for a, t, s in one[1]}
    assert spec["stride_qd"] == ("constexpr", 1) and spec["D"] == ("i32", "D")
    assert spec["num_splits"] == ("i32", None) and spec["q_ptr"] == ("*fp16", "D")
    (moved,) = _keys(PA.paged_decode_fwd, _meta(1 * 4 * 64 + 1)[1:].view(1, 4, 64), kc, kc, bt, lens,
                     _meta(1, 4, 64), 0.1, None, None, 1)
    assert dict((a, (t, s)) for a, t, s in moved[1])["q_ptr"] == ("*fp16", "")
    assert moved != one


_BINDER_CHECK = """
import importlib, torch
from triton.runtime.jit import JITFunction, create_function_from_signature
from triton.backends.compiler import BaseBackend
W = importlib.import_module("llmkern.warmup")
shapes = W.ModelShapes(Hq=32, Hkv=8, D=128, hidden=4096, intermediates=(12288,), windows=(None, 4096), qk_norm=True)
n = 0
for dtype in (torch.float32, torch.bfloat16):
    for key, v in W.enumerate_variants(shapes, max_batch_size=8, max_seq_len=4096, dtype=dtype).items():
        fn = v.launch.fn
        assert isinstance(fn, JITFunction), type(fn)
        binder = create_function_from_signature(fn.signature, fn.params, BaseBackend)
        kw = {k: x for k, x in v.launch.kwargs.items() if k not in ("num_warps", "num_stages")}
        _, spec, _ = binder(*v.launch.args, **kw)
        mine, theirs = [(t, s) for _, t, s in key[1]], [tuple(x) for x in spec]
        assert mine == theirs, (key[0], [(p.name, m, t) for p, m, t in zip(fn.params, mine, theirs) if m != t])
        n += 1
print(n)
"""


def test_variant_key_is_tritons_binder_specialisation():
    """Outside the interpreter (a subprocess without TRITON_INTERPRET: the kernels are compiled JITFunctions),
    ``variant_key`` agrees with the specialisation Triton's own launch binder computes, argument by argument, for
    every variant warmup lists for a Qwen3-8B-like layout in fp32 and bf16."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _BINDER_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip().splitlines()[-1]) >= 20, r.stdout


# --------------------------------------------------------------------------------------------------------------------
# warmup(model, ...)


def test_warmup_on_a_cpu_model_lists_and_compiles_nothing():
    model = testing.tiny_model("llama-tiny")
    report = W.warmup(model, max_batch_size=4, max_seq_len=512)
    assert report.compiled == 0 and report.devices == ()
    assert report.note.startswith("nothing to compile: the model runs on cpu, where ")
    by = report.by_kernel()
    for k in ("paged_decode_split", "paged_prefill", "reshape_and_cache", "rms_norm", "fused_add_rms_norm",
              "silu_and_mul", "rope", "copy_blocks"):
        assert by.get(k, 0) >= 1, by
    text = str(report)
    assert "nothing to compile" in text and len(text.splitlines()) == 2, text
    assert report.dtype == torch.float32 and report.max_seq_len == 512
    # the same list as the enumeration for the config's shapes
    want = W.enumerate_variants(W.ModelShapes.from_config(model.config), max_batch_size=4, max_seq_len=512,
                                dtype=torch.float32)
    assert {v.key for v in report.variants} == set(want)


def test_warmup_reads_the_config():
    qwen3 = W.ModelShapes.from_config(testing.tiny_config("qwen3-tiny"))
    assert qwen3.qk_norm and qwen3.D == 32 and qwen3.windows == (None,)
    mistral = W.ModelShapes.from_config(testing.tiny_config("mistral-tiny", sliding_window=64))
    assert mistral.windows == (64,)
    llama = W.ModelShapes.from_config(testing.tiny_config("llama-tiny"))
    assert (llama.Hq, llama.Hkv, llama.D, llama.hidden) == (4, 2, 32, 128) and not llama.qk_norm
    # A window makes its own decode variants (USE_WINDOW); warmup lists them.
    got = W.enumerate_variants(mistral, max_batch_size=2, max_seq_len=256, dtype=torch.float16)
    assert any(("USE_WINDOW", "constexpr", True) in v.key[1] for v in got.values())


@pytest.mark.parametrize("kw, name", [
    (dict(max_batch_size=0, max_seq_len=8), "max_batch_size"),
    (dict(max_batch_size=True, max_seq_len=8), "max_batch_size"),
    (dict(max_batch_size=2, max_seq_len=-1), "max_seq_len"),
    (dict(max_batch_size=2, max_seq_len=8.0), "max_seq_len"),
    (dict(max_batch_size=2, max_seq_len=8, block_size=0), "block_size"),
    (dict(max_batch_size=2, max_seq_len=8, dtype=torch.int8), "dtype"),
])
def test_warmup_bad_arguments(kw, name):
    model = testing.tiny_model("llama-tiny")
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        W.warmup(model, **kw)


def test_warmup_needs_a_model():
    with pytest.raises(ValueError, match="^model must be"):
        W.warmup(torch.nn.Linear(2, 2), max_batch_size=1, max_seq_len=8)


def test_compile_variant_hands_triton_dtypes_not_tensors():
    """On CUDA each variant is compiled with ``JITFunction.warmup``: meta tensors become their dtypes (Triton's
    MockTensor: an aligned pointer), everything else is passed as the launch had it."""
    calls = []

    class _Fn:
        def warmup(self, *args, grid, **kwargs):
            calls.append((args, grid, kwargs))

    lay = L.LAYOUTS[0]
    v = next(iter(W.enumerate_variants(_shapes(lay), max_batch_size=1, max_seq_len=64).values()))
    fake = W.Variant(v.op, v.key, _launch.Launch(_Fn(), v.launch.grid, v.launch.args, v.launch.kwargs), v.where)
    W.compile_variant(fake, torch.device("cpu"))
    (args, grid, kwargs), = calls
    assert grid == v.launch.grid and kwargs == v.launch.kwargs
    assert [a.dtype if isinstance(a, torch.Tensor) else a for a in v.launch.args] == list(args)
    assert not any(isinstance(a, torch.Tensor) for a in args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: Triton compiles only for a GPU")
def test_generate_after_warmup_compiles_nothing():
    import triton
    from llmkern.attention import install, is_installed

    model = testing.tiny_model("llama-tiny", dtype=torch.float16, device="cuda")
    llmkern.patch(model)
    if not is_installed(model):
        install(model)
    prompt, new = 24, 40
    report = W.warmup(model, max_batch_size=2, max_seq_len=prompt + new)
    assert report.compiled >= len(report.variants) > 0, str(report)
    compiled = []

    def hook(*args, **kwargs):
        compiled.append(kwargs.get("repr"))

    ids = torch.randint(3, model.config.vocab_size, (2, prompt), device="cuda")
    old = triton.knobs.runtime.jit_post_compile_hook
    triton.knobs.runtime.jit_post_compile_hook = hook
    try:
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
    finally:
        triton.knobs.runtime.jit_post_compile_hook = old
    assert not compiled, f"{len(compiled)} Triton compiles during generate after warmup: {compiled[:4]}"


def test_register_cap_reaches_launches_and_specs(monkeypatch):
    """Where ``decode_config`` sets ``maxnreg`` (16-bit inputs on 8 warps at D = 64 or on 8-bit pages, Triton >= 3.9,
    whose ptxas spilled there), the launch passes it and the compile spec that stands for that launch carries it,
    so the compile gate checks the code that runs; no other config and no older Triton gets one."""
    monkeypatch.setattr(PA, "_TRITON_VERSION", (3, 9))
    assert PA.decode_config(3, 64)["maxnreg"] == 255 and PA.decode_config(3, 64)["num_warps"] == 8
    assert PA.decode_config(1, 128, kv8=True)["maxnreg"] == 255
    for cfg in (PA.decode_config(3, 64, fp32=True), PA.decode_config(1, 128), PA.decode_config(2, 256)):
        assert "maxnreg" not in cfg, cfg
    kc = _meta(8, 16, 3, 64)
    q, bt, lens = _meta(2, 9, 64), _meta(2, 3, dtype=torch.int32), _meta(2, dtype=torch.int32)
    for splits in (1, 4):
        (key, *_) = sorted(_keys(PA.paged_decode_fwd, q, kc, kc, bt, lens, _meta(2, 9, 64), 0.1, None, None, splits),
                           key=lambda k: k[0] != "_paged_decode_split_kernel")
        assert dict(key[2]).get("maxnreg") == 255, _launch.describe(key)
    specs = PA.compile_specs()
    capped = [s for s in specs if s.maxnreg is not None]
    assert capped and all(s.maxnreg == 255 and s.num_warps == 8 and s.fn is PA._paged_decode_split_kernel
                          for s in capped)
    assert {_key_ident(k) for k in _keys(PA.paged_decode_fwd, q, kc, kc, bt, lens, _meta(2, 9, 64), 0.1, None, None,
                                         1)} <= {_spec_ident(s) for s in specs}
    monkeypatch.setattr(PA, "_TRITON_VERSION", (3, 8))
    assert all(s.maxnreg is None for s in PA.compile_specs())
