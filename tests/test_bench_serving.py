"""benchmarks/bench_serving.py: the serving benchmark runs end to end (dry run, a tiny model), every provider
generates the same greedy fp32 tokens as unpatched continuous batching, its workload is what the flags say, and bad
flags are errors that name the flag."""

import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers.generation.continuous_batching")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _bench():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import bench_serving

    return bench_serving


def _run(*flags, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the benchmark times real backends
    return subprocess.run([sys.executable, os.path.join(BENCH, "bench_serving.py"), "--threads", "1", *flags],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dry_run_every_provider_same_tokens(tmp_path):
    out = tmp_path / "s.csv"
    p = _run("--dry-run", "--csv", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = _rows(out)
    assert [r["provider"] for r in rows] == ["cb-sdpa", "cb-paged-eager", "cb-llmkern"]
    assert [r["tokens_vs_first"] for r in rows] == ["first", "same", "same"], p.stdout
    for r in rows:
        assert r["arrival"] == "all" and r["dtype"] == "fp32" and r["threads"] == "1" and r["requests"] == "3"
        assert float(r["tokens_per_s"]) > 0 and float(r["wall_s"]) > 0
        assert 0 <= float(r["ttft_p50_ms"]) <= float(r["ttft_p99_ms"])
        assert 0 <= float(r["itl_p50_ms"]) <= float(r["itl_p99_ms"])
        assert "transformers=" in r["versions"]
    # What runs for the patched model is said, not hidden.
    assert "llmkern's paged attention ran under continuous batching" in p.stdout
    assert "measured here on: cpu" in p.stdout


def test_poisson_arrivals_dry_run(tmp_path):
    out = tmp_path / "s.csv"
    p = _run("--dry-run", "--arrival", "both", "--rate", "50", "--providers", "cb-sdpa,cb-llmkern", "--csv", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = _rows(out)
    assert [(r["arrival"], r["provider"]) for r in rows] == [
        ("all", "cb-sdpa"), ("all", "cb-llmkern"), ("poisson", "cb-sdpa"), ("poisson", "cb-llmkern")]
    assert [r["tokens_vs_first"] for r in rows] == ["first", "same", "first", "same"], p.stdout
    assert rows[2]["rate"] == "50.0" and rows[0]["rate"] == ""


def test_workload_follows_the_flags():
    B = _bench()
    p = B.build_parser()
    args = B.finish(p, p.parse_args(["--requests", "40", "--prompt-min", "32", "--prompt-max", "64",
                                     "--new-tokens", "5", "--rate", "10", "--csv", ""]))
    w = B.make_workload(args, 1000, "poisson")
    assert len(w.prompts) == 40 and w.new_tokens == 5
    assert all(32 <= len(x) <= 64 for x in w.prompts) and len({len(x) for x in w.prompts}) > 5
    assert all(3 <= t < 1000 for x in w.prompts for t in x)
    assert w.arrivals[0] == 0 and all(a <= b for a, b in zip(w.arrivals, w.arrivals[1:]))
    assert 1.0 < w.arrivals[-1] < 12.0  # 39 gaps of mean 0.1 s
    again = B.make_workload(args, 1000, "poisson")
    assert again.prompts == w.prompts and again.arrivals == w.arrivals  # seeded: every provider gets the same
    assert B.make_workload(args, 1000, "all").arrivals == [0.0] * 40
    # Defaults: the workload; --quick a small one.
    full = B.finish(p, p.parse_args(["--csv", ""]))
    assert (full.requests, full.prompt_min, full.prompt_max, full.new_tokens) == (64, 32, 2048, 128)
    quick = B.finish(p, p.parse_args(["--quick", "--csv", ""]))
    assert (quick.requests, quick.prompt_max, quick.new_tokens) == (8, 256, 16)


def test_the_cache_holds_the_whole_workload():
    B = _bench()
    p = B.build_parser()
    args = B.finish(p, p.parse_args(["--requests", "4", "--prompt-min", "300", "--prompt-max", "300",
                                     "--new-tokens", "10", "--csv", ""]))
    cfg = B._cb_config(args, B.make_workload(args, 1000, "all"))
    if cfg is None:
        pytest.skip("this transformers has no ContinuousBatchingConfig")
    page = getattr(cfg, "page_size", None) or getattr(cfg, "block_size")
    assert cfg.num_blocks * page >= 4 * 310
    args.num_blocks = 7
    assert B._cb_config(args, B.make_workload(args, 1000, "all")).num_blocks == 7


@pytest.mark.parametrize("flags, message", [
    (["--prompt-min", "64", "--prompt-max", "32"], "--prompt-max"),
    (["--providers", "cb-sdpa,vllm-gpu"], "--providers"),
    (["--rate", "0"], "--rate"),
    (["--new-tokens", "0"], "--new-tokens"),
])
def test_bad_flags_are_errors_naming_the_flag(flags, message, capsys):
    B = _bench()
    p = B.build_parser()
    with pytest.raises(SystemExit):
        B.finish(p, p.parse_args(flags))
    assert message in capsys.readouterr().err


def test_vllm_provider_runs_in_the_python_it_is_given(tmp_path):
    """The vllm provider's contract without vLLM: a stand-in 'Python' gets the runner, a saved model directory and the
    workload, and its last JSON line becomes the row (tokens compared with the first provider's)."""
    seen = tmp_path / "seen.txt"
    fake = tmp_path / "python"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
runner, model, work = args[0], args[args.index("--model") + 1], args[args.index("--workload") + 1]
w = json.load(open(work))
open({str(seen)!r}, "w").write(json.dumps({{"runner": os.path.basename(runner), "args": args,
    "config": os.path.exists(os.path.join(model, "config.json")), "n": len(w["prompts"])}}))
print("INFO a log line")
print(json.dumps({{"vllm": "0.0-fake", "wall_s": 0.5, "generated": len(w["prompts"]) * w["new_tokens"],
    "tokens": [[1] * w["new_tokens"] for _ in w["prompts"]], "threads": 1, "ttft_p50_s": None, "ttft_p99_s": None,
    "itl_mean_p50_s": 0.01, "itl_mean_p99_s": 0.02}}))
""")
    fake.chmod(0o755)
    out = tmp_path / "s.csv"
    p = _run("--dry-run", "--arrival", "both", "--rate", "50", "--providers", "cb-sdpa,vllm",
             "--vllm-python", str(fake), "--csv", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    called = __import__("json").loads(seen.read_text())
    assert called["runner"] == "_vllm_serving_runner.py" and called["config"] and called["n"] == 3
    assert called["args"][called["args"].index("--dtype") + 1] == "fp32"
    rows = _rows(out)
    assert [(r["arrival"], r["provider"]) for r in rows] == [("all", "cb-sdpa"), ("all", "vllm"), ("poisson", "cb-sdpa")]
    assert float(rows[1]["tokens_per_s"]) == pytest.approx(12 / 0.5, rel=1e-3)
    assert rows[1]["tokens_vs_first"] == "3 of 3 differ"  # the stand-in's tokens are not the model's
    assert "skipped for Poisson arrivals" in p.stdout


def test_vllm_provider_without_a_python_is_an_error_that_says_how(capsys, monkeypatch):
    B = _bench()
    monkeypatch.delenv("LLMKERN_VLLM_PYTHON", raising=False)
    p = B.build_parser()
    with pytest.raises(SystemExit):
        B.finish(p, p.parse_args(["--providers", "cb-sdpa,vllm"]))
    assert "--vllm-python" in capsys.readouterr().err
    assert "vllm" not in B.finish(p, p.parse_args([])).provider_list
    monkeypatch.setenv("LLMKERN_VLLM_PYTHON", "/some/python")
    assert B.finish(p, p.parse_args([])).provider_list[-1] == "vllm"
