"""`python -m harness fuzz`: run random cases on two backends and report.

    python -m harness fuzz [--seed N] [--count N] [--start I] [--time-budget SECONDS]
                           [--jobs N] [--backends TESTED,REFERENCE] [--findings DIR]
                           [--max-findings N] [--no-shrink] [--shrink-runs N]
                           [--shrink-seconds SECONDS] [--compare-files]
                           [--case-timeout SECONDS] [--print-cases] [--pick-corpus N]

Cases `start` .. `start + count - 1` of the run seeded with `seed` are drawn
(harness.fuzz.generate), each run on the tested backend (default: engine)
and the reference (default: qemu) and compared (harness.fuzz.compare).
Progress goes to stderr while it runs; a summary (cases, operations,
disagreements, time) ends it. The time budget stops drawing new cases.

Disagreements are grouped by what they look like; one case of each group
(up to --max-findings) is shrunk (harness.fuzz.shrink) and written, with
a golden from real QEMU, under the findings folder (harness.fuzz.findings),
and the diff the harness would show for it is printed.

Exit status: 0 when every case agreed, 1 when some disagreed, 2 for a
usage problem (including real QEMU being absent: it is the oracle).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from harness.backends import BACKENDS, Backend, get_backend
from harness.fuzz.compare import Difference, Outcome, run_pair
from harness.fuzz.findings import Written, reveal, write_finding
from harness.fuzz.generate import covering_corpus, generate
from harness.fuzz.model import FuzzCase, render
from harness.fuzz.shrink import ShrinkResult, shrink

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_FINDINGS = "fuzz-findings"


@dataclass(frozen=True)
class Settings:
    """What every worker needs to run a case the same way."""

    seed: int
    tested: str = "engine"
    reference: str = "qemu"
    compare_files: bool = False
    case_timeout: float | None = 120.0
    deadline: float | None = None  # time.time() after which no new case starts
    shrink_runs: int = 400
    shrink_seconds: float = 300.0


@dataclass(frozen=True)
class CaseReport:
    """One case's result, small enough to send back from a worker."""

    index: int
    ran: bool
    operations: int = 0
    processes: int = 0
    seconds: float = 0.0
    differences: tuple[Difference, ...] = ()


@dataclass(frozen=True)
class ShrinkReport:
    index: int
    original: FuzzCase
    result: ShrinkResult
    outcome: Outcome  # of the shrunk case
    # the difference with the signature that was kept; None when the case no
    # longer disagrees at all (the disagreement came and went: not written)
    difference: Difference | None


@dataclass
class Tally:
    """The running totals the progress lines and the summary print."""

    started: float = field(default_factory=time.monotonic)
    ran: int = 0
    skipped: int = 0
    operations: int = 0
    processes: int = 0
    disagreeing: list[CaseReport] = field(default_factory=list)

    def add(self, report: CaseReport) -> None:
        if not report.ran:
            self.skipped += 1
            return
        self.ran += 1
        self.operations += report.operations
        self.processes += report.processes
        if report.differences:
            self.disagreeing.append(report)

    def groups(self) -> dict[tuple[str, str, str], list[CaseReport]]:
        """Disagreeing cases by (kind, step kind, first differing line) of each
        of their differences, so that one disagreement cannot hide another in
        the same case. Groups that start some case come first (the others are
        more often consequences of an earlier difference), then larger ones."""
        result: dict[tuple[str, str, str], list[CaseReport]] = {}
        leading: set[tuple[str, str, str]] = set()
        for report in sorted(self.disagreeing, key=lambda r: r.index):
            keys = [(*d.signature, d.detail) for d in report.differences]
            leading.add(keys[0])
            for key in dict.fromkeys(keys):
                result.setdefault(key, []).append(report)
        order = sorted(result, key=lambda key: (key not in leading, -len(result[key])))
        return {key: result[key] for key in order}


# -- running cases (in this process or in workers) ---------------------------------------

_settings: Settings | None = None


def _init_worker(settings: Settings) -> None:
    global _settings
    _settings = settings


def _backends(settings: Settings) -> tuple[Backend, Backend, Backend]:
    return get_backend(settings.tested), get_backend(settings.reference), get_backend("qemu")


