"""The generic block layer every format shares (QEMU's block/io.c and block.c).

``BlockNode`` wraps one format driver and does what QEMU's generic layer does
around it: request bounds checks, splitting write-zeroes at the driver's
alignment and falling back to written zeroes, discard splitting, the generic
parts of block status (ALLOCATED, ZERO where nothing below can supply data,
EOF), and reads of a backing node that run past its end.
"""

from __future__ import annotations

import errno
from collections import namedtuple
from enum import IntFlag

from .errors import ImageError, RequestError
from .hostfile import MAX_BOUNCE_BUFFER, HostFile, NotSupported
from .record import Record

# Names only the type checker needs (typing itself costs start-up time).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    from .api import CheckResult, ImageInfo, MapEntry

# The largest single request QEMU accepts (BDRV_REQUEST_MAX_BYTES).
REQUEST_MAX_BYTES = (0x7FFFFFFF >> 9) << 9
MAX_IMAGE_LENGTH = (1 << 63) - 1
# The largest offset the block layer accepts (BDRV_MAX_LENGTH): INT64_MAX
# rounded down to BDRV_REQUEST_MAX_BYTES' alignment (1 GiB).
MAX_REQUEST_LENGTH = MAX_IMAGE_LENGTH - MAX_IMAGE_LENGTH % (1 << 30)


class BlockStatusFlag(IntFlag):
    """QEMU's BDRV_BLOCK_* bits."""

    DATA = 0x01
    ZERO = 0x02
    OFFSET_VALID = 0x04
    RAW = 0x08
    ALLOCATED = 0x10
    EOF = 0x20
    RECURSE = 0x40


DATA = int(BlockStatusFlag.DATA)
ZERO = int(BlockStatusFlag.ZERO)
OFFSET_VALID = int(BlockStatusFlag.OFFSET_VALID)
RAW = int(BlockStatusFlag.RAW)
ALLOCATED = int(BlockStatusFlag.ALLOCATED)
EOF = int(BlockStatusFlag.EOF)
RECURSE = int(BlockStatusFlag.RECURSE)


# What a driver reports for a range: QEMU's bdrv_co_block_status result
# (flags: int, pnum: int, offset: int | None, file: HostFile | None).
DriverStatus = namedtuple("DriverStatus", "flags pnum offset file")


class BlockStatus(Record):
    """Block status of one layer (bdrv_block_status)."""

    __slots__ = _fields = ("flags", "pnum", "offset", "file")

    def __init__(self, flags: BlockStatusFlag, pnum: int, offset: int | None,
                 file: HostFile | None) -> None:
        self.flags = flags
        self.pnum = pnum
        self.offset = offset
        self.file = file


