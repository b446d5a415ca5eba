"""transformers' continuous batching on a patched model (issue 20, item 1, and item 2's attention).

Continuous batching (``generate_batch``, the manager of ``init_continuous_batching``, ``transformers serve``) accepts
only transformers' own attention names and runs its own paged cache. A patched model is handed to it on 'sdpa'
attention, then its attention over the engine's pages runs llmkern's paged kernels (``llmkern/continuous.py``;
tests/test_cb_kernels.py covers that path in depth); it is switched back to llmkern's own attention when the manager
stops (``llmkern/attention.py``, ``install``). Greedy fp32 tokens must equal the unpatched model's under continuous
batching, with requests joining mid-run.
"""

import inspect
import warnings

import pytest
import torch
from transformers import GenerationConfig

import llmkern
from llmkern import testing
from llmkern.attention import NAME

cb = pytest.importorskip("transformers.generation.continuous_batching")
try:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
except ImportError:  # older releases: the cache is sized from the generation config
    ContinuousBatchingConfig = None

LAYOUTS = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny"]


def _prompts(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (int(length),), generator=g).tolist()
            for length in torch.randint(2, 24, (n,), generator=g)]


def _gen_config(n=6):
    return GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)


def _cb_kwargs():
    """A small cache (the default sizes it from the free memory): 32 pages of 16 tokens, under the field names of
    the installed release (5.4 says block_size, later releases page_size)."""
    if ContinuousBatchingConfig is None:
        return {}
    fields = inspect.signature(ContinuousBatchingConfig).parameters
    size = "page_size" if "page_size" in fields else "block_size"
    return dict(continuous_batching_config=ContinuousBatchingConfig(num_blocks=32, max_batch_tokens=64, **{size: 16}))


def _batch(model, prompts, n=6):
    out = model.generate_batch(prompts, generation_config=_gen_config(n), **_cb_kwargs())
    return [out[k].generated_tokens for k in sorted(out, key=lambda k: int(k.rpartition("_")[2]))]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_batch_on_a_patched_model(layout):
    model = testing.tiny_model(layout)
    prompts = _prompts()
    want = _batch(model, prompts)
    llmkern.patch(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with llmkern.track() as ran:
            got = _batch(model, prompts)
    assert not [w for w in seen if "continuous batching" in str(w.message)], [str(w.message) for w in seen]
    assert got == want
    assert ran.backends("rms_norm") and ran.backends("apply_rope") and ran.backends("silu_and_mul")
    assert ran.backends("paged_decode_attention") and ran.backends("paged_prefill_attention")
    assert model.config._attn_implementation == NAME  # switched back when the manager stopped
    assert llmkern.patch_report(model).attention == NAME
    # and generate() runs llmkern's attention again
    with llmkern.track() as ran:
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)
    assert ran.backends("paged_decode_attention")


def test_streaming_manager_with_requests_joining_mid_run():
    model = testing.tiny_model("qwen2-tiny")
    prompts = _prompts(6, seed=1)
    want = _batch(model, prompts)
    llmkern.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = model.init_continuous_batching(generation_config=_gen_config(), **_cb_kwargs())
    manager.start()
    try:
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=6) for i, p in enumerate(prompts[:3])]
        first = manager.get_result(timeout=60)  # one finishes before the others join
        assert first is not None
        ids += [manager.add_request(p, request_id=f"r{i + 3}", max_new_tokens=6) for i, p in enumerate(prompts[3:])]
        results = {first.request_id: first.generated_tokens}
        while len(results) < len(prompts):
            r = manager.get_result(timeout=60)
            assert r is not None, f"timed out with {sorted(results)} of {ids}"
            results[r.request_id] = r.generated_tokens
    finally:
        manager.stop(block=True, timeout=60)
    assert [results[f"r{i}"] for i in range(len(prompts))] == want
    assert model.config._attn_implementation == NAME


def test_patch_and_unpatch_refuse_while_a_manager_runs_and_a_copy_batches_itself():
    model = testing.tiny_model("qwen2-tiny")
    llmkern.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = model.init_continuous_batching(generation_config=_gen_config(), **_cb_kwargs())
    try:
        # patch() again (the config reads 'sdpa' meanwhile) or unpatch would pull the attention from under the
        # manager's thread
        with pytest.raises(RuntimeError, match=r"llmkern.patch: a continuous-batching manager is running"):
            llmkern.patch(model)
        with pytest.raises(RuntimeError, match=r"llmkern.unpatch: .*manager.stop\(\) first"):
            llmkern.unpatch(model)
    finally:
        manager.stop(block=True, timeout=60)
    assert model.config._attn_implementation == NAME and llmkern.unpatch(model)

    # The hooks are bound to the instance: a deep copy of a patched model batches itself, not the original.
    import copy

    llmkern.patch(model)
    twin = copy.deepcopy(model)
    assert twin.init_continuous_batching.__self__ is twin and twin.create_masks_for_generate.__self__ is twin
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1)
    prompts = _prompts(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _batch(twin, prompts) != _batch(model, prompts)


def test_unpatch_removes_the_continuous_batching_hook():
    model = testing.tiny_model("llama-tiny")
    before = dict(vars(model))
    llmkern.patch(model)
    assert "init_continuous_batching" in vars(model)
    llmkern.unpatch(model)
    assert "init_continuous_batching" not in vars(model) and vars(model).keys() == before.keys()
    assert _batch(model, _prompts(2)) == _batch(testing.tiny_model("llama-tiny"), _prompts(2))
