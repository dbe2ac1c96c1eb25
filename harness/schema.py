"""The case model: what a loaded, fully expanded case is, and the error it raises.

A case file (`cases/NNN-name.yaml`) is validated and expanded once, at load
time, into a flat tuple of concrete steps: text to print, one `qemu-img` or
`qemu-io` process to run, or an image file to delete. Templates, loops and
variables are gone by then, so the runner only carries steps out.

Image paths are not known until the runner has made the case's temporary
directory; arguments refer to it through `TEST_DIR_MARK`, which the runner
swaps for the real directory (a NUL byte cannot appear in a real argument).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TEST_DIR_MARK = "\0TEST_DIR\0"

QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
TOOLS = (QEMU_IMG, QEMU_IO)

IMAGE_FORMATS = ("qcow2", "raw")


class CaseError(Exception):
    """A malformed case: reported as `file:line: message`, never as a traceback."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = str(path)
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Image:
    """A named image of the case and the defaults its `create` steps start from."""

    name: str
    file: str  # relative to the case's temporary directory
    format: str
    size: str | None = None
    cluster_size: str | None = None
    backing: str | None = None  # name of another image
    backing_format: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        return f"{TEST_DIR_MARK}/{self.file}"


@dataclass(frozen=True)
class Step:
    """Where a step came from, for messages that point back into the case file."""

    line: int
    via: tuple[int, ...] = field(default=(), kw_only=True)  # lines of the `use:`/`for each:` around it

    def where(self, path: str | Path) -> str:
        text = f"{path}:{self.line}"
        if self.via:
            text += " (via line " + ", line ".join(str(n) for n in reversed(self.via)) + ")"
        return text


@dataclass(frozen=True)
class Echo(Step):
    """Print a line of text (headings, blank lines), as the test script's `echo`."""

    text: str


@dataclass(frozen=True)
class Command(Step):
    """One qemu-img or qemu-io process and what becomes of its output.

    `merge_stderr` is the script's `2>&1 |`: both streams go through the
    filters. Otherwise stderr passes around the filters unchanged, as it does
    in a script's `CMD | filter`.
    """

    tool: str
    args: tuple[str, ...]
    filters: tuple[str, ...]
    merge_stderr: bool

    def argv(self, test_dir: str) -> list[str]:
        return [arg.replace(TEST_DIR_MARK, test_dir) for arg in self.args]

    def display(self) -> str:
        """The command line as a shell would show it, with TEST_DIR for the directory."""
        return shlex.join([self.tool, *self.argv("TEST_DIR")])


@dataclass(frozen=True)
class Remove(Step):
    """Delete an image file (the script's `rm -f`); prints nothing."""

    file: str


@dataclass(frozen=True)
class Case:
    path: Path
    seq: str
    title: str
    format: str
    images: Mapping[str, Image]
    steps: tuple[Echo | Command | Remove, ...]

    @property
    def name(self) -> str:
        """The file name without `.yaml`, e.g. `154-write-zeroes-backing`."""
        return self.path.stem

    @property
    def golden_name(self) -> str:
        return f"{self.seq}.out"
