"""SwiGLU: ``silu(gate) * up`` — llmkern against HF's ``act_fn(gate) * up`` (and torch.compile, Liger, FlashInfer,
vLLM on CUDA). Two ops:
  silu_and_mul        gate and up as separate ``[T, I]`` tensors (HF's gate_proj / up_proj outputs);
  silu_and_mul_fused  one ``[T, 2I]`` gate|up tensor (a fused gate_up projection; FlashInfer's and vLLM's input).
Minimal bytes moved (s = element size): reads gate and up, writes out:  3*T*I*s
Sweep (full): tokens 1..16k x the intermediate sizes of SmolLM2-135M (1536), Qwen2.5-0.5B (4864), Llama-2-7B
(11008), Llama-3-8B (14336), Qwen2.5-7B (18944).

    python benchmarks/bench_swiglu.py --quick
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness as H  # noqa: E402

TOKENS = [1, 16, 128, 1024, 4096, 16384]
INTER = [1536, 4864, 11008, 14336, 18944]
QUICK = ([1, 128, 2048], [4864, 14336])
DRY = ([3], [1536])


def cases(args):
    tokens, inter = DRY if args.dry_run else QUICK if args.quick else (TOKENS, INTER)
    dt, dev = args.torch_dtype, args.device
    s = H.esize(dt)
    out = []
    for I in inter:
        for T in tokens:
            def make(T=T, I=I, op="silu_and_mul"):
                g = torch.Generator(device=dev).manual_seed(0)
                gu = torch.randn(T, 2 * I, dtype=dt, device=dev, generator=g)
                if op == "silu_and_mul":  # two separate allocations, like two Linear outputs
                    return {"_op": op, "gate": gu[:, :I].clone(), "up": gu[:, I:].clone()}
                return {"_op": op, "gate_up": gu}
            shape = f"T={H.human_tokens(T)} I={I}"
            foot = 6 * T * I * s
            out.append(H.Case("silu_and_mul", shape, 3 * T * I * s, make, x=T, series=f"I={I}", footprint=foot))
            out.append(H.Case("silu_and_mul_fused", shape, 3 * T * I * s,
                              lambda make=make: make(op="silu_and_mul_fused"), x=T, series=f"I={I}",
                              footprint=foot))
    return out


def providers(args):
    import llmkern.ops as L
    from transformers.activations import ACT2FN

    # LlamaMLP computes `self.act_fn(self.gate_proj(x)) * self.up_proj(x)` with act_fn = ACT2FN["silu"], a module:
    # its call is part of what a patched MLP (one ops.silu_and_mul call) replaces, so the baseline pays it too.
    act_fn = ACT2FN["silu"]

    def eager(inp):
        if inp["_op"] == "silu_and_mul":
            gate, up = inp["gate"], inp["up"]
            return lambda: act_fn(gate) * up
        gu = inp["gate_up"]

        def fused():
            gate, up = gu.chunk(2, dim=-1)
            return act_fn(gate) * up
        return fused

    def kern(inp):
        if inp["_op"] == "silu_and_mul":
            gate, up = inp["gate"], inp["up"]
            return lambda: L.silu_and_mul(gate, up)
        gu = inp["gate_up"]
        return lambda: L.silu_and_mul_fused(gu)

    provs, notes = H.standard_providers(args, eager=eager, llmkern_call=kern,
                                        eager_note='ACT2FN["silu"](gate) * up, as LlamaMLP')

    ok, why = H.external("liger_kernel", args, "liger")
    if ok:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        provs.append(H.Provider("liger", lambda inp: (lambda: LigerSiLUMulFunction.apply(inp["gate"], inp["up"])),
                                ops=("silu_and_mul",)))
    else:
        notes.append(why)

    ok, why = H.external("flashinfer", args)
    if ok:
        import flashinfer

        provs.append(H.Provider("flashinfer", lambda inp: (lambda: flashinfer.activation.silu_and_mul(
            inp["gate_up"])), ops=("silu_and_mul_fused",)))
    else:
        notes.append(why)

    ok, why = H.external("vllm", args)
    if ok:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

        def vl(inp):
            gu = inp["gate_up"]
            out = torch.empty(gu.shape[0], gu.shape[1] // 2, dtype=gu.dtype, device=gu.device)
            return lambda: torch.ops._C.silu_and_mul(out, gu)

        provs.append(H.Provider("vllm", vl, ops=("silu_and_mul_fused",)))
    else:
        notes.append(why)
    return provs, notes


def main(argv=None) -> int:
    return H.script_main(__doc__, "silu_and_mul (SwiGLU)", providers, cases, argv)


if __name__ == "__main__":
    sys.exit(main())
