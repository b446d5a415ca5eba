#!/usr/bin/env python3
"""Mutation check: plant typical kernel bugs one at a time and show that the test suite fails on each, per dtype.

    python tests/mutation/run.py                 # every mutant (tests/mutation/mutants.py), C++ ones last
    python tests/mutation/run.py --only NAME ...  # some of them;  --list: what there is;  --kind triton|python|cpp
    make mutation                                # the same with the project's venv (not part of `make test`)

For each mutant: the tracked files (``git ls-files``, as they are in the working tree) are copied into a work tree
outside the checkout, the mutant's replacements are applied (each must match exactly once, or the run stops: a
mutant that no longer applies tests nothing), the C++ extension is rebuilt there when a C++ source differs from
the last build (``LLMKERN_CUDA=0 python setup.py build_ext --inplace``, ninja reusing the objects of files that did
not change), and the mutant's pytest selection runs against that tree (``PYTHONPATH`` = the tree; the interpreter's
imports are checked to come from it). The plugin tests/mutation/mutation_plugin.py records each test's outcome and
the dtypes it ran. A mutant is KILLED in a dtype when a test of that dtype failed, SURVIVED when tests of that dtype
ran and all passed, NOT RUN when none ran (a selection to fix). Once every dtype of a mutant has ``--stop-after``
failures the rest of its selection is skipped.

First, unless ``--no-baseline``, every distinct selection runs on the unmutated tree and must pass: a kill is only
evidence when the same tests pass without the bug.

The work tree is kept between runs (``--workdir``, default ``$TMPDIR/llmkern-mutation-<hash of the checkout
path>``) so the extension is rebuilt incrementally; logs of each pytest run and build are kept there. Exit status:
0 when every mutant is killed in every dtype it names, 1 when one survives (or was not run), 2 when the check itself
could not run (a mutant does not apply, the baseline fails, the build fails).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mutants import ALL_DTYPES, MUTANTS, Mutant, by_name  # noqa: E402

KIND_ORDER = {"triton": 0, "python": 1, "cpp": 2}
BUILD_INPUTS = ("setup.py", "pyproject.toml")  # plus everything under csrc/


class CheckError(Exception):
    """The check itself cannot run (exit status 2)."""


# ---------------------------------------------------------------------------------------------------------------------
# Sources and mutants


def repo_root(start: str = HERE) -> str:
    out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=start, capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckError(f"not inside a git checkout ({start}): {out.stderr.strip()}")
    return out.stdout.strip()


def tracked_files(root: str) -> dict:
    """path -> bytes of every tracked file as it is in the working tree (deleted ones left out)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    files = {}
    for rel in out.decode().split("\0"):
        full = os.path.join(root, rel)
        if rel and os.path.isfile(full) and not os.path.islink(full):
            with open(full, "rb") as f:
                files[rel] = f.read()
    return files


def referenced_files(root: str, mutants=MUTANTS) -> dict:
    """path -> bytes of the files `mutants` patch or select tests from, read from disk under `root` (no git needed:
    the suite's self-test also runs in copies of the tree, e.g. make test-compat's)."""
    files = {}
    for m in mutants:
        paths = [p for p, _, _ in m.replacements] + [a.split("::")[0] for a in m.tests if a.startswith("tests/")]
        for rel in paths:
            full = os.path.join(root, rel)
            if rel not in files and os.path.isfile(full):
                with open(full, "rb") as f:
                    files[rel] = f.read()
    return files


def mutate(mutant: Mutant, files: dict) -> dict:
    """path -> mutated text of the files the mutant changes. Raises CheckError naming every replacement that does not
    match exactly once."""
    out, problems = {}, []
    for path, old, new in mutant.replacements:
        if path not in files and path not in out:
            problems.append(f"{path}: not a tracked file")
            continue
        text = out[path] if path in out else files[path].decode()
        n = text.count(old)
        if n != 1:
            problems.append(f"{path}: {old!r} occurs {n} times (want exactly 1)")
            continue
        out[path] = text.replace(old, new)
    if problems:
        raise CheckError(f"mutant {mutant.name} does not apply to this tree (the source changed; update "
                         f"tests/mutation/mutants.py):\n  " + "\n  ".join(problems))
    return {p: t.encode() for p, t in out.items()}


