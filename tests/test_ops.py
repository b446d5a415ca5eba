"""The public ops (llmkern.ops) against Hugging Face eager, on the Triton backend (issue #2 §2 and §4).

Every numerical test follows one recipe:
  * eager  = the Hugging Face module/function itself (LlamaRMSNorm, GemmaRMSNorm, apply_rotary_pos_emb, LlamaMLP's
             ``ACT2FN["silu"](gate) * up``) run in the test dtype;
  * oracle = the same math in fp64 on the same (already rounded) inputs, written from the formula in llmkern.testing
             (never llmkern.reference, which is an implementation under test);
  * kernel = the llmkern op in the test dtype on the ``device`` fixture, and ``llmkern.track()`` proves that the
             Triton backend ran it (on CPU through TRITON_INTERPRET=1, set by conftest.py), never the reference;
  * check  = ``assert_no_worse_than_eager``: element by element, kernel error <= 1.5 x eager's error at that element
             + ulps at the element's own magnitude (llmkern/testing.py states the rule and why).

The interpreter runs one Python loop iteration per Triton program, so sizes are parametrized as dtype x awkward
sizes with few rows, plus a handful of several-thousand-row cases: the file takes ~70 s of CPU time on 2 cores.
"""

import math

import numpy as np
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

import llmkern
from llmkern import backends, ops, reference
from llmkern.testing import (assert_no_worse_than_eager, oracle_rms_norm, oracle_rope, oracle_silu_and_mul, rope_scale,
                             silu_and_mul_scale)

try:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
except ImportError:  # pragma: no cover - depends on the transformers build
    GemmaRMSNorm = None

try:  # HF's partial-rotary variant of apply_rotary_pos_emb (rotate-half on cos.shape[-1] dims, rest passed through)
    from transformers.models.bamba.modeling_bamba import apply_rotary_pos_emb as apply_partial_rotary_pos_emb
except ImportError:  # pragma: no cover
    apply_partial_rotary_pos_emb = None

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN_SIZES = [1, 7, 127, 769, 896, 4864, 5120]
EPS = 1e-6


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_KERNEL = {"name": "triton"}


@pytest.fixture(autouse=True, params=["triton", "cpp", "cuda"])
def kernel_backend(request, device):
    """Every test here runs once per kernel backend that can run on this machine: Triton (the interpreter on CPU,
    real kernels on CUDA), the C++ CPU kernels, and the extension's CUDA kernels."""
    name = request.param
    if name == "cpp" and device != "cpu":
        pytest.skip("the cpp backend runs CPU tensors")
    if name == "cuda" and device != "cuda":
        pytest.skip("the cuda backend needs a CUDA device")
    ok, why = backends.available(name, device)
    if not ok:
        if name == "cpp" and os.environ.get("LLMKERN_NO_EXT") == "1":
            pytest.skip(f"LLMKERN_NO_EXT=1: {why}")
        pytest.fail(f"backend {name} cannot run: {why}")
    _KERNEL["name"] = name
    with llmkern.use_backend(name):
        yield name
    _KERNEL["name"] = "triton"


def _on_triton(op: str, fn, *args, **kwargs):
    """Run ``fn`` and prove that ``op`` ran on the kernel backend under test and nowhere else (never the reference)."""
    with llmkern.track() as t:
        out = fn(*args, **kwargs)
    want = _KERNEL["name"]
    assert t.backends(op) == {want}, f"{op} ran on {t.backends(op)}, expected the {want} kernel"
    return out


# The interpreter's fp32 -> bf16 cast is made round-to-nearest-even by an autouse fixture in conftest.py.


