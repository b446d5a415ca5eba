"""Training through llmkern's ops: backward formulas for the row ops and linear (issue 13, item 2).

A patched model in ``train()`` mode must give eager's gradients for every parameter; each op's gradients must equal
eager PyTorch's (HF's own modules where they exist) within fp32 rounding; the paged ops, which have no backward, must
refuse an input that requires grad instead of returning a detached result.

The ops take fp32/fp16/bf16 only, so ``torch.autograd.gradcheck`` (which needs fp64) cannot run on them: the fp32
gradients are compared with eager's fp32 gradients and with an fp64 oracle (eager's formula in fp64) under the
suite's tolerance rule: no further from the oracle than 1.5x eager's own error plus one ulp.
"""

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

import llmkern
from llmkern import ops, paged_ops, reference, testing
from llmkern.cache import PagedKVCache

LAYOUTS = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "qwen3-tiny"]


def _grads(fn, *inputs):
    """``fn(*inputs)``'s outputs and the gradients of ``sum(out * fixed random weights)`` w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(7)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    return [leaf.grad for leaf in leaves]


def _check_grads(op_fn, eager_fn, inputs, what):
    got = _grads(op_fn, *inputs)
    eager = _grads(eager_fn, *inputs)
    oracle = _grads(eager_fn, *(t.double() for t in inputs))
    for i, (a, e, o) in enumerate(zip(got, eager, oracle)):
        assert a is not None, f"{what}: input {i} got no gradient"
        testing.assert_no_worse_than_eager(a, e, o, what=f"{what} grad of input {i}")


# -- the reproduction ----------------------------------------------------------------------------------------


def test_rms_norm_backward_sets_x_grad():
    x = torch.randn(2, 5, 64)
    w = torch.randn(64)
    x.requires_grad_()
    ops.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- per op, against eager -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_grads_match_hf(dtype):
    x = torch.randn(3, 7, 111, dtype=dtype)
    w = (1 + 0.1 * torch.randn(111)).to(dtype)

    def hf(x, w):  # HF's module, its weight replaced by the leaf w
        m = LlamaRMSNorm(111, eps=1e-6)
        del m.weight
        m.weight = w
        return m(x)

    _check_grads(lambda x, w: ops.rms_norm(x, w, 1e-6), hf, (x, w), f"rms_norm {dtype}")


def test_rms_norm_offset_grads():
    x, w = torch.randn(4, 63), 0.1 * torch.randn(63)
    _check_grads(lambda x, w: ops.rms_norm(x, w, 1e-6, offset=1.0),
                 lambda x, w: reference.rms_norm(x, w, 1e-6, 1.0), (x, w), "rms_norm offset=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_grads(dtype):
    x, r = torch.randn(2, 9, 96, dtype=dtype), torch.randn(2, 9, 96, dtype=dtype)
    w = (1 + 0.1 * torch.randn(96)).to(dtype)

    def eager(x, r, w):
        s = r + x
        return reference.rms_norm(s, w, 1e-6), s

    _check_grads(lambda x, r, w: ops.fused_add_rms_norm(x, r, w, 1e-6), eager, (x, r, w), f"fused_add {dtype}")


@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_apply_rope_grads_match_hf(rotary_dim):
    q, k = torch.randn(2, 4, 5, 64), torch.randn(2, 2, 5, 64)
    cos, sin = torch.randn(2, 5, rotary_dim), torch.randn(2, 5, rotary_dim)
    eager = apply_rotary_pos_emb if rotary_dim == 64 else reference.apply_rope
    _check_grads(ops.apply_rope, eager, (q, k, cos, sin), f"apply_rope rd={rotary_dim}")
    # strided q/k, as HF passes them (a [b, s, h, d] buffer transposed)
    qt = torch.randn(2, 5, 4, 64).transpose(1, 2)
    kt = torch.randn(2, 5, 2, 64).transpose(1, 2)
    _check_grads(ops.apply_rope, eager, (qt, kt, cos, sin), "apply_rope strided")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_grads(dtype):
    g, u = torch.randn(3, 344, dtype=dtype), torch.randn(3, 344, dtype=dtype)
    _check_grads(ops.silu_and_mul, lambda g, u: torch.nn.functional.silu(g) * u, (g, u), f"silu_and_mul {dtype}")
    gu = torch.randn(3, 2 * 344, dtype=dtype)
    _check_grads(ops.silu_and_mul_fused, lambda t: torch.nn.functional.silu(t[..., :344]) * t[..., 344:], (gu,),
                 f"silu_and_mul_fused {dtype}")


@pytest.mark.parametrize("rows", [1, 40])  # C++ GEMV (decode-sized) and F.linear
@pytest.mark.parametrize("bias", [False, True])
def test_linear_grads(rows, bias):
    x, w = torch.randn(rows, 96), torch.randn(80, 96) / 10
    b = torch.randn(80)
    if bias:
        _check_grads(ops.linear, torch.nn.functional.linear, (x, w, b), "linear+bias")
    else:
        _check_grads(ops.linear, torch.nn.functional.linear, (x, w), "linear")


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


# -- the paged ops refuse to be differentiated ------------------------------------------------------------------------


def test_paged_ops_refuse_inputs_that_require_grad():
    kc, vc = torch.randn(4, 16, 2, 32), torch.randn(4, 16, 2, 32)
    bt = torch.tensor([[0, 1]], dtype=torch.int32)
    lens = torch.tensor([20], dtype=torch.int32)
    q = torch.randn(1, 4, 32, requires_grad=True)
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
