"""GPU compile check without a GPU (docs/design.md "Verifying GPU code without a GPU", check 2).

Every Triton kernel of ``llmkern.kernels``, in every launch config its heuristic picks for the supported models'
shapes (the modules' ``compile_specs()``), compiles for sm_80 and sm_90 with zero spilled (LOCAL) bytes and at most
255 registers. ``llmkern.inspect`` does the compiling; it runs in a subprocess with ``TRITON_INTERPRET`` removed,
because this test process runs the kernels in the interpreter, where ``@triton.jit`` functions cannot be compiled.
Results are cached (``~/.cache/llmkern/inspect``), so only changed kernels are recompiled.
"""

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from llmkern import inspect as ki

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    try:
        ki.find_tools()
    except ki.ToolsMissing as e:
        pytest.skip(f"cannot compile for real GPUs here: {e}")
    path = tmp_path_factory.mktemp("inspect") / "inspect.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from llmkern.inspect import main; sys.exit(main(sys.argv[1:]))"
    argv = ["--arch", ",".join(map(str, ARCHS)), "--json", str(path), "-q"]
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode in (0, 1) and path.exists(), (
        f"llmkern.inspect could not run (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    doc = json.loads(path.read_text())
    doc["_exit"], doc["_output"] = proc.returncode, proc.stdout + proc.stderr
    return doc


def _spec_rows(doc):
    return [r for r in doc["rows"] if r["spec"] is not None]


def _describe(rows, *fields):
    return "\n".join(f"{r['module']} {r['spec'] or r['kernel']} sm_{r['arch']}: "
                     + ", ".join(f"{f}={r.get(f)!r}" for f in fields) for r in rows)


def test_no_module_level_problems(report):
    """No kernel module fails to import, lacks ``compile_specs()`` while having kernels, or has a kernel without
    specs."""
    problems = [r for r in report["rows"] if r["spec"] is None]
    assert not problems, _describe(problems, "kernel", "error")


def test_every_spec_compiles_for_every_arch(report):
    rows = _spec_rows(report)
    assert rows, "no CompileSpec was found in any kernel module"
    errors = [r for r in rows if r["error"]]
    assert not errors, _describe(errors, "error")
    archs_by_spec = {}
    for r in rows:
        archs_by_spec.setdefault((r["module"], r["spec"]), set()).add(r["arch"])
    incomplete = {k: sorted(v) for k, v in archs_by_spec.items() if v != set(ARCHS)}
    assert not incomplete, f"specs not compiled for every arch {ARCHS}: {incomplete}"


def test_no_spills(report):
    """Zero spilled bytes in every cubin, the bar for every kernel and config: no LOCAL bytes, no stack frame (CUDA 13
    ptxas spills into the stack frame with LOCAL = 0) and no spill stores or loads in ptxas's own report."""
    fields = ("local", "stack", "spill_stores", "spill_loads")
    spills = [r for r in _spec_rows(report) if not r["error"] and any(r[f] != 0 for f in fields)]
    assert not spills, f"{len(spills)} spilling (spec, arch) pairs:\n" + _describe(spills, "regs", *fields, "num_warps")


def test_registers_within_hardware_limit(report):
    rows = [r for r in _spec_rows(report) if not r["error"]]
    bad = [r for r in rows if not 0 < r["regs"] <= 255]
    assert not bad, _describe(bad, "regs")
    # Occupancy is derived from registers, shared memory and warps: every config must fit at least one block.
    unfit = [r for r in rows if r["blocks_per_sm"] < 1]
    assert not unfit, _describe(unfit, "regs", "shared", "num_warps", "limiter")


def test_every_jit_kernel_has_a_compiled_spec(report):
    """Scanned here, independently of llmkern.inspect: every ``@triton.jit`` entry kernel defined in a kernel module
    that exists has at least one spec compiled for each arch, so a new kernel without specs fails."""
    compiled = {(r["module"], r["kernel"], r["arch"]) for r in _spec_rows(report) if not r["error"]}
    found, missing = 0, []
    for m in ki.KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"llmkern.kernels.{m}")
        except ModuleNotFoundError as e:
            if e.name == f"llmkern.kernels.{m}":
                continue  # not written yet
            raise
        for k in ki.find_jit_kernels(mod):
            found += 1
            missing += [f"{m}.{k} sm_{a}" for a in ARCHS if (m, k, a) not in compiled]
    assert found, "no @triton.jit kernel found in any kernel module"
    assert not missing, "kernels without a compiled spec: " + ", ".join(missing)


