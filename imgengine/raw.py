"""Raw images (QEMU's raw-format driver over the file protocol).

A raw image is its file: guest offset equals host offset.  Block status is
the file's own (SEEK_DATA/SEEK_HOLE), write-zeroes and discard go to
``fallocate`` the way file-posix does it.  A raw image whose format was
probed rather than named gets QEMU's protection of its first sector.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from .errors import ImageError, RequestError
from .hostfile import SECTOR_SIZE, HostFile, NotSupported
from .node import OFFSET_VALID, RAW, Driver, DriverStatus

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from .api import ImageInfo

PROBE_BUFFER_SIZE = 512


class RawDriver(Driver):
    format_name = "raw"
    supports_backing = False
    supports_zero_unmap = True
    supports_zero_no_fallback = True

    def __init__(self, file: HostFile, *, probed: bool = False) -> None:
        self.file = file
        self.probed = probed
        self.request_alignment = SECTOR_SIZE if probed else 1

    def getlength(self) -> int:
        return self.file.length()

    def preadv(self, offset: int, length: int) -> bytes:
        return self.file.pread(offset, length)

    def preadv_into(self, offset: int, view: memoryview) -> None:
        self.file.preadinto(offset, view)

    def pwritev(self, offset: int, data: memoryview) -> None:
        if self.probed and offset < PROBE_BUFFER_SIZE and len(data):
            self._check_first_sector(offset, data)
        self.file.pwrite(offset, data)

    def _check_first_sector(self, offset: int, data: memoryview) -> None:
        # A probed raw image must not be turned into something that would
        # probe as another format (QEMU refuses such a write with EPERM).
        from .qcow2.format import probe

        head = bytes(self.file.pread(0, PROBE_BUFFER_SIZE))
        start = offset
        end = min(PROBE_BUFFER_SIZE, offset + len(data))
        new_head = head[:start] + bytes(data[:end - start]) + head[end:]
        if probe(new_head + bytes(PROBE_BUFFER_SIZE)):
            raise RequestError(os.strerror(errno.EPERM), errno=errno.EPERM)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.file.write_zeroes(offset, length, may_unmap=may_unmap)

    def pdiscard(self, offset: int, length: int) -> None:
        if length <= 0:
            raise NotSupported()
        self.file.discard(offset, length)

    def block_status(self, want_zero: bool, offset: int, length: int) -> DriverStatus:
        # Like QEMU's raw format: "ask the file", which the generic layer does.
        return DriverStatus(RAW | OFFSET_VALID, length, offset, self.file)

    def status_runs(self, start: int, end: int) -> Iterator[DriverStatus]:
        yield DriverStatus(RAW | OFFSET_VALID, end - start, start, self.file)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        try:
            self.file.flush()
        finally:
            self.file.close()

    def info(self) -> ImageInfo:
        from .api import ImageInfo

        return ImageInfo(filename=self.node.filename, format_name="raw",
                         virtual_size=self.getlength(),
                         actual_size=self.file.allocated_size(), cluster_size=None,
                         vm_state_offset=None, dirty_flag=False, backing_filename=None,
                         full_backing_filename=None, backing_format=None,
                         format_specific=None)

    def truncate(self, size: int, *, exact: bool = True, prealloc: str = "off",
                 zero_new: bool = False) -> None:
        """Resize the file as file-posix does (raw images have no backing file)."""
        current = self.file.size()
        if prealloc not in ("off", "falloc", "full"):
            raise ImageError(f"Unsupported preallocation mode: {prealloc}",
                             errno=errno.ENOTSUP)
        if current > size and prealloc != "off":
            raise ImageError("Cannot use preallocation for shrinking files",
                             errno=errno.ENOTSUP)
        if prealloc == "off":
            self.file.truncate(size)
            return
        try:
            if prealloc == "falloc":
                if size != current:
                    os.posix_fallocate(self.file.fd, current, size - current)
                    if current == 0:
                        self.file.write_first_block(size)
            else:
                os.ftruncate(self.file.fd, size)
                self.file.pwrite(current, bytes(size - current))
        except OSError as exc:
            os.ftruncate(self.file.fd, current)
            raise ImageError(f"Could not preallocate new data: {exc.strerror}",
                             errno=exc.errno) from None
