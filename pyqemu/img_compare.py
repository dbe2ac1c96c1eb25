"""qemu-img compare: are two images' guest-visible contents the same?

The walk is img_compare's: step through both images by allocation status
through their chains, skip ranges that read as zeroes in both, compare data
sector by sector, and require unallocated-versus-allocated ranges to be zero.
Exit status: 0 identical, 1 different, 2 cannot open, 3 status failed, 4 read
failed.
"""

from __future__ import annotations

from pyqemu.img import FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, Exit, ImgTool
from pyqemu.img_open import open_image

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any

SECTOR = 512
IO_BUF_SIZE = 2 * 1024 * 1024
CACHE_MODES = ("none", "off", "directsync", "writeback", "unsafe", "writethrough")

ALLOCATED = 1
ZERO = 2
DATA = 4
OFFSET_VALID = 8


class _Stop(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def block_status(node: Any, offset: int, length: int) -> tuple[int, int]:
    """Status through the whole chain (bdrv_block_status_above): (flags, bytes)."""
    entry = node.map_entry(offset, length)
    flags = 0
    if entry.present:
        flags |= ALLOCATED
    if entry.zero:
        flags |= ZERO
    if entry.data:
        flags |= DATA
    if entry.offset is not None:
        flags |= OFFSET_VALID
    return flags, entry.length


def find_nonzero(data: bytes) -> int:
    """Index of the first sector holding a non-zero byte, or -1."""
    if not data.strip(b"\0"):
        return -1
    first = len(data) - len(data.lstrip(b"\0"))
    return first - first % SECTOR


def compare_buffers(first: bytes, second: bytes) -> tuple[bool, int]:
    """(first sector differs, length of the prefix with the same verdict)."""
    size = len(first)
    differs = first[:SECTOR] != second[:SECTOR]
    position = min(size, SECTOR)
    while position < size:
        end = min(size, position + SECTOR)
        if (first[position:end] != second[position:end]) != differs:
            break
        position = end
    return differs, position


def main(tool: ImgTool, argv: list[str]) -> int:
    fmt1: str | None = None
    fmt2: str | None = None
    cache = "writeback"
    quiet = False
    strict = False
    image_opts = False
    force_share = False
    parser = tool.getopt(argv, ":hf:F:T:pqsU", (HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE))
    for option, value in tool.options(parser, failure_status=2):
        if option == "f":
            fmt1 = value
        elif option == "F":
            fmt2 = value
        elif option == "T":
            cache = value or ""
        elif option == "q":
            quiet = True
        elif option == "s":
            strict = True
        elif option == "U":
            force_share = True
        elif option == "image-opts":
            image_opts = True
    if parser.optind != len(parser.argv) - 2:
        raise tool.error_exit("Expecting two image file names")
    filename1, filename2 = parser.argv[parser.optind:parser.optind + 2]
    if cache not in CACHE_MODES:
        tool.error(f"Invalid source cache option: {cache}")
        return 2

    node1 = open_image(tool, filename1, fmt1, image_opts, read_only=True,
                       force_share=force_share, failure_status=2)
    try:
        node2 = open_image(tool, filename2, fmt2, image_opts, read_only=True,
                           force_share=force_share, failure_status=2)
        try:
            _compare(tool, quiet, strict, node1, filename1, node2, filename2)
        except _Stop as stop:
            return stop.status
        finally:
            node2.close()
    finally:
        node1.close()
    return 0


def _compare(tool: ImgTool, quiet: bool, strict: bool, node1: Any, filename1: str,
             node2: Any, filename2: str) -> None:
    import os

    import imgengine

    def say(text: str) -> None:
        if not quiet:
            tool.out(text)

    def status(node: Any, name: str, offset: int, length: int) -> tuple[int, int]:
        try:
            return block_status(node, offset, length)
        except (imgengine.ImageError, OSError) as error:
            tool.notice(error)
            tool.error(f"Sector allocation test failed for {name}")
            raise _Stop(3) from None

    def read(node: Any, name: str, offset: int, length: int) -> bytes:
        try:
            return bytes(node.read(offset, length))
        except (imgengine.ImageError, OSError) as error:
            tool.notice(error)
            code = getattr(error, "errno", None) or 5
            tool.error(f"Error while reading offset {offset} of {name}: {os.strerror(code)}")
            raise _Stop(4) from None

    def must_be_empty(node: Any, name: str, offset: int, length: int) -> None:
        index = find_nonzero(read(node, name, offset, length))
        if index >= 0:
            say(f"Content mismatch at offset {offset + index}!\n")
            raise _Stop(1)

    def size_of(node: Any, name: str) -> int:
        try:
            return int(node.length())
        except (imgengine.ImageError, OSError) as error:
            tool.notice(error)
            code = getattr(error, "errno", None) or 5
            tool.error(f"Can't get size of {name}: {os.strerror(code)}")
            raise _Stop(4) from None

    size1 = size_of(node1, filename1)
    size2 = size_of(node2, filename2)
    common = min(size1, size2)
    longest = max(size1, size2)
    if strict and size1 != size2:
        say("Strict mode: Image size mismatch!\n")
        raise _Stop(1)

    offset = 0
    while offset < common:
        status1, count1 = status(node1, filename1, offset, size1 - offset)
        status2, count2 = status(node2, filename2, offset, size2 - offset)
        allocated1 = status1 & ALLOCATED
        allocated2 = status2 & ALLOCATED
        chunk = min(count1, count2)
        if strict and status1 != status2:
            say(f"Strict mode: Offset {offset} block status mismatch!\n")
            raise _Stop(1)
        if status1 & ZERO and status2 & ZERO:
            pass
        elif allocated1 == allocated2:
            if allocated1:
                chunk = min(chunk, IO_BUF_SIZE)
                first = read(node1, filename1, offset, chunk)
                second = read(node2, filename2, offset, chunk)
                differs, same_for = compare_buffers(first, second)
                if differs or same_for != chunk:
                    say(f"Content mismatch at offset {offset + (0 if differs else same_for)}!\n")
                    raise _Stop(1)
        else:
            chunk = min(chunk, IO_BUF_SIZE)
            if allocated1:
                must_be_empty(node1, filename1, offset, chunk)
            else:
                must_be_empty(node2, filename2, offset, chunk)
        offset += chunk

    if size1 != size2:
        say("Warning: Image size mismatch!\n")
        node_over, name_over = (node1, filename1) if size1 > size2 else (node2, filename2)
        while offset < longest:
            flags, chunk = status(node_over, name_over, offset, longest - offset)
            if flags & ALLOCATED and not flags & ZERO:
                chunk = min(chunk, IO_BUF_SIZE)
                must_be_empty(node_over, name_over, offset, chunk)
            offset += chunk
    say("Images are identical.\n")


__all__ = ["main", "Exit"]
