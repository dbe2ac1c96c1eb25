"""The protocol layer: an image's own file on the host, as file-posix sees it.

pread/pwrite on the file descriptor, write-zeroes and discard through
``fallocate`` with the same fallbacks QEMU's file-posix driver uses (so the
files the engine writes are as sparse as QEMU's), block status through
``SEEK_DATA``/``SEEK_HOLE``, and the allocated size.  Nothing here ever
touches a path other than the one opened.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import OpenError, RequestError, errno_message

SECTOR_SIZE = 512
# QEMU bounces at most this much when it falls back to writing zeroes.
MAX_BOUNCE_BUFFER = 32768 * SECTOR_SIZE
# The largest block allocate_first_block writes (MAX_BLOCKSIZE in QEMU).
MAX_BLOCKSIZE = 4096

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Block status bits, QEMU's BDRV_BLOCK_* values.
STATUS_DATA = 0x01
STATUS_ZERO = 0x02
STATUS_OFFSET_VALID = 0x04
STATUS_ALLOCATED = 0x10
STATUS_EOF = 0x20

_fallocate_func = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) with any mode; returns 0 or a positive errno."""
    global _fallocate_func
    if _fallocate_func is None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.fallocate
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        _fallocate_func = (func, ctypes)
    func, ctypes_mod = _fallocate_func
    while True:
        if func(fd, mode, offset, length) == 0:
            return 0
        err = ctypes_mod.get_errno()
        if err != errno.EINTR:
            return err


def _translate_errno(err: int) -> int:
    # file-posix folds the "not supported" family into ENOTSUP.
    if err in (errno.ENODEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY):
        return errno.ENOTSUP
    return err


_MAX_OFFSET = (1 << 63) - 1


def _check_range(offset: int, length: int) -> None:
    # What the generic block layer refuses before any request reaches a file.
    if offset < 0 or length < 0 or offset > _MAX_OFFSET - length:
        raise RequestError(os.strerror(errno.EIO), errno=errno.EIO)


class NotSupported(Exception):
    """QEMU's -ENOTSUP: the caller should fall back to another way."""


