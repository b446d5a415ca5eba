"""RoPE on q and k: llmkern's one-launch kernel against HF's ``apply_rotary_pos_emb`` (and torch.compile, Liger,
FlashInfer, vLLM on CUDA).

Inputs are what HF's attention hands over: q ``[1, Hq, T, D]`` and k ``[1, Hkv, T, D]`` as transposed views of
``[1, T, H, D]`` projections, cos/sin ``[1, T, D]`` in the model dtype.
Minimal bytes moved (s = element size): reads q, k, cos, sin; writes q', k':
    2*T*(Hq + Hkv)*D*s + 2*T*D*s
Sweep (full): tokens 1..16k x the head layouts of Qwen2.5-0.5B, Qwen2.5-7B, Llama-2-7B, Llama-3-8B.

    python benchmarks/bench_rope.py --quick
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness as H  # noqa: E402

# name -> (Hq, Hkv, D, rope_theta)
LAYOUTS = {
    "qwen2.5-0.5b": (14, 2, 64, 1e6),
    "qwen2.5-7b": (28, 4, 128, 1e6),
    "llama-2-7b": (32, 32, 128, 1e4),
    "llama-3-8b": (32, 8, 128, 5e5),
}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
QUICK = ([1, 128, 2048], ["qwen2.5-0.5b", "llama-3-8b"])
DRY = ([3], ["qwen2.5-0.5b"])


def cos_sin(T: int, D: int, theta: float, dtype, device):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
    f = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().to(dtype)[None], emb.sin().to(dtype)[None]


def cases(args) -> list[H.Case]:
    tokens, layouts = DRY if args.dry_run else QUICK if args.quick else (TOKENS, list(LAYOUTS))
    dt, dev = args.torch_dtype, args.device
    s = H.esize(dt)
    out = []
    for name in layouts:
        Hq, Hkv, D, theta = LAYOUTS[name]
        for T in tokens:
            def make(T=T, Hq=Hq, Hkv=Hkv, D=D, theta=theta):
                g = torch.Generator(device=dev).manual_seed(0)
                q = torch.randn(1, T, Hq, D, dtype=dt, device=dev, generator=g).transpose(1, 2)
                k = torch.randn(1, T, Hkv, D, dtype=dt, device=dev, generator=g).transpose(1, 2)
                cos, sin = cos_sin(T, D, theta, dt, dev)
                return {"q": q, "k": k, "cos": cos, "sin": sin, "theta": theta}
            nbytes = 2 * T * (Hq + Hkv) * D * s + 2 * T * D * s
            out.append(H.Case("apply_rope", f"{name} T={H.human_tokens(T)} H={Hq}/{Hkv} D={D}", nbytes, make,
                              x=T, series=name, footprint=4 * nbytes))
    return out


def providers(args):
    import llmkern.ops as L
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def eager(inp):
        q, k, cos, sin = inp["q"], inp["k"], inp["cos"], inp["sin"]
        return lambda: apply_rotary_pos_emb(q, k, cos, sin)

    def kern(inp):
        q, k, cos, sin = inp["q"], inp["k"], inp["cos"], inp["sin"]
        return lambda: L.apply_rope(q, k, cos, sin)

    provs, notes = H.standard_providers(args, eager=eager, llmkern_call=kern,
                                        eager_note="transformers apply_rotary_pos_emb")

    ok, why = H.external("liger_kernel", args, "liger")
    if ok:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        provs.append(H.Provider("liger", lambda inp: (lambda: liger_rotary_pos_emb(
            inp["q"], inp["k"], inp["cos"], inp["sin"]))))
    else:
        notes.append(why)

    def flat(inp):
        # FlashInfer and vLLM take token-major [T, H*D] q/k, positions and a [max_pos, D] cos|sin cache.
        q, k = inp["q"], inp["k"]
        T, D = q.shape[2], q.shape[3]
        qf = q.transpose(1, 2).reshape(T, -1).contiguous()
        kf = k.transpose(1, 2).reshape(T, -1).contiguous()
        pos = torch.arange(T, device=q.device, dtype=torch.int64)
        half = D // 2
        cache = torch.cat([inp["cos"][0, :, :half], inp["sin"][0, :, :half]], dim=-1)
        return qf, kf, pos, cache, D

    ok, why = H.external("flashinfer", args)
    if ok:
        import flashinfer

        def fi(inp):
            qf, kf, pos, cache, D = flat(inp)
            cache = cache.float()
            return lambda: flashinfer.rope.apply_rope_with_cos_sin_cache(pos, qf, kf, D, cache, is_neox=True)

        provs.append(H.Provider("flashinfer", fi, note="token-major [T, H*D] q/k, fp32 cos|sin cache"))
    else:
        notes.append(why)

    ok, why = H.external("vllm", args)
    if ok:
        from vllm import _custom_ops as vops

        def vl(inp):
            qf, kf, pos, cache, D = flat(inp)
            return lambda: vops.rotary_embedding(pos, qf, kf, D, cache, True)

        provs.append(H.Provider("vllm", vl, note="in place, token-major [T, H*D] q/k"))
    else:
        notes.append(why)
    return provs, notes


def main(argv=None) -> int:
    return H.script_main(__doc__, "apply_rope", providers, cases, argv)


if __name__ == "__main__":
    sys.exit(main())
