"""qemu-img convert: copy one or more images (concatenated) into a new one.

The copy loop is img_convert's, run sequentially: QEMU's coroutines write in
order unless -W is given, so the target's allocations come out the same.
The source is walked by block status (through the chain, or only its top
layer when the target gets a backing file); ranges that read as zeroes are
skipped when the target starts zeroed, written as zeroes otherwise; data is
read in buffers of up to 2 MiB and written with runs of at least -S bytes of
zeroes (default 4 KiB) left out.
"""

from __future__ import annotations

import errno as errno_codes
import os

from pyqemu.blockopts import (
    OptionError,
    QemuOpts,
    has_help_option,
    is_valid_option_list,
    parse_into,
    path_has_protocol,
)
from pyqemu.getopt import NO_ARGUMENT, LongOption
from pyqemu.img import FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, Exit, ImgTool
from pyqemu.img_create import _print_option_help, cvtnum, format_options
from pyqemu.img_open import open_image
from pyqemu.progress import Progress

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any

SECTOR = 512
BUF_SECTORS = 2 * 1024 * 1024 // SECTOR
MAX_BUF_SECTORS = 32768
REQUEST_MAX_SECTORS = ((1 << 31) - 1) >> 9
MAX_COROUTINES = 16
CACHE_MODES = ("none", "off", "directsync", "writeback", "unsafe", "writethrough")

BLK_DATA, BLK_ZERO, BLK_BACKING_FILE = "data", "zero", "backing"
# formats whose driver writes compressed clusters (QEMU's block_driver_can_compress)
COMPRESSING_FORMATS = ("qcow2",)

LONG_OPTIONS = (
    HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE,
    LongOption("target-image-opts", NO_ARGUMENT, "target-image-opts"),
    LongOption("salvage", NO_ARGUMENT, "salvage"),
    LongOption("target-is-zero", NO_ARGUMENT, "target-is-zero"),
    LongOption("bitmaps", NO_ARGUMENT, "bitmaps"),
    LongOption("skip-broken-bitmaps", NO_ARGUMENT, "skip-broken-bitmaps"),
)


class _Failed(Exception):
    """The conversion stopped after its error was reported."""


def is_allocated_sectors(data: bytes | memoryview, count: int, sector: int,
                         alignment: int) -> tuple[bool, int]:
    """(first sector holds data, sectors with the same verdict), aligned as QEMU does."""
    if count <= 0:
        return False, 0

    def zero(index: int) -> bool:
        chunk = data[index * SECTOR:(index + 1) * SECTOR]
        return not any(chunk)

    first_zero = zero(0)
    run = 1
    while run < count and zero(run) == first_zero:
        run += 1
    if run == count:
        return not first_zero, run
    tail = (sector + run) & (alignment - 1)
    if tail:
        if first_zero and run <= tail:
            first_zero = False      # the next sector is data and rewrites this tail anyway
        if not first_zero:
            run = min(run + alignment - tail, count)
        else:
            run -= tail
    return not first_zero, run


def is_allocated_sectors_min(data: bytes | memoryview, count: int, minimum: int,
                             sector: int, alignment: int) -> tuple[bool, int]:
    """As above, but runs of fewer than minimum zero sectors count as data."""
    minimum = min(minimum, count)
    allocated, used = is_allocated_sectors(data, count, sector, alignment)
    if not allocated:
        return False, used
    checked = used
    while checked < count:
        more_allocated, more = is_allocated_sectors(data[checked * SECTOR:], count - checked,
                                                    sector + checked, alignment)
        checked += more
        if more_allocated:
            used = checked
        elif more >= minimum:
            break
    return True, used


