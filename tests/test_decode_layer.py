"""The fused decode step of a patched CPU decoder layer (llmkern/decode_layer.py): bit for bit the module path's
result, taken only where no hook or mode needs the modules, and switched off loudly when it disagrees."""

from __future__ import annotations

import warnings

import pytest
import torch

import llmkern
from llmkern import _ext, decode_layer, testing

LAYOUTS = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny"]


def _set_fast(model, on: bool, saved: dict) -> None:
    """Take the fast path away from (or give it back to) every layer, keeping its verified state."""
    for layer in model.model.layers:
        if on:
            layer.__dict__[decode_layer._ATTR] = saved[layer]
        else:
            saved.setdefault(layer, layer.__dict__.get(decode_layer._ATTR))
            layer.__dict__.pop(decode_layer._ATTR, None)


def _generate(model, ids, mask, new=8, **gen_kw):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                             **gen_kw)
    return out.sequences, torch.stack(out.scores)


def _prompt(model, B=1, S=12, pad=0):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, model.config.vocab_size, (B, S), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :pad] = 0
        ids[0, :pad] = 0
    return ids, mask


def _fast_vs_modules(model, ids, mask, new=8, **gen_kw):
    """(fast sequences, fast scores, module sequences, module scores, fast steps taken)."""
    saved: dict = {}
    _set_fast(model, False, saved)
    seq_m, sc_m = _generate(model, ids, mask, new, **gen_kw)
    _set_fast(model, True, saved)
    seq_f, sc_f = _generate(model, ids, mask, new, **gen_kw)
    steps = sum(s.steps for s in decode_layer.states(model))
    return seq_f, sc_f, seq_m, sc_m, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_path_equals_module_path(layout, dtype):
    model = testing.tiny_model(layout, dtype)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        assert len(decode_layer.states(model)) == model.config.num_hidden_layers
        with llmkern.track() as ran_m:
            _generate(model, ids, mask)  # verifies every layer: later runs take the fast path from the first step
        with llmkern.track() as ran_f:
            _generate(model, ids, mask)
        # The C++ calls count each kernel they ran, as the ops count it: llmkern.track() reads the same either way.
        assert ran_f == ran_m, (dict(ran_f), dict(ran_m))
        for s in decode_layer.states(model):
            s.steps = s.fused_steps = 0
        seq_f, sc_f, seq_m, sc_m, steps = _fast_vs_modules(model, ids, mask)
    # 8 new tokens: the prefill on the module path, the 7 decode steps fast (the layers were verified above).
    assert steps == 7 * model.config.num_hidden_layers
    # Both C++ calls on every layer but the step's first (whose attention call the full path clears first).
    fused = [s.fused_steps for s in decode_layer.states(model)]
    assert fused[0] == 0 and fused[1:] == [7] * (len(fused) - 1), fused
    assert torch.equal(seq_f, seq_m)
    assert torch.equal(sc_f, sc_m), (sc_f - sc_m).abs().max()


@pytest.mark.parametrize("why", ["more rows than the C++ Linear takes", "a C++ call raises"])
def test_python_sequence_when_the_cpp_calls_do_not_serve(why, monkeypatch):
    """The fast path without its two C++ calls: the Python sequence of ops, still equal to the module path."""
    model = testing.tiny_model("qwen3-tiny", torch.bfloat16)
    B = llmkern.ops.linear_max_rows(torch.bfloat16) + 1 if why.startswith("more") else 2
    if why == "a C++ call raises":
        assert _ext.load() and decode_layer._resolve()

        def refuse(*args):
            raise RuntimeError("planted")

        monkeypatch.setitem(decode_layer._C, "rest", refuse)
        monkeypatch.setitem(decode_layer._C, "layers", refuse)  # the lookahead chains the same C++ functions
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        seq_f, sc_f, seq_m, sc_m, steps = _fast_vs_modules(model, *_prompt(model, B=B))
    assert steps == 6 * model.config.num_hidden_layers
    assert all(s.fused_steps == 0 for s in decode_layer.states(model))
    assert torch.equal(seq_f, seq_m) and torch.equal(sc_f, sc_m)


@pytest.mark.parametrize("case", ["left-padded batch", "sliding window", "int8 pages", "group 7", "reserved cache",
                                  "token-major pages"])
