"""Writing findings: numbers that collide with nothing, a case file the
loader accepts with a golden from real QEMU, the same case never written
twice, and a disagreement the plain case would hide made visible."""

from __future__ import annotations

import re
from pathlib import Path

from harness.backends.base import Result
from harness.fuzz.compare import run_pair
from harness.fuzz.findings import (
    case_body,
    next_number,
    reproduce_command,
    reveal,
    write_finding,
)
from harness.fuzz.model import FuzzCase, Io, IoOp, Layer, Map
from harness.loader import load_case

CASE = FuzzCase(
    layers=(Layer("base", size=1 << 20), Layer("test")),
    steps=(Io("base", (IoOp("write", 0, (131072,), (), 0x11),)),
           Io("test", (IoOp("write", 4096, (512,), (), 0x22),)),
           Map("test")),
    origin="seed 4, case 2")


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("")


def test_numbers_start_at_950_and_skip_everything_in_use(tmp_path):
    repo, findings = tmp_path / "repo", tmp_path / "findings"
    _touch(repo / "cases", "154-a.yaml", "901-b.yaml")
    _touch(repo / "golden", "154.out", "901.out", "907.out.bad")
    assert next_number(repo, findings) == 950
    _touch(findings / "cases", "950-fuzz-x.yaml")
    assert next_number(repo, findings) == 951
    _touch(repo / "golden", "960.out")  # a golden whose case is still being written
    assert next_number(repo, findings) == 961
    _touch(repo / "cases", "1200-late.yaml")
    assert next_number(repo, findings) == 1201


def test_reproduce_command_names_the_seed_and_case():
    assert reproduce_command("seed 4, case 2") == \
        "python -m harness fuzz --seed 4 --start 2 --count 1"


def _offsets_moved(tool, argv, cwd, result):
    if argv[:2] == ["map", "--output=json"]:
        moved = re.sub(r'"offset": (\d+)', lambda m: f'"offset": {int(m[1]) + 512}',
                       result.stdout)
        return Result(moved, result.stderr, result.status)
    return result


def test_a_finding_is_written_with_a_qemu_golden_and_shows_its_difference(
        tmp_path, qemu, tampered):
    tested = tampered(after=_offsets_moved)
    outcome = run_pair(CASE, tested, qemu, qemu)
    (difference,) = outcome.differences
    assert difference.kind == "unfiltered"
    final = reveal(CASE, difference)
    assert final.steps[-1].reveal
    written = write_finding(final, outcome, difference, CASE, 7, findings=tmp_path,
                            repo_root=tmp_path, tested=tested, reference=qemu, qemu=qemu)
    assert written is not None
    assert written.case_file == tmp_path / "cases" / "950-fuzz-map-unfiltered.yaml"
    assert written.golden_file == tmp_path / "golden" / "950.out"
    text = written.case_file.read_text()
    assert "python -m harness fuzz --seed 4 --start 2 --count 1" in text
    assert "map test: {filter: [testdir]}" in text
    case = load_case(written.case_file)
    assert case.seq == "950" and case.steps[-1].filters == ("testdir",)
    golden = written.golden_file.read_text()
    assert golden.startswith("QA output created by 950\n")
    assert re.search(r'"offset": \d+', golden)  # the filter keeps the host offsets
    assert written.reproduces and written.stable
    assert "+++ tampered run of 950-fuzz-map-unfiltered.yaml" in written.diff
    again = write_finding(final, outcome, difference, CASE, 7, findings=tmp_path,
                          repo_root=tmp_path, tested=tested, reference=qemu, qemu=qemu)
    assert again is None  # the same case is already there


def test_different_contents_get_a_dump_of_the_first_differing_bytes(tmp_path, qemu, tampered):
    tested = tampered(before=lambda tool, argv: [a.replace("-P 0x22", "-P 0x23") for a in argv])
    outcome = run_pair(CASE, tested, qemu, qemu)
    (difference,) = outcome.differences
    assert difference.kind == "contents"
    final = reveal(CASE, difference)
    assert final.steps[-1] == Io("test", (IoOp("read", 4096, (16,), ("-v",)),))
    written = write_finding(final, outcome, difference, CASE, 3, findings=tmp_path,
                            repo_root=tmp_path, tested=tested, reference=qemu, qemu=qemu)
    assert written is not None and written.reproduces
    assert "-00001000:  22 22" in written.diff and "+00001000:  23 23" in written.diff


def test_case_bodies_ignore_comments_and_titles():
    assert case_body("# one\ntitle: a\nsteps: []\n") == case_body("# two\ntitle: b\nsteps: []")
    assert case_body("title: a\nsteps: [x]\n") != case_body("title: a\nsteps: [y]\n")
