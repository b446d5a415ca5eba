"""The one command for a lent GPU (.ci/gpu_check.py, `make gpu-check`) works before any GPU time is spent on it.

* ``--dry-run`` runs the whole flow on this CPU (tiny shapes, Triton through the interpreter): every step's
  subprocesses, the junit merge, the CSVs and the summary table, within the output folder's limits (at most 8
  files, plain names) and with the table printed last.
* The GPU-only branches that a CPU cannot reach — the ratios to the measured roofline, the targets' met/missed
  verdicts, the Liger comparison, memcheck's error count — run here on synthetic benchmark rows and a stand-in
  ``compute-sanitizer``.
"""

import base64
import csv
import hashlib
import importlib.util
import os
import re
import stat
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "gpu_check.py")
STEPS = ["env", "wheels", "install", "roofline", "tests", "sanitizer", "decode", "prefill", "row-ops", "e2e"]
ALLOWED = {"gpu_check.log", "summary.csv", "junit.xml", "attention.csv", "row_ops.csv", "e2e.csv"}


def _module():
    spec = importlib.util.spec_from_file_location("_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dummy_wheel(folder) -> str:
    """A minimal pure-Python wheel (what --wheels carries, e.g. Liger-Kernel), made here: nothing is downloaded."""
    files = {"gc_dummy/__init__.py": "X = 1\n",
             "gc_dummy-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: gc-dummy\nVersion: 0.1\n",
             "gc_dummy-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             "Tag: py3-none-any\n"}

    def digest(text):
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{k},{digest(v)},{len(v.encode())}\n" for k, v in files.items())
    path = os.path.join(folder, "gc_dummy-0.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr("gc_dummy-0.1.dist-info/RECORD", record + "gc_dummy-0.1.dist-info/RECORD,,\n")
    return path


def test_dry_run_end_to_end(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()
    _dummy_wheel(str(wheels))
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "LLMKERN_GPU_OUT", "TRITON_INTERPRET")}
    p = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out), "--wheels", str(wheels)],
                       capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]

    files = sorted(os.listdir(out))
    assert len(files) <= 8 and set(files) <= ALLOWED, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files)
    assert {"gpu_check.log", "summary.csv", "junit.xml", "attention.csv", "row_ops.csv", "e2e.csv"} <= set(files)

    # The table is the last thing printed: its header, a rule, then exactly one row per step, in order.
    lines = p.stdout.rstrip("\n").splitlines()
    tail = lines[-(len(STEPS) + 3):]
    assert tail[0].startswith("== gpu-check summary:") and "DRY RUN" in tail[0], tail[0]
    assert [c.strip() for c in tail[1].split("|")] == ["step", "status", "seconds", "key figure", "target", "met?"]
    cells = [[c.strip() for c in ln.split("|")] for ln in tail[3:]]
    assert [c[0] for c in cells] == STEPS, tail
    status = {c[0]: c[1] for c in cells}
    assert status["wheels"] == "ok" and status["tests"] == "ok", tail
    assert status["sanitizer"] == "skipped" and status["install"] == "skipped", tail  # dry run: said, not done
    for step in ("env", "roofline", "decode", "prefill", "row-ops", "e2e"):
        assert status[step] == "ok", tail
    assert all(float(c[2]) >= 0 for c in cells)
    assert "passed" in dict((c[0], c[3]) for c in cells)["tests"]

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0])[0] == "gpu_name"
    assert all(r["gpu_name"] for r in rows) and {r["step"] for r in rows} == set(STEPS)
    metrics = {r["metric"] for r in rows}
    assert {"copy_bandwidth", "bf16_matmul", "tests_passed", "decode_bf16_pct_copy", "prefill_pct_matmul",
            "e2e_vs_roofline"} <= metrics
    for name, ops in (("attention.csv", {"decode_attention", "prefill_attention"}),
                      ("row_ops.csv", {"rms_norm", "fused_add_rms_norm", "apply_rope", "silu_and_mul",
                                       "silu_and_mul_fused", "reshape_and_cache"}),
                      ("e2e.csv", {"e2e_decode"})):
        with open(out / name, newline="") as f:
            brows = list(csv.DictReader(f))
        assert {r["op"] for r in brows} == ops and all(r["device_name"] for r in brows), name
    junit = (out / "junit.xml").read_text()
    assert "<testsuites" in junit and re.search(r'tests="[1-9]', junit)
    log = (out / "gpu_check.log").read_text()
    assert "---- pytest shard 1/2" in log and "---- launch script (no sanitizer)" in log