def test_fast_path_equals_module_path_cases(case, monkeypatch):
    kw, patch_kw, gen_kw, B, pad, S = {}, {}, {}, 1, 0, 12
    layout = "llama-tiny"
    if case == "left-padded batch":
        B, pad = 3, 5
    elif case == "sliding window":  # context past the window: the window the module path passed must be used
        layout, kw, S = "mistral-tiny", dict(sliding_window=8), 14
    elif case == "int8 pages":
        patch_kw = dict(kv_dtype="int8")
    elif case == "reserved cache":  # sized to the generation: planning a step twice would overflow it
        B, pad, gen_kw = 2, 3, dict(cache_implementation="static")
    elif case == "token-major pages":  # the caches generate makes get NHD pages (CPU's default is head-major)
        from llmkern.cache import pool

        monkeypatch.setattr(pool, "layout_for", lambda kv_layout, device: "NHD")
        B, pad = 2, 3
    else:
        layout = "qwen2.5-0.5b"
        kw = dict(hidden_size=448, intermediate_size=256, num_attention_heads=7, num_key_value_heads=1)
    model = testing.tiny_model(layout, torch.float32, **kw)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model, **patch_kw)
        with llmkern.track() as ran:
            seq_f, sc_f, seq_m, sc_m, steps = _fast_vs_modules(model, *_prompt(model, B=B, S=S, pad=pad), new=10,
                                                               **gen_kw)
    n = model.config.num_hidden_layers
    assert steps == 8 * n
    # Both runs' 9 decode steps per layer, counted once each (the first step's check is not counted).
    assert ran[("paged_decode_attention", "cpp")] == 2 * 9 * n, dict(ran)
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