def test_exit_status_reports_failures(report):
    assert report["_exit"] == (0 if report["ok"] else 1), report["_output"]
    assert report["ok"], report["_output"]


def test_find_jit_kernels_skips_device_helpers():
    """``_rope_tile`` is an ``@triton.jit`` helper called by ``_rope_kernel``, not a launchable kernel."""
    from llmkern.kernels import rope

    assert ki.find_jit_kernels(rope) == ["_rope_kernel"]


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:16
 Function _rms_norm_kernel:
  REG:39 STACK:8 SHARED:1024 LOCAL:12 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    funcs = ki.parse_resource_usage(text)
    assert list(funcs) == ["_rms_norm_kernel"]
    assert funcs["_rms_norm_kernel"]["REG"] == 39
    assert funcs["_rms_norm_kernel"]["SHARED"] == 1024
    assert funcs["_rms_norm_kernel"]["LOCAL"] == 12
    assert funcs["_rms_norm_kernel"]["STACK"] == 8


@pytest.mark.parametrize(
    "arch, regs, smem, warps, blocks, limiter",
    [
        (80, 32, 1024, 16, 4, "threads"),  # 64 warps of 32 registers fill the SM exactly
        (80, 39, 1024, 16, 3, "registers"),  # 39 regs -> 1280 per warp -> 48 warps -> 3 blocks of 16
        (90, 40, 1024, 1, 32, "blocks"),  # one-warp blocks hit the 32 blocks/SM limit: 50%
        (80, 32, 100 * 1024, 4, 1, "shared"),  # a 100 KB block (reservation included) fits once in 164 KB
        (90, 32, 100 * 1024, 4, 2, "shared"),  # ...and twice in 228 KB
        (80, 255, 1024, 8, 1, "registers"),  # 255 regs -> 8192 per warp -> 8 warps
    ],
)
def test_occupancy(arch, regs, smem, warps, blocks, limiter):
    occ = ki.occupancy(arch, regs, smem, warps)
    assert occ["blocks_per_sm"] == blocks
    assert occ["limiter"] == limiter
    assert occ["occupancy"] == blocks * warps / 64


# ---------------------------------------------------------------------------------------------------------------------
# The gate covers what the heuristics pick (issue #12): sampled here independently of the modules' compile_specs()


def _element_type(row):
    """The data type a spec is for: its meta's dtype (attention specs, whose first pointers may be fp32 scratch), else
    the type of its first pointer argument."""
    if row["meta"].get("dtype"):
        return "*" + row["meta"]["dtype"]
    return next(t for t in row["signature"].values() if t.startswith("*") and t not in ("*i32", "*i64"))


def _compiled(report):
    """kernel -> [(constexprs, num_warps, element type)] of the specs that compiled clean for every arch."""
    archs, rows = {}, {}
    for r in _spec_rows(report):
        if not r["error"] and not ki.row_failed(r):
            archs.setdefault((r["kernel"], r["spec"]), set()).add(r["arch"])
            rows[(r["kernel"], r["spec"])] = r
    out = {}
    for k, r in rows.items():
        if archs[k] == set(ARCHS):
            out.setdefault(r["kernel"], []).append((r["constexprs"], r["num_warps"], _element_type(r)))
    return out


