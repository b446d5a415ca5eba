"""patch() on the paths the ecosystem and users take: decorated forwards (transformers 5.24's @deprecate_kwarg),
kernels that cannot be installed (loud, or PatchError with strict=True), the transformers internals patch() relies
on, other heads and subclasses of supported models, a failed re-patch, and no warning flood in generate()."""

import functools
import inspect
import warnings

import pytest
import torch

import llmkern
from llmkern import patching, testing

FAMILIES = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny"]


def _prompt(model, b=1, s=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (b, s), generator=g)


def _greedy(model, ids, n):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def _decorate(fn, log: list, times=1):
    """``fn`` under ``times`` functools.wraps decorators that hold it in a closure cell, as @deprecate_kwarg does;
    decorator ``i`` appends ``i`` to ``log`` per call."""
    for i in range(times):
        def deco(f, i=i):
            @functools.wraps(f)
            def wrapper(*args, **kwargs):
                log.append(i)
                return f(*args, **kwargs)

            return wrapper

        fn = deco(fn)
    return fn


@pytest.mark.parametrize("layout", FAMILIES)
def test_hf_internals_hold_on_the_installed_transformers(layout):
    """Every entry of patching.HF_INTERNALS, checked on the installed release: the next silent change fails here."""
    model = testing.tiny_model(layout)
    assert set(patching.HF_INTERNALS) == {"apply_rotary_pos_emb", "decoder_layer", "rms_norm", "mlp",
                                          "attention_interface", "generate_cache_hook", "continuous_batching",
                                          "decode_layer"}
    layer = model.model.layers[0]
    inner = inspect.unwrap(type(layer.self_attn).forward)
    assert "apply_rotary_pos_emb" in inner.__code__.co_names
    assert callable(inner.__globals__["apply_rotary_pos_emb"])
    assert all(hasattr(layer, p) for p in patching._LAYER_PARTS)
    assert patching._is_rms_norm(layer.input_layernorm) and patching._is_rms_norm(layer.post_attention_layernorm)
    assert patching._is_silu(layer.mlp.act_fn)
    params = inspect.signature(type(model)._prepare_cache_for_generation).parameters
    assert list(params)[1:] == ["generation_config", "model_kwargs", "generation_mode", "batch_size",
                                "max_cache_length"]
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert callable(AttentionInterface.register) and callable(AttentionMaskInterface.register)
    # attention_interface: output_attentions runs the modeling file's eager_attention_forward over an eager mask;
    # generate's create_masks_for_generate takes the config as a keyword (llmkern hands a transformers cache SDPA's)
    from transformers.masking_utils import create_masks_for_generate, eager_mask

    from llmkern.attention import _eager_attention_of

    assert callable(_eager_attention_of(layer.self_attn)) and callable(eager_mask)
    assert "config" in inspect.signature(create_masks_for_generate).parameters
    # continuous_batching: the model method the manager comes from
    assert callable(getattr(type(model), "init_continuous_batching", None))
    # decode_layer: the attention forward's steps (llmkern/decode_layer.py also checks them at the first decode step)
    names = set(inner.__code__.co_names)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "update"} <= names, names
    assert ("q_norm" in names) == layout.startswith("qwen3")
    assert "position_embeddings" in inspect.signature(type(layer).forward).parameters
    # decoder_layer: the base model is model.base_model, holding the layers
    assert model.base_model.layers is model.model.layers


