"""``python -m llmkern demo|inspect|bench`` (also installed as the ``llmkern`` command)."""

import sys

USAGE = """usage: python -m llmkern {demo,inspect,bench} [options]

  demo     generate with eager and with the patched model; compare tokens and ms/token
  inspect  compile every Triton kernel config for sm_80/sm_90 (no GPU needed); registers, smem, spills
  bench    the quick benchmark suite

'python -m llmkern COMMAND --help' for a command's options."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from llmkern.demo import main as run
    elif cmd == "inspect":
        from llmkern.inspect import main as run
    elif cmd == "bench":
        try:
            from llmkern.bench import main as run
        except ImportError:
            print("python -m llmkern bench: the benchmark suite is not part of this build yet", file=sys.stderr)
            return 2
    else:
        print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
