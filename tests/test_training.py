"""Training through llmkern's ops: backward formulas for the row ops and linear (issue 13, item 2), and gradients held
to an independent standard (issue 23, item 7).

The row ops' backward differentiates llmkern.reference (llmkern/ops.py), which computes eager's formula in eager's
order: comparing it with an autograd of that same formula only checks the wiring. So every gradient here is compared,
in fp32, bf16 and fp16, with
  * eager: transformers' own modules and functions under autograd (LlamaRMSNorm, GemmaRMSNorm, LlamaMLP's act_fn,
    apply_rotary_pos_emb, nn.Linear; for the module tests the modules of an unpatched model), and
  * an oracle: the gradient derived by hand in fp64 (llmkern.testing.oracle_*_vjp), itself checked against finite
    differences by torch.autograd.gradcheck on small fp64 inputs (the ops take fp32/fp16/bf16 only, so gradcheck
    cannot run on them directly),
under the suite's tolerance rule, element by element, at magnitudes that count the terms each gradient sums
(llmkern.testing.assert_no_worse_than_eager); and eager's own gradient must lie within a few eps of those magnitudes
from the oracle, so the allowance cannot grow with a wrong eager or a wrong oracle. Inputs make eps matter (rows whose
mean square is near it) and cos/sin halves differ.

A patched model in ``train()`` mode must give eager's gradients for every parameter; the paged ops, which have no
backward, must refuse an input that requires grad instead of returning a detached result.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

try:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
except ImportError:  # pragma: no cover - depends on the transformers build
    GemmaRMSNorm = None

import llmkern
from llmkern import ops, paged_ops, testing
from llmkern.cache import PagedKVCache
from llmkern.testing import (oracle_fused_add_rms_norm_vjp, oracle_linear_vjp, oracle_mlp_vjp, oracle_rms_norm,
                             oracle_rms_norm_vjp, oracle_rope, oracle_rope_vjp, oracle_silu_and_mul,
                             oracle_silu_and_mul_vjp)

LAYOUTS = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-6
EAGER_ULPS = 8  # eager gradient vs the oracle, in eps of the magnitude: at most 4.7 here (silu's gate gradient, fp32)


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rows(shape, dtype, seed):
    """Activations whose last two rows have a mean square ~eps (there eps changes the result by ~30%)."""
    x = torch.randn(shape, generator=_gen(seed))
    x.view(-1, shape[-1])[-2:] *= 1e-3
    return x.to(dtype)


# -- the reproduction (issue 13) -------------------------------------------------------------------------------


def test_rms_norm_backward_sets_x_grad():
    x = torch.randn(2, 5, 64)
    w = torch.randn(64)
    x.requires_grad_()
    ops.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- the oracles' gradients against finite differences -----------------------------------------------------------------


def _gradcheck(forward, vjp, inputs):
    """torch.autograd.gradcheck of ``forward`` (fp64) with ``vjp(*inputs, *output grads)[0]`` as its backward."""
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            ctx.save_for_backward(*args)
            return forward(*args)

        @staticmethod
        def backward(ctx, *gs):
            return vjp(*ctx.saved_tensors, *gs)[0]

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(Fn.apply, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


GRADCHECKS = {
    "rms_norm": (lambda x, w: oracle_rms_norm(x, w, 1e-2), lambda x, w, g: oracle_rms_norm_vjp(x, w, 1e-2, g),
                 lambda: (torch.randn(3, 7) * 0.2, torch.randn(7))),
    "rms_norm offset=1": (lambda x, w: oracle_rms_norm(x, w, 1e-2, 1.0),
                          lambda x, w, g: oracle_rms_norm_vjp(x, w, 1e-2, g, 1.0),
                          lambda: (torch.randn(2, 5), torch.randn(5) * 0.3)),
    "fused_add_rms_norm": (lambda x, r, w: (oracle_rms_norm(x + r, w, 1e-2), x + r),
                           lambda x, r, w, gn, gr: oracle_fused_add_rms_norm_vjp(x, r, w, 1e-2, gn, gr),
                           lambda: (torch.randn(2, 6), torch.randn(2, 6), torch.randn(6))),
    "apply_rope": (lambda q, k, c, s: (oracle_rope(q, c, s), oracle_rope(k, c, s)),
                   lambda q, k, c, s, gq, gk: oracle_rope_vjp(q, k, c, s, gq, gk),
                   lambda: (torch.randn(2, 3, 2, 8), torch.randn(2, 1, 2, 8), torch.randn(1, 2, 8),
                            torch.randn(1, 2, 8))),
    "apply_rope partial": (lambda q, k, c, s: (oracle_rope(q, c, s), oracle_rope(k, c, s)),
                           lambda q, k, c, s, gq, gk: oracle_rope_vjp(q, k, c, s, gq, gk),
                           lambda: (torch.randn(2, 2, 3, 8), torch.randn(2, 1, 3, 8), torch.randn(2, 3, 4),
                                    torch.randn(2, 3, 4))),
    "silu_and_mul": (oracle_silu_and_mul, oracle_silu_and_mul_vjp,
                     lambda: (torch.tensor([[-6.0, -1.278, -0.3, 0.0, 0.5, 3.0, 9.0]]), torch.randn(1, 7))),
    "linear": (lambda x, w, b: x @ w.t() + b, oracle_linear_vjp,
               lambda: (torch.randn(2, 3, 5), torch.randn(4, 5), torch.randn(4))),
    "mlp": (lambda x, wg, wu, wd: (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t(), oracle_mlp_vjp,
            lambda: (torch.randn(2, 3, 5), torch.randn(6, 5), torch.randn(6, 5), torch.randn(5, 6))),
}


@pytest.mark.parametrize("name", list(GRADCHECKS))
def test_hand_derived_gradients_match_finite_differences(name):
    forward, vjp, make = GRADCHECKS[name]
    _gradcheck(forward, vjp, make())


# -- per op: llmkern's backward, transformers' autograd and the fp64 gradient ------------------------------------------


def _autograd(fn, inputs, gs):
    """Gradients of ``fn(*inputs)`` for the output gradients ``gs``, w.r.t. every input (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    got = torch.autograd.grad(outs, leaves, gs, allow_unused=True)
    return got, outs


def _output_grads(outs, seed=7):
    g = _gen(seed)
    return tuple(torch.randn(o.shape, generator=g).to(o.dtype) for o in outs)


def _check_grads(op_fn, eager_fn, vjp, inputs, what, *, names=None, gs=None, track=None):
    """Every input's gradient: llmkern's (``op_fn``) no worse than eager's (``eager_fn``) against the hand-derived
    fp64 gradient (``vjp(*inputs, *gs)``) under the tolerance rule, and eager's within EAGER_ULPS of it."""
    if gs is None:
        with torch.no_grad():
            outs = eager_fn(*inputs)
        gs = _output_grads(outs if isinstance(outs, tuple) else (outs,))
    with llmkern.track() as ran:
        got, _ = _autograd(op_fn, inputs, gs)
    if track is not None:
        assert ran.backends(track) and "reference" not in ran.backends(track), f"{what}: {track} ran on {dict(ran)}"
    eager, _ = _autograd(eager_fn, inputs, gs)
    oracle, mags = vjp(*inputs, *gs)
    names = names or [f"input {i}" for i in range(len(inputs))]
    for name, a, e, o, m in zip(names, got, eager, oracle, mags):
        assert a is not None and e is not None, f"{what}: no gradient for {name}"
        assert a.dtype == e.dtype and a.shape == e.shape == o.shape, (what, name, a.dtype, e.dtype, a.shape, o.shape)
        testing.assert_no_worse_than_eager(a, e, o, what=f"{what} grad of {name}", scale=m)
        err = (e.double() - o).abs()
        bound = EAGER_ULPS * testing.ulp(e.dtype) * m.clamp(min=torch.finfo(e.dtype).tiny)
        assert (err <= bound).all(), (f"{what} grad of {name}: transformers' gradient is "
                                      f"{(err / bound).max().item() * EAGER_ULPS:.1f} eps of the magnitude from the "
                                      f"hand-derived one: the oracle or eager is wrong")


def _hf_norm(cls, n, eps=EPS):
    """transformers' norm module whose weight is replaced by the leaf passed in (so its gradient is the leaf's)."""
    def run(x, w):
        m = cls(n, eps=eps)
        del m.weight
        m.weight = w
        return m(x)
    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_rms_norm_grads(dtype):
    x = _rows((3, 7, 111), dtype, 1)
    w = (1 + 0.1 * torch.randn(111, generator=_gen(2))).to(dtype)
    _check_grads(lambda x, w: ops.rms_norm(x, w, EPS), _hf_norm(LlamaRMSNorm, 111),
                 lambda x, w, g: oracle_rms_norm_vjp(x, w, EPS, g), (x, w), f"rms_norm {_name(dtype)}",
                 names=["x", "weight"])


@pytest.mark.skipif(GemmaRMSNorm is None, reason="transformers has no Gemma: no eager for offset=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_rms_norm_offset_grads(dtype):
    """offset=1 is GemmaRMSNorm's ``(1 + w)``."""
    x, w = _rows((4, 63), dtype, 3), (0.1 * torch.randn(63, generator=_gen(4))).to(dtype)
    _check_grads(lambda x, w: ops.rms_norm(x, w, EPS, offset=1.0), _hf_norm(GemmaRMSNorm, 63),
                 lambda x, w, g: oracle_rms_norm_vjp(x, w, EPS, g, 1.0), (x, w), f"rms_norm offset=1 {_name(dtype)}",
                 names=["x", "weight"])


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_fused_add_rms_norm_grads(dtype):
    x, r = _rows((2, 9, 96), dtype, 5), _rows((2, 9, 96), dtype, 6)
    w = (1 + 0.1 * torch.randn(96, generator=_gen(7))).to(dtype)

    def eager(x, r, w):  # the decoder layer: `residual + hidden_states`, then post_attention_layernorm
        s = r + x
        return _hf_norm(LlamaRMSNorm, 96)(s, w), s

    _check_grads(lambda x, r, w: ops.fused_add_rms_norm(x, r, w, EPS), eager,
                 lambda x, r, w, gn, gr: oracle_fused_add_rms_norm_vjp(x, r, w, EPS, gn, gr), (x, r, w),
                 f"fused_add_rms_norm {_name(dtype)}", names=["x", "residual", "weight"])


def _hf_rope(q, k, cos, sin):
    """apply_rotary_pos_emb on the first cos.shape[-1] dims; the rest pass through (HF's partial rotary)."""
    rd = cos.shape[-1]
    if rd == q.shape[-1]:
        return apply_rotary_pos_emb(q, k, cos, sin)
    qr, kr = apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos, sin)
    return torch.cat((qr, q[..., rd:]), -1), torch.cat((kr, k[..., rd:]), -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("rotary_dim, cos_batch, strided", [(64, 2, False), (32, 2, False), (64, 1, True)])
def test_apply_rope_grads(dtype, rotary_dim, cos_batch, strided):
    g = _gen(8)
    if strided:  # as HF passes them: a [b, s, h, d] buffer transposed
        q = torch.randn(2, 5, 4, 64, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(2, 5, 2, 64, generator=g).to(dtype).transpose(1, 2)
    else:
        q, k = torch.randn(2, 4, 5, 64, generator=g).to(dtype), torch.randn(2, 2, 5, 64, generator=g).to(dtype)
    # independent halves (a model's cos repeats its first half): a gradient read from the wrong half shows
    cos = (torch.rand(cos_batch, 5, rotary_dim, generator=g) * 2 - 1).to(dtype)
    sin = (torch.rand(cos_batch, 5, rotary_dim, generator=g) * 2 - 1).to(dtype)
    _check_grads(ops.apply_rope, _hf_rope, oracle_rope_vjp, (q, k, cos, sin),
                 f"apply_rope rd={rotary_dim} cos batch {cos_batch} {_name(dtype)}", names=["q", "k", "cos", "sin"])


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_silu_and_mul_grads(dtype):
    g = _gen(9)
    gate, up = (torch.randn(3, 344, generator=g) * 4).to(dtype), torch.randn(3, 344, generator=g).to(dtype)
    act = ACT2FN["silu"]  # LlamaMLP's act_fn
    _check_grads(ops.silu_and_mul, lambda a, u: act(a) * u, oracle_silu_and_mul_vjp, (gate, up),
                 f"silu_and_mul {_name(dtype)}", names=["gate", "up"])
    gu = (torch.randn(3, 2 * 344, generator=g) * 2).to(dtype)

    def fused_vjp(t, go):
        (da, du), (ma, mu) = oracle_silu_and_mul_vjp(t[..., :344], t[..., 344:], go)
        return (torch.cat((da, du), -1),), (torch.cat((ma, mu), -1),)

    _check_grads(ops.silu_and_mul_fused, lambda t: act(t[..., :344]) * t[..., 344:], fused_vjp, (gu,),
                 f"silu_and_mul_fused {_name(dtype)}", names=["gate_up"])


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("rows", [1, 40])  # C++ GEMV (decode-sized) and F.linear
@pytest.mark.parametrize("bias", [False, True])
def test_linear_grads(dtype, rows, bias):
    g = _gen(10)
    x, w = torch.randn(rows, 96, generator=g).to(dtype), (torch.randn(80, 96, generator=g) / 10).to(dtype)
    b = torch.randn(80, generator=g).to(dtype) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    _check_grads(ops.linear, F.linear, lambda x, w, *rest: oracle_linear_vjp(x, w, b, rest[-1]), inputs,
                 f"linear {_name(dtype)} rows={rows}{' + bias' if bias else ''}", names=["x", "weight", "bias"])


# -- the patched modules of a model against the unpatched model's ------------------------------------------------------


def _patched_pair(dtype):
    """A tiny Llama in ``dtype`` (norm weights drawn around 1, not HF's ones) and a patched copy of it, transformers'
    attention kept (the paged attention has no backward)."""
    model = testing.tiny_model("llama-tiny", dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=_gen(11)))
    patched = copy.deepcopy(model)
    llmkern.patch(patched, attention=False)
    return model, patched


def _module_grads(module, x, gy):
    xl = x.detach().clone().requires_grad_()
    params = [p for _, p in module.named_parameters()]
    out = module(xl)
    grads = torch.autograd.grad(out, [xl, *params], gy)
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_patched_rms_norm_module_grads_match_transformers(dtype):
    model, patched = _patched_pair(dtype)
    norm, pnorm = model.model.layers[0].input_layernorm, patched.model.layers[0].input_layernorm
    assert type(norm) is LlamaRMSNorm and type(pnorm) is not LlamaRMSNorm
    x = _rows((2, 5, 128), dtype, 12)
    gy = _output_grads((x,), 13)[0]
    with llmkern.track() as ran:
        got = _module_grads(pnorm, x, gy)
    assert ran.backends("rms_norm") and "reference" not in ran.backends("rms_norm"), dict(ran)
    eager = _module_grads(norm, x, gy)
    oracle, mags = oracle_rms_norm_vjp(x, norm.weight.detach(), norm.variance_epsilon, gy)
    for name, a, e, o, m in zip(["x", "weight"], got, eager, oracle, mags):
        testing.assert_no_worse_than_eager(a, e, o, what=f"input_layernorm {_name(dtype)} grad of {name}", scale=m)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_patched_mlp_module_grads_match_transformers(dtype):
    model, patched = _patched_pair(dtype)
    mlp, pmlp = model.model.layers[1].mlp, patched.model.layers[1].mlp
    assert type(mlp).__name__ == "LlamaMLP" and type(pmlp) is not type(mlp)
    x = (torch.randn(2, 5, 128, generator=_gen(14)) * 2).to(dtype)  # 10 rows: the C++ Linear where it serves dtype
    gy = _output_grads((x,), 15)[0]
    with llmkern.track() as ran:
        got = _module_grads(pmlp, x, gy)
    assert ran.backends("silu_and_mul") and "reference" not in ran.backends("silu_and_mul"), dict(ran)
    eager = _module_grads(mlp, x, gy)
    w = [getattr(mlp, n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj")]
    oracle, mags = oracle_mlp_vjp(x, *w, gy)
    names = ["x"] + [n for n, _ in mlp.named_parameters()]
    assert names == ["x", "gate_proj.weight", "up_proj.weight", "down_proj.weight"], names
    for name, a, e, o, m in zip(names, got, eager, oracle, mags):
        testing.assert_no_worse_than_eager(a, e, o, what=f"mlp {_name(dtype)} grad of {name}", scale=m)


def test_no_grad_inputs_keep_the_fast_path():
    # Under no_grad (generate), and for inputs that need no grad, the ops build no graph.
    x, w = torch.randn(2, 64, requires_grad=True), torch.randn(64)
    with torch.no_grad():
        assert not ops.rms_norm(x, w, 1e-6).requires_grad
    assert not ops.rms_norm(x.detach(), w, 1e-6).requires_grad


@pytest.mark.parametrize("name,args", [
    ("rms_norm", lambda: (torch.randn(3, 64), torch.randn(64), 1e-6, 0.0)),
    ("fused_add_rms_norm", lambda: (torch.randn(3, 64), torch.randn(3, 64), torch.randn(64), 1e-6)),
    ("apply_rope", lambda: (torch.randn(1, 4, 3, 32), torch.randn(1, 2, 3, 32), torch.randn(1, 3, 32),
                            torch.randn(1, 3, 32))),
    ("silu_and_mul", lambda: (torch.randn(3, 64), torch.randn(3, 64))),
    ("linear", lambda: (torch.randn(2, 64), torch.randn(32, 64), torch.randn(32))),
])
def test_opcheck_with_requires_grad(name, args):
    a = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in args())
    torch.library.opcheck(getattr(torch.ops.llmkern, name).default, a)


# -- the paged ops refuse to be differentiated -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "cpp"])
def test_paged_ops_refuse_inputs_that_require_grad(backend):
    """On every path: the automatic choice, and cpp, whose eager fast path (llmkern/paged_ops.py) is open after the
    good calls at the start."""
    ok, why = llmkern.backends.available("cpp", torch.device("cpu"))
    if backend == "cpp" and not ok:
        if os.environ.get("LLMKERN_NO_EXT") == "1":
            pytest.skip(f"LLMKERN_NO_EXT=1: {why}")
        pytest.fail(f"the llmkern extension must be built for these tests: {why}")
    with llmkern.use_backend(backend):
        _refuse_grad_cases()


def _refuse_grad_cases():
    kc, vc = torch.randn(4, 16, 2, 32), torch.randn(4, 16, 2, 32)
    bt = torch.tensor([[0, 1]], dtype=torch.int32)
    lens = torch.tensor([20], dtype=torch.int32)
    q = torch.randn(1, 4, 32, requires_grad=True)
    with torch.no_grad():  # good calls first: on cpp they open the eager fast path (llmkern/paged_ops.py), which
        paged_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.2)  # must still refuse grad
        paged_ops.paged_prefill_attention(q[:, :, None], kc, vc, bt, lens, torch.tensor([1], dtype=torch.int32), 0.2)
        paged_ops.reshape_and_cache(torch.randn(1, 2, 32, requires_grad=True), torch.randn(1, 2, 32), kc, vc,
                                    torch.tensor([3]))
    with pytest.raises(RuntimeError, match="no backward.*q requires grad"):
        paged_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.2)
    with pytest.raises(RuntimeError, match="no backward"):
        paged_ops.paged_prefill_attention(q[:, :, None], kc, vc, bt, lens, torch.tensor([1], dtype=torch.int32), 0.2)
    with pytest.raises(RuntimeError, match="no backward.*key requires grad"):
        paged_ops.reshape_and_cache(torch.randn(1, 2, 32, requires_grad=True), torch.randn(1, 2, 32), kc, vc,
                                    torch.tensor([3]))
    with torch.no_grad():  # the same calls are fine without grad mode
        paged_ops.paged_decode_attention(q, kc, vc, bt, lens, 0.2)


# -- a patched model trains like eager ---------------------------------------------------------------------------------


def _loss_and_grads(model, ids, mask, **kw):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("use_cache", [False, None])
def test_patched_model_gradients_equal_eager(layout, use_cache):
    eager = testing.tiny_model(layout)
    patched = copy.deepcopy(eager)
    report = llmkern.patch(patched)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the dense fallback's mask must hold under autograd too
    kw = {} if use_cache is None else {"use_cache": use_cache}
    loss_e, grads_e = _loss_and_grads(eager, ids, mask, **kw)
    with llmkern.track() as ran:
        loss_p, grads_p = _loss_and_grads(patched, ids, mask, **kw)
    # Every kernel patch() installed ran under autograd (linear only where this CPU has the C++ kernel: its backward
    # is tested on the op above).
    installed = set(report.counts()) - {"paged_attention"}
    assert {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul"} <= installed <= ran.ops(), dict(ran)
    torch.testing.assert_close(loss_p, loss_e, rtol=1e-5, atol=1e-6)
    missing = [n for n, gr in grads_p.items() if gr is None and grads_e[n] is not None]
    assert not missing, f"parameters without a gradient on the patched model: {missing}"
    for n, ge in grads_e.items():
        torch.testing.assert_close(grads_p[n], ge, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_patched_model_decode_step_with_paged_cache_under_grad_is_an_error():
    model = testing.tiny_model("llama-tiny")
    llmkern.patch(model)
    model.train()
    ids = torch.randint(3, 512, (1, 6))
    with pytest.raises(RuntimeError, match="PagedKVCache is for inference.*use_cache=False"):
        model(input_ids=ids, past_key_values=PagedKVCache(model.config))


def test_backward_under_torch_compile_fullgraph():
    # AOTAutograd traces the registered backward (the reference recomputation and its autograd.grad) into the graph.
    def f(x, w, g, u, q, k, cos, sin, lw):
        y = ops.rms_norm(x, w, 1e-6)
        normed, res = ops.fused_add_rms_norm(y, x, w, 1e-6)
        q2, k2 = ops.apply_rope(q, k, cos, sin)
        return (normed.sum() + res.sum() + ops.silu_and_mul(g, u).sum() + q2.sum() + k2.sum()
                + ops.linear(y, lw).sum())

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=gen) for s in [(3, 64), (64,), (3, 32), (3, 32), (1, 4, 3, 32), (1, 2, 3, 32),
                                                    (1, 3, 32), (1, 3, 32), (16, 64)]]
    eager = [t.clone().requires_grad_() for t in args]
    compiled = [t.clone().requires_grad_() for t in args]
    f(*eager).backward()
    torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled).backward()
    for i, (a, b) in enumerate(zip(eager, compiled)):
        torch.testing.assert_close(b.grad, a.grad, msg=lambda m: f"input {i}: {m}")