def test_interpreter_bf16_cast_rounds_to_nearest_even(device):
    """The kernels' fp32 -> bf16 casts (explicit ``.to`` and the implicit one in ``tl.store``) round like torch."""
    import triton
    import triton.language as tl

    @triton.jit
    def _cast_kernel(x_ptr, y_ptr, z_ptr, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + o, mask=o < N)
        tl.store(y_ptr + o, x.to(tl.bfloat16), mask=o < N)
        tl.store(z_ptr + o, x, mask=o < N)  # implicit cast to the bf16 element type

    one = 1.0
    special = [4.8985, -3.14, one + 2**-8, one + 3 * 2**-8, -(one + 2**-8), one + 2**-8 + 2**-20,  # ties, near-ties
               1e-40, -3e-39, 2**-133, 3.3895e38, 3.4e38, -math.inf, math.inf, 0.0, -0.0]
    x = torch.cat([torch.tensor(special), torch.randn(4000) * 100, torch.randn(1000) * 1e-38]).to(device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    z = torch.empty_like(y)
    _cast_kernel[(1,)](x, y, z, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    assert torch.equal(z.view(torch.int16), want.view(torch.int16))


# --------------------------------------------------------------------------------------------------------------------
# rms_norm


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eager: transformers' LlamaRMSNorm with ``weight`` loaded (weight keeps its own dtype, as in a model)."""
    m = LlamaRMSNorm(weight.shape[0], eps=eps).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        return m(x)


def _norm_oracle(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS, offset: float = 0.0) -> torch.Tensor:
    # Written from the math (llmkern.testing), not llmkern.reference: the oracle must not move with the reference.
    return oracle_rms_norm(x, weight, eps, offset)


def _check_rms_norm(x, weight, what, eps=EPS):
    out = _on_triton("rms_norm", ops.rms_norm, x, weight, eps)
    eager = _hf_rms_norm(x, weight, eps)
    assert_no_worse_than_eager(out, eager, _norm_oracle(x, weight, eps), what=what)
    assert out.is_contiguous()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("N", HIDDEN_SIZES)
@pytest.mark.parametrize("M", [1, 7, 33])
def test_rms_norm_vs_llama_rms_norm(device, dtype, N, M):
    x = (torch.randn(M, N, device=device) * 3).to(dtype)
    w = torch.randn(N, device=device).to(dtype)
    _check_rms_norm(x, w, f"rms_norm {_name(dtype)} [{M}, {N}]")


# Several thousand rows (prefill); one dtype per shape keeps the interpreter time bounded.
@pytest.mark.parametrize("M, N, dtype", [
    (4096, 896, torch.bfloat16),
    (3000, 127, torch.float16),
    (5000, 7, torch.float32),
    (2048, 1, torch.bfloat16),
    (1024, 769, torch.float32),
    (256, 5120, torch.float16),
], ids=lambda v: _name(v) if isinstance(v, torch.dtype) else str(v))
def test_rms_norm_many_rows(device, M, N, dtype):
    x = torch.randn(M, N, device=device).to(dtype)
    w = torch.randn(N, device=device).to(dtype)
    _check_rms_norm(x, w, f"rms_norm {_name(dtype)} [{M}, {N}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("N", [64, 896])
def test_rms_norm_rows_near_eps(device, dtype, N):
    """Rows whose mean square is of the order of eps (1e-6), so the eps the kernel adds shows in every dtype: with
    unit-scale rows a wrong eps changes the result by ~5e-6 relative, below one ulp of fp16 (the mutation check's
    hard-coded eps survived there)."""
    scale = torch.logspace(-4, -2, 33, device=device)[:, None]  # mean squares 1e-8 .. 1e-4 around eps
    x = (torch.randn(33, N, device=device) * scale).to(dtype)
    w = torch.randn(N, device=device).to(dtype)
    _check_rms_norm(x, w, f"rms_norm rows near eps {_name(dtype)} [33, {N}]")


def _layouts(M, N, device, dtype):
    """Non-contiguous views of ``[M, N]`` (or ``[b, s, N]``) activations, by name."""
    return {
        "rows_sliced": torch.randn(2 * M, N, device=device).to(dtype)[::2],  # row stride 2N
        "cols_strided": torch.randn(M, 2 * N, device=device).to(dtype)[:, ::2],  # last-dim stride 2
        "transposed": torch.randn(N, M, device=device).to(dtype).t(),  # last-dim stride M
        "seq_major_3d": torch.randn(5, 3, N, device=device).to(dtype).transpose(0, 1),  # [b, s, N] from [s, b, N]
        "cols_sliced": torch.randn(M, N + 9, device=device).to(dtype)[:, 3:N + 3],  # offset start, row stride N+9
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["rows_sliced", "cols_strided", "transposed", "seq_major_3d", "cols_sliced"])
def test_rms_norm_non_contiguous(device, dtype, layout):
    M, N = 37, 769
    x = _layouts(M, N, device, dtype)[layout]
    assert not x.is_contiguous()
    w_src = torch.randn(2 * x.shape[-1], device=device).to(dtype)
    w = w_src[::2]  # the weight may be strided too
    out = _check_rms_norm(x, w, f"rms_norm {layout} {_name(dtype)}")
    assert out.shape == x.shape


@pytest.mark.parametrize("x_dtype, w_dtype", [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.bfloat16),
], ids=lambda d: _name(d))
def test_rms_norm_weight_dtype_differs(device, x_dtype, w_dtype):
    """A checkpoint whose norm weights stayed fp32 while activations are bf16: output dtype follows HF promotion
    (``weight * h.to(x.dtype)``)."""
    x = (torch.randn(9, 896, device=device) * 2).to(x_dtype)
    w = torch.randn(896, device=device).to(w_dtype)
    out = _check_rms_norm(x, w, f"rms_norm x {_name(x_dtype)} w {_name(w_dtype)}")
    assert out.dtype == torch.promote_types(x_dtype, w_dtype) == _hf_rms_norm(x, w).dtype


@pytest.mark.skipif(GemmaRMSNorm is None, reason="transformers has no Gemma")
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("w_dtype", ["same", "float32"])
@pytest.mark.parametrize("N", [7, 896, 2048])
def test_rms_norm_gemma_offset(device, dtype, w_dtype, N):
    """``offset=1.0`` is GemmaRMSNorm: ``(norm(x) * (1 + w)).type_as(x)`` in fp32."""
    w_dt = dtype if w_dtype == "same" else torch.float32
    x = (torch.randn(33, N, device=device) * 2).to(dtype)
    w = (torch.randn(N, device=device) * 0.3).to(w_dt)
    m = GemmaRMSNorm(N, eps=EPS).to(device=device, dtype=w_dt)
    with torch.no_grad():
        m.weight.copy_(w)
        eager = m(x)
    out = _on_triton("rms_norm", ops.rms_norm, x, w, EPS, offset=1.0)
    assert out.dtype == eager.dtype == dtype
    assert_no_worse_than_eager(out, eager, _norm_oracle(x, w, EPS, 1.0), what=f"gemma rms_norm {_name(dtype)}")


# --------------------------------------------------------------------------------------------------------------------
# fused_add_rms_norm


def _check_fused_add(x, residual, w, what):
    normed, res_out = _on_triton("fused_add_rms_norm", ops.fused_add_rms_norm, x, residual, w, EPS)
    eager_sum = residual + x  # the decoder layer's `hidden_states = residual + hidden_states`
    assert res_out.dtype == eager_sum.dtype
    assert torch.equal(res_out, eager_sum), f"{what}: residual_out is not bit-equal to eager residual + x"
    eager = _hf_rms_norm(eager_sum, w)
    # The sum is rounded to x's dtype before it is normalised (as eager does): the oracle normalises that sum exactly.
    assert_no_worse_than_eager(normed, eager, _norm_oracle(eager_sum, w), what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("N", [1, 7, 127, 896, 5120])
@pytest.mark.parametrize("M", [1, 50])
def test_fused_add_rms_norm(device, dtype, N, M):
    x = torch.randn(M, N, device=device).to(dtype)
    residual = (torch.randn(M, N, device=device) * 4).to(dtype)
    w = torch.randn(N, device=device).to(dtype)
    _check_fused_add(x, residual, w, f"fused_add_rms_norm {_name(dtype)} [{M}, {N}]")


@pytest.mark.parametrize("M, N, dtype", [(1024, 896, torch.bfloat16), (3000, 127, torch.float16),
                                         (4096, 7, torch.float32)],
                         ids=lambda v: _name(v) if isinstance(v, torch.dtype) else str(v))
def test_fused_add_rms_norm_many_rows_and_mixed_weight(device, M, N, dtype):
    x = torch.randn(M, N, device=device).to(dtype)
    residual = torch.randn(M, N, device=device).to(dtype)
    w = torch.randn(N, device=device)  # fp32 weight: normed output promotes as HF's does
    _check_fused_add(x, residual, w, f"fused_add_rms_norm {_name(dtype)} [{M}, {N}] fp32 weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("x_layout, r_layout", [
    ("cols_strided", "transposed"),
    ("transposed", "rows_sliced"),
    ("seq_major_3d", "seq_major_3d"),
    ("cols_sliced", "cols_strided"),
])
def test_fused_add_rms_norm_non_contiguous(device, dtype, x_layout, r_layout):
    M, N = 15, 769
    x = _layouts(M, N, device, dtype)[x_layout]
    residual = _layouts(M, N, device, dtype)[r_layout]
    if residual.shape != x.shape:
        residual = residual.reshape(x.shape)
    w = torch.randn(N, device=device).to(dtype)
    _check_fused_add(x, residual, w, f"fused_add_rms_norm {x_layout}/{r_layout} {_name(dtype)}")


# --------------------------------------------------------------------------------------------------------------------
# apply_rope


def _hf_qk(b, s, Hq, Hkv, d, device, dtype):
    """q and k exactly as HF attention hands them over: ``proj(x).view(b, s, H, d).transpose(1, 2)``."""
    q = torch.randn(b, s, Hq * d, device=device).to(dtype).view(b, s, Hq, d).transpose(1, 2)
    k = torch.randn(b, s, Hkv * d, device=device).to(dtype).view(b, s, Hkv, d).transpose(1, 2)
    return q, k


def _positions(cos_b, s, device):
    # Far-apart, large positions per sequence: large angles and distinct rows when cos has a batch dim.
    return torch.arange(s, device=device)[None, :] + 1000 + 3001 * torch.arange(cos_b, device=device)[:, None]


def _hf_cos_sin(d, cos_b, s, device, dtype, rope_parameters=None, max_pos=131072):
    """cos/sin from the model's own rotary embedding (every rope type folds into these two tensors)."""
    cfg = LlamaConfig(hidden_size=32 * d, num_attention_heads=32, num_key_value_heads=8, head_dim=d,
                      max_position_embeddings=max_pos,
                      rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    emb = LlamaRotaryEmbedding(cfg).to(device)
    x = torch.empty(1, device=device, dtype=dtype)
    return emb(x, _positions(cos_b, s, device))


def _random_cos_sin(cos_b, s, rd, device, dtype):
    # Independent halves (HF's cos has cos[:h] == cos[h:]): catches a kernel that reads the wrong half.
    cos = (torch.rand(cos_b, s, rd, device=device) * 2 - 1).to(dtype)
    sin = (torch.rand(cos_b, s, rd, device=device) * 2 - 1).to(dtype)
    return cos, sin


_rope_oracle = oracle_rope  # hand-written fp64 rotate-half RoPE on the first cos.shape[-1] dims (llmkern.testing)


def _check_rope(q, k, cos, sin, what, eager_fn=apply_rotary_pos_emb):
    q_out, k_out = _on_triton("apply_rope", ops.apply_rope, q, k, cos, sin)
    q_eager, k_eager = eager_fn(q, k, cos, sin)
    # ulp terms at |x1 cos| + |x2 sin| per element (llmkern.testing.rope_scale): what the rotation's rounding errors
    # scale with, where |out| may have cancelled
    assert_no_worse_than_eager(q_out, q_eager, _rope_oracle(q, cos, sin), what=f"{what} q",
                               scale=rope_scale(q, cos, sin))
    assert_no_worse_than_eager(k_out, k_eager, _rope_oracle(k, cos, sin), what=f"{what} k",
                               scale=rope_scale(k, cos, sin))
    # Output layout: q's (and k's) own, as torch.empty_like gives it — for HF's transposed views, [b, s, H, d].
    assert q_out.stride() == torch.empty_like(q).stride(), f"{what}: q_out strides {q_out.stride()}"
    assert k_out.stride() == torch.empty_like(k).stride(), f"{what}: k_out strides {k_out.stride()}"
    return q_out, k_out


HEAD_LAYOUTS = [(14, 2), (28, 4), (32, 8), (4, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("Hq, Hkv", HEAD_LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_rope_heads_and_head_dims(device, dtype, Hq, Hkv, d):
    b, s = 2, 3  # 6 tokens: the prefill launch config (seq 1 and 17 are covered below)
    q, k = _hf_qk(b, s, Hq, Hkv, d, device, dtype)
    cos, sin = _hf_cos_sin(d, b, s, device, dtype)
    q_out, _ = _check_rope(q, k, cos, sin, f"rope {Hq}/{Hkv} d{d} {_name(dtype)}")
    assert q_out.stride() == q.stride()  # HF's transposed [b, s, H, d] buffer layout is kept


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("s, cos_batch, cos_src", [
    (1, "1", "hf"), (1, "b", "hf"), (1, "1", "random"), (1, "b", "random"),  # decode: one token per sequence
    (17, "1", "random"), (17, "b", "hf"),  # prefill; HF's per-sequence positions give cos a batch dim
])
def test_rope_seq_and_cos_batch(device, dtype, s, cos_batch, cos_src):
    b, Hq, Hkv, d = 2, 14, 2, 64
    cb = 1 if cos_batch == "1" else b
    q, k = _hf_qk(b, s, Hq, Hkv, d, device, dtype)
    if cos_src == "hf":
        cos, sin = _hf_cos_sin(d, cb, s, device, dtype, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    else:
        cos, sin = _random_cos_sin(cb, s, d, device, dtype)
    _check_rope(q, k, cos, sin, f"rope s{s} cos[{cb}] {cos_src} {_name(dtype)}")


ROPE_TYPES = {
    "default": ({"rope_type": "default", "rope_theta": 500000.0}, 131072),
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, 16384),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}, 131072),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
              "rope_theta": 1000000.0}, 16384),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_rope_types(device, dtype, rope_type):
    """The op sees only cos/sin, so it is right for every rope type the model's rotary embedding implements."""
    params, max_pos = ROPE_TYPES[rope_type]
    b, s, Hq, Hkv, d = 2, 4, 32, 8, 128
    q, k = _hf_qk(b, s, Hq, Hkv, d, device, dtype)
    cos, sin = _hf_cos_sin(d, b, s, device, dtype, rope_parameters=params, max_pos=max_pos)
    _check_rope(q, k, cos, sin, f"rope {rope_type} {_name(dtype)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("d, rd", [(64, 32), (80, 48), (128, 64), (64, 2)])
def test_rope_partial_rotary(device, dtype, d, rd):
    """rotary_dim < head_dim: rotate-half on the first rotary_dim dims, the rest unchanged (bit-equal)."""
    b, s, Hq, Hkv = 2, 5, 8, 2
    q, k = _hf_qk(b, s, Hq, Hkv, d, device, dtype)
    cos, sin = _random_cos_sin(b, s, rd, device, dtype)

    def eager_partial(q, k, cos, sin):
        if apply_partial_rotary_pos_emb is not None:
            return apply_partial_rotary_pos_emb(q, k, cos, sin)
        # Same as HF's partial variant, in the test dtype: rotate t[..., :rd], keep t[..., rd:].
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :rd], k[..., :rd], cos, sin)
        return torch.cat((q_rot, q[..., rd:]), -1), torch.cat((k_rot, k[..., rd:]), -1)

    q_out, k_out = _check_rope(q, k, cos, sin, f"rope partial {rd}/{d} {_name(dtype)}", eager_fn=eager_partial)
    assert torch.equal(q_out[..., rd:], q[..., rd:])
    assert torch.equal(k_out[..., rd:], k[..., rd:])


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["contiguous_bhsd", "fused_qkv", "head_dim_strided", "expanded_cos"])
def test_rope_layouts(device, dtype, layout):
    b, s, Hq, Hkv, d = 2, 7, 14, 2, 64
    cos, sin = _random_cos_sin(b, s, d, device, dtype)
    if layout == "contiguous_bhsd":
        q = torch.randn(b, Hq, s, d, device=device).to(dtype)
        k = torch.randn(b, Hkv, s, d, device=device).to(dtype)
    elif layout == "fused_qkv":  # one qkv projection, q/k/v sliced out of it (non-dense views)
        qkv = torch.randn(b, s, (Hq + 2 * Hkv) * d, device=device).to(dtype)
        q = qkv[..., :Hq * d].view(b, s, Hq, d).transpose(1, 2)
        k = qkv[..., Hq * d:(Hq + Hkv) * d].view(b, s, Hkv, d).transpose(1, 2)
    elif layout == "head_dim_strided":  # last-dim stride 2
        q = torch.randn(b, s, Hq, 2 * d, device=device).to(dtype)[..., ::2].transpose(1, 2)
        k = torch.randn(b, s, Hkv, 2 * d, device=device).to(dtype)[..., ::2].transpose(1, 2)
    else:  # cos/sin broadcast over the batch with a 0 batch stride, and sin column-strided
        q, k = _hf_qk(b, s, Hq, Hkv, d, device, dtype)
        cos = cos[:1].expand(b, s, d)
        sin = torch.randn(b, s, 2 * d, device=device).to(dtype)[..., ::2]
    _check_rope(q, k, cos, sin, f"rope {layout} {_name(dtype)}")


# Rounding order of RoPE in fp16/bf16 (issue #18). Eager computes ``(x * cos) + (rotate_half(x) * sin)`` in the
# dtype: each product is rounded to the dtype, then their sum, RN(RN(x1 c) - RN(x2 s)). The kernels (Triton, C++,
# CUDA) compute ``x1 * c - x2 * s`` in fp32 and round once to the dtype: RN_dt(RN_fp32(o)), o the exact value. Both
# products are exact in fp32 (8 x 8 or 11 x 11 significand bits, at most 22 < 24), so the one fp32 rounding is the
# difference's, FMA-contracted or not. So the kernels are not bit-equal to eager (about a third of the elements
# differ on random data) and never further from the exact value, up to the fp32 step: with m = RN_fp32(o) and
# k = RN_dt(m) the dtype number nearest m, every dtype number y (eager's result among them) has
# |k - m| <= |y - m|, hence |k - o| <= |k - m| + |m - o| <= |y - o| + 2|m - o|. The slack 2|m - o| (at most
# 2^-23 |o|, and 0 where o is an fp32 number) is needed: where m lands exactly on a midpoint between two dtype
# numbers and o does not, ties-to-even may pick the farther one while eager happens to pick the nearer (about one
# element in 10^5 in fp16). The reference backend keeps eager's order (bit-equal to eager).

ROUNDING_DTYPES = [torch.float16, torch.bfloat16]


def _rope_exact(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotated dims' exact value in fp64 (full rotary only). Products of fp16/bf16 numbers are exact in fp64;
    TwoSum proves the fp64 sum of the two products lost nothing, so the rule above compares with the exact value
    rather than with a rounded one."""
    x, c, s = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    h = c.shape[-1] // 2
    assert x.shape[-1] == 2 * h, "full rotary only"
    x1, x2 = x[..., :h], x[..., h:]
    a = torch.cat((x1 * c[..., :h], x2 * c[..., h:]), dim=-1)
    b = torch.cat((-(x2 * s[..., :h]), x1 * s[..., h:]), dim=-1)
    o = a + b
    bv = o - a
    lost = (a - (o - bv)) + (b - bv)  # TwoSum's error term: a + b == o + lost exactly
    assert torch.all(lost == 0), "the fp64 oracle is not exact for these inputs"
    return o


def _rope_rounding_inputs(dtype, device, cos_src):
    b, s, Hq, Hkv, d = 2, 16, 14, 2, 128  # 65536 rotated elements
    q, k = _hf_qk(b, s, Hq, Hkv, d, device, dtype)
    if cos_src == "hf":
        cos, sin = _hf_cos_sin(d, b, s, device, dtype)
    else:
        cos, sin = _random_cos_sin(b, s, d, device, dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", ROUNDING_DTYPES, ids=_name)
@pytest.mark.parametrize("cos_src", ["hf", "random"])
def test_rope_rounding_no_further_from_exact_than_eager(device, dtype, cos_src):
    """Element by element: |kernel - exact| <= |eager - exact| + 2 |RN_fp32(exact) - exact| (the comment above
    proves it for the kernels' order; it holds trivially for eager's own). Not statistical: it holds for any input,
    so no seed can make it fail."""
    q, k, cos, sin = _rope_rounding_inputs(dtype, device, cos_src)
    outs = _on_triton("apply_rope", ops.apply_rope, q, k, cos, sin)
    eagers = apply_rotary_pos_emb(q, k, cos, sin)
    for name, x, out, eager in zip("qk", (q, k), outs, eagers):
        o = _rope_exact(x, cos, sin)
        slack = 2 * (o.float().double() - o).abs()
        err, err_eager = (out.double() - o).abs(), (eager.double() - o).abs()
        bad = err > err_eager + slack
        assert not bad.any(), (
            f"rope {_name(dtype)} {name}: {int(bad.sum())} elements further from the exact value than eager's "
            f"(first at {tuple(bad.nonzero()[0].tolist())}: kernel error {err[bad][0]:.3e}, eager's "
            f"{err_eager[bad][0]:.3e}, slack {slack[bad][0]:.3e})")
        # Closer than eager overall, not merely level (the point of the fp32 order). Not a theorem like the rule above,
        # but the inputs are seeded and the margin is wide (the kernels' total error is about 2/3 of eager's).
        assert err.sum() < err_eager.sum(), f"rope {_name(dtype)} {name}: total error not below eager's"


@pytest.mark.parametrize("dtype", ROUNDING_DTYPES, ids=_name)
def test_rope_rounding_order_is_fp32_then_once(device, dtype):
    """The documented order, pinned bit for bit so the docs cannot go stale: the kernels return RN_dt(RN_fp32(exact))
    and so are NOT bit-equal to eager's RN(RN(x1 c) - RN(x2 s)) on random data."""
    q, k, cos, sin = _rope_rounding_inputs(dtype, device, "random")
    outs = _on_triton("apply_rope", ops.apply_rope, q, k, cos, sin)
    eagers = apply_rotary_pos_emb(q, k, cos, sin)
    for name, x, out, eager in zip("qk", (q, k), outs, eagers):
        want = _rope_exact(x, cos, sin).float().to(dtype)
        assert torch.equal(out, want), (f"rope {_name(dtype)} {name}: {int((out != want).sum())} elements are not "
                                        f"the exact value rounded to fp32 and then once to {_name(dtype)}")
        n_diff = int((out != eager).sum())
        assert n_diff > out.numel() // 10, (f"rope {_name(dtype)} {name}: only {n_diff} of {out.numel()} elements "
                                            f"differ from eager's order; README.md's rounding table says they differ")


@pytest.mark.parametrize("dtype", ROUNDING_DTYPES, ids=_name)
def test_rope_reference_keeps_eager_rounding_order(kernel_backend, device, dtype):
    """The reference backend (llmkern/reference.py) rounds as eager does: bit-equal to apply_rotary_pos_emb."""
    if kernel_backend != "triton":
        pytest.skip("the reference backend does not depend on the kernel backend: checked once, with triton")
    q, k, cos, sin = _rope_rounding_inputs(dtype, device, "random")
    with llmkern.use_backend("reference"), llmkern.track() as t:
        outs = ops.apply_rope(q, k, cos, sin)
    assert t.backends("apply_rope") == {"reference"}
    for out, eager in zip(outs, apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(out, eager)


# --------------------------------------------------------------------------------------------------------------------
# silu_and_mul / silu_and_mul_fused

SILU = ACT2FN["silu"]  # what LlamaMLP's act_fn is for hidden_act="silu"


_silu_oracle = oracle_silu_and_mul  # gate / (1 + exp(-gate)) * up in fp64 (llmkern.testing)


def _check_silu(out, gate, up, what):
    """Eager is LlamaMLP's ``act_fn(gate) * up``; ulp terms at ``llmkern.testing.silu_and_mul_scale`` (|out|, and in
    fp32 the exp argument's rounding for gate << 0)."""
    assert_no_worse_than_eager(out, SILU(gate) * up, _silu_oracle(gate, up), what=what,
                               scale=silu_and_mul_scale(gate, up))


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("I", [1, 7, 4864, 5120, 14336])
@pytest.mark.parametrize("M", [1, 3])
def test_silu_and_mul(device, dtype, I, M):
    gate = (torch.randn(M, I, device=device) * 4).to(dtype)
    up = torch.randn(M, I, device=device).to(dtype)
    out = _on_triton("silu_and_mul", ops.silu_and_mul, gate, up)
    _check_silu(out, gate, up, f"silu_and_mul {_name(dtype)} [{M}, {I}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("I", [1, 7, 4864, 5120, 14336])
def test_silu_and_mul_fused(device, dtype, I):
    """``[..., 2I]`` gate_up (gate first): the op reads the two halves in place."""
    gate_up = (torch.randn(2, 3, 2 * I, device=device) * 4).to(dtype)
    gate, up = gate_up[..., :I], gate_up[..., I:]
    out = _on_triton("silu_and_mul", ops.silu_and_mul_fused, gate_up)
    assert out.shape == (2, 3, I)
    _check_silu(out, gate, up, f"silu_and_mul_fused {_name(dtype)} I={I}")


@pytest.mark.parametrize("M, I, dtype", [(4096, 7, torch.bfloat16), (1024, 769, torch.float16),
                                         (3000, 127, torch.float32)],
                         ids=lambda v: _name(v) if isinstance(v, torch.dtype) else str(v))
def test_silu_and_mul_many_rows(device, M, I, dtype):
    gate = (torch.randn(M, I, device=device) * 4).to(dtype)
    up = torch.randn(M, I, device=device).to(dtype)
    out = _on_triton("silu_and_mul", ops.silu_and_mul, gate, up)
    _check_silu(out, gate, up, f"silu_and_mul [{M}, {I}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["halves_of_gate_up", "transposed", "cols_strided", "3d_seq_major"])
def test_silu_and_mul_non_contiguous(device, dtype, layout):
    M, I = 9, 769

    def rand(*shape, s=1.0):  # gate scaled by 4 before the view is taken: `gate * 4` afterwards would be contiguous
        return (torch.randn(*shape, device=device) * s).to(dtype)

    if layout == "halves_of_gate_up":
        gate, up = torch.cat([rand(M, I, s=4.0), rand(M, I)], -1).chunk(2, dim=-1)
    elif layout == "transposed":
        gate, up = rand(I, M, s=4.0).t(), rand(I, M).t()
    elif layout == "cols_strided":
        gate, up = rand(M, 2 * I, s=4.0)[:, ::2], rand(M, 3 * I)[:, ::3]
    else:
        gate, up = rand(5, 2, I, s=4.0).transpose(0, 1), rand(5, 2, I).transpose(0, 1)
    assert not gate.is_contiguous() and not up.is_contiguous()
    out = _on_triton("silu_and_mul", ops.silu_and_mul, gate, up)
    assert out.shape == gate.shape and out.is_contiguous()
    _check_silu(out, gate, up, f"silu_and_mul {layout} {_name(dtype)}")


# --------------------------------------------------------------------------------------------------------------------
# linear: F.linear is both eager and the reference; the C++ GEMV serves decode-sized CPU inputs


def _cpp_linear(dtype: torch.dtype) -> bool:
    """Whether the extension's C++ linear serves ``dtype`` on this CPU (asked of the extension itself)."""
    from llmkern import _ext

    return (_ext.load() and hasattr(torch.ops.llmkern_C, "cpu_linear_supported")
            and bool(torch.ops.llmkern_C.cpu_linear_supported(dtype)))


def _linear_backend(x, weight, bias=None) -> str:
    """The backend ``ops.linear`` must record for these inputs (its docstring), whatever backend is forced (other
    than the reference): no other backend implements linear."""
    rows = x.numel() // weight.shape[1]
    served = (x.is_cpu and _cpp_linear(x.dtype) and weight.stride(1) == 1 and rows <= ops.linear_max_rows(x.dtype)
              and (bias is None or bias.is_contiguous()))
    return "cpp" if served else "reference"


def _need_cpp_linear(dtype, device):
    if device != "cpu" or not _cpp_linear(dtype):
        pytest.skip(f"no C++ linear for {_name(dtype)} here (cpu_linear_supported is False: needs AVX2 or AVX-512, "
                    f"or a {device} device)")


@pytest.fixture
def linear_backend(kernel_backend, device):
    """linear runs the same backend under every forced kernel backend (none but cpp implements it), so its tests run
    once: under the cpp param on CPU when the extension is built, else under the first one that runs."""
    first = "cpp" if device == "cpu" and backends.available("cpp", device)[0] else "triton"
    if kernel_backend != first:
        pytest.skip(f"linear has no {kernel_backend} kernel: the same backend runs as under {first}, tested there")
    return kernel_backend


def _check_linear(x, weight, bias, what):
    want = _linear_backend(x, weight, bias)
    with llmkern.track() as t:
        out = ops.linear(x, weight, bias)
    assert t.backends("linear") == {want}, f"{what}: linear ran on {t.backends('linear')}, expected {want}"
    eager = F.linear(x, weight, bias)
    oracle = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    # The ulp allowance is of sum|x_k w_k| (+ |b|), what any summation order's rounding error scales with; |oracle|
    # can be far smaller after cancellation, and with N = 1 eager's own single error is no stable yardstick.
    magnitude = F.linear(x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs())
    assert_no_worse_than_eager(out, eager, oracle, what=what, scale=magnitude)
    assert out.is_contiguous()
    return out


def _linear_weights(N, K, device, dtype, bias):
    w = (torch.randn(N, K, device=device) / math.sqrt(K)).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    return w, b


LINEAR_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=_name)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("N", [1, 15, 16, 17, 576, 1536])
@pytest.mark.parametrize("K", [576, 64, 100, 1536, 4111])  # 100 and 4111: K tails of both dtypes' vector loops
@pytest.mark.parametrize("M", [1, 3, 16])
def test_linear_vs_f_linear(linear_backend, device, dtype, M, K, N, bias):
    x = torch.randn(M, K, device=device).to(dtype)
    w, b = _linear_weights(N, K, device, dtype, bias)
    out = _check_linear(x, w, b, f"linear {_name(dtype)} [{M}, {K}] x [{N}, {K}]{' + bias' if bias else ''}")
    assert out.shape == (M, N) and out.dtype == dtype


def _linear_x_layouts(K, device, dtype):
    """Activations ``[..., K]`` of at most 16 rows in layouts a model (or a user) may pass, by name."""
    return {
        "3d": torch.randn(2, 3, K, device=device).to(dtype),  # [b, s, K], HF's hidden states
        "rows_sliced": torch.randn(10, K, device=device).to(dtype)[::2],  # row stride 2K
        "cols_strided": torch.randn(5, 2 * K, device=device).to(dtype)[:, ::2],  # last-dim stride 2
        "transposed": torch.randn(K, 4, device=device).to(dtype).t(),  # last-dim stride 4
        "seq_major_3d": torch.randn(5, 3, K, device=device).to(dtype).transpose(0, 1),  # [3, 5, K] from [5, 3, K]
        "cols_sliced": torch.randn(7, K + 9, device=device).to(dtype)[:, 3:K + 3],  # offset start, row stride K+9
    }


@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=_name)
@pytest.mark.parametrize("layout", ["3d", "rows_sliced", "cols_strided", "transposed", "seq_major_3d", "cols_sliced"])
def test_linear_non_contiguous_x(linear_backend, device, dtype, layout):
    K, N = 100, 33
    x = _linear_x_layouts(K, device, dtype)[layout]
    w, b = _linear_weights(N, K, device, dtype, True)
    out = _check_linear(x, w, b, f"linear {layout} {_name(dtype)}")
    assert out.shape == (*x.shape[:-1], N)


@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=_name)
def test_linear_weight_row_stride(linear_backend, device, dtype):
    """A weight sliced out of a wider one (row stride > K, unit last stride) still streams through the C++ kernel."""
    K, N = 100, 40
    w = (torch.randn(N, K + 12, device=device) / 10).to(dtype)[:, 5:K + 5]
    x = torch.randn(3, K, device=device).to(dtype)
    assert w.stride() == (K + 12, 1)
    _check_linear(x, w, None, f"linear strided weight rows {_name(dtype)}")


@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=_name)
def test_linear_served_by_cpp(linear_backend, device, dtype):
    """Decode-sized CPU inputs run the C++ kernel, on the full path (first call) and the direct path after it."""
    _need_cpp_linear(dtype, device)
    x = torch.randn(1, 1, 576, device=device).to(dtype)
    w, b = _linear_weights(1536, 576, device, dtype, True)
    with llmkern.track() as t:
        outs = [ops.linear(x, w, b) for _ in range(3)] + [ops.linear(x, w)]
        batch = ops.linear(torch.randn(ops.linear_max_rows(dtype), 576, device=device).to(dtype), w, b)
    assert dict(t) == {("linear", "cpp"): 5}
    assert all(torch.equal(o, outs[0]) for o in outs[1:3])
    assert batch.shape == (ops.linear_max_rows(dtype), 1536)
    assert ops.linear_max_rows(torch.float32) == 64
    dot = torch.ops.llmkern_C.cpu_kernel("linear", torch.bfloat16) == "avx512"  # AVX512-BF16's dot product
    assert ops.linear_max_rows(torch.bfloat16) == (32 if dot else 16)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_linear_bf16_rows_follow_the_instruction_set(linear_backend, device, isa):
    """bf16 takes the C++ kernel up to 32 rows where it has the bf16 dot product (the avx512 kernel), 16 where it
    widens bf16 to fp32 (avx2): the limit follows a forced instruction set on the next full-path call, and the
    fused-step check reads the same table."""
    from llmkern import _ext

    _need_cpp_linear(torch.bfloat16, device)
    C = torch.ops.llmkern_C
    if isa == "avx512" and C.cpu_kernel("linear", torch.bfloat16) != "avx512":
        pytest.skip(f"this CPU's bf16 Linear kernel is {C.cpu_kernel('linear', torch.bfloat16)}, not avx512 "
                    "(needs AVX-512 with AVX512-BF16)")
    prev = _ext.set_cpu_isa(isa)
    try:
        want = 32 if isa == "avx512" else 16
        assert ops.linear_max_rows(torch.bfloat16) == want
        w, b = _linear_weights(48, 64, device, torch.bfloat16, True)
        for rows, backend in [(want, "cpp"), (want + 1, "reference"), (17, "cpp" if want == 32 else "reference")]:
            x = torch.randn(rows, 64, device=device).to(torch.bfloat16)
            with llmkern.track() as t:
                out = ops.linear(x, w, b)
            assert t.backends("linear") == {backend}, (isa, rows)
            if backend == "reference":
                assert torch.equal(out, F.linear(x, w, b))
        assert ops._LINEAR_ROWS[torch.bfloat16] == want  # the table the direct path and decode_layer._fused_ok read
    finally:
        _ext.set_cpu_isa(prev)


