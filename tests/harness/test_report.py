"""The case/backend/result/time table and the `python -m harness` commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.report import Row, format_table

ROOT = Path(__file__).resolve().parents[2]


def test_table_is_aligned_and_counted():
    lines = format_table([Row("154-write-zeroes", "engine", "passed", 0.0912),
                          Row("154-write-zeroes", "qemu", "skipped", 0.0),
                          Row("901-chain", "cli", "failed", 12.5)])
    assert lines == [
        "case              backend  result   time",
        "154-write-zeroes  engine   passed   0.09s",
        "154-write-zeroes  qemu     skipped  0.00s",
        "901-chain         cli      failed   12.50s",
        "1 passed, 1 skipped, 1 failed",
    ]


def harness(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)


def test_run_prints_a_transcript(qemu_img, qemu_io):
    done = harness("run", "cases/901-three-layer-chain.yaml", "--backend", "qemu")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (ROOT / "golden" / "901.out").read_text()


def test_run_reports_a_malformed_case(tmp_path):
    broken = tmp_path / "900-broken.yaml"
    broken.write_text("title: x\nsteps:\n  - bogus step\n")
    done = harness("run", str(broken))
    assert done.returncode == 2
    assert done.stderr == f"{broken}:3: unknown step 'bogus' (known steps: section, echo, " \
        "qemu-img, qemu-io, create, io, map, check, info, remove, use, for each)\n"


def test_bless_refuses_without_real_qemu(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("QEMU_IMG_PROG", "QEMU_IO_PROG")}
    env["PATH"] = str(tmp_path)
    done = harness("bless", env=env)
    assert done.returncode == 2
    assert done.stderr == ("harness bless: goldens are written by real QEMU, and qemu-img is "
                           "not installed (apt-get install -y qemu-utils)\n")


def test_run_reports_a_qemu_program_that_cannot_run():
    env = dict(os.environ, QEMU_IMG_PROG="/nonexistent/qemu-img")
    done = harness("run", "cases/901-three-layer-chain.yaml", "--backend", "qemu", env=env)
    assert done.returncode == 2
    assert done.stderr == ("harness run: qemu backend: $QEMU_IMG_PROG=/nonexistent/qemu-img "
                           "is not an executable file\n")


def test_check_names_a_case_file_that_does_not_exist():
    done = harness("check", "cases/999-no-such-case.yaml")
    assert done.returncode == 2
    assert done.stderr == "harness check: cases/999-no-such-case.yaml: no such case file\n"


def test_bless_takes_case_files_only():
    done = harness("bless", "tests/harness/test_expr.py")
    assert done.returncode == 2
    assert done.stderr == ("harness bless: tests/harness/test_expr.py is not a case file "
                           "(cases/NNN-name.yaml) or a folder of them\n")


def test_check_runs_the_cases_when_an_option_value_names_a_file(tmp_path):
    junit = tmp_path / "report.xml"
    junit.write_text("")
    done = harness("check", "--junitxml", str(junit), "--collect-only", "-q")
    listed = [line for line in done.stdout.splitlines() if line.startswith(("cases", "tests"))]
    assert listed and all(line.startswith("cases") for line in listed), done.stdout


def test_run_stops_quietly_when_the_reader_goes_away(tmp_path):
    # more output than a pipe holds, so the writer meets the closed pipe
    long = tmp_path / "900-long.yaml"
    long.write_text("title: t\nsteps:\n"
                    + "".join(f"  - echo: line {n} {'x' * 100}\n" for n in range(3000)))
    reader = subprocess.Popen([sys.executable, "-m", "harness", "run", str(long)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None
    reader.stdout.readline()
    reader.stdout.close()
    _, errors = reader.communicate()
    assert b"Traceback" not in errors
