"""Decode attention (one new query token per sequence, GQA) over the KV cache: llmkern's paged flash-decoding
against eager ``scaled_dot_product_attention`` over HF's contiguous ``[B, Hkv, L, D]`` cache (and torch.compile;
flash-attn, FlashInfer and vLLM on CUDA).

llmkern's cache is paged NHD ``[num_blocks, 16, Hkv, D]`` with shuffled page ids (as an allocator leaves them);
``max_seq_len`` is passed so no host sync happens (CUDA-graph capturable). If ``llmkern.paged_ops`` is not
importable, only eager SDPA is timed and the header says so.
Decode attention is memory-bound. Minimal bytes moved (s = element size): reads all K and V once, reads q, writes out:
    2*B*L*Hkv*D*s + 2*B*Hq*D*s          (block tables and seq_lens are not counted)
Sweep (full): contexts 1k..128k x batch 1..64 x the head layouts of Qwen2.5-0.5B, Qwen2.5-7B, Llama-2-7B,
Llama-3-8B; cases whose caches do not fit in memory are skipped with a note.

    python benchmarks/bench_decode_attention.py --quick
    python benchmarks/bench_decode_attention.py --contexts 8k,32k --batches 1,8 --layouts qwen2.5-0.5b,llama-3-8b
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _harness as H  # noqa: E402

LAYOUTS = {"qwen2.5-0.5b": (14, 2, 64), "qwen2.5-7b": (28, 4, 128), "llama-2-7b": (32, 32, 128),
           "llama-3-8b": (32, 8, 128)}
CONTEXTS = [1024, 4096, 16384, 32768, 65536, 131072]
BATCHES = [1, 4, 16, 64]
QUICK = ([1024, 8192], [1, 4], ["qwen2.5-0.5b", "llama-3-8b"])
DRY = ([100], [2], ["qwen2.5-0.5b"])
BLOCK = 16


def paged_ops_module():
    try:
        from llmkern import paged_ops

        paged_ops.paged_decode_attention  # noqa: B018
    except (ImportError, AttributeError) as e:
        return None, f"llmkern.paged_ops not importable yet ({e}): benchmarking eager SDPA only"
    return paged_ops, ""


def cases(args):
    contexts, batches, layouts = DRY if args.dry_run else QUICK if args.quick else (CONTEXTS, BATCHES, list(LAYOUTS))
    contexts = getattr(args, "contexts", None) or contexts  # the script's own flags (add_args)
    batches = getattr(args, "batches", None) or batches
    layouts = getattr(args, "layouts", None) or layouts
    dt, dev = args.torch_dtype, args.device
    s = H.esize(dt)
    out = []
    for name in layouts:
        Hq, Hkv, D = LAYOUTS[name]
        for B in batches:
            for L in contexts:
                nb = H.ceil_div(L, BLOCK)

                def make(B=B, L=L, Hq=Hq, Hkv=Hkv, D=D, nb=nb):
                    g = torch.Generator(device=dev).manual_seed(0)
                    q = torch.randn(B, Hq, D, dtype=dt, device=dev, generator=g)
                    k = torch.randn(B, Hkv, L, D, dtype=dt, device=dev, generator=g)  # HF DynamicCache layout
                    v = torch.randn(B, Hkv, L, D, dtype=dt, device=dev, generator=g)
                    return {"q": q, "k": k, "v": v, "L": L, "scale": 1 / math.sqrt(D),
                            "perm": torch.randperm(B * nb, generator=torch.Generator().manual_seed(0))}
                kv = 2 * B * L * Hkv * D * s
                out.append(H.Case("decode_attention", f"{name} B={B} L={H.human_tokens(L)} H={Hq}/{Hkv} D={D}",
                                  kv + 2 * B * Hq * D * s, make, x=L, series=f"{name} B={B}",
                                  footprint=3 * kv))  # contiguous + paged copy + eager's temporaries
    return out


def to_pages(k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor, block: int):
    """HF-layout ``[B, Hkv, L, D]`` K/V into NHD pages ``[B*nb, block, Hkv, D]`` at the page ids ``perm``; returns
    the caches, int32 block tables ``[B, nb]`` and seq_lens ``[B]``."""
    B, Hkv, L, D = k.shape
    nb = H.ceil_div(L, block)
    pad = nb * block - L

    def pages(x):
        x = F.pad(x.transpose(1, 2), (0, 0, 0, 0, 0, pad))  # [B, nb*block, Hkv, D]
        x = x.reshape(B * nb, block, Hkv, D)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # NHD pages, contiguous like a real pool
        out[perm.to(x.device)] = x
        return out
    bt = perm.view(B, nb).to(torch.int32).to(k.device)
    return pages(k), pages(v), bt, torch.full((B,), L, dtype=torch.int32, device=k.device)


def providers(args):
    po, why_po = paged_ops_module()

    def eager(inp):
        q, k, v, scale = inp["q"].unsqueeze(2), inp["k"], inp["v"], inp["scale"]
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def kern(inp):
        kc, vc, bt, sl = to_pages(inp["k"], inp["v"], inp["perm"], BLOCK)
        q, scale, L = inp["q"], inp["scale"], inp["L"]
        return lambda: po.paged_decode_attention(q, kc, vc, bt, sl, scale, max_seq_len=L)

    provs, notes = H.standard_providers(args, eager=eager, llmkern_call=kern if po else None,
                                        eager_note="SDPA enable_gqa over [B,Hkv,L,D]")
    if po is None:
        notes.append(why_po)

    ok, why = H.external("flash_attn", args, "flash-attn")
    if ok:
        from flash_attn import flash_attn_with_kvcache

        def fa(inp):
            # flash-attn's paged KV needs pages of a multiple of 256 tokens.
            B, _, L, _ = inp["k"].shape
            nb = H.ceil_div(L, 256)
            kc, vc, bt, sl = to_pages(inp["k"], inp["v"], torch.randperm(B * nb), 256)
            q = inp["q"].unsqueeze(1)  # [B, 1, Hq, D]
            return lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=sl, block_table=bt,
                                                   softmax_scale=inp["scale"])

        provs.append(H.Provider("flash-attn", fa, note="paged, 256-token pages"))
    else:
        notes.append(why)

    ok, why = H.external("flashinfer", args)
    if ok:
        import flashinfer

        def fi(inp):
            kc, vc, bt, sl = to_pages(inp["k"], inp["v"], inp["perm"], BLOCK)
            B, nb = bt.shape
            L, (Hq, D), Hkv = inp["L"], inp["q"].shape[1:], kc.shape[2]
            ws = torch.empty(128 << 20, dtype=torch.uint8, device=kc.device)
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
            indptr = torch.arange(0, B * nb + 1, nb, dtype=torch.int32, device=kc.device)
            last = torch.full((B,), L - (nb - 1) * BLOCK, dtype=torch.int32, device=kc.device)
            w.plan(indptr, bt.reshape(-1), last, Hq, Hkv, D, BLOCK, q_data_type=kc.dtype, kv_data_type=kc.dtype,
                   sm_scale=inp["scale"])
            q = inp["q"]
            return lambda: w.run(q, (kc, vc))

        provs.append(H.Provider("flashinfer", fi, note="BatchDecodeWithPagedKVCacheWrapper NHD, plan outside timing"))
    else:
        notes.append(why)

    ok, why = H.external("vllm", args)
    if ok and H.importable("vllm.vllm_flash_attn"):
        from vllm.vllm_flash_attn import flash_attn_with_kvcache as vfa

        def vl(inp):
            kc, vc, bt, sl = to_pages(inp["k"], inp["v"], inp["perm"], BLOCK)
            q = inp["q"].unsqueeze(1)
            return lambda: vfa(q, kc, vc, cache_seqlens=sl, block_table=bt, softmax_scale=inp["scale"])

        provs.append(H.Provider("vllm", vl, note="vllm_flash_attn, 16-token pages"))
    else:
        notes.append(why or "vllm: vllm.vllm_flash_attn not importable")
    return provs, notes


def _int_list(text: str) -> list[int]:
    try:
        return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (8k = 8192), got {text!r}") from None


def _layout_list(text: str) -> list[str]:
    names = text.split(",")
    bad = [n for n in names if n not in LAYOUTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown layout(s) {bad}; expected some of {list(LAYOUTS)}")
    return names


def add_args(p) -> None:
    p.add_argument("--contexts", type=_int_list, default=None, help="context lengths, e.g. 8k,32k (overrides the preset)")
    p.add_argument("--batches", type=_int_list, default=None, help="batch sizes, e.g. 1,8 (overrides the preset)")
    p.add_argument("--layouts", type=_layout_list, default=None,
                   help=f"head layouts, comma-separated, from {list(LAYOUTS)} (overrides the preset)")


def main(argv=None) -> int:
    return H.script_main(__doc__, "decode attention (paged KV)", providers, cases, argv, add_args)


if __name__ == "__main__":
    sys.exit(main())
