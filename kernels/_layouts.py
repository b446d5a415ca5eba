"""The shapes the GPU compile gate covers: supported model layouts, GPU SM counts, batch sizes and contexts.

Every kernel module builds its ``compile_specs()`` by running its own launch heuristics over this grid (every SM
count x layout x batch 1..256 x context up to the layout's ``max_position_embeddings``) and keeping one spec per
distinct compiled kernel (constexprs, argument types, the divisibility Triton infers at launch, warps, stages). A
config the heuristics can pick for these shapes therefore has a compiled spec by construction.
"""

from dataclasses import dataclass

# Streaming multiprocessors: A100, H100 PCIe, H100 SXM / H200, B200.
SM_COUNTS = (108, 114, 132, 148)
MAX_BATCH = 256
# CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass(frozen=True)
class Layout:
    name: str
    hidden: int
    intermediate: int  # the MLP's (the experts' for MoE models)
    Hq: int
    Hkv: int
    D: int
    max_pos: int  # max_position_embeddings of the model's config
    sliding_window: int | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k (N = head_dim)


# From the models' config.json files on the Hugging Face Hub.
LAYOUTS = (
    Layout("smollm2-135m", 576, 1536, 9, 3, 64, 8192),
    Layout("llama-2-7b", 4096, 11008, 32, 32, 128, 4096),
    Layout("llama-2-13b", 5120, 13824, 40, 40, 128, 4096),
    Layout("llama-2-70b", 8192, 28672, 64, 8, 128, 4096),
    Layout("llama-3.1-8b", 4096, 14336, 32, 8, 128, 131072),
    Layout("llama-3.1-70b", 8192, 28672, 64, 8, 128, 131072),
    Layout("mistral-7b-v0.1", 4096, 14336, 32, 8, 128, 32768, sliding_window=4096),
    Layout("mistral-7b-v0.3", 4096, 14336, 32, 8, 128, 32768),
    Layout("qwen2.5-0.5b", 896, 4864, 14, 2, 64, 32768),
    Layout("qwen2.5-1.5b", 1536, 8960, 12, 2, 128, 32768),
    Layout("qwen2.5-3b", 2048, 11008, 16, 2, 128, 32768),
    Layout("qwen2.5-7b", 3584, 18944, 28, 4, 128, 32768),
    Layout("qwen2.5-14b", 5120, 13824, 40, 8, 128, 32768),
    Layout("qwen2.5-32b", 5120, 27648, 40, 8, 128, 32768),
    Layout("qwen2.5-72b", 8192, 29568, 64, 8, 128, 32768),
    Layout("qwen3-0.6b", 1024, 3072, 16, 8, 128, 40960, qk_norm=True),
    Layout("qwen3-1.7b", 2048, 6144, 16, 8, 128, 40960, qk_norm=True),
    Layout("qwen3-4b-2507", 2560, 9728, 32, 8, 128, 262144, qk_norm=True),
    Layout("qwen3-8b", 4096, 12288, 32, 8, 128, 40960, qk_norm=True),
    Layout("qwen3-14b", 5120, 17408, 40, 8, 128, 40960, qk_norm=True),
    Layout("qwen3-32b", 5120, 25600, 64, 8, 128, 40960, qk_norm=True),
    Layout("qwen3-30b-a3b-2507", 2048, 768, 32, 4, 128, 262144, qk_norm=True),
    Layout("qwen3-235b-a22b-2507", 4096, 1536, 64, 4, 128, 262144, qk_norm=True),
)

# Head layouts the kernels accept beyond the supported models (head_dim 80 / 96 / 256, a group of 8 at d256), so
# their configs stay compiled too: (name, Hq, Hkv, D, max context).
EXTRA_HEAD_LAYOUTS = (("d80", 32, 8, 80, 32768), ("d96", 32, 32, 96, 32768), ("d256", 16, 8, 256, 131072),
                      ("d256-g8", 64, 8, 256, 131072))

# Page sizes: PagedKVCache's default (16) and the smallest (1), which takes the gathered-tile path.
BLOCK_SIZES = (16, 1)
DTYPES = ("fp32", "fp16", "bf16")


def head_layouts():
    """``(name, Hq, Hkv, D, max_context, sliding_window)`` of every layout, supported models first."""
    out = [(l.name, l.Hq, l.Hkv, l.D, l.max_pos, l.sliding_window) for l in LAYOUTS]
    out += [(n, hq, hkv, d, ctx, None) for n, hq, hkv, d, ctx in EXTRA_HEAD_LAYOUTS]
    return out


def batches():
    return range(1, MAX_BATCH + 1)


def contexts(max_pos: int):
    """Context lengths to evaluate the heuristics at: every power of two and its neighbours up to ``max_pos`` and a
    dense sweep of small ones, so each step of a heuristic (split counts, divisibility by 16) is hit."""
    out = set(range(1, 257))
    p = 256
    while p <= max_pos:
        out.update((p - 1, p, p + 1, p + p // 2))
        p *= 2
    out.add(max_pos)
    return sorted(c for c in out if c <= max_pos)


def token_counts(max_tokens: int):
    """Row counts of a row op: every decode batch (1..256) and prefill sizes up to ``max_tokens``."""
    return contexts(max_tokens)


def fits_grid(grid) -> bool:
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return all(1 <= g <= lim for g, lim in zip(grid, GRID_LIMITS))