def run_one(index: int, settings: Settings | None = None) -> CaseReport:
    settings = settings or _settings
    assert settings is not None
    if settings.deadline is not None and time.time() > settings.deadline:
        return CaseReport(index, ran=False)
    case = generate(settings.seed, index)
    tested, reference, qemu = _backends(settings)
    outcome = run_pair(case, tested, reference, qemu, compare_files=settings.compare_files,
                       timeout=settings.case_timeout)
    return CaseReport(index, ran=True, operations=case.operation_count(),
                      processes=case.step_count(), seconds=outcome.seconds,
                      differences=tuple(outcome.differences))


def shrink_one(job: tuple[int, tuple[str, str]], settings: Settings | None = None) -> ShrinkReport:
    """Shrink case `index` keeping a difference with `signature`."""
    index, signature = job
    settings = settings or _settings
    assert settings is not None
    tested, reference, qemu = _backends(settings)
    original = generate(settings.seed, index)

    def outcome_of(case: FuzzCase) -> Outcome:
        return run_pair(case, tested, reference, qemu, compare_files=settings.compare_files,
                        timeout=settings.case_timeout)

    def still_fails(case: FuzzCase) -> bool:
        return any(d.signature == signature for d in outcome_of(case).differences)

    result = shrink(original, still_fails, max_runs=settings.shrink_runs,
                    max_seconds=settings.shrink_seconds)
    outcome = outcome_of(result.case)
    matching = [d for d in outcome.differences if d.signature == signature]
    if not matching:  # the shrunk case passed this time: fall back to the original
        outcome = outcome_of(original)
        result = ShrinkResult(original, result.runs, 0, result.seconds, False)
        matching = [d for d in outcome.differences if d.signature == signature]
    return ShrinkReport(index, original, result, outcome,
                        matching[0] if matching else None)


def _map(function: Callable[..., object], items: Iterable[object], settings: Settings,
         jobs: int) -> Iterator[object]:
    """function(item) for each item, in worker processes when jobs > 1
    (results in completion order)."""
    items = list(items)
    if jobs <= 1 or len(items) <= 1:
        for item in items:
            yield function(item, settings)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(jobs, initializer=_init_worker, initargs=(settings,)) as pool:
        yield from pool.imap_unordered(function, items)


