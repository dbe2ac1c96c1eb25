"""The qcow2 node (QEMU's block/qcow2.c): open, I/O, zeroing, status, info.

Opening validates the header and every table location before anything is
used; reads go through L1/L2 (falling back to the backing node); writes
allocate host clusters in QEMU's order with copy-on-write; write-zeroes and
discard follow QEMU's rules for partial clusters and image tails; block
status reports what qemu-img map needs.  Metadata reaches the file in a safe
order: refcounts before the L2 entries that use them, data before its L2
entry, L2 tables before the L1 entry pointing at them.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Mapping

from ..errors import CorruptImageError, ImageError, RequestError, UnsupportedImageError
from ..hostfile import HostFile, NotSupported
from ..node import (
    DATA,
    OFFSET_VALID,
    RECURSE,
    ZERO,
    BlockNode,
    Driver,
    DriverStatus,
    fill_zero,
)
from . import format as fmt
from .cache import TableCache, entry_codec
from .cluster import (
    COMPRESSED,
    INT_MAX,
    NORMAL,
    UNALLOCATED,
    ZERO_ALLOC,
    ZERO_PLAIN,
    ClusterMapping,
    L2Meta,
)
from .format import (
    L1E_OFFSET_MASK,
    L1E_SIZE,
    OFFSET_INCOMPATIBLE_FEATURES,
    REFT_OFFSET_MASK,
    Header,
    hexc,
)
from .refcount import (
    DISCARD_ALWAYS,
    DISCARD_OTHER,
    DISCARD_REQUEST,
    DISCARD_SNAPSHOT,
    MIN_REFCOUNT_CACHE_SIZE,
    Refcounts,
)

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from ..api import CheckResult, ImageInfo

SECTOR_SIZE = 512
DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024
# QEMU runs the pieces of one request as at most this many concurrent tasks.
WRITE_TASKS = 8
MIN_L2_CACHE_SIZE = 2
METADATA_OVERLAP_ORDER = ("qcow2_header", "active L1 table", "refcount table",
                          "snapshot table", "inactive L1 table", "active L2 table",
                          "refcount block", "bitmap directory")


def _bool_option(value: object, name: str) -> bool:
    from ..sizes import parse_bool

    if isinstance(value, bool):
        return value
    try:
        return parse_bool(str(value))
    except ValueError:
        raise ImageError(f"Parameter '{name}' expects 'on' or 'off'",
                         errno=errno.EINVAL) from None


def _number_option(value: object, name: str) -> int:
    """parse_option_number: C's strtoull, so "-1" wraps around."""
    from ..sizes import parse_number

    if isinstance(value, int) and not isinstance(value, bool):
        return value & ((1 << 64) - 1)
    text = str(value).strip()
    negative = text.startswith("-")
    try:
        number = parse_number(text[1:] if negative else text)
    except OverflowError:
        raise ImageError(f"Value '{value}' is out of range for parameter '{name}'",
                         errno=errno.ERANGE) from None
    except ValueError:
        raise ImageError(f"Parameter '{name}' expects a number", errno=errno.EINVAL) from None
    return (-number) & ((1 << 64) - 1) if negative else number


def _size_option(value: object, name: str) -> int:
    from ..sizes import parse_size

    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return parse_size(str(value))
    except ValueError:
        raise ImageError(f"Parameter '{name}' expects a non-negative number below 2^64",
                         errno=errno.EINVAL) from None


# qcow2's runtime options (qcow2_runtime_opts) by type; "overlap-check.*" are
# the per-structure switches under overlap-check
_SIZE_OPTIONS = ("cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size")
_BOOL_OPTIONS = ("lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
                 "pass-discard-other")
_NUMBER_OPTIONS = ("cache-clean-interval",)
_OVERLAP_SWITCHES = ("main-header", "active-l1", "active-l2", "refcount-table",
                     "refcount-block", "snapshot-table", "inactive-l1", "inactive-l2",
                     "bitmap-directory")
_OVERLAP_MODES = ("none", "constant", "cached", "all")
UINT_MAX = (1 << 32) - 1


def _typed_runtime_options(options: dict[str, object]) -> dict[str, object]:
    """qemu_opts_absorb_qdict: each option parsed by its type, unknown ones refused.

    Takes the options out of ``options`` ("_unmap", the engine's own, stays);
    "overlap-check" comes back as ("mode or None", "template or None", switches).
    """
    typed: dict[str, object] = {}
    for name in list(options):
        if name == "_unmap":
            continue
        value = options.pop(name)
        if name in _SIZE_OPTIONS:
            typed[name] = _size_option(value, name)
        elif name in _BOOL_OPTIONS:
            typed[name] = _bool_option(value, name)
        elif name in _NUMBER_OPTIONS:
            typed[name] = _number_option(value, name)
        elif name == "overlap-check":
            typed[name] = _overlap_options(value)
        else:
            raise ImageError(f"Block format 'qcow2' does not support the option '{name}'",
                             errno=errno.EINVAL)
    return typed


def _overlap_options(value: object) -> tuple[str | None, str | None, dict[str, bool]]:
    if not isinstance(value, Mapping):
        return str(value), None, {}
    fields = dict(value)
    # "overlap-check=X" given next to "overlap-check.*" keys: the engine's
    # option nesting keeps the plain value under "filename"
    mode = fields.pop("filename", None)
    template = fields.pop("template", None)
    switches = {}
    for name, switch in fields.items():
        if name not in _OVERLAP_SWITCHES:
            raise ImageError(f"Block format 'qcow2' does not support the option "
                             f"'overlap-check.{name}'", errno=errno.EINVAL)
        switches[name] = _bool_option(switch, f"overlap-check.{name}")
    return (None if mode is None else str(mode),
            None if template is None else str(template), switches)


def _overlap_check_mode(typed: dict[str, object]) -> str:
    """The overlap-check template QEMU would use (the engine checks "cached")."""
    mode, template, _switches = typed.get("overlap-check", (None, None, {}))  # type: ignore[misc]
    if mode is not None and template is not None and mode != template:
        raise ImageError(f"Conflicting values for qcow2 options 'overlap-check' ('{mode}') "
                         f"and 'overlap-check.template' ('{template}')", errno=errno.EINVAL)
    chosen = mode or template or "cached"
    if chosen not in _OVERLAP_MODES:
        raise ImageError(f"Unsupported value '{chosen}' for qcow2 option 'overlap-check'. "
                         f"Allowed are any of the following: none, constant, cached, all",
                         errno=errno.EINVAL)
    return chosen


class Snapshot:
    """What the engine keeps of an internal snapshot: its L1 table."""

    __slots__ = ("l1_table_offset", "l1_size", "id_str", "name")

    def __init__(self, l1_table_offset: int, l1_size: int, id_str: str, name: str) -> None:
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.id_str = id_str
        self.name = name


