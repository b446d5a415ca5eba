"""RMSNorm and residual-add + RMSNorm: llmkern against HF eager (and torch.compile, Liger, FlashInfer, vLLM on CUDA).

Minimal bytes moved (s = element size of x, s_w of the weight, s_y of the output, T tokens, N hidden):
  rms_norm            reads x and w, writes y:                     T*N*s + N*s_w + T*N*s_y
  fused_add_rms_norm  reads x, residual and w, writes y and the     3*T*N*s + N*s_w + T*N*s_y
                      new residual:
Sweep (full): tokens 1..16k x hidden sizes of the supported models. Quick: 3 x 2 shapes.

    python benchmarks/bench_rms_norm.py --quick
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness as H  # noqa: E402

TOKENS = [1, 16, 128, 1024, 4096, 16384]
HIDDEN = [576, 896, 2048, 3584, 4096, 5120, 8192]  # SmolLM2-135M, Qwen2.5-0.5B, Llama-3.2-1B, Qwen2.5-7B, Llama-7/8B, 13B, 70B
QUICK = ([1, 128, 4096], [896, 4096])
DRY = ([4], [576])
EPS = 1e-6


def hf_rms_norm(x, w, eps=EPS):
    # transformers' LlamaRMSNorm.forward, line for line (the eager baseline every patched model replaces).
    dt = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(dt)


def cases(args) -> list[H.Case]:
    tokens, hidden = DRY if args.dry_run else QUICK if args.quick else (TOKENS, HIDDEN)
    dt, dev = args.torch_dtype, args.device
    s = H.esize(dt)
    out: list[H.Case] = []
    for N in hidden:
        for T in tokens:
            def make(T=T, N=N, op="rms_norm"):
                g = torch.Generator(device=dev).manual_seed(0)
                return {"_op": op,  # eager and llmkern providers serve both ops and read which one is timed
                        "x": torch.randn(T, N, dtype=dt, device=dev, generator=g),
                        "r": torch.randn(T, N, dtype=dt, device=dev, generator=g),
                        "w": 1 + 0.1 * torch.randn(N, dtype=dt, device=dev, generator=g)}
            shape = f"T={H.human_tokens(T)} N={N}"
            # eager materialises an fp32 copy and two fp32 temporaries of x: count them for the memory check.
            foot = T * N * (3 * s + 3 * 4)
            out.append(H.Case("rms_norm", shape, T * N * s + N * s + T * N * s, make, x=T, series=f"N={N}",
                              footprint=foot))
            out.append(H.Case("fused_add_rms_norm", shape, 3 * T * N * s + N * s + T * N * s,
                              lambda make=make: make(op="fused_add_rms_norm"), x=T,
                              series=f"N={N}", footprint=foot + 2 * T * N * s))
    return out


def providers(args) -> tuple[list[H.Provider], list[str]]:
    import llmkern.ops as L

    def eager(inp):
        op = inp["_op"]
        x, r, w = inp["x"], inp["r"], inp["w"]
        if op == "rms_norm":
            return lambda: hf_rms_norm(x, w)

        def fused():  # the decoder layer's `residual + attn_out` then post_attention_layernorm
            h = x + r
            return hf_rms_norm(h, w), h
        return fused

    def kern(inp):
        x, r, w = inp["x"], inp["r"], inp["w"]
        if inp["_op"] == "rms_norm":
            return lambda: L.rms_norm(x, w, EPS)
        return lambda: L.fused_add_rms_norm(x, r, w, EPS)

    provs, notes = H.standard_providers(args, eager=eager, llmkern_call=kern,
                                        eager_note="HF LlamaRMSNorm code; fused: x + r then the norm")

    ok, why = H.external("liger_kernel", args, "liger")
    if ok:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        provs.append(H.Provider("liger", lambda inp: (lambda: LigerRMSNormFunction.apply(
            inp["x"], inp["w"], EPS, 0.0, "llama")), ops=("rms_norm",)))
        if H.importable("liger_kernel.ops.fused_add_rms_norm"):
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

            provs.append(H.Provider("liger-fused", lambda inp: (lambda: LigerFusedAddRMSNormFunction.apply(
                inp["x"], inp["r"], inp["w"], EPS)), ops=("fused_add_rms_norm",)))
    else:
        notes.append(why)

    ok, why = H.external("flashinfer", args)
    if ok:
        import flashinfer

        provs.append(H.Provider("flashinfer", lambda inp: (lambda: flashinfer.norm.rmsnorm(inp["x"], inp["w"], EPS)),
                                ops=("rms_norm",)))
        # In place (residual += x; x = norm(residual)): repeated calls keep the same traffic.
        provs.append(H.Provider("flashinfer", lambda inp: (lambda: flashinfer.norm.fused_add_rmsnorm(
            inp["x"], inp["r"], inp["w"], EPS)), note="in place", ops=("fused_add_rms_norm",)))
    else:
        notes.append(why)

    ok, why = H.external("vllm", args)
    if ok:
        from vllm import _custom_ops as vops

        def v_norm(inp):
            out = torch.empty_like(inp["x"])
            return lambda: vops.rms_norm(out, inp["x"], inp["w"], EPS)

        provs.append(H.Provider("vllm", v_norm, ops=("rms_norm",)))
        provs.append(H.Provider("vllm", lambda inp: (lambda: vops.fused_add_rms_norm(
            inp["x"], inp["r"], inp["w"], EPS)), note="in place", ops=("fused_add_rms_norm",)))
    else:
        notes.append(why)
    return provs, notes


def main(argv=None) -> int:
    return H.script_main(__doc__, "rms_norm / fused_add_rms_norm", providers, cases, argv)


if __name__ == "__main__":
    sys.exit(main())
