"""The shared benchmark harness: command line, provider discovery, timing, roofline units, table, CSV and plots.

Every ``benchmarks/bench_*.py`` script builds a list of ``Case`` objects (one shape each, with the op's minimal bytes
moved) and a list of ``Provider`` objects (one implementation each), and hands both to ``run``. The harness:

* times each (case, provider) pair —
  CUDA: ``triton.testing.do_bench`` (it flushes L2 before every call: cold-L2 numbers); cases that move less than
  ``CUDA_GRAPH_BYTES`` are launch-bound and are timed with ``triton.testing.do_bench_cudagraph`` instead (warm L2,
  no launch overhead) when the provider can be captured. The ``timer`` column says which one produced the row.
  CPU: a ``time.perf_counter`` loop after a warm-up; each sample averages enough calls to last >= 1 ms, the
  quantiles are over samples. CPU numbers are warm-cache: a shape that fits in L2/L3 can beat DRAM bandwidth.
* reports µs p20/p50/p80, GB/s = ``case.bytes / p50`` and % of peak: on CUDA the DRAM bandwidth from ``GPU_PEAK_GBPS``
  by device name (unknown device: GB/s only); on CPU the STREAM-like bandwidth measured once per run (``stream``).
* reports every provider's speedup against eager torch measured in the same run on the same case;
* prints a table, appends rows to a CSV, and with ``--plot`` draws one PNG per op next to the CSV.

Nothing here claims a number for hardware it did not run on: the header names the device the numbers were
measured on.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib.util
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_CSV = os.path.join(RESULTS_DIR, "results.csv")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

CSV_COLUMNS = ["timestamp", "op", "provider", "shape", "dtype", "device", "device_name", "threads", "timer",
               "us_p20", "us_p50", "us_p80", "bytes", "gbps", "pct_peak", "peak_gbps", "peak_source",
               "speedup_vs_eager", "tokens_per_s", "versions", "note"]

# Below this many bytes moved, a CUDA case is launch-bound: time it as a CUDA graph (see module docstring).
CUDA_GRAPH_BYTES = 1 << 20

# Peak DRAM bandwidth in GB/s (1e9 B/s) from the vendors' data sheets, matched against torch.cuda.get_device_name()
# in order (first match wins, so the more specific names come first).
GPU_PEAK_GBPS: list[tuple[str, float, str]] = [
    (r"H200", 4800.0, "H200 (HBM3e)"),
    (r"H100.*NVL", 3900.0, "H100 NVL"),
    (r"H100.*PCIe", 2000.0, "H100 PCIe"),
    (r"H100", 3350.0, "H100 SXM (HBM3)"),
    (r"A100.*80\s?GB.*PCI|A100.*PCI.*80\s?GB", 1935.0, "A100 80GB PCIe"),
    (r"A100.*80\s?GB", 2039.0, "A100 80GB SXM"),
    (r"A100", 1555.0, "A100 40GB (SXM/PCIe)"),
    (r"L40S", 864.0, "L40S"),
    (r"\bL4\b", 300.0, "L4"),
    (r"RTX 4090", 1008.0, "RTX 4090"),
    (r"RTX 3090 Ti", 1008.0, "RTX 3090 Ti"),
    (r"RTX 3090", 936.2, "RTX 3090"),
    (r"A10G", 600.0, "A10G"),
    (r"\bT4\b", 320.0, "T4"),
    (r"V100S", 1134.0, "V100S"),
    (r"V100", 900.0, "V100"),
]


def gpu_peak_gbps(name: str) -> tuple[float | None, str]:
    """``(peak GB/s, which table entry)`` for a CUDA device name; ``(None, reason)`` when it is not in the table."""
    for pattern, gbps, label in GPU_PEAK_GBPS:
        if re.search(pattern, name, re.IGNORECASE):
            return gbps, f"datasheet {label}"
    return None, f"{name!r} not in the peak table: GB/s only"


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parser(description: str, *, compile_flag: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--quick", action="store_true", help="a few representative sizes (about a minute)")
    p.add_argument("--dry-run", action="store_true",
                   help="one tiny shape, minimal timing: checks the script end to end in seconds (numbers meaningless)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="element type (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=default_device, help=f"cpu or cuda[:N] (default: {default_device})")
    p.add_argument("--providers", default=None,
                   help="comma-separated provider names to run (default: every provider that can run here; "
                        "eager is always added as the baseline); 'list' prints them and exits")
    if compile_flag:
        p.add_argument("--compile", action="store_true",
                       help="add torch.compile providers (compilation is slow on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads; default: torch's choice). On a shared machine "
                        "fewer threads than cores avoids OpenMP barrier stalls")
    p.add_argument("--csv", default=DEFAULT_CSV, metavar="PATH",
                   help="append result rows to this CSV (default: benchmarks/results/results.csv)")
    p.add_argument("--plot", action="store_true",
                   help="write a PNG per op next to the CSV (needs matplotlib)")
    return p


def finish_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Validate the common flags and fill in device-dependent defaults."""
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False on this machine")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.type == "cuda" else "fp32"
    args.torch_dtype = DTYPES[args.dtype]
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib (pip install matplotlib)")
    if not hasattr(args, "compile"):
        args.compile = False
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Cases and providers


