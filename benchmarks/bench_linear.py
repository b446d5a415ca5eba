"""Decode-sized Linear (a few rows of x times a weight matrix): llmkern's C++ CPU kernel against eager
``F.linear`` (torch's GEMM). On CUDA llmkern does not replace Linear (cuBLAS is already memory-bound there), so this
script is CPU-only in practice: on CUDA only the baseline is timed.

A decode-step Linear reads every weight once: minimal bytes moved (s = element size, T rows, N out, K in):
    N*K*s + T*K*s + T*N*s
Weights bigger than the last-level cache (lm_head, Llama-3-8B's MLP) measure memory bandwidth; small ones measure
the cache, as they do inside a model only when they stay resident between steps (they do not: a step streams the
whole model).
Sweep (full): rows 1, 4, 16 x the projections of SmolLM2-135M and Llama-3-8B. Quick: one row, four shapes.

    python benchmarks/bench_linear.py --quick
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _harness as H  # noqa: E402

# (name, in_features K, out_features N)
SHAPES = [("smollm2 qkv/o", 576, 576), ("smollm2 gate/up", 576, 1536), ("smollm2 down", 1536, 576),
          ("smollm2 lm_head", 576, 49152), ("llama-3-8b q/o", 4096, 4096), ("llama-3-8b gate/up", 4096, 14336),
          ("llama-3-8b down", 14336, 4096)]
ROWS = [1, 4, 16]
QUICK = ([1], ["smollm2 gate/up", "smollm2 lm_head", "llama-3-8b q/o", "llama-3-8b gate/up"])
DRY = ([1], ["smollm2 qkv/o"])


def cases(args) -> list[H.Case]:
    rows, names = DRY if args.dry_run else QUICK if args.quick else (ROWS, [s[0] for s in SHAPES])
    dt, dev = args.torch_dtype, args.device
    s = H.esize(dt)
    out = []
    for name, K, N in SHAPES:
        if name not in names:
            continue
        for T in rows:
            def make(T=T, K=K, N=N):
                g = torch.Generator(device=dev).manual_seed(0)
                return {"x": torch.randn(T, K, dtype=dt, device=dev, generator=g),
                        "w": (torch.randn(N, K, dtype=dt, device=dev, generator=g) / K ** 0.5)}
            out.append(H.Case("linear", f"{name} T={T} K={K} N={N}", N * K * s + T * K * s + T * N * s, make, x=T,
                              series=name))
    return out


def providers(args) -> tuple[list[H.Provider], list[str]]:
    import llmkern.ops as L

    def eager(inp):
        x, w = inp["x"], inp["w"]
        return lambda: F.linear(x, w)

    def kern(inp):
        x, w = inp["x"], inp["w"]
        return lambda: L.linear(x, w)

    return H.standard_providers(args, eager=eager, llmkern_call=kern, eager_note="F.linear (torch's GEMM)")


def main(argv=None) -> int:
    return H.script_main(__doc__, "linear (decode rows)", providers, cases, argv)


if __name__ == "__main__":
    sys.exit(main())
