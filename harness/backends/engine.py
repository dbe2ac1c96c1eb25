"""The `engine` backend: the pyqemu front ends called in-process.

`pyqemu.img.run` / `pyqemu.io.run` get string buffers for stdin, stdout and
stderr (one shared buffer when stderr is merged), which is the same text the
`pyqemu-*` processes print, without a process start per step. An exception
escaping `run` is printed as a traceback on its stderr with status 1, the
way the process would die, so the transcript diff shows where it happened.

The call runs in the case's directory, as a process would, so relative file
names mean the same on every backend. A run "killed" by a signal in-process
(qemu-io's abort, sigraise) returns 128 + the signal number, as a shell
reports it; it gets the same note and status as a real killed process.
"""

from __future__ import annotations

import importlib
import io
import os
import traceback
from collections.abc import Callable
from typing import TextIO

from harness.backends.base import Backend, BackendError, Result, killed_note
from harness.schema import QEMU_IMG, QEMU_IO

# statuses above this are 128 + a signal number (exit statuses of QEMU's
# tools are small)
_KILLED = 128

EntryPoint = Callable[[list[str], TextIO, TextIO, TextIO], int]


class EngineBackend(Backend):
    name = "engine"

    def __init__(self) -> None:
        self._entry_points: dict[str, EntryPoint] | None = None

    def _entry(self, tool: str) -> EntryPoint:
        if self._entry_points is None:
            try:
                self._entry_points = {
                    QEMU_IMG: importlib.import_module("pyqemu.img").run,
                    QEMU_IO: importlib.import_module("pyqemu.io").run,
                }
            except Exception as error:  # any import failure is a broken front end
                raise BackendError(
                    "the engine backend calls pyqemu.img.run and pyqemu.io.run, which "
                    f"cannot be imported: {type(error).__name__}: {error}") from error
        return self._entry_points[tool]

    def run(self, tool: str, argv: list[str], *, cwd: str, merge_stderr: bool) -> Result:
        entry = self._entry(tool)
        stdout = io.StringIO()
        stderr = stdout if merge_stderr else io.StringIO()
        home = os.getcwd()
        os.chdir(cwd)
        try:
            status = entry(list(argv), io.StringIO(""), stdout, stderr)
        except (Exception, SystemExit):
            stderr.write(traceback.format_exc())
            status = 1
        finally:
            os.chdir(home)
        if not isinstance(status, int):
            status = 1
        if status > _KILLED:
            stderr.write(killed_note(tool, status - _KILLED))
            status = _KILLED - status
        return Result(stdout=stdout.getvalue(),
                      stderr="" if merge_stderr else stderr.getvalue(),
                      status=status)
