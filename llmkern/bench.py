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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default after its help."""


def build_parser() -> argparse.ArgumentParser:
    from llmkern.__main__ import PROG

    p = argparse.ArgumentParser(prog=f"{PROG} bench", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--only", default=",".join(SCRIPTS), metavar="NAMES",
                   help="comma-separated subset of the scripts to run")
    p.add_argument("--full", action="store_true", help="full sweeps instead of each script's --quick (long on CPU)")
    p.add_argument("--dry-run", action="store_true", help="each script's --dry-run (seconds; numbers meaningless)")
    cuda = _cuda()
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cpu or cuda[:N], passed to every script")
    p.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["fp32", "fp16", "bf16"],
                   help="element type, passed to every script")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads, passed to every script (0: torch's own choice)")
    p.add_argument("--compile", action="store_true", help="add torch.compile providers")
    p.add_argument("--csv", default=os.path.join(benchmarks_dir() or "benchmarks", "results", "results.csv"),
                   help="CSV every script appends its rows to")
    p.add_argument("--plot", action="store_true", help="a PNG per op next to the CSV (needs matplotlib)")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    d = benchmarks_dir()
    if d is None:
        print(f"{p.prog}: benchmarks/ not found next to the llmkern package; run it from a source "
              "checkout installed with `pip install -e .`", file=sys.stderr)
        return 2
    scripts = [s.strip() for s in args.only.split(",") if s.strip()]
    if bad := [s for s in scripts if s not in SCRIPTS]:
        p.error(f"--only must be a comma-separated subset of {', '.join(SCRIPTS)}; got unknown {', '.join(bad)}")
    common = [] if args.full else ["--quick"]
    if args.dry_run:
        common.append("--dry-run")
    for flag in ("device", "dtype", "csv"):
        common += [f"--{flag}", str(getattr(args, flag))]
    if args.threads:
        common += ["--threads", str(args.threads)]
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
