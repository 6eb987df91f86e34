"""Command line: ``python -m attention_ref [check | cases | compare | golden | verify]``.

Also installed as the console script ``attention-ref``. With no subcommand it runs ``check``, the
main job. Every subcommand has ``--help``; ``--json`` prints machine-readable output on stdout,
and progress lines go to stderr (``--quiet`` silences them).
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attention-ref",
        description="attention_ref: the NumPy ground truth for multi-head attention. "
        "With no subcommand, runs 'check'.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{check,cases}")

    check = sub.add_parser(
        "check",
        help="verify every backward against finite differences and the complex step (the default)",
        description="Run every stage's backward, and scaled dot-product and multi-head attention on "
        "every canonical case, and compare each gradient with finite differences (a central-"
        "difference VJP with a random cotangent) and with the complex step (exact to round-off). "
        "Prints a table: case, function, worst relative error, pass/fail. Exit status 1 if any "
        "gradient fails.",
    )
    check.add_argument("--seed", type=int, default=0,
                       help="0 (default): the canonical inputs; another value draws other inputs for the same cases")
    check.add_argument("--quick", action="store_true", help="leave out the long cases and the realistic-size run")
    _common(check)

    lister = sub.add_parser(
        "cases", help="list the canonical cases",
        description="List the canonical cases (attention_ref.cases): name, kind, dimensions, options.",
    )
    lister.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout instead of a table")


def _list_cases(as_json: bool) -> int:
    from .cases import cases

    all_cases = cases()
    if as_json:
        print(json.dumps([{"name": c.name, "kind": c.kind, "description": c.description, "dims": dict(c.dims),
                           "options": {k: v for k, v in c.options.items()}, "extras": list(c.extras),
                           "tags": list(c.tags)} for c in all_cases], indent=1))
        return 0
    width = max(len(c.name) for c in all_cases)
    for c in all_cases:
        dims = " ".join(f"{k}={v}" for k, v in c.dims.items())
        print(f"{c.name:<{width}}  {c.kind:<4}  {dims}")
        print(f"{'':<{width}}        {c.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "check")  # no subcommand: the main job
    args = parser.parse_args(argv)
    if args.command == "cases":
        return _list_cases(args.json)
    from .report import main_check

    return main_check(seed=args.seed, quiet=args.quiet, as_json=args.json, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
