"""qemu-io's commands: one table, shaped like qemu-io-cmds.c's, and their bodies.

Each Command row holds what QEMU's cmdinfo_t holds (name, short alias,
argument counts, flags, whether it writes, usage, one-line help, long help);
`execute` is qemuio_command: split the line on spaces, find the row, check that
an image is open and the argument count, then run the body.  Bodies parse
their options with glibc's getopt semantics, ask the engine, and print what
qemu-io prints.  Large transfers are done in bounded chunks so memory stays
small whatever the request length.
"""

# QEMU's printf formats are reproduced as printf formats on purpose.
# ruff: noqa: UP031

from __future__ import annotations

import os
import time

from pyqemu.getopt import GetOpt
from pyqemu.units import (
    EINVAL,
    ERANGE,
    INT64_MAX,
    SizeError,
    c_strtol,
    cvtstr,
    report_lines,
    strtosz,
)

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from pyqemu.io import IoSession

ENOTSUP = 95
EIO = 5
EPERM = 1
SECTOR = 512
INT_MAX = (1 << 31) - 1
# BDRV_REQUEST_MAX_BYTES: the largest request QEMU's block layer takes
REQUEST_MAX_BYTES = (INT_MAX >> 9) << 9
# transfers are split at multiples of this (absolute offsets), bounding memory
CHUNK = 4 * 1024 * 1024

GLOBAL = 1        # runs whether or not an image is open (CMD_FLAG_GLOBAL)
NOFILE_OK = 2     # may run without an open image (CMD_NOFILE_OK)


class Command:
    """One row of the command table (QEMU's cmdinfo_t)."""

    __slots__ = ("name", "body", "oneline", "altname", "argmin", "argmax", "flags", "writes",
                 "args", "has_help")

    def __init__(self, name: str, body: Callable[[IoSession, list[str]], int], oneline: str,
                 altname: str | None = None, argmin: int = 0, argmax: int = 0, flags: int = 0,
                 writes: bool = False, args: str | None = None, has_help: bool = False) -> None:
        self.name = name
        self.body = body
        self.oneline = oneline
        self.altname = altname
        self.argmin = argmin
        self.argmax = argmax
        self.flags = flags
        self.writes = writes
        self.args = args
        self.has_help = has_help

    def usage(self) -> str:
        return f"{self.name} {self.args} -- {self.oneline}\n"


class Crash(Exception):
    """A command asked for the process to die by a signal (sigraise, abort)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


# -- helpers shared by the bodies ---------------------------------------------

def cvtnum(session: IoSession, text: str) -> int:
    """qemu-io's cvtnum: bytes, or -EINVAL / -ERANGE."""
    try:
        value = strtosz(text, session.console.warn_report)
    except SizeError as error:
        return -error.errno
    if value > INT64_MAX:
        return -ERANGE
    return value


def number_arg(session: IoSession, text: str, shown: str | None = None) -> int:
    """cvtnum, printing QEMU's parsing error when it fails (naming ``shown``,
    the argument QEMU names, by default ``text``): the number or -errno."""
    value = cvtnum(session, text)
    if value < 0:
        cvtnum_error(session, value, text if shown is None else shown)
    return value


def _offset_and_count(session: IoSession, args: list[str]) -> tuple[int, int, int]:
    """The offset and length arguments of a request: (0, offset, count), or
    (the status to return, 0, 0) once an error is printed."""
    offset = number_arg(session, args[0])
    if offset < 0:
        return offset, 0, 0
    count = number_arg(session, args[1])
    if count < 0:
        return count, 0, 0
    return 0, offset, count


def _within_request_limit(session: IoSession, count: int, text: str, note: str = "") -> bool:
    """BDRV_REQUEST_MAX_BYTES, with qemu-io's message when count is over it."""
    if count <= REQUEST_MAX_BYTES:
        return True
    session.out(f"length cannot exceed {REQUEST_MAX_BYTES}{note}, given {text}\n")
    return False


def _sector_aligned(session: IoSession, offset: int, count: int) -> bool:
    """VM state and compressed requests take whole sectors; qemu-io says which is not."""
    for value, name in ((offset, "offset"), (count, "count")):
        if value % SECTOR:
            session.out(f"{value} is not a sector-aligned value for '{name}'\n")
            return False
    return True


