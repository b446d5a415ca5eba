"""The mutation check's self-test (tests/mutation/run.py, ``make mutation``; too slow for the normal suite): every
planted bug of tests/mutation/mutants.py still applies to the current sources — each replacement matches exactly
once, changes something, leaves Python files compiling, and each selection names a test file that exists — so a
refactor that breaks a mutant fails here, not silently in the next mutation run. Also checks how the runner labels
and classifies results, on made-up records (no pytest run)."""

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTATION = os.path.join(ROOT, "tests", "mutation")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_mutation_{name}", os.path.join(MUTATION, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run = _load("run")
plugin = _load("mutation_plugin")


def test_every_mutant_applies_exactly_once():
    files = run.referenced_files(ROOT)
    problems = run.check_mutants(files)
    assert not problems, "\n".join(problems)


def test_mutants_cover_the_planted_bug_families():
    """The families issue #23 asks for, each in at least one mutant; C++ mutants are few (each one rebuilds)."""
    names = [m.name for m in run.MUTANTS]
    for family in ("truncat", "drops-last", "window-off-by-one", "eps", "offset", "head", "tail"):
        assert any(family in n for n in names), family
    kinds = [m.kind for m in run.MUTANTS]
    assert {"triton", "python", "cpp"} <= set(kinds) and kinds.count("cpp") <= 4


def test_a_replacement_that_no_longer_matches_is_an_error():
    m = run.MUTANTS[0]
    path, old, new = m.replacements[0]
    files = run.referenced_files(ROOT, [m])
    with pytest.raises(run.CheckError, match="occurs 0 times"):
        run.mutate(m, {**files, path: files[path].replace(old.encode(), b"")})
    with pytest.raises(run.CheckError, match="occurs 2 times"):
        run.mutate(m, {**files, path: files[path] + b"\n" + old.encode()})
    problems = run.check_mutants({k: v for k, v in files.items() if k != path}, [m])
    assert any("not a tracked file" in p for p in problems), problems


@pytest.mark.parametrize("value, want", [(torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"),
                                         ("bf16", "bf16"), ("float16", "fp16"), (torch.float64, None), ("cpp", None),
                                         (16, None)])
def test_plugin_names_dtypes(value, want):
    assert plugin._dtype_name(value) == want


def _records(*tests, finish=True):
    recs = []
    for nodeid, outcome, dtypes in tests:
        recs.append({"event": "start", "nodeid": nodeid})
        if outcome != "crash":
            recs.append({"event": "report", "nodeid": nodeid, "when": "call", "outcome": outcome, "dtypes": dtypes,
                         "message": "boom" if outcome == "failed" else ""})
    if finish:
        recs.append({"event": "finish", "exitstatus": 1})
    return {"records": recs, "returncode": 1, "timed_out": False, "log": "x.log"}


def test_classify_per_dtype():
    m = run.Mutant("m", "triton", "bug", (), ("tests/test_ops.py",))
    res = run.classify(m, _records(("a[fp32]", "passed", ["fp32"]), ("b[fp16]", "failed", ["fp16"]),
                                   ("c[fp16]", "passed", ["fp16"]), ("d", "skipped", ["bf16"])))
    per = res["per_dtype"]
    assert per["fp32"]["status"] == "SURVIVED" and per["fp32"]["passed"] == 1
    assert per["fp16"]["status"] == "KILLED" and per["fp16"]["tests"] == ["b[fp16]"]
    assert per["bf16"]["status"] == "NOT RUN"  # only a skipped test: nothing was checked in bf16


def test_classify_a_crash_kills_and_names_the_test():
    m = run.Mutant("m", "cpp", "bug", (), ("tests/test_ops.py",), dtypes=("bf16",))
    res = run.classify(m, _records(("a[bf16]", "passed", ["bf16"]), ("b[bf16]", "crash", []), finish=False))
    assert res["per_dtype"]["bf16"]["status"] == "KILLED" and res["per_dtype"]["bf16"]["tests"] == ["b[bf16]"]
