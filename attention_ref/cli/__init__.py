"""Command line: ``attention-ref [check | cases | compare | golden | verify]``.

Layer 5 of attention_ref, the top: it may import every other layer. Also run as
``python -m attention_ref``. With no subcommand it runs ``check``, the main job. Every subcommand
has ``--help``; ``--json`` prints machine-readable output on stdout, ``--markdown`` (``check``,
``compare``, ``verify``) prints the table as Markdown, and progress lines go to stderr
(``--quiet`` silences them).

Exit status (the same for every subcommand; tested in ``tests/test_cli_errors.py``):

* 0 -- done, everything passed;
* 1 -- a check failed: a gradient, a conformance row, a golden set that is invalid or differs;
* 2 -- usage: a bad argument or option (an unknown case, a negative seed, a directory the golden
  writer may not replace); nothing was written;
* 3 -- the environment failed: the file system (permissions, a full disk), the terminal (stdout
  closed or full), or a framework that is not installed;
* 4 -- an internal error (a bug in attention_ref: please report it);
* 130 -- interrupted (Ctrl-C); 141 -- the reader closed the pipe (``attention-ref cases | head``).

Errors are one line on stderr, ``attention-ref: error: ...``; no traceback is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attention-ref",
        description="attention_ref: the NumPy ground truth for multi-head attention. "
        "With no subcommand, runs 'check'.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{check,cases,compare,golden,verify}")

    check = sub.add_parser(
        "check",
        help="verify every backward against finite differences and the complex step (the default)",
        description="Run every stage's backward, and scaled dot-product and multi-head attention "
        "on every canonical case, and compare each gradient with finite differences (a "
        "central-difference VJP with a random cotangent) and with the complex step (exact to "
        "round-off). Prints a table: case, function, worst relative error, pass/fail. Exit status "
        "1 if any gradient fails.",
    )
    check.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="0 (default): the canonical inputs; another value draws other inputs for the same "
        "cases",
    )
    check.add_argument(
        "--quick", action="store_true", help="leave out the long cases and the realistic-size run"
    )
    _common(check, markdown=True)

    lister = sub.add_parser(
        "cases",
        help="list the canonical cases",
        description="List the canonical cases (attention_ref.cases): name, kind, dimensions, "
        "options.",
    )
    lister.add_argument("--json", action="store_true", help="machine-readable output")

    golden = sub.add_parser(
        "golden",
        help="write golden test vectors (.npz + manifest.json) for implementations outside Python",
        description="Write golden test vectors into DIR: for each canonical case, <case>.npz with "
        "its inputs, options, cotangent, output, gradients and intermediates (uncompressed .npy "
        "entries, little-endian float64 or bool), and manifest.json with the format version, the "
        "conventions, and every array's shape, dtype and sha256. The format is documented in "
        "docs/golden.md. Refuses a non-empty DIR unless --overwrite.",
    )
    golden.add_argument("directory", metavar="DIR", help="where to write (created if missing)")
    golden.add_argument(
        "--cases",
        nargs="+",
        metavar="NAME",
        help="only these cases (default: all; 'attention-ref cases' lists them)",
    )
    golden.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the golden set in a non-empty DIR: exactly the files its manifest.json "
        "lists, atomically; every other file is kept",
    )
    _common(golden)

    verify = sub.add_parser(
        "verify",
        help="verify a golden set's checksums, and its outputs or a candidate's",
        description="Read the golden set in DIR and verify every checksum, shape and dtype "
        "against its manifest (a corrupt or incomplete set fails). Then, without --candidate, "
        "recompute the reference from the stored inputs and compare the stored outputs, gradients "
        "and intermediates with it; with --candidate DIR2, compare the implementation's outputs "
        "in DIR2/<case>.npz (output.out required; any grad.* and intermediate.*) with the stored "
        "ones. Rule: |actual - reference| <= atol + rtol |reference| (float64 default rtol 1e-12, "
        "atol 1e-14), or with --precision the error-budget rule for outputs and gradients. Exit "
        "status 1 on any failure.",
    )
    verify.add_argument("directory", metavar="DIR", help="the golden set")
    verify.add_argument(
        "--candidate",
        metavar="DIR2",
        help="a directory of the implementation's outputs, <case>.npz each",
    )
    verify.add_argument(
        "--cases", nargs="+", metavar="NAME", help="only these cases (default: all of DIR)"
    )
    verify.add_argument("--rtol", type=float, help="relative tolerance (default 1e-12 for float64)")
    verify.add_argument("--atol", type=float, help="absolute tolerance (default 1e-14 for float64)")
    verify.add_argument(
        "--precision",
        choices=("float32", "float16", "bfloat16"),
        help="the candidate's precision: judge output and gradients by the error-budget rule",
    )
    _common(verify, markdown=True)

    compare = sub.add_parser(
        "compare",
        help="run an installed framework's attention on every canonical case and judge it",
        description="Run PyTorch's F.scaled_dot_product_attention and nn.MultiheadAttention "
        "(torch), or jax.nn.dot_product_attention and a jnp multi-head attention around it (jax), "
        "through the adapters on every canonical case, forward and backward with the case's "
        "random cotangent, and print a conformance table: case, output or gradient, relative "
        "error, pass/fail/skip, and the rule (float64: 1e-12 relative for torch; the error-budget "
        "rule against a float32 baseline for jax, whose softmax is float32). Fully masked rows "
        "follow the framework's convention. Options the framework cannot express are skipped with "
        "the reason. Exit status 1 if any row fails.",
    )
    compare.add_argument(
        "framework", choices=("torch", "jax"), help="the framework to run (must be installed)"
    )
    compare.add_argument(
        "--cases", nargs="+", metavar="NAME", help="only these canonical cases (default: all)"
    )
    _common(compare, markdown=True)
    return parser


def _seed(text: str) -> int:
    """``--seed``: a non-negative int (numpy's seeds are)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative int; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative int; got {value}")
    return value


def _common(p: argparse.ArgumentParser, markdown: bool = False) -> None:
    """Add ``--quiet`` and ``--json``, and with ``markdown`` also ``--markdown`` (not with both)."""
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    output = p.add_mutually_exclusive_group() if markdown else p
    output.add_argument(
        "--json", action="store_true", help="machine-readable JSON on stdout instead of a table"
    )
    if markdown:
        output.add_argument(
            "--markdown",
            action="store_true",
            help="print the table as a Markdown table (GitHub-flavoured: to paste "
            "into an issue or a pull request) instead of aligned text; the lines "
            "around it are unchanged",
        )


def _list_cases(as_json: bool) -> int:
    from ..oracle.cases import cases, serving_cases

    all_cases = cases() + serving_cases()
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "name": c.name,
                        "kind": c.kind,
                        "description": c.description,
                        "dims": dict(c.dims),
                        "options": {k: v for k, v in c.options.items()},
                        "extras": list(c.extras),
                        "tags": list(c.tags),
                    }
                    for c in all_cases
                ],
                indent=1,
            )
        )
        return 0
    width = max(len(c.name) for c in all_cases)
    for c in all_cases:
        dims = " ".join(f"{k}={v}" for k, v in c.dims.items())
        print(f"{c.name:<{width}}  {c.kind:<7}  {dims}")
        print(f"{'':<{width}}           {c.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (the module docstring lists them).

    A reader that closes the pipe early (``attention-ref cases | head``) ends the run quietly
    with status 141 (128 + SIGPIPE, what a shell reports for a program killed by it).
    """
    try:
        status = _run(argv)
        if sys.stdout is not None:  # None: started with stdout closed; print() wrote nothing
            sys.stdout.flush()  # a broken pipe or a full device shows up here when buffered
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except (ValueError, TypeError) as exc:
        _error(str(exc))
        return 2
    except ImportError as exc:
        _error(str(exc))
        return 3
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}")
        _silence_stdout()  # a full stdout would fail again when Python flushes it at exit
        return 3
    except Exception as exc:  # a bug: one line, not a traceback
        _error(f"internal error ({type(exc).__name__}: {exc}); please report it")
        return 4
    return status


def _error(message: str) -> None:
    """One line on stderr, if there is a stderr to write to."""
    try:
        if sys.stderr is not None:
            print(f"attention-ref: error: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


def _silence_stdout() -> None:
    """Point stdout at devnull, so that the flush at exit cannot fail again (Python's documented
    recipe for a broken pipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno() if sys.stdout is not None else 1)
    except (OSError, ValueError):
        pass


def _run(argv: list[str] | None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "check")  # no subcommand: the main job
    args = parser.parse_args(argv)
    if args.command == "cases":
        return _list_cases(args.json)
    if args.command == "compare":
        from ..oracle.conformance import main_compare

        return main_compare(
            args.framework, args.cases, quiet=args.quiet, as_json=args.json, markdown=args.markdown
        )
    if args.command in ("golden", "verify"):
        from ..oracle import golden

        if args.command == "golden":
            return golden.main_golden(
                args.directory,
                args.cases,
                overwrite=args.overwrite,
                quiet=args.quiet,
                as_json=args.json,
            )
        return golden.main_verify(
            args.directory,
            args.candidate,
            args.cases,
            rtol=args.rtol,
            atol=args.atol,
            precision=args.precision,
            quiet=args.quiet,
            as_json=args.json,
            markdown=args.markdown,
        )
    from ..oracle.check import main_check

    return main_check(
        seed=args.seed,
        quiet=args.quiet,
        as_json=args.json,
        quick=args.quick,
        markdown=args.markdown,
    )


if __name__ == "__main__":
    sys.exit(main())
