"""The fuzzer end to end, on an engine with one QEMU rule broken in-process
(the `present` mistake docs/walkthrough.md makes by hand): the command
finds it, shrinks it to a few steps, and writes a case whose QEMU golden the
broken engine fails and real QEMU passes. Also the command's plain paths:
printing cases, usage errors, a time budget, QEMU against itself."""

from __future__ import annotations

import io

import pytest
import yaml

from harness.backends.qemu import QemuBackend
from harness.fuzz.cli import Settings, main, run_one
from harness.loader import load_case
from harness.runner import run_case


def _run(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(args, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_a_broken_engine_rule_is_found_shrunk_and_written(engine, qemu, broken_present,
                                                          tmp_path):
    settings = Settings(seed=1)
    for index in range(60):
        report = run_one(index, settings)
        # a case that shows the broken rule and nothing else
        if report.differences and all("present" in d.detail for d in report.differences):
            break
    else:
        pytest.fail("60 cases never showed the broken `present` rule alone")
    status, out, err = _run(["--seed", "1", "--start", str(index), "--count", "1",
                             "--jobs", "1", "--findings", str(tmp_path)])
    assert status == 1
    assert "disagreements  1 case(s)" in out
    (case_file,) = (tmp_path / "cases").glob("*.yaml")
    case = load_case(case_file)
    golden = (tmp_path / "golden" / f"{case.seq}.out").read_text()
    assert len(case.steps) <= 4, case_file.read_text()
    assert f"case {index} shrunk from" in err
    assert '"present": true' in golden
    assert run_case(case, qemu).text == golden
    broken = run_case(case, engine).text
    assert broken != golden and '"present": false' in broken
    assert f"-> {len(case.steps)} steps: {case_file} fails on the tested backend" in out


def test_print_cases_gives_loadable_case_files():
    status, out, _ = _run(["--seed", "3", "--count", "3", "--print-cases"])
    assert status == 0
    documents = out.split("---\n")
    assert len(documents) == 3
    assert all(yaml.safe_load(document)["title"].startswith("fuzz: seed 3") for document in
               documents)


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as stopped:
        _run(["--backends", "engine"])
    assert stopped.value.code == 2
    with pytest.raises(SystemExit):
        _run(["--backends", "engine,nope"])


def test_a_findings_path_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as stopped:
        _run(["--findings", str(tmp_path / "taken")])
    assert stopped.value.code == 2
    assert "taken: exists and is not a folder" in capsys.readouterr().err


def test_without_qemu_the_fuzzer_refuses_with_the_reason(monkeypatch):
    monkeypatch.setattr(QemuBackend, "unavailable", lambda self: "qemu-img is not installed")
    status, _, err = _run(["--count", "1"])
    assert status == 2
    assert "qemu backend cannot run here: qemu-img is not installed" in err


def test_a_spent_time_budget_starts_no_case(qemu):
    status, out, _ = _run(["--seed", "1", "--count", "5", "--time-budget", "0", "--jobs", "1",
                           "--findings", "/nonexistent/never-written"])
    assert status == 0
    assert "cases          0 (5 not started: time budget)" in out


def test_qemu_against_itself_reports_nothing(qemu, tmp_path):
    """Nothing that differs between two runs of the same program (directories,
    timings, disk usage) may count as a disagreement."""
    status, out, err = _run(["--backends", "qemu,qemu", "--seed", "8", "--count", "6",
                             "--jobs", "2", "--compare-files", "--findings", str(tmp_path)])
    assert status == 0, out
    assert "disagreements  0 case(s)" in out
    assert "fuzz: 6/6 cases" in err


def test_a_disagreement_that_does_not_come_back_is_not_written(qemu, tampered, monkeypatch,
                                                               tmp_path):
    from harness.backends.base import Result
    from harness.fuzz import cli
    from harness.fuzz.generate import generate
    from harness.fuzz.model import Map

    index = next(i for i in range(200)
                 if any(isinstance(s, Map) and not s.human and not s.cut_backing
                        for s in generate(2, i).steps))
    state = {"tamper": True}

    def after(tool, argv, cwd, result):
        if state["tamper"] and argv[:2] == ["map", "--output=json"]:
            return Result(result.stdout + "a line only the first run prints\n",
                          result.stderr, result.status)
        return result

    flaky = tampered(after=after)
    monkeypatch.setattr(cli, "_backends", lambda settings: (flaky, qemu, qemu))
    first_run = cli.run_one

    def run_once_then_behave(case_index, settings=None):
        report = first_run(case_index, settings)
        state["tamper"] = False
        return report

    monkeypatch.setattr(cli, "run_one", run_once_then_behave)
    status, out, _ = _run(["--seed", "2", "--start", str(index), "--count", "1", "--jobs", "1",
                           "--shrink-runs", "3", "--findings", str(tmp_path)])
    assert status == 1
    assert "did not come back when the case ran again" in out
    assert "did not disagree again (not deterministic, or the code changed); not written" in out
    assert not (tmp_path / "cases").exists()
