"""pyqemu.img.run / pyqemu.io.run called in-process print what the processes print.

The harness's engine backend calls run() ~150 times per test, so run() must not
depend on process state: each call is compared with the installed script run
as a process on an identical copy of the images, and calls are repeated to
show that nothing carries over from one call to the next.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyqemu import img as img_tool
from pyqemu import io as io_tool

SCRIPT = [
    ("img", ["create", "-f", "qcow2", "base.qcow2", "1M"]),
    ("img", ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]),
    ("io", ["-c", "write -P 0x11 0 64k", "-c", "write -z 64k 64k", "base.qcow2"]),
    ("io", ["-c", "write -P 0x22 32k 4k", "-c", "read -P 0x11 0 4k", "top.qcow2"]),
    ("io", ["-c", "read -P 0x12 0 4k", "-c", "nope", "top.qcow2"]),
    ("io", ["-c", "alloc 0 1M", "-c", "map", "-c", "info", "-c", "length", "top.qcow2"]),
    ("img", ["map", "--output=json", "top.qcow2"]),
    ("img", ["map", "top.qcow2"]),
    ("img", ["info", "--backing-chain", "--output=json", "top.qcow2"]),
    ("img", ["check", "top.qcow2"]),
    ("img", ["compare", "top.qcow2", "base.qcow2"]),
    ("img", ["info", "nonexistent"]),
    ("io", ["-x"]),
    ("img", ["--nope"]),
]


def _in_process(tool: str, args: list[str], folder: Path) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    here = os.getcwd()
    # the front ends never chdir; the test does, so relative names resolve alike
    os.chdir(folder)
    try:
        module = img_tool if tool == "img" else io_tool
        status = module.run(args, io.StringIO(""), stdout, stderr)
    finally:
        os.chdir(here)
    return status, stdout.getvalue(), stderr.getvalue()


def _as_process(tool: str, args: list[str], folder: Path, program: Path) -> tuple[int, str, str]:
    name = "qemu-img" if tool == "img" else "qemu-io"
    completed = subprocess.run([name, *args], executable=program, cwd=folder,
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return completed.returncode, completed.stdout, completed.stderr


def test_run_in_process_matches_the_process(tmp_path, engine, pyqemu_img, pyqemu_io,
                                            normalise):
    inside = tmp_path / "inside"
    outside = tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    for round_number in range(2):
        for tool, args in SCRIPT:
            program = pyqemu_img if tool == "img" else pyqemu_io
            ours = _in_process(tool, args, inside)
            theirs = _as_process(tool, args, outside, program)
            ours_text = tuple(normalise(part) if isinstance(part, str) else part
                              for part in ours)
            theirs_text = tuple(normalise(part) if isinstance(part, str) else part
                                for part in theirs)
            assert ours_text == theirs_text, (round_number, tool, args)
        for name in ("base.qcow2", "top.qcow2"):
            assert (inside / name).read_bytes() == (outside / name).read_bytes()
        for folder in (inside, outside):
            shutil.rmtree(folder)
            folder.mkdir()


@pytest.mark.parametrize("tool", ["img", "io"])
def test_run_leaves_process_state_alone(tool):
    """No sys.exit, no chdir, argv untouched, even on errors and --help."""
    import sys

    module = img_tool if tool == "img" else io_tool
    argv_before = list(sys.argv)
    cwd_before = os.getcwd()
    for args in (["-h"], ["-V"], ["--nope"], [], ["-c", "help"]):
        status = module.run(args, io.StringIO(""), io.StringIO(), io.StringIO())
        assert isinstance(status, int)
    assert sys.argv == argv_before
    assert os.getcwd() == cwd_before
