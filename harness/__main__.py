"""Command-line entry points of the harness.

    python -m harness check [PYTEST-ARGS...]   every case on every backend, then the
                                               case/backend/result/time table
                                               (`make check`); non-zero on any failure
    python -m harness bless [CASE-FILES...]    rewrite goldens by running the cases on
                                               real QEMU (`make bless`)
    python -m harness run CASE-FILE [--backend NAME] [--raw]
                                               print one case's transcript; --raw
                                               also lists each command line before
                                               its output
    python -m harness fuzz [OPTIONS...]        random cases on the engine and real
                                               QEMU, disagreements shrunk and written
                                               as cases (`make fuzz`; --help lists
                                               the options)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "cases"


def _parallel() -> list[str]:
    return ["-n", "auto"] if importlib.util.find_spec("xdist") is not None else []


def _pytest(args: list[str]) -> int:
    import pytest

    return int(pytest.main(["--rootdir", str(ROOT), *args]))


def _is_case_target(arg: str) -> bool:
    """A case file (with or without a ::selector) or a folder of them; an
    option's value that happens to name a file is not one."""
    path = Path(arg.split("::")[0])
    return path.suffix == ".yaml" or (path.is_dir() and any(path.glob("*.yaml")))


def check(extra: list[str]) -> int:
    targets = [arg for arg in extra if _is_case_target(arg)]
    for target in targets:
        # pytest under xdist would only say "no tests ran" for a mistyped case
        if not Path(target.split("::")[0]).exists():
            print(f"harness check: {target}: no such case file", file=sys.stderr)
            return 2
    targets = [] if targets else [str(CASES)]
    return _pytest([*targets, "--backend", "all", "--case-report", "-q", *_parallel(), *extra])


def bless(cases: list[str]) -> int:
    from harness.backends import get_backend

    reason = get_backend("qemu").unavailable()
    if reason is not None:
        print(f"harness bless: goldens are written by real QEMU, and {reason}",
              file=sys.stderr)
        return 2
    targets = cases or [str(CASES)]
    for target in targets:
        if not Path(target).exists():
            print(f"harness bless: {target}: no such case file", file=sys.stderr)
            return 2
        if not _is_case_target(target):
            print(f"harness bless: {target} is not a case file (cases/NNN-name.yaml) "
                  "or a folder of them", file=sys.stderr)
            return 2
    workers = _parallel() if len(targets) > 1 or not cases else []
    return _pytest([*targets, "--backend", "qemu", "--regen-all", "--case-report", "-q",
                    *workers])


def run(case_file: str, backend_name: str, raw: bool) -> int:
    from harness.backends import BACKENDS, BackendError, get_backend
    from harness.loader import load_case
    from harness.runner import run_case
    from harness.schema import CaseError, Command

    if backend_name not in BACKENDS:
        print(f"harness run: unknown backend {backend_name!r} "
              f"(choose from {', '.join(BACKENDS)})", file=sys.stderr)
        return 2
    try:
        case = load_case(case_file)
    except CaseError as error:
        print(error, file=sys.stderr)
        return 2
    backend = get_backend(backend_name)
    reason = backend.unavailable()
    if reason is not None:
        print(f"harness run: {backend_name} backend: {reason}", file=sys.stderr)
        return 2
    try:
        transcript = run_case(case, backend)
    except BackendError as error:
        print(f"harness run: {backend_name} backend: {error}", file=sys.stderr)
        return 2
    for piece in transcript.pieces:
        if raw and isinstance(piece.step, Command):
            sys.stdout.write(f"$ {piece.step.display()}\n")
        sys.stdout.write(piece.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="run every case on every backend, with a report",
                        add_help=False)
    bless_parser = commands.add_parser("bless", help="rewrite goldens from real QEMU")
    bless_parser.add_argument("cases", nargs="*", help="case files (default: all)")
    run_parser = commands.add_parser("run", help="print one case's transcript")
    run_parser.add_argument("case")
    run_parser.add_argument("--backend", default="engine")
    run_parser.add_argument("--raw", action="store_true",
                            help="show each command line before its output")
    commands.add_parser("fuzz", help="differential fuzzing against real QEMU", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "check":
        return check(rest)
    if args.command == "fuzz":
        from harness.fuzz.cli import main as fuzz

        return fuzz(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "bless":
        return bless(args.cases)
    return run(args.case, args.backend, args.raw)


def _main_quietly_on_a_closed_pipe() -> int:
    try:
        status = main()
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # the reader (say `| head`) has all it wanted; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_main_quietly_on_a_closed_pipe())