@pytest.mark.parametrize("how", ["forward pre-hook", "backward hook", "instance forward", "class swap"])
def test_module_changes_after_the_check_take_the_module_path(how):
    """What a user (or accelerate, or PEFT) does to one module of a layer whose fast path is already verified and
    running: the layer goes back to the module path at the next step, and comes back once it is undone."""
    model = testing.tiny_model("llama-tiny", torch.float32)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        ref_seq, ref_sc = _generate(model, ids, mask)
        states = decode_layer.states(model)
        before = [s.steps for s in states]
        assert before[1] == 6
        proj = model.model.layers[1].mlp.down_proj
        calls = []
        if how == "forward pre-hook":
            h = proj.register_forward_pre_hook(lambda m, a: calls.append(1))
            undo = h.remove
        elif how == "backward hook":  # never fires under inference mode; still a hook the module path honours
            h = proj.register_full_backward_hook(lambda m, gi, go: None)
            undo = h.remove
        elif how == "instance forward":  # what accelerate's add_hook_to_module does
            real = proj.forward
            proj.forward = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
            undo = lambda: proj.__dict__.pop("forward")
        else:
            cls = type(proj)
            proj.__class__ = type("Swapped", (cls,), {"forward": lambda self, x: (calls.append(1), cls.forward(self, x))[1]})
            undo = lambda: setattr(proj, "__class__", cls)
        seq, sc = _generate(model, ids, mask)
        assert [s.steps for s in states] == [before[0] + 7, before[1]]  # layer 0 kept its fast path
        if how != "backward hook":
            assert len(calls) == 8  # the prefill and 7 decode steps
        undo()
        _generate(model, ids, mask)
        assert states[1].steps == before[1] + 7
    assert torch.equal(seq, ref_seq) and torch.equal(sc, ref_sc)


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


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_cpp_schemas_declare_what_is_written(qk_norm):
    """torch.library.opcheck's schema test for the two C++ calls: decode_layer_rest writes the pages (and nothing
    else it is given), decode_layer_qkv writes nothing it is given."""
    if not _ext.load():
        pytest.skip(f"the C++ extension is not built here: {_ext.why_not()}")
    assert decode_layer._resolve()
    C = torch.ops.llmkern_C
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, hidden, inter, bs = 2, 4, 2, 16, 64, 96, 4

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    x = w(B, 1, hidden)
    cos, sin = torch.ones(B, 1, D), torch.zeros(B, 1, D)
    norms = (torch.ones(D), torch.ones(D)) if qk_norm else (None, None)
    opts = dict(test_utils=("test_schema",))
    qkv_args = (x, torch.ones(hidden), 1e-6, w(H * D, hidden), None, w(Hkv * D, hidden), w(Hkv * D), w(Hkv * D, hidden),
                None, *norms, 1e-6, 1e-6, cos, sin, D)
    torch.library.opcheck(C.decode_layer_qkv.default, qkv_args, **opts)
    q, k, v = C.decode_layer_qkv(*qkv_args)
    k_cache, v_cache = torch.zeros(4, bs, Hkv, D), torch.zeros(4, bs, Hkv, D)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    rest_args = (x, q, k, v, k_cache, v_cache, torch.tensor([0, 8]), tables, torch.tensor([1, 1], dtype=torch.int32),
                 D ** -0.5, 0, 0.0, 0, None, None, w(hidden, H * D), None, torch.ones(hidden), 1e-6,
                 w(inter, hidden), None, w(inter, hidden), None, w(hidden, inter), None)
    torch.library.opcheck(C.decode_layer_rest.default, rest_args, **opts)
    # decode_layers: two layers of its own weights, each the two calls above on the previous output, bit for bit;
    # it writes both layers' pages and nothing else.
    layers = [(qkv_args[1:11] + qkv_args[11:13], rest_args[9:13], rest_args[15:]) for _ in range(2)]
    layers[1] = ((torch.ones(hidden) * 1.5,) + layers[1][0][1:], layers[1][1], (w(hidden, H * D),) + layers[1][2][1:])
    caches = [(torch.zeros(4, bs, Hkv, D), torch.zeros(4, bs, Hkv, D)) for _ in range(2)]
    plan = rest_args[6:9]
    lists = []
    for j in range(12):  # norm_weight .. k_norm_eps as decode_layer_qkv takes them
        lists.append([lay[0][j] for lay in layers])
    lists += [[c[0] for c in caches], [c[1] for c in caches], [None, None], [None, None]]
    lists += [[lay[1][j] for lay in layers] for j in range(4)]  # scale, window, softcap, splits
    lists += [[lay[2][j] for lay in layers] for j in range(10)]  # wo .. bd
    layers_args = (x, cos, sin, D, *plan, *lists)
    torch.library.opcheck(C.decode_layers.default, layers_args, **opts)
    for kc, vc in caches:
        kc.zero_(), vc.zero_()
    outs = C.decode_layers(*layers_args)
    h = x
    for i, (qkv_w, scalars, rest_w) in enumerate(layers):
        kc, vc = torch.zeros(4, bs, Hkv, D), torch.zeros(4, bs, Hkv, D)
        q, k, v = C.decode_layer_qkv(h, *qkv_w, cos, sin, D)
        h = C.decode_layer_rest(h, q, k, v, kc, vc, *plan, *scalars, None, None, *rest_w)
        assert torch.equal(outs[i], h), i
        assert torch.equal(caches[i][0], kc) and torch.equal(caches[i][1], vc), i
    with pytest.raises(RuntimeError, match="one entry per layer"):
        C.decode_layers(*layers_args[:7], lists[0][:1], *lists[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_cpu_instruction_set(isa, dtype):
    """The fast path on each kernel set the CPU can run (forced with set_cpu_isa, as LLMKERN_CPU_ISA does): equal to
    the module path on the same kernels. head_dim 64 takes the vector attention kernels of avx512/avx2. Without a C++
    Linear (generic) patch() leaves nn.Linear alone, so no layer gets the fast path."""
    if not _ext.load():
        pytest.skip(f"the C++ extension is not built here: {_ext.why_not()}")
    from tests.test_cpu_isa import running_on  # skips where this CPU cannot run `isa`

    C = torch.ops.llmkern_C
    with running_on(isa):
        model = testing.tiny_model("llama-tiny", dtype, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=320)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generic: "no C++ Linear kernel" is a warning of patch()
            llmkern.patch(model)
        if isa == "generic":
            assert decode_layer.states(model) == []
            return
        assert C.cpu_kernel("paged_decode_attention", dtype, 64) == isa
        with llmkern.use_backend("cpp"):
            seq_f, sc_f, seq_m, sc_m, steps = _fast_vs_modules(model, *_prompt(model, B=2))
        assert steps == 6 * model.config.num_hidden_layers
        assert [s.fused_steps for s in decode_layer.states(model)][1:] == [6]
        assert torch.equal(seq_f, seq_m) and torch.equal(sc_f, sc_m)


# ---------------------------------------------------------------------------------------------------------------------
# The lookahead: the layers after a fused one run in one C++ call (decode_layers), each layer taking its output when
# the model's loop calls it.

def _lookahead_vs_off(model, ids, mask, new=8, **gen_kw):
    """(scores with the lookahead, scores without it, scores of the module path, lookaheads run)."""
    states = decode_layer.states(model)
    stack = states[0].stack
    runs = stack.runs
    seq_on, sc_on = _generate(model, ids, mask, new, **gen_kw)
    runs = stack.runs - runs
    stack.lookahead = False
    seq_off, sc_off = _generate(model, ids, mask, new, **gen_kw)
    stack.lookahead = True
    for s in states:
        s.disabled = True  # the module path
    seq_m, sc_m = _generate(model, ids, mask, new, **gen_kw)
    for s in states:
        s.disabled = False
    assert torch.equal(seq_on, seq_off) and torch.equal(seq_on, seq_m)
    return sc_on, sc_off, sc_m, runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["llama", "qwen3", "left-padded batch", "int8 pages", "reserved cache",
                                  "sliding layers"])
def test_lookahead_equals_layer_by_layer(case, dtype):
    layout, kw, patch_kw, gen_kw, B, pad, S = "llama-tiny", {}, {}, {}, 1, 0, 12
    if case == "qwen3":
        layout = "qwen3-tiny"
    elif case == "left-padded batch":
        B, pad = 3, 5
    elif case == "int8 pages":
        patch_kw = dict(kv_dtype="int8")
    elif case == "reserved cache":  # the layers after the step's first take its plan without advancing the buffers
        B, pad, gen_kw = 2, 3, dict(cache_implementation="static")
    elif case == "sliding layers":  # layers 2-4 slide: the first of them clears the windowed attention for the rest
        layout, S = "qwen2-tiny", 14
        kw = dict(use_sliding_window=True, sliding_window=8, max_window_layers=2)
    model = testing.tiny_model(layout, dtype, num_hidden_layers=5, **kw)
    ids, mask = _prompt(model, B=B, S=S, pad=pad)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model, **patch_kw)
        _generate(model, ids, mask, **gen_kw)  # verifies every layer
        with llmkern.track() as ran_on:
            sc_on, sc_off, sc_m, runs = _lookahead_vs_off(model, ids, mask, **gen_kw)
    assert torch.equal(sc_on, sc_off), (sc_on - sc_off).abs().max()
    assert torch.equal(sc_on, sc_m), (sc_on - sc_m).abs().max()
    # 7 decode steps: one lookahead each (layers 1-4), two with sliding layers (1, then 3-4 after layer 2 ran alone).
    assert runs == (14 if case == "sliding layers" else 7), runs
    # Three generates, each 7 decode steps over 5 layers: every decode attention counted once.
    assert ran_on[("paged_decode_attention", "cpp")] == 3 * 7 * 5, dict(ran_on)