@pytest.mark.parametrize("layout", FAMILIES)
def test_every_kernel_installed_and_called(layout):
    """Exact module counts per kernel for each family, and a forward that calls every one of them."""
    model = testing.tiny_model(layout)
    ids = _prompt(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that is not installed is a warning: none here
        report = llmkern.patch(model, attention=True)
    n = model.config.num_hidden_layers
    counts = report.counts()
    assert counts["apply_rope"] == n and counts["silu_and_mul"] == n and counts["fused_add_rms_norm"] == n
    assert counts["paged_attention"] == n
    assert counts["rms_norm"] == n + 1 + (2 * n if layout.startswith("qwen3") else 0)
    assert report.skipped == []
    with llmkern.track() as ran:
        _greedy(model, ids, 2)
    expected = {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul", "reshape_and_cache",
                "paged_prefill_attention", "paged_decode_attention"}
    assert expected <= ran.ops(), dict(ran)


@pytest.mark.parametrize("times", [1, 2])
def test_rope_is_seen_through_decorators(times):
    """The RoPE kernel reaches a forward under decorators (5.24 wraps it in @deprecate_kwarg); the decorators still
    run, and the module global is untouched."""
    from transformers.models.llama import modeling_llama

    model = testing.tiny_model("llama-tiny")
    ids = _prompt(model)
    eager = _greedy(model, ids, 6)
    base = type(model.model.layers[0].self_attn)
    log = []
    decorated = type("DecoratedAttention", (base,), {"forward": _decorate(base.forward, log, times)})
    for layer in model.model.layers:
        layer.self_attn.__class__ = decorated
    original_global = modeling_llama.apply_rotary_pos_emb
    report = llmkern.patch(model, attention=False, linear=False)
    assert report.counts()["apply_rope"] == model.config.num_hidden_layers and report.skipped == []
    with llmkern.track() as ran:
        assert torch.equal(_greedy(model, ids, 6), eager)
    assert "apply_rope" in ran.ops()
    assert set(log) == set(range(times))  # the patched class runs a copy of the chain: every wrapper ran
    assert modeling_llama.apply_rotary_pos_emb is original_global


def _opaque_attention(model):
    """Give every attention a forward llmkern cannot see into: a wrapper that does not keep what it wraps in a
    closure cell (a callable object), so no apply_rotary_pos_emb can be found to rebind."""
    base = type(model.model.layers[0].self_attn)

    class Opaque:
        def __init__(self, f):
            self.f = f
            functools.update_wrapper(self, f)

        def __get__(self, obj, objtype=None):
            return functools.partial(self.f, obj)

    cls = type("OpaqueAttention", (base,), {"forward": Opaque(base.forward)})
    for layer in model.model.layers:
        layer.self_attn.__class__ = cls


def test_a_kernel_that_cannot_be_installed_is_a_warning():
    model = testing.tiny_model("llama-tiny")
    _opaque_attention(model)
    with pytest.warns(UserWarning, match=r"(?s)model\.layers\.0\.self_attn \(apply_rope\): its forward is a "
                                         r"partial.*strict=True"):
        report = llmkern.patch(model, attention=False, linear=False)
    assert [w for w, _ in report.skipped] == [f"model.layers.{i}.self_attn (apply_rope)"
                                             for i in range(model.config.num_hidden_layers)]
    assert "apply_rope" not in report.counts() and "not patched" in str(report)
    ids = _prompt(model)
    with llmkern.track() as ran:
        model(input_ids=ids)
    assert "apply_rope" not in ran.ops() and "rms_norm" in ran.ops()


def test_strict_raises_and_leaves_the_model_as_it_was():
    model = testing.tiny_model("llama-tiny")
    _opaque_attention(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(llmkern.PatchError, match=r"left as it was.*apply_rope"):
        llmkern.patch(model, strict=True)
    assert not llmkern.is_patched(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == "sdpa"


def test_explicit_linear_without_a_kernel_is_loud(monkeypatch):
    """patch(linear=True) where no C++ Linear serves the model: a warning, nothing swapped. The model's dtype is one
    this CPU's C++ Linear does not serve; where it serves all three, the extension is made to look unbuilt."""
    from llmkern import _ext

    unserved = [d for d in (torch.float16, torch.bfloat16, torch.float32)
                if not (_ext.load() and torch.ops.llmkern_C.cpu_linear_supported(d))]
    if unserved:
        dtype, reason = unserved[0], f"no C\\+\\+ Linear kernel for {str(unserved[0]).replace('torch.', '')}"
    else:
        monkeypatch.setitem(_ext._state, "ok", False)
        monkeypatch.setitem(_ext._state, "why", "simulated: no extension")
        dtype, reason = torch.float32, "the C\\+\\+ extension is not loaded"
    model = testing.tiny_model("llama-tiny", dtype)
    with pytest.warns(UserWarning, match=r"(?s)linear \(all nn.Linear modules\).*" + reason):
        report = llmkern.patch(model, linear=True, attention=False)
    assert "linear" not in report.counts()
    assert type(model.lm_head) is torch.nn.Linear


def test_failed_repatch_leaves_the_previous_patch():
    model = testing.tiny_model("llama-tiny")
    first = llmkern.patch(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="block_size"):
        llmkern.patch(model, block_size=12)
    assert llmkern.is_patched(model)
    assert llmkern.patch_report(model).options == first.options
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == "llmkern_paged"


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(num_blocks=-1), dict(max_memory_bytes=1000),
                                 dict(max_memory_bytes=1.5e9), dict(num_blocks=8, max_memory_bytes=10 ** 9)])
def test_bad_cache_options_fail_at_patch(bad):
    model = testing.tiny_model("llama-tiny")
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        llmkern.patch(model, **bad)
    assert not llmkern.is_patched(model)


def test_base_model_is_patched():
    """patch(model.model) (a LlamaModel: no generate) works with the paged attention on by default."""
    model = testing.tiny_model("llama-tiny")
    ids = _prompt(model)
    with torch.inference_mode():
        before = model.model(input_ids=ids).last_hidden_state
    report = llmkern.patch(model.model)
    assert report.counts()["paged_attention"] == model.config.num_hidden_layers
    with torch.inference_mode(), llmkern.track() as ran:
        after = model.model(input_ids=ids).last_hidden_state
    assert {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul"} <= ran.ops()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    llmkern.unpatch(model.model)
    assert "_prepare_cache_for_generation" not in vars(model.model)


def test_other_heads_and_subclasses_are_accepted():
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, Qwen2ForTokenClassification

    class MyLlama(LlamaForCausalLM):
        pass

    llama_cfg = testing.tiny_model("llama-tiny").config
    qwen_cfg = testing.tiny_model("qwen2-tiny").config
    for cls, cfg in ((MyLlama, llama_cfg), (LlamaForSequenceClassification, llama_cfg),
                     (Qwen2ForTokenClassification, qwen_cfg)):
        cfg = cfg.__class__.from_dict(cfg.to_dict())
        cfg.num_labels = 3
        cfg.pad_token_id = 0
        torch.manual_seed(0)
        model = cls(cfg).eval()
        ids = _prompt(model)
        with torch.inference_mode():
            before = model(input_ids=ids).logits
        report = llmkern.patch(model)
        assert report.counts()["apply_rope"] == cfg.num_hidden_layers, cls.__name__
        with torch.inference_mode(), llmkern.track() as ran:
            after = model(input_ids=ids).logits
        assert "apply_rope" in ran.ops()
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_generate_warns_no_more_than_eager():
    """transformers 5.24 renamed the cache argument; passing both names was a FutureWarning per layer and step."""
    model = testing.tiny_model("qwen2-tiny")
    ids = _prompt(model)

    def run():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _greedy(model, ids, 8)
        return [str(w.message)[:200] for w in caught]

    eager = run()
    llmkern.patch(model)
    patched = run()
    assert len(patched) <= len(eager), patched[:3]


def test_decoder_layer_takes_positional_arguments():
    """A caller that passes the decoder layer's arguments by position gets the original layer's meaning."""
    model = testing.tiny_model("llama-tiny")
    layer = model.model.layers[0]
    x = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    cos_sin = model.model.rotary_emb(x, pos)
    with torch.inference_mode():
        ref = layer(x, None, pos, position_embeddings=cos_sin)
        llmkern.patch(model, attention=False, linear=False)
        out = layer(x, None, pos, position_embeddings=cos_sin)
        with pytest.raises(TypeError, match="multiple values"):
            layer(x, None, attention_mask=None, position_embeddings=cos_sin)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_fallback_to_the_reference_is_said(tmp_path):
    """Without the C++ extension, CPU ops run the reference: a RuntimeWarning that says why, once per process."""
    import subprocess
    import sys

    code = ("import warnings, torch\n"
            "from llmkern import _ext, backends, ops\n"
            "_ext._state.update(ok=False, why='simulated: extension not built')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    with backends.track() as t:\n"
            "        ops.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6)\n"
            "        ops.silu_and_mul(torch.ones(2, 8), torch.ones(2, 8))\n"
            "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
            "print(len(msgs), msgs[0] if msgs else '', sorted(t))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRITON_INTERPRET", "LLMKERN_BACKEND")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("1 llmkern: CPU tensors run the pure-torch reference"), p.stdout
    assert "simulated: extension not built" in p.stdout
    assert "('rms_norm', 'reference')" in p.stdout and "('silu_and_mul', 'reference')" in p.stdout


def test_missing_private_torch_api_falls_back_to_the_public_path(monkeypatch):
    """The eager fast path calls ops through torch._C._dispatch_call_boxed (private); a torch without it gets the
    OpOverload itself, which computes the same."""
    from llmkern import backends

    overload = torch.ops.aten.mul.Tensor
    x = torch.arange(4.0)
    assert torch.equal(backends._boxed_call(overload)(x, x), x * x)
    monkeypatch.delattr(torch._C, "_dispatch_call_boxed")
    fallback = backends._boxed_call(overload)
    assert fallback is overload and torch.equal(fallback(x, x), x * x)


def test_torch_compile_of_a_patched_model_generates_eager_tokens():
    """torch.compile(dynamic=True) over a patched model with the default (growable) paged cache: the fake
    implementations take symbolic sizes (two equal sizes may be different symbols; lengths may be SymInts) and the
    tokens are eager's. (Graph breaks remain at the growable cache's host-side plan; the reserved cache compiles
    to one graph: tests/test_graph_ready.py, which also runs inductor.)"""
    model = testing.tiny_model("llama-tiny")
    ids = _prompt(model)
    eager = _greedy(model, ids, 6)
    llmkern.patch(model)
    model.forward = torch.compile(model.forward, dynamic=True, backend="aot_eager")
    try:
        with llmkern.use_backend("cpp"):  # the C++ kernels behind the same ops: the interpreter is 50x slower
            assert torch.equal(_greedy(model, ids, 6), eager)
    finally:
        del model.forward
