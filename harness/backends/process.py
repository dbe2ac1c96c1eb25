"""Backends that start real processes, through `sh`: one process per step,
stdin empty, stdout a pipe (never a terminal), run in the case's directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from abc import abstractmethod

import sh

from harness.backends.base import Backend, BackendError, Result, killed_note

# every exit status, and every death by a signal (sh's negative statuses)
_ANY_STATUS = range(-64, 256)


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
        # Started in the background and waited for, with our own timer for the
        # step limit: sh's _timeout polls every 0.1 s, which would add that
        # much to every one of the hundreds of processes a case starts.
        # Negative statuses (killed by a signal) are results, not exceptions.
        process = command(*argv, _cwd=cwd, _in="", _tty_out=False, _return_cmd=True,
                          _err_to_out=merge_stderr, _ok_code=_ANY_STATUS, _bg=True)
        limit = step_timeout()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            with contextlib.suppress(ProcessLookupError):
                process.kill()

        timer = threading.Timer(limit, expire)
        timer.daemon = True
        timer.start()
        try:
            process.wait()
        finally:
            timer.cancel()
        stdout, stderr, status = process.stdout, process.stderr or b"", process.exit_code
        note = ""
        if expired.is_set():
            note = f"{tool}: killed after {limit:g} s without finishing ($HARNESS_STEP_TIMEOUT)\n"
        elif status < 0:
            note = killed_note(tool, -status)
        if merge_stderr:
            stdout += note.encode()
        else:
            stderr += note.encode()
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