class HostFile:
    """One open image file (QEMU's ``file`` protocol node)."""

    def __init__(self, filename: str, *, writable: bool) -> None:
        self.filename = filename
        self.writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(filename, flags)
        except OSError as exc:
            raise OpenError(errno_message(f"Could not open '{filename}'", exc.errno),
                            errno=exc.errno) from None
        try:
            st = os.fstat(self.fd)
        except OSError as exc:
            os.close(self.fd)
            raise OpenError(errno_message("Could not stat file", exc.errno),
                            errno=exc.errno) from None
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise OpenError(f"'file' driver requires '{filename}' to be a regular file",
                            errno=errno.EINVAL)
        self.has_write_zeroes = True
        self.has_discard = True
        self.has_fallocate = True
        self.written = False

    # -- size -------------------------------------------------------------

    def size(self) -> int:
        """The file's length in bytes (refreshed from the file system)."""
        return os.fstat(self.fd).st_size

    def length(self) -> int:
        """The node length QEMU uses: the file size rounded up to a sector."""
        return -(-self.size() // SECTOR_SIZE) * SECTOR_SIZE

    def allocated_size(self) -> int:
        """Bytes the file occupies on disk (st_blocks * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    # -- data ---------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes; what lies past the end of file reads as zero."""
        if length <= 0:
            return b""
        _check_range(offset, length)
        try:
            data = os.pread(self.fd, length, offset)
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    return data + bytes(length - len(data))
                data += more
        except OSError as exc:
            raise RequestError(os.strerror(exc.errno), errno=exc.errno) from None
        return data

    def preadinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; past the end of file it reads zeroes."""
        done = 0
        total = len(buf)
        _check_range(offset, total)
        try:
            while done < total:
                got = os.preadv(self.fd, [buf[done:]], offset + done)
                if got == 0:
                    buf[done:] = bytes(total - done)
                    return
                done += got
        except OSError as exc:
            raise RequestError(os.strerror(exc.errno), errno=exc.errno) from None

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        done = 0
        total = len(view)
        _check_range(offset, total)
        self.written = True
        try:
            while done < total:
                chunk = view if done == 0 else view[done:]
                written = os.pwrite(self.fd, chunk, offset + done)
                if written <= 0:
                    raise OSError(errno.EIO, "short write")
                done += written
        except OSError as exc:
            raise RequestError(os.strerror(exc.errno), errno=exc.errno) from None

    def pwritev(self, offset: int, buffers: list) -> None:
        """Write several buffers back to back in one system call when possible."""
        total = sum(len(b) for b in buffers)
        _check_range(offset, total)
        self.written = True
        try:
            written = os.pwritev(self.fd, buffers, offset)
        except OSError as exc:
            raise RequestError(os.strerror(exc.errno), errno=exc.errno) from None
        if written < total:
            joined = b"".join(bytes(b) for b in buffers)
            self.pwrite(offset + written, memoryview(joined)[written:])

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Make a range read as zeroes without writing a buffer.

        Follows file-posix: punch a hole when unmapping is allowed, else
        FALLOC_FL_ZERO_RANGE, else punch plus allocate, else (past the end of
        file) plain allocation.  Raises NotSupported when none applies, so
        the caller can write zeroes instead.
        """
        if length <= 0:
            return
        _check_range(offset, length)
        self.written = True
        if may_unmap:
            err = _translate_errno(_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                              offset, length))
            if err == 0:
                return
            if err not in (errno.ENOTSUP, errno.EINVAL, errno.EBUSY):
                raise RequestError(os.strerror(err), errno=err)
        if self.has_write_zeroes:
            err = _translate_errno(_fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length))
            if err == errno.ENOTSUP:
                self.has_write_zeroes = False
            elif err == 0:
                return
            elif err != errno.EINVAL:
                raise RequestError(os.strerror(err), errno=err)
        if self.has_discard and self.has_fallocate:
            err = _translate_errno(_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                              offset, length))
            if err == 0:
                err = _translate_errno(_fallocate(self.fd, 0, offset, length))
                if err == 0:
                    return
                if err != errno.ENOTSUP:
                    raise RequestError(os.strerror(err), errno=err)
                self.has_fallocate = False
            elif err == errno.ENOTSUP:
                self.has_discard = False
            elif err != errno.EINVAL:
                raise RequestError(os.strerror(err), errno=err)
        if self.has_fallocate and offset >= self.length():
            err = _translate_errno(_fallocate(self.fd, 0, offset, length))
            if err == 0:
                return
            if err != errno.ENOTSUP:
                raise RequestError(os.strerror(err), errno=err)
            self.has_fallocate = False
        raise NotSupported()

    def write_zeroes_or_fill(self, offset: int, length: int, *, may_unmap: bool = False) -> None:
        """Zero a range, falling back to writing zeroed buffers like QEMU."""
        try:
            self.write_zeroes(offset, length, may_unmap=may_unmap)
            return
        except NotSupported:
            pass
        zeroes = bytes(min(length, MAX_BOUNCE_BUFFER))
        while length > 0:
            chunk = min(length, MAX_BOUNCE_BUFFER)
            self.pwrite(offset, memoryview(zeroes)[:chunk])
            offset += chunk
            length -= chunk

    def discard(self, offset: int, length: int) -> None:
        """Give a range back to the file system (punch a hole); advisory."""
        if length <= 0 or not self.has_discard:
            return
        _check_range(offset, length)
        self.written = True
        err = _translate_errno(_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                          offset, length))
        if err == errno.ENOTSUP:
            self.has_discard = False

    def truncate(self, size: int) -> None:
        """Resize the file; a file grown from empty gets its first block written.

        QEMU's file-posix writes the first block of a new file to help its
        alignment probing, which is why a fresh raw image maps 4 KiB of data.
        """
        current = self.size()
        self.written = True
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise RequestError(errno_message("Could not resize file", exc.errno),
                               errno=exc.errno) from None
        if current == 0 and size > 0:
            self.write_first_block(size)

    def write_first_block(self, size: int) -> None:
        """Write zeroes over the first block of a new file (allocate_first_block)."""
        write_size = SECTOR_SIZE if size < MAX_BLOCKSIZE else MAX_BLOCKSIZE
        try:
            os.pwrite(self.fd, bytes(write_size), 0)
        except OSError:
            pass  # only an optimisation in QEMU too

    # -- status -------------------------------------------------------------

    def _find_allocation(self, start: int) -> tuple[int, int] | int:
        """(data, hole) around ``start`` like file-posix, or a negative errno."""
        try:
            data = os.lseek(self.fd, start, os.SEEK_DATA)
        except OSError as exc:
            return -exc.errno
        if data < start:
            return -errno.EIO
        if data > start:
            return data, start
        try:
            hole = os.lseek(self.fd, start, os.SEEK_HOLE)
        except OSError as exc:
            return -exc.errno
        if hole < start:
            return -errno.EIO
        if hole > start:
            return start, hole
        return -errno.EBUSY

    def block_status(self, offset: int, length: int, *,
                     want_zero: bool = True) -> tuple[int, int]:
        """Status of the file at ``offset`` as QEMU's file node reports it.

        Returns (flags, pnum) with DATA or ZERO, OFFSET_VALID, ALLOCATED and
        EOF set as QEMU's generic layer adds them for a protocol node.
        Without ``want_zero`` everything is data, as file-posix answers then.
        """
        total = self.length()
        if offset >= total or offset < 0:
            return STATUS_EOF, 0
        if length <= 0:
            return 0, 0
        length = min(length, total - offset)
        if not want_zero:
            flags = STATUS_DATA | STATUS_OFFSET_VALID | STATUS_ALLOCATED
            return (flags | STATUS_EOF if offset + length == total else flags), length
        found = self._find_allocation(offset)
        if found == -errno.ENXIO:
            flags, pnum = STATUS_ZERO, length
        elif isinstance(found, int):
            flags, pnum = STATUS_DATA, length
        else:
            data, hole = found
            if data == offset:
                flags, pnum = STATUS_DATA, hole - offset
            else:
                flags, pnum = STATUS_ZERO, data - offset
        pnum = min(pnum, length)
        flags |= STATUS_OFFSET_VALID | STATUS_ALLOCATED
        if offset + pnum == total:
            flags |= STATUS_EOF
        return flags, pnum

    def flush(self) -> None:
        """Make written data durable (fdatasync), only if anything was written."""
        if self.written and self.writable:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise RequestError(os.strerror(exc.errno), errno=exc.errno) from None
            self.written = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
