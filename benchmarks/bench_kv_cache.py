"""KV-cache write (``reshape_and_cache``): the new tokens' K and V scattered into their pages, llmkern against an
eager ``index_copy_`` into the flattened cache (and torch.compile; vLLM's ``reshape_and_cache_flash`` on CUDA).

Cache layout NHD ``[num_blocks, 16, Hkv, D]``; slots are a random permutation of the pool (pages are not
contiguous in a real allocator). T tokens: T sequences in one decode step, or one prefill chunk of T tokens.
Minimal bytes moved (s = element size): reads key, value and the int64 slots; writes the same K/V bytes:
    4*T*Hkv*D*s + 8*T
Sweep (full): tokens 1..16k x the head layouts of Qwen2.5-0.5B, Qwen2.5-7B, Llama-2-7B, Llama-3-8B.

    python benchmarks/bench_kv_cache.py --quick
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness as H  # noqa: E402

LAYOUTS = {"qwen2.5-0.5b": (2, 64), "qwen2.5-7b": (4, 128), "llama-2-7b": (32, 128), "llama-3-8b": (8, 128)}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
QUICK = ([1, 64, 2048], ["qwen2.5-0.5b", "llama-3-8b"])
DRY = ([5], ["qwen2.5-0.5b"])
BLOCK = 16


def paged_ops_module():
    try:
        from llmkern import paged_ops
    except ImportError as e:
        return None, f"llmkern.paged_ops not importable ({e}): llmkern providers left out"
    return paged_ops, ""


def cases(args):
    tokens, layouts = DRY if args.dry_run else QUICK if args.quick else (TOKENS, list(LAYOUTS))
    dt, dev = args.torch_dtype, args.device
    s = H.esize(dt)
    out = []
    for name in layouts:
        Hkv, D = LAYOUTS[name]
        for T in tokens:
            blocks = max(64, 2 * H.ceil_div(T, BLOCK))  # a pool twice the size needed, slots spread over it

            def make(T=T, Hkv=Hkv, D=D, blocks=blocks):
                g = torch.Generator(device="cpu").manual_seed(0)
                slots = torch.randperm(blocks * BLOCK, generator=g)[:T].to(dev)
                gd = torch.Generator(device=dev).manual_seed(0)
                return {"key": torch.randn(T, Hkv, D, dtype=dt, device=dev, generator=gd),
                        "value": torch.randn(T, Hkv, D, dtype=dt, device=dev, generator=gd),
                        "k_cache": torch.zeros(blocks, BLOCK, Hkv, D, dtype=dt, device=dev),
                        "v_cache": torch.zeros(blocks, BLOCK, Hkv, D, dtype=dt, device=dev),
                        "slot_mapping": slots}
            nbytes = 4 * T * Hkv * D * s + 8 * T
            out.append(H.Case("reshape_and_cache", f"{name} T={H.human_tokens(T)} Hkv={Hkv} D={D}", nbytes, make,
                              x=T, series=name, footprint=2 * blocks * BLOCK * Hkv * D * s + nbytes))
    return out


def providers(args):
    po, why_po = paged_ops_module()

    def eager(inp):
        k, v, kc, vc, slots = inp["key"], inp["value"], inp["k_cache"], inp["v_cache"], inp["slot_mapping"]
        kf, vf = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])

        def write():
            kf.index_copy_(0, slots, k)
            vf.index_copy_(0, slots, v)
        return write

    def kern(inp):
        k, v, kc, vc, slots = inp["key"], inp["value"], inp["k_cache"], inp["v_cache"], inp["slot_mapping"]
        return lambda: po.reshape_and_cache(k, v, kc, vc, slots)

    provs, notes = H.standard_providers(args, eager=eager, llmkern_call=kern if po else None,
                                        eager_note="index_copy_ into the flattened cache")
    if po is None:
        notes.append(why_po)

    ok, why = H.external("vllm", args)
    if ok:
        from vllm import _custom_ops as vops

        def vl(inp):
            one = torch.ones((), dtype=torch.float32, device=inp["key"].device)
            return lambda: vops.reshape_and_cache_flash(inp["key"], inp["value"], inp["k_cache"], inp["v_cache"],
                                                        inp["slot_mapping"], "auto", one, one)

        provs.append(H.Provider("vllm", vl, note="reshape_and_cache_flash"))
    else:
        notes.append(why)
    notes.append("flashinfer: append_paged_kv_cache takes a different (batch, position) addressing; not benchmarked")
    return provs, notes


def main(argv=None) -> int:
    return H.script_main(__doc__, "reshape_and_cache (KV-cache write)", providers, cases, argv)


if __name__ == "__main__":
    sys.exit(main())