@pytest.mark.parametrize("case", ["rows_above_max", "fp16", "weight_last_stride", "bias_strided"])
def test_linear_reference_when_cpp_cannot_serve(linear_backend, device, case):
    """Inputs the C++ kernel does not take run F.linear, and the record says so."""
    K, N = 64, 24
    dtype = torch.float16 if case == "fp16" else torch.float32
    x = torch.randn(ops.linear_max_rows(dtype) + 1 if case == "rows_above_max" else 2, K, device=device).to(dtype)
    w, b = _linear_weights(N, K, device, dtype, True)
    if case == "weight_last_stride":
        w = w.t().contiguous().t()  # [N, K] with strides (1, N)
    if case == "bias_strided":
        b = torch.randn(2 * N, device=device).to(dtype)[::2]
    with llmkern.track() as t:
        out = ops.linear(x, w, b)
    assert t.backends("linear") == {"reference"}
    assert torch.equal(out, F.linear(x, w, b))


def test_linear_rows_limit_counts_all_leading_dims(linear_backend, device):
    """Rows are x.numel() // K: [2, 32, K] is 64 rows (cpp in fp32), [1, 65, K] is 65 (reference)."""
    _need_cpp_linear(torch.float32, device)
    w, _ = _linear_weights(8, 32, device, torch.float32, False)
    with llmkern.track() as t:
        ops.linear(torch.randn(2, 32, 32, device=device), w)
    assert t.backends("linear") == {"cpp"}
    with llmkern.track() as t:
        ops.linear(torch.randn(1, 65, 32, device=device), w)
    assert t.backends("linear") == {"reference"}


