"""A patched model behaves like the model it patched, as transformers' own model tests expect of it (issue 22).

Every head class the installed transformers ships for Llama, Qwen2, Mistral and Qwen3 (found in the modeling
modules, so a head a new release adds is tested too) is patched and checked for: outputs close to the unpatched
model's in fp32 and the same with and without ``return_dict``; hidden states and attention weights when asked;
save/load; resizing the token embeddings; a training step; the cache ``generate`` returns read as transformers'
``[batch, heads, length, head_dim]``; ``set_attn_implementation`` switched away, back, and across ``unpatch``;
``generate`` with every ``cache_implementation`` the release offers; and two models sharing one config, one
generation config and one class, of which only the patched one may change.

fp32 outputs are compared with a tolerance of a few fp32 ulps, not bit for bit: llmkern's RoPE rounds once where
eager rounds each product (README, "Where fp16/bf16 results are rounded"); greedy tokens must be equal.
"""

import copy
import importlib
import json
import os
import warnings

import pytest
import torch
from transformers import PreTrainedModel
from transformers.generation import configuration_utils as gen_config

import llmkern
from llmkern import testing
from llmkern.attention import NAME
from llmkern.patching import SUPPORTED

FAMILIES = {"llama": "llama-tiny", "qwen2": "qwen2-tiny", "mistral": "mistral-tiny", "qwen3": "qwen3-tiny"}


def _head_classes(model_type: str) -> list:
    mod = importlib.import_module(SUPPORTED[model_type])
    return sorted(name for name, obj in vars(mod).items()
                  if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.__module__ == mod.__name__
                  and not name.endswith("PreTrainedModel"))


HEADS = [(family, head) for family in FAMILIES for head in _head_classes(family)]


def test_every_family_has_its_usual_heads():
    # The parametrisation below comes from the installed release; make sure it found the classes at all.
    for family in FAMILIES:
        heads = _head_classes(family)
        prefix = heads[0][:len(family)]
        assert any(h.endswith("ForCausalLM") for h in heads) and any(h.endswith("Model") for h in heads), heads
        assert all(h.lower().startswith(prefix.lower()) for h in heads), heads


def _config(family: str, **overrides):
    cfg = testing.tiny_config(FAMILIES[family], num_labels=3, **overrides)
    cfg.initializer_range = 0.08
    return cfg


def _model(family: str, head: str, cfg=None, seed: int = 0, attn: str = "sdpa"):
    cls = getattr(importlib.import_module(SUPPORTED[family]), head)
    torch.manual_seed(seed)
    return cls._from_config(cfg if cfg is not None else _config(family), attn_implementation=attn).eval()


def _inputs(batch: int = 2, length: int = 9):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding in the first row
        ids[0, :3] = 0
        mask[0, :3] = 0
    return ids, mask


def _tensors(out) -> dict:
    """The tensor fields of a model output (nested tuples flattened with their index), past_key_values left out."""
    flat = {}
    items = out.items() if hasattr(out, "items") else enumerate(out)
    for key, value in items:
        if key in ("past_key_values", "cache"):
            continue
        if isinstance(value, torch.Tensor):
            flat[str(key)] = value
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                if isinstance(v, torch.Tensor):
                    flat[f"{key}.{i}"] = v
    return flat


def _assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: outputs {sorted(got)} != {sorted(want)}"
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{what} {k}: {m}")


def _patch(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be skipped on these models
        return llmkern.patch(model, **kw)


@pytest.mark.parametrize("family,head", HEADS)
def test_head_patches_and_matches(family, head):
    """Every head patches with every kernel installed, gives the unpatched outputs (fp32) with and without
    return_dict, and unpatch restores them bit for bit."""
    model = _model(family, head)
    ids, mask = _inputs()
    with torch.no_grad():
        before = _tensors(model(input_ids=ids, attention_mask=mask))
        report = _patch(model)
        assert not report.skipped, report.skipped
        kernels = report.counts()
        assert kernels.get("paged_attention") == 2 and kernels.get("apply_rope") == 2, kernels
        assert kernels.get("fused_add_rms_norm") == 2 and kernels.get("silu_and_mul") == 2, kernels
        assert report.attention == NAME and model.config._attn_implementation == NAME
        with llmkern.track() as ran:
            patched = model(input_ids=ids, attention_mask=mask)
        assert ran.backends("rms_norm") and ran.backends("apply_rope") and ran.backends("silu_and_mul")
        _assert_close(_tensors(patched), before, f"{head} patched")
        as_tuple = model(input_ids=ids, attention_mask=mask, return_dict=False)
        assert isinstance(as_tuple, tuple)
        got = [t for t in as_tuple if isinstance(t, torch.Tensor)]
        want = [t for k, t in _tensors(patched).items() if "." not in k]
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        assert llmkern.unpatch(model)
        after = _tensors(model(input_ids=ids, attention_mask=mask))
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("family,head", HEADS)
def test_hidden_states_and_attentions(family, head):
    """output_hidden_states / output_attentions give what an unpatched eager model gives; the attention weights
    come from transformers' eager attention, run for that call (with a warning that says so)."""
    eager = _model(family, head, attn="eager")
    model = _model(family, head)
    ids, mask = _inputs()
    with torch.no_grad():
        want = _tensors(eager(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                              output_attentions=True))
        llmkern.patch(model)
        with pytest.warns(UserWarning, match="output_attentions=True.*eager attention"):
            got = _tensors(model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                 output_attentions=True))
    assert sum(k.startswith("attentions.") for k in got) == 2
    assert sum(k.startswith("hidden_states.") for k in got) == 3
    _assert_close(got, want, head)


