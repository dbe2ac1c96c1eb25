"""Write a shrunk disagreement as a case file and a golden blessed by QEMU.

A finding goes to `FINDINGS/cases/NNN-fuzz-KIND-STEP.yaml` and
`FINDINGS/golden/NNN.out`, laid out like the repository, so that committing
it is moving the two files into `cases/` and `golden/`. NNN is a number no
case or golden in the repository or the findings folder uses (findings
start at 950, leaving room below for hand-written cases).

The case file starts with a comment saying what the fuzzer found (the kind
of disagreement, the step, the first differing lines), the seed and case
number that reproduce it, and how much it was shrunk. Where the
disagreement would not show in a golden as the case stands, the case is
made to show it: a step whose only difference is in its unfiltered output
gets filters that keep it (`filter: [testdir]`), and a difference found on
the images afterwards gets steps that look at them (a `read -v` of the
first differing bytes, a map, a check).

The golden is what running the written case file on the qemu backend
prints. The finding records whether the case, run on the tested backend
and compared with that golden, fails as the harness would report it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from harness.backends.base import Backend
from harness.fuzz.compare import Difference, Outcome
from harness.fuzz.model import Check, FuzzCase, Io, IoOp, Map, render
from harness.golden import unified_diff
from harness.loader import CASE_FILE_NAME, load_case
from harness.runner import run_case

FIRST_NUMBER = 950
CASES, GOLDEN = "cases", "golden"
_MISMATCH = re.compile(r"Content mismatch at offset (\d+)!")
_STATUS_MISMATCH = re.compile(r"block status mismatch")


@dataclass(frozen=True)
class Written:
    case_file: Path
    golden_file: Path
    seq: str
    reproduces: bool  # the case fails on the tested backend against its golden
    stable: bool  # two runs on qemu, in different directories, print the same
    diff: str  # golden -> tested backend's transcript, as the harness shows it


def used_numbers(*folders: Path) -> set[int]:
    """Case and golden numbers found in these folders (cases/ and golden/)."""
    numbers: set[int] = set()
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.suffix == ".yaml" and (match := CASE_FILE_NAME.fullmatch(path.name)):
                numbers.add(int(match.group("seq")))
            elif path.name.endswith(".out") and path.name.split(".")[0].isdigit():
                numbers.add(int(path.name.split(".")[0]))
    return numbers


def next_number(repo_root: Path, findings: Path) -> int:
    used = used_numbers(repo_root / CASES, repo_root / GOLDEN, findings / CASES,
                        findings / GOLDEN)
    return max(used | {FIRST_NUMBER - 1}) + 1


def case_body(text: str) -> str:
    """A case file without its comments and title: equal bodies are the same case."""
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith("#") and not line.startswith("title:"))


def known_bodies(findings: Path) -> set[str]:
    folder = findings / CASES
    if not folder.is_dir():
        return set()
    return {case_body(path.read_text(encoding="utf-8")) for path in folder.glob("*.yaml")}


def reveal(case: FuzzCase, difference: Difference) -> FuzzCase:
    """The case with what makes `difference` visible in a golden."""
    if difference.kind == "unfiltered" and difference.step_index is not None:
        index = difference.step_index
        if index < len(case.layers):
            layers = list(case.layers)
            layers[index] = replace(layers[index], reveal=True)
            return replace(case, layers=tuple(layers))
        steps = list(case.steps)
        steps[index - len(case.layers)] = replace(steps[index - len(case.layers)], reveal=True)
        return case.with_steps(tuple(steps))
    if difference.image is None or difference.kind not in ("contents", "check", "files"):
        return case
    image = difference.image
    extra: list[Io | Map | Check] = []
    if difference.kind == "contents":
        mismatch = _MISMATCH.search(difference.tested)
        if mismatch is not None:
            # one line of `read -v` at the first differing sector shows it
            offset = int(mismatch.group(1)) // 16 * 16
            size = case.virtual_size(image)
            extra.append(Io(image, (IoOp("read", offset, (min(16, size - offset),),
                                         ("-v",)),)))
        if _STATUS_MISMATCH.search(difference.tested) or mismatch is None:
            extra.append(Map(image, reveal=True))
    else:
        extra += [Map(image, reveal=True), Check(image, reveal=True)]
    return case.with_steps(case.steps + tuple(extra))


def describe(outcome: Outcome, difference: Difference, tested: str, reference: str,
             shrunk_from: FuzzCase, runs: int, max_lines: int = 12) -> list[str]:
    """The comment a finding's case file starts with."""
    case = outcome.case
    lines = [
        f"Found by the differential fuzzer (python -m harness fuzz), {shrunk_from.origin}:",
        f"  {reproduce_command(shrunk_from.origin)}",
        f"shrunk from {shrunk_from.step_count()} steps ({shrunk_from.operation_count()} "
        f"operations) to {case.step_count()} ({case.operation_count()}) in {runs} runs.",
        f"{tested} and {reference} disagree: {explain_kind(difference)}",
        f"  {difference.where}",
    ]
    diff = difference.diff(reference, tested).splitlines()
    changed = [line for line in diff[2:] if line[:1] in "+-@ "]
    if changed:
        lines.append(f"First differences ({reference} -, {tested} +):")
        lines += ["  " + line for line in changed[:max_lines]]
        if len(changed) > max_lines:
            lines.append(f"  ... ({len(changed) - max_lines} more lines)")
    return lines


