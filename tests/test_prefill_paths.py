"""Which attention serves a prefill on CPU, and that each choice gives eager's tokens.

A fresh prefill (nothing cached before, whole prompts, left padding or none) runs torch's SDPA over the step's own K/V after
writing them to the pages (llmkern/attention.py, ``_dense_prefill``); every other prefill — padding after a real token, a
second turn on a filled cache, a sliding window narrower than the prompt, softcap, or a backend forced with
``llmkern.use_backend`` — runs the paged prefill kernel. Each case asserts, through ``llmkern.track()``, which one
ran, and that greedy tokens (fp32) equal the unpatched model's, so the decode steps that follow read what the
prefill wrote.

The suite runs with ``TRITON_INTERPRET=1`` (tests/conftest.py), where the automatic CPU choice is Triton and this
routing is off; so the module runs itself once more in a subprocess with ``TRITON_INTERPRET=0``, where the automatic
choice is the C++ backend, as on a user's machine (``test_routing_in_a_process_without_the_interpreter``).
"""

import os
import subprocess
import sys

import pytest
import torch

import llmkern
from llmkern import testing
from llmkern.attention import _DENSE_PREFILL

DENSE = _DENSE_PREFILL[0]
PAGED = "paged_prefill_attention"


def _ids(model, b=1, s=23, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (b, s), generator=g)


def _gen(model, ids, mask=None, n=8, backend=None, **kw):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.inference_mode(), llmkern.use_backend(backend):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0, **kw)


def _routing_applies() -> str:
    """Why the routing cannot be seen in this process ("" when it can)."""
    from llmkern import _ext

    if not _ext.load():
        return f"the C++ extension is not loaded: {_ext.why_not()}"
    if llmkern.backends.triton_interpret():
        return ("TRITON_INTERPRET is set, so the automatic CPU choice is Triton; "
                "test_routing_in_a_process_without_the_interpreter runs these cases")
    return ""


routing = pytest.mark.skipif(bool(_routing_applies()), reason=_routing_applies() or "-")


def test_routing_in_a_process_without_the_interpreter():
    if not llmkern.backends.triton_interpret():
        pytest.skip("this process already runs without the interpreter: the cases ran here")
    from llmkern import _ext

    if not _ext.load():
        pytest.skip(f"the C++ extension is not loaded: {_ext.why_not()}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", __file__],
                       env=env, capture_output=True, text=True, timeout=1200,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and " skipped" in tail and " failed" not in tail, tail


@routing
@pytest.mark.parametrize("layout", ["llama-tiny", "qwen2-tiny", "qwen2.5-0.5b", "mistral-tiny", "qwen3-tiny"])
@pytest.mark.parametrize("b", [1, 3])
def test_fresh_prompts_run_sdpa_then_decode_from_the_pages(layout, b):
    model = testing.tiny_model(layout)
    ids = _ids(model, b=b)
    eager = _gen(model, ids)
    llmkern.patch(model)
    with llmkern.track() as ran:
        paged = _gen(model, ids)
    n_layers = model.config.num_hidden_layers
    assert ran[(DENSE, _DENSE_PREFILL[1])] == n_layers and PAGED not in ran.ops(), dict(ran)
    assert ran[("paged_decode_attention", "cpp")] == n_layers * 7, dict(ran)  # 8 new tokens: 7 decode steps
    assert torch.equal(paged, eager), (paged, eager)


