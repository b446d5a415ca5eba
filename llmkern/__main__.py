"""``python -m llmkern demo|inspect|bench|serve`` (also installed as the ``llmkern`` command)."""

import sys

# The one program name every usage line shows (the subcommands' parsers are "<PROG> demo", ...).
PROG = "python -m llmkern"

USAGE = f"""usage: {PROG} [-h] [--version] {{demo,inspect,bench,serve}} [options]

  demo     generate with eager and with the patched model; compare tokens and ms/token
  inspect  compile every Triton kernel config for sm_80/sm_90 (no GPU needed); registers, smem, spills
  bench    the quick benchmark suite
  serve    transformers' OpenAI-compatible server (`transformers serve`) with the model it loads patched

  -h, --help  show this message and exit
  --version   show llmkern's version and exit

'{PROG} COMMAND --help' for a command's options."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from llmkern import __version__

        print(f"{PROG} {__version__}")
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
            print(f"{PROG} bench: the benchmark suite is not part of this build yet", file=sys.stderr)
            return 2
    elif cmd == "serve":
        from llmkern.serve import main as run
    else:
        print(f"{USAGE}\n\n{PROG}: error: unknown command {cmd!r} (choose from demo, inspect, bench, serve)",
              file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