def _want(kernel, cfg, dtype):
    """(kernel, key): the constexprs the heuristic decides, its warps, the element type."""
    consts = tuple(sorted((k, v) for k, v in cfg.items() if k.isupper()))
    return kernel, (consts, cfg["num_warps"], "*" + dtype)


def _has(compiled, kernel, key):
    consts, warps, ptr = key
    return any(w == warps and p == ptr and all(c.get(k) == v for k, v in consts)
               for c, w, p in compiled.get(kernel, ()))


def _sampled_launches(n=4000, seed=0):
    """(kernel, key, description) of launches the heuristics pick for random points of the supported grid: a layout,
    an SM count, batch 1..256, a context up to the layout's max (log-uniform), a dtype; norms also at random widths
    past one tile, up to the widest row llmkern.ops accepts."""
    import math
    import random

    from llmkern.kernels import _layouts as L, cache_ops, paged_attention as PA, rms_norm, rope, swiglu

    rng = random.Random(seed)
    layouts = list(L.LAYOUTS)
    heads = L.head_layouts()
    for _ in range(n):
        name, Hq, Hkv, D, max_ctx, win = rng.choice(heads)
        sms, B, dt = rng.choice(L.SM_COUNTS), rng.randint(1, L.MAX_BATCH), rng.choice(L.DTYPES)
        ctx = max(1, int(math.exp(rng.uniform(0, math.log(max_ctx)))))
        G, fp32 = Hq // Hkv, dt == "fp32"
        where = f"{name} sms={sms} B={B} ctx={ctx} {dt}"
        splits = PA.decode_num_splits(B, Hkv, ctx, D, win, sms, G)
        dcfg = {k: v for k, v in PA.decode_config(G, D, fp32).items() if k != "num_stages"}
        yield (*_want("_paged_decode_split_kernel", {**dcfg, "KV_QUANT": 0}, dt), where)
        if splits > 1:
            yield (*_want("_paged_decode_reduce_kernel", PA.reduce_config(splits, D), dt), f"{where} splits={splits}")
        pcfg = {k: v for k, v in PA.prefill_config(G, D, fp32).items() if k != "num_stages"}
        yield (*_want("_paged_prefill_kernel", {**pcfg, "KV_QUANT": 0}, dt), where)
        yield (*_want("_reshape_and_cache_kernel", cache_ops.cache_tile_config(Hkv, D), dt), where)
        # 8-bit pages (KV_QUANT 1: int8, 2: fp8 e4m3fn), the same split heuristic and reduce.
        quant = rng.choice((1, 2))
        kv = {"KV_QUANT": quant}
        dcfg8 = {k: v for k, v in PA.decode_config(G, D, fp32, kv8=True).items() if k != "num_stages"}
        yield (*_want("_paged_decode_split_kernel", {**dcfg8, **kv}, dt), f"{where} KV_QUANT={quant}")
        pcfg8 = {k: v for k, v in PA.prefill_config(G, D, fp32, kv8=True).items() if k != "num_stages"}
        yield (*_want("_paged_prefill_kernel", {**pcfg8, **kv}, dt), f"{where} KV_QUANT={quant}")
        yield (*_want("_reshape_and_cache_q8_kernel", {**cache_ops.cache_tile_config(Hkv, D), **kv}, dt),
               f"{where} KV_QUANT={quant}")
        lay = rng.choice(layouts)
        M = rng.choice([B, B * ctx])
        for N in (lay.hidden, rng.randint(rms_norm.MAX_TILE_N + 1, rms_norm.MAX_N)):
            cfg = rms_norm.rms_norm_config(M, N)
            yield (*_want("_fused_add_rms_norm_kernel", cfg, dt), f"{lay.name} M={M} N={N} {dt}")
            yield (*_want("_rms_norm_kernel", cfg, dt), f"{lay.name} M={M} N={N} {dt}")
        yield (*_want("_silu_and_mul_kernel", swiglu.silu_and_mul_config(M, lay.intermediate), dt), where)
        yield (*_want("_rope_kernel", rope.rope_config(M, lay.Hq, lay.Hkv, lay.D, lay.D), dt), where)