class Qcow2Driver(ClusterMapping, Driver):
    format_name = "qcow2"
    supports_backing = True
    request_alignment = 1

    def __init__(self, file: HostFile, header: Header, *, read_only: bool) -> None:
        self.file = file
        self.header = header
        self.read_only = read_only
        self.qcow_version = header.version
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.pwrite_zeroes_alignment = self.cluster_size
        self.pdiscard_alignment = self.cluster_size
        self.supports_zero_unmap = header.version >= 3
        self.supports_zero_no_fallback = header.version >= 3
        self.l2_bits = self.cluster_bits - 3
        self.l2_size = 1 << self.l2_bits
        self.refcount_order = header.refcount_order
        self.total_sectors = header.size // SECTOR_SIZE
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1
        self.incompatible_features = header.incompatible_features
        self.compatible_features = header.compatible_features
        self.autoclear_features = header.autoclear_features
        self.l1_size = header.l1_size
        self.l1_table_offset = header.l1_table_offset
        self.l1_table: array = array("Q")
        self.l1_vm_state_index = 0
        self.snapshots: list[Snapshot] = []
        self.snapshots_offset = header.snapshots_offset
        self.snapshots_size = 0
        self.use_lazy_refcounts = False
        self.discard_passthrough = [False, True, False, True, False]
        self.metadata_prealloc: bool | None = None
        self.signaled_corruption = False
        self.broken = False
        self.check_only = ""        # why the image may only be checked, if so
        self.closing = False
        self.flush_waits = 0
        self.image_backing_file = header.backing_file
        self.image_backing_format = header.backing_format
        # Lines QEMU prints while opening (the repair of a dirty image), and
        # later (a failed refcount decrease that leaks clusters).
        self.open_messages: list[str] = []
        self.messages: list[str] = []
        self._overlap_version = 0
        self._overlap_cache: tuple[int, array] | None = None
        self.l2_slice_size = self.l2_size
        self.l2_cache: TableCache
        self.refcounts: Refcounts

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, file: HostFile, *, read_only: bool,
             options: Mapping[str, object] | None = None,
             check_mode: bool = False) -> Qcow2Driver:
        """Open and validate a qcow2 image (qcow2_do_open)."""
        options = dict(options or {})
        read = file.pread
        header = fmt.unpack_fixed_header(read(0, fmt.HEADER_V3_LENGTH))
        fmt.validate_basic(header)
        if header.header_length > fmt.HEADER_V3_LENGTH:
            header.unknown_fields = read(fmt.HEADER_V3_LENGTH,
                                         header.header_length - fmt.HEADER_V3_LENGTH)
        fmt.validate_compression_type(header)
        unknown_incompatible = header.incompatible_features & ~fmt.INCOMPAT_MASK
        if unknown_incompatible:
            probe = header.copy()
            probe.feature_table = []
            fmt.read_extensions(probe, read, feature_table_only=True)
            raise UnsupportedImageError(
                fmt.unsupported_feature_message(probe.feature_table, unknown_incompatible),
                errno=errno.ENOTSUP)
        if header.incompatible_features & fmt.INCOMPAT_CORRUPT and not read_only \
                and not check_mode:
            raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write",
                                    errno=errno.EACCES)
        check_only = ""
        if header.incompatible_features & fmt.INCOMPAT_EXTL2:
            if header.cluster_size // 32 < 512:
                raise CorruptImageError(
                    f"Unsupported subcluster size: {header.cluster_size // 32}",
                    errno=errno.EINVAL)
            check_only = "Images with extended L2 entries (subclusters) are not supported"
            if not check_mode:
                raise UnsupportedImageError(check_only, errno=errno.ENOTSUP)
        if header.refcount_order > 6:
            raise CorruptImageError("Reference count entry width too large; may not "
                                    "exceed 64 bits", errno=errno.EINVAL)
        if header.crypt_method:
            if header.crypt_method not in (fmt.CRYPT_AES, fmt.CRYPT_LUKS):
                method = header.crypt_method
                if method >= 1 << 31:       # QEMU prints the field as a C int
                    method -= 1 << 32
                raise UnsupportedImageError(
                    f"Unsupported encryption method {method}",
                    errno=errno.EINVAL)
            raise UnsupportedImageError("Encrypted qcow2 images are not supported",
                                        errno=errno.ENOTSUP)
        if header.compression_type != fmt.COMPRESSION_ZLIB:
            raise UnsupportedImageError("Images using zstd compression are not supported",
                                        errno=errno.ENOTSUP)

        s = cls(file, header, read_only=read_only)
        # qemu-img check opens what the engine can check but not read or write
        s.check_only = check_only
        cs = s.cluster_size
        if header.refcount_table_clusters == 0 and not check_mode:
            raise CorruptImageError("Image does not contain a reference count table",
                                    errno=errno.EINVAL)
        fmt.validate_table(header, header.refcount_table_offset,
                           header.refcount_table_clusters, cs, fmt.MAX_REFTABLE_SIZE,
                           "Reference count table")
        if not check_mode:
            fmt.validate_table(header, header.snapshots_offset, header.nb_snapshots,
                               fmt.SNAPSHOT_HEADER_SIZE,
                               fmt.SNAPSHOT_HEADER_SIZE * fmt.MAX_SNAPSHOTS, "Snapshot table")
        fmt.validate_table(header, header.l1_table_offset, header.l1_size, L1E_SIZE,
                           fmt.MAX_L1_SIZE, "Active L1 table")
        # size_to_l1 in QEMU adds in 64-bit unsigned arithmetic: a size near
        # 2^64 wraps to a small index, and the block layer refuses it later
        shift = s.cluster_bits + s.l2_bits
        l1_vm_state_index = s.size_to_l1(header.size) & ((1 << (64 - shift)) - 1)
        if l1_vm_state_index > INT_MAX:
            raise CorruptImageError("Image is too big", errno=errno.EFBIG)
        s.l1_vm_state_index = l1_vm_state_index
        if header.l1_size < l1_vm_state_index:
            raise CorruptImageError("L1 table is too small", errno=errno.EINVAL)
        if header.l1_size:
            raw = read(header.l1_table_offset, header.l1_size * L1E_SIZE)
            s.l1_table = fmt.decode_table(raw)

        s.options = dict(options)
        s._apply_options(options)

        s.refcounts = Refcounts(s, header.refcount_table_offset,
                                header.refcount_table_clusters)
        s.refcounts.load_table()

        fmt.read_extensions(header, read)
        if header.incompatible_features & fmt.INCOMPAT_DATA_FILE:
            raise UnsupportedImageError("Images with an external data file are not supported",
                                        errno=errno.ENOTSUP)
        if header.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW:
            raise CorruptImageError("data-file-raw requires a data file", errno=errno.EINVAL)
        fmt.read_backing_file_name(header, read)
        s.image_backing_file = header.backing_file
        s.image_backing_format = header.backing_format
        if not check_mode:
            s._read_snapshots()
        else:
            # QEMU's check-mode open leaves the snapshot table unread (the check
            # reads it), so a header rewritten before the check names none
            s.snapshots_offset = 0
            header.nb_snapshots = 0
        if header.bitmaps is not None and not read_only:
            raise UnsupportedImageError("Images with persistent dirty bitmaps can only be "
                                        "opened read-only", errno=errno.ENOTSUP)

        if not read_only and s.autoclear_features & ~fmt.AUTOCLEAR_MASK:
            s.autoclear_features &= fmt.AUTOCLEAR_MASK
            s.update_header()
        if not check_mode and not read_only and s.incompatible_features & fmt.INCOMPAT_DIRTY:
            s._repair_dirty_image()
        if header.bitmaps is not None:
            # qcow2_load_dirty_bitmaps: an open fails on a bitmap QEMU cannot load;
            # the checker's opener holds those rules (read-only, on this file)
            from .check import Qcow2Checker

            Qcow2Checker(file.filename, file=file).close()
        from ..node import MAX_REQUEST_LENGTH

        if s.total_sectors * SECTOR_SIZE > MAX_REQUEST_LENGTH:
            # bdrv_open_driver's refresh_total_sectors, once the format is open
            raise ImageError("Could not refresh total sector count: File too large",
                             errno=errno.EFBIG)
        return s

    def size_to_l1(self, size: int) -> int:
        shift = self.cluster_bits + self.l2_bits
        return (size + (1 << shift) - 1) >> shift

    def _apply_options(self, options: dict[str, object]) -> None:
        """qcow2_update_options_prepare: check and apply the runtime options."""
        typed = _typed_runtime_options(options)
        cs = self.cluster_size
        virtual_size = self.total_sectors * SECTOR_SIZE
        max_l2_entries = -(-virtual_size // cs)
        max_l2_cache = -(-(max_l2_entries * 8) // cs) * cs
        combined_set = "cache-size" in typed
        l2_set = "l2-cache-size" in typed
        refcount_set = "refcount-cache-size" in typed
        entry_size_set = "l2-cache-entry-size" in typed
        combined = typed.get("cache-size", 0)
        l2_cache_setting = typed.get("l2-cache-size", DEFAULT_L2_CACHE_MAX_SIZE)
        refcount_cache_size = typed.get("refcount-cache-size", 0)
        entry_size = typed.get("l2-cache-entry-size", cs)
        l2_cache_size = min(max_l2_cache, l2_cache_setting)
        if combined_set:
            if l2_set and refcount_set:
                raise ImageError("cache-size, l2-cache-size and refcount-cache-size may not "
                                 "be set at the same time", errno=errno.EINVAL)
            if l2_set and l2_cache_setting > combined:
                raise ImageError("l2-cache-size may not exceed cache-size", errno=errno.EINVAL)
            if refcount_cache_size > combined:
                raise ImageError("refcount-cache-size may not exceed cache-size",
                                 errno=errno.EINVAL)
            min_refcount = MIN_REFCOUNT_CACHE_SIZE * cs
            if l2_set:
                refcount_cache_size = combined - l2_cache_size
            elif refcount_set:
                l2_cache_size = combined - refcount_cache_size
            elif combined >= max_l2_cache + min_refcount:
                l2_cache_size = max_l2_cache
                refcount_cache_size = combined - l2_cache_size
            else:
                refcount_cache_size = min(combined, min_refcount)
                l2_cache_size = combined - refcount_cache_size
        if l2_cache_size < max_l2_cache and not entry_size_set:
            entry_size = min(cs, 4096)
        if entry_size < 512 or entry_size > cs or entry_size & (entry_size - 1):
            raise ImageError(f"L2 cache entry size must be a power of two between 512 and "
                             f"the cluster size ({cs})", errno=errno.EINVAL)
        if l2_cache_size // entry_size > INT_MAX:
            raise ImageError("L2 cache size too big", errno=errno.EINVAL)
        if refcount_cache_size // cs > INT_MAX:
            raise ImageError("Refcount cache size too big", errno=errno.EINVAL)
        l2_entries = max(l2_cache_size // entry_size, MIN_L2_CACHE_SIZE)
        self.refcount_cache_entries = max(refcount_cache_size // cs, MIN_REFCOUNT_CACHE_SIZE)
        self.l2_slice_size = entry_size // 8
        decode, encode = entry_codec(64, self.l2_slice_size)
        self.l2_cache = TableCache(self.file, l2_entries, entry_size, decode, encode,
                                   before_write=self._before_l2_write)

        if typed.get("cache-clean-interval", 0) > UINT_MAX:
            raise ImageError("Cache clean interval too big", errno=errno.EINVAL)
        lazy = typed.get("lazy-refcounts",
                         bool(self.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS))
        if lazy and self.qcow_version < 3:
            raise ImageError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                             "compatibility level", errno=errno.EINVAL)
        _overlap_check_mode(typed)
        self.use_lazy_refcounts = lazy
        unmap = bool(options.pop("_unmap", True))
        passthrough = [False, True, unmap, True, False]
        for name, kind in (("pass-discard-request", DISCARD_REQUEST),
                           ("pass-discard-snapshot", DISCARD_SNAPSHOT),
                           ("pass-discard-other", DISCARD_OTHER)):
            if name in typed:
                passthrough[kind] = typed[name]
        self.discard_passthrough = passthrough

    def _read_snapshots(self) -> None:
        """Read the snapshot table (qcow2_read_snapshots) for its L1 tables."""
        count = self.header.nb_snapshots
        if not count:
            return
        read = self.file.pread
        offset = self.snapshots_offset
        table_length = 0
        for index in range(count):
            table_length = (table_length + 7) & ~7
            offset = (offset + 7) & ~7
            raw = read(offset, fmt.SNAPSHOT_HEADER_SIZE)
            (l1_offset, l1_size, id_size, name_size, _date_sec, _date_nsec, _clock,
             _vm_state, extra_size) = struct.unpack(">QIHHIIQII", raw)
            offset += fmt.SNAPSHOT_HEADER_SIZE
            if extra_size > fmt.MAX_SNAPSHOT_EXTRA_DATA:
                raise CorruptImageError(
                    f"Too much extra metadata in snapshot table entry {index}",
                    errno=errno.EFBIG,
                    hint="You can force-remove this extra metadata with qemu-img check "
                         "-r all\n")
            offset += extra_size
            id_str = read(offset, id_size).decode("utf-8", "replace")
            offset += id_size
            name = read(offset, name_size).decode("utf-8", "replace")
            offset += name_size
            table_length += fmt.SNAPSHOT_HEADER_SIZE + extra_size + id_size + name_size
            if table_length > fmt.MAX_SNAPSHOTS_SIZE or offset - self.snapshots_offset > INT_MAX:
                raise CorruptImageError(
                    "Snapshot table is too big", errno=errno.EFBIG,
                    hint=f"You can force-remove all {count - index} overhanging snapshots "
                         f"with qemu-img check -r all\n")
            self.snapshots.append(Snapshot(l1_offset, l1_size, id_str, name))
        self.snapshots_size = offset - self.snapshots_offset

    def _repair_dirty_image(self) -> None:
        """Repair an image left dirty (lazy refcounts), as QEMU does on open."""
        from .check import Qcow2Checker

        # whichever program opened the image prefixes the error_report() lines
        checker = Qcow2Checker(self.file.filename, writable=True, program=None)
        try:
            result = checker.check(frozenset({"all"}))
        except ImageError as exc:
            checker.close()
            raise ImageError(f"Could not repair dirty image: {exc}",
                             errno=exc.errno) from None
        self.open_messages.extend(result.messages)
        self.open_messages.extend(checker.close())
        if result.check_errors:
            raise ImageError("Could not repair dirty image: Input/output error",
                             errno=errno.EIO)
        self._reload_metadata()

    def _reload_metadata(self) -> None:
        """Re-read the header fields, L1 and refcount tables changed behind our back."""
        header = fmt.unpack_fixed_header(self.file.pread(0, fmt.HEADER_V3_LENGTH))
        self.incompatible_features = header.incompatible_features
        self.compatible_features = header.compatible_features
        self.autoclear_features = header.autoclear_features
        self.header.incompatible_features = header.incompatible_features
        self.snapshots_offset = header.snapshots_offset
        self.header.nb_snapshots = header.nb_snapshots
        self.l1_size = header.l1_size
        self.l1_table_offset = header.l1_table_offset
        raw = self.file.pread(header.l1_table_offset, header.l1_size * L1E_SIZE)
        self.l1_table = fmt.decode_table(raw)
        self.l2_cache.clear()
        refcounts = Refcounts(self, header.refcount_table_offset,
                              header.refcount_table_clusters)
        refcounts.load_table()
        self.refcounts = refcounts
        self.metadata_prealloc = None
        self.metadata_changed()

    # -- header updates ------------------------------------------------------------------

    def update_header(self) -> None:
        """Rewrite the whole first cluster from the current state."""
        h = self.header
        h.size = self.total_sectors * SECTOR_SIZE
        h.l1_size = self.l1_size
        h.l1_table_offset = self.l1_table_offset
        h.refcount_table_offset = self.refcounts.table_offset
        h.refcount_table_clusters = self.refcounts.table_size >> (self.cluster_bits - 3)
        h.snapshots_offset = self.snapshots_offset
        h.incompatible_features = self.incompatible_features
        h.compatible_features = self.compatible_features
        h.autoclear_features = self.autoclear_features
        h.backing_file = self.image_backing_file
        h.backing_format = self.image_backing_format
        try:
            cluster = fmt.pack_header_cluster(h)
        except OSError as exc:
            raise ImageError(f"Could not update qcow2 header: {exc.strerror}",
                             errno=exc.errno) from None
        self.file.pwrite(0, cluster)

    def mark_dirty(self) -> None:
        """Set the dirty bit before the first lazy refcount change."""
        if self.incompatible_features & fmt.INCOMPAT_DIRTY:
            return
        value = self.incompatible_features | fmt.INCOMPAT_DIRTY
        self.file.pwrite(OFFSET_INCOMPATIBLE_FEATURES, struct.pack(">Q", value))
        self.incompatible_features = value

    def mark_clean(self) -> None:
        if self.incompatible_features & fmt.INCOMPAT_DIRTY:
            self.incompatible_features &= ~fmt.INCOMPAT_DIRTY
            self.write_caches(force_refcounts=True)
            self.update_header()

    def need_accurate_refcounts(self) -> bool:
        return not self.incompatible_features & fmt.INCOMPAT_DIRTY

    # -- corruption handling ----------------------------------------------------------------

    def signal_corruption(self, message: str, *, fatal: bool = True) -> CorruptImageError:
        """Report corrupt metadata as qcow2_signal_corruption does.

        Fatal corruption of a writable image marks it corrupt on disk (so
        nothing writes to it until it is repaired) and makes this node
        unusable.  The line QEMU prints to stderr becomes the error's
        ``notice`` (None when QEMU would suppress a repeat).  Returns the
        error for the caller to raise; QEMU carries on after non-fatal
        corruption, and so do callers that only report it.
        """
        fatal = fatal and not self.read_only
        notice = None
        suppressed = self.signaled_corruption and (
            not fatal or self.incompatible_features & fmt.INCOMPAT_CORRUPT)
        if not suppressed:
            if fatal:
                notice = (f"qcow2: Marking image as corrupt: {message}; further corruption "
                          f"events will be suppressed")
                self.incompatible_features |= fmt.INCOMPAT_CORRUPT
                try:
                    self.update_header()
                except ImageError:
                    pass
                self.broken = True
            else:
                notice = (f"qcow2: Image is corrupt: {message}; further non-fatal "
                          f"corruption events will be suppressed")
            self.signaled_corruption = True
        error = CorruptImageError(message, errno=errno.EIO)
        error.notice = notice  # type: ignore[attr-defined]
        return error

    def report_corruption(self, message: str) -> None:
        """Non-fatal corruption QEMU reports and then carries on from."""
        notice = getattr(self.signal_corruption(message, fatal=False), "notice", None)
        if notice:
            self.messages.append(notice)

    def metadata_changed(self) -> None:
        self._overlap_version += 1

    def _metadata_index(self) -> array:
        """Every metadata cluster the overlap check knows, sorted.

        Each item is ``cluster index * 16 + rank`` (rank: position of its kind
        in METADATA_OVERLAP_ORDER), 8 bytes per metadata cluster.  Rebuilt
        only after the L1 or refcount table changed.
        """
        cached = self._overlap_cache
        if cached is not None and cached[0] == self._overlap_version:
            return cached[1]
        cb = self.cluster_bits
        cs = self.cluster_size
        keys: list[int] = []
        rank = {kind: position for position, kind in enumerate(METADATA_OVERLAP_ORDER)}

        def add_range(offset: int, size: int, kind: str) -> None:
            if size <= 0:
                return
            code = rank[kind]
            keys.extend((index << 4) | code
                        for index in range(offset >> cb, ((offset + size - 1) >> cb) + 1))

        add_range(0, cs, "qcow2_header")
        if self.l1_size:
            add_range(self.l1_table_offset, self.l1_size * L1E_SIZE, "active L1 table")
        refcounts = self.refcounts
        if refcounts.table_size:
            add_range(refcounts.table_offset, refcounts.table_size * fmt.REFTABLE_ENTRY_SIZE,
                      "refcount table")
        if self.snapshots_size:
            add_range(self.snapshots_offset, self.snapshots_size, "snapshot table")
        for snapshot in self.snapshots:
            if snapshot.l1_size:
                add_range(snapshot.l1_table_offset, snapshot.l1_size * L1E_SIZE,
                          "inactive L1 table")
        l2_rank = rank["active L2 table"]
        if not self.closing:
            # filter(None, ...) drops the (many) zero entries at C speed.
            keys.extend(((entry & L1E_OFFSET_MASK) >> cb << 4) | l2_rank
                        for entry in filter(None, self.l1_table) if entry & L1E_OFFSET_MASK)
        block_rank = rank["refcount block"]
        table = refcounts.table
        last = min(refcounts.max_table_index + 1, len(table))
        keys.extend(((table[index] & REFT_OFFSET_MASK) >> cb << 4) | block_rank
                    for index in range(last) if table[index] & REFT_OFFSET_MASK)
        bitmaps = self.header.bitmaps
        if bitmaps is not None and self.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
            add_range(bitmaps.directory_offset, bitmaps.directory_size, "bitmap directory")
        index = array("Q", sorted(keys))
        self._overlap_cache = (self._overlap_version, index)
        return index

    def check_metadata_write(self, offset: int, size: int, *, ignore: str | None) -> None:
        """Refuse a write that would land on metadata (pre-write overlap check)."""
        if size <= 0:
            return
        hit: str | None = None
        if offset < self.cluster_size and ignore != "qcow2_header":
            hit = "qcow2_header"
        else:
            index = self._metadata_index()
            first = (offset >> self.cluster_bits) << 4
            last = (((offset + size - 1) >> self.cluster_bits) + 1) << 4
            position = bisect_left(index, first)
            best = len(METADATA_OVERLAP_ORDER)
            while position < len(index) and index[position] < last:
                kind = METADATA_OVERLAP_ORDER[index[position] & 15]
                if kind != ignore:
                    best = min(best, index[position] & 15)
                position += 1
            if best < len(METADATA_OVERLAP_ORDER):
                hit = METADATA_OVERLAP_ORDER[best]
        if hit is not None:
            raise self.signal_corruption(f"Preventing invalid write on metadata (overlaps "
                                         f"with {hit})")

    def _before_l2_write(self, offset: int, size: int) -> None:
        self.check_metadata_write(offset, size, ignore="active L2 table")

    # -- compressed clusters ------------------------------------------------------------

    def parse_compressed_entry(self, entry: int) -> tuple[int, int]:
        """(host offset, byte count) of a compressed cluster's data."""
        coffset = entry & self.cluster_offset_mask
        nb_csectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        csize = nb_csectors * fmt.COMPRESSED_SECTOR_SIZE - (coffset & 511)
        return coffset, csize

    def _read_compressed(self, entry: int, offset: int, length: int) -> bytes:
        coffset, csize = self.parse_compressed_entry(entry)
        raw = self.file.pread(coffset, csize)
        cs = self.cluster_size
        try:
            decompressor = zlib.decompressobj(-12)
            data = decompressor.decompress(raw, cs)
        except zlib.error:
            data = b""
        if len(data) < cs:
            raise RequestError("Input/output error", errno=errno.EIO)
        start = offset & (cs - 1)
        return data[start:start + length]

    # -- the Driver interface -------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.broken:
            raise RequestError("No medium found", errno=errno.ENOMEDIUM)
        if self.check_only:
            raise UnsupportedImageError(self.check_only, errno=errno.ENOTSUP)

    def getlength(self) -> int:
        return self.total_sectors * SECTOR_SIZE

    def preadv(self, offset: int, length: int) -> bytes:
        """Read a guest range (qcow2_co_preadv_part); may run past the image end."""
        self._check_usable()
        chunks: list[bytes] = []
        backing = self.backing
        while length > 0:
            cur, host, ctype = self.get_host_offset(offset, min(length, INT_MAX))
            if ctype == NORMAL:
                chunks.append(self.file.pread(host, cur))
            elif ctype == UNALLOCATED and backing is not None:
                chunks.append(backing.read_child(offset, cur))
            elif ctype == COMPRESSED:
                chunks.append(self._read_compressed(host, offset, cur))
            else:
                chunks.append(bytes(cur))
            offset += cur
            length -= cur
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def preadv_into(self, offset: int, view: memoryview) -> None:
        """preadv into a caller's buffer (no intermediate copies)."""
        self._check_usable()
        backing = self.backing
        position = 0
        length = len(view)
        while position < length:
            cur, host, ctype = self.get_host_offset(offset, min(length - position, INT_MAX))
            part = view[position:position + cur]
            if ctype == NORMAL:
                self.file.preadinto(host, part)
            elif ctype == UNALLOCATED and backing is not None:
                backing.read_child_into(offset, part)
            elif ctype == COMPRESSED:
                part[:] = self._read_compressed(host, offset, cur)
            else:
                fill_zero(part)
            offset += cur
            position += cur

    def pwritev(self, offset: int, data: memoryview) -> None:
        """Write a guest range with allocation and copy-on-write.

        A request that needs several host runs is split as QEMU splits it,
        and QEMU runs the pieces as concurrent tasks (at most eight): each
        piece's clusters are allocated before earlier pieces link their L2
        entries (and free what those replaced).  Pieces are therefore
        allocated ahead and completed in order, in a window of eight, so
        that host offsets come out as QEMU's.
        """
        self._check_usable()
        position = 0
        remaining = len(data)
        in_flight: list[list[L2Meta]] = []
        try:
            while remaining > 0:
                cur = min(remaining, INT_MAX)
                waits = self.flush_waits
                handled, host, metas = self.alloc_host_offset(offset, cur)
                waited = self.flush_waits != waits
                try:
                    self.check_metadata_write(host, handled, ignore=None)
                except BaseException:
                    for m in metas:
                        self.alloc_cluster_abort(m)
                    raise
                in_flight.append(metas)
                if len(in_flight) > WRITE_TASKS:
                    # No free task: wait for the oldest piece to complete.
                    self._complete_write(in_flight[0])
                    in_flight.pop(0)
                chunk = data[position:position + handled]
                self._handle_alloc_space(metas)
                if not self._merge_cow(offset, handled, chunk, metas):
                    self.file.pwrite(host, chunk)
                if waited:
                    # Allocating this piece waited for the disk (QEMU flushed
                    # metadata): the earlier pieces completed meanwhile.
                    while len(in_flight) > 1:
                        self._complete_write(in_flight[0])
                        in_flight.pop(0)
                offset += handled
                position += handled
                remaining -= handled
            while in_flight:
                self._complete_write(in_flight[0])
                in_flight.pop(0)
        except BaseException:
            for metas in in_flight:
                for m in metas:
                    self.alloc_cluster_abort(m)
            raise

    def _complete_write(self, metas: list[L2Meta]) -> None:
        """Copy on write and link the L2 entries of one written piece."""
        while metas:
            self.link_l2(metas[0])
            metas.pop(0)

    def _vmstate_offset(self, position: int, length: int) -> int:
        base = self.l1_vm_state_index << (self.cluster_bits + self.l2_bits)
        if fmt.INT64_MAX - position < base or position + base > fmt.INT64_MAX - length:
            raise RequestError(os.strerror(errno.EIO), errno=errno.EIO)
        return base + position

    def save_vmstate(self, position: int, data: memoryview) -> None:
        """VM state lives past the end of the disk, in the same clusters."""
        self._check_usable()
        if len(data):
            self.pwritev(self._vmstate_offset(position, len(data)), data)

    def load_vmstate(self, position: int, length: int) -> bytes:
        self._check_usable()
        if not length:
            return b""
        return self.preadv(self._vmstate_offset(position, length), length)

    def pwritev_compressed(self, offset: int, data: memoryview) -> None:
        """qcow2_co_pwritev_compressed_part, one cluster after the other."""
        self._check_usable()
        cs = self.cluster_size
        length = len(data)
        if length == 0:
            # Pad the file to a whole sector, as QEMU does at the end of convert -c.
            self.file.truncate(self.file.length())
            return
        if offset & (cs - 1):
            raise RequestError(os.strerror(errno.EINVAL), errno=errno.EINVAL)
        if length & (cs - 1) and offset + length != self.total_sectors * SECTOR_SIZE:
            raise RequestError(os.strerror(errno.EINVAL), errno=errno.EINVAL)
        position = 0
        while position < length:
            chunk = data[position:position + cs]
            self._write_compressed_cluster(offset + position, chunk)
            position += len(chunk)

    def _write_compressed_cluster(self, offset: int, chunk: memoryview) -> None:
        cs = self.cluster_size
        buf = bytes(chunk) if len(chunk) == cs else bytes(chunk) + bytes(cs - len(chunk))
        compressor = zlib.compressobj(-1, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY)
        compressed = compressor.compress(buf) + compressor.flush()
        if len(compressed) > cs - 1:
            # Does not compress: written as a normal cluster.
            self.pwritev(offset, chunk)
            return
        host = self._alloc_compressed_cluster(offset, len(compressed))
        self.check_metadata_write(host, len(compressed), ignore=None)
        self.file.pwrite(host, compressed)

    def _alloc_compressed_cluster(self, offset: int, size: int) -> int:
        """Place compressed data for the guest cluster at ``offset`` (never over data)."""
        table, index, key = self.get_cluster_table(offset)
        if table[index] & fmt.L2E_OFFSET_MASK:
            raise RequestError(os.strerror(errno.EIO), errno=errno.EIO)
        coffset = self.refcounts.alloc_bytes(size)
        nb_csectors = (coffset + size - 1) // fmt.COMPRESSED_SECTOR_SIZE \
            - coffset // fmt.COMPRESSED_SECTOR_SIZE
        # The L2 slice may have been evicted while refcount blocks were placed.
        table, index, key = self.get_cluster_table(offset)
        self.l2_cache.mark_dirty(key)
        table[index] = coffset | fmt.OFLAG_COMPRESSED | (nb_csectors << self.csize_shift)
        return coffset

    def _merge_cow(self, offset: int, nbytes: int, chunk: memoryview,
                   metas: list[L2Meta]) -> bool:
        for m in metas:
            if m.cow_start.nb_bytes == 0 and m.cow_end.nb_bytes == 0:
                continue
            if m.skip_cow:
                continue
            if m.offset + m.cow_start.offset + m.cow_start.nb_bytes != offset:
                continue
            if m.offset + m.cow_end.offset != offset + nbytes:
                continue
            m.data = chunk
            return True
        return False

    def _handle_alloc_space(self, metas: list[L2Meta]) -> None:
        """Zero new clusters with fallocate when their COW parts are all zero."""
        from ..chain import is_zero_fast

        node = self.node
        for m in metas:
            if not m.cow_start.nb_bytes and not m.cow_end.nb_bytes:
                continue
            if not is_zero_fast(node, m.offset + m.cow_start.offset, m.cow_start.nb_bytes):
                continue
            if not is_zero_fast(node, m.offset + m.cow_end.offset, m.cow_end.nb_bytes):
                continue
            start = m.alloc_offset + m.cow_start.offset
            nbytes = m.cow_end.offset + m.cow_end.nb_bytes - m.cow_start.offset
            self.check_metadata_write(start, nbytes, ignore=None)
            try:
                self.file.write_zeroes(start, nbytes)
            except NotSupported:
                continue
            m.skip_cow = True

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """qcow2_co_pwrite_zeroes: zero clusters, or NotSupported to fall back."""
        from ..chain import is_zero

        self._check_usable()
        cs = self.cluster_size
        head = offset & (cs - 1)
        tail = -(-(offset + length) // cs) * cs - (offset + length)
        if offset + length == self.total_sectors * SECTOR_SIZE:
            tail = 0
        if head or tail:
            node = self.node
            if not (is_zero(node, offset - head, head)
                    and is_zero(node, offset + length, tail)):
                raise NotSupported()
            offset -= head
            length = cs
            _, _, ctype = self.get_host_offset(offset, cs)
            if ctype not in (UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC):
                raise NotSupported()
        self.subcluster_zeroize(offset, length, may_unmap)

    def pdiscard(self, offset: int, length: int) -> None:
        self._check_usable()
        if self.qcow_version < 3 and self.backing is not None:
            raise NotSupported()
        cs = self.cluster_size
        if (offset | length) & (cs - 1):
            if offset & (cs - 1) or offset + length != self.total_sectors * SECTOR_SIZE:
                raise NotSupported()
        self.cluster_discard(offset, length, DISCARD_REQUEST, False)

    def block_status(self, want_zero: bool, offset: int, length: int) -> DriverStatus:
        self._check_usable()
        if self.metadata_prealloc is None:
            self.metadata_prealloc = self._detect_metadata_preallocation()
        nbytes, host, ctype = self.get_host_offset(offset, min(INT_MAX, length))
        flags = 0
        host_offset = None
        file = None
        if ctype in (NORMAL, ZERO_ALLOC):
            host_offset = host
            file = self.file
            flags |= OFFSET_VALID
        if ctype in (ZERO_PLAIN, ZERO_ALLOC):
            flags |= ZERO
        elif ctype != UNALLOCATED:
            flags |= DATA
        if self.metadata_prealloc and flags & DATA and flags & OFFSET_VALID:
            flags |= RECURSE
        return DriverStatus(flags, nbytes, host_offset, file)

    def _detect_metadata_preallocation(self) -> bool:
        """QEMU's guess that the image was created with preallocation=metadata."""
        file_length = self.file.length()
        real_clusters = self.file.allocated_size() // self.cluster_size
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-file_length // self.cluster_size)
        return self.refcounts.count_used(end_cluster, threshold) >= threshold

    def flush_metadata(self, cache: TableCache) -> None:
        """Write a cache back where QEMU flushes it while allocating.

        QEMU waits for the disk there, and pieces of the same write request
        that were waiting complete meanwhile; ``pwritev`` follows that.
        """
        self.flush_waits += 1
        cache.flush()

    def write_caches(self, *, force_refcounts: bool = False) -> None:
        self.l2_cache.flush()
        if force_refcounts or self.need_accurate_refcounts():
            self.refcounts.cache.flush()

    def flush(self) -> None:
        if not self.read_only and not self.broken:
            self.write_caches()
        self.file.flush()

    def close(self) -> None:
        """Write back the caches and close, as QEMU closes a qcow2 node.

        QEMU flushes first; if that finds fatal corruption the node is dead
        and nothing more is written.  Otherwise the caches are written back
        again (qcow2_inactivate), where a failure is reported as "Failed to
        flush the ... cache" and the image is not marked clean.  Such lines
        (and corruption notices) go to ``messages``; closing carries on.
        """
        try:
            if not self.read_only and not self.broken:
                try:
                    self.write_caches()
                except ImageError as error:
                    self._note(error)
            if not self.read_only and not self.broken:
                # QEMU drops its L1 table before writing back, so active L2
                # tables are no longer part of the overlap check by then.
                self.closing = True
                self.metadata_changed()
                failed = False
                for cache, name in ((self.l2_cache, "L2 table"),
                                    (self.refcounts.cache, "refcount block")):
                    try:
                        cache.flush()
                    except ImageError as error:
                        failed = True
                        self._note(error)
                        reason = os.strerror(error.errno) if error.errno else str(error)
                        self.messages.append(f"Failed to flush the {name} cache: {reason}")
                if not failed and not self.broken:
                    self.mark_clean()
            self.file.flush()
        finally:
            self.file.close()

    def _note(self, error: ImageError) -> None:
        notice = getattr(error, "notice", None)
        if notice:
            self.messages.append(notice)

    def truncate(self, size: int, *, exact: bool = True, prealloc: str = "off",
                 zero_new: bool = False) -> None:
        """Resize the image (qcow2_co_truncate).

        Growing adds L1 room; ``zero_new`` (the generic layer asks for it when
        a backing file would otherwise show through) makes the new area read
        as zero.  Shrinking drops the clusters past the new end, the L2 tables
        and refcount blocks no longer needed, and the file's unused tail.
        """
        self._check_usable()
        if prealloc not in _PREALLOCATION_MODES:
            raise ImageError(f"Unsupported preallocation mode '{prealloc}'",
                             errno=errno.ENOTSUP)
        if size % SECTOR_SIZE:
            raise ImageError(f"The new size must be a multiple of {SECTOR_SIZE}",
                             errno=errno.EINVAL)
        if self.snapshots and self.qcow_version < 3:
            raise ImageError("Can't resize a v2 image which has snapshots",
                             errno=errno.ENOTSUP)
        cs = self.cluster_size
        old_length = self.total_sectors * SECTOR_SIZE
        new_l1_size = self.size_to_l1(size)
        if size < old_length:
            if prealloc != "off":
                raise ImageError("Preallocation can't be used for shrinking an image",
                                 errno=errno.EINVAL)
            start = -(-size // cs) * cs
            try:
                self.cluster_discard(start, max(0, old_length - start), DISCARD_ALWAYS, True)
            except ImageError as exc:
                raise exc.prefixed("Failed to discard cropped clusters: ") from None
            self.shrink_l1_table(new_l1_size)
            self.shrink_reftable()
            old_file_size = self.file.length()
            last_cluster = self.last_used_cluster(old_file_size)
            if (last_cluster + 1) * cs < old_file_size:
                try:
                    os.ftruncate(self.file.fd, (last_cluster + 1) * cs)
                except OSError as exc:
                    self.messages.append(f"Failed to truncate the tail of the image: "
                                         f"{os.strerror(exc.errno)}")
        else:
            if prealloc not in ("off", "metadata"):
                # refused before anything changes: the engine does not preallocate
                # data in a grown qcow2 image (QEMU does)
                raise UnsupportedImageError(f"Preallocation mode '{prealloc}' is not "
                                            f"supported for qcow2 images", errno=errno.ENOTSUP)
            try:
                self.grow_l1_table(new_l1_size, True)
            except ImageError as exc:
                raise exc.prefixed("Failed to grow the L1 table: ") from None
            if prealloc == "metadata":
                self._preallocate_metadata(old_length, size)
        if zero_new and size > old_length:
            zero_start = -(-old_length // cs) * cs
            if size > zero_start:
                try:
                    self.subcluster_zeroize(zero_start, size - zero_start, False)
                except NotSupported:
                    raise ImageError("Failed to zero out new clusters: Operation not supported",
                                     errno=errno.ENOTSUP) from None
            if zero_start > old_length:
                length = min(zero_start, size) - old_length
                self.pwritev(old_length, memoryview(bytes(length)))
        self.total_sectors = size // SECTOR_SIZE
        self.file.pwrite(fmt.OFFSET_SIZE, struct.pack(">Q", size))
        self.l1_vm_state_index = new_l1_size
        # The cache geometry follows the image size, as QEMU's does.
        self.write_caches(force_refcounts=True)
        self._apply_options(dict(self.options))
        self.refcounts.cache = TableCache(
            self.file, self.refcount_cache_entries, cs, self.refcounts.cache.decode,
            self.refcounts.cache.encode, before_write=self.refcounts.cache.before_write)
        self.metadata_prealloc = None

    def change_backing_file(self, backing_file: str | None,
                            backing_format: str | None) -> None:
        """qcow2_change_backing_file: new names in the header extensions."""
        self._check_usable()
        if backing_file is not None and len(backing_file.encode("utf-8", "surrogateescape")) \
                > fmt.MAX_BACKING_FILE_NAME:
            raise RequestError(os.strerror(errno.EINVAL), errno=errno.EINVAL)
        self.image_backing_file = backing_file
        self.image_backing_format = backing_format
        self.update_header()

    def truncate_grow(self, size: int, prealloc: str = "off") -> None:
        """Grow a freshly created image to ``size`` bytes (qemu-img create)."""
        self.truncate(size, prealloc=prealloc)

    def _preallocate_metadata(self, offset: int, new_length: int) -> None:
        """preallocate_co: allocate and map host clusters for ``[offset,
        new_length)`` without writing data, then extend the file over them."""
        cs = self.cluster_size
        host_offset = cur = 0
        while offset < new_length:
            request = min(new_length - offset, INT_MAX - INT_MAX % cs)
            try:
                cur, host_offset, metas = self.alloc_host_offset(offset, request)
            except ImageError as exc:
                raise ImageError(f"Allocating clusters failed: {os.strerror(exc.errno or errno.EIO)}",
                                 errno=exc.errno) from None
            try:
                self._complete_write(metas)
            except ImageError as exc:
                for m in metas:
                    self.alloc_cluster_abort(m)
                raise ImageError(f"Mapping clusters failed: {os.strerror(exc.errno or errno.EIO)}",
                                 errno=exc.errno) from None
            offset += cur
        if host_offset + cur > self.file.length():
            self.file.truncate(host_offset + cur)

    def shrink_l1_table(self, new_size: int) -> None:
        """Forget the L2 tables past ``new_size`` L1 entries (qcow2_shrink_l1_table)."""
        if new_size >= self.l1_size:
            return
        self.file.write_zeroes_or_fill(self.l1_table_offset + new_size * L1E_SIZE,
                                       (self.l1_size - new_size) * L1E_SIZE)
        for index in range(self.l1_size - 1, new_size - 1, -1):
            l2_offset = self.l1_table[index] & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            self.refcounts.free_clusters(l2_offset, self.cluster_size, DISCARD_ALWAYS)
            self.l1_table[index] = 0
        self.metadata_changed()

    def shrink_reftable(self) -> None:
        """Drop refcount blocks that describe nothing any more (qcow2_shrink_reftable)."""
        refcounts = self.refcounts
        table = refcounts.table
        kept = array("Q", table)
        for index in range(refcounts.table_size):
            block_offset = table[index] & REFT_OFFSET_MASK
            if not block_offset:
                kept[index] = 0
                continue
            block = refcounts._block(block_offset, index)
            in_use = len(block) - block.count(0)
            if index == block_offset >> (self.cluster_bits + refcounts.block_bits):
                # The block describes itself: that reference does not count.
                own = (block_offset >> self.cluster_bits) & (refcounts.block_entries - 1)
                if block[own]:
                    in_use -= 1
            unused = in_use == 0
            if unused:
                kept[index] = 0
        self.file.pwrite(refcounts.table_offset, fmt.encode_table(kept))
        for index in range(refcounts.table_size):
            if table[index] and not kept[index]:
                self._discard_refcount_block(table[index] & REFT_OFFSET_MASK)
                table[index] = 0
        refcounts._update_max_table_index()
        self.metadata_changed()
        if not refcounts.cache_discards:
            refcounts.process_discards(True)

    def _discard_refcount_block(self, block_offset: int) -> None:
        refcounts = self.refcounts
        cluster_index = block_offset >> self.cluster_bits
        table_index = cluster_index >> refcounts.block_bits
        covering = refcounts.table[table_index] & REFT_OFFSET_MASK \
            if table_index < refcounts.table_size else 0
        if not covering:
            raise self.signal_corruption(f"Refblock at {hexc(block_offset)} is not covered by "
                                         f"the refcount structures")
        block = refcounts._block(covering, table_index)
        position = cluster_index & (refcounts.block_entries - 1)
        if block[position] != 1:
            raise self.signal_corruption(
                f"Invalid refcount: refblock offset {hexc(covering)}, reftable index "
                f"{table_index}, block offset {hexc(block_offset)}, refcount "
                f"{hexc(block[position])}")
        block[position] = 0
        refcounts.cache.mark_dirty(covering)
        if cluster_index < refcounts.free_cluster_index:
            refcounts.free_cluster_index = cluster_index
        refcounts.cache.discard(block_offset)
        refcounts._queue_discard(block_offset, self.cluster_size)

    def last_used_cluster(self, size: int) -> int:
        """The last cluster below ``size`` bytes with a refcount (qcow2_get_last_cluster)."""
        get = self.refcounts.get
        for index in range(-(-size // self.cluster_size) - 1, -1, -1):
            if get(index) > 0:
                return index
        raise self.signal_corruption("There are no references in the refcount table.")

    # -- info and check ----------------------------------------------------------------------

    def info(self) -> ImageInfo:
        from ..api import ImageInfo

        node = self.node
        full_backing = None
        if self.image_backing_file is not None:
            from ..api import resolve_backing_filename

            full_backing = resolve_backing_filename(node.filename, self.image_backing_file)
        specific: dict[str, object]
        if self.qcow_version == 2:
            specific = {"compat": "0.10", "compression-type": "zlib",
                        "refcount-bits": 1 << self.refcount_order}
        else:
            specific = {"compat": "1.1", "compression-type": "zlib",
                        "lazy-refcounts": bool(self.compatible_features
                                               & fmt.COMPAT_LAZY_REFCOUNTS),
                        "refcount-bits": 1 << self.refcount_order,
                        "corrupt": bool(self.incompatible_features & fmt.INCOMPAT_CORRUPT),
                        "extended-l2": False}
        return ImageInfo(
            filename=node.filename, format_name="qcow2",
            virtual_size=self.getlength(), actual_size=self.file.allocated_size(),
            cluster_size=self.cluster_size,
            vm_state_offset=self.l1_vm_state_index << (self.cluster_bits + self.l2_bits),
            dirty_flag=bool(self.incompatible_features & fmt.INCOMPAT_DIRTY),
            backing_filename=self.image_backing_file,
            full_backing_filename=full_backing,
            backing_format=self.image_backing_format,
            format_specific=specific)

    def check(self, fix: frozenset[str]) -> CheckResult:
        """qemu-img check on this image (written back first, re-read after repairs)."""
        from .check import check_qcow2

        if not self.read_only and not self.broken:
            self.write_caches(force_refcounts=True)
        result = check_qcow2(self.file.filename, fix)
        if fix:
            self._reload_metadata()
        return result


# -- creating images -----------------------------------------------------------------------

_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
_COMPRESSION_TYPES = ("zlib", "zstd")
_V3_HINT = "(use version=v3 or greater)"


def _validate_create(size: int, options: Mapping[str, object]) -> tuple[int, int, int]:
    """qcow2's create-time validation; returns (version, cluster size, refcount order)."""
    compat = options.get("compat")
    if compat is None:
        version = 3
    elif str(compat) in _VERSIONS:
        version = _VERSIONS[str(compat)]
    else:
        raise ImageError(f"Parameter 'version' does not accept value '{compat}'",
                         errno=errno.EINVAL)
    prealloc = str(options.get("preallocation", "off"))
    if prealloc not in _PREALLOCATION_MODES:
        raise ImageError(f"Parameter 'preallocation' does not accept value '{prealloc}'",
                         errno=errno.EINVAL)
    compression = str(options.get("compression_type", "zlib"))
    if compression not in _COMPRESSION_TYPES:
        raise ImageError(f"Parameter 'compression-type' does not accept value "
                         f"'{compression}'", errno=errno.EINVAL)
    cluster_size = int(options.get("cluster_size", fmt.DEFAULT_CLUSTER_SIZE))  # type: ignore[call-overload]
    extended_l2 = bool(options.get("extended_l2", False))
    if extended_l2 and version < 3:
        raise ImageError("Extended L2 entries are only supported with compatibility level "
                         f"1.1 and above {_V3_HINT}", errno=errno.EINVAL)
    cluster_bits = cluster_size.bit_length() - 1
    if (cluster_bits < fmt.MIN_CLUSTER_BITS or cluster_bits > fmt.MAX_CLUSTER_BITS
            or 1 << cluster_bits != cluster_size):
        raise ImageError("Cluster size must be a power of two between 512 and 2048k",
                         errno=errno.EINVAL)
    if extended_l2 and cluster_size < 512 * 32:
        raise ImageError("Extended L2 entries are only supported with cluster sizes of at "
                         "least 16384 bytes", errno=errno.EINVAL)
    backing_file = options.get("backing_file")
    if backing_file is not None and prealloc != "off" and not extended_l2:
        raise ImageError("Backing file and preallocation can only be used at the same time "
                         "if extended_l2 is on", errno=errno.EINVAL)
    if options.get("backing_fmt") is not None and backing_file is None:
        raise ImageError("Backing format cannot be used without backing file",
                         errno=errno.EINVAL)
    if bool(options.get("lazy_refcounts", False)) and version < 3:
        raise ImageError("Lazy refcounts only supported with compatibility level 1.1 and "
                         f"above {_V3_HINT}", errno=errno.EINVAL)
    refcount_bits = int(options.get("refcount_bits", 16))  # type: ignore[call-overload]
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise ImageError("Refcount width must be a power of two and may not exceed 64 bits",
                         errno=errno.EINVAL)
    if version < 3 and refcount_bits != 16:
        raise ImageError("Different refcount widths than 16 bits require compatibility "
                         f"level 1.1 or above {_V3_HINT}", errno=errno.EINVAL)
    data_file = options.get("data_file")
    data_file_raw = bool(options.get("data_file_raw", False))
    if data_file_raw and data_file is None:
        raise ImageError("data-file-raw requires data-file", errno=errno.EINVAL)
    if data_file_raw and backing_file is not None:
        raise ImageError("Backing file and data-file-raw cannot be used at the same time",
                         errno=errno.EINVAL)
    if data_file is not None and version < 3:
        raise ImageError("External data files are only supported with compatibility level "
                         f"1.1 and above {_V3_HINT}", errno=errno.EINVAL)
    if compression != "zlib" and version < 3:
        raise ImageError("Non-zlib compression type is only supported with compatibility "
                         f"level 1.1 and above {_V3_HINT}", errno=errno.EINVAL)
    # What QEMU would create but this engine does not handle.
    if options.get("encryption") or options.get("encrypt.format"):
        raise UnsupportedImageError("Creating encrypted qcow2 images is not supported",
                                    errno=errno.ENOTSUP)
    if extended_l2:
        raise UnsupportedImageError("Creating images with extended L2 entries is not "
                                    "supported", errno=errno.ENOTSUP)
    if data_file is not None:
        raise UnsupportedImageError("Creating images with an external data file is not "
                                    "supported", errno=errno.ENOTSUP)
    if compression != "zlib":
        raise UnsupportedImageError("Creating images with zstd compression is not supported",
                                    errno=errno.ENOTSUP)
    if prealloc not in ("off", "metadata"):
        raise UnsupportedImageError(f"Preallocation mode '{prealloc}' is not supported for "
                                    f"qcow2 images", errno=errno.ENOTSUP)
    return version, cluster_size, refcount_bits.bit_length() - 1


def create_qcow2(filename: str, size: int, options: Mapping[str, object]) -> None:
    """Create a qcow2 image the way qemu-img create does, step by step.

    The steps (an empty header and refcount table, then the same allocation
    and header updates QEMU makes) give the same file QEMU writes, whatever
    the cluster size or refcount width.
    """
    import os

    from ..api import create_file

    file = create_file(filename)
    path = file.filename
    try:
        try:
            version, cluster_size, refcount_order = _validate_create(size, options)
            cluster_bits = cluster_size.bit_length() - 1
            header = Header(version=version, cluster_bits=cluster_bits, size=0,
                            refcount_table_offset=cluster_size, refcount_table_clusters=1,
                            refcount_order=refcount_order,
                            header_length=fmt.HEADER_V3_LENGTH)
            if options.get("lazy_refcounts"):
                header.compatible_features |= fmt.COMPAT_LAZY_REFCOUNTS
            raw_header = bytearray(cluster_size)
            raw_header[:fmt.HEADER_V3_LENGTH] = _initial_header(header)
            file.pwrite(0, bytes(raw_header))
            reftable = bytearray(2 * cluster_size)
            reftable[:8] = struct.pack(">Q", 2 * cluster_size)
            file.pwrite(cluster_size, bytes(reftable))
        finally:
            file.close()

        s = Qcow2Driver.open(HostFile(path, writable=True), read_only=False,
                             options={"_unmap": False})
        # a node of its own, with no backing file: preallocation's copy on
        # write reads the (empty) guest view through it
        BlockNode(s, path, read_only=False, unmap=False)
        try:
            if s.refcounts.alloc_clusters(3 * cluster_size) != 0:
                raise ImageError("Huh, first cluster in empty image is already in use?",
                                 errno=errno.EIO)
            s.update_header()
            s.truncate_grow(size, str(options.get("preallocation", "off")))
            backing_file = options.get("backing_file")
            if backing_file is not None:
                backing_format = options.get("backing_fmt")
                name = str(backing_file)
                s.image_backing_file = name
                s.image_backing_format = str(backing_format) if backing_format else None
                try:
                    if len(name.encode()) > fmt.MAX_BACKING_FILE_NAME:
                        raise ImageError("Invalid argument", errno=errno.EINVAL)
                    s.update_header()
                except ImageError as exc:
                    import os as _os

                    err = exc.errno or errno.EINVAL
                    raise ImageError(
                        f"Could not assign backing file '{name}' with format "
                        f"'{backing_format if backing_format else '(null)'}': "
                        f"{_os.strerror(err)}", errno=err) from None
        finally:
            s.close()
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def _initial_header(header: Header) -> bytes:
    """The bare header qcow2_co_create writes before opening the new image."""
    fixed = struct.pack(">IIQIIQIIQQIIQ", fmt.MAGIC, header.version, 0, 0,
                        header.cluster_bits, 0, fmt.CRYPT_NONE, 0, 0,
                        header.refcount_table_offset, 1, 0, 0)
    fixed += struct.pack(">QQQII", 0, header.compatible_features, 0,
                         header.refcount_order, fmt.HEADER_V3_LENGTH)
    return fixed + b"\0" * 8