@pytest.mark.parametrize("forced", ["triton", "cpp", "reference"])
def test_linear_under_forced_backends(linear_backend, device, forced):
    """No Triton (or CUDA) linear: a forced triton backend leaves linear to the automatic choice (cpp on CPU,
    F.linear on CUDA); a forced reference runs F.linear."""
    if forced == "cpp" and device != "cpu":
        pytest.skip("the cpp backend runs CPU tensors")
    x = torch.randn(2, 64, device=device)
    w, b = _linear_weights(24, 64, device, torch.float32, True)
    with llmkern.use_backend(forced), llmkern.track() as t:
        ops.linear(x, w, b)
        ops.linear(x, w, b)
    want = "reference" if forced == "reference" else _linear_backend(x, w, b)
    assert t.backends("linear") == {want}
    assert backends._automatic("linear", torch.device(device)) != "triton"


def test_linear_direct_path_bad_input_names_argument(linear_backend, device):
    """After a call fills the direct table, a bad call that the C++ kernel rejects raises the named Python error."""
    _need_cpp_linear(torch.float32, device)
    w, b = _linear_weights(24, 64, device, torch.float32, True)
    ops.linear(torch.randn(1, 64, device=device), w, b)
    with pytest.raises(ValueError, match=r"^x's last dimension must equal weight's in_features"):
        ops.linear(torch.randn(1, 63, device=device), w, b)
    with pytest.raises(ValueError, match=r"^bias must be 1-D with weight's out_features \(24\) elements, got shape \(20,\)"):
        ops.linear(torch.randn(1, 64, device=device), w, b[:20])
    with pytest.raises(ValueError, match=r"x float32 and weight bfloat16"):
        ops.linear(torch.randn(1, 64, device=device), w.bfloat16())


