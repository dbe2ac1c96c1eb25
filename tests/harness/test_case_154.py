"""The port of QEMU iotest 154: its golden is QEMU's own 154.out, byte for
byte, running the case on real QEMU reproduces that file, and the case runs
exactly the qemu-img/qemu-io command lines QEMU's own test script runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.backends import get_backend
from harness.loader import load_case
from harness.runner import run_case
from harness.schema import Command

ROOT = Path(__file__).resolve().parents[2]
CASE = ROOT / "cases" / "154-write-zeroes-backing.yaml"


def test_golden_154_is_qemus_own_154_out(qemu_iotests_dir):
    assert (ROOT / "golden" / "154.out").read_bytes() == (qemu_iotests_dir / "154.out").read_bytes()


def test_case_154_on_real_qemu_prints_qemus_154_out(qemu_iotests_dir, qemu_img, qemu_io,
                                                    tmp_path):
    transcript = run_case(load_case(CASE), get_backend("qemu"), tmp_root=str(tmp_path))
    assert transcript.text.encode() == (qemu_iotests_dir / "154.out").read_bytes()
    assert list(tmp_path.iterdir()) == []


def _logging_wrapper(path: Path, real: str, log: Path) -> None:
    """A stand-in for `real` that appends its argument list to `log`."""
    path.write_text("#!/bin/bash\n"
                    f"{{ printf '%s\\x1f' \"$@\"; printf '\\n'; }} >> '{log}'\n"
                    f"exec '{real}' \"$@\"\n")
    path.chmod(0o755)


def test_case_154_runs_the_command_lines_of_iotest_154(qemu_iotests_dir, qemu_img, qemu_io,
                                                        tmp_path):
    # Run QEMU's own `check 154` with qemu-img/qemu-io wrapped to log their
    # arguments, then compare with the commands the case's steps issue. The
    # check script is started through a symlink so that everything it writes
    # lands in tmp_path, not in the QEMU source tree.
    log = tmp_path / "argv.log"
    programs = {}
    for tool, real in (("qemu-img", qemu_img), ("qemu-io", qemu_io)):
        programs[tool] = tmp_path / tool
        _logging_wrapper(programs[tool], real, log)
    (tmp_path / "check").symlink_to(qemu_iotests_dir / "check")
    scratch = tmp_path / "scratch"
    env = dict(os.environ, TEST_DIR=str(scratch), QEMU_IMG_PROG=str(programs["qemu-img"]),
               QEMU_IO_PROG=str(programs["qemu-io"]), QEMU_NBD_PROG="/bin/false",
               QEMU_PROG="/bin/true", QSD_PROG="/bin/true")
    done = subprocess.run([sys.executable, "./check", "-qcow2", "154"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]

    case = load_case(CASE)
    ours = [step.argv(str(scratch)) for step in case.steps if isinstance(step, Command)]
    assert len(ours) == len(ran) == 200
    assert ours == ran
