"""QEMU 7.2's own qemu-iotests, run unchanged against pyqemu-img and pyqemu-io.

The harness (tests/qemu-iotests/check from QEMU's source, found through the
qemu_iotests_dir fixture) runs each test with QEMU_IMG_PROG/QEMU_IO_PROG
pointing at the pyqemu scripts; everything that needs a QEMU system emulator,
qemu-nbd or the storage daemon is replaced by /bin/true or /bin/false, as
/work/shared/tools/qemu-iotests does.  154 is the test this project started
from; iotests_passing.txt lists every other test known to pass (one per line,
`#` comments allowed; a comment ending in "slow" keeps the test out of the
default run) so that each keeps passing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PASSING_LIST = HERE / "iotests_passing.txt"


def passing_tests() -> list[object]:
    """The listed tests; those marked slow are skipped unless PYQEMU_SLOW_IOTESTS=1."""
    run_slow = os.environ.get("PYQEMU_SLOW_IOTESTS") == "1"
    params: list[object] = []
    for line in PASSING_LIST.read_text().splitlines():
        name, _, comment = line.partition("#")
        name = name.strip()
        if not name:
            continue
        marks = []
        if comment.rstrip().endswith("slow") and not run_slow:
            marks.append(pytest.mark.skip(
                reason=f"slow iotest ({comment.strip()}); run with PYQEMU_SLOW_IOTESTS=1"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def run_iotest(iotests_dir: Path, scratch: Path, test: str, img: Path, io: Path,
               env: dict[str, str], fmt: str = "qcow2") -> tuple[bool, str]:
    """Run one iotest with QEMU's check script; (passed, transcript)."""
    test_dir = scratch / "test"
    sock_dir = scratch / "sock"
    test_dir.mkdir(parents=True, exist_ok=True)
    sock_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    env.update({
        "QEMU_IMG_PROG": str(img), "QEMU_IO_PROG": str(io),
        "QEMU_NBD_PROG": "/bin/false", "QEMU_PROG": "/bin/true", "QSD_PROG": "/bin/true",
        "TEST_DIR": str(test_dir), "SOCK_DIR": str(sock_dir),
    })
    completed = subprocess.run([sys.executable, "./check", f"-{fmt}", test],
                               cwd=iotests_dir, env=env, capture_output=True, text=True,
                               timeout=900)
    transcript = completed.stdout + completed.stderr
    bad = test_dir / f"{Path(test).name}.out.bad"
    if bad.exists() and completed.returncode != 0:
        transcript += f"\n--- {bad.name}\n" + bad.read_text(errors="replace")
    passed = completed.returncode == 0 and re.search(r"^Passed all 1 iotests$", transcript,
                                                     re.MULTILINE) is not None
    return passed, transcript


def test_iotest_154(qemu_iotests_dir, qemu_img, pyqemu_img, pyqemu_io, tmp_path, child_env):
    """The project's starting point: QEMU's test 154 passes against the front ends."""
    passed, transcript = run_iotest(qemu_iotests_dir, tmp_path, "154", pyqemu_img, pyqemu_io,
                                    child_env)
    assert passed, transcript


@pytest.mark.parametrize("test", passing_tests())
def test_iotest_keeps_passing(qemu_iotests_dir, qemu_img, pyqemu_img, pyqemu_io, tmp_path,
                              child_env, test):
    passed, transcript = run_iotest(qemu_iotests_dir, tmp_path, test, pyqemu_img, pyqemu_io,
                                    child_env)
    assert passed, transcript


def test_harness_detects_a_failure(qemu_iotests_dir, qemu_img, pyqemu_img, tmp_path,
                                   child_env):
    """A qemu-io that prints nothing must make a test fail: the check is not vacuous.

    (012, one of the shortest tests, stands in for 154 to keep this quick.)
    """
    silent = tmp_path / "silent-qemu-io"
    silent.write_text("#!/bin/sh\nexit 0\n")
    silent.chmod(0o755)
    passed, transcript = run_iotest(qemu_iotests_dir, tmp_path / "run", "012", pyqemu_img,
                                    silent, child_env)
    assert not passed
    assert "Failures: 012" in transcript