@dataclasses.dataclass
class Case:
    """One shape of one op. ``bytes`` is the op's minimal traffic (documented in each script); ``x`` is the value
    plotted on the x axis and ``series`` groups cases into one line of the plot."""

    op: str
    shape: str
    bytes: int
    make: Callable[[], dict]  # builds the inputs (called once per case, shared by all providers)
    x: float = 0.0
    series: str = ""
    footprint: int = 0  # bytes the case allocates at peak (inputs + outputs + temporaries); 0 = 3 * bytes


@dataclasses.dataclass
class Provider:
    """An implementation. ``build(inputs)`` returns a zero-argument callable that runs the op once on ``inputs``
    (all setup — planning, weight layout — happens in ``build``, outside the timed region)."""

    name: str
    build: Callable[[dict], Callable[[], object]]
    note: str = ""
    ops: tuple = ()  # restrict to these ops (empty = all ops of the script)
    # A provider timed in another process (a peer library in its own Python environment): ``measure(inputs)``
    # returns ``((p20, p50, p80) µs, note)`` measured there with the same method; ``build`` is then not called.
    measure: Callable[[dict], tuple[tuple[float, float, float], str]] | None = None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def llmkern_backends(device: torch.device, requested: str | None = None) -> tuple[list[str], list[str]]:
    """llmkern backends that can run on ``device`` now (asked at run time: ``BACKENDS`` grows), and notes on the rest.

    The Triton backend on CPU runs in the interpreter, which is a correctness tool, not a timing one: it is left out
    unless asked for by name (``--providers llmkern-triton``)."""
    from llmkern import backends

    ok, notes = [], []
    for name in backends.BACKENDS:
        try:
            good, why = backends.available(name, device)
        except Exception as e:  # a backend being added may raise for devices it does not know
            good, why = False, f"{type(e).__name__}: {e}"
        if not good:
            notes.append(f"llmkern-{name}: not available on {device.type} ({why})")
        elif name == "triton" and device.type == "cpu" and "llmkern-triton" not in (requested or "").split(","):
            notes.append("llmkern-triton: CPU tensors run in the Triton interpreter (TRITON_INTERPRET=1), far too "
                         "slow to time; left out unless named in --providers")
        else:
            ok.append(name)
    return ok, notes


