"""llmkern's paged kernels doing the attention under transformers' continuous batching (issue 20, item 2;
``llmkern/continuous.py``).

A patched model under ``generate_batch`` / an ``init_continuous_batching`` manager writes its K/V into the engine's
pages with ``reshape_and_cache`` (slot = the engine's write index) and attends with ``paged_decode_attention`` /
``paged_prefill_attention`` over block tables built from the engine's block lists: transformers' gather of the cache
into dense K/V (the allocators' ``update``) never runs. Greedy fp32 tokens must equal unpatched continuous batching on
'sdpa' with ragged prompts, chunked prefills, shared prefixes, sliding windows and requests joining mid-run.

The C++ backend is forced (``use_backend("cpp")`` in the caller's thread follows into the manager's generation
thread): under pytest TRITON_INTERPRET=1 would otherwise pick the interpreted Triton kernels.
"""

import functools
import inspect
import warnings

import pytest
import torch
from transformers import GenerationConfig

import llmkern
from llmkern import continuous, testing
from llmkern.attention import NAME

pytest.importorskip("transformers.generation.continuous_batching")
from transformers.generation.continuous_batching import cache as cb_cache  # noqa: E402

try:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
except ImportError:  # pragma: no cover - releases before the config class
    ContinuousBatchingConfig = None

def _hooked() -> bool:
    from transformers import AttentionInterface

    prefixed = "paged|sdpa" in AttentionInterface._global_mapping  # 5.17: the engine runs 'paged|<name>' functions
    return not continuous.missing_hooks(type("M", (), {"_create_batch_processor": lambda self: None})(), prefixed)


pytestmark = [
    pytest.mark.skipif(ContinuousBatchingConfig is None, reason="no ContinuousBatchingConfig in this transformers"),
    pytest.mark.skipif(not _hooked(), reason="this transformers release lacks the continuous-batching hooks "
                                             "llmkern/continuous.py reads (checked: 5.17, 5.25)"),
]

LAYOUTS = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny"]
PAGED = {"paged_decode_attention", "paged_prefill_attention", "reshape_and_cache"}


def _prompts(n, seed=0, lo=2, hi=24, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, 500, (int(length),), generator=g).tolist()
            for length in torch.randint(lo, hi, (n,), generator=g)]


def _gen_config(n=6):
    return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)


def _cb_config(page=16, max_batch_tokens=64, num_blocks=48):
    fields = inspect.signature(ContinuousBatchingConfig).parameters
    size = "page_size" if "page_size" in fields else "block_size"
    return ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=max_batch_tokens, **{size: page})


def _batch(model, prompts, n=6, **cb):
    out = model.generate_batch(prompts, generation_config=_gen_config(n), continuous_batching_config=_cb_config(**cb))
    return [out[k].generated_tokens for k in sorted(out, key=lambda k: int(k.rpartition("_")[2]))]