def test_linear_torch_compile_fullgraph(linear_backend, device):
    """The op traces through its fake implementation (aot_eager: no Inductor build needed to prove it)."""
    x = torch.randn(1, 2, 64, device=device)
    w, b = _linear_weights(24, 64, device, torch.float32, True)
    torch._dynamo.reset()
    try:
        out = torch.compile(ops.linear, fullgraph=True, backend="aot_eager")(x, w, b)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, ops.linear(x, w, b))


# --------------------------------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_cases():
    def rms(offset, w_dtype=torch.float16):
        return lambda: (torch.randn(3, 5, 64, dtype=torch.float16), torch.randn(64, dtype=w_dtype), 1e-6, offset)

    def fused():
        return (torch.randn(4, 96, dtype=torch.bfloat16), torch.randn(4, 96, dtype=torch.bfloat16),
                torch.randn(96, dtype=torch.bfloat16), 1e-5)

    def rope(rd=64):
        q = torch.randn(2, 3, 4 * 64).view(2, 3, 4, 64).transpose(1, 2)
        k = torch.randn(2, 3, 2 * 64).view(2, 3, 2, 64).transpose(1, 2)
        return q, k, torch.randn(1, 3, rd), torch.randn(1, 3, rd)

    def silu():
        gate_up = torch.randn(3, 2 * 40)
        return tuple(gate_up.chunk(2, dim=-1))

    return [
        ("rms_norm", rms(0.0)),
        ("rms_norm", rms(1.0)),
        ("rms_norm", rms(0.0, torch.float32)),
        ("fused_add_rms_norm", fused),
        ("apply_rope", rope),
        ("apply_rope", lambda: rope(32)),
        ("silu_and_mul", silu),
        ("linear", lambda: (torch.randn(3, 5, 64), torch.randn(40, 64), torch.randn(40))),
        ("linear", lambda: (torch.randn(1, 100, dtype=torch.bfloat16), torch.randn(17, 100, dtype=torch.bfloat16), None)),
        ("linear", lambda: (torch.randn(20, 64), torch.randn(40, 64), torch.randn(40))),  # rows > 16: F.linear
    ]