@pytest.mark.parametrize("static", [False, True], ids=["growable", "reserved"])
@pytest.mark.parametrize("family,window", [("qwen2", None), ("mistral", 4)])
def test_attentions_from_generate_over_the_paged_cache(family, window, static):
    """generate(output_attentions=True) on a patched model: every step's weights, as an eager model returns them
    at the columns both hold, and its tokens, while the cache stays a PagedKVCache (growable, or reserved with
    "static"); a sliding window included (the reserved cache's live column counter once shifted that mask)."""
    cfg = _config(family, sliding_window=window) if window else None
    eager = _model(family, f"{_prefix(family)}ForCausalLM", cfg, attn="eager")
    model = _model(family, f"{_prefix(family)}ForCausalLM", cfg)
    ids, mask = _inputs()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_attentions=True,
              return_dict_in_generate=True)
    if static:
        kw["cache_implementation"] = "static"
    want = eager.generate(ids, **kw)
    llmkern.patch(model)
    with pytest.warns(UserWarning, match="output_attentions"):
        got = model.generate(ids, **kw)
    assert type(got.past_key_values).__name__ == "PagedKVCache"
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.attentions) == len(want.attentions) == 4
    for step, (a, b) in enumerate(zip(got.attentions, want.attentions)):
        for layer, (x, y) in enumerate(zip(a, b)):
            if static:  # eager's static-cache weights span max_cache_len columns
                y = y[..., :x.shape[-1]]
                if step == 0:  # a padding query row sees no column: uniform over max_cache_len there, not compared
                    real = mask.bool()[:, None, :, None]
                    x, y = x * real, y * real
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step} layer {layer}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("static", [False, True], ids=["growable", "reserved"])
def test_returned_cache_reads_as_transformers_layout(family, static):
    """out.past_key_values.layers[i].keys / .values are [batch, KV heads, columns, head_dim], equal to an unpatched
    model's cache at the real tokens' columns (zeros at padding, which the paged cache does not store); the pages
    are k_pages / v_pages."""
    ref = _model(family, f"{_prefix(family)}ForCausalLM")
    model = copy.deepcopy(ref)
    ids, mask = _inputs()
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    if static:
        kw["cache_implementation"] = "static"
    want = ref.generate(ids, **kw)
    llmkern.patch(model)
    got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    cache = got.past_key_values
    assert type(cache).__name__ == "PagedKVCache" and cache.reserved == static
    full = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1).bool()  # the last token's K/V is not computed
    for i, (layer, wlayer) in enumerate(zip(cache.layers, want.past_key_values.layers)):
        wk, wv = wlayer.keys, wlayer.values
        if static:  # StaticCache holds max_cache_len columns; the paged view holds those processed
            wk, wv = wk[:, :, :full.shape[1]], wv[:, :, :full.shape[1]]
        k, v = layer.keys, layer.values
        assert k.shape == wk.shape == (2, ref.config.num_key_value_heads, full.shape[1], wk.shape[-1])
        assert layer.k_pages.shape[1] == cache.block_size and layer.k_pages is cache.pages(i)[0]
        sel = full[:, None, :, None].expand_as(k)
        torch.testing.assert_close(k[sel], wk[sel], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v[sel], wv[sel], rtol=1e-4, atol=1e-5)
        assert not k[~sel].any() and not v[~sel].any()
        with pytest.raises(AttributeError, match="cannot be assigned"):
            layer.keys = k


