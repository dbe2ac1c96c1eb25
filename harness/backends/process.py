"""Backends that start real processes, through `sh`: one process per step,
stdin empty, stdout a pipe (never a terminal), run in the case's directory."""

from __future__ import annotations

import os
import shutil
from abc import abstractmethod

import sh

from harness.backends.base import Backend, BackendError, Result, killed_note


class ProcessBackend(Backend):
    """Runs each tool as the program `programs()` names for it."""

    @abstractmethod
    def programs(self) -> dict[str, str | None]:
        """tool -> the program's path, or None where it cannot be found."""

    def missing_program_message(self, tool: str) -> str:
        return f"{tool} not found"

    def describe_program(self, tool: str, program: str) -> str:
        """Where `program` came from, for an error about it."""
        return f"{program} (the {tool} program)"

    def __init__(self) -> None:
        self._commands: dict[str, sh.Command] = {}

    def _command(self, tool: str) -> sh.Command:
        command = self._commands.get(tool)
        if command is None:
            program = self.programs().get(tool)
            if program is None:
                raise BackendError(self.missing_program_message(tool))
            if "/" not in program:  # a bare name, as a shell would take it
                program = shutil.which(program) or program
            # sh would fail later with its own exception type and a traceback
            if not (os.path.isfile(program) and os.access(program, os.X_OK)):
                raise BackendError(f"{self.describe_program(tool, program)} "
                                   "is not an executable file")
            command = self._commands[tool] = sh.Command(program)
        return command

    def run(self, tool: str, argv: list[str], *, cwd: str, merge_stderr: bool) -> Result:
        command = self._command(tool)
        try:
            process = command(*argv, _cwd=cwd, _in="", _tty_out=False, _return_cmd=True,
                              _err_to_out=merge_stderr, _ok_code=range(256),
                              _timeout=step_timeout())
            stdout, stderr, status = process.stdout, process.stderr, process.exit_code
        except sh.TimeoutException:
            stdout, stderr, status = b"", b"", -9
            note = (f"{tool}: killed after {step_timeout():g} s without finishing "
                    "($HARNESS_STEP_TIMEOUT)\n")
        except sh.ErrorReturnCode as died:  # killed by a signal
            stdout, stderr, status = died.stdout, died.stderr or b"", died.exit_code
            note = killed_note(tool, -status)
        else:
            note = ""
        if merge_stderr:
            stdout += note.encode()
        else:
            stderr = (stderr or b"") + note.encode()
        return Result(stdout=stdout.decode("utf-8", "replace"),
                      stderr=stderr.decode("utf-8", "replace"),
                      status=status)


def step_timeout() -> float:
    """Seconds one step may run before it is killed: generous, so only a
    hang (a qemu-io sleep, a FIFO for a backing file) ever reaches it."""
    try:
        seconds = float(os.environ.get("HARNESS_STEP_TIMEOUT", "600"))
    except ValueError:
        return 600.0
    return seconds if seconds > 0 else 600.0


def which(name: str) -> str | None:
    return shutil.which(name)