@pytest.mark.parametrize("op, make_args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(op, make_args):
    args = make_args()
    with llmkern.track() as t:
        torch.library.opcheck(getattr(torch.ops.llmkern, op).default, args)
    assert (_linear_backend(*args) if op == "linear" else _KERNEL["name"]) in t.backends(op)


def _block(x, w, q, k, cos, sin, gate_up):
    h = ops.rms_norm(x, w, 1e-6)
    q2, k2 = ops.apply_rope(q, k, cos, sin)
    a = ops.silu_and_mul_fused(gate_up)
    return h, q2, k2, a


def test_torch_compile_fullgraph(device):
    """fullgraph=True fails on any graph break, so this proves every op traces through its fake implementation.
    Inductor on CPU (gcc) compiles this small graph in well under 60 s here, so the default backend is used."""
    b, s, Hq, Hkv, d, N, I = 2, 5, 4, 2, 64, 96, 80
    x = torch.randn(b, s, N, device=device, dtype=torch.bfloat16)
    w = torch.randn(N, device=device, dtype=torch.bfloat16)
    q, k = _hf_qk(b, s, Hq, Hkv, d, device, torch.bfloat16)
    cos, sin = _hf_cos_sin(d, 1, s, device, torch.bfloat16)
    gate_up = torch.randn(b, s, 2 * I, device=device, dtype=torch.bfloat16)
    args = (x, w, q, k, cos, sin, gate_up)

    eager = _block(*args)
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True)
    with llmkern.track() as t:
        got = compiled(*args)
    torch._dynamo.reset()
    assert t.ops() == {"rms_norm", "apply_rope", "silu_and_mul"}
    assert all(t.backends(op) == {_KERNEL["name"]} for op in t.ops())
    for g, e in zip(got, eager):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert torch.equal(g, e)  # the same kernels ran on the same inputs
    assert got[1].stride() == eager[1].stride()


# --------------------------------------------------------------------------------------------------------------------
# Bad input: a clear exception that names the argument


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32).to(dtype) if device == "cpu" else torch.empty(
        *shape, dtype=dtype, device=device)


def _rope_args(**over):
    a = dict(q=_t(1, 4, 5, 64), k=_t(1, 2, 5, 64), cos=_t(1, 5, 64), sin=_t(1, 5, 64))
    a.update(over)
    return a