def check_mutants(files: dict, mutants=MUTANTS) -> list:
    """Every problem with `mutants` against `files` (the suite's self-test, tests/test_mutation.py): a replacement
    that does not match exactly once, a mutant that changes nothing, a name used twice, an unknown kind or dtype, a
    selection naming a test file that does not exist, a mutated Python file that no longer compiles."""
    problems, seen = [], set()
    for m in mutants:
        if m.name in seen:
            problems.append(f"{m.name}: name used twice")
        seen.add(m.name)
        if m.kind not in KIND_ORDER:
            problems.append(f"{m.name}: unknown kind {m.kind!r}")
        if not m.dtypes or set(m.dtypes) - set(ALL_DTYPES):
            problems.append(f"{m.name}: dtypes {m.dtypes} not a non-empty subset of {ALL_DTYPES}")
        if m.kind == "cpp" and not all(p.startswith("csrc/") for p, _, _ in m.replacements):
            problems.append(f"{m.name}: a cpp mutant changes only csrc/ (the rest is not rebuilt)")
        if m.kind != "cpp" and any(p.startswith("csrc/") for p, _, _ in m.replacements):
            problems.append(f"{m.name}: changes csrc/ but is not of kind cpp (the extension would not be rebuilt)")
        try:
            changed = mutate(m, files)
        except CheckError as e:
            problems.append(str(e))
            continue
        if all(changed[p] == files[p] for p in changed):
            problems.append(f"{m.name}: the replacements change nothing")
        for p, text in changed.items():
            if p.endswith(".py"):
                try:
                    compile(text, p, "exec")
                except SyntaxError as e:
                    problems.append(f"{m.name}: {p} no longer compiles: {e}")
        for arg in m.tests:
            path = arg.split("::")[0]
            if path.startswith("tests/") and path not in files:
                problems.append(f"{m.name}: selection names {path}, which is not a tracked file")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# The work tree