def reproduce_command(origin: str) -> str:
    match = re.fullmatch(r"seed (\d+), case (\d+)", origin)
    if match is None:
        return "(not generated from a seed)"
    return f"python -m harness fuzz --seed {match.group(1)} --start {match.group(2)} --count 1"


def explain_kind(difference: Difference) -> str:
    where = difference.step_kind
    return {
        "output": f"the output of the {where} step differs",
        "crash": f"the {where} step raised an exception on the tested side",
        "status": f"the exit status of the {where} step differs (not visible in a golden)",
        "unfiltered": f"the unfiltered output of the {where} step differs "
                      "(the case keeps it with its own filter)",
        "contents": "real qemu-img compare finds different image contents afterwards",
        "check": "real qemu-img check judges the image differently afterwards",
        "files": "the image files differ afterwards",
        "timeout": "the case ran past its time limit",
    }.get(difference.kind, difference.kind)


def title_for(difference: Difference) -> str:
    return f"fuzz finding: {difference.kind} of {difference.step_kind}, {difference.where}"[:120]


def write_finding(case: FuzzCase, outcome: Outcome, difference: Difference,
                  shrunk_from: FuzzCase, runs: int, *, findings: Path, repo_root: Path,
                  tested: Backend, reference: Backend, qemu: Backend) -> Written | None:
    """Write the case file and its golden (run on `qemu`, whatever the
    reference of the comparison was); None if the same case is already there."""
    comment = tuple(describe(outcome, difference, tested.name, reference.name,
                             shrunk_from, runs))
    final = replace(case, comment=comment)
    text = render(final, title=title_for(difference))
    if case_body(text) in known_bodies(findings):
        return None
    seq = next_number(repo_root, findings)
    slug = re.sub(r"[^a-z0-9]+", "-", f"fuzz-{difference.step_kind}-{difference.kind}")
    case_file = findings / CASES / f"{seq}-{slug.strip('-')}.yaml"
    golden_file = findings / GOLDEN / f"{seq}.out"
    case_file.parent.mkdir(parents=True, exist_ok=True)
    golden_file.parent.mkdir(parents=True, exist_ok=True)
    case_file.write_text(text, encoding="utf-8")
    loaded = load_case(case_file)
    golden = run_case(loaded, qemu).text
    golden_file.write_text(golden, encoding="utf-8", newline="")
    again = run_case(loaded, qemu).text
    obtained = run_case(loaded, tested).text
    diff = unified_diff(golden, obtained, f"{GOLDEN}/{seq}.out ({qemu.name})",
                        f"{tested.name} run of {case_file.name}")
    return Written(case_file=case_file, golden_file=golden_file, seq=str(seq),
                   reproduces=obtained != golden, stable=again == golden, diff=diff)