BAD_INPUTS = [
    # rms_norm: dtype / type
    ("rms_norm int32 x", lambda: ops.rms_norm(_t(2, 8, dtype=torch.int32), _t(8), EPS), TypeError, r"^x must have dtype"),
    ("rms_norm fp64 x", lambda: ops.rms_norm(_t(2, 8, dtype=torch.float64), _t(8), EPS), TypeError,
     r"^x must have dtype .* got float64"),
    ("rms_norm fp64 weight", lambda: ops.rms_norm(_t(2, 8), _t(8, dtype=torch.float64), EPS), TypeError,
     r"^weight must have dtype"),
    ("rms_norm int weight", lambda: ops.rms_norm(_t(2, 8), torch.ones(8, dtype=torch.int64), EPS), TypeError,
     r"^weight must have dtype"),
    # A non-tensor is a TypeError naming the argument, whichever path the call takes.
    ("rms_norm list x", lambda: ops.rms_norm([1.0, 2.0], _t(2), EPS), TypeError, r"^x must be a torch.Tensor"),
    ("rms_norm list weight", lambda: ops.rms_norm(_t(2, 2), [1.0, 2.0], EPS), TypeError, r"^weight must be a torch.Tensor"),
    ("rms_norm 0-d x", lambda: ops.rms_norm(torch.tensor(1.0), _t(1), EPS), ValueError, r"^x must have at least one"),
    ("rms_norm weight size", lambda: ops.rms_norm(_t(2, 8), _t(7), EPS), ValueError, r"^weight must be 1-D with as many elements as x's last dimension \(8\), got weight of shape"),
    ("rms_norm weight 2-D", lambda: ops.rms_norm(_t(2, 8), _t(1, 8), EPS), ValueError, r"^weight must be 1-D with as many elements as x's last dimension"),
    ("rms_norm empty x", lambda: ops.rms_norm(_t(0, 8), _t(8), EPS), ValueError, r"^x must not be empty"),
    ("rms_norm empty hidden", lambda: ops.rms_norm(_t(3, 0), _t(0), EPS), ValueError, r"^x must not be empty"),
    ("rms_norm too wide", lambda: ops.rms_norm(_t(1, 65537), _t(65537), EPS), ValueError, r"x's last dimension must be at most 65536"),
    ("rms_norm eps 0", lambda: ops.rms_norm(_t(2, 8), _t(8), 0.0), ValueError, r"^eps must be a positive"),
    ("rms_norm eps < 0", lambda: ops.rms_norm(_t(2, 8), _t(8), -1e-6), ValueError, r"^eps must be a positive"),
    ("rms_norm eps nan", lambda: ops.rms_norm(_t(2, 8), _t(8), float("nan")), ValueError, r"^eps must be a positive"),
    ("rms_norm eps inf", lambda: ops.rms_norm(_t(2, 8), _t(8), math.inf), ValueError, r"^eps must be a positive"),
    ("rms_norm eps str", lambda: ops.rms_norm(_t(2, 8), _t(8), "1e-6"), TypeError, r"^eps must be a float"),
    ("rms_norm eps None", lambda: ops.rms_norm(_t(2, 8), _t(8), None), TypeError, r"^eps must be a float"),
    ("rms_norm eps bool", lambda: ops.rms_norm(_t(2, 8), _t(8), True), TypeError, r"^eps must be a float"),
    ("rms_norm eps tensor", lambda: ops.rms_norm(_t(2, 8), _t(8), torch.tensor(1e-6)), TypeError,
     r"^eps must be a float"),
    ("rms_norm offset str", lambda: ops.rms_norm(_t(2, 8), _t(8), EPS, offset="1"), TypeError,
     r"^offset must be a float"),
    ("rms_norm offset nan", lambda: ops.rms_norm(_t(2, 8), _t(8), EPS, offset=math.nan), ValueError,
     r"^offset must be a finite"),
    # The registered op validates too (torch.ops.llmkern.* is public through torch.compile graphs).
    ("op rms_norm eps 0", lambda: torch.ops.llmkern.rms_norm(_t(2, 8), _t(8), 0.0, 0.0), ValueError, r"^eps must be"),
    ("op rms_norm offset inf", lambda: torch.ops.llmkern.rms_norm(_t(2, 8), _t(8), EPS, math.inf), ValueError,
     r"^offset must be a finite"),
    # mixed devices: no GPU here, so the second tensor lives on "meta"
    ("rms_norm weight on meta", lambda: ops.rms_norm(_t(2, 8), _t(8, device="meta"), EPS), ValueError,
     r"one device.*x on cpu.*weight on meta"),
    ("rms_norm x on meta", lambda: ops.rms_norm(_t(2, 8, device="meta"), _t(8), EPS), ValueError,
     r"one device.*x on meta.*weight on cpu"),
    # fused_add_rms_norm
    ("fused residual shape", lambda: ops.fused_add_rms_norm(_t(2, 8), _t(3, 8), _t(8), EPS), ValueError,
     r"x shape \(2, 8\) and residual shape \(3, 8\)"),
    ("fused residual dtype", lambda: ops.fused_add_rms_norm(_t(2, 8), _t(2, 8, dtype=torch.float16), _t(8), EPS),
     ValueError, r"x float32 and residual float16"),
    ("fused residual int", lambda: ops.fused_add_rms_norm(_t(2, 8), torch.ones(2, 8, dtype=torch.int32), _t(8), EPS),
     TypeError, r"^residual must have dtype"),
    ("fused residual meta", lambda: ops.fused_add_rms_norm(_t(2, 8), _t(2, 8, device="meta"), _t(8), EPS), ValueError,
     r"one device.*x on cpu.*residual on meta"),
    ("fused weight size", lambda: ops.fused_add_rms_norm(_t(2, 8), _t(2, 8), _t(4), EPS), ValueError,
     r"^weight must be 1-D with as many elements as x's last dimension \(8\), got weight of shape"),
    ("fused empty", lambda: ops.fused_add_rms_norm(_t(0, 8), _t(0, 8), _t(8), EPS), ValueError, r"^x must not be empty"),
    ("fused eps nan", lambda: ops.fused_add_rms_norm(_t(2, 8), _t(2, 8), _t(8), math.nan), ValueError, r"^eps must"),
    ("fused eps str", lambda: ops.fused_add_rms_norm(_t(2, 8), _t(2, 8), _t(8), "x"), TypeError, r"^eps must be a float"),
    # apply_rope
    ("rope q fp64", lambda: ops.apply_rope(**_rope_args(q=_t(1, 4, 5, 64, dtype=torch.float64))), TypeError,
     r"^q must have dtype"),
    ("rope cos int", lambda: ops.apply_rope(**_rope_args(cos=torch.ones(1, 5, 64, dtype=torch.int32))), TypeError,
     r"^cos must have dtype"),
    ("rope q/k dtype", lambda: ops.apply_rope(**_rope_args(k=_t(1, 2, 5, 64, dtype=torch.float16))), ValueError,
     r"q float32 and k float16"),
    ("rope q 3-D", lambda: ops.apply_rope(**_rope_args(q=_t(4, 5, 64))), ValueError, r"^q and k must be 4-D"),
    ("rope k batch", lambda: ops.apply_rope(**_rope_args(k=_t(2, 2, 5, 64))), ValueError,
     r"^k must have q's batch \(1\), seq \(5\) and head_dim \(64\), got k of shape"),
    ("rope k seq", lambda: ops.apply_rope(**_rope_args(k=_t(1, 2, 4, 64))), ValueError, r"^k must have q's batch"),
    ("rope k head_dim", lambda: ops.apply_rope(**_rope_args(k=_t(1, 2, 5, 32))), ValueError, r"^k must have q's batch"),
    ("rope cos/sin shape", lambda: ops.apply_rope(**_rope_args(sin=_t(1, 5, 32))), ValueError,
     r"expected equal shapes of cos and sin, got cos shape \(1, 5, 64\) and sin shape \(1, 5, 32\)"),
    ("rope cos seq", lambda: ops.apply_rope(**_rope_args(cos=_t(1, 4, 64), sin=_t(1, 4, 64))), ValueError,
     r"^cos and sin must be 3-D \(batch, seq, rotary_dim\) with batch 1 or q's batch"),
    ("rope cos batch", lambda: ops.apply_rope(**_rope_args(cos=_t(2, 5, 64), sin=_t(2, 5, 64))), ValueError,
     r"^cos and sin must be 3-D \(batch, seq, rotary_dim\) with batch 1 or q's batch"),
    ("rope cos 4-D", lambda: ops.apply_rope(**_rope_args(cos=_t(1, 1, 5, 64), sin=_t(1, 1, 5, 64))), ValueError,
     r"^cos and sin must be 3-D \(batch, seq, rotary_dim\) with batch 1 or q's batch"),
    ("rope odd rotary_dim", lambda: ops.apply_rope(**_rope_args(cos=_t(1, 5, 31), sin=_t(1, 5, 31))), ValueError,
     r"rotary dim .* must be even .* got 31"),
    ("rope rotary_dim > head_dim", lambda: ops.apply_rope(**_rope_args(cos=_t(1, 5, 66), sin=_t(1, 5, 66))),
     ValueError, r"rotary dim .* at most q's head_dim \(64\), got 66"),
    ("rope empty q", lambda: ops.apply_rope(**_rope_args(q=_t(1, 0, 5, 64))), ValueError, r"^q must not be empty"),
    ("rope empty cos", lambda: ops.apply_rope(**_rope_args(cos=_t(1, 5, 0), sin=_t(1, 5, 0))), ValueError,
     r"^cos must not be empty"),
    ("rope k on meta", lambda: ops.apply_rope(**_rope_args(k=_t(1, 2, 5, 64, device="meta"))), ValueError,
     r"one device.*q on cpu.*k on meta"),
    ("rope list sin", lambda: ops.apply_rope(**_rope_args(sin=[0.0])), TypeError, r"^sin must be a torch.Tensor"),
    # silu_and_mul / fused
    ("silu shape", lambda: ops.silu_and_mul(_t(2, 8), _t(2, 4)), ValueError,
     r"gate shape \(2, 8\) and up shape \(2, 4\)"),
    ("silu dtype", lambda: ops.silu_and_mul(_t(2, 8), _t(2, 8, dtype=torch.bfloat16)), ValueError,
     r"gate float32 and up bfloat16"),
    ("silu int gate", lambda: ops.silu_and_mul(torch.ones(2, 8, dtype=torch.int32), _t(2, 8)), TypeError,
     r"^gate must have dtype"),
    ("silu fp64 up", lambda: ops.silu_and_mul(_t(2, 8), _t(2, 8, dtype=torch.float64)), TypeError,
     r"^up must have dtype"),
    ("silu up on meta", lambda: ops.silu_and_mul(_t(2, 8), _t(2, 8, device="meta")), ValueError,
     r"one device.*gate on cpu.*up on meta"),
    ("silu empty", lambda: ops.silu_and_mul(_t(0, 8), _t(0, 8)), ValueError, r"^gate must not be empty"),
    ("silu 0-d", lambda: ops.silu_and_mul(torch.tensor(1.0), torch.tensor(1.0)), ValueError,
     r"^gate must have at least one"),
    ("fused odd last dim", lambda: ops.silu_and_mul_fused(_t(2, 7)), ValueError, r"^gate_up's last dimension must be even"),
    ("fused int", lambda: ops.silu_and_mul_fused(torch.ones(2, 8, dtype=torch.int32)), TypeError,
     r"^gate_up must have dtype"),
    ("fused non-tensor", lambda: ops.silu_and_mul_fused([1.0, 2.0]), TypeError, r"^gate_up must be a torch.Tensor"),
    ("fused empty", lambda: ops.silu_and_mul_fused(_t(3, 0)), ValueError, r"^gate_up must not be empty"),
    ("fused 0-d", lambda: ops.silu_and_mul_fused(torch.tensor(1.0)), ValueError, r"^gate_up must have at least one"),
    # linear
    ("linear int x", lambda: ops.linear(torch.ones(2, 8, dtype=torch.int32), _t(4, 8)), TypeError,
     r"^x must have dtype"),
    ("linear fp64 x", lambda: ops.linear(_t(2, 8, dtype=torch.float64), _t(4, 8, dtype=torch.float64)), TypeError,
     r"^x must have dtype .* got float64"),
    ("linear fp64 weight", lambda: ops.linear(_t(2, 8), _t(4, 8, dtype=torch.float64)), TypeError,
     r"^weight must have dtype"),
    ("linear list x", lambda: ops.linear([1.0, 2.0], _t(4, 2)), TypeError, r"^x must be a torch.Tensor"),
    ("linear list weight", lambda: ops.linear(_t(2, 2), [[1.0, 2.0]]), TypeError, r"^weight must be a torch.Tensor"),
    ("linear float bias", lambda: ops.linear(_t(2, 8), _t(4, 8), 1.0), TypeError, r"^bias must be a torch.Tensor"),
    ("linear int bias", lambda: ops.linear(_t(2, 8), _t(4, 8), torch.ones(4, dtype=torch.int64)), TypeError,
     r"^bias must have dtype"),
    ("linear weight/x dtype", lambda: ops.linear(_t(2, 8), _t(4, 8, dtype=torch.bfloat16)), ValueError,
     r"x float32 and weight bfloat16"),
    ("linear bias dtype", lambda: ops.linear(_t(2, 8), _t(4, 8), _t(4, dtype=torch.bfloat16)), ValueError,
     r"bias bfloat16"),
    ("linear weight 1-D", lambda: ops.linear(_t(2, 8), _t(8)), ValueError, r"^weight must be 2-D .* got shape \(8,\)"),
    ("linear weight 3-D", lambda: ops.linear(_t(2, 8), _t(1, 4, 8)), ValueError, r"^weight must be 2-D"),
    ("linear in_features", lambda: ops.linear(_t(2, 8), _t(4, 7)), ValueError,
     r"^x's last dimension must equal weight's in_features \(7\), got x of shape \(2, 8\) for weight of shape"),
    ("linear bias size", lambda: ops.linear(_t(2, 8), _t(4, 8), _t(5)), ValueError, r"^bias must be 1-D with weight's out_features \(4\) elements, got shape \(5,\)"),
    ("linear bias 2-D", lambda: ops.linear(_t(2, 8), _t(4, 8), _t(1, 4)), ValueError,
     r"^bias must be 1-D with weight's out_features \(4\) elements, got shape \(1, 4\)"),
    ("linear empty x", lambda: ops.linear(_t(0, 8), _t(4, 8)), ValueError, r"^x must not be empty"),
    ("linear empty weight", lambda: ops.linear(_t(2, 8), _t(0, 8)), ValueError, r"^weight must not be empty"),
    ("linear 0-d x", lambda: ops.linear(torch.tensor(1.0), _t(4, 1)), ValueError, r"^x must have at least one"),
    ("linear weight on meta", lambda: ops.linear(_t(2, 8), _t(4, 8, device="meta")), ValueError,
     r"one device.*x on cpu.*weight on meta"),
    ("linear bias on meta", lambda: ops.linear(_t(2, 8), _t(4, 8), _t(4, device="meta")), ValueError,
     r"one device.*bias on meta"),
    ("op linear in_features", lambda: torch.ops.llmkern.linear(_t(2, 8), _t(4, 7), None), ValueError,
     r"^x's last dimension must equal"),
]