def with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with every llmkern op forced onto ``backend`` (and checked to have run there once)."""
    import llmkern

    def call():
        with llmkern.use_backend(backend):
            return fn()

    with llmkern.track() as t:
        call()
    ran = {b for (_o, b), n in t.items() if n}
    if ran and ran != {backend}:
        raise RuntimeError(f"asked for llmkern backend {backend!r} but {sorted(ran)} ran")
    return call


def select_providers(all_providers: list[Provider], requested: str | None, notes: list[str],
                     extra_known: dict[str, str] | None = None) -> list[Provider]:
    """Filter by ``--providers``; 'eager' always stays (it is the baseline of the speedup column). A requested name
    that cannot run here is an error that says why, not a silent skip."""
    if requested is None:
        return all_providers
    names = [n.strip() for n in requested.split(",") if n.strip()]
    known = {p.name: p for p in all_providers}
    out = []
    for n in names:
        if n in known:
            out.append(known[n])
        else:
            why = [m for m in notes if m.startswith(n + ":")] or (extra_known or {}).get(n)
            raise SystemExit(f"--providers: {n!r} cannot run here: "
                             f"{why[0] if isinstance(why, list) else why or 'unknown provider'}; "
                             f"available: {', '.join(known)}")
    if "eager" not in [p.name for p in out] and "eager" in known:
        out.insert(0, known["eager"])
    return out


def standard_providers(args, *, eager: Callable[[dict], Callable], llmkern_call: Callable[[dict], Callable] | None,
                       ops: tuple = (), eager_note: str = "") -> tuple[list[Provider], list[str]]:
    """eager (the baseline), one provider per llmkern backend that can run on the device, and torch.compile of the
    eager code with ``--compile``. Returns ``(providers, notes about what cannot run here)``."""
    notes: list[str] = []
    provs = [Provider("eager", eager, note=eager_note, ops=ops)]
    if llmkern_call is not None:
        names, bnotes = llmkern_backends(args.device, args.providers)
        notes += bnotes
        for b in names:
            provs.append(Provider(f"llmkern-{b}", lambda inp, b=b: with_backend(b, llmkern_call(inp)), ops=ops))
    if args.compile:
        provs.append(Provider("torch.compile", lambda inp: compile_fn(eager(inp), args.device),
                              note="torch.compile of the eager code", ops=ops))
    else:
        notes.append("torch.compile: off (pass --compile)")
    return provs, notes


def external(module: str, args, label: str | None = None) -> tuple[bool, str]:
    """Whether a third-party kernel library can be benchmarked here, and if not, why (for the header)."""
    label = label or module
    if args.device.type != "cuda":
        return False, f"{label}: CUDA-only" + ("" if importable(module) else ", and not installed")
    if not importable(module):
        return False, f"{label}: not installed"
    return True, ""


def compile_fn(fn: Callable, device: torch.device) -> Callable:
    # dynamic=False: one graph per shape, which is what a fixed-shape benchmark times.
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------------------------------------
# Environment: header, versions, bandwidth


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def versions() -> str:
    parts = [f"torch={torch.__version__}"]
    for mod in ("triton", "transformers", "llmkern"):
        try:
            m = __import__(mod)
            parts.append(f"{mod}={getattr(m, '__version__', '?')}")
        except ImportError:
            parts.append(f"{mod}=absent")
    if torch.version.cuda:
        parts.append(f"cuda={torch.version.cuda}")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        if sha:
            # Uncommitted edits to the package's code change what was measured: say so in every row.
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "llmkern", "kernels",
                                    "csrc"], capture_output=True, text=True, timeout=5,
                                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
            parts.append(f"git={sha}" + ("+uncommitted(llmkern/kernels/csrc)" if dirty else ""))
    except (OSError, subprocess.SubprocessError):
        pass
    return " ".join(parts)


def mem_available(device: torch.device) -> int:
    """Bytes a case may allocate: 80 % of what is free now."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.8 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 8 << 30


_STREAM_CACHE: dict = {}


def stream(device: torch.device, dry_run: bool = False) -> dict:
    """STREAM-like bandwidth of this machine, measured once per process: ``copy`` (a = b, 2 arrays of traffic) and
    ``triad`` (a = b + s*c, 3 arrays), each over 64 MiB fp32 arrays (larger than any CPU's L3 here), best of N, in
    STREAM's convention (write-allocate traffic not counted). The peak used for % is the better of the two."""
    key = (str(device), dry_run)
    if key in _STREAM_CACHE:
        return _STREAM_CACHE[key]
    n = (1 << 22) if dry_run else (1 << 24)  # 16 MiB arrays in a dry run (not a bandwidth measurement), else 64 MiB
    reps = 3 if dry_run else 10
    a = torch.empty(n, device=device)
    b = torch.rand(n, device=device)
    c = torch.rand(n, device=device)

    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t_copy = best(lambda: a.copy_(b))
    t_triad = best(lambda: torch.add(b, c, alpha=3.0, out=a))
    res = {"copy": 2 * 4 * n / t_copy / 1e9, "triad": 3 * 4 * n / t_triad / 1e9, "mib": 4 * n >> 20,
           "dry_run": dry_run}
    res["peak"] = max(res["copy"], res["triad"])
    _STREAM_CACHE[key] = res
    return res