def cvtnum_error(session: IoSession, code: int, text: str) -> None:
    if code == -EINVAL:
        session.out("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- "
                    f"{text}\n")
    elif code == -ERANGE:
        session.out(f"Parsing error: argument too large -- {text}\n")
    else:
        session.out(f"Parsing error: {text}\n")


def parse_pattern(session: IoSession, text: str) -> int:
    value, consumed = c_strtol(text, 0)
    if value < 0 or value > 255 or consumed != len(text):
        session.out(f"{text} is not a valid pattern byte\n")
        return -1
    return value


def engine_errno(error: BaseException) -> int:
    code = getattr(error, "errno", None)
    return code if isinstance(code, int) and code > 0 else EIO


def strerror(code: int) -> str:
    return os.strerror(code)


def dump_buffer(data: bytes, offset: int) -> str:
    """read -v's hex dump: 16 bytes a line, alphanumerics shown, others '.'."""
    lines = []
    for start in range(0, len(data), 16):
        row = data[start:start + 16]
        hexes = "".join("%02x " % byte for byte in row)
        text = "".join(chr(byte) if chr(byte).isascii() and chr(byte).isalnum() else "."
                       for byte in row)
        lines.append("%08x:  %s %s\n" % (offset + start, hexes, text))
    return "".join(lines)