@pytest.mark.parametrize("case, call, exc, match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises(case, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------------------------------------
# Backend forcing


def test_use_backend_reference_is_tracked(device):
    x, w = torch.randn(3, 64, device=device), torch.randn(64, device=device)
    q, k = _hf_qk(1, 3, 4, 2, 64, device, torch.float32)
    cos, sin = _random_cos_sin(1, 3, 64, device, torch.float32)
    with llmkern.use_backend("reference"), llmkern.track() as t:
        y = ops.rms_norm(x, w)
        ops.fused_add_rms_norm(x, x, w)
        q_out, _ = ops.apply_rope(q, k, cos, sin)
        ops.silu_and_mul(x, x)
    assert t.ops() == {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul"}
    assert all(t.backends(op) == {"reference"} for op in t.ops())
    assert torch.equal(y, reference.rms_norm(x, w, 1e-6))
    assert q_out.stride() == q.stride()  # the reference keeps the layout the fake implementation promises
    # Leaving the block restores the automatic choice (Triton here).
    _on_triton("rms_norm", ops.rms_norm, x, w)


def test_use_backend_is_tracked(device, kernel_backend):
    x, w = torch.randn(3, 64, device=device), torch.randn(64, device=device)
    with llmkern.use_backend(kernel_backend):
        _on_triton("rms_norm", ops.rms_norm, x, w)


@pytest.mark.parametrize("name", ["bogus", "Triton", ""])
def test_use_backend_unknown_raises(name):
    with pytest.raises(ValueError, match="backend must be one of"):
        with llmkern.use_backend(name):
            pass
