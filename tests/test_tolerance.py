"""The tolerance rule itself (llmkern.testing.assert_no_worse_than_eager, element by element): it passes a correctly
rounded result and rejects the bugs it exists to catch — outputs zeroed below a threshold, rounding by truncation,
small-magnitude errors in fp32 — on synthetic data, so every kernel test built on it can fail. No kernel runs here.

"eager" is the oracle rounded to nearest even by torch (what a correct single rounding gives), sometimes with one ulp
of extra error where a second rounding would put it; the planted results are built from the same oracle.
"""

import pytest
import torch

from llmkern.testing import STRICT_SHARE, assert_no_worse_than_eager, ulp_at

HALF = [torch.float16, torch.bfloat16]


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _case(dtype, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    oracle = torch.randn(n, generator=g, dtype=torch.float64) * 3
    return oracle, oracle.to(dtype)  # eager: round to nearest even


def _truncate(x: torch.Tensor, dtype) -> torch.Tensor:
    """fp64 -> dtype rounding toward zero (the planted bug): the nearest-even result, one ulp back where it rounded
    away from zero."""
    rn = x.to(dtype)
    away = rn.double().abs() > x.abs()
    step = ulp_at(rn.double(), dtype)
    below = (rn.double().abs() - step).clamp(min=0) * rn.double().sign()
    return torch.where(away, below.to(dtype), rn)


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_correct_rounding_passes(dtype):
    oracle, eager = _case(dtype)
    share = assert_no_worse_than_eager(eager.clone(), eager, oracle, what="rn")
    assert share <= 0.5 + 1e-9  # half an ulp at most, where eager's own error is the same half ulp


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_rare_one_ulp_coincidences_pass(dtype):
    """A correct kernel one ulp from eager at a few elements (its fp32 intermediate crossed a rounding midpoint where
    eager's did not): allowed by (a)'s eps * s_i, and their count is within (b)'s budget."""
    oracle, eager = _case(dtype)
    out = eager.clone()
    for i in (10, 500, 3000):  # the kernel rounds to the other neighbour of the exact value
        rn = eager[i].double()
        out[i] = (rn + torch.sign(oracle[i] - rn) * ulp_at(oracle[i], dtype)).to(dtype)
        assert out[i] != eager[i] and (out[i].double() - oracle[i]).abs() < ulp_at(oracle[i], dtype)
    assert_no_worse_than_eager(out, eager, oracle, what="coincidences")


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_truncation_fails(dtype):
    oracle, eager = _case(dtype)
    out = _truncate(oracle, dtype)
    assert (out != eager).float().mean() > 0.3  # really a rounding-mode change, not a few elements
    with pytest.raises(AssertionError, match=r"ulp\(s_i\) / 2 \(at most \d+ may be: a wrong rounding mode\?\)"):
        assert_no_worse_than_eager(out, eager, oracle, what="truncated")
    # ...and not because any element left the per-element allowance (a): that one cannot see it
    over = (out.double() - oracle).abs() > 1.5 * (eager.double() - oracle).abs() + torch.finfo(dtype).eps * oracle.abs()
    assert not over.any()


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_truncation_fails_with_a_second_eager_rounding(dtype):
    """Eager rounds twice (as SwiGLU's silu-then-multiply does): its own error is up to about one ulp, and truncation
    still leaves far more than STRICT_SHARE of the elements past half an ulp over it."""
    oracle, _ = _case(dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    pre = oracle * (1 + (torch.rand(oracle.shape, generator=g, dtype=torch.float64) - 0.5) * torch.finfo(dtype).eps)
    eager = pre.to(dtype)  # an earlier rounding's error, then the final one
    out = _truncate(pre, dtype)
    strict = 1.5 * (eager.double() - oracle).abs() + ulp_at(oracle, dtype) / 2
    assert ((out.double() - oracle).abs() > strict).float().mean() > 10 * STRICT_SHARE
    with pytest.raises(AssertionError, match="wrong rounding mode"):
        assert_no_worse_than_eager(out, eager, oracle, what="truncated after a rounding")


@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=_name)
def test_zeroing_small_outputs_fails(dtype):
    """The issue's bf16 rms_norm: every output under 1.3% of the max set to zero. The per-tensor rule let most cases
    through; element by element each zeroed output is off by its whole size."""
    oracle, eager = _case(dtype)
    out = torch.where(oracle.abs() < 0.013 * oracle.abs().max(), 0.0, oracle).to(dtype)
    with pytest.raises(AssertionError, match=r"elements over .* worst at \(\d+,\): out 0\.0, oracle"):
        assert_no_worse_than_eager(out, eager, oracle, what="zeroed")


def test_fp32_small_value_error_fails():
    """fp32: one ulp of the tensor's largest value is 2^14 ulps of an element 2^-14 its size; the rule judges each
    element against its own magnitude."""
    g = torch.Generator().manual_seed(3)
    oracle = torch.randn(1000, generator=g, dtype=torch.float64)
    oracle[7] = 1e-4
    eager = oracle.float()
    out = eager.clone()
    out[7] = out[7] * (1 + 1e-5)  # ~84 ulps of the element, 1e-9 absolute: far inside eps * max|oracle|
    assert (out.double() - oracle).abs().max() < torch.finfo(torch.float32).eps * oracle.abs().max()
    with pytest.raises(AssertionError, match=r"worst at \(7,\)"):
        assert_no_worse_than_eager(out, eager, oracle, what="fp32")
    assert_no_worse_than_eager(eager.clone(), eager, oracle, what="fp32 rn")


def test_scale_is_per_element_and_broadcasts():
    """``scale`` as a tensor broadcastable to the output: a row of sums of products with a large magnitude gets a
    large allowance, and only that row."""
    oracle = torch.tensor([[1e-3, 2e-3], [1e-3, 2e-3]], dtype=torch.float64)
    eager = oracle.to(torch.bfloat16)
    out = eager.clone()
    out[0] = (oracle[0] + 0.5e-4).to(torch.bfloat16)  # ~6 ulps of the elements
    mags = torch.tensor([[1.0], [1e-3]], dtype=torch.float64)  # row 0 summed from terms ~1
    assert_no_worse_than_eager(out, eager, oracle, what="row 0 large terms", scale=mags)
    with pytest.raises(AssertionError, match=r"worst at \(0, \d\)"):
        assert_no_worse_than_eager(out, eager, oracle, what="own magnitude")
    assert_no_worse_than_eager(out, eager, oracle, what="a number", scale=1.0)


def test_message_names_the_worst_element():
    oracle = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    eager = oracle.to(torch.bfloat16)
    out = eager.clone()
    out[2] = 3.5
    out[1] = 2.0625  # over too, by less
    with pytest.raises(AssertionError) as info:
        assert_no_worse_than_eager(out, eager, oracle, what="msg")
    msg = str(info.value)
    assert msg.startswith("msg: 2 of 4 elements over")
    assert "worst at (2,): out 3.5, oracle 3.0, eager 3.0, error 5.000e-01, allowance 2.344e-02" in msg
