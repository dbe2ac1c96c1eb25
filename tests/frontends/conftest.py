"""Side-by-side runs of the pyqemu front ends and real QEMU 7.2.

A `twins` fixture gives two scratch folders holding identical starting images
(made by real qemu-img/qemu-io, so the inputs cannot differ); the same command
line then runs with QEMU's tool in one folder and pyqemu's in the other, and
the test compares exit status, stdout and stderr after normalising only what
must differ: timing figures, the version line, the folder names.  After a
command that writes, both images are compared through real QEMU's eyes
(`qemu-img map --output=json` and `qemu-img check`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def child_environment() -> dict[str, str]:
    """The environment for pyqemu processes: bytecode cached outside the tree.

    Without a bytecode cache every process compiles the front ends and the
    engine afresh, which dominates the run time of the iotests.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX",
                   os.path.join(tempfile.gettempdir(), "pyqemu-test-pycache"))
    return env

# qemu-io's statistics line and its -C form; _filter_qemu_io's normalisation
_TIMING = re.compile(r"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec and "
                     r"[0-9/.inf]* ops/sec\)")
_MACHINE_TIMING = re.compile(r"^(\d+),(\d+),\d+:\d\d:\d\d\.\d\d,[-0-9.infa]+,[-0-9.infa]+$",
                             re.MULTILINE)
_VERSION = re.compile(r"^(qemu-(?:img|io)) version .*$", re.MULTILINE)
_FORMATS = re.compile(r"^Supported formats:.*$", re.MULTILINE)


def normalise(text: str, folder: Path | None = None) -> str:
    """Remove what legitimately differs between two runs of the same command."""
    text = _TIMING.sub("X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", text)
    text = _MACHINE_TIMING.sub(r"\1,\2,TIME,RATE,RATE", text)
    text = _VERSION.sub(r"\1 version VERSION", text)
    text = _FORMATS.sub("Supported formats: FORMATS", text)
    if folder is not None:
        text = text.replace(str(folder) + "/", "TEST_DIR/").replace(str(folder), "TEST_DIR")
    return text


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str

    def view(self) -> str:
        return f"status {self.status}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


@dataclass
class Tools:
    """The programs of one side: real QEMU or the pyqemu front ends."""

    name: str
    img: Sequence[str]
    io: Sequence[str]


def _program(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} is not installed in {path.parent} (pip install -e .)")
    return path


@pytest.fixture(scope="session")
def pyqemu_img() -> Path:
    return _program(VENV_BIN / "pyqemu-img")


@pytest.fixture(scope="session")
def pyqemu_io() -> Path:
    return _program(VENV_BIN / "pyqemu-io")