class _Converter:
    """ImgConvertState and its loop."""

    def __init__(self, tool: ImgTool) -> None:
        self.tool = tool
        self.sources: list[Any] = []
        self.names: list[str] = []
        self.source_sectors: list[int] = []
        self.source_bytes: list[int] = []
        self.source_alignment: list[int] = []
        self.total_sectors = 0
        self.target: Any = None
        self.has_zero_init = False
        self.target_has_backing = False
        self.target_backing_sectors = -1
        self.min_sparse = 8
        self.alignment = 8
        self.buf_sectors = BUF_SECTORS
        self.salvage = False
        self.quiet = False
        self.copy_range = False
        self.compressed = False
        self.cluster_sectors = 0
        self.status = BLK_DATA
        self.sector_next_status = 0

    def _part(self, sector: int) -> tuple[int, int]:
        index, base = 0, 0
        while sector - base >= self.source_sectors[index]:
            base += self.source_sectors[index]
            index += 1
        return index, base

    def _status(self, node: Any, offset: int, length: int) -> tuple[int, int]:
        """(ZERO/DATA flags, bytes) through the chain, or of the top layer alone."""
        if self.target_has_backing:
            status = node.block_status(offset, length)
            flags = int(status.flags)
            return flags & 3, status.pnum
        entry = node.map_entry(offset, length)
        return (2 if entry.zero else 0) | (1 if entry.data else 0), entry.length

    def iteration_sectors(self, sector: int) -> int:
        """convert_iteration_sectors: how far one step goes, and its status."""
        import imgengine

        index, base = self._part(sector)
        count = min(self.total_sectors - sector, REQUEST_MAX_SECTORS)
        post_backing_zero = False
        if self.target_backing_sectors >= 0:
            if sector >= self.target_backing_sectors:
                post_backing_zero = True
            elif sector + count > self.target_backing_sectors:
                count = self.target_backing_sectors - sector
        if self.sector_next_status <= sector:
            offset = (sector - base) * SECTOR
            while True:
                length = min(count * SECTOR, self.source_bytes[index] - offset)
                try:
                    flags, done = self._status(self.sources[index], offset, max(length, 1))
                    break
                except (imgengine.ImageError, OSError) as error:
                    self.tool.notice(error)
                    code = getattr(error, "errno", None) or errno_codes.EIO
                    if not self.salvage:
                        self.tool.error(f"error while reading block status at offset {offset}: "
                                        f"{os.strerror(code)}")
                        raise _Failed from None
                    if count == 1:
                        if not self.quiet:
                            self.tool.console.warn_report(
                                f"error while reading block status at offset {offset}: "
                                f"{os.strerror(code)}")
                        flags, done = 1, SECTOR
                        break
                    count = -(-count // 4)
            count = -(-done // SECTOR)
            tail = (sector - base + count) % self.source_alignment[index]
            if count > tail:
                count -= tail
            if flags & 2:
                self.status = BLK_BACKING_FILE if post_backing_zero else BLK_ZERO
            elif flags & 1:
                self.status = BLK_DATA
            else:
                self.status = BLK_BACKING_FILE if self.target_has_backing else BLK_DATA
            self.sector_next_status = sector + count
        count = min(count, self.sector_next_status - sector)
        if self.status == BLK_DATA:
            count = min(count, self.buf_sectors)
        if self.compressed:
            # compressed clusters are written whole: a shorter unallocated
            # stretch is copied as data with the rest of its cluster
            if count < self.cluster_sectors:
                count = min(self.cluster_sectors, self.total_sectors - sector)
                self.status = BLK_DATA
            else:
                count -= count % self.cluster_sectors
        return count

    def read(self, sector: int, count: int) -> bytearray:
        """convert_co_read: count sectors across the sources (zero-padded at the end)."""
        import imgengine

        buffer = bytearray()
        single_until = 0
        while count > 0:
            index, base = self._part(sector)
            offset = (sector - base) * SECTOR
            step = min(count, self.source_sectors[index] - (sector - base))
            if single_until > offset:
                step = 1
            length = min(step * SECTOR, self.source_bytes[index] - offset)
            try:
                data = self.sources[index].read(offset, length)
            except (imgengine.ImageError, OSError) as error:
                self.tool.notice(error)
                code = getattr(error, "errno", None) or errno_codes.EIO
                if not self.salvage:
                    raise _ReadError(code) from None
                if step > 1:
                    single_until = offset + step * SECTOR
                    continue
                if not self.quiet:
                    self.tool.console.warn_report(
                        f"error while reading offset {offset}: {os.strerror(code)}")
                data = bytes(SECTOR)
            buffer += data
            buffer += bytes(step * SECTOR - len(data))
            sector += step
            count -= step
        return buffer

    def write(self, sector: int, count: int, data: bytearray | None, status: str) -> None:
        """convert_co_write."""
        position = 0
        while count > 0:
            step = count
            if status == BLK_DATA:
                assert data is not None
                view = memoryview(data)[position * SECTOR:]
                if not self.min_sparse or self.copy_range:
                    write_it = True
                elif self.compressed:
                    write_it = any(view[:step * SECTOR])
                else:
                    write_it, step = is_allocated_sectors_min(view, step, self.min_sparse,
                                                              sector, self.alignment)
                if write_it and self.compressed:
                    self.target.write_compressed(sector * SECTOR, bytes(view[:step * SECTOR]))
                elif write_it:
                    self.target.write(sector * SECTOR, bytes(view[:step * SECTOR]))
                elif not self.has_zero_init:
                    self.target.write_zeroes(sector * SECTOR, step * SECTOR, may_unmap=True)
            elif status == BLK_ZERO and not self.has_zero_init:
                self.target.write_zeroes(sector * SECTOR, step * SECTOR, may_unmap=True)
            sector += step
            count -= step
            position += step

    def run(self, progress: Progress) -> None:
        import imgengine

        sector = 0
        allocated_total = 0
        while sector < self.total_sectors:
            count = self.iteration_sectors(sector)
            if self.status == BLK_DATA or (not self.min_sparse and self.status == BLK_ZERO):
                allocated_total += count
            sector += count
        self.sector_next_status = 0
        done = 0
        sector = 0
        while sector < self.total_sectors:
            count = self.iteration_sectors(sector)
            status = self.status
            if not self.min_sparse and status == BLK_ZERO:
                count = min(count, self.buf_sectors)
            if status == BLK_DATA or (not self.min_sparse and status == BLK_ZERO):
                done += count
                progress.print(100.0 * done / allocated_total, 0)
            data = None
            if status == BLK_DATA:
                try:
                    data = self.read(sector, count)
                except _ReadError as failure:
                    self.tool.error(f"error while reading at byte {sector * SECTOR}: "
                                    f"{os.strerror(failure.code)}")
                    raise _Failed from None
            elif not self.min_sparse and status == BLK_ZERO:
                status = BLK_DATA
                data = bytearray(count * SECTOR)
            try:
                self.write(sector, count, data, status)
            except (imgengine.ImageError, OSError) as error:
                self.tool.notice(error)
                code = getattr(error, "errno", None) or errno_codes.EIO
                self.tool.error(f"error while writing at byte {sector * SECTOR}: "
                                f"{os.strerror(code)}")
                raise _Failed from None
            sector += count
        if self.compressed:
            # the empty compressed write that pads the file to a sector
            self.target.write_compressed(0, b"")


class _ReadError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(tool: ImgTool, argv: list[str]) -> int:
    fmt: str | None = None
    out_fmt: str | None = None
    out_baseimg: str | None = None
    backing_fmt: str | None = None
    options: str | None = None
    cache = "unsafe"
    src_cache = "writeback"
    image_opts = target_image_opts = skip_create = progress_wanted = False
    compressed = explicit_min_sparse = bitmaps = skip_broken = target_is_zero = False
    snapshot: str | None = None
    converter = _Converter(tool)
    parser = tool.getopt(argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", LONG_OPTIONS)
    for option, value in tool.options(parser):
        text = value or ""
        if option == "f":
            fmt = text
        elif option == "O":
            out_fmt = text
        elif option == "B":
            out_baseimg = text
        elif option == "C":
            converter.copy_range = True
        elif option == "c":
            compressed = True
        elif option == "F":
            backing_fmt = text
        elif option == "o":
            if not is_valid_option_list(text):
                tool.error(f"Invalid option list: {text}")
                return 1
            options = text if options is None else f"{options},{text}"
        elif option == "l":
            snapshot = text
        elif option == "S":
            size = cvtnum(tool, "buffer size for sparse output", text)
            if size % SECTOR or size // SECTOR > MAX_BUF_SECTORS:
                tool.error("Invalid buffer size for sparse output specified. Valid sizes are "
                           f"multiples of {SECTOR} up to {MAX_BUF_SECTORS * SECTOR}. Select 0 to "
                           "disable sparse detection (fully allocates output).")
                return 1
            converter.min_sparse = size // SECTOR
            explicit_min_sparse = True
        elif option == "p":
            progress_wanted = True
        elif option == "t":
            cache = text
        elif option == "T":
            src_cache = text
        elif option == "q":
            converter.quiet = True
        elif option == "n":
            skip_create = True
        elif option == "m":
            from pyqemu.units import c_strtol
            number, used = c_strtol(text, 0)
            if used != len(text) or not text or number < 1 or number > MAX_COROUTINES:
                tool.error("Invalid number of coroutines. Allowed number of coroutines is "
                           f"between 1 and {MAX_COROUTINES}")
                return 1
        elif option in ("W", "U"):
            pass        # the copy is sequential; nothing is locked here
        elif option == "r":
            cvtnum(tool, "rate limit", text)
        elif option == "image-opts":
            image_opts = True
        elif option == "salvage":
            converter.salvage = True
        elif option == "target-image-opts":
            target_image_opts = True
        elif option == "target-is-zero":
            target_is_zero = True
        elif option == "bitmaps":
            bitmaps = True
        elif option == "skip-broken-bitmaps":
            skip_broken = True
    if out_fmt is None and not target_image_opts:
        out_fmt = "raw"
    for refused, message in (
            (skip_broken and not bitmaps, "Use of --skip-broken-bitmaps requires --bitmaps"),
            (compressed and converter.copy_range, "Cannot enable copy offloading when -c is used"),
            (explicit_min_sparse and converter.copy_range,
             "Cannot enable copy offloading when -S is used"),
            (converter.copy_range and converter.salvage,
             "Cannot use copy offloading in salvaging mode"),
            (target_image_opts and not skip_create, "--target-image-opts requires use of -n flag"),
            (skip_create and options is not None, "-o has no effect when skipping image creation"),
            (target_is_zero and not skip_create, "--target-is-zero requires use of -n flag")):
        if refused:
            tool.error(message)
            return 1
    converter.has_zero_init = target_is_zero
    files = parser.argv[parser.optind:]
    out_filename = files[-1] if len(files) >= 2 else None
    if options is not None and has_help_option(options):
        if out_fmt is not None:
            return _print_option_help(tool, out_filename, out_fmt)
        tool.error("Option help requires a format be specified")
        return 1
    if len(files) < 2:
        tool.error("Must specify image file name")
        return 1
    if src_cache not in CACHE_MODES:
        tool.error(f"Invalid source cache option: {src_cache}")
        return 1
    assert out_filename is not None
    progress = Progress(tool.console, progress_wanted and not converter.quiet, 1.0)
    progress.print(0, 100)
    try:
        status = _convert(tool, converter, files[:-1], out_filename, fmt, out_fmt, out_baseimg,
                          backing_fmt, options, cache, image_opts, target_image_opts,
                          skip_create, compressed, snapshot, bitmaps, progress)
    finally:
        for node in converter.sources:
            node.close()
        if converter.target is not None:
            converter.target.close()
    if status == 0:
        progress.print(100, 0)
    progress.end()
    return status


def _convert(tool: ImgTool, converter: _Converter, sources: list[str], out_filename: str,
             fmt: str | None, out_fmt: str | None, out_baseimg: str | None,
             backing_fmt: str | None, options: str | None, cache: str, image_opts: bool,
             target_image_opts: bool, skip_create: bool, compressed: bool,
             snapshot: str | None, bitmaps: bool, progress: Progress) -> int:
    import imgengine

    for name in sources:
        try:
            node = open_image(tool, name, fmt, image_opts, read_only=True)
        except Exit:
            return 1
        converter.sources.append(node)
        converter.names.append(name)
        length = node.length()
        converter.source_bytes.append(length)
        converter.source_sectors.append(-(-length // SECTOR))
        alignment = 1
        try:
            cluster = node.info().cluster_size or 0
        except (imgengine.ImageError, OSError):
            cluster = 0
        converter.source_alignment.append(max(alignment, cluster // SECTOR))
        converter.total_sectors += converter.source_sectors[-1]
    if snapshot is not None:
        tool.error("Failed to load snapshot: internal snapshots are not supported by this "
                   "qemu-img (pyqemu)")
        return 1

    opts: QemuOpts | None = None
    if not skip_create:
        assert out_fmt is not None
        descs = format_options(out_fmt)
        if descs is None:
            tool.error(f"Unknown file format '{out_fmt}'")
            return 1
        if path_has_protocol(out_filename) and not out_filename.startswith("file:"):
            tool.error(f"Unknown protocol '{out_filename.split(':', 1)[0]}'")
            return 1
        opts = QemuOpts(descs)
        try:
            if options is not None:
                parse_into(opts, options)
        except OptionError as error:
            tool.error(str(error))
            if error.hint:
                tool.console.err(error.hint)
            return 1
        opts.set_number("size", converter.total_sectors * SECTOR)
        for value, name, what in ((out_baseimg, "backing_file", "Backing file"),
                                  (backing_fmt, "backing_fmt", "Backing file format")):
            if value is None:
                continue
            try:
                opts.set(name, value)
            except OptionError:
                tool.error(f"{what} not supported for file format '{out_fmt}'")
                return 1
    baseimg_option = opts.get("backing_file") if opts is not None else None
    if baseimg_option is not None:
        out_baseimg = baseimg_option
    converter.target_has_backing = out_baseimg is not None
    if len(sources) > 1 and out_baseimg is not None:
        tool.error("Having a backing file for the target makes no sense when concatenating "
                   "multiple input images")
        return 1
    if baseimg_option is not None and opts is not None and opts.get("backing_fmt") is None:
        tool.error("Use of backing file requires explicit backing format")
        return 1
    if compressed:
        if out_fmt is not None and not skip_create and out_fmt not in COMPRESSING_FORMATS:
            tool.error("Compression not supported for this file format")
            return 1
        if opts is not None and (opts.get("encryption") in ("on", "yes", "true", "y")
                                 or opts.get("encrypt.format") is not None):
            tool.error("Compression and encryption not supported at the same time")
            return 1
        preallocation = opts.get("preallocation") if opts is not None else None
        if preallocation is not None and preallocation != "off":
            tool.error("Compression and preallocation not supported at the same time")
            return 1
    if bitmaps:
        if len(sources) > 1:
            tool.error("Copying bitmaps only possible with single source")
            return 1
    if opts is not None:
        assert out_fmt is not None
        values = opts.command_line_values()
        try:
            imgengine.create_image(out_filename, out_fmt, values, unsafe=True)
        except (imgengine.ImageError, OSError) as error:
            from pyqemu.opening import error_text
            tool.error(f"{out_filename}: error while converting {out_fmt}: {error_text(error)}")
            return 1
    if cache not in CACHE_MODES:
        tool.error(f"Invalid cache option: {cache}")
        return 1
    try:
        converter.target = open_image(
            tool, out_filename, out_fmt, target_image_opts and skip_create, read_only=False)
    except Exit:
        return 1
    target = converter.target
    if bitmaps and target.format_name != "qcow2":
        tool.error(f"Format driver '{target.format_name}' does not support bitmaps")
        return 1
    if compressed and (target.format_name not in COMPRESSING_FORMATS
                       or not hasattr(target, "write_compressed")):
        tool.error("Compression not supported for this file format")
        return 1
    converter.alignment = max(_pow2floor(converter.min_sparse), 1)
    if skip_create:
        output_sectors = -(-target.length() // SECTOR)
        if output_sectors < converter.total_sectors:
            tool.error("output file is smaller than input file")
            return 1
    if converter.target_has_backing and not skip_create and target.backing is not None:
        converter.target_backing_sectors = -(-target.backing.length() // SECTOR)
    if not converter.has_zero_init and not skip_create and converter.min_sparse \
            and not converter.target_has_backing:
        # bdrv_has_zero_init: a new image on a regular file reads as zeroes
        # (a preallocated qcow2 image defers to its file, which is zeroed too)
        converter.has_zero_init = True
    converter.compressed = compressed
    if compressed:
        try:
            cluster = target.info().cluster_size or 0
        except (imgengine.ImageError, OSError):
            tool.error("could not get block driver info")
            return 1
        converter.cluster_sectors = cluster // SECTOR
        if converter.cluster_sectors <= 0 or converter.cluster_sectors > converter.buf_sectors:
            tool.error("invalid cluster size")
            return 1
        converter.buf_sectors = converter.cluster_sectors
    try:
        converter.run(progress)
    except _Failed:
        return 1
    except (imgengine.ImageError, OSError) as error:
        # only the closing empty compressed write gets here; QEMU says nothing
        tool.notice(error)
        return 1
    return 0


def _pow2floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0
