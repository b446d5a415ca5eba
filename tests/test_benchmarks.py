"""Smoke tests of benchmarks/: every script runs end to end in --dry-run mode in seconds and appends CSV rows with
the harness's columns, and every common flag changes what comes out (a flag that did nothing would fail here)."""

import csv
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
OP_SCRIPTS = {  # script -> ops it writes rows for
    "rms_norm": {"rms_norm", "fused_add_rms_norm"},
    "rope": {"apply_rope"},
    "swiglu": {"silu_and_mul", "silu_and_mul_fused"},
    "kv_cache": {"reshape_and_cache"},
    "decode_attention": {"decode_attention"},
    "linear": {"linear"},
}


def _harness():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import _harness

    return _harness


def _run(script, *flags, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the benchmarks time real backends
    p = subprocess.run([sys.executable, os.path.join(BENCH, f"bench_{script}.py"), "--threads", "1", *flags],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return p


def _rows(path):
    with open(path, newline="") as f:
        r = list(csv.reader(f))
    return r[0], [dict(zip(r[0], row)) for row in r[1:]]


@pytest.mark.parametrize("script", sorted(OP_SCRIPTS))
def test_op_script_dry_run_writes_rows(script, tmp_path):
    out = tmp_path / "r.csv"
    p = _run(script, "--dry-run", "--csv", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    header, rows = _rows(out)
    assert header == _harness().CSV_COLUMNS
    assert {r["op"] for r in rows} == OP_SCRIPTS[script]
    assert "eager" in {r["provider"] for r in rows}
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["threads"] == "1"
        assert 0 < float(r["us_p20"]) <= float(r["us_p50"]) <= float(r["us_p80"])
        assert float(r["gbps"]) > 0 and float(r["pct_peak"]) > 0 and float(r["speedup_vs_eager"]) > 0
        assert "torch=" in r["versions"] and r["timestamp"]
    assert "measured here on: cpu" in p.stdout  # the header never names a device the numbers did not come from
    if script in ("rms_norm", "rope", "swiglu"):
        assert "llmkern-reference" in {r["provider"] for r in rows}


def test_dtype_and_providers_flags(tmp_path):
    out = tmp_path / "r.csv"
    p = _run("rms_norm", "--dry-run", "--dtype", "bf16", "--providers", "eager", "--csv", str(out))
    assert p.returncode == 0, p.stderr
    _, rows = _rows(out)
    assert {r["dtype"] for r in rows} == {"bf16"} and {r["provider"] for r in rows} == {"eager"}
    out32 = tmp_path / "r32.csv"
    assert _run("rms_norm", "--dry-run", "--providers", "eager", "--csv", str(out32)).returncode == 0
    _, rows32 = _rows(out32)
    # bf16 moves half the bytes of fp32 for the same shape: the dtype really reached the tensors.
    assert int(rows32[0]["bytes"]) == 2 * int(rows[0]["bytes"])


def test_unknown_provider_is_an_error(tmp_path):
    p = _run("rope", "--dry-run", "--providers", "flashinfer", "--csv", str(tmp_path / "r.csv"))
    assert p.returncode != 0 and "flashinfer" in p.stderr and "cannot run here" in p.stderr
    assert not (tmp_path / "r.csv").exists()


def test_compile_flag_adds_the_provider():
    def names(out):
        return {line.split()[0] for line in out.splitlines() if line and not line.startswith("[not here]")}

    without = names(_run("swiglu", "--providers", "list").stdout)
    with_ = names(_run("swiglu", "--compile", "--providers", "list").stdout)
    assert "eager" in without and "torch.compile" not in without and "torch.compile" in with_


def test_plot_flag_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.csv"
    p = _run("swiglu", "--dry-run", "--providers", "eager", "--csv", str(out), "--plot")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "silu_and_mul_cpu_fp32.png").stat().st_size > 0
    assert (tmp_path / "silu_and_mul_fused_cpu_fp32.png").stat().st_size > 0


@pytest.mark.parametrize("script", sorted(OP_SCRIPTS))
def test_quick_and_full_sweeps_differ(script):
    """--quick picks fewer shapes than the full sweep, --dry-run fewer still (checked without timing anything)."""
    H = _harness()
    spec = importlib.util.spec_from_file_location(f"_bench_{script}", os.path.join(BENCH, f"bench_{script}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    p = H.parser("x")
    if hasattr(mod, "add_args"):
        mod.add_args(p)
    n = {flag: len(mod.cases(H.finish_args(p, p.parse_args(flag.split()))))
         for flag in ("", "--quick", "--dry-run")}
    assert n["--dry-run"] < n["--quick"] < n[""]


def test_gpu_peak_table():
    H = _harness()
    assert H.gpu_peak_gbps("NVIDIA H100 80GB HBM3")[0] == 3350.0
    assert H.gpu_peak_gbps("NVIDIA H100 PCIe")[0] == 2000.0
    assert H.gpu_peak_gbps("NVIDIA A100-SXM4-80GB")[0] == 2039.0
    assert H.gpu_peak_gbps("NVIDIA A100 80GB PCIe")[0] == 1935.0
    assert H.gpu_peak_gbps("NVIDIA A100-SXM4-40GB")[0] == 1555.0
    assert H.gpu_peak_gbps("NVIDIA L4")[0] == 300.0
    assert H.gpu_peak_gbps("NVIDIA L40S")[0] == 864.0
    assert H.gpu_peak_gbps("Tesla T4")[0] == 320.0
    assert H.gpu_peak_gbps("NVIDIA GeForce RTX 4090")[0] == 1008.0
    assert H.gpu_peak_gbps("Some Future GPU")[0] is None


def test_e2e_dry_run(tmp_path):
    out = tmp_path / "e.csv"
    p = _run("e2e", "--dry-run", "--providers", "llmkern", "--csv", str(out), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    _, rows = _rows(out)
    assert [r["provider"] for r in rows] == ["eager", "llmkern"]
    assert all(r["op"] == "e2e_decode" and float(r["tokens_per_s"]) > 0 for r in rows)
    assert "tokens identical to eager: yes" in rows[1]["note"]  # fp32: the patched model decodes the same tokens
    assert "speedup" in p.stdout
    assert "where a decode step goes" not in p.stdout  # --breakdown's table only when asked


def test_e2e_breakdown_splits_a_step(tmp_path):
    p = _run("e2e", "--dry-run", "--providers", "llmkern-paged", "--breakdown", "--csv", str(tmp_path / "e.csv"),
             timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    table = p.stdout.split("where a decode step goes", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = {line.split()[-7]: [float(x) for x in line.split()[-6:]] for line in table[2:]}
    assert set(rows) == {"eager", "llmkern-paged"}, table
    for provider, cells in rows.items():  # p50, the four op columns, the rest = p50 minus the four
        assert cells[0] > 0 and all(c >= 0 for c in cells[1:5]), (provider, cells)
        assert abs(cells[0] - sum(cells[1:5]) - cells[5]) < 0.02, (provider, cells)


def test_breakdown_categories():
    spec = importlib.util.spec_from_file_location("bench_e2e", os.path.join(BENCH, "bench_e2e.py"))
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    cat = e2e._op_category
    assert cat("llmkern_C::paged_decode_attention") == cat("llmkern_C::linear") == e2e.BREAKDOWN[0]
    assert cat("aten::mm") == cat("aten::addmm") == e2e.BREAKDOWN[1]
    assert cat("aten::_scaled_dot_product_flash_attention_for_cpu") == e2e.BREAKDOWN[2]
    assert cat("aten::isin") == cat("aten::argmax") == e2e.BREAKDOWN[3]
    assert cat("llmkern::reshape_and_cache") is None  # the Python custom op: its self time is Python


E2E_COMPILED = ["eager+compile", "llmkern+compile", "llmkern-sdpa+compile"]


def _paged_cache_is_capturable() -> bool:
    """PagedKVCache has its reserved (capturable) mode: generate(cache_implementation="static") on a patched model
    then creates one, and llmkern+compile must run."""
    import inspect

    from llmkern.cache import PagedKVCache

    return "max_cache_len" in inspect.signature(PagedKVCache.__init__).parameters


def test_e2e_compiled_providers_dry_run(tmp_path):
    """Each +compile provider decodes the tiny random model on transformers' static-cache compile path: a row with
    its ratio to eager, a compile time and dynamo's counts (a graph compiled, no graph break, nothing recompiled in
    the timed run), eager's tokens, and a column in the p50/ratio table. A provider that cannot run yet is a clear
    FAILED line while the others still report."""
    out = tmp_path / "e.csv"
    p = _run("e2e", "--dry-run", "--providers", ",".join(E2E_COMPILED), "--csv", str(out), timeout=900)
    _, rows = _rows(out)
    got = {r["provider"]: r for r in rows}
    must_run = ["eager", "eager+compile", "llmkern-sdpa+compile"]
    if _paged_cache_is_capturable():
        must_run.append("llmkern+compile")
        assert p.returncode == 0, p.stdout + p.stderr
    else:  # until the reserved PagedKVCache lands: the failure is said, the run goes on
        assert p.returncode == 1, p.stdout + p.stderr
        assert "llmkern+compile" not in got
        assert "FAILED llmkern+compile on qwen2-tiny B=1 ctx=16: ValueError:" in p.stdout
    assert list(got) == [n for n in ["eager"] + E2E_COMPILED if n in must_run], p.stdout + p.stderr
    shape_line = next(line for line in p.stdout.splitlines() if line.startswith("qwen2-tiny B=1 ctx=16 ")
                      and "(1.00x)" in line)  # the p50/ratio table: eager's ratio to itself is 1
    header = p.stdout.splitlines()[p.stdout.splitlines().index(shape_line) - 1].split()
    assert header[3:] == ["eager"] + E2E_COMPILED, header
    cells = re.findall(r"(\d+\.\d) \((\d+\.\d\d)x\)|FAILED", shape_line)
    assert len(cells) == 1 + len(E2E_COMPILED), shape_line
    for n in must_run[1:]:
        r = got[n]
        assert float(r["speedup_vs_eager"]) > 0 and float(r["tokens_per_s"]) > 0
        m = re.search(r"compile ([\d.]+) s \(warm-up generate [\d.]+ s\), (\d+) graphs, (\d+) graph breaks; "
                      r"timed run: (\d+) recompiles, (\d+) graph breaks", r["note"])
        assert m, r["note"]
        assert float(m[1]) > 0 and int(m[2]) >= 1 and m[3] == "0" and m[4] == "0" and m[5] == "0", r["note"]
        assert "tokens identical to eager: yes" in r["note"], r["note"]
        assert re.search(rf"^  qwen2-tiny B=1 ctx=16 +{re.escape(n)} +[\d.]+ +[\d.]+ +\d+ +0 +0, +0$", p.stdout, re.M), \
            p.stdout  # the torch.compile section: compile s, graphs, breaks, timed recompiles and breaks


def test_e2e_compiled_providers_are_listed_and_named():
    listed = [line.split()[0] for line in _run("e2e", "--providers", "list").stdout.splitlines() if line.strip()]
    assert set(E2E_COMPILED) <= set(listed) and {"eager", "llmkern", "llmkern-paged"} <= set(listed)
    p = _run("e2e", "--dry-run", "--providers", "eager+jit")
    assert p.returncode != 0 and "eager+jit" in p.stderr and "cannot run here" in p.stderr


def test_llmkern_bench_cli_runs_the_suite(tmp_path):
    out = tmp_path / "s.csv"
    p = subprocess.run([sys.executable, "-m", "llmkern", "bench", "--dry-run", "--threads", "1", "--only", "rope",
                        "--csv", str(out)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1/1 scripts ok" in p.stdout
    _, rows = _rows(out)
    assert {r["op"] for r in rows} == {"apply_rope"}


def test_llamacpp_provider_is_offered_only_with_a_python_that_has_it():
    """llama.cpp is never a dependency: the e2e provider appears when a Python with llama-cpp-python is named."""
    env_has = importlib.util.find_spec("llama_cpp") is not None
    listed = _run("e2e", "--providers", "list").stdout.split()
    assert ("llama.cpp" in listed) == env_has
    named = _run("e2e", "--providers", "list", "--llamacpp-python", sys.executable).stdout.split()
    assert "llama.cpp" in named
