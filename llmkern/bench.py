"""``python -m llmkern bench``: the quick benchmark suite — every ``benchmarks/bench_*.py`` in ``--quick`` mode, one
after another, each in its own process (so one script's allocations and thread settings do not skew the next).

The scripts live in the source tree (``benchmarks/`` next to ``llmkern/``), not in the installed package: run this
from a checkout (``pip install -e .``). Results: each script's table on stdout, rows appended to the CSV.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SCRIPTS = ("rms_norm", "rope", "swiglu", "kv_cache", "decode_attention", "linear", "e2e")


def benchmarks_dir() -> str | None:
    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    return d if os.path.exists(os.path.join(d, "_harness.py")) else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmkern bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(SCRIPTS)}")
    p.add_argument("--full", action="store_true", help="full sweeps instead of --quick (long on CPU)")
    p.add_argument("--dry-run", action="store_true", help="each script's --dry-run (seconds; numbers meaningless)")
    p.add_argument("--device", default=None, help="passed to every script (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="passed to every script")
    p.add_argument("--threads", type=int, default=None, help="passed to every script (torch CPU threads)")
    p.add_argument("--compile", action="store_true", help="add torch.compile providers")
    p.add_argument("--csv", default=None, help="CSV every script appends to (default benchmarks/results/results.csv)")
    p.add_argument("--plot", action="store_true", help="PNG per op next to the CSV (needs matplotlib)")
    args = p.parse_args(argv)

    d = benchmarks_dir()
    if d is None:
        print("python -m llmkern bench: benchmarks/ not found next to the llmkern package; run it from a source "
              "checkout installed with `pip install -e .`", file=sys.stderr)
        return 2
    scripts = list(SCRIPTS)
    if args.only:
        scripts = [s.strip() for s in args.only.split(",") if s.strip()]
        if bad := [s for s in scripts if s not in SCRIPTS]:
            p.error(f"--only: unknown {bad}; expected a subset of {', '.join(SCRIPTS)}")
    common = [] if args.full else ["--quick"]
    if args.dry_run:
        common.append("--dry-run")
    for flag in ("device", "dtype", "threads", "csv"):
        if getattr(args, flag) is not None:
            common += [f"--{flag}", str(getattr(args, flag))]
    if args.compile:
        common.append("--compile")
    if args.plot:
        common.append("--plot")

    failed = []
    t0 = time.perf_counter()
    for s in scripts:
        cmd = [sys.executable, os.path.join(d, f"bench_{s}.py"), *common]
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd)
        if rc:
            failed.append(f"{s} (exit {rc})")
    print(f"\nbenchmark suite: {len(scripts) - len(failed)}/{len(scripts)} scripts ok in "
          f"{time.perf_counter() - t0:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