def test_sampled_heuristic_configs_are_compiled_clean(report):
    """A config the heuristics pick anywhere on the supported grid has a spec that compiled without spills for
    every arch. Today's issue cases: 132 splits on an H100 (reduce BLOCK_S = 256), norms of 32K+ rows."""
    compiled = _compiled(report)
    missing, seen = {}, set()
    for kernel, key, where in _sampled_launches():
        if (kernel, key) not in seen:
            seen.add((kernel, key))
            if not _has(compiled, kernel, key):
                missing[(kernel, key)] = where
    assert not missing, f"{len(missing)} heuristic configs never compiled clean, e.g.:\n" + "\n".join(
        f"{k} {key}: {w}" for (k, key), w in list(missing.items())[:15])


def test_8bit_kv_variants_compiled_clean(report):
    """Every float-page attention spec has its int8 and fp8 twins (same launch config; decode and prefill with
    KV_QUANT 1 and 2), and every 8-bit kernel (the quantizing write, copy_blocks on 1-byte pages and on the fp16
    scales' [nb, bs, Hkv, 1] views) compiled for every arch without spills."""
    rows = [r for r in _spec_rows(report) if r["module"] in ("paged_attention", "cache_ops")]

    def key(name):  # 8-bit prefill may take other row tiles (prefill_config(kv8=True)): BLOCK_M left out
        return re.sub(r"BLOCK_M=\d+,", "", name)

    names = {key(r["spec"]) for r in rows}
    twins = [r["spec"] for r in rows if r["kernel"] in ("_paged_decode_split_kernel", "_paged_prefill_kernel")
             and r["constexprs"].get("KV_QUANT") == 0]
    assert twins, "no float-page attention spec (KV_QUANT=0) was compiled"
    missing = []
    for name in sorted(set(twins)):
        for kv in ("int8", "fp8"):
            twin = key(name)[:-1] + f",{kv}]"  # e.g. paged_prefill[D=128,BLOCK_SIZE=16,bf16,int8]
            if twin not in names:
                missing.append(f"{name} -> {kv}")
    assert not missing, f"float attention specs without an 8-bit twin: {missing[:10]}"
    kv8 = [r for r in rows if r["constexprs"].get("KV_QUANT", 0) != 0
           or r["meta"].get("kv") in ("int8/fp8 pages", "scales")]  # copy_blocks on 8-bit pools
    kinds = {r["kernel"] for r in kv8}
    assert {"_paged_decode_split_kernel", "_paged_prefill_kernel", "_reshape_and_cache_q8_kernel",
            "_copy_blocks_kernel"} <= kinds, kinds
    bad = [r for r in kv8 if r["error"] or ki.row_failed(r)]
    assert not bad, _describe(bad, "error", "regs", "local", "stack", "spill_stores")
    assert {r["arch"] for r in kv8} == set(ARCHS)


@pytest.mark.parametrize("sms, Hkv, D, ctx", [(132, 2, 128, 34 * 1024), (148, 2, 128, 262144),
                                              (108, 2, 256, 131072), (108, 2, 64, 32768)])
def test_decode_reduce_at_high_split_counts_is_compiled_clean(report, sms, Hkv, D, ctx):
    """The issue's spills: 132 splits (H100 SXM, Hkv 2, head_dim 128, batch 1, ~34k tokens) and 128 splits at
    head_dim 256 (here 108). The reduce config for them compiles without spills on every arch."""
    from llmkern.kernels import paged_attention as PA

    n = PA.decode_num_splits(1, Hkv, ctx, D, None, sms, 4)
    assert n > 64
    compiled = _compiled(report)
    for dt in ("fp32", "fp16", "bf16"):
        kernel, key = _want("_paged_decode_reduce_kernel", PA.reduce_config(n, D), dt)
        assert _has(compiled, kernel, key), f"reduce for {n} splits, D={D}, {dt} ({key}) not compiled clean"