class _Between(torch.nn.Module):
    """A decoder layer behind a wrapper module (no hook on the layer): what runs between two layers of the loop."""

    def __init__(self, layer, before=None):
        super().__init__()
        self.layer, self.before = layer, before
        self.attention_type = getattr(layer, "attention_type", "full_attention")

    def forward(self, hidden_states, *args, **kwargs):
        if self.before is not None:
            hidden_states = self.before(hidden_states)
        return self.layer(hidden_states, *args, **kwargs)


def test_lookahead_dropped_when_the_loop_changes_a_layer_input():
    """Something between two layers hands layer 2 another tensor than layer 1 returned: the precomputed outputs are
    dropped and the layers run on what they were given."""

    model = testing.tiny_model("llama-tiny", torch.float32, num_hidden_layers=5)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        _generate(model, ids, mask)
        layers = model.model.layers
        model.model.layers = torch.nn.ModuleList([_Between(layer, (lambda x: x + 0.25) if i == 2 else None)
                                                  for i, layer in enumerate(layers)])
        states = decode_layer.states(model)
        fused = [s.fused_steps for s in states]
        sc_on, sc_off, sc_m, runs = _lookahead_vs_off(model, ids, mask)
    assert torch.equal(sc_on, sc_m) and torch.equal(sc_off, sc_m)
    # Per step: the lookahead after layer 0 is dropped at layer 2, which runs its own two calls and looks ahead again.
    assert runs == 2 * 7, runs
    assert [s.fused_steps - f for s, f in zip(states, fused)] == [0] + [2 * 7] * 4