def _write_rows(path, rows):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import _harness
    finally:
        sys.path.pop(0)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_harness.CSV_COLUMNS)
        w.writeheader()
        for op, prov, shape, dtype, us, nbytes in rows:
            w.writerow({"op": op, "provider": prov, "shape": shape, "dtype": dtype, "us_p50": us, "bytes": nbytes,
                        "device_name": "NVIDIA H200"})


def test_gpu_branches_on_synthetic_rows(tmp_path, monkeypatch):
    """What only a GPU run reaches: figures as ratios to the measured roofline, the targets' verdicts and the Liger
    comparison, computed from synthetic rows (4000 GB/s copy, 800 TFLOP/s matmul)."""
    gc = _module()
    a = gc.parse_args(["--out", str(tmp_path), "--skip-install"])
    check = gc.Check(a)
    check.device, check.gpu_name, check.copy_gbps, check.mm_tflops = "cuda", "NVIDIA H200", 4000.0, 800.0
    monkeypatch.setattr(check, "bench", lambda *args, **kw: {"rc": 0, "timed_out": False, "out": "", "seconds": 0})
    GB = 4000e9 / 1e6  # bytes per µs at the copy bandwidth
    _write_rows(tmp_path / "attention.csv", [
        # B>=8, L>=8k: 90% and 86% of copy BW -> met; B=1 at 80% is outside the target's shapes
        ("decode_attention", "eager", "llama-3-8b B=8 L=8k H=32/8 D=128", "bf16", 200.0, 0.9 * GB * 100),
        ("decode_attention", "llmkern-triton", "llama-3-8b B=8 L=8k H=32/8 D=128", "bf16", 100.0, 0.9 * GB * 100),
        ("decode_attention", "llmkern-triton", "qwen2.5-0.5b B=32 L=128k H=14/2 D=64", "bf16", 100.0,
         0.86 * GB * 100),
        ("decode_attention", "llmkern-triton", "llama-3-8b B=1 L=1k H=32/8 D=128", "bf16", 100.0, 0.8 * GB * 100),
        ("decode_attention", "llmkern-triton", "llama-3-8b B=16 L=8k H=32/8 D=128", "fp32", 100.0, 0.5 * GB * 100),
        # prefill: 2*1*32*4096^2*128 FLOPs in 1000 µs = 137 TFLOP/s = 17% of 800 -> missed
        ("prefill_attention", "eager", "llama-3-8b B=1 S=4k H=32/8 D=128", "bf16", 800.0, 1),
        ("prefill_attention", "llmkern-triton", "llama-3-8b B=1 S=4k H=32/8 D=128", "bf16", 1000.0, 1),
    ])
    _write_rows(tmp_path / "row_ops.csv", [
        ("rms_norm", "eager", "T=4k N=4096", "bf16", 30.0, 0.85 * GB * 20),
        ("rms_norm", "llmkern-triton", "T=4k N=4096", "bf16", 20.0, 0.85 * GB * 20),
        ("rms_norm", "liger", "T=4k N=4096", "bf16", 25.0, 0.85 * GB * 20),
        ("apply_rope", "llmkern-triton", "llama-3-8b T=2k H=32/8 D=128", "bf16", 10.0, 0.81 * GB * 10),
        ("apply_rope", "liger", "llama-3-8b T=2k H=32/8 D=128", "bf16", 9.0, 0.81 * GB * 10),
        ("rms_norm", "llmkern-triton", "T=1 N=4096", "bf16", 3.0, 100),  # decode shape: no target
    ])
    # 16 GB moved per step at 4000 GB/s = 4 ms; 4.4 ms measured = 1.10x -> met; eager+compile at 5.5 ms
    _write_rows(tmp_path / "e2e.csv", [
        ("e2e_decode", "eager", "llama-3-8b B=1 ctx=1k", "bf16", 30000.0, 16e9),
        ("e2e_decode", "eager+compile", "llama-3-8b B=1 ctx=1k", "bf16", 5500.0, 16e9),
        ("e2e_decode", "llmkern+compile", "llama-3-8b B=1 ctx=1k", "bf16", 4400.0, 16e9),
    ])
    results = {}
    for name, fn in (("decode", check.s_decode), ("prefill", check.s_prefill), ("row-ops", check.s_row_ops),
                     ("e2e", check.s_e2e)):
        r = gc.StepResult(name)
        fn(r)
        results[name] = r
        check.results.append(r)
    d = results["decode"]
    assert d.status == "ok" and d.met == "yes", (d.figure, d.note)
    assert "min 86% / median 88% of copy BW (2 shapes); 2.00-2.00x SDPA" in d.figure, d.figure
    p = results["prefill"]
    assert p.met == "no" and "min 17% of the matmul rate" in p.figure, p.figure
    assert [m[1] for m in p.metrics if m[0] == "prefill_vs_eager"] == [0.8]
    ro = results["row-ops"]
    assert ro.met == "no" and "min 81% of copy BW" in ro.figure and "faster than Liger 1/2" in ro.figure, ro.figure
    e = results["e2e"]
    assert e.met == "yes" and "worst 1.10x" in e.figure and "1.25-1.25x eager+compile" in e.figure, e.figure
    check.write_summary()
    table = check.table()
    assert table.splitlines()[-1].startswith("e2e ") and "NVIDIA H200" in table.splitlines()[0]
    with open(tmp_path / "summary.csv", newline="") as f:
        assert {r["gpu_name"] for r in csv.DictReader(f)} == {"NVIDIA H200"}
    check.log.close()