def peak(device: torch.device, dry_run: bool) -> tuple[float | None, str]:
    if device.type == "cuda":
        return gpu_peak_gbps(torch.cuda.get_device_name(device))
    s = stream(device, dry_run)
    return s["peak"], f"stream measured here ({'dry run, small arrays' if dry_run else 'copy/triad best'})"


def header(title: str, args, notes: list[str], timer: str | None = None) -> str:
    dev = args.device
    lines = [f"== {title} ==",
             f"measured here on: {dev.type}: {device_name(dev)}"]
    if dev.type == "cpu":
        s = stream(dev, args.dry_run)
        lines[-1] += f" ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"
        lines.append(f"stream bandwidth measured here: copy {s['copy']:.1f} GB/s, triad {s['triad']:.1f} GB/s "
                     f"({s['mib']} MiB fp32 arrays{', dry run: not a real measurement' if s['dry_run'] else ''}); "
                     f"% peak below is against {s['peak']:.1f} GB/s")
        lines.append(f"timer: {timer or 'perf_counter loop, warm caches'} (no GPU was used; these are CPU numbers)")
        try:
            load = os.getloadavg()
            lines.append(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                         f"(above {os.cpu_count()} means other work shared the CPU: numbers are not final)")
        except OSError:
            pass
    else:
        pk, src = gpu_peak_gbps(torch.cuda.get_device_name(dev))
        lines[-1] += f" (CUDA {torch.version.cuda})"
        lines.append(f"peak DRAM bandwidth: {f'{pk:.0f} GB/s ({src})' if pk else src}")
        lines.append(timer or f"timer: triton do_bench with L2 flush (cold L2); cases under "
                     f"{CUDA_GRAPH_BYTES >> 10} KiB moved: CUDA graph replay (warm L2)")
    lines.append(f"dtype {args.dtype}   {versions()}")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


