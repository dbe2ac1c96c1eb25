"""Golden handling and collection, seen the way a user sees them: pytest run
on a scratch project holding cases/ and golden/ and loading the harness
plugin. The cases only print text (section/echo), so no backend program is
needed except where a test asks for real QEMU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.golden import bad_path, first_difference, unified_diff

CASE = """\
title: a case that only prints
steps:
  - section: part one
  - echo: {word}
  - echo: the end
"""


def transcript(seq: str, word: str) -> str:
    return f"QA output created by {seq}\n\n== part one ==\n{word}\nthe end\n*** done\n"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "cases").mkdir(parents=True)
    (root / "golden").mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text('pytest_plugins = ("harness.plugin",)\n')
    return root


def add_case(project: Path, name: str, word: str = "hello") -> None:
    (project / "cases" / name).write_text(CASE.format(word=word))


def pytest_run(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=project, capture_output=True, text=True, env=env, check=False)


def test_matching_golden_passes_and_removes_a_stale_bad_file(project):
    add_case(project, "900-print.yaml")
    (project / "golden" / "900.out").write_text(transcript("900", "hello"))
    (project / "golden" / "900.out.bad").write_text("left over from an old failure\n")
    run = pytest_run(project, "cases")
    assert run.returncode == 0, run.stdout
    assert "2 passed" in run.stdout
    assert not (project / "golden" / "900.out.bad").exists()


def test_differing_golden_fails_with_a_diff_and_keeps_the_output(project):
    add_case(project, "900-print.yaml", word="goodbye")
    (project / "golden" / "900.out").write_text(transcript("900", "hello"))
    run = pytest_run(project, "cases")
    assert run.returncode == 1
    expected = "\n".join([
        "golden/900.out differs from this run's output (kept in golden/900.out.bad):",
        "",
        "--- golden/900.out",
        "+++ golden/900.out.bad",
        "@@ -1,6 +1,6 @@",
        " QA output created by 900",
        " ",
        " == part one ==",
        "-hello",
        "+goodbye",
        " the end",
        " *** done",
        "",
        "",
        "first difference at line 4: 900-print.yaml:4",
    ])
    assert expected in run.stdout
    assert "Traceback" not in run.stdout
    assert (project / "golden" / "900.out.bad").read_text() == transcript("900", "goodbye")
    assert (project / "golden" / "900.out").read_text() == transcript("900", "hello")


def test_missing_golden_folder_is_reported_like_a_missing_golden(project):
    (project / "golden").rmdir()
    add_case(project, "900-print.yaml")
    run = pytest_run(project, "cases")
    assert run.returncode == 1
    assert "golden/900.out does not exist" in run.stdout
    assert (project / "golden" / "900.out.bad").read_text() == transcript("900", "hello")


def test_golden_without_a_case_is_a_failing_item(project):
    add_case(project, "900-print.yaml")
    (project / "golden" / "900.out").write_text(transcript("900", "hello"))
    (project / "golden" / "950.out").write_text("stale\n")
    run = pytest_run(project, "cases", "-rf")
    assert run.returncode == 1
    assert "FAILED cases::goldens-have-cases" in run.stdout
    assert ("no case in cases/ produces these goldens: golden/950.out "
            "(add cases/NNN-name.yaml for each, or delete the file)") in run.stdout


def test_missing_golden_is_not_invented_by_the_engine(project):
    add_case(project, "900-print.yaml")
    run = pytest_run(project, "cases/900-print.yaml")
    assert run.returncode == 1
    assert ("golden/900.out does not exist. Goldens come from real QEMU: run `make bless` "
            "(or pytest --backend qemu on this case) to write it. This run's output is in "
            "golden/900.out.bad.") in run.stdout
    assert not (project / "golden" / "900.out").exists()
    assert (project / "golden" / "900.out.bad").read_text() == transcript("900", "hello")


def test_missing_golden_is_written_by_the_qemu_backend(project, qemu_img, qemu_io):
    add_case(project, "900-print.yaml")
    first = pytest_run(project, "cases/900-print.yaml", "--backend", "qemu")
    assert first.returncode == 1
    assert "File not found in data directory, created:" in first.stdout
    assert (project / "golden" / "900.out").read_text() == transcript("900", "hello")
    second = pytest_run(project, "cases/900-print.yaml", "--backend", "qemu")
    assert second.returncode == 0, second.stdout


def test_force_regen_and_regen_all_rewrite_goldens(project):
    add_case(project, "900-print.yaml", word="new")
    golden = project / "golden" / "900.out"
    golden.write_text(transcript("900", "old"))
    forced = pytest_run(project, "cases/900-print.yaml", "--force-regen")
    assert forced.returncode == 1
    assert "Files differ and --force-regen set, regenerating file at:" in forced.stdout
    assert golden.read_text() == transcript("900", "new")
    assert not (project / "golden" / "900.out.bad").exists()
    add_case(project, "900-print.yaml", word="newer")
    regenerated = pytest_run(project, "cases/900-print.yaml", "--regen-all")
    assert regenerated.returncode == 0
    assert golden.read_text() == transcript("900", "newer")
    refused = pytest_run(project, "cases", "--force-regen", "--backend", "all")
    assert refused.returncode == 4
    assert "--force-regen/--regen-all write goldens from one backend" in refused.stderr


def test_malformed_case_fails_collection_with_file_and_line(project):
    add_case(project, "900-print.yaml")
    (project / "golden" / "900.out").write_text(transcript("900", "hello"))
    (project / "cases" / "901-broken.yaml").write_text(
        "title: broken\nsteps:\n  - section: x\n  - echo: ${nothing}\n")
    run = pytest_run(project, "cases")
    assert run.returncode == 2
    assert ("cases/901-broken.yaml:4: undefined variable 'nothing' (defined here: fmt)"
            in run.stdout)
    assert "Traceback" not in run.stdout


def test_two_cases_may_not_share_a_number(project):
    add_case(project, "900-print.yaml")
    add_case(project, "900-other.yaml")
    run = pytest_run(project, "cases/900-print.yaml")
    assert run.returncode == 2
    assert ("cases/900-print.yaml:1: case number 900 is also used by 900-other.yaml; each "
            "case needs its own (it names the golden file)") in run.stdout


def test_qemu_items_are_skipped_where_qemu_is_missing(project, tmp_path):
    add_case(project, "900-print.yaml")
    (project / "golden" / "900.out").write_text(transcript("900", "hello"))
    env = {key: value for key, value in os.environ.items()
           if key not in ("QEMU_IMG_PROG", "QEMU_IO_PROG")}
    env["PATH"] = str(tmp_path / "nowhere")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs",
                          "cases", "--backend", "engine,qemu"], cwd=project, env=env,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout
    assert "2 passed, 1 skipped" in run.stdout
    assert ("SKIPPED [1] cases/900-print.yaml: qemu backend: qemu-img is not installed "
            "(apt-get install -y qemu-utils)") in run.stdout


def test_a_qemu_program_that_cannot_run_fails_its_items_plainly(project):
    (project / "cases" / "900-info.yaml").write_text(
        "title: t\nimages:\n  test: {size: 1M}\nsteps:\n  - create test\n")
    env = dict(os.environ, QEMU_IMG_PROG="/nonexistent/qemu-img", QEMU_IO_PROG="/bin/sh")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          "cases", "--backend", "qemu"], cwd=project, env=env,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1, run.stdout
    assert "INTERNALERROR" not in run.stdout + run.stderr
    assert "$QEMU_IMG_PROG=/nonexistent/qemu-img is not an executable file" in run.stdout


def test_an_unexpected_error_in_an_item_is_reported_as_a_failure(project):
    # anything the harness did not foresee must fail the one item, with its
    # traceback, and leave the rest of the session running
    (project / "conftest.py").write_text(
        'pytest_plugins = ("harness.plugin",)\n'
        "import harness.plugin\n"
        "def broken_run_case(case, backend):\n"
        "    raise RuntimeError('runner broke')\n"
        "harness.plugin.run_case = broken_run_case\n")
    add_case(project, "900-print.yaml")
    add_case(project, "901-print.yaml")
    run = pytest_run(project, "cases")
    assert run.returncode == 1, run.stdout
    assert "INTERNALERROR" not in run.stdout + run.stderr
    assert "RuntimeError: runner broke" in run.stdout
    assert "2 failed" in run.stdout


def test_items_per_backend_select_with_k_and_stop_with_x(project):
    for seq in ("900", "901", "902"):
        add_case(project, f"{seq}-print.yaml")
        (project / "golden" / f"{seq}.out").write_text(transcript(seq, "other"))
    listed = pytest_run(project, "cases", "--backend", "all", "--collect-only", "-q")
    assert [line for line in listed.stdout.splitlines() if "::" in line] == [
        f"cases/{seq}-print.yaml::{seq}[{backend}]"
        for seq in ("900", "901", "902") for backend in ("engine", "cli", "qemu")
    ] + ["cases::goldens-have-cases"]
    chosen = pytest_run(project, "cases", "--backend", "all", "-k", "901 and cli",
                        "--collect-only", "-q")
    assert [line for line in chosen.stdout.splitlines() if "::" in line] == [
        "cases/901-print.yaml::901[cli]"]
    stopped = pytest_run(project, "cases", "-x")
    assert stopped.returncode == 1
    assert "1 failed" in stopped.stdout and "passed" not in stopped.stdout.splitlines()[-1]
    assert (project / "golden" / "900.out.bad").exists()
    assert not (project / "golden" / "901.out.bad").exists()


def test_parallel_run_with_the_report_table(project):
    for seq in ("900", "901", "902"):
        add_case(project, f"{seq}-print.yaml")
        (project / "golden" / f"{seq}.out").write_text(transcript(seq, "hello"))
    add_case(project, "903-print.yaml", word="changed")
    (project / "golden" / "903.out").write_text(transcript("903", "hello"))
    (project / "cases" / "904-broken.yaml").write_text("title: t\nsteps: [bogus]\n")
    run = pytest_run(project, "cases", "-n", "2", "--case-report", "--backend", "engine,cli")
    assert run.returncode == 1
    table = run.stdout[run.stdout.index("case "):].splitlines()
    rows = [line.split()[:3] for line in table[1:11]]
    assert rows == [
        ["(golden", "files)", "-"],
        ["900-print", "engine", "passed"], ["900-print", "cli", "passed"],
        ["901-print", "engine", "passed"], ["901-print", "cli", "passed"],
        ["902-print", "engine", "passed"], ["902-print", "cli", "passed"],
        ["903-print", "engine", "failed"], ["903-print", "cli", "failed"],
        ["904-broken", "-", "error"],
    ]
    assert table[11] == "7 passed, 2 failed, 1 error"
    assert (project / "golden" / "903.out.bad").exists()
    assert (project / "golden" / "903.cli.out.bad").exists()


def test_bad_file_names():
    golden = Path("golden/154.out")
    assert bad_path(golden, "engine") == Path("golden/154.out.bad")
    assert bad_path(golden, "cli") == Path("golden/154.cli.out.bad")
    assert bad_path(golden, "qemu") == Path("golden/154.qemu.out.bad")


def test_diff_helpers():
    assert first_difference("a\nb\nc\n", "a\nb\nc\n") is None
    assert first_difference("a\nb\nc\n", "a\nx\nc\n") == 2
    assert first_difference("a\nb\nc\n", "a\nb\n") == 2
    assert first_difference("a\n", "a\nb\n") == 2
    assert unified_diff("a\n", "a", "x", "y").endswith("+a\n\\ No newline at end of file\n")