def test_sanitizer_branch_with_a_stand_in(tmp_path, monkeypatch):
    """The memcheck step with a stand-in compute-sanitizer that runs the launch script (on CPU, Triton interpreter)
    and prints memcheck's summary line: launches counted, 0 errors, met."""
    gc = _module()
    fake = tmp_path / "compute-sanitizer"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--print-limit" ]; do shift; done; shift 2\n"$@"; rc=$?\n'
                    'echo "========= ERROR SUMMARY: 0 errors"\nexit $rc\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (tmp_path / "o").mkdir()
    check = gc.Check(gc.parse_args(["--out", str(tmp_path / "o"), "--skip-install"]))
    check.device = "cuda"
    monkeypatch.setattr(gc.Check, "sanitizer_path", staticmethod(lambda: str(fake)))
    r = gc.StepResult("sanitizer")
    check.s_sanitizer(r)
    check.log.close()
    assert r.status == "ok" and r.met == "yes", (r.status, r.note, r.figure)
    m = re.fullmatch(r"memcheck: 0 errors; (\d+) launch groups", r.figure)
    assert m and int(m[1]) >= 2, r.figure  # both head layouts (and the CUDA extension's write, when built)


@pytest.mark.parametrize("argv, msg", [(["--steps", "bench"], "--steps"), (["--e2e-shapes", "1k"], "--e2e-shapes"),
                                       (["--budget", "0"], "--budget")])
def test_bad_arguments_are_refused(argv, msg, capsys):
    gc = _module()
    with pytest.raises(SystemExit) as e:
        gc.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err
