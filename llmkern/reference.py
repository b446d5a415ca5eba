"""Pure-torch references for every op, written the way Hugging Face eager computes them.

They are the correctness oracle of the tests and the last-resort implementation when no kernel backend fits.
Casting order is copied from transformers' modules (LlamaRMSNorm, apply_rotary_pos_emb, LlamaMLP).
"""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    # fp32 as HF does for fp32/fp16/bf16 inputs; fp64 inputs stay fp64 so tests can build an exact oracle.
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * h.to(x.dtype)
    return (h * (offset + weight.to(h.dtype))).to(x.dtype)


def fused_add_rms_norm(x, residual, weight, eps: float):
    s = residual + x
    return rms_norm(s, weight, eps), s


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(q, k, cos, sin):
    rd = cos.shape[-1]
    c = cos.unsqueeze(1)
    s = sin.unsqueeze(1)

    def one(x):
        xr, xp = x[..., :rd], x[..., rd:]
        out = (xr * c) + (_rotate_half(xr) * s)
        return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out

    return one(q), one(k)


def silu_and_mul(gate, up):
    return F.silu(gate) * up