def _prefix(family: str) -> str:
    return {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3"}[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_models_sharing_config_generation_config_and_class(family):
    """Patching one model changes nothing of another built from the same config object and sharing its generation
    config: not the config, not a class, not a module global; unpatch puts the original config object back."""
    cfg = _config(family)
    ref = _model(family, f"{_prefix(family)}ForCausalLM", cfg)
    model = _model(family, f"{_prefix(family)}ForCausalLM", cfg)
    model.generation_config = ref.generation_config
    assert ref.config is cfg and model.config is cfg
    mod = importlib.import_module(SUPPORTED[family])
    globals_before = dict(vars(mod))
    classes = {n: type(m) for n, m in ref.named_modules()}
    gen_before = ref.generation_config.to_dict()
    cfg_before = cfg.to_dict()
    ids, mask = _inputs()
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False)
    want = ref.generate(ids, **kw)
    want_static = ref.generate(ids, cache_implementation="static", **kw)

    llmkern.patch(model)
    assert cfg._attn_implementation == "sdpa" and ref.config is cfg and model.config is not cfg
    assert model.model.config is model.config  # one private copy, shared inside the model as before
    assert all(m.config is model.config for m in model.modules() if "config" in vars(m))
    assert {n: type(m) for n, m in ref.named_modules()} == classes
    assert dict(vars(mod)) == globals_before
    with llmkern.track() as ran:
        assert torch.equal(ref.generate(ids, **kw), want)
        assert torch.equal(ref.generate(ids, cache_implementation="static", **kw), want_static)
    assert not ran, "the unpatched model ran llmkern ops"
    assert torch.equal(model.generate(ids, **kw), want)
    assert ref.generation_config.to_dict() == gen_before and cfg.to_dict() == cfg_before

    llmkern.unpatch(model)  # nothing changed on the copy: the original object comes back
    assert model.config is cfg and all(m.config is cfg for m in model.modules() if "config" in vars(m))

    # A switch away and patch() again switch the private copy, never the shared config.
    llmkern.patch(model)
    model.set_attn_implementation("eager")
    assert llmkern.patch(model).attention == NAME and cfg._attn_implementation == "sdpa"
    # A caller's own change while patched (set, or in place) stays this model's: the shared config keeps its own.
    model.config.output_hidden_states = True
    model.config.rope_parameters["rope_theta"] = 1234.0
    llmkern.unpatch(model)
    assert model.config is not cfg and model.config.output_hidden_states is True
    assert model.config.rope_parameters["rope_theta"] == 1234.0 and model.config._attn_implementation == "sdpa"
    assert cfg.to_dict() == cfg_before and ref.config is cfg


@pytest.mark.parametrize("family", FAMILIES)
def test_set_attn_implementation_round_trip(family):
    """Switch a patched model to eager, back to llmkern's, and unpatch after a switch: the report and the config
    agree at every point on which attention runs, and so do the tokens and the cache type."""
    model = _model(family, f"{_prefix(family)}ForCausalLM")
    ids, mask = _inputs()
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    want = model.generate(ids, **kw).sequences
    report = llmkern.patch(model)
    assert report.attention == NAME and f"attention: '{NAME}'" in str(report)

    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager" and report.attention == "eager"
    assert "installed but not running" in str(report)
    with llmkern.track() as ran:
        out = model.generate(ids, **kw)
    assert type(out.past_key_values).__name__ == "DynamicCache" and torch.equal(out.sequences, want)
    assert not ran.backends("paged_decode_attention") and ran.backends("rms_norm")

    model.set_attn_implementation(NAME)
    assert report.attention == NAME
    with llmkern.track() as ran:
        out = model.generate(ids, **kw)
    assert type(out.past_key_values).__name__ == "PagedKVCache" and torch.equal(out.sequences, want)
    assert ran.backends("paged_decode_attention")

    model.set_attn_implementation("eager")
    assert llmkern.patch(model).attention == NAME  # patching again switches back
    model.set_attn_implementation("eager")
    llmkern.unpatch(model)  # the caller's own switch stays: it is theirs, not llmkern's
    assert model.config._attn_implementation == "eager" and not llmkern.is_patched(model)
    assert torch.equal(model.generate(ids, **kw).sequences, want)
    llmkern.patch(model)
    llmkern.unpatch(model)  # without a switch, unpatch restores what the model had before patch
    assert model.config._attn_implementation == "eager"


def test_attention_false_leaves_the_config_alone():
    cfg = _config("llama")
    model = _model("llama", "LlamaForCausalLM", cfg)
    report = llmkern.patch(model, attention=False)
    assert model.config is cfg and report.attention == "sdpa" and "attention=False" in str(report)