class Side:
    """One scratch folder and the tools that run in it."""

    def __init__(self, folder: Path, tools: Tools) -> None:
        self.folder = folder
        self.tools = tools

    def run(self, tool: str, args: Sequence[str], stdin: str | None = None,
            env: dict[str, str] | None = None) -> Outcome:
        completed = self._spawn(tool, args, stdin, subprocess.PIPE, env)
        return Outcome(completed.returncode, normalise(completed.stdout, self.folder),
                       normalise(completed.stderr, self.folder))

    def _spawn(self, tool: str, args: Sequence[str], stdin: str | None, stderr: int,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        program = self.tools.img if tool == "img" else self.tools.io
        # argv[0] is the bare tool name, as when QEMU is found through PATH
        argv = [("qemu-img" if tool == "img" else "qemu-io"), *args]
        feed: dict[str, object] = ({"input": stdin} if stdin is not None
                                   else {"stdin": subprocess.DEVNULL})
        return subprocess.run(argv, executable=program[0], cwd=self.folder,
                              stdout=subprocess.PIPE, stderr=stderr, text=True,
                              errors="surrogateescape", timeout=600,
                              env=env if env is not None else child_environment(),
                              **feed)  # type: ignore[call-overload]

    def merged(self, tool: str, args: Sequence[str], stdin: str | None = None) -> Outcome:
        """The same, with stderr sent into stdout (2>&1), as iotests capture it."""
        completed = self._spawn(tool, args, stdin, subprocess.STDOUT)
        return Outcome(completed.returncode, normalise(completed.stdout, self.folder), "")


class Twins:
    """Two folders with identical inputs; commands run in both and are compared."""

    def __init__(self, root: Path, qemu: Tools, ours: Tools) -> None:
        (root / "qemu").mkdir()
        (root / "pyqemu").mkdir()
        self.qemu = Side(root / "qemu", qemu)
        self.ours = Side(root / "pyqemu", ours)
        self._reference = Side(root / "pyqemu", qemu)

    def setup(self, *commands: Sequence[str]) -> None:
        """Prepare both folders with real QEMU: ("img", args...) or ("io", args...)."""
        for command in commands:
            tool, *args = command
            for side in (self.qemu, self._reference):
                result = side.run(tool, args)
                assert result.status == 0, f"setup {command} failed:\n{result.view()}"

    def patch(self, filename: str, edit: Callable[[Path], None]) -> None:
        """Change a file in both folders the same way (for damaged images)."""
        edit(self.qemu.folder / filename)
        edit(self.ours.folder / filename)

    def write_file(self, filename: str, data: bytes) -> None:
        (self.qemu.folder / filename).write_bytes(data)
        (self.ours.folder / filename).write_bytes(data)

    def compare(self, tool: str, *args: str, stdin: str | None = None,
                merged: bool = False) -> Outcome:
        """Run on both sides; assert identical status, stdout and stderr."""
        runner = Side.merged if merged else Side.run
        theirs = runner(self.qemu, tool, args, stdin)
        ours = runner(self.ours, tool, args, stdin)
        assert ours.view() == theirs.view(), (
            f"{tool} {' '.join(args)}\n=== QEMU\n{theirs.view()}\n=== pyqemu\n{ours.view()}")
        return ours

    def same_images(self, *filenames: str, fmt: str = "qcow2") -> None:
        """Real qemu-img sees the same allocation and the same check result."""
        for filename in filenames:
            for args in (["map", "--output=json", "-f", fmt, filename],
                         ["check", "-f", fmt, filename]):
                if fmt == "raw" and args[0] == "check":
                    continue
                theirs = self.qemu.run("img", args)
                ours = self._reference.run("img", args)
                assert ours.view() == theirs.view(), (
                    f"after the command, qemu-img {' '.join(args)} differs\n"
                    f"=== QEMU-made\n{theirs.view()}\n=== pyqemu-made\n{ours.view()}")


@pytest.fixture
def child_env() -> dict[str, str]:
    return child_environment()


@pytest.fixture(name="normalise")
def normalise_fixture() -> Callable[[str], str]:
    """normalise() for tests that compare outputs themselves."""
    return normalise


@pytest.fixture
def make_twins(qemu_img: str, qemu_io: str, pyqemu_img: Path,
               pyqemu_io: Path) -> Callable[[Path], Twins]:
    """Twins in a folder of the caller's choosing (for hypothesis examples)."""
    qemu = Tools("qemu", [qemu_img], [qemu_io])
    ours = Tools("pyqemu", [str(pyqemu_img)], [str(pyqemu_io)])
    return lambda root: Twins(root, qemu, ours)


@pytest.fixture
def twins(tmp_path: Path, make_twins: Callable[[Path], Twins]) -> Twins:
    return make_twins(tmp_path)


def have_engine() -> bool:
    try:
        import imgengine
    except ImportError:
        return False
    return hasattr(imgengine, "open_image") and hasattr(imgengine, "create_image")


@pytest.fixture
def engine() -> None:
    """Skip a test that needs the engine while imgengine is not there yet."""
    if not have_engine():
        pytest.skip("imgengine does not provide open_image/create_image yet")