class Driver:
    """The interface every format implements (QEMU's BlockDriver)."""

    format_name: str = ""
    supports_backing: bool = False
    request_alignment: int = 1
    pwrite_zeroes_alignment: int = 1
    pdiscard_alignment: int = 1
    # BDRV_REQ_MAY_UNMAP / BDRV_REQ_NO_FALLBACK support for write-zeroes.
    supports_zero_unmap: bool = False
    supports_zero_no_fallback: bool = False
    node: BlockNode

    @property
    def backing(self) -> BlockNode | None:
        return self.node.backing

    def getlength(self) -> int:
        raise NotImplementedError

    def preadv(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def preadv_into(self, offset: int, view: memoryview) -> None:
        view[:] = self.preadv(offset, len(view))

    def pwritev(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        raise NotSupported()

    def pwritev_compressed(self, offset: int, data: memoryview) -> None:
        raise _io_error(errno.ENOTSUP)

    def save_vmstate(self, position: int, data: memoryview) -> None:
        raise _io_error(errno.ENOTSUP)

    def load_vmstate(self, position: int, length: int) -> bytes:
        raise _io_error(errno.ENOTSUP)

    def pdiscard(self, offset: int, length: int) -> None:
        raise NotSupported()

    def block_status(self, want_zero: bool, offset: int, length: int) -> DriverStatus:
        raise NotImplementedError

    def status_runs(self, start: int, end: int) -> Iterator[DriverStatus]:
        """Driver-level block status over ``[start, end)``, run after run.

        Each item is what ``block_status`` would report at the run's start,
        its ``pnum`` the run's length.  Formats override this to work in bulk.
        """
        offset = start
        while offset < end:
            st = self.block_status(True, offset, end - offset)
            if st.pnum <= 0:
                raise RequestError("Input/output error", errno=errno.EIO)
            yield st
            offset += st.pnum

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def info(self) -> ImageInfo:
        raise NotImplementedError

    def check(self, fix: frozenset[str]) -> CheckResult:
        raise ImageError("This image format does not support checks", errno=errno.ENOTSUP)


_ZERO_CHUNK = bytes(1 << 20)


def fill_zero(view: memoryview) -> None:
    """Zero a writable buffer without allocating one as large."""
    length = len(view)
    position = 0
    chunk = len(_ZERO_CHUNK)
    while position < length:
        step = min(chunk, length - position)
        view[position:position + step] = _ZERO_CHUNK[:step] if step < chunk else _ZERO_CHUNK
        position += step


def _io_error(err: int) -> RequestError:
    import os

    return RequestError(os.strerror(err), errno=err)


class BlockNode:
    """One opened layer of a chain; ``backing`` is the next one down."""

    def __init__(self, driver: Driver, filename: str, *, read_only: bool,
                 backing: BlockNode | None = None, unmap: bool = True) -> None:
        self.driver = driver
        self.filename = filename
        self.format_name = driver.format_name
        self.read_only = read_only
        self.backing = backing
        self.unmap = unmap
        self.closed = False
        # What QEMU would print on stderr while opening (e.g. the repair of
        # an image left dirty by lazy refcounts), for the front ends.
        self.open_messages: list[str] = list(getattr(driver, "open_messages", []))
        # Lines QEMU would print on stderr while serving requests (e.g. a
        # failed refcount decrease); the front ends may print and clear them.
        self.messages: list[str] = getattr(driver, "messages", [])
        driver.node = self

    # -- context manager ------------------------------------------------------

    def __enter__(self) -> BlockNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BlockNode {self.format_name} {self.filename!r}>"

    # -- checks -----------------------------------------------------------------

    def length(self) -> int:
        return self.driver.getlength()

    def _check_open(self) -> None:
        if self.closed:
            raise RequestError("No medium found", errno=errno.ENOMEDIUM)

    def _check_request(self, offset: int, length: int, *, limit_32: bool = True) -> None:
        """Bounds checks of the BlockBackend and the generic layer."""
        self._check_open()
        if offset < 0 or length < 0:
            raise _io_error(errno.EIO)
        if offset > MAX_IMAGE_LENGTH or length > MAX_IMAGE_LENGTH - offset:
            raise _io_error(errno.EIO)
        if limit_32 and length > REQUEST_MAX_BYTES:
            raise _io_error(errno.EINVAL)
        size = self.length()
        if offset > size or size - offset < length:
            raise _io_error(errno.EIO)

    def _check_writable(self) -> None:
        if self.read_only:
            raise _io_error(errno.EPERM)

    # -- reads --------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (through the backing chain)."""
        self._check_request(offset, length)
        if length == 0:
            return b""
        return self.driver.preadv(offset, length)

    def read_into(self, offset: int, buffer: bytearray | memoryview) -> None:
        """Read ``len(buffer)`` bytes at ``offset`` straight into ``buffer``.

        The zero-copy form of ``read`` for large requests: the caller owns
        (and may reuse) the buffer, as qemu-io allocates its own.
        """
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise RequestError("Bad address", errno=errno.EFAULT)
        self._check_request(offset, len(view))
        if len(view):
            self.driver.preadv_into(offset, view)

    def read_child_into(self, offset: int, view: memoryview) -> None:
        """``read_child`` into a buffer."""
        length = len(view)
        if length <= 0:
            return
        size = self.length()
        inside = max(0, min(length, size - offset))
        if inside:
            self.driver.preadv_into(offset, view[:inside])
        if inside < length:
            fill_zero(view[inside:])

    def read_child(self, offset: int, length: int) -> bytes:
        """Read as a parent node does: what lies past this node's end is zero."""
        if length <= 0:
            return b""
        size = self.length()
        if offset >= size:
            return bytes(length)
        if offset + length <= size:
            return self.driver.preadv(offset, length)
        inside = self.driver.preadv(offset, size - offset)
        return inside + bytes(offset + length - size)

    # -- writes -------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview, *,
              fua: bool = False) -> None:
        """Write ``data`` at ``offset``."""
        view = memoryview(data).cast("B")
        self._check_request(offset, len(view))
        self._check_writable()
        if len(view) == 0:
            return
        self.driver.pwritev(offset, view)
        if fua:
            self.driver.flush()

    def write_vmstate(self, position: int, data: bytes | bytearray | memoryview) -> None:
        """Write VM state (qemu-io ``write -b``): qcow2 keeps it past the disk."""
        view = memoryview(data).cast("B")
        self._check_open()
        self._check_vmstate_request(position, len(view))
        self.driver.save_vmstate(position, view)

    def read_vmstate(self, position: int, length: int) -> bytes:
        """Read VM state back (qemu-io ``read -b``)."""
        self._check_open()
        self._check_vmstate_request(position, length)
        return self.driver.load_vmstate(position, length)

    def _check_vmstate_request(self, position: int, length: int) -> None:
        if position < 0 or length < 0 or length > REQUEST_MAX_BYTES \
                or position > MAX_IMAGE_LENGTH - length:
            raise _io_error(errno.EIO)

    def change_backing_file(self, backing_file: str | None,
                            backing_format: str | None) -> None:
        """Store another backing file name and format in the image, leaving its
        data alone (bdrv_change_backing_file with require=True, as qemu-img
        rebase calls it); the open chain is not reopened.  Errors carry
        QEMU's errno: EINVAL for a format without a file, a file without a
        format or a name too long, ENOSPC when the header has no room,
        ENOTSUP for formats without backing files."""
        self._check_open()
        if backing_file is None and backing_format is not None:
            raise _io_error(errno.EINVAL)
        if backing_file is not None and backing_format is None:
            raise _io_error(errno.EINVAL)
        self._check_writable()
        change = getattr(self.driver, "change_backing_file", None)
        if change is None:
            raise _io_error(errno.ENOTSUP)
        change(backing_file, backing_format)

    def write_compressed(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole clusters compressed (qemu-io ``write -c``, convert -c).

        The range must start on a cluster boundary and cover whole clusters
        (the last one may end at the end of the image); clusters already
        allocated cannot be written compressed (EIO), as in QEMU.  A
        zero-length request pads the file to a sector boundary.
        """
        view = memoryview(data).cast("B")
        self._check_request(offset, len(view))
        self._check_writable()
        self.driver.pwritev_compressed(offset, view)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                     fua: bool = False, no_fallback: bool = False) -> None:
        """Make a range read as zeroes (QEMU's bdrv_co_pwrite_zeroes)."""
        self._check_request(offset, length, limit_32=False)
        self._check_writable()
        if not self.unmap:
            may_unmap = False
        if length == 0:
            return
        self._do_pwrite_zeroes(offset, length, may_unmap, no_fallback)
        if fua:
            self.driver.flush()

    def _do_pwrite_zeroes(self, offset: int, length: int, may_unmap: bool,
                          no_fallback: bool) -> None:
        driver = self.driver
        if no_fallback and not driver.supports_zero_no_fallback:
            raise _io_error(errno.ENOTSUP)
        if not driver.supports_zero_unmap:
            may_unmap = False
        alignment = max(driver.pwrite_zeroes_alignment, driver.request_alignment)
        head = offset % alignment
        tail = (offset + length) % alignment
        max_transfer = MAX_BOUNCE_BUFFER
        max_write_zeroes = ((1 << 63) - 1) // alignment * alignment
        while length > 0:
            num = length
            if head:
                num = min(length, max_transfer, alignment - head)
                head = (head + num) % alignment
            elif tail and num > alignment:
                num -= tail
            num = min(num, max_write_zeroes)
            try:
                driver.pwrite_zeroes(offset, num, may_unmap)
            except NotSupported:
                if no_fallback:
                    raise _io_error(errno.ENOTSUP) from None
                num = min(num, max_transfer)
                driver.pwritev(offset, memoryview(bytes(num)))
            offset += num
            length -= num

    def discard(self, offset: int, length: int) -> None:
        """Discard a range; unaligned parts are ignored as QEMU ignores them."""
        self._check_request(offset, length, limit_32=False)
        self._check_writable()
        if not self.unmap or length == 0:
            return
        driver = self.driver
        align = max(driver.pdiscard_alignment, driver.request_alignment)
        head = offset % align
        tail = (offset + length) % align
        while length > 0:
            num = length
            if head:
                num = min(length, align - head)
                head = (head + num) % align
            elif tail and num > align:
                num -= tail
            try:
                driver.pdiscard(offset, num)
            except NotSupported:
                pass
            offset += num
            length -= num

    def truncate(self, size: int, *, exact: bool = True, prealloc: str = "off") -> None:
        """Resize the image (qemu-io ``truncate``, qemu-img ``resize``).

        ``prealloc`` is QEMU's preallocation mode ("off", "metadata",
        "falloc", "full"); qcow2 supports "off" here, raw all but
        "metadata".  When the new area would otherwise show a backing file
        that is longer than the old size, it is made to read as zero.
        """
        if self.closed:
            raise ImageError("No medium inserted", errno=errno.ENOMEDIUM)
        if size < 0:
            raise ImageError("Image size cannot be negative", errno=errno.EINVAL)
        if size > MAX_REQUEST_LENGTH:
            raise RequestError(f"offset({size}) exceeds maximum({MAX_REQUEST_LENGTH})",
                               errno=errno.EIO)
        old_size = self.length()
        if self.read_only:
            raise ImageError("Image is read-only", errno=errno.EACCES)
        zero_new = False
        if size > old_size and self.backing is not None and self.backing.length() > old_size:
            zero_new = True
        truncate = getattr(self.driver, "truncate", None)
        if truncate is None:
            raise ImageError("Image format driver does not support resize",
                             errno=errno.ENOTSUP)
        truncate(size, exact=exact, prealloc=prealloc, zero_new=zero_new)

    def flush(self) -> None:
        self._check_open()
        self.driver.flush()

    def close(self) -> None:
        """Close this layer and every layer below it."""
        if self.closed:
            return
        self.closed = True
        try:
            self.driver.close()
        finally:
            if self.backing is not None:
                self.backing.close()

    # -- status ---------------------------------------------------------------------

    def status(self, want_zero: bool, offset: int, length: int) -> DriverStatus:
        """QEMU's bdrv_co_block_status for this layer alone, as a tuple."""
        total = self.length()
        if offset >= total:
            return DriverStatus(EOF, 0, None, None)
        if length <= 0:
            return DriverStatus(0, 0, None, None)
        length = min(length, total - offset)
        driver = self.driver
        align = driver.request_alignment
        aligned_offset = offset - offset % align
        aligned_length = -(-(offset + length) // align) * align - aligned_offset
        flags, pnum, host, file = driver.block_status(want_zero, aligned_offset,
                                                      aligned_length)
        pnum -= offset - aligned_offset
        if pnum > length:
            pnum = length
        if flags & OFFSET_VALID and host is not None:
            host += offset - aligned_offset
        if flags & RAW and file is not None and host is not None:
            # The format maps straight onto its file: the file's status it is.
            flags, pnum = file.block_status(host, pnum, want_zero=want_zero)
            if offset + pnum == total:
                flags |= EOF
            return DriverStatus(flags, pnum, host, file)
        if flags & (DATA | ZERO):
            flags |= ALLOCATED
        elif driver.supports_backing:
            backing = self.backing
            if backing is None:
                flags |= ZERO
            elif want_zero and offset >= backing.length():
                flags |= ZERO
        if (want_zero and flags & RECURSE and file is not None and flags & DATA
                and not flags & ZERO and flags & OFFSET_VALID):
            file_flags, file_pnum = file.block_status(host, pnum, want_zero=True)
            if file_flags & EOF and (not file_pnum or file_flags & ZERO):
                flags |= ZERO
            else:
                pnum = file_pnum
                flags |= file_flags & ZERO
        if offset + pnum == total:
            flags |= EOF
        return DriverStatus(flags, pnum, host, file)

    def block_status(self, offset: int, length: int, *, want_zero: bool = True) -> BlockStatus:
        """bdrv_block_status of this layer alone."""
        self._check_open()
        st = self.status(want_zero, offset, length)
        return BlockStatus(BlockStatusFlag(st.flags), st.pnum,
                           st.offset if st.flags & OFFSET_VALID else None,
                           st.file if st.flags & OFFSET_VALID else None)

    def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """bdrv_is_allocated: whether this layer itself holds the range's data."""
        self._check_open()
        st = self.status(False, offset, length)
        return bool(st.flags & ALLOCATED), st.pnum

    def map_entry(self, offset: int, length: int) -> MapEntry:
        """One step of ``qemu-img map``: walk the chain down from this layer."""
        from .chain import map_entry

        self._check_open()
        return map_entry(self, offset, length)

    def map(self, start: int = 0, length: int | None = None) -> Iterator[MapEntry]:
        """Merged entries exactly as ``qemu-img map --output=json`` prints them."""
        from .chain import map_entries

        self._check_open()
        return map_entries(self, start, length)

    def map_runs(self, start: int = 0, length: int | None = None) -> Iterator[tuple]:
        """``map`` as plain tuples of MapEntry's fields, in MapEntry's order: no
        object per entry, for a consumer of very many (qemu-img map)."""
        from .chain import map_runs

        self._check_open()
        return map_runs(self, start, length)

    def info(self) -> ImageInfo:
        """What qemu-img info / qemu-io info report."""
        self._check_open()
        return self.driver.info()

    def check(self, fix: frozenset[str] = frozenset()) -> CheckResult:
        """Consistency check (qcow2 only); ``fix`` is a subset of {"leaks", "all"}."""
        self._check_open()
        return self.driver.check(frozenset(fix))
