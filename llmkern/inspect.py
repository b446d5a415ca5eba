"""GPU compile check without a GPU (``python -m llmkern inspect``).

Every Triton kernel module in ``llmkern.kernels`` exposes ``compile_specs()``: one ``CompileSpec`` per launch config
its heuristic picks for the supported models' shapes. This module compiles each spec for real GPU targets (sm_80,
sm_90) with ``triton.compile`` — no device needed — and reads the cubin's resource usage with ``cuobjdump
--dump-resource-usage`` (shipped with Triton): registers, shared memory, LOCAL and STACK bytes; ptxas's own
``-v`` log adds its spill-store/-load counts (CUDA 13 ptxas puts spills in the stack frame, leaving LOCAL at 0, so
LOCAL alone would miss them). It adds the theoretical occupancy those imply. Zero spilled bytes by every measure is
the bar; a spill, a compile error, or a kernel without specs makes ``main`` exit 1.

Specialisation mirrors a real launch: constexprs (including the integer arguments a launch passes as 1, which
Triton turns into constants) come from the spec; pointer arguments are assumed 16-byte aligned (torch allocations
are), unless listed in ``spec.meta["unaligned"]``; integer arguments listed in ``spec.meta["divisible_by_16"]`` are
marked divisible by 16, as Triton marks any integer argument that is a multiple of 16 at launch.

Must run in a process WITHOUT ``TRITON_INTERPRET`` set: under the interpreter ``@triton.jit`` makes interpreted
functions, which cannot be compiled. Results are cached under ``$XDG_CACHE_HOME/llmkern/inspect`` (default
``~/.cache/llmkern/inspect``), keyed by the kernel's source hash (Triton's ``cache_key``, which covers the
``@triton.jit`` functions it calls), the spec, the target and the Triton version.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect as _pyinspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

KERNEL_MODULES = ("rms_norm", "rope", "swiglu", "cache_ops", "paged_attention")
DEFAULT_ARCHS = (80, 90)
_CACHE_FORMAT = 1

# Per-SM limits used for theoretical occupancy (CUDA occupancy calculator, compute capability 8.0 and 9.0).
SM_LIMITS = {
    80: {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 164 * 1024},
    90: {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 228 * 1024},
}
_REG_ALLOC_UNIT = 256  # registers, allocated per warp
_WARP_ALLOC_GRANULARITY = 4  # warps per SM are allocated by 4 (one per SM sub-partition)
_SMEM_ALLOC_UNIT = 128  # bytes
_SMEM_RESERVED_PER_BLOCK = 1024  # bytes the CUDA runtime reserves per block on sm_80+


class CheckUnavailable(RuntimeError):
    """The check cannot run in this process or on this machine."""


class ToolsMissing(CheckUnavailable):
    """ptxas or cuobjdump cannot be found."""


def find_tools() -> dict:
    """Paths of the ptxas and cuobjdump Triton uses (``TRITON_PTXAS_PATH`` etc. are honoured, as Triton does).

    Raises:
        ToolsMissing: either tool is absent or does not run.
    """
    import triton

    tools = {}
    for name in ("ptxas", "cuobjdump"):
        try:
            tool = getattr(triton.knobs.nvidia, name)
        except RuntimeError as e:  # Triton raises "Cannot find <tool>"
            raise ToolsMissing(f"{name} not found ({e}); it ships in triton/backends/nvidia/bin") from None
        tools[name] = tool.path
        tools[name + "_version"] = tool.version
    return tools


def _under_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "no", "off")


# --------------------------------------------------------------------------------------------------------------------
# Discovering kernels and specs


def _is_jit_function(obj) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (JITFunction, InterpretedFunction))


def find_jit_kernels(module) -> list[str]:
    """Names of the ``@triton.jit`` kernels defined in ``module``: launchable entry points, i.e. not the device
    helpers that another ``@triton.jit`` function of the module calls. Works with and without the interpreter."""
    jits = {}
    for name, obj in vars(module).items():
        if _is_jit_function(obj) and getattr(obj.fn, "__module__", None) == module.__name__:
            jits[name] = _pyinspect.getsource(obj.fn)
    called = {
        callee for callee in jits
        for caller, src in jits.items() if caller != callee and re.search(rf"\b{re.escape(callee)}\s*\(", src)
    }
    return sorted(n for n in jits if n not in called)


def scan_modules(modules=None) -> dict:
    """Import each kernel module and describe it: ``{name: {"status", "kernels", "specs", "error"}}``.

    status: ``ok`` (has ``compile_specs``), ``missing`` (module does not exist yet), ``no_compile_specs`` (it has
    kernels but no ``compile_specs``: a failure), ``no_kernels`` (neither), ``error`` (import or
    ``compile_specs()`` raised: a failure). ``specs`` holds the ``CompileSpec`` list when status is ``ok``.
    """
    report = {}
    for m in modules or KERNEL_MODULES:
        full = f"llmkern.kernels.{m}"
        entry = {"status": "ok", "kernels": [], "specs": [], "error": None}
        report[m] = entry
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name == full:
                entry["status"] = "missing"
                continue
            entry.update(status="error", error=f"import failed: {e!r}")
            continue
        except Exception as e:  # a module being written may not import: that is a failure, not a skip
            entry.update(status="error", error=f"import failed: {e!r}")
            continue
        entry["kernels"] = find_jit_kernels(mod)
        if not callable(getattr(mod, "compile_specs", None)):
            entry["status"] = "no_compile_specs" if entry["kernels"] else "no_kernels"
            continue
        try:
            entry["specs"] = list(mod.compile_specs())
        except Exception as e:
            entry.update(status="error", error=f"compile_specs() raised {e!r}")
    return report


# --------------------------------------------------------------------------------------------------------------------
# Compiling one spec and reading its resources


def _ast_source_args(spec):
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` in Triton 3.8: the signature names
    every argument (constexprs typed ``"constexpr"``), constexprs and attrs are keyed by argument-index tuples."""
    fn = spec.fn
    names = list(fn.arg_names)
    unknown = sorted((set(spec.signature) | set(spec.constexprs)) - set(names))
    missing = [a for a in names if a not in spec.signature and a not in spec.constexprs]
    both = sorted(set(spec.signature) & set(spec.constexprs))
    if unknown or missing or both:
        raise ValueError(f"spec does not match {fn.__name__}{tuple(names)}: unknown {unknown}, missing {missing}, "
                         f"in both signature and constexprs {both}")
    signature = {a: "constexpr" if a in spec.constexprs else spec.signature[a] for a in names}
    constexprs = {(names.index(a),): v for a, v in spec.constexprs.items()}
    unaligned = set(spec.meta.get("unaligned", ()))
    divisible = set(spec.meta.get("divisible_by_16", ()))
    attrs = {}
    for a, ty in spec.signature.items():
        if (ty.startswith("*") and a not in unaligned) or a in divisible:
            attrs[(names.index(a),)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _cache_key(spec, arch: int) -> str:
    import triton

    signature, constexprs, attrs = _ast_source_args(spec)
    material = {
        "format": _CACHE_FORMAT,
        "triton": triton.__version__,
        "fn": spec.fn.__name__,
        "source": spec.fn.cache_key,
        "signature": signature,
        "constexprs": sorted((k[0], repr(v)) for k, v in constexprs.items()),
        "attrs": sorted((k[0], repr(v)) for k, v in attrs.items()),
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "maxnreg": getattr(spec, "maxnreg", None),
        "arch": arch,
        "env": {k: os.environ.get(k) for k in ("TRITON_PTXAS_PATH", "TRITON_CUOBJDUMP_PATH", "PTXAS_OPTIONS",
                                               "DISABLE_PTXAS_OPT", "TRITON_DEFAULT_FP_FUSION")},
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llmkern", "inspect")


def parse_resource_usage(text: str) -> dict:
    """``cuobjdump --dump-resource-usage`` output -> ``{function: {"REG": int, "SHARED": int, "LOCAL": int, ...}}``."""
    funcs, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            funcs[current] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            current = None
    return funcs


def occupancy(arch: int, regs: int, smem_bytes: int, num_warps: int) -> dict:
    """Theoretical occupancy on one SM: resident blocks, fraction of the SM's warps, and what limits it.

    ``smem_bytes`` is the block's shared memory including the runtime's per-block reservation.
    """
    lim = SM_LIMITS[arch]
    max_warps = lim["threads"] // 32
    by = {"threads": max_warps // num_warps, "blocks": lim["blocks"]}
    if regs > 0:
        per_warp = -(-regs * 32 // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
        warps = lim["regs"] // per_warp // _WARP_ALLOC_GRANULARITY * _WARP_ALLOC_GRANULARITY
        by["registers"] = warps // num_warps
    if smem_bytes > 0:
        by["shared"] = lim["smem"] // (-(-smem_bytes // _SMEM_ALLOC_UNIT) * _SMEM_ALLOC_UNIT)
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "threads"))
    return {"blocks_per_sm": blocks, "occupancy": blocks * num_warps / max_warps, "limiter": limiter}


# What compile_one measures (and the cache stores); everything else in a row is derived or comes from the spec.
_MEASURED = ("regs", "shared_static", "shared_dynamic", "local", "stack", "spill_stores", "spill_loads", "compile_s")


def _options(spec) -> dict:
    """The compile options a launch of ``spec`` passes: warps, stages and, where the spec sets one, ``maxnreg``."""
    opts = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if getattr(spec, "maxnreg", None) is not None:
        opts["maxnreg"] = spec.maxnreg
    return opts


def compile_one(spec, arch: int, cuobjdump: str) -> dict:
    """Compile ``spec`` for ``sm_<arch>`` and measure it. Raises on compile errors."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _ast_source_args(spec)
    t0 = time.perf_counter()
    # Triton runs ptxas with -v and prints its log when asked: the log's "spill stores" is the authoritative count.
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a Triton cache hit would print no log
        kernel = triton.compile(ASTSource(spec.fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options=_options(spec))
    compile_s = time.perf_counter() - t0
    frames = [tuple(map(int, m)) for m in re.findall(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    funcs = parse_resource_usage(out.stdout)
    name = kernel.metadata.name
    if name not in funcs:
        raise RuntimeError(f"cuobjdump reported no function {name!r}: {out.stdout!r}")
    entry = funcs[name]
    return {
        "regs": entry.get("REG", 0),
        "shared_static": entry.get("SHARED", 0),
        "shared_dynamic": int(kernel.metadata.shared),
        # Every function in the cubin counts: a noinline device function can spill too.
        "local": max(f.get("LOCAL", 0) for f in funcs.values()),
        "stack": max(f.get("STACK", 0) for f in funcs.values()),
        "spill_stores": max((f[1] for f in frames), default=0),
        "spill_loads": max((f[2] for f in frames), default=0),
        "compile_s": round(compile_s, 3),
    }


def derive(row: dict, arch: int) -> dict:
    """Add ``shared`` (the kernel's own shared memory per block) and the occupancy fields to a measured row.

    The CUDA runtime reserves 1 KB of shared memory per block on sm_80 and later; ptxas already counts it in the
    static SHARED of sm_90 cubins that use shared memory (sm_80 cubins leave it out), so it is taken out of
    ``shared`` there and added back, for every arch, in the occupancy.
    """
    static, dynamic = row["shared_static"], row["shared_dynamic"]
    reserved_in_static = _SMEM_RESERVED_PER_BLOCK if arch >= 90 and static >= _SMEM_RESERVED_PER_BLOCK else 0
    shared = static - reserved_in_static + dynamic
    return {"shared": shared,
            **occupancy(arch, row["regs"], shared + _SMEM_RESERVED_PER_BLOCK, row["num_warps"])}


# Work shared with forked workers: (module, spec, arch, cache path, cuobjdump path) per task.
_TASKS: list = []


def _work(i: int):
    _, spec, arch, path, cuobjdump = _TASKS[i]
    try:
        row = compile_one(spec, arch, cuobjdump)
    except Exception as e:  # report, don't abort the whole check
        msg = f"{type(e).__name__}: {e}".strip()
        return i, {"error": msg[:4000]}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, path)
    return i, row


def _problem_row(module, kernel, error):
    return {"module": module, "kernel": kernel, "spec": None, "arch": None, "error": error}


class Progress:
    """tqdm on stderr when importable (as the benchmarks show theirs), else a counter line every ~5%."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.n, self.desc, self.bar, self.enabled = total, 0, desc, None, enabled and total > 0
        self._next = 0
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print(f"{desc}: {total} to compile", file=sys.stderr, flush=True)
            return
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.n >= self._next or self.n == self.total:
            self._next = self.n + max(1, self.total // 20)
            print(f"[{self.n}/{self.total}] {self.desc}: {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(archs=DEFAULT_ARCHS, modules=None, jobs: int | None = None, use_cache: bool = True,
        _scan: dict | None = None, progress: bool = False) -> list[dict]:
    """Compile every spec of ``modules`` (default ``KERNEL_MODULES``) for each arch and return one row per
    (spec, arch): ``module, kernel, spec, arch, num_warps, num_stages, constexprs, regs, shared, shared_static,
    shared_dynamic, local, stack, spill_stores, spill_loads, blocks_per_sm, occupancy, limiter, compile_s, cached,
    error, meta``.

    Rows with ``spec = None`` report module-level problems (a module that does not import, kernels without specs).
    A row fails when its ``error`` is set or it spills (``local``, ``stack``, ``spill_stores`` or ``spill_loads``
    non-zero: see ``spills``).

    Raises:
        CheckUnavailable: ``TRITON_INTERPRET`` is set (kernels are interpreted functions, not compilable).
        ToolsMissing: ptxas or cuobjdump cannot be found.
    """
    import triton

    if _under_interpreter():
        raise CheckUnavailable("llmkern.inspect compiles real GPU code and must run with TRITON_INTERPRET unset "
                               "(under the interpreter @triton.jit functions are not compilable)")
    cuobjdump = find_tools()["cuobjdump"]
    scan = _scan if _scan is not None else scan_modules(modules)
    rows, tasks = [], []
    cdir = cache_dir()
    os.makedirs(cdir, exist_ok=True)
    for m, entry in scan.items():
        if entry["status"] in ("error", "no_compile_specs"):
            why = entry["error"] or "module has @triton.jit kernels but no compile_specs()"
            rows.append(_problem_row(m, None, why))
            continue
        covered = {spec.fn.__name__ for spec in entry["specs"]}
        for k in entry["kernels"]:
            if k not in covered:
                rows.append(_problem_row(m, k, f"kernel {k} has no CompileSpec in {m}.compile_specs()"))
        for spec in entry["specs"]:
            for arch in archs:
                row = {"module": m, "kernel": spec.fn.__name__, "spec": spec.name, "arch": arch,
                       "num_warps": spec.num_warps, "num_stages": spec.num_stages, "maxnreg": spec.maxnreg,
                       "constexprs": dict(spec.constexprs), "signature": dict(spec.signature),
                       "meta": dict(spec.meta), "cached": False, "error": None}
                rows.append(row)
                try:
                    path = os.path.join(cdir, _cache_key(spec, arch) + ".json")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    continue
                if use_cache and os.path.exists(path):
                    try:
                        with open(path) as f:
                            cached = json.load(f)
                        row.update({k: cached[k] for k in _MEASURED}, cached=True)
                        continue
                    except (OSError, ValueError, KeyError):
                        pass  # unreadable or outdated entry: recompile
                tasks.append((row, (m, spec, arch, path, cuobjdump)))

    if tasks:
        jobs = max(1, min(jobs or min(2, os.cpu_count() or 1), len(tasks)))
        _TASKS[:] = [t for _, t in tasks]
        bar = Progress(len(tasks), f"compiling ({jobs} jobs)", progress)

        def done(i, res):
            tasks[i][0].update(res)
            bar.step(f"{tasks[i][0]['spec']} sm_{tasks[i][0]['arch']}")

        # Triton's own compile cache goes to a scratch dir: our cache keeps the results that matter.
        with triton.knobs.cache.scope(), tempfile.TemporaryDirectory(prefix="llmkern-inspect-") as scratch:
            triton.knobs.cache.dir = scratch
            try:
                if jobs == 1 or not hasattr(os, "fork"):
                    for i, res in map(_work, range(len(tasks))):
                        done(i, res)
                else:
                    import multiprocessing as mp

                    # fork: workers inherit the collected specs (and the scratch cache dir) without re-importing.
                    with mp.get_context("fork").Pool(jobs) as pool:
                        for i, res in pool.imap_unordered(_work, range(len(tasks))):
                            done(i, res)
            finally:
                _TASKS.clear()
                bar.close()
    for row in rows:
        if row["spec"] is not None and not row["error"]:
            row.update(derive(row, row["arch"]))
    return rows


def spills(row: dict) -> bool:
    """Whether a compiled row touches local memory. cuobjdump's LOCAL alone misses spills: CUDA 13 ptxas puts them
    in the stack frame (STACK), with LOCAL still 0, so the stack frame and ptxas's spill counts are checked too."""
    return any(row.get(k, 0) > 0 for k in ("local", "stack", "spill_stores", "spill_loads"))


def row_failed(row: dict) -> bool:
    return bool(row.get("error")) or spills(row) or row.get("regs", 0) > 255


# --------------------------------------------------------------------------------------------------------------------
# Coverage: what the specs stand for, and which GPUs the built extension has code for


def extension_archs() -> dict | None:
    """The CUDA code in the built extension ``llmkern._C``: ``{"sass": ["sm_80", ...], "ptx": ["compute_90"]}``
    (cubins run on their arch family; PTX is JIT-compiled by the driver on any newer GPU, e.g. sm_100/sm_120).
    ``{"sass": [], "ptx": []}`` for a CPU-only build, None when the library or cuobjdump cannot be found."""
    import glob

    try:
        cuobjdump = find_tools()["cuobjdump"]
    except ToolsMissing:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    libs = glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd"))
    if not libs:
        return None
    out = {}
    for kind, flag, pat, fmt in (("sass", "--list-elf", r"\.sm_(\d+a?)\.cubin", "sm_{}"),
                                 ("ptx", "--list-ptx", r"\.sm_(\d+a?)\.ptx", "compute_{}")):
        res = subprocess.run([cuobjdump, flag, libs[0]], capture_output=True, text=True)
        found = set(re.findall(pat, res.stdout))
        out[kind] = [fmt.format(a) for a in sorted(found, key=lambda a: int(a.rstrip("a")))]
    return out


def coverage(scan: dict) -> dict:
    """What the compiled specs cover: configs per kernel, generated by each module's launch heuristics over the
    grid of ``llmkern.kernels._layouts`` (SM counts, layouts, batches, contexts)."""
    from llmkern.kernels import _layouts as L

    configs = {}
    for m, e in scan.items():
        for spec in e["specs"]:
            k = f"{m}.{spec.fn.__name__}"
            configs[k] = configs.get(k, 0) + 1
    return {"configs": configs, "sm_counts": list(L.SM_COUNTS), "layouts": [lay.name for lay in L.LAYOUTS],
            "extra_head_layouts": [x[0] for x in L.EXTRA_HEAD_LAYOUTS], "max_batch": L.MAX_BATCH,
            "block_sizes": list(L.BLOCK_SIZES), "dtypes": list(L.DTYPES)}


def _format_coverage(cov: dict, archs, ext) -> str:
    lines = [f"coverage: {sum(cov['configs'].values())} configs, generated by the launch heuristics over "
             f"{len(cov['layouts'])} model layouts (+{len(cov['extra_head_layouts'])} head layouts: "
             f"{', '.join(cov['extra_head_layouts'])}), SM counts {', '.join(map(str, cov['sm_counts']))}, batch "
             f"1..{cov['max_batch']}, contexts up to each layout's max_position_embeddings, "
             f"{'/'.join(cov['dtypes'])}, page sizes {'/'.join(map(str, cov['block_sizes']))}"]
    width = max([len(k) for k in cov["configs"]] + [6])
    lines += [f"  {k:<{width}} {n:>4} configs" for k, n in cov["configs"].items()]
    lines.append(f"archs: Triton kernels compiled here for {', '.join(f'sm_{a}' for a in archs)}; ")
    if ext is None:
        lines[-1] += "CUDA extension: not found or cuobjdump missing"
    elif not ext["sass"] and not ext["ptx"]:
        lines[-1] += "CUDA extension: built without CUDA code"
    else:
        lines[-1] += (f"CUDA extension: SASS {', '.join(ext['sass']) or 'none'}; PTX {', '.join(ext['ptx']) or 'none'}"
                      + (" (JIT-compiled by the driver on newer GPUs)" if ext["ptx"] else
                         " (no PTX: GPUs newer than the SASS archs have no kernel image)"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _format_table(rows: list[dict], archs) -> str:
    specs = {}
    for r in rows:
        if r["spec"] is not None:
            specs.setdefault((r["module"], r["spec"]), {})[r["arch"]] = r
    width = max([len(s) for _, s in specs] + [4])
    head = f"{'spec':<{width}}" + "".join(f" | sm_{a}: {'regs':>4} {'smem':>6} {'spill':>5} {'occ':>4}" for a in archs)
    lines = [head, "-" * len(head)]
    for (_, name), by_arch in specs.items():
        cells = []
        for a in archs:
            r = by_arch.get(a)
            if r is None:
                cells.append(" " * 31)
            elif r.get("error"):
                cells.append(f" | sm_{a}: {'COMPILE ERROR':>22}")
            else:
                mark = "!" if row_failed(r) else " "
                spill = max(r["local"], r["stack"], r["spill_stores"])
                cells.append(f" | sm_{a}: {r['regs']:>4} {r['shared']:>6} {spill:>5}{mark}{r['occupancy']:>4.0%}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _summary(rows, archs, elapsed) -> dict:
    compiled = [r for r in rows if r["spec"] is not None and not r.get("error")]
    failed = [r for r in rows if row_failed(r)]
    out = {
        "specs": len({(r["module"], r["spec"]) for r in rows if r["spec"] is not None}),
        "compiled": len(compiled),
        "cached": sum(1 for r in compiled if r.get("cached")),
        "failures": len(failed),
        "spills": sum(1 for r in compiled if spills(r)),
        "errors": sum(1 for r in rows if r.get("error")),
        "elapsed_s": round(elapsed, 1),
    }
    for a in archs:
        ra = [r for r in compiled if r["arch"] == a]
        if ra:
            out[f"sm_{a}"] = {"max_regs": max(r["regs"] for r in ra), "max_shared": max(r["shared"] for r in ra),
                              "min_occupancy": min(r["occupancy"] for r in ra)}
    return out


def main(argv=None) -> int:
    """``python -m llmkern inspect [--arch 80,90] [--module NAME ...] [--json PATH|-] [--jobs N] [--no-cache] [-q]
    [--no-progress]``.

    Prints the coverage (configs per kernel, SM counts, layouts, archs, and the CUDA extension's SASS/PTX archs),
    a progress bar on stderr while compiling, one line per spec (registers, shared memory bytes, spilled bytes — the largest of LOCAL, STACK and ptxas's
    spill stores — and theoretical occupancy, per arch) and a summary. Exit status: 0 all clean, 1 a spill / compile
    error / kernel without specs, 2 the check cannot run here.
    """
    p = argparse.ArgumentParser(prog="llmkern inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                   help="compute capabilities to compile for, comma-separated (default: %(default)s)")
    p.add_argument("--module", action="append", choices=KERNEL_MODULES,
                   help="only this kernel module; repeat for several (default: all of them)")
    p.add_argument("--json", metavar="PATH",
                   help="also write JSON results to PATH, '-' for stdout with the table on stderr (default: none)")
    p.add_argument("--jobs", type=int, default=None,
                   help="compile processes (default: min(2, cores) = %d here)" % min(2, os.cpu_count() or 1))
    p.add_argument("--no-cache", action="store_true",
                   help=f"recompile everything; results are still written to the cache (default: read the cache, "
                        f"{cache_dir()})")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the coverage and the summary, no per-spec table (default: off)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr while compiling (default: shown whenever anything compiles)")
    args = p.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(",") if a.strip())
    except ValueError:
        p.error(f"--arch takes comma-separated compute capabilities like 80,90, got {args.arch!r}")
    bad = [a for a in archs if a not in SM_LIMITS]
    if bad or not archs:
        p.error(f"--arch must be among {sorted(SM_LIMITS)}, got {args.arch!r}")
    text_out = sys.stderr if args.json == "-" else sys.stdout

    t0 = time.perf_counter()
    try:
        scan = scan_modules(args.module)
        cov = coverage(scan)
        ext = extension_archs()
        print(_format_coverage(cov, archs, ext), file=text_out, flush=True)
        rows = run(archs, jobs=args.jobs, use_cache=not args.no_cache, _scan=scan, progress=not args.no_progress)
    except CheckUnavailable as e:
        print(f"llmkern inspect: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    summary = _summary(rows, archs, elapsed)

    if not args.quiet:
        print(_format_table(rows, archs), file=text_out)
    for r in rows:
        if r["spec"] is None or r.get("error"):
            where = f"{r['module']}" + (f" {r['spec'] or r['kernel'] or ''} sm_{r['arch']}" if r["arch"] else
                                        f" {r['kernel'] or ''}")
            print(f"FAIL {where}: {r['error']}", file=text_out)
    modules = {m: {"status": e["status"], "kernels": e["kernels"], "specs": len(e["specs"]), "error": e["error"]}
               for m, e in scan.items()}
    print(f"{summary['specs']} specs x {len(archs)} archs: {summary['compiled']} compiled "
          f"({summary['cached']} cached), {summary['spills']} spilling, {summary['errors']} errors, "
          f"{summary['elapsed_s']} s; modules: "
          + ", ".join(f"{m} {e['status']}" for m, e in modules.items()), file=text_out)
    if args.json:
        doc = {"ok": summary["failures"] == 0, "archs": list(archs), "summary": summary, "modules": modules,
               "coverage": cov, "extension": ext, "rows": rows}
        text = json.dumps(doc, indent=1, default=repr)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0 if summary["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
