"""The fused decode step of a patched CPU decoder layer (llmkern/decode_layer.py): bit for bit the module path's
result, taken only where no hook or mode needs the modules, and switched off loudly when it disagrees."""

from __future__ import annotations

import warnings

import pytest
import torch

import llmkern
from llmkern import decode_layer, testing

LAYOUTS = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny"]


def _set_fast(model, on: bool, saved: dict) -> None:
    """Take the fast path away from (or give it back to) every layer, keeping its verified state."""
    for layer in model.model.layers:
        if on:
            layer.__dict__[decode_layer._ATTR] = saved[layer]
        else:
            saved.setdefault(layer, layer.__dict__.get(decode_layer._ATTR))
            layer.__dict__.pop(decode_layer._ATTR, None)


def _generate(model, ids, mask, new=8):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def _prompt(model, B=1, S=12, pad=0):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, model.config.vocab_size, (B, S), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :pad] = 0
        ids[0, :pad] = 0
    return ids, mask


def _fast_vs_modules(model, ids, mask, new=8):
    """(fast sequences, fast scores, module sequences, module scores, fast steps taken)."""
    saved: dict = {}
    _set_fast(model, False, saved)
    seq_m, sc_m = _generate(model, ids, mask, new)
    _set_fast(model, True, saved)
    seq_f, sc_f = _generate(model, ids, mask, new)
    steps = sum(s.steps for s in decode_layer.states(model))
    return seq_f, sc_f, seq_m, sc_m, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_path_equals_module_path(layout, dtype):
    model = testing.tiny_model(layout, dtype)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        assert len(decode_layer.states(model)) == model.config.num_hidden_layers
        seq_f, sc_f, seq_m, sc_m, steps = _fast_vs_modules(model, *_prompt(model))
    # 8 new tokens: the prefill and the first decode step (verification) on the module path, 6 steps fast per layer.
    assert steps == 6 * model.config.num_hidden_layers
    assert torch.equal(seq_f, seq_m)
    assert torch.equal(sc_f, sc_m), (sc_f - sc_m).abs().max()


@pytest.mark.parametrize("case", ["left-padded batch", "sliding window", "int8 pages", "group 7"])
def test_fast_path_equals_module_path_cases(case):
    kw, patch_kw, B, pad, S = {}, {}, 1, 0, 12
    layout = "llama-tiny"
    if case == "left-padded batch":
        B, pad = 3, 5
    elif case == "sliding window":  # context past the window: the window the module path passed must be used
        layout, kw, S = "mistral-tiny", dict(sliding_window=8), 14
    elif case == "int8 pages":
        patch_kw = dict(kv_dtype="int8")
    else:
        layout = "qwen2.5-0.5b"
        kw = dict(hidden_size=448, intermediate_size=256, num_attention_heads=7, num_key_value_heads=1)
    model = testing.tiny_model(layout, torch.float32, **kw)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model, **patch_kw)
        seq_f, sc_f, seq_m, sc_m, steps = _fast_vs_modules(model, *_prompt(model, B=B, S=S, pad=pad), new=10)
    assert steps == 8 * model.config.num_hidden_layers
    assert torch.equal(seq_f, seq_m)
    assert torch.equal(sc_f, sc_m)


def test_hook_takes_the_module_path():
    model = testing.tiny_model("llama-tiny", torch.float32)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        ref_seq, ref_sc = _generate(model, ids, mask)
        calls = []
        # A hook on one projection: every step must call it, so no layer may skip the module tree there.
        h = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, o: calls.append(1))
        seq, sc = _generate(model, ids, mask)
        h.remove()
    assert len(calls) == 8  # the prefill and 7 decode steps
    assert torch.equal(seq, ref_seq) and torch.equal(sc, ref_sc)
    states = decode_layer.states(model)
    assert states[0].steps == 6 + 7 and states[1].steps == 6  # layer 0 kept its fast path (verified once), layer 1 not


def test_global_hook_and_grad_mode_take_the_module_path():
    model = testing.tiny_model("llama-tiny", torch.float32)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        _generate(model, ids, mask)
        before = sum(s.steps for s in decode_layer.states(model))
        seen = []
        h = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
        try:
            _generate(model, ids, mask)
        finally:
            h.remove()
        assert "LlmkernLinear" in seen
        assert sum(s.steps for s in decode_layer.states(model)) == before


def test_a_mismatch_is_a_warning_and_the_module_path(monkeypatch):
    """A planted difference (what a transformers release with another attention forward would produce): the first
    decode step catches it, warns, and every step keeps the module path's result."""
    model = testing.tiny_model("qwen3-tiny", torch.float32)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        ref_seq, ref_sc = _generate(model, ids, mask)
        llmkern.unpatch(model)
        llmkern.patch(model)
        real = decode_layer._qkv

        def no_q_norm(state, x, cos, sin):  # the fast path forgets Qwen3's q_norm
            saved = state.q_norm
            state.q_norm = None
            try:
                q, _, _ = real(state, x, cos, sin)
            finally:
                state.q_norm = saved
            return (q, *real(state, x, cos, sin)[1:])

        monkeypatch.setattr(decode_layer, "_qkv", no_q_norm)
        with pytest.warns(UserWarning, match="fused decode step .* is off: its query/key/value differ"):
            seq, sc = _generate(model, ids, mask)
    assert torch.equal(seq, ref_seq) and torch.equal(sc, ref_sc)
    assert all(s.disabled and s.steps == 0 for s in decode_layer.states(model))


def test_an_output_mismatch_is_caught(monkeypatch):
    model = testing.tiny_model("llama-tiny", torch.float32)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        ref_seq, ref_sc = _generate(model, ids, mask)
        llmkern.unpatch(model)
        llmkern.patch(model)
        real = decode_layer._rest
        monkeypatch.setattr(decode_layer, "_rest", lambda state, x, a: real(state, x, a) * (1 + 2 ** -20))
        with pytest.warns(UserWarning, match="its output differs"):
            seq, sc = _generate(model, ids, mask)
    assert torch.equal(seq, ref_seq) and torch.equal(sc, ref_sc)


def test_only_a_fully_patched_cpu_model_gets_it():
    model = testing.tiny_model("llama-tiny", torch.float32)
    llmkern.patch(model)
    assert len(decode_layer.states(model)) == 2
    llmkern.unpatch(model)
    assert decode_layer.states(model) == []
    for opts in (dict(rms_norm=False), dict(swiglu=False), dict(rope=False), dict(linear=False),
                 dict(attention=False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            llmkern.patch(model, **opts)
        assert decode_layer.states(model) == [], opts
        llmkern.unpatch(model)
