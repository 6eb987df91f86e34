"""Command line: ``python -m attention_ref [check]`` (also the console script ``attention-ref``)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attention-ref",
        description="attention_ref: the NumPy ground truth for multi-head attention.",
    )
    sub = parser.add_subparsers(dest="command")
    check = sub.add_parser(
        "check",
        help="verify every backward against finite differences (the default command)",
        description="Run a multi-head attention forward and backward, and every stage's backward, "
        "and compare each gradient with finite differences (a central-difference VJP with random "
        "cotangents). "
        "Exit status 1 if any gradient fails.",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    check.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "check")  # no subcommand: the main job
    args = parser.parse_args(argv)
    from .report import main_check

    return main_check(seed=args.seed, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
