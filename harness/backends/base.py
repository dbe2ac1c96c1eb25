"""The one interface every backend implements: carry out a qemu-img or
qemu-io command line and hand back what it printed.

The runner builds the command lines exactly as qemu-iotests would and never
asks which backend it talks to; backends differ only in what executes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class BackendError(Exception):
    """The backend cannot run at all here (a broken install, a missing entry point)."""


@dataclass(frozen=True)
class Result:
    """What one process printed. With merged stderr, `stdout` holds both
    streams in the order they were written and `stderr` is empty."""

    stdout: str
    stderr: str
    status: int


def killed_note(tool: str, signal_number: int) -> str:
    """The line a backend adds where a tool died of a signal (what a shell
    would report), in the stream the tool's stderr goes to."""
    return f"{tool}: killed by signal {signal_number}\n"


class Backend(ABC):
    name: str = ""

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine (the items are then
        skipped with that reason), or None."""
        return None

    @abstractmethod
    def run(self, tool: str, argv: list[str], *, cwd: str, merge_stderr: bool) -> Result:
        """Run `tool` ("qemu-img" or "qemu-io") with `argv` (without the
        program name) as one process would: image state is only what is on
        disk; nothing carries over from earlier calls."""