@routing
@pytest.mark.parametrize("layout", ["qwen2-tiny", "qwen2.5-0.5b"])
def test_left_padded_prompts_run_sdpa(layout):
    model = testing.tiny_model(layout)
    ids = _ids(model, b=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids = ids.masked_fill(mask == 0, 0)
    eager = _gen(model, ids, mask)
    llmkern.patch(model)
    with llmkern.track() as ran:
        paged = _gen(model, ids, mask)
    assert DENSE in ran.ops() and PAGED not in ran.ops(), dict(ran)
    assert torch.equal(paged, eager)


@routing
def test_padding_inside_a_prompt_runs_the_paged_kernel():
    """A padding column after a real token (not left padding): the real tokens are gathered to the end of the row
    (StepPlan.q_index), which the paged kernel serves."""
    model = testing.tiny_model("llama-tiny")
    ids = _ids(model, b=2)
    mask = torch.ones_like(ids)
    mask[1, 5:8] = 0
    eager = _gen(model, ids, mask)
    llmkern.patch(model)
    with llmkern.track() as ran:
        paged = _gen(model, ids, mask)
    assert PAGED in ran.ops() and DENSE not in ran.ops(), dict(ran)
    assert torch.equal(paged, eager)


@routing
def test_second_turn_on_a_filled_cache_runs_the_paged_kernel():
    model = testing.tiny_model("llama-tiny")
    ids = _ids(model)
    turn1 = _gen(model, ids, return_dict_in_generate=True)
    turn2_ids = torch.cat([turn1.sequences, _ids(model, s=17, seed=4)], dim=1)
    eager2 = _gen(model, turn2_ids)
    llmkern.patch(model)
    with llmkern.track() as first:
        out = _gen(model, ids, return_dict_in_generate=True)
    assert first[(DENSE, _DENSE_PREFILL[1])] > 0 and PAGED not in first.ops()
    with llmkern.track() as second:
        paged2 = _gen(model, turn2_ids, past_key_values=out.past_key_values)
    assert PAGED in second.ops() and DENSE not in second.ops(), dict(second)
    assert torch.equal(paged2, eager2)


@routing
@pytest.mark.parametrize("window,dense", [(8, False), (64, True)])
def test_sliding_window_narrower_than_the_prompt_runs_the_paged_kernel(window, dense):
    model = testing.tiny_model("mistral-tiny", sliding_window=window)
    ids = _ids(model, s=23)
    eager = _gen(model, ids, n=12)
    llmkern.patch(model)
    with llmkern.track() as ran:
        paged = _gen(model, ids, n=12)
    assert (DENSE in ran.ops()) == dense and (PAGED in ran.ops()) == (not dense), dict(ran)
    assert torch.equal(paged, eager)


@routing
def test_a_forced_backend_runs_the_paged_kernel():
    model = testing.tiny_model("qwen2-tiny")
    ids = _ids(model)
    eager = _gen(model, ids)
    llmkern.patch(model)
    with llmkern.track() as ran:
        paged = _gen(model, ids, backend="cpp")
    assert PAGED in ran.ops() and DENSE not in ran.ops(), dict(ran)
    assert torch.equal(paged, eager)


@routing
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fresh_prefill_is_transformers_sdpa_call(dtype, padded):
    """The dense path makes transformers' own SDPA call: the prefill's logits are bit-equal to those of the model
    patched with ``attention=False`` (the same row ops and Linear, transformers' SDPA attention), in every dtype,
    with and without left padding (at the real positions)."""
    model = testing.tiny_model("qwen2-tiny", dtype=dtype)
    ids = _ids(model, b=2, s=40)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0
    llmkern.patch(model, attention=False)
    with torch.inference_mode():
        want = model(ids, attention_mask=mask).logits
    llmkern.unpatch(model)
    llmkern.patch(model)
    cache = llmkern.PagedKVCache(model.config)
    with torch.inference_mode(), llmkern.track() as ran:
        got = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    assert DENSE in ran.ops(), dict(ran)
    assert cache.seq_lens() == [40, 33 if padded else 40]
    real = mask.bool()
    assert torch.equal(got[real], want[real]), (got[real] - want[real]).abs().max()


@routing
@pytest.mark.parametrize("padded", [False, True])
def test_fresh_prefill_under_torch_compile(padded):
    """torch.compile(dynamic=True) over a patched model: the dense prefill is traced (plan.fresh and the backend
    choice are host values dynamo guards on) and the tokens are eager's."""
    model = testing.tiny_model("qwen2-tiny")
    ids = _ids(model, b=2)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
        ids = ids.masked_fill(mask == 0, 0)
    eager = _gen(model, ids, mask, n=6)
    llmkern.patch(model)
    model.forward = torch.compile(model.forward, dynamic=True, backend="aot_eager")
    try:
        with llmkern.track() as ran:
            paged = _gen(model, ids, mask, n=6)
    finally:
        del model.forward
    assert DENSE in ran.ops(), dict(ran)
    assert torch.equal(paged, eager)