def test_a_hook_on_a_later_layer_stops_the_lookahead_before_it():
    model = testing.tiny_model("llama-tiny", torch.float32, num_hidden_layers=5)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        ref_seq, ref_sc = _generate(model, ids, mask)
        states = decode_layer.states(model)
        stack = states[0].stack
        calls, before, runs = [], [s.steps for s in states], stack.runs
        h = model.model.layers[3].mlp.up_proj.register_forward_hook(lambda m, a, o: calls.append(1))
        seq, sc = _generate(model, ids, mask)
        h.remove()
    assert len(calls) == 8  # the prefill and 7 decode steps
    assert torch.equal(seq, ref_seq) and torch.equal(sc, ref_sc)
    # Layers 1-2 ahead of layer 0, layer 3 through its modules, layer 4 alone after it (no layer left to look ahead to).
    assert stack.runs - runs == 7
    assert [s.steps - b for s, b in zip(states, before)] == [7, 7, 7, 0, 7]


def test_a_hook_registered_between_layers_is_called():
    """A hook put on layer 3 while the loop is between layers 1 and 2 (after the lookahead ran layers 1-4): layer 3
    must still call its modules, so the lookahead is dropped."""
    model = testing.tiny_model("llama-tiny", torch.float32, num_hidden_layers=5)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        ref_seq, ref_sc = _generate(model, ids, mask)
        layers = model.model.layers
        calls, handles = [], []

        def hook_layer_3(x):
            if not handles and x.shape[1] == 1:  # the first decode step
                handles.append(layers[3].mlp.up_proj.register_forward_hook(lambda m, a, o: calls.append(1)))
            return x

        model.model.layers = torch.nn.ModuleList([_Between(layer, hook_layer_3 if i == 2 else None)
                                                  for i, layer in enumerate(layers)])
        seq, sc = _generate(model, ids, mask)
        handles[0].remove()
    assert len(calls) == 7  # every decode step, the first included
    assert torch.equal(seq, ref_seq) and torch.equal(sc, ref_sc)


@pytest.mark.parametrize("how", ["grad mode", "training mode"])
def test_grad_or_training_turned_on_between_layers_takes_the_module_path(how):
    """Grad mode (or a layer's training mode) switched on by code between two layers after the lookahead ran: that
    layer must run its modules (autograd records them), not hand out an output computed without."""
    model = testing.tiny_model("llama-tiny", torch.float32, num_hidden_layers=5)
    ids, mask = _prompt(model)
    with llmkern.use_backend("cpp"):
        llmkern.patch(model)
        _generate(model, ids, mask)
        states = decode_layer.states(model)
        before = [s.steps for s in states]
        layers = model.model.layers

        class Switch(torch.nn.Module):
            def __init__(self, layer):
                super().__init__()
                self.layer, self.attention_type = layer, "full_attention"

            def forward(self, x, *args, **kwargs):
                if how == "grad mode":
                    if x.shape[1] != 1:  # the decode steps only (the prefill refuses grad over the cache too)
                        return self.layer(x, *args, **kwargs)
                    with torch.enable_grad():
                        return self.layer(x, *args, **kwargs)
                self.layer.train()
                try:
                    return self.layer(x, *args, **kwargs)
                finally:
                    self.layer.eval()

        model.model.layers = torch.nn.ModuleList([Switch(layer) if i == 2 else layer for i, layer in enumerate(layers)])

        def run():
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)

        if how == "grad mode":  # layer 2's modules run, and its attention refuses grad over the cache, loudly
            with pytest.raises(RuntimeError, match="PagedKVCache is for inference"):
                run()
            return
        out = run()
    assert out.shape[1] == ids.shape[1] + 8
    # Layer 2 took no fast step (its modules ran); the layers after it took theirs.
    assert [s.steps - b for s, b in zip(states, before)] == [7, 7, 0, 7, 7]