def chunks(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of a request, cut at absolute multiples of CHUNK."""
    end = offset + length
    while offset < end:
        stop = min(end, (offset // CHUNK + 1) * CHUNK)
        yield offset, stop - offset
        offset = stop


def _getopt(argv: list[str], optstring: str, session: IoSession) -> GetOpt:
    return GetOpt(argv, optstring, (), session.console.err)


def _usage(session: IoSession, name: str) -> int:
    session.out(COMMANDS_BY_NAME[name].usage())
    return -EINVAL


class _Pattern:
    """A byte pattern filling a write buffer, or the bytes of a source file."""

    def __init__(self, byte: int, source: bytes | None = None) -> None:
        self.byte = byte
        self.source = source

    def piece(self, position: int, length: int) -> bytes:
        """length bytes of the buffer starting at position within the request."""
        if self.source is None:
            return bytes([self.byte]) * length
        size = len(self.source)
        start = position % size
        repeated = self.source[start:] + self.source * ((length + size) // size + 1)
        return repeated[:length]


def _elapsed(start: int) -> int:
    return time.monotonic_ns() - start


# -- read, readv, aio_read -----------------------------------------------------

def read_body(session: IoSession, argv: list[str]) -> int:
    machine = quiet = verbose = False
    pattern_flag = offset_flag = length_flag = vmstate = False
    pattern = 0
    pattern_offset = pattern_count = 0
    parser = _getopt(argv, "bCl:pP:qs:v", session)
    for option, value in parser:
        assert value is not None or option not in "lPs"
        if option == "b":
            vmstate = True
        elif option == "C":
            machine = True
        elif option == "l":
            length_flag = True
            pattern_count = number_arg(session, value or "")
            if pattern_count < 0:
                return pattern_count
        elif option == "p":
            pass
        elif option == "P":
            pattern_flag = True
            pattern = parse_pattern(session, value or "")
            if pattern < 0:
                return -EINVAL
        elif option == "q":
            quiet = True
        elif option == "s":
            offset_flag = True
            pattern_offset = number_arg(session, value or "")
            if pattern_offset < 0:
                return pattern_offset
        elif option == "v":
            verbose = True
        else:
            return _usage(session, "read")
    args = parser.argv[parser.optind:]
    if len(args) != 2:
        return _usage(session, "read")
    status, offset, count = _offset_and_count(session, args)
    if status:
        return status
    if not _within_request_limit(session, count, args[1]):
        return -EINVAL
    if not pattern_flag and (length_flag or offset_flag):
        return _usage(session, "read")
    if not length_flag:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        session.out("pattern verification range exceeds end of read data\n")
        return -EINVAL
    if vmstate and not _sector_aligned(session, offset, count):
        return -EINVAL

    started = time.monotonic_ns()
    if vmstate and count > INT_MAX:
        error_code, mismatch, kept = ERANGE, False, b""
    else:
        error_code, mismatch, kept = _read_checked(
            session, offset, count, pattern if pattern_flag else None,
            pattern_offset, pattern_count, keep=verbose and not quiet, vmstate=vmstate)
    elapsed = _elapsed(started)
    if error_code:
        session.out(f"read failed: {strerror(error_code)}\n")
        return -error_code
    ret = 0
    if mismatch:
        session.out("Pattern verification failed at offset %d, %d bytes\n"
                    % (offset + pattern_offset, pattern_count))
        ret = -EINVAL
    if quiet:
        return ret
    if verbose:
        session.out(dump_buffer(kept, offset))
    session.out(report_lines("read", elapsed, offset, count, count, 1, machine))
    return ret


def _read_checked(session: IoSession, offset: int, count: int, pattern: int | None,
                  check_start: int, check_count: int, keep: bool,
                  vmstate: bool = False) -> tuple[int, bool, bytes]:
    """Read a request chunk by chunk: (errno or 0, pattern mismatch, data if kept).

    With vmstate the request reads the VM state (qemu-io ``read -b``) rather
    than the guest disk."""
    import imgengine

    node = session.node
    mismatch = False
    kept = bytearray()
    check_end = check_start + check_count
    # one reused buffer when the engine can read into it (BlockNode.read_into)
    read_into = None if vmstate else getattr(node, "read_into", None)
    read = node.read_vmstate if vmstate else node.read
    buffer = memoryview(bytearray(min(count, CHUNK))) if read_into is not None else None
    expected = bytes([pattern]) * min(count, CHUNK) if pattern is not None else b""
    try:
        if count == 0:
            read(offset, 0)
        elif not vmstate and offset + count > node.length():
            # A request reaching past the end fails whole before any data is
            # read (a piece read first would leave pages in the host's cache,
            # which changes what SEEK_DATA reports for preallocated ranges).
            read(offset + count, 0)
        for piece_offset, piece_length in chunks(offset, count):
            if buffer is not None:
                data: bytes | memoryview = buffer[:piece_length]
                read_into(piece_offset, data)
            else:
                data = read(piece_offset, piece_length)
            if keep:
                kept += data
            if pattern is not None and not mismatch:
                start = max(check_start, piece_offset - offset)
                end = min(check_end, piece_offset - offset + piece_length)
                if start < end:
                    window = data[start - (piece_offset - offset):end - (piece_offset - offset)]
                    if bytes(window) != expected[:end - start]:
                        mismatch = True
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        return code, False, b""
    return 0, mismatch, bytes(kept)


def _lengths(session: IoSession, texts: list[str]) -> list[int] | None:
    """create_iovec's checks on the lengths of a vectored request."""
    lengths = []
    total = 0
    for text in texts:
        length = number_arg(session, text)
        if length < 0:
            return None
        if length > REQUEST_MAX_BYTES:
            session.out(f"Argument '{text}' exceeds maximum size {REQUEST_MAX_BYTES}\n")
            return None
        if total > REQUEST_MAX_BYTES - length:
            session.out(f"The total number of bytes exceed the maximum size {REQUEST_MAX_BYTES}\n")
            return None
        lengths.append(length)
        total += length
    return lengths


def readv_body(session: IoSession, argv: list[str]) -> int:
    return _vectored_read(session, argv, "readv", "CP:qv", asynchronous=False)


def aio_read_body(session: IoSession, argv: list[str]) -> int:
    return _vectored_read(session, argv, "aio_read", "CP:iqv", asynchronous=True)


def _vectored_read(session: IoSession, argv: list[str], name: str, optstring: str,
                   asynchronous: bool) -> int:
    machine = quiet = verbose = False
    pattern: int | None = None
    parser = _getopt(argv, optstring, session)
    for option, value in parser:
        if option == "C":
            machine = True
        elif option == "P":
            pattern = parse_pattern(session, value or "")
            if pattern < 0:
                return -EINVAL
        elif option == "i":
            session.out("injecting invalid read request\n")
            return 0
        elif option == "q":
            quiet = True
        elif option == "v":
            verbose = True
        else:
            return _usage(session, name)
    args = parser.argv[parser.optind:]
    if len(args) < 2:
        return _usage(session, name)
    offset = number_arg(session, args[0])
    if offset < 0:
        return offset
    lengths = _lengths(session, args[1:])
    if lengths is None:
        return -EINVAL
    total = sum(lengths)
    started = time.monotonic_ns()
    error_code, mismatch, kept = _read_checked(session, offset, total, pattern, 0, total,
                                               keep=verbose and not quiet)
    elapsed = _elapsed(started)
    if error_code:
        session.out(f"readv failed: {strerror(error_code)}\n")
        return 0 if asynchronous else -error_code
    ret = 0
    if mismatch:
        session.out(f"Pattern verification failed at offset {offset}, {total} bytes\n")
        ret = 0 if asynchronous else -EINVAL
    if quiet:
        return ret
    if verbose:
        session.out(dump_buffer(kept, offset))
    session.out(report_lines("read", elapsed, offset, total, total, 1, machine))
    return ret


# -- write, writev, aio_write ---------------------------------------------------

def write_body(session: IoSession, argv: list[str]) -> int:
    machine = quiet = vmstate = compressed = False
    pattern_flag = zeroes = from_file = False
    fua = no_fallback = may_unmap = False
    pattern = 0xCD
    source_name = ""
    parser = _getopt(argv, "bcCfnpP:qs:uz", session)
    for option, value in parser:
        if option == "b":
            vmstate = True
        elif option == "c":
            compressed = True
        elif option == "C":
            machine = True
        elif option == "f":
            fua = True
        elif option == "n":
            no_fallback = True
        elif option == "p":
            pass
        elif option == "P":
            pattern_flag = True
            pattern = parse_pattern(session, value or "")
            if pattern < 0:
                return -EINVAL
        elif option == "q":
            quiet = True
        elif option == "s":
            from_file = True
            source_name = value or ""
        elif option == "u":
            may_unmap = True
        elif option == "z":
            zeroes = True
        else:
            return _usage(session, "write")
    args = parser.argv[parser.optind:]
    if len(args) != 2:
        return _usage(session, "write")
    if vmstate and zeroes:
        session.out("-b and -z cannot be specified at the same time\n")
        return -EINVAL
    if fua and (vmstate or compressed):
        session.out("-f and -b or -c cannot be specified at the same time\n")
        return -EINVAL
    if no_fallback and not zeroes:
        session.out("-n requires -z to be specified\n")
        return -EINVAL
    if may_unmap and not zeroes:
        session.out("-u requires -z to be specified\n")
        return -EINVAL
    if zeroes + pattern_flag + from_file > 1:
        session.out("Only one of -z, -P, and -s can be specified at the same time\n")
        return -EINVAL
    status, offset, count = _offset_and_count(session, args)
    if status:
        return status
    if not no_fallback and not _within_request_limit(session, count, args[1], " without -n"):
        return -EINVAL
    if (vmstate or compressed) and not _sector_aligned(session, offset, count):
        return -EINVAL
    fill = _Pattern(pattern)
    if from_file:
        source = _source_file(session, source_name, count)
        if source is None:
            return -EINVAL
        fill = _Pattern(0, source)

    started = time.monotonic_ns()
    if vmstate:
        error_code = _write_vmstate(session, offset, count, fill)
    elif zeroes:
        error_code = _write_zeroes(session, offset, count, may_unmap, fua or session.writethrough,
                                   no_fallback)
    elif compressed:
        error_code = _write_compressed(session, offset, count, fill)
    elif count > INT_MAX:
        error_code = ERANGE
    else:
        error_code = _write_data(session, offset, count, fill, fua or session.writethrough)
    elapsed = _elapsed(started)
    if error_code:
        session.out(f"write failed: {strerror(error_code)}\n")
        return -error_code
    if not quiet:
        session.out(report_lines("wrote", elapsed, offset, count, count, 1, machine))
    return 0


def _source_file(session: IoSession, name: str, count: int) -> bytes | None:
    """The first count bytes of a pattern file (repeated when shorter)."""
    try:
        with open(name, "rb") as source:
            data = source.read(count)
    except OSError as error:
        session.console.err(f"{name}: {error.strerror}\n")
        return None
    if not data:
        session.console.err(f"{name}: file is empty\n")
        return None
    return data


def _write_data(session: IoSession, offset: int, count: int, fill: _Pattern,
                fua: bool) -> int:
    """A guest write of count bytes; 0 or the errno it failed with."""
    import imgengine

    node = session.node
    try:
        if count <= CHUNK:
            node.write(offset, fill.piece(0, count), fua=fua)
            return 0
        if offset + count > node.length():
            # A request reaching past the end is refused whole, before any
            # data moves; an empty request at its end is refused the same way
            # and needs no buffer of the request's size.
            node.write(offset + count, b"", fua=fua)
            node.write(offset, fill.piece(0, count), fua=fua)
            return 0
        for piece_offset, piece_length in chunks(offset, count):
            node.write(piece_offset, fill.piece(piece_offset - offset, piece_length), fua=fua)
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        return code
    return 0


def _write_vmstate(session: IoSession, offset: int, count: int, fill: _Pattern) -> int:
    """qemu-io ``write -b``: save VM state; 0 or the errno it failed with."""
    import imgengine

    if count > INT_MAX:
        return ERANGE
    node = session.node
    try:
        if count == 0:
            node.write_vmstate(offset, b"")
        for piece_offset, piece_length in chunks(offset, count):
            node.write_vmstate(piece_offset, fill.piece(piece_offset - offset, piece_length))
        # blk_save_vmstate flushes a whole save when the cache is write-through
        if session.writethrough:
            node.flush()
    except (imgengine.ImageError, OSError) as error:
        return session.failed(error)
    return 0


def _write_zeroes(session: IoSession, offset: int, count: int, may_unmap: bool, fua: bool,
                  no_fallback: bool) -> int:
    import imgengine

    try:
        session.node.write_zeroes(offset, count, may_unmap=may_unmap, fua=fua,
                                  no_fallback=no_fallback)
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        return code
    return 0


def _write_compressed(session: IoSession, offset: int, count: int, fill: _Pattern) -> int:
    import imgengine

    writer = getattr(session.node, "write_compressed", None)
    if writer is None:
        return ENOTSUP
    if count > REQUEST_MAX_BYTES:
        return ERANGE
    try:
        writer(offset, fill.piece(0, count))
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        return code
    return 0


def writev_body(session: IoSession, argv: list[str]) -> int:
    return _vectored_write(session, argv, "writev", "CfqP:", asynchronous=False)


def aio_write_body(session: IoSession, argv: list[str]) -> int:
    return _vectored_write(session, argv, "aio_write", "CfiqP:uz", asynchronous=True)


def _vectored_write(session: IoSession, argv: list[str], name: str, optstring: str,
                    asynchronous: bool) -> int:
    """writev and aio_write: one write of the lengths' sum (aio_write may write
    zeroes); a failed aio_write still returns 0, as QEMU's callback does."""
    machine = quiet = zeroes = fua = may_unmap = False
    pattern = 0xCD
    parser = _getopt(argv, optstring, session)
    for option, value in parser:
        if option == "C":
            machine = True
        elif option == "f":
            fua = True
        elif option == "q":
            quiet = True
        elif option == "u":
            may_unmap = True
        elif option == "P":
            pattern = parse_pattern(session, value or "")
            if pattern < 0:
                return -EINVAL
        elif option == "i":
            session.out("injecting invalid write request\n")
            return 0
        elif option == "z":
            zeroes = True
        else:
            return _usage(session, name)
    args = parser.argv[parser.optind:]
    if len(args) < 2:
        return _usage(session, name)
    if zeroes and len(args) != 2:
        session.out("-z supports only a single length parameter\n")
        return -EINVAL
    if may_unmap and not zeroes:
        session.out("-u requires -z to be specified\n")
        return -EINVAL
    offset = number_arg(session, args[0])
    if offset < 0:
        return offset
    if zeroes:
        count = number_arg(session, args[1])
        if count < 0:
            return count
        error_code = _write_zeroes(session, offset, count, may_unmap,
                                   fua or session.writethrough, False)
        # QEMU never starts the clock for this request: the time is since boot
        elapsed = time.monotonic_ns()
    else:
        lengths = _lengths(session, args[1:])
        if lengths is None:
            return -EINVAL
        count = sum(lengths)
        started = time.monotonic_ns()
        error_code = _write_data(session, offset, count, _Pattern(pattern),
                                 fua or session.writethrough)
        elapsed = _elapsed(started)
    if error_code:
        session.out(f"{name} failed: {strerror(error_code)}\n")
        return 0 if asynchronous else -error_code
    if not quiet:
        session.out(report_lines("wrote", elapsed, offset, count, count, 1, machine))
    return 0


def aio_flush_body(session: IoSession, argv: list[str]) -> int:
    return 0        # every request has already completed


# -- the rest -------------------------------------------------------------------

def flush_body(session: IoSession, argv: list[str]) -> int:
    import imgengine

    try:
        session.node.flush()
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        return -code
    return 0


def truncate_body(session: IoSession, argv: list[str]) -> int:
    import imgengine

    prealloc = "off"
    parser = _getopt(argv, "m:", session)
    for option, value in parser:
        if option == "m":
            if value not in ("off", "metadata", "falloc", "full"):
                session.console.error_report(f"Invalid preallocation mode '{value}'")
                return -EINVAL
            prealloc = value
        else:
            return _usage(session, "truncate")
    if parser.optind >= len(parser.argv):
        return _usage(session, "truncate")
    offset = number_arg(session, parser.argv[parser.optind], shown=argv[1])
    if offset < 0:
        return offset
    resize = getattr(session.node, "truncate", None)
    if resize is None:
        session.console.error_report("Image format driver does not support resize")
        return -ENOTSUP
    try:
        resize(offset, prealloc=prealloc) if prealloc != "off" else resize(offset)
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        session.report_engine_error(error)
        return -code
    return 0


def length_body(session: IoSession, argv: list[str]) -> int:
    import imgengine

    try:
        size = session.node.length()
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        session.out(f"getlength: {strerror(code)}\n")
        return -code
    session.out(cvtstr(float(size)) + "\n")
    return 0


def info_body(session: IoSession, argv: list[str]) -> int:
    import imgengine
    from pyqemu.qobject import dump_human, ordered

    node = session.node
    session.out(f"format name: {node.format_name}\n")
    try:
        info = node.info()
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        return -code
    session.out(f"cluster size: {cvtstr(float(info.cluster_size or 0))}\n")
    session.out(f"vm state offset: {cvtstr(float(info.vm_state_offset or 0))}\n")
    if info.format_specific is not None:
        session.out("Format specific information:\n")
        session.out(dump_human(ordered(info.format_specific), 1))
    return 0


def discard_body(session: IoSession, argv: list[str]) -> int:
    import imgengine

    machine = quiet = False
    parser = _getopt(argv, "Cq", session)
    for option, _value in parser:
        if option == "C":
            machine = True
        elif option == "q":
            quiet = True
        else:
            return _usage(session, "discard")
    args = parser.argv[parser.optind:]
    if len(args) != 2:
        return _usage(session, "discard")
    status, offset, count = _offset_and_count(session, args)
    if status:
        return status
    if not _within_request_limit(session, count, args[1]):
        return -EINVAL
    started = time.monotonic_ns()
    try:
        session.node.discard(offset, count)
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        session.out(f"discard failed: {strerror(code)}\n")
        return -code
    elapsed = _elapsed(started)
    if not quiet:
        session.out(report_lines("discard", elapsed, offset, count, count, 1, machine))
    return 0


def alloc_body(session: IoSession, argv: list[str]) -> int:
    import imgengine

    start = offset = cvtnum(session, argv[1])
    if offset < 0:
        cvtnum_error(session, offset, argv[1])
        return offset
    if len(argv) == 3:
        count = number_arg(session, argv[2])
        if count < 0:
            return count
    else:
        count = SECTOR
    remaining = count
    allocated_total = 0
    while remaining:
        try:
            allocated, done = session.node.is_allocated(offset, remaining)
        except (imgengine.ImageError, OSError) as error:
            code = session.failed(error)
            session.out(f"is_allocated failed: {strerror(code)}\n")
            return -code
        offset += done
        remaining -= done
        if allocated:
            allocated_total += done
        if done == 0:
            count -= remaining
            remaining = 0
    session.out(f"{allocated_total}/{count} bytes allocated at offset {cvtstr(float(start))}\n")
    return 0


def map_body(session: IoSession, argv: list[str]) -> int:
    import imgengine

    node = session.node
    offset = 0
    try:
        remaining = node.length()
    except (imgengine.ImageError, OSError) as error:
        code = session.failed(error)
        session.console.error_report(
            f"Failed to query image length: {strerror(code)}")
        return -code
    while remaining:
        try:
            allocated, count = node.is_allocated(offset, remaining)
            left = remaining - count
            position = offset + count
            while left > 0:
                same, more = node.is_allocated(position, left)
                if same != allocated or not more:
                    break
                count += more
                position += more
                left -= more
        except (imgengine.ImageError, OSError) as error:
            code = session.failed(error)
            session.console.error_report(
                f"Failed to get allocation status: {strerror(code)}")
            return -code
        if not count:
            session.console.error_report("Unexpected end of image")
            return -EIO
        state = "    allocated" if allocated else "not allocated"
        session.out("%s (0x%x) bytes %s at offset %s (0x%x)\n"
                    % (cvtstr(float(count)), count, state, cvtstr(float(offset)), offset))
        offset += count
        remaining -= count
    return 0


def break_body(session: IoSession, argv: list[str]) -> int:
    session.out(f"Could not set breakpoint: {strerror(ENOTSUP)}\n")
    return -ENOTSUP


def remove_break_body(session: IoSession, argv: list[str]) -> int:
    session.out(f"Could not remove breakpoint {argv[1]}: {strerror(ENOTSUP)}\n")
    return -ENOTSUP


def resume_body(session: IoSession, argv: list[str]) -> int:
    session.out(f"Could not resume request: {strerror(ENOTSUP)}\n")
    return -ENOTSUP


def wait_break_body(session: IoSession, argv: list[str]) -> int:
    # no debug driver can ever suspend a request here; QEMU would wait forever
    return -ENOTSUP


def abort_body(session: IoSession, argv: list[str]) -> int:
    import signal
    # abort() does not flush stdio, so output still buffered is lost
    return session.raise_signal(signal.SIGABRT, flush_first=False)


def sigraise_body(session: IoSession, argv: list[str]) -> int:
    import signal

    number = number_arg(session, argv[1])
    if number < 0:
        return number
    if number > signal.NSIG:
        session.out(f"signal argument '{argv[1]}' is too large to be a valid signal\n")
        return -EINVAL
    return session.raise_signal(number)


def sleep_body(session: IoSession, argv: list[str]) -> int:
    milliseconds, consumed = c_strtol(argv[1], 0)
    if milliseconds < 0 or consumed != len(argv[1]):
        session.out(f"{argv[1]} is not a valid number\n")
        return -EINVAL
    session.console.flush()
    time.sleep(milliseconds / 1000.0)
    return 0


def help_body(session: IoSession, argv: list[str]) -> int:
    if len(argv) < 2:
        for command in COMMANDS:
            session.out(_oneline(command.name, command))
        session.out("\nUse 'help commandname' for extended help.\n")
        return 0
    command = find(argv[1])
    if command is None:
        session.out(f"command {argv[1]} not found\n")
        return -EINVAL
    session.out(_oneline(argv[1], command))
    if command.has_help:
        from pyqemu.helptext import IO_COMMAND_HELP
        session.out(IO_COMMAND_HELP[command.name])
    return 0


def _oneline(name: str, command: Command) -> str:
    args = f"{command.args} " if command.args is not None else ""
    return f"{name} {args}-- {command.oneline}\n"


def quit_body(session: IoSession, argv: list[str]) -> int:
    session.quit = True
    return 0


def open_body(session: IoSession, argv: list[str]) -> int:
    return session.open_command(argv)


def close_body(session: IoSession, argv: list[str]) -> int:
    session.close()
    return 0


def reopen_body(session: IoSession, argv: list[str]) -> int:
    return session.reopen_command(argv)


COMMANDS: tuple[Command, ...] = tuple(sorted((
    Command("abort", abort_body, "simulate a program crash using abort(3)", flags=NOFILE_OK),
    Command("aio_flush", aio_flush_body, "completes all outstanding aio requests"),
    Command("aio_read", aio_read_body, "asynchronously reads a number of bytes", argmin=2,
            argmax=-1, args="[-Ciqv] [-P pattern] off len [len..]", has_help=True),
    Command("aio_write", aio_write_body, "asynchronously writes a number of bytes", argmin=2,
            argmax=-1, writes=True, args="[-Cfiquz] [-P pattern] off len [len..]",
            has_help=True),
    Command("alloc", alloc_body, "checks if offset is allocated in the file", altname="a",
            argmin=1, argmax=2, args="offset [count]"),
    Command("break", break_body, "sets a breakpoint on event and tags the stopped request as tag",
            argmin=2, argmax=2, args="event tag"),
    Command("close", close_body, "close the current open file", altname="c"),
    Command("discard", discard_body, "discards a number of bytes at a specified offset",
            altname="d", argmin=2, argmax=-1, writes=True, args="[-Cq] off len", has_help=True),
    Command("flush", flush_body, "flush all in-core file state to disk", altname="f"),
    Command("help", help_body, "help for one or all commands", altname="?", argmin=0, argmax=1,
            flags=GLOBAL, args="[command]"),
    Command("info", info_body, "prints information about the current file", altname="i"),
    Command("length", length_body, "gets the length of the current file", altname="l"),
    Command("map", map_body, "prints the allocated areas of a file", args=""),
    Command("open", open_body, "open the file specified by path", altname="o", argmin=1,
            argmax=-1, flags=NOFILE_OK,
            args="[-rsCnkU] [-t cache] [-d discard] [-o options] [path]", has_help=True),
    Command("quit", quit_body, "exit the program", altname="q", argmin=-1, argmax=-1,
            flags=GLOBAL),
    Command("read", read_body, "reads a number of bytes at a specified offset", altname="r",
            argmin=2, argmax=-1, args="[-abCqv] [-P pattern [-s off] [-l len]] off len",
            has_help=True),
    Command("readv", readv_body, "reads a number of bytes at a specified offset", argmin=2,
            argmax=-1, args="[-Cqv] [-P pattern] off len [len..]", has_help=True),
    Command("remove_break", remove_break_body, "remove a breakpoint by tag", argmin=1, argmax=1,
            args="tag"),
    Command("reopen", reopen_body, "reopens an image with new options", argmin=0, argmax=-1,
            args="[(-r|-w)] [-c cache] [-o options]", has_help=True),
    Command("resume", resume_body, "resumes the request tagged as tag", argmin=1, argmax=1,
            args="tag"),
    Command("sigraise", sigraise_body, "raises a signal", argmin=1, argmax=1, flags=NOFILE_OK,
            args="signal", has_help=True),
    Command("sleep", sleep_body, "waits for the given value in milliseconds", argmin=1,
            argmax=1, flags=NOFILE_OK),
    Command("truncate", truncate_body, "truncates the current file at the given offset",
            altname="t", argmin=1, argmax=3, writes=True, args="[-m prealloc_mode] off"),
    Command("wait_break", wait_break_body, "waits for the suspension of a request", argmin=1,
            argmax=1, args="tag"),
    Command("write", write_body, "writes a number of bytes at a specified offset", altname="w",
            argmin=2, argmax=-1, writes=True,
            args="[-bcCfnquz] [-P pattern | -s source_file] off len", has_help=True),
    Command("writev", writev_body, "writes a number of bytes at a specified offset", argmin=2,
            argmax=-1, writes=True, args="[-Cfq] [-P pattern] off len [len..]", has_help=True),
), key=lambda command: command.name.encode()))

COMMANDS_BY_NAME = {command.name: command for command in COMMANDS}


def find(name: str) -> Command | None:
    """find_command: by name or alias, first match in name order."""
    for command in COMMANDS:
        if command.name == name or command.altname == name:
            return command
    return None


def execute(session: IoSession, line: str) -> int:
    """qemuio_command: run one command line; negative errno on failure."""
    words = [word for word in line.split(" ") if word]
    if not words:
        return 0
    command = find(words[0])
    if command is None:
        session.console.err(f'command "{words[0]}" not found\n')
        return -EINVAL
    if not command.flags & (GLOBAL | NOFILE_OK) and session.node is None:
        session.console.err("no file open, try 'help open'\n")
        return -EINVAL
    given = len(words) - 1
    if given < command.argmin or (command.argmax != -1 and given > command.argmax):
        if command.argmax == -1:
            message = (f"bad argument count {given} to {words[0]}, expected at least "
                       f"{command.argmin} arguments")
        elif command.argmin == command.argmax:
            message = (f"bad argument count {given} to {words[0]}, expected "
                       f"{command.argmin} arguments")
        else:
            message = (f"bad argument count {given} to {words[0]}, expected between "
                       f"{command.argmin} and {command.argmax} arguments")
        session.console.err(message + "\n")
        return -EINVAL
    if command.writes and session.node is not None and session.node.read_only:
        session.console.error_report("Block node is read-only")
        return -EPERM
    return command.body(session, words)


__all__ = ["COMMANDS", "Command", "Crash", "execute", "find"]
