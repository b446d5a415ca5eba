"""Decode timings of llama.cpp on a GGUF model, for ``bench_e2e.py``'s ``llama.cpp`` provider. It runs in the Python
that has ``llama-cpp-python`` installed — usually a venv of its own (llama.cpp is never a dependency of llmkern) —
and prints one JSON object on stdout.

    <python with llama-cpp-python> benchmarks/_llamacpp_runner.py --gguf model.gguf --ftype f32 --ctx 128 --steps 16

How a decode step is timed, to match ``bench_e2e.decode_steps``: a prompt of ``ctx`` random token ids is evaluated
(the prefill, reported apart), then each step evaluates one token and picks the next greedily from its logits; a
step is the wall time from one pick to the next. ``--ftype`` re-quantizes the GGUF once with llama.cpp's own
quantizer (F32 / F16 / BF16 from the package's Q4_1 file: the same dequantized values HF loads), cached beside
``--cache-dir``.

``--score FILE`` (for ``bench_kv_quality.py``) instead scores a text with the f16 KV cache and with a q8_0 one: FILE
is JSON ``{"ids", "prompts", "new_tokens", "chunk"}``; the output gives, per cache type, the perplexity of ``ids``
evaluated ``chunk`` tokens at a time, and for q8_0 the share of steps whose argmax equals the f16 cache's greedy
continuation of each prompt, fed back one token at a time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import time

FTYPES = {"f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16"}


def converted(llama_cpp, src: str, ftype: str, cache_dir: str, threads: int) -> str:
    if ftype == "source":
        return src
    os.makedirs(cache_dir, exist_ok=True)
    dst = os.path.join(cache_dir, f"{os.path.splitext(os.path.basename(src))[0]}.{ftype}.gguf")
    if os.path.exists(dst):
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.allow_requantize = True
    params.nthread = threads
    tmp = dst + ".partial"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {ftype}) failed with {rc}")
    os.replace(tmp, dst)
    return dst


def _llama(llama_cpp, path: str, n_ctx: int, n_batch: int, threads: int, kv_type: str, logits_all: bool):
    kv = {}
    if kv_type == "q8_0":
        kv = dict(type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0, flash_attn=True)
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False, **kv)


def score(llama_cpp, np, path: str, args) -> int:
    with open(args.score) as f:
        job = json.load(f)
    ids, prompts, new, chunk = job["ids"], job["prompts"], job["new_tokens"], job["chunk"]
    out: dict = {"model": os.path.basename(path), "llama_cpp": getattr(llama_cpp, "__version__", "?")}
    greedy: list[list[int]] = []
    for kv in ("f16", "q8_0"):
        t0 = time.perf_counter()
        llm = _llama(llama_cpp, path, len(ids) + 8, chunk, args.threads, kv, True)
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll = -float(np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))
        del llm
        n_vocab = None
        agree = total = 0
        for i, prompt in enumerate(prompts):
            llm = _llama(llama_cpp, path, len(prompt) + new + 8, 512, args.threads, kv, False)
            n_vocab = n_vocab or llm.n_vocab()
            last = lambda: np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))
            llm.eval(prompt)
            if kv == "f16":  # the baseline's own greedy continuation
                seq = []
                for _ in range(new):
                    seq.append(int(np.argmax(last())))
                    llm.eval([seq[-1]])
                greedy.append(seq)
            else:  # fed the baseline's tokens, one at a time
                for tok in greedy[i]:
                    agree += int(np.argmax(last())) == tok
                    total += 1
                    llm.eval([tok])
            del llm
        out[kv] = {"ppl": float(np.exp(nll)), "agree": agree / total if total else None,
                   "seconds": time.perf_counter() - t0}
    print(json.dumps(out))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="the GGUF file to run")
    p.add_argument("--ftype", choices=[*FTYPES, "source"], default="f32",
                   help="weights' type: re-quantize to f32/f16/bf16, or run the file as it is (default: f32)")
    p.add_argument("--ctx", type=int, required=True, help="prompt tokens")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed (default: 16)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    p.add_argument("--kv-type", choices=["f16", "q8_0"], default="f16",
                   help="the KV cache's type: llama.cpp's default f16, or q8_0 for K and V (turns flash attention "
                        "on: llama.cpp needs it for a quantized V cache)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "llmkern", "gguf"),
                   help="where re-quantized files are kept (default: ~/.cache/llmkern/gguf)")
    p.add_argument("--score", default=None, metavar="FILE", help="score a text instead of timing (module docstring)")
    args = p.parse_args()

    import llama_cpp
    import numpy as np

    path = converted(llama_cpp, args.gguf, args.ftype, args.cache_dir, args.threads)
    if args.score:
        return score(llama_cpp, np, path, args)
    kv = {}
    if args.kv_type == "q8_0":
        kv = dict(type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0, flash_attn=True)
    llm = llama_cpp.Llama(model_path=path, n_ctx=args.ctx + args.steps + 8, n_batch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=False, verbose=False, **kv)
    n_vocab = llm.n_vocab()

    def last_logits():
        # The last evaluated token's logits, read from llama.cpp (Llama.scores keeps them only with logits_all).
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))

    rng = random.Random(args.ctx * 31 + 1)
    prompt = [rng.randrange(3, n_vocab) for _ in range(args.ctx)]
    start = time.perf_counter()
    llm.eval(prompt)
    tok = int(np.argmax(last_logits()))
    stamps = [time.perf_counter()]
    for _ in range(args.steps):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
        stamps.append(time.perf_counter())
    gaps = [(b - a) * 1e6 for a, b in zip(stamps, stamps[1:])]
    print(json.dumps({"us": gaps, "prefill_s": stamps[0] - start, "model": os.path.basename(path),
                      "llama_cpp": getattr(llama_cpp, "__version__", "?"), "threads": args.threads,
                      "kv_type": args.kv_type}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