class Tree:
    """A copy of the tracked files at `path`, written file by file only where the content differs (unchanged files
    keep their timestamps, so ninja rebuilds only what a C++ mutant touched)."""

    def __init__(self, workdir: str, files: dict):
        self.workdir = workdir
        self.path = os.path.join(workdir, "tree")
        self.files = files
        self.manifest = os.path.join(workdir, "manifest.json")

    def sync(self, overrides: dict | None = None) -> None:
        overrides = overrides or {}
        os.makedirs(self.path, exist_ok=True)
        old = []
        if os.path.exists(self.manifest):
            with open(self.manifest) as f:
                old = json.load(f)
        for rel in set(old) - set(self.files):  # tracked before, not any more
            full = os.path.join(self.path, rel)
            if os.path.isfile(full):
                os.remove(full)
        for rel, content in self.files.items():
            want = overrides.get(rel, content)
            full = os.path.join(self.path, rel)
            try:
                with open(full, "rb") as f:
                    if f.read() == want:
                        continue
            except FileNotFoundError:
                os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(want)
        with open(self.manifest, "w") as f:
            json.dump(sorted(self.files), f)
        # kernels/ is installed as llmkern.kernels (pyproject.toml's package-dir); in the tree, a link makes
        # `import llmkern.kernels` find the tree's kernels/ (and not the checkout's, which an editable install maps).
        link = os.path.join(self.path, "llmkern", "kernels")
        if not os.path.islink(link):
            if os.path.exists(link):
                shutil.rmtree(link)
            os.symlink(os.path.join("..", "kernels"), link)

    def build_hash(self) -> str:
        h = hashlib.sha256()
        for rel in sorted(self.files):
            if rel.startswith("csrc/") or rel in BUILD_INPUTS:
                with open(os.path.join(self.path, rel), "rb") as f:
                    h.update(rel.encode() + b"\0" + f.read() + b"\0")
        return h.hexdigest()

    def ensure_built(self, log_name: str) -> tuple:
        """Build the extension in the tree when csrc/ differs from the last build. Returns (ok, log path)."""
        stamp = os.path.join(self.workdir, "built.sha256")
        want = self.build_hash()
        have = open(stamp).read().strip() if os.path.exists(stamp) else ""
        so = [f for f in os.listdir(os.path.join(self.path, "llmkern")) if f.startswith("_C.") and f.endswith(".so")]
        log = os.path.join(self.workdir, "logs", f"build-{log_name}.log")
        if have == want and so:
            return True, None
        os.makedirs(os.path.dirname(log), exist_ok=True)
        env = dict(os.environ, LLMKERN_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
        env.pop("LLMKERN_NO_EXT", None)
        print(f"    building the extension in the tree (log: {log}) ...", flush=True)
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=self.path, env=env,
                                stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            if os.path.exists(stamp):
                os.remove(stamp)
            return False, log
        with open(stamp, "w") as f:
            f.write(want)
        return True, log

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.path, plugin_dir(self.path)] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.pop("LLMKERN_NO_EXT", None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def check_imports(self) -> None:
        """llmkern, llmkern.kernels and the extension must come from the tree, or every result would be about the
        checkout instead."""
        code = ("import os; os.environ.setdefault('TRITON_INTERPRET', '1'); import llmkern, llmkern.kernels, "
                "llmkern.kernels.cache_ops as k, llmkern._C as c; print(llmkern.__file__); print(k.__file__); "
                "print(c.__file__)")
        out = subprocess.run([sys.executable, "-c", code], cwd=self.path, env=self.env(), capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise CheckError(f"cannot import llmkern from the work tree {self.path}:\n{out.stderr[-3000:]}")
        real = os.path.realpath(self.path)
        for line in out.stdout.split():
            if not os.path.realpath(line).startswith(real + os.sep):
                raise CheckError(f"{line} is imported from outside the work tree {real}: the mutants would not be "
                                 f"tested (PYTHONPATH={self.env()['PYTHONPATH']})")


def plugin_dir(tree: str) -> str:
    """tests/mutation/ inside the tree (where the pytest plugin is imported from)."""
    return os.path.join(tree, "tests", "mutation")


# ---------------------------------------------------------------------------------------------------------------------
# Running a selection


def run_selection(tree: Tree, args: tuple, label: str, dtypes=(), stop_after: int = 0, timeout: int = 3600) -> dict:
    """pytest `args` in the tree with the plugin; returns {"records": [...], "returncode", "timed_out", "log"}."""
    logs = os.path.join(tree.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    out_jsonl = os.path.join(logs, f"{label}.jsonl")
    log = os.path.join(logs, f"{label}.log")
    if os.path.exists(out_jsonl):
        os.remove(out_jsonl)
    env = tree.env()
    env.update(MUTATION_OUT=out_jsonl, MUTATION_DTYPES=",".join(dtypes), MUTATION_STOP_AFTER=str(stop_after))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "mutation_plugin", "-p", "no:cacheprovider", *args]
    timed_out = False
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=tree.path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    records = []
    if os.path.exists(out_jsonl):
        with open(out_jsonl) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return {"records": records, "returncode": rc, "timed_out": timed_out, "log": log}


def outcomes(run: dict) -> dict:
    """nodeid -> {"outcome": passed|failed|skipped|crashed, "dtypes": [...], "message"}; a test that started and
    never reported (the interpreter died) is "crashed"."""
    res, started = {}, []
    for r in run["records"]:
        if r["event"] == "start":
            started.append(r["nodeid"])
        elif r["event"] == "report":
            cur = res.get(r["nodeid"])
            # failed beats skipped beats passed across a test's setup/call/teardown reports
            rank = {"passed": 0, "skipped": 1, "failed": 2}
            if cur is None or rank[r["outcome"]] > rank[cur["outcome"]]:
                res[r["nodeid"]] = {"outcome": r["outcome"], "dtypes": r["dtypes"], "message": r["message"]}
            elif r["dtypes"]:
                cur["dtypes"] = sorted(set(cur["dtypes"]) | set(r["dtypes"]))
    finished = any(r["event"] == "finish" for r in run["records"])
    if not finished and started and started[-1] not in res and not run["timed_out"]:
        res[started[-1]] = {"outcome": "crashed", "dtypes": [], "message": f"the test process exited with status "
                                                                         f"{run['returncode']} during this test"}
    return res


def classify(mutant: Mutant, run: dict) -> dict:
    """Per dtype of the mutant: KILLED (with the failing tests), SURVIVED (with the number of tests that passed),
    NOT RUN or TIMEOUT."""
    res = outcomes(run)
    per = {}
    for d in mutant.dtypes:
        ran = {n: o for n, o in res.items() if d in o["dtypes"] and o["outcome"] in ("passed", "failed")}
        failed = sorted(n for n, o in ran.items() if o["outcome"] == "failed")
        crashed = sorted(n for n, o in res.items() if o["outcome"] == "crashed" and (d in o["dtypes"] or not o["dtypes"]))
        if failed or crashed:
            per[d] = {"status": "KILLED", "tests": failed + crashed, "passed": len(ran) - len(failed),
                      "messages": [res[n]["message"] for n in (failed + crashed)[:3]]}
        elif run["timed_out"]:
            per[d] = {"status": "TIMEOUT", "tests": [], "passed": len(ran)}
        elif ran:
            per[d] = {"status": "SURVIVED", "tests": [], "passed": len(ran)}
        else:
            per[d] = {"status": "NOT RUN", "tests": [], "passed": 0}
    other_failed = sorted(n for n, o in res.items() if o["outcome"] in ("failed", "crashed")
                          and not set(o["dtypes"]) & set(mutant.dtypes))
    stopped = any(r["event"] == "stop" for r in run["records"])
    return {"per_dtype": per, "other_failed": other_failed, "log": run["log"], "returncode": run["returncode"],
            "stopped_early": stopped}


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _cell(p: dict, stopped: bool = False) -> str:
    if p["status"] == "KILLED":
        return f"KILLED ({len(p['tests'])}{'+' if stopped else ''} failed)"
    if p["status"] == "SURVIVED":
        return f"SURVIVED ({p['passed']} passed)"
    return p["status"]


def report_text(results: list, baseline: str) -> str:
    lines = [f"Mutation check: {len(results)} mutants ({baseline})", ""]
    w = max(len(r["name"]) for r in results) if results else 10
    lines.append(f"{'mutant':{w}}  {'kind':6}  " + "  ".join(f"{d:22}" for d in ALL_DTYPES))
    for r in results:
        cells = []
        for d in ALL_DTYPES:
            p = r["per_dtype"].get(d)
            cells.append(f"{_cell(p, r.get('stopped_early')) if p else 'n/a':22}")
        lines.append(f"{r['name']:{w}}  {r['kind']:6}  " + "  ".join(cells))
    lines.append("")
    for r in results:
        lines.append(f"{r['name']} [{r['kind']}]: {r['bug']}")
        if r.get("error"):
            lines.append(f"  ERROR: {r['error']}")
        for d, p in r["per_dtype"].items():
            if p["status"] == "KILLED":
                shown = ", ".join(t.split("::", 1)[-1] for t in p["tests"][:4])
                more = f" and {len(p['tests']) - 4} more" if len(p["tests"]) > 4 else ""
                lines.append(f"  {d}: KILLED by {shown}{more}")
                if p.get("messages"):
                    lines.append(f"        e.g. {p['messages'][0][:200]}")
            else:
                lines.append(f"  {d}: {_cell(p)}")
        if r.get("other_failed"):
            lines.append(f"  also failed (no dtype of the mutant): {', '.join(r['other_failed'][:4])}")
        if r.get("note"):
            lines.append(f"  note: {r['note']}")
        lines.append(f"  selection: {' '.join(r['tests'])}; log: {r.get('log')}")
        lines.append("")
    killed = [r for r in results if r["per_dtype"] and all(p["status"] == "KILLED" for p in r["per_dtype"].values())]
    lines.append("n/a: the mutant is the original program in that dtype (see its note); N+ failed: its run stopped "
                 "once every dtype had N failing tests")
    lines.append(f"{len(killed)} of {len(results)} mutants killed in every dtype they name; not everywhere: "
                 + (", ".join(r["name"] for r in results if r not in killed) or "none"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--kind", choices=sorted(KIND_ORDER), action="append", help="run mutants of this kind only")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--check", action="store_true", help="only check that every mutant applies, and exit")
    ap.add_argument("--workdir", help="work tree and logs (kept between runs)")
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first (full rebuild)")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the selections unmutated first")
    ap.add_argument("--stop-after", type=int, default=3,
                    help="stop a mutant's run once each of its dtypes has this many failing tests (0: run it all)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    ap.add_argument("--json", help="also write the results as JSON here (default: <workdir>/report.json)")
    args = ap.parse_args(argv)

    try:
        root = repo_root()
        files = tracked_files(root)
        mutants = by_name(args.only) if args.only else list(MUTANTS)
        if args.kind:
            mutants = [m for m in mutants if m.kind in args.kind]
        mutants.sort(key=lambda m: KIND_ORDER.get(m.kind, 9))  # stable: the C++ ones (rebuilds) last
        if args.list:
            for m in mutants:
                print(f"{m.name:42} {m.kind:6} {','.join(m.dtypes):15} {m.bug}")
            return 0
        problems = check_mutants(files, mutants)
        if problems:
            raise CheckError("the mutants do not apply to this tree:\n" + "\n".join(problems))
        if args.check:
            print(f"{len(mutants)} mutants apply to {root}")
            return 0

        workdir = args.workdir or os.path.join(
            tempfile.gettempdir(), "llmkern-mutation-" + hashlib.sha1(root.encode()).hexdigest()[:10])
        if args.fresh and os.path.isdir(workdir):
            shutil.rmtree(workdir)
        os.makedirs(workdir, exist_ok=True)
        tree = Tree(workdir, files)
        print(f"work tree: {tree.path} (copy of the tracked files of {root})", flush=True)
        tree.sync()
        ok, log = tree.ensure_built("baseline")
        if not ok:
            raise CheckError(f"the unmutated extension does not build in the work tree; see {log}")
        tree.check_imports()

        baseline = "baseline skipped (--no-baseline)"
        if not args.no_baseline:
            selections = list(dict.fromkeys(m.tests for m in mutants))
            print(f"baseline: {len(selections)} selections on the unmutated tree", flush=True)
            bad = []
            for i, sel in enumerate(selections):
                run = run_selection(tree, sel, f"baseline-{i}", timeout=args.timeout)
                res = outcomes(run)
                failed = sorted(n for n, o in res.items() if o["outcome"] in ("failed", "crashed"))
                ran = sum(o["outcome"] in ("passed", "failed") for o in res.values())
                print(f"  {' '.join(sel)}: {ran} ran, {len(failed)} failed", flush=True)
                if failed or run["timed_out"] or run["returncode"] not in (0,) or ran == 0:
                    bad.append(f"{' '.join(sel)}: {len(failed)} failed {failed[:5]}, exit {run['returncode']}"
                               f"{', timed out' if run['timed_out'] else ''}; log {run['log']}")
            if bad:
                raise CheckError("the unmutated tree does not pass the selections, so no kill would mean anything:\n"
                                 + "\n".join(bad))
            baseline = f"baseline: {len(selections)} selections pass unmutated"

        results = []
        for m in mutants:
            print(f"mutant {m.name} [{m.kind}]: {m.bug}", flush=True)
            tree.sync(mutate(m, files))
            entry = {"name": m.name, "kind": m.kind, "bug": m.bug, "note": m.note, "tests": list(m.tests),
                     "dtypes": list(m.dtypes)}
            ok, log = tree.ensure_built(m.name)
            if not ok:
                entry.update(per_dtype={d: {"status": "BUILD FAILED", "tests": [], "passed": 0} for d in m.dtypes},
                             error=f"the mutated extension does not build (an invalid mutant): {log}", log=log)
                results.append(entry)
                continue
            run = run_selection(tree, m.tests, m.name, m.dtypes, args.stop_after, args.timeout)
            entry.update(classify(m, run))
            results.append(entry)
            print("    " + "  ".join(f"{d}: {_cell(p, entry['stopped_early'])}" for d, p in entry["per_dtype"].items()),
                  flush=True)
        tree.sync()  # the tree as the checkout has it again (the next run rebuilds if a C++ mutant was last)

        text = report_text(results, baseline)
        print("\n" + text)
        with open(os.path.join(workdir, "report.txt"), "w") as f:
            f.write(text + "\n")
        with open(args.json or os.path.join(workdir, "report.json"), "w") as f:
            json.dump({"baseline": baseline, "results": results}, f, indent=1)
        survived = [r for r in results if any(p["status"] != "KILLED" for p in r["per_dtype"].values())]
        return 1 if survived else 0
    except CheckError as e:
        print(f"mutation check: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