# -- the command -------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness fuzz", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None,
                        help="the run's seed (default: a random one, printed)")
    parser.add_argument("--count", type=int, default=100, help="cases to run (default 100)")
    parser.add_argument("--start", type=int, default=0,
                        help="index of the first case (default 0)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds")
    parser.add_argument("--jobs", "-j", type=int, default=0,
                        help="worker processes (default 0: one per CPU)")
    parser.add_argument("--backends", default="engine,qemu", metavar="TESTED,REFERENCE",
                        help="the backend under test and the reference (default engine,qemu)")
    parser.add_argument("--findings", default=DEFAULT_FINDINGS, metavar="DIR",
                        help=f"where shrunk findings are written (default {DEFAULT_FINDINGS}/)")
    parser.add_argument("--max-findings", type=int, default=5,
                        help="shrink and write at most this many kinds of disagreement")
    parser.add_argument("--no-shrink", action="store_true",
                        help="report disagreements without shrinking or writing them")
    parser.add_argument("--shrink-runs", type=int, default=400,
                        help="runs one shrink may take (default 400)")
    parser.add_argument("--shrink-seconds", type=float, default=300.0,
                        help="time one shrink may take (default 300)")
    parser.add_argument("--compare-files", action="store_true",
                        help="also require the image files to be byte-identical")
    parser.add_argument("--case-timeout", type=float, default=120.0, metavar="SECONDS",
                        help="a case running longer counts as a disagreement (default 120)")
    parser.add_argument("--print-cases", action="store_true",
                        help="print the cases as case files instead of running them")
    parser.add_argument("--pick-corpus", type=int, default=None, metavar="N",
                        help="print a corpus instead of running: at most N of the cases "
                             "that between them reach every corner the whole range "
                             "reaches (the format of tests/fuzz/corpus.txt)")
    args = parser.parse_args(argv)
    if args.count < 0 or args.start < 0:
        parser.error("--count and --start must not be negative")
    if args.time_budget is not None and not args.time_budget >= 0:  # also refuses nan
        parser.error("--time-budget must be a number of seconds, 0 or more")
    for option in ("shrink_seconds", "case_timeout"):
        if not getattr(args, option) > 0:
            parser.error(f"--{option.replace('_', '-')} must be a positive number of seconds")
    for option in ("jobs", "max_findings", "shrink_runs"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must not be negative")
    names = [name.strip() for name in args.backends.split(",")]
    if len(names) != 2 or any(name not in BACKENDS for name in names):
        parser.error(f"--backends takes two backends out of {', '.join(BACKENDS)}, "
                     f"tested first, not {args.backends!r} (qemu,qemu checks that "
                     "nothing but real differences is reported)")
    args.tested, args.reference = names
    findings = Path(args.findings)
    if findings.exists() and not findings.is_dir():
        parser.error(f"--findings {args.findings}: exists and is not a folder")
    return args


def main(argv: list[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = parse_args(sys.argv[1:] if argv is None else argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    indices = range(args.start, args.start + args.count)
    if args.pick_corpus is not None:
        out.write(corpus_text(seed, indices, args.pick_corpus))
        return 0
    if args.print_cases:
        for index in indices:
            out.write(render(generate(seed, index)))
            out.write("---\n" if index + 1 < indices.stop else "")
        return 0
    for name in ("qemu", args.tested, args.reference):
        reason = get_backend(name).unavailable()
        if reason is not None:
            print(f"harness fuzz: the {name} backend cannot run here: {reason} "
                  "(real QEMU is the fuzzer's oracle)", file=err)
            return 2
    jobs = args.jobs if args.jobs > 0 else (os.cpu_count() or 1)
    deadline = time.time() + args.time_budget if args.time_budget is not None else None
    settings = Settings(seed=seed, tested=args.tested, reference=args.reference,
                        compare_files=args.compare_files, case_timeout=args.case_timeout,
                        deadline=deadline, shrink_runs=args.shrink_runs,
                        shrink_seconds=args.shrink_seconds)
    print(f"harness fuzz: seed {seed}, cases {args.start}..{indices.stop - 1}, "
          f"{args.tested} against {args.reference}, {jobs} job(s)", file=err)
    tally = Tally()
    fuzz_seconds = _run_cases(indices, settings, jobs, tally, err)
    written: list[tuple[ShrinkReport, Written | None]] = []
    shrink_started = time.monotonic()
    if tally.disagreeing and not args.no_shrink and args.max_findings > 0:
        written = _shrink_and_write(tally, settings, jobs, args, out, err)
    shrink_seconds = time.monotonic() - shrink_started if written else 0.0
    _summary(tally, settings, args, written, fuzz_seconds, shrink_seconds, out)
    return 1 if tally.disagreeing else 0


def corpus_text(seed: int, indices: range, limit: int) -> str:
    picked = covering_corpus(seed, indices, limit)
    lines = [
        "# The fuzz corpus: SEED INDEX of generated cases that tests/fuzz/test_corpus.py",
        "# runs on the engine and on real QEMU on every change. Between them they reach",
        f"# every corner cases {indices.start}..{indices.stop - 1} of seed {seed} reach. "
        "Picked by",
        f"#   python -m harness fuzz --seed {seed} --start {indices.start} "
        f"--count {len(indices)} --pick-corpus {limit}",
        "# (pick again when the generator changes what a seed draws).",
    ]
    lines += [f"{seed} {index}" for index in picked]
    return "\n".join(lines) + "\n"


def _run_cases(indices: range, settings: Settings, jobs: int, tally: Tally,
               err: TextIO) -> float:
    started = time.monotonic()
    last_report = started
    every = max(1, len(indices) // 10)
    try:
        for report in _map(run_one, indices, settings, jobs):
            assert isinstance(report, CaseReport)
            tally.add(report)
            if report.differences:
                first = report.differences[0]
                print(f"  case {report.index}: {first.kind} of {first.step_kind}: "
                      f"{first.where}", file=err)
            done = tally.ran + tally.skipped
            now = time.monotonic()
            if done % every == 0 or now - last_report > 30 or done == len(indices):
                last_report = now
                print(f"fuzz: {done}/{len(indices)} cases, {tally.operations} operations, "
                      f"{len(tally.disagreeing)} disagreeing, {now - started:.0f}s", file=err)
    except KeyboardInterrupt:
        print("fuzz: interrupted; reporting the cases run so far", file=err)
    return time.monotonic() - started


def _shrink_and_write(tally: Tally, settings: Settings, jobs: int, args: argparse.Namespace,
                      out: TextIO, err: TextIO) -> list[tuple[ShrinkReport, Written | None]]:
    # the smallest case of each group shrinks fastest
    jobs_list = [(min(group, key=lambda r: r.operations).index, (kind, step_kind))
                 for (kind, step_kind, _), group in tally.groups().items()]
    jobs_list = list(dict.fromkeys(jobs_list))[: args.max_findings]
    print(f"fuzz: shrinking {len(jobs_list)} disagreement(s)", file=err)
    findings = Path(args.findings)
    tested, reference, qemu = _backends(settings)
    written: list[tuple[ShrinkReport, Written | None]] = []
    for shrunk in _map(shrink_one, jobs_list, settings, jobs):
        assert isinstance(shrunk, ShrinkReport)
        result = shrunk.result
        print(f"fuzz: case {shrunk.index} shrunk from {shrunk.original.step_count()} steps to "
              f"{result.case.step_count()} in {result.runs} runs ({result.seconds:.0f}s"
              f"{'' if result.complete else ', budget spent'})", file=err)
        if shrunk.difference is None:
            out.write(f"\n=== case {shrunk.index}: the disagreement did not come back when "
                      "the case ran again (not deterministic, or the code under test "
                      "changed since); nothing written ===\n")
            written.append((shrunk, None))
            continue
        final = reveal(result.case, shrunk.difference)
        try:
            finding = write_finding(final, shrunk.outcome, shrunk.difference,
                                    shrunk.original, result.runs, findings=findings,
                                    repo_root=ROOT, tested=tested, reference=reference,
                                    qemu=qemu)
        except OSError as error:
            print(f"harness fuzz: cannot write the finding of case {shrunk.index} under "
                  f"{findings}: {error}", file=err)
            out.write(render(final))
            continue
        written.append((shrunk, finding))
        _print_finding(shrunk, finding, out)
    return written


def _print_finding(shrunk: ShrinkReport, finding: Written | None, out: TextIO) -> None:
    difference = shrunk.difference
    assert difference is not None
    out.write(f"\n=== case {shrunk.index}: {difference.kind} of {difference.step_kind} ===\n")
    if finding is None:
        out.write("(the same shrunk case is already in the findings folder)\n")
        return
    out.write(f"written: {finding.case_file} and {finding.golden_file}\n")
    if not finding.reproduces:
        out.write("note: the written case passes on the tested backend against its golden; "
                  "the disagreement shows only in the fuzzer's own checks:\n")
        out.write(difference.diff("qemu", "tested") or difference.tested)
    else:
        out.write(finding.diff)
    if not finding.stable:
        out.write("note: two qemu runs of the written case print different transcripts; "
                  "its golden is not stable\n")


def _summary(tally: Tally, settings: Settings, args: argparse.Namespace,
             written: list[tuple[ShrinkReport, Written | None]], fuzz_seconds: float,
             shrink_seconds: float, out: TextIO) -> None:
    total = time.monotonic() - tally.started
    lines = [
        "",
        f"fuzz summary ({args.tested} against {args.reference}, seed {settings.seed}, "
        f"cases {args.start}..{args.start + args.count - 1})",
        f"  cases          {tally.ran}" + (f" ({tally.skipped} not started: time budget)"
                                           if tally.skipped else ""),
        f"  operations     {tally.operations} per backend, in {tally.processes} processes",
        f"  disagreements  {len(tally.disagreeing)} case(s)",
    ]
    for (kind, step_kind, detail), reports in tally.groups().items():
        cases = ", ".join(str(r.index) for r in reports[:8]) + (" ..." if len(reports) > 8
                                                              else "")
        lines.append(f"    {len(reports):5}  {kind} of {step_kind}: {detail}  (cases {cases})")
    for shrunk, finding in written:
        if shrunk.difference is None:
            lines.append(f"  finding        case {shrunk.index}: did not disagree again "
                         "(not deterministic, or the code changed); not written")
            continue
        where = finding.case_file if finding else "already in the findings folder"
        status = "" if finding is None else (
            "fails on the tested backend" if finding.reproduces else
            "passes on the tested backend (see its comment)")
        lines.append(f"  finding        case {shrunk.index}: {shrunk.original.step_count()} -> "
                     f"{shrunk.result.case.step_count()} steps: {where} {status}".rstrip())
    lines.append(f"  time           {total:.1f}s (cases {fuzz_seconds:.1f}s"
                 + (f", shrinking and writing {shrink_seconds:.1f}s" if written else "") + ")")
    out.write("\n".join(lines) + "\n")