def _stream(model, prompts, first=3, n=6, **cb):
    """A streaming manager: ``first`` requests, then the others join once one of them has finished."""
    manager = model.init_continuous_batching(generation_config=_gen_config(n),
                                             continuous_batching_config=_cb_config(**cb))
    manager.start()
    try:
        for i, p in enumerate(prompts[:first]):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        r = manager.get_result(timeout=60)
        assert r is not None
        results = {r.request_id: r.generated_tokens}
        for i, p in enumerate(prompts[first:], first):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        while len(results) < len(prompts):
            r = manager.get_result(timeout=60)
            assert r is not None, f"timed out with {sorted(results)}"
            results[r.request_id] = r.generated_tokens
    finally:
        manager.stop(block=True, timeout=60)
    return [results[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture
def gathers(monkeypatch):
    """Counts transformers' dense reads of the engine's cache: the allocators' update (index_select of the whole
    sequence) and the cache's own update (5.25)."""
    calls = []
    targets = [cb_cache.PagedAttentionCache]
    try:  # 5.25: the allocators read the cache; 5.17: PagedAttentionCache.update itself
        from transformers.generation.continuous_batching import cache_allocators
    except ImportError:
        cache_allocators = None
    targets += [getattr(cache_allocators, n) for n in ("FullAttentionCacheAllocator", "SlidingAttentionCacheAllocator")
                if hasattr(cache_allocators, n)]
    for cls in targets:
        own = cls.__dict__["update"]

        @functools.wraps(own)  # the same signature: llmkern's hook check still finds the update it expects
        def counted(self, *args, _own=own, _cls=cls, **kwargs):
            calls.append(_cls.__name__)
            return _own(self, *args, **kwargs)

        monkeypatch.setattr(cls, "update", counted)
    return calls


def _no_fallback_warning(seen):
    msgs = [str(w.message) for w in seen if "continuous batching" in str(w.message)]
    assert not msgs, msgs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokens_equal_sdpa_with_requests_joining_mid_run(layout, gathers):
    model = testing.tiny_model(layout)
    prompts = _prompts(6, seed=1)
    want = _batch(model, prompts)  # unpatched: transformers' 'sdpa' over its own paged cache
    assert gathers  # the counter sees transformers' gathers
    gathers.clear()
    llmkern.patch(model)
    with warnings.catch_warnings(record=True) as seen, llmkern.use_backend("cpp"), llmkern.track() as ran:
        warnings.simplefilter("always")
        got = _stream(model, prompts)
    _no_fallback_warning(seen)
    assert got == want
    assert gathers == []  # no dense gather of the cache, in any layer of any step
    n = model.config.num_hidden_layers
    assert ran.backends("paged_decode_attention") == {"cpp"}
    assert ran.backends("paged_prefill_attention") <= {"cpp", "reference"} and ran.backends("paged_prefill_attention")
    assert ran.backends("reshape_and_cache") == {"cpp"} and ran[("reshape_and_cache", "cpp")] % n == 0
    assert ran[("paged_decode_attention", "cpp")] % n == 0
    assert model.config._attn_implementation == NAME  # back to llmkern's own attention at stop()


def test_generate_batch_chunked_prefill_and_shared_prefixes(gathers):
    """Prompts longer than a step's token budget (chunked: later chunks attend to earlier ones through the pages),
    mixed prefill/decode steps, and requests that join after the first finished reuse its prefix pages (their first
    chunk starts past 0)."""
    model = testing.tiny_model("llama-tiny")
    shared = _prompts(1, seed=7, lo=13, hi=14)[0]
    prompts = _prompts(2, seed=2, lo=30, hi=45) + _prompts(3, seed=3, prefix=shared, lo=1, hi=6)
    cb = dict(page=4, max_batch_tokens=16)
    want = _stream(model, prompts, first=1, **cb)
    matched = []
    own = cb_cache.PagedAttentionCache.search_prefix_match
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cb_cache.PagedAttentionCache, "search_prefix_match",
                   lambda self, rid, ids: matched.append(own(self, rid, ids)) or matched[-1])
        llmkern.patch(model)
        gathers.clear()
        with llmkern.use_backend("cpp"), llmkern.track() as ran:
            got = _stream(model, prompts, first=1, **cb)
            got_batch = _batch(model, prompts, **cb)
    assert got == want and got_batch == want
    assert any(matched)  # some request started from shared prefix pages
    assert gathers == [] and PAGED <= ran.ops()


@pytest.mark.parametrize("layout,overrides", [("mistral-tiny", dict(sliding_window=8)),
                                              ("qwen2-tiny", dict(use_sliding_window=True, sliding_window=8,
                                                                  max_window_layers=1))])
def test_sliding_windows(layout, overrides, gathers):
    """Sliding-window layers (all of them; or mixed with full layers, two attention groups): the engine's ring of
    sliding_window slots read through block tables, including chunks that wrap the ring while they are written."""
    model = testing.tiny_model(layout, **overrides)
    prompts = _prompts(5, seed=4, lo=2, hi=40)
    cb = dict(page=4, max_batch_tokens=16)
    want = _batch(model, prompts, **cb)
    gathers.clear()
    llmkern.patch(model)
    with warnings.catch_warnings(record=True) as seen, llmkern.use_backend("cpp"), llmkern.track() as ran:
        warnings.simplefilter("always")
        got = _stream(model, prompts, **cb)
    _no_fallback_warning(seen)
    assert got == want
    assert gathers == [] and PAGED <= ran.ops()


def test_bf16_runs_close_to_sdpa():
    model = testing.tiny_model("qwen2-tiny", dtype=torch.bfloat16)
    prompts = _prompts(5, seed=5)
    want = _batch(model, prompts, n=8)
    llmkern.patch(model)
    with llmkern.use_backend("cpp"), llmkern.track() as ran:
        got = _batch(model, prompts, n=8)
    assert PAGED <= ran.ops()
    assert [len(g) for g in got] == [8] * len(prompts)
    # bf16 rounds differently from transformers' bf16 SDPA (logits and softmax stay fp32 here): on a random tiny
    # model near-ties flip now and then (transformers' own bf16 tokens differ from its fp32 ones about as often).
    assert sum(g[0] == w[0] for g, w in zip(got, want)) >= len(prompts) - 1, (got, want)
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.6 * sum(len(w) for w in want), (got, want)


def test_unpatch_restores_transformers_path_on_a_kept_manager(gathers):
    """A persistent manager (kept on the model between sessions) reuses llmkern's attention in its next session;
    unpatch makes it transformers' again (its batch processor is rebuilt on 'sdpa')."""
    model = testing.tiny_model("llama-tiny")
    before = dict(vars(model))
    prompts = _prompts(3, seed=6)
    want = _batch(model, prompts)
    gathers.clear()
    llmkern.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers warns that a persistent manager was sized for this batch
        with llmkern.use_backend("cpp"), llmkern.track() as ran:
            got = [model.generate_batch(prompts, generation_config=_gen_config(), persistent_manager=True,
                                        continuous_batching_config=_cb_config())
                   for _ in range(2)]  # the second session: the kept manager, attached again
        assert [[out[k].generated_tokens for k in sorted(out)] for out in got] == [want, want]
        assert ran[("paged_decode_attention", "cpp")] and model.config._attn_implementation == NAME
        manager = model._cached_continuous_batching_manager
        cache = manager.batch_processor.cache
        assert "_llmkern_cb" in vars(cache) and gathers == []
        llmkern.unpatch(model)
        assert "_llmkern_cb" not in vars(cache) and "_llmkern_cb" not in vars(manager)
        assert model.config._attn_implementation == "sdpa"
        assert vars(model).keys() - {"_cached_continuous_batching_manager"} == before.keys()
        with llmkern.track() as ran:
            assert _batch(model, prompts) == want
    assert not ran.ops() & PAGED
    assert gathers  # transformers' own path again
    model.destroy_cached_continuous_batching_manager()


def test_changed_hook_falls_back_loudly_to_sdpa(monkeypatch):
    """A transformers release whose cache method llmkern hooks into has another signature: the manager runs
    transformers' 'sdpa', with a warning naming what is missing; tokens are still right."""
    model = testing.tiny_model("qwen3-tiny")
    prompts = _prompts(3, seed=8)
    want = _batch(model, prompts)
    own = cb_cache.PagedAttentionCache.extend_read_and_write_indices

    def extend_read_and_write_indices(self, *args, **kwargs):  # same behaviour, another signature
        return own(self, *args, **kwargs)

    monkeypatch.setattr(cb_cache.PagedAttentionCache, "extend_read_and_write_indices", extend_read_and_write_indices)
    llmkern.patch(model)
    with pytest.warns(UserWarning, match=r"cannot run under this manager: this transformers release lacks what "
                                         r"llmkern hooks into: PagedAttentionCache\.extend_read_and_write_indices\("
                                         r"request_id, past_length, query_length, read_index, write_index\).*'sdpa'"):
        with llmkern.use_backend("cpp"), llmkern.track() as ran:
            got = _batch(model, prompts)
    assert got == want
    assert not ran.ops() & PAGED and ran.backends("rms_norm")
    assert model.config._attn_implementation == NAME


def test_unexpected_cache_layout_rebuilds_on_sdpa(monkeypatch):
    """The engine's cache instance is not laid out as llmkern reads it (checked when the manager builds it): the
    batch processor is rebuilt for transformers' attention, with a warning, and the tokens are still right."""
    model = testing.tiny_model("llama-tiny")
    prompts = _prompts(3, seed=9)
    want = _batch(model, prompts)
    monkeypatch.setattr(continuous._Engine, "check", staticmethod(lambda cache: "simulated change"))
    llmkern.patch(model)
    with pytest.warns(UserWarning, match=r"cache is not laid out as llmkern expects: simulated change.*"
                                         r"'(paged\|)?sdpa'"):
        with llmkern.use_backend("cpp"), llmkern.track() as ran:
            got = _batch(model, prompts)
    assert got == want and not ran.ops() & PAGED
    assert model.config._attn_implementation == NAME


def test_unsupported_engine_settings_say_why():
    """What llmkern's kernels cannot serve keeps transformers' attention, with the reason."""
    model = testing.tiny_model("mistral-tiny", sliding_window=8)
    prompts = _prompts(3, seed=10)
    want = _batch(model, prompts)  # page 16 > window 8: a ring inside one page
    llmkern.patch(model)
    with pytest.warns(UserWarning, match=r"sliding_window=8 is not a multiple of page_size=16"):
        with llmkern.use_backend("cpp"), llmkern.track() as ran:
            got = _batch(model, prompts)
    assert got == want and not ran.ops() & PAGED