def time_cpu(fn: Callable[[], object], *, budget_s: float, min_samples: int = 5,
             max_samples: int = 200) -> tuple[float, float, float]:
    """µs (p20, p50, p80) of one call of ``fn`` on CPU."""
    fn()  # first call: allocations, lazy init
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(1e-3 / one))  # each sample lasts >= 1 ms so the timer's resolution does not matter
    warm_until = time.perf_counter() + min(0.1 * budget_s, 10 * one * inner)
    while time.perf_counter() < warm_until:
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < max_samples and (len(samples) < min_samples or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return _quantiles(samples)


def cpu_timing(args) -> tuple[float, int]:
    """``time_cpu``'s (budget_s, min_samples) for this run's mode (--dry-run, --quick, full); a provider timed in
    another process (``Provider.measure``) passes the same on."""
    return (0.05 if args.dry_run else (0.25 if args.quick else 0.6)), (3 if args.dry_run else 5)


def time_cuda(fn: Callable[[], object], *, nbytes: int, quick: bool, dry_run: bool) -> tuple[tuple, str]:
    """µs (p20, p50, p80) of one call of ``fn`` on CUDA, and the timer used."""
    import triton.testing

    q = [0.2, 0.5, 0.8]
    rep = 5 if dry_run else (40 if quick else 100)
    if nbytes < CUDA_GRAPH_BYTES:
        try:
            ms = triton.testing.do_bench_cudagraph(fn, rep=rep, quantiles=q)
            return tuple(1e3 * m for m in ms), "cudagraph"
        except Exception:  # providers that sync with the host (.item()) cannot be captured
            torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=max(5, rep // 4), rep=rep, quantiles=q)
    return tuple(1e3 * m for m in ms), "do_bench-coldL2"


# ---------------------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """tqdm when importable, else a plain counter on stderr."""

    def __init__(self, total: int, desc: str):
        self.total, self.n, self.desc = total, 0, desc
        self.bar = None
        if importable("tqdm"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def step(self, label: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {self.desc}: {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------------------
# Running, table, CSV, plots


@dataclasses.dataclass
class Row:
    op: str
    provider: str
    shape: str
    us: tuple[float, float, float]
    bytes: int
    timer: str
    gbps: float | None = None
    pct_peak: float | None = None
    speedup: float | None = None
    tokens_per_s: float | None = None
    note: str = ""
    x: float = 0.0
    series: str = ""


def run(title: str, args, cases: list[Case], providers: list[Provider], notes: list[str],
        after_case: Callable[[dict[str, "Row"]], None] | None = None) -> list[Row]:
    """Time every provider on every case; print the table, write the CSV (and plots). Returns the rows.
    ``after_case(rows_by_provider)`` may annotate one case's rows (e.g. ratios between providers) before they are
    printed and written."""
    if args.providers == "list":
        for p in providers:
            print(f"{p.name}{'  (' + p.note + ')' if p.note else ''}")
        for n in notes:
            print(f"[not here] {n}")
        raise SystemExit(0)
    print(header(title, args, notes), flush=True)
    pk, pk_src = peak(args.device, args.dry_run)
    budget, min_samples = cpu_timing(args)
    limit = mem_available(args.device)

    runnable = []
    for c in cases:
        need = c.footprint or 3 * c.bytes
        if need > limit:
            print(f"skipped {c.op} {c.shape}: needs about {need / 2**30:.1f} GiB, {limit / 2**30:.1f} GiB available",
                  flush=True)
        else:
            runnable.append(c)
    pairs = [(c, p) for c in runnable for p in providers if not p.ops or c.op in p.ops]
    bar = Progress(len(pairs), title)
    rows: list[Row] = []
    failures: list[str] = []
    for c in runnable:
        inputs = c.make()
        case_rows: dict[str, Row] = {}
        for p in providers:
            if p.ops and c.op not in p.ops:
                continue
            bar.step(f"{c.shape} {p.name}")
            note = p.note
            try:
                if p.measure is not None:  # timed in another process, with time_cpu and this run's budget
                    us, extra = p.measure(inputs)
                    us, timer, note = tuple(us), "perf_counter(peer)", "; ".join(n for n in (p.note, extra) if n)
                elif args.device.type == "cuda":
                    us, timer = time_cuda(p.build(inputs), nbytes=c.bytes, quick=args.quick, dry_run=args.dry_run)
                else:
                    us = time_cpu(p.build(inputs), budget_s=budget, min_samples=min_samples)
                    timer = "perf_counter"
            except Exception as e:  # one provider failing must not hide the others' numbers
                msg = f"{p.name} on {c.op} {c.shape}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                failures.append(msg)
                continue
            r = Row(c.op, p.name, c.shape, us, c.bytes, timer, note=note, x=c.x, series=c.series)
            r.gbps = c.bytes / (us[1] * 1e-6) / 1e9 if c.bytes else None
            r.pct_peak = 100.0 * r.gbps / pk if (pk and r.gbps) else None
            case_rows[p.name] = r
        eager = case_rows.get("eager")
        for r in case_rows.values():
            if eager is not None:
                r.speedup = eager.us[1] / r.us[1]
        if after_case is not None:
            after_case(case_rows)
        rows.extend(case_rows.values())
        del inputs
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    print_table(rows, pk is not None)
    for f in failures:
        print(f"FAILED {f}", file=sys.stderr)
    write_csv(args.csv, rows, args, pk, pk_src)
    if args.plot:
        for path in plot(rows, args, pk, os.path.dirname(os.path.abspath(args.csv))):
            print(f"plot: {path}")
    if failures:
        args.exit_code = 1
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[Row], has_peak: bool) -> None:
    if not rows:
        print("(no rows)")
        return
    cols = ["op", "shape", "provider", "p20 us", "p50 us", "p80 us", "GB/s", "% peak", "vs eager", "timer"]
    data = [[r.op, r.shape, r.provider, _fmt(r.us[0], ".1f"), _fmt(r.us[1], ".1f"), _fmt(r.us[2], ".1f"),
             _fmt(r.gbps, ".1f"), _fmt(r.pct_peak, ".0f") if has_peak else "-",
             _fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""), r.timer] for r in rows]
    widths = [max(len(c), *(len(d[i]) for d in data)) for i, c in enumerate(cols)]
    left = {0, 1, 2, 9}
    line = "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    print(line)
    print("-" * len(line))
    prev = None
    for d in data:
        key = (d[0], d[1])
        if prev is not None and key != prev:
            print()
        prev = key
        print("  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(d, widths))))


def write_csv(path: str, rows: list[Row], args, pk: float | None, pk_src: str) -> None:
    """Append ``rows`` to ``path``. A file with another header is left alone and the rows go to a new file."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            first = next(csv.reader(f), [])
        if first != CSV_COLUMNS:
            base, ext = os.path.splitext(path)
            path = f"{base}-{datetime.datetime.now():%Y%m%d-%H%M%S}{ext or '.csv'}"
            print(f"note: {args.csv} has a different header; writing to {path}", file=sys.stderr)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    ts = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ver = versions()
    dev_name = device_name(args.device)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([ts, r.op, r.provider, r.shape, args.dtype, str(args.device), dev_name, torch.get_num_threads(),
                        r.timer, f"{r.us[0]:.3f}", f"{r.us[1]:.3f}", f"{r.us[2]:.3f}", r.bytes,
                        "" if r.gbps is None else f"{r.gbps:.3f}",
                        "" if r.pct_peak is None else f"{r.pct_peak:.2f}",
                        "" if pk is None else f"{pk:.1f}", pk_src,
                        "" if r.speedup is None else f"{r.speedup:.3f}",
                        "" if r.tokens_per_s is None else f"{r.tokens_per_s:.3f}",
                        ver, ("dry-run; " if args.dry_run else "") + r.note])
    print(f"{len(rows)} rows appended to {path}")


def plot(rows: list[Row], args, pk: float | None, out_dir: str, *, y: str = "gbps") -> list[str]:
    """One PNG per op: GB/s against bytes moved (log x), one line per (provider, series); the peak as a dashed line.
    ``y="ms"``: per-call milliseconds against ``x`` instead (end to end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for op in dict.fromkeys(r.op for r in rows):
        fig, ax = plt.subplots(figsize=(8, 5))
        lines: dict = {}
        for r in rows:
            if r.op != op:
                continue
            key = f"{r.provider} {r.series}".strip()
            xv = r.bytes if y == "gbps" else r.x
            yv = r.gbps if y == "gbps" else r.us[1] / 1e3
            if yv is not None:
                lines.setdefault(key, []).append((xv, yv))
        for key, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
        ax.set_xscale("log", base=2)
        if y == "gbps":
            ax.set_xlabel("bytes moved per call (minimal)")
            ax.set_ylabel("GB/s")
            if pk:
                ax.axhline(pk, ls="--", color="gray", label=f"peak {pk:.0f} GB/s")
        else:
            ax.set_xlabel("context tokens")
            ax.set_ylabel("ms per decode step")
        ax.set_title(f"{op} — {args.dtype} — measured on {args.device.type}: {device_name(args.device)}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        path = os.path.join(out_dir, f"{op}_{args.device.type}_{args.dtype}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def script_main(doc: str, title: str, providers, cases, argv=None, add_args=None) -> int:
    """The whole ``main`` of an op-family script: parse the common flags (plus the script's own, added by
    ``add_args(parser)``), pick providers, run, exit code."""
    p = parser(doc)
    if add_args is not None:
        add_args(p)
    args = finish_args(p, p.parse_args(argv))
    provs, notes = providers(args)
    provs = select_providers(provs, None if args.providers == "list" else args.providers, notes)
    run(title, args, cases(args), provs, notes)
    return main_exit(args)


def main_exit(args) -> int:
    return getattr(args, "exit_code", 0)


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def human_tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["Case", "Provider", "Row", "parser", "finish_args", "run", "llmkern_backends", "with_backend",
           "select_providers", "importable", "compile_fn", "esize", "human_tokens", "ceil_div", "main_exit",
           "gpu_peak_gbps", "math"]