def _cache_implementations() -> list:
    return list(getattr(gen_config, "ALL_CACHE_IMPLEMENTATIONS", ()))


@pytest.mark.parametrize("impl", _cache_implementations())
def test_generate_with_every_cache_implementation(impl):
    """Each cache_implementation the release offers gives a patched model the unpatched model's greedy tokens, or
    the error the unpatched model gives: "dynamic" and "static" (and names the release maps to them) run llmkern's
    PagedKVCache, any other runs transformers' cache on SDPA with a warning that llmkern's kernels were not used."""
    sliding = "sliding" in impl or "hybrid" in impl
    family = "mistral" if sliding else "llama"
    ref = _model(family, f"{_prefix(family)}ForCausalLM", _config(family, sliding_window=6) if sliding else None)
    model = copy.deepcopy(ref)
    ids, mask = _inputs()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation=impl)
    try:
        want = ref.generate(ids, **kw)
    except Exception as e:  # e.g. "quantized" without optimum-quanto, "offloaded" needing an accelerator
        llmkern.patch(model)
        with pytest.raises(type(e)):
            model.generate(ids, **kw)
        pytest.skip(f"unpatched generate(cache_implementation={impl!r}) raises here too: {type(e).__name__}: "
                    f"{str(e)[:120]}")
    llmkern.patch(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model.generate(ids, return_dict_in_generate=True, **kw)
    assert torch.equal(got.sequences, want)
    paged = type(got.past_key_values).__name__ == "PagedKVCache"
    if impl in ("dynamic", "static"):
        assert paged, f"cache_implementation={impl!r} should run llmkern's PagedKVCache"
    if not paged:
        assert any("llmkern" in str(w.message) and impl in str(w.message) for w in caught), \
            f"cache_implementation={impl!r}: no warning that llmkern's kernels were not used"


@pytest.mark.parametrize("family,head", HEADS)
def test_save_and_load_round_trip(family, head, tmp_path):
    """A patched model saves what the unpatched one saves (weights, keys, a config without llmkern's attention)
    and loads back into the plain class with the same outputs."""
    model = _model(family, head)
    ids, mask = _inputs()
    with torch.no_grad():
        want = _tensors(model(input_ids=ids, attention_mask=mask))
    llmkern.patch(model)
    model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    assert "llmkern" not in json.dumps(saved)
    cls = getattr(importlib.import_module(SUPPORTED[family]), head)
    loaded = cls.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert type(loaded) is cls and loaded.config._attn_implementation == "sdpa"
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        got = _tensors(loaded(input_ids=ids, attention_mask=mask))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("family,head", HEADS)
def test_resize_token_embeddings(family, head):
    """resize_token_embeddings on a patched model resizes what the unpatched one resizes, and the patched model
    runs on (the new lm_head too), close to an unpatched model resized the same way."""
    ref = _model(family, head)
    model = copy.deepcopy(ref)
    llmkern.patch(model)
    for m in (ref, model):
        torch.manual_seed(5)
        m.resize_token_embeddings(600)
    assert model.get_input_embeddings().weight.shape == ref.get_input_embeddings().weight.shape == (600, 128)
    ids, mask = _inputs()
    ids[1, -1] = 599
    with torch.no_grad():
        _assert_close(_tensors(model(input_ids=ids, attention_mask=mask)),
                      _tensors(ref(input_ids=ids, attention_mask=mask)), f"{head} resized")


@pytest.mark.parametrize("family,head", HEADS)
def test_one_training_step(family, head):
    """One optimizer step of a patched model in train() mode: the loss and every parameter's gradient close to the
    unpatched model's (fp32), and the same weights after the step."""
    ref = _model(family, head)
    model = copy.deepcopy(ref)
    llmkern.patch(model)
    ids, mask = _inputs()
    labels = ids.clone() if head.endswith("CausalLM") else None
    for m in (ref, model):
        m.train()
        torch.manual_seed(11)  # the same dropout masks (a token-classification head drops out in train mode)
        out = m(input_ids=ids, attention_mask=mask, labels=labels) if labels is not None else m(
            input_ids=ids, attention_mask=mask)
        loss = out.loss if labels is not None else sum(t.float().square().mean() for t in _tensors(out).values())
        loss.backward()
        m._loss = loss.detach()
    torch.testing.assert_close(model._loss, ref._loss, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert grads[name] is None, name
            continue
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for m in (ref, model):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
