"""Where a front end's output goes, buffered the way QEMU's C stdio buffers it.

QEMU writes results with printf (stdout: fully buffered in blocks when not a
terminal, so it reaches a pipe in whole blocks or at exit) and errors with
fprintf(stderr) (unbuffered, immediate).  When a test merges the two streams
(`2>&1`) the order it sees depends on that buffering, so Console keeps the same
discipline: errors go out at once, results are held and released in the same
block-sized pieces glibc would release them.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import TextIO

_DEFAULT_BLOCK = 4096


def release_stdout() -> None:
    """At process exit: if stdout is a closed pipe, point it at /dev/null so the
    interpreter's final flush does not complain (only main() calls this)."""
    import sys
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def program_name(argv0: str, default: str) -> str:
    """QEMU names itself by argv[0]'s basename; the pyqemu- install names map
    to the QEMU tool they stand in for, so messages read "qemu-img: ..."."""
    base = argv0.rsplit("/", 1)[-1] if argv0 else default
    if base.startswith("pyqemu-"):
        return base[2:]
    return base or default


class Console:
    """stdout/stderr of one front-end run, with QEMU's message helpers."""

    def __init__(self, stdout: TextIO, stderr: TextIO, prog: str) -> None:
        self._stdout = stdout
        self._stderr = stderr
        self.prog = prog
        self._buffer = bytearray()
        self._allocated = False
        self.broken = False             # stdout can no longer be written
        self._block = _DEFAULT_BLOCK
        self._line_buffered = False
        self._out_binary = getattr(stdout, "buffer", None)
        self._err_binary = getattr(stderr, "buffer", None)
        try:
            fd = stdout.fileno()
        except (AttributeError, OSError, ValueError):
            fd = -1
        if fd >= 0:
            try:
                self._line_buffered = os.isatty(fd)
                size = os.fstat(fd).st_blksize
                if size > 0:
                    self._block = size
            except OSError:
                pass

    # -- raw streams ---------------------------------------------------------

    def _emit(self, stream: TextIO, binary: object, text: str) -> None:
        # like C stdio with SIGPIPE ignored (as QEMU ignores it): a reader that
        # went away, or a full disk, just loses the output
        try:
            if binary is not None:
                binary.write(text.encode("utf-8", "surrogateescape"))  # type: ignore[attr-defined]
            else:
                stream.write(text)
            stream.flush()
        except OSError:
            pass

    def out(self, text: str) -> None:
        """printf to stdout."""
        if text:
            self.out_bytes(text.encode("utf-8", "surrogateescape"))

    def out_bytes(self, data: bytes) -> None:
        """printf to stdout of text already encoded."""
        if not data:
            return
        if self._line_buffered:
            self._buffer += data
            if b"\n" in data:
                self.flush()
            return
        # glibc's file xsputn: fill the buffer, and only when more is left
        # flush it, write whole blocks straight through and keep the rest
        room = self._block - len(self._buffer) if self._allocated else 0
        if room > 0:
            self._buffer += data[:room]
            data = data[room:]
        if data:
            self.flush()
            self._allocated = True
            direct = len(data) - len(data) % self._block
            if direct:
                self._emit_bytes(data[:direct])
            self._buffer += data[direct:]

    def _emit_bytes(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            if self._out_binary is not None:
                self._out_binary.write(data)  # type: ignore[attr-defined]
            else:
                self._stdout.write(data.decode("utf-8", "surrogateescape"))
            self._stdout.flush()
        except OSError:
            self.broken = True

    def flush(self) -> None:
        """fflush(stdout)."""
        if self._buffer:
            self._emit_bytes(bytes(self._buffer))
            self._buffer.clear()

    def discard(self) -> None:
        """What a process killed by a signal loses: stdout not yet flushed."""
        self._buffer.clear()

    def err(self, text: str) -> None:
        """fprintf(stderr): unbuffered."""
        if text:
            self._emit(self._stderr, self._err_binary, text)

    # -- QEMU's reporting helpers -------------------------------------------

    def error_report(self, message: str) -> None:
        self.err(f"{self.prog}: {message}\n")

    def warn_report(self, message: str) -> None:
        self.err(f"{self.prog}: warning: {message}\n")
