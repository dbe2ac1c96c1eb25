"""qcow2 consistency check and repair: the logic behind ``BlockNode.check()``.

This is what ``qemu-img check [-r leaks|all]`` does to a qcow2 image in QEMU
7.2 (the check half of block/qcow2-refcount.c, qcow2.c and qcow2-snapshot.c):
every reference the metadata makes to a host cluster is counted in memory,
the counts are compared with the refcounts stored in the image and, when
asked, leaks and corruptions are repaired in place -- down to rebuilding the
whole refcount structure when it cannot be patched.  The counters, and every
line QEMU writes to stderr while it checks, come back in a ``CheckResult``.

``Qcow2Checker`` keeps one image open across several checks, as one
``qemu-img check -r`` process does (it checks a second time after a repair,
and what the first pass left behind -- cached refcount blocks, a corruption
already signalled -- shapes the second); ``check_qcow2`` is the one-shot form.

The image is opened the way ``qemu-img check`` opens it (QEMU's BDRV_O_CHECK):
header validation is that of a normal open except that a missing refcount
table and a broken snapshot table are tolerated, so that they can be reported.
Nothing is ever written unless a repair was asked for, and then only inside
the image's own file.
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
from array import array
from collections.abc import Callable

from ..errors import CorruptImageError, ImageError, UnsupportedImageError
from ..hostfile import HostFile
from ..record import Record
from .format import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    AUTOCLEAR_MASK,
    COMPRESSED_SECTOR_SIZE,
    CRYPT_AES,
    CRYPT_LUKS,
    CRYPT_NONE,
    HEADER_V3_LENGTH,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    INCOMPAT_MASK,
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L1E_SIZE,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK,
    MAX_CLUSTER_OFFSET,
    MAX_L1_SIZE,
    MAX_REFTABLE_SIZE,
    MAX_SNAPSHOT_EXTRA_DATA,
    MAX_SNAPSHOTS,
    MAX_SNAPSHOTS_SIZE,
    MIN_CLUSTER_BITS,
    OFFSET_REFCOUNT_TABLE,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    REFTABLE_ENTRY_SIZE,
    SNAPSHOT_HEADER_SIZE,
    Header,
    pack_header_cluster,
    read_backing_file_name,
    read_extensions,
    unpack_fixed_header,
    unsupported_feature_message,
    validate_basic,
    validate_compression_type,
    validate_table,
)
from .refcount import RefcountAreaLayout, queue_discard

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from .driver import Qcow2Driver

FIX_LEAKS = 1
FIX_ERRORS = 2

INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
UINT64_MASK = (1 << 64) - 1
# The largest offset or length the block layer accepts (BDRV_MAX_LENGTH).
MAX_REQUEST_LENGTH = INT64_MAX - (INT64_MAX % (1 << 30))
# Largest single read the block layer accepts (BDRV_REQUEST_MAX_BYTES).
MAX_REQUEST_BYTES = (INT_MAX >> 9) << 9

# The in-memory refcount table is materialised sparsely, but a size that no
# allocation could satisfy still fails as QEMU's g_try_realloc() would.
MAX_IMRT_BYTES = 1 << 40

OFFSET_NB_SNAPSHOTS = 60
OFFSET_SNAPSHOTS = 64

# Extended L2 entries: 32 subclusters, an allocation bitmap in the low half
# of the second word and a "reads as zero" bitmap in the high half.
SUBCLUSTERS_PER_CLUSTER = 32
L2_BITMAP_ALL_ALLOC = (1 << 32) - 1
L2_BITMAP_ALL_ZEROES = L2_BITMAP_ALL_ALLOC << 32

# Persistent dirty bitmaps (qcow2-bitmap.c).
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_PHYS_SIZE = 0x20000000
BME_MAX_GRANULARITY_BITS = 31
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_NAME_SIZE = 1023
BME_RESERVED_FLAGS = 0xFFFFFFFC
BME_FLAG_IN_USE = 1
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1
BT_DIRTY_TRACKING_BITMAP = 1
_BITMAP_DIR_ENTRY = struct.Struct(">QIIBBHI")

SNAPSHOT_EXTRA_DATA_SIZE = 24  # vm_state_size_large, disk_size, icount
_SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")

# Metadata kinds of QEMU's overlap check, in the order it tests them.
OL_MAIN_HEADER = 1 << 0
OL_ACTIVE_L1 = 1 << 1
OL_ACTIVE_L2 = 1 << 2
OL_REFCOUNT_TABLE = 1 << 3
OL_REFCOUNT_BLOCK = 1 << 4
OL_SNAPSHOT_TABLE = 1 << 5
OL_INACTIVE_L1 = 1 << 6
OL_INACTIVE_L2 = 1 << 7
OL_BITMAP_DIRECTORY = 1 << 8
# qemu-img opens images with overlap-check=cached: everything but the
# inactive L2 tables (which would have to be read from disk).
OL_CACHED = (OL_MAIN_HEADER | OL_ACTIVE_L1 | OL_REFCOUNT_TABLE | OL_SNAPSHOT_TABLE
             | OL_BITMAP_DIRECTORY | OL_ACTIVE_L2 | OL_REFCOUNT_BLOCK | OL_INACTIVE_L1)
OVERLAP_NAMES = {
    OL_MAIN_HEADER: "qcow2_header",
    OL_ACTIVE_L1: "active L1 table",
    OL_ACTIVE_L2: "active L2 table",
    OL_REFCOUNT_TABLE: "refcount table",
    OL_REFCOUNT_BLOCK: "refcount block",
    OL_SNAPSHOT_TABLE: "snapshot table",
    OL_INACTIVE_L1: "inactive L1 table",
    OL_INACTIVE_L2: "inactive L2 table",
    OL_BITMAP_DIRECTORY: "bitmap directory",
}

# Discard types and whether qemu-img's defaults pass them down to the file.
DISCARD_NEVER = 0
DISCARD_ALWAYS = 1
DISCARD_REQUEST = 2
DISCARD_SNAPSHOT = 3
DISCARD_OTHER = 4
DISCARD_PASSTHROUGH = (False, True, False, True, False)

REFCOUNT_CACHE_SLOTS = 4  # MIN_REFCOUNT_CACHE_SIZE: what qemu-img gets


class CheckResult(Record):
    """QEMU's ImageCheck for one check, plus what it printed meanwhile."""

    _fields = ("check_errors", "corruptions", "leaks", "corruptions_fixed", "leaks_fixed",
               "image_end_offset", "total_clusters", "allocated_clusters",
               "fragmented_clusters", "compressed_clusters", "messages")

    def __init__(self, check_errors: int, corruptions: int, leaks: int,
                 corruptions_fixed: int, leaks_fixed: int, image_end_offset: int | None,
                 total_clusters: int | None, allocated_clusters: int | None,
                 fragmented_clusters: int | None, compressed_clusters: int | None,
                 messages: list[str] | None = None) -> None:
        self.check_errors = check_errors
        self.corruptions = corruptions
        self.leaks = leaks
        self.corruptions_fixed = corruptions_fixed
        self.leaks_fixed = leaks_fixed
        self.image_end_offset = image_end_offset
        self.total_clusters = total_clusters
        self.allocated_clusters = allocated_clusters
        self.fragmented_clusters = fragmented_clusters
        self.compressed_clusters = compressed_clusters
        self.messages: list[str] = messages if messages is not None else []


class CheckFailedError(ImageError):
    """The check could not complete (qemu-img: "Check failed: <strerror>").

    ``messages`` holds what QEMU printed on stderr before giving up, which a
    front end prints before its own "Check failed" line.
    """

    def __init__(self, message: str, *, errno: int | None = None,
                 hint: str | None = None, messages: list[str] | None = None) -> None:
        super().__init__(message, errno=errno, hint=hint)
        self.messages = list(messages or [])


class _Errno(Exception):
    """A negative errno return inside QEMU's code, with its error text if any."""

    def __init__(self, code: int, text: str | None = None) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text


def _alt_hex(value: int) -> str:
    """C's ``%#x``: 0x-prefixed except for zero."""
    return f"{value:#x}" if value else "0"


def _strerror(code: int) -> str:
    return os.strerror(code)


def _c_int(value: int) -> int:
    """A value as C's 32-bit ``int`` holds it (BdrvCheckResult's counters are ints)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _any_between(members: set[int], low: int, high: int) -> bool:
    """Whether any member lies in [low, high]."""
    if high - low < len(members):
        return any(value in members for value in range(low, high + 1))
    return any(low <= value <= high for value in members)


class _Counts:
    """BdrvCheckResult with its fragmentation info."""

    __slots__ = ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed",
                 "image_end_offset", "total_clusters", "allocated_clusters",
                 "fragmented_clusters", "compressed_clusters")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def copy(self) -> _Counts:
        other = _Counts()
        other.assign(self)
        return other

    def assign(self, other: _Counts) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(other, name))

    def add(self, other: _Counts, with_allocation_info: bool) -> None:
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.check_errors += other.check_errors
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        if with_allocation_info:
            for name in ("image_end_offset", "total_clusters", "allocated_clusters",
                         "fragmented_clusters", "compressed_clusters"):
                setattr(self, name, getattr(other, name))


# -- refcount entry encoding ---------------------------------------------------------

def _typecode(bits: int) -> str:
    """The array type that holds one refcount of ``bits`` bits."""
    if bits <= 8:
        return "B"
    return {16: "H", 32: "I", 64: "Q"}[bits]


def _refcount_codec(bits: int, entries: int) -> tuple[Callable[[bytes], array],
                                                     Callable[[array], bytes]]:
    """Decoder/encoder between an on-disk refcount block and an array.

    Narrow refcounts are packed from the least significant bits of each
    byte, as docs/interop/qcow2.txt lays them out.
    """
    code = _typecode(bits)
    if bits >= 8:
        swap = bits > 8 and array(code, [1]).tobytes()[0] == 1

        def decode(raw: bytes) -> array:
            table = array(code, raw)
            if swap:
                table.byteswap()
            return table

        def encode(values: array) -> bytes:
            if len(values) < entries:
                values = values + array(code, bytes(array(code).itemsize * (entries - len(values))))
            if not swap:
                return values.tobytes()
            copy = array(code, values)
            copy.byteswap()
            return copy.tobytes()

        return decode, encode

    per_byte = 8 // bits
    mask = (1 << bits) - 1
    expand = [bytes((value >> (bits * k)) & mask for k in range(per_byte)) for value in range(256)]
    shift_tables = [bytes(((value & mask) << (bits * k)) & 0xFF for value in range(256))
                    for k in range(per_byte)]

    def decode_packed(raw: bytes) -> array:
        return array("B", b"".join([expand[byte] for byte in raw]))

    def encode_packed(values: array) -> bytes:
        data = values.tobytes()
        if len(data) < entries:
            data += bytes(entries - len(data))
        packed = 0
        for k in range(per_byte):
            packed |= int.from_bytes(data[k::per_byte].translate(shift_tables[k]), "big")
        return packed.to_bytes(entries // per_byte, "big")

    return decode_packed, encode_packed


# -- the in-memory refcount table --------------------------------------------------------

class _CountedRefs:
    """QEMU's in-memory refcount table, one array per refcount block's worth.

    QEMU keeps one flat array of ``size`` entries; a repair can grow a file
    to a terabyte of holes, so only the stretches that hold a count are
    materialised here.  Everything else reads as zero, exactly as QEMU's
    zero-filled array does.
    """

    def __init__(self, code: str, itemsize: int, block_bits: int) -> None:
        self.code = code
        self.itemsize = itemsize
        self.block_bits = block_bits
        self.block_size = 1 << block_bits
        self.mask = self.block_size - 1
        self.size = 0
        self.chunks: dict[int, array] = {}
        self.keys: list[int] = []  # chunk indices, sorted

    def __len__(self) -> int:
        return self.size

    def get(self, index: int) -> int:
        chunk = self.chunks.get(index >> self.block_bits)
        return chunk[index & self.mask] if chunk is not None else 0

    def chunk(self, block: int) -> array:
        """The chunk for a block index, created (zeroed) on first use."""
        chunk = self.chunks.get(block)
        if chunk is None:
            chunk = array(self.code, bytes(self.itemsize * self.block_size))
            self.chunks[block] = chunk
            bisect.insort(self.keys, block)
        return chunk

    def set(self, index: int, value: int) -> None:
        self.chunk(index >> self.block_bits)[index & self.mask] = value

    def next_block(self, block: int) -> int | None:
        """The first materialised block index at or after ``block``."""
        position = bisect.bisect_left(self.keys, block)
        return self.keys[position] if position < len(self.keys) else None

    def block_bytes(self, block: int, start: int = 0, end: int | None = None) -> bytes:
        """Entries [start, end) of a block, in native byte order."""
        if end is None:
            end = self.block_size
        chunk = self.chunks.get(block)
        if chunk is None:
            return bytes((end - start) * self.itemsize)
        return chunk[start:end].tobytes()

    def clear(self) -> None:
        """Zero every count (the size stays)."""
        self.chunks.clear()
        self.keys.clear()


# -- the snapshot table ------------------------------------------------------------------

class _Snapshot:
    """One snapshot table entry as QEMU keeps it in memory."""

    def __init__(self, l1_table_offset: int, l1_size: int, id_str: bytes, name: bytes,
                 date_sec: int, date_nsec: int, vm_clock_nsec: int, vm_state_size: int,
                 extra_data_size: int, disk_size: int, icount: int,
                 unknown_extra_data: bytes) -> None:
        self.l1_table_offset = l1_table_offset
        self.l1_size = l1_size
        self.id_str = id_str
        self.name = name
        self.date_sec = date_sec
        self.date_nsec = date_nsec
        self.vm_clock_nsec = vm_clock_nsec
        self.vm_state_size = vm_state_size
        self.extra_data_size = extra_data_size
        self.disk_size = disk_size
        self.icount = icount
        self.unknown_extra_data = unknown_extra_data

    def label(self) -> str:
        """``%s (%s)`` of id and name: C strings end at the first NUL."""
        ident = self.id_str.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        name = self.name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        return f"{ident} ({name})"


class _Bitmap:
    """A bitmap directory entry, as bitmap_list_load keeps it."""

    def __init__(self, table_offset: int, table_size: int, flags: int,
                 granularity_bits: int, name: bytes) -> None:
        self.table_offset = table_offset
        self.table_size = table_size
        self.flags = flags
        self.granularity_bits = granularity_bits
        self.name = name


def _check_bitmap_table_entry(entry: int, cluster_size: int) -> bool:
    """check_table_entry: whether a bitmap table entry is well formed."""
    if entry & BME_TABLE_ENTRY_RESERVED_MASK:
        return False
    offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
    if offset and (entry & BME_TABLE_ENTRY_FLAG_ALL_ONES or offset % cluster_size):
        return False
    return True


# -- the refcount block cache --------------------------------------------------------------

class _RefblockCache:
    """QEMU's qcow2 metadata cache, as used for refcount blocks.

    Slot choice and eviction follow qcow2-cache.c exactly (a hashed starting
    slot, least recently used victim), because which block is written back
    when decides what an overlap check can refuse.
    """

    def __init__(self, checker: Qcow2Checker, slots: int) -> None:
        self.checker = checker
        self.size = slots
        self.offsets = [0] * slots
        self.lru = [0] * slots
        self.dirty = [False] * slots
        self.tables: list[array | None] = [None] * slots
        self.lru_counter = 0

    def find(self, offset: int) -> int | None:
        """The slot holding the table at ``offset``, if any."""
        for slot in range(self.size):
            if self.offsets[slot] == offset:
                return slot
        return None

    def get(self, offset: int, *, read: bool = True) -> int:
        checker = self.checker
        cluster_size = checker.cluster_size
        if offset % cluster_size:
            checker.signal_corruption(
                True, f"Cannot get entry from refcount block cache: Offset "
                      f"{_alt_hex(offset)} is unaligned")
            raise _Errno(errno.EIO)
        start = (offset // cluster_size * 4) % self.size
        slot = start
        victim = -1
        lowest = None
        while True:
            if self.offsets[slot] == offset:
                break
            if lowest is None or self.lru[slot] < lowest:
                lowest = self.lru[slot]
                victim = slot
            slot += 1
            if slot == self.size:
                slot = 0
            if slot == start:
                slot = -1
                break
        if slot < 0:
            slot = victim
            self.flush_slot(slot)
            self.offsets[slot] = 0
            if read:
                raw = checker.read(offset, cluster_size)
                self.tables[slot] = checker.decode_refblock(raw)
            else:
                self.tables[slot] = array(checker.refcount_code,
                                          bytes(checker.refcount_itemsize
                                                * checker.refblock_size))
            self.offsets[slot] = offset
        self.lru_counter += 1
        self.lru[slot] = self.lru_counter
        return slot

    def table(self, slot: int) -> array:
        table = self.tables[slot]
        assert table is not None
        return table

    def mark_dirty(self, slot: int) -> None:
        self.dirty[slot] = True

    def discard(self, slot: int) -> None:
        self.offsets[slot] = 0
        self.lru[slot] = 0
        self.dirty[slot] = False
        self.tables[slot] = None

    def flush_slot(self, slot: int) -> None:
        if not self.dirty[slot] or not self.offsets[slot]:
            return
        checker = self.checker
        offset = self.offsets[slot]
        checker.overlap_check_or_raise(OL_REFCOUNT_BLOCK, offset, checker.cluster_size)
        checker.write(offset, checker.encode_refblock(self.table(slot)))
        self.dirty[slot] = False

    def write_all(self) -> int:
        """Write every dirty block back; the first error (as -errno) or 0."""
        result = 0
        for slot in range(self.size):
            try:
                self.flush_slot(slot)
            except _Errno as exc:
                if result != -errno.ENOSPC:
                    result = -exc.code
        return result

    def flush(self) -> None:
        result = self.write_all()
        if result < 0:
            raise _Errno(-result)

    def empty(self) -> None:
        """qcow2_cache_empty: flush, then forget everything (unless the flush failed)."""
        self.flush()
        for slot in range(self.size):
            self.offsets[slot] = 0
            self.lru[slot] = 0
            self.dirty[slot] = False
            self.tables[slot] = None
        self.lru_counter = 0


# -- the checker ---------------------------------------------------------------------------

class Qcow2Checker:
    """One qcow2 image opened for checking, as ``qemu-img check`` opens it.

    ``writable`` is True when a repair will be asked for (``-r``).
    ``program`` is the prefix QEMU's error_report() puts before the lines it
    prints ("qemu-img" for qemu-img check); None leaves those lines to the
    front end as ReportedLine.
    """

    def __init__(self, path: str, *, writable: bool = False, program: str | None = "qemu-img",
                 file: HostFile | None = None) -> None:
        self.path = path
        self.writable = writable
        self.program = program
        self.messages: list[str] = []
        self.signaled_corruption = False
        self.unusable = False
        self.free_cluster_index = 0
        self.discards: list[list[int]] = []
        self.snapshots: list[_Snapshot] = []
        self.snapshots_offset = 0
        self.snapshots_size = 0
        self._length: int | None = None
        self._closed = False
        self._layout_version = 0
        self._overlap_key: tuple[int, ...] | None = None
        self._overlap_sets: tuple[set[int], set[int], list[int]] = (set(), set(), [])
        self.imrt = _CountedRefs("B", 1, 9)
        # Given an already open file (the engine's own node), this is a check
        # inside that open, which has done its open-time header update.
        self._owns_file = file is None
        self.file = HostFile(path, writable=writable) if file is None else file
        try:
            self._open()
        except BaseException:
            self._close_file()
            raise

    # -- opening ---------------------------------------------------------------------

    def _open(self) -> None:
        read = self._open_read
        header = unpack_fixed_header(read(0, HEADER_V3_LENGTH))
        validate_basic(header)
        if header.header_length > HEADER_V3_LENGTH:
            header.unknown_fields = read(HEADER_V3_LENGTH,
                                         header.header_length - HEADER_V3_LENGTH)
        validate_compression_type(header)
        unknown = header.incompatible_features & ~INCOMPAT_MASK
        if unknown:
            read_extensions(header, read, feature_table_only=True)
            raise UnsupportedImageError(unsupported_feature_message(header.feature_table, unknown),
                                        errno=errno.ENOTSUP)
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.extended_l2 = bool(header.incompatible_features & INCOMPAT_EXTL2)
        if self.extended_l2:
            subcluster_size = self.cluster_size // SUBCLUSTERS_PER_CLUSTER
            if subcluster_size < (1 << MIN_CLUSTER_BITS):
                raise CorruptImageError(f"Unsupported subcluster size: {subcluster_size}",
                                        errno=errno.EINVAL)
        if header.refcount_order > 6:
            raise CorruptImageError("Reference count entry width too large; may not "
                                    "exceed 64 bits", errno=errno.EINVAL)
        self.refcount_order = header.refcount_order
        self.refcount_bits = 1 << header.refcount_order
        self.refcount_max = (1 << self.refcount_bits) - 1
        self.refcount_code = _typecode(self.refcount_bits)
        self.refcount_itemsize = array(self.refcount_code).itemsize
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_size = self.cluster_size // self.l2_entry_size
        self.l2_bits = self.l2_size.bit_length() - 1
        self.refblock_bits = self.cluster_bits - (self.refcount_order - 3)
        self.refblock_size = 1 << self.refblock_bits
        self.decode_refblock, self.encode_refblock = _refcount_codec(
            self.refcount_bits, self.refblock_size)
        self.total_sectors = header.size // 512
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.cluster_offset_mask = (1 << self.csize_shift) - 1

        self.reftable_offset = header.refcount_table_offset
        self.reftable_size = header.refcount_table_clusters << (self.cluster_bits - 3)
        validate_table(header, self.reftable_offset, header.refcount_table_clusters,
                       self.cluster_size, MAX_REFTABLE_SIZE, "Reference count table")
        validate_table(header, header.l1_table_offset, header.l1_size, L1E_SIZE,
                       MAX_L1_SIZE, "Active L1 table")
        self.l1_size = header.l1_size
        self.l1_table_offset = header.l1_table_offset
        shift = self.cluster_bits + self.l2_bits
        rounded = header.size + (1 << shift) - 1
        if header.size > INT64_MAX or rounded > INT64_MAX or rounded >> shift > INT_MAX:
            raise CorruptImageError("Image is too big", errno=errno.EFBIG)
        if self.l1_size < rounded >> shift:
            raise CorruptImageError("L1 table is too small", errno=errno.EINVAL)
        self.l1_table = list(struct.unpack(f">{self.l1_size}Q",
                                           read(self.l1_table_offset, self.l1_size * L1E_SIZE)))
        if header.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
            raise UnsupportedImageError(f"Unsupported encryption method "
                                        f"{_c_int(header.crypt_method)}",
                                        errno=errno.EINVAL)
        self.cache = _RefblockCache(self, REFCOUNT_CACHE_SLOTS)
        self.reftable = list(struct.unpack(
            f">{self.reftable_size}Q",
            read(self.reftable_offset, self.reftable_size * REFTABLE_ENTRY_SIZE)))
        self._update_max_reftable_index()

        read_extensions(header, read)
        if header.incompatible_features & INCOMPAT_DATA_FILE:
            if header.data_file is None:
                raise CorruptImageError("'data-file' is required for this image",
                                        errno=errno.EINVAL)
            raise UnsupportedImageError("qcow2 images with an external data file are not "
                                        "supported", errno=errno.ENOTSUP)
        if header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
            raise CorruptImageError("data-file-raw requires a data file", errno=errno.EINVAL)
        if header.crypt_method == CRYPT_LUKS and header.crypto_header is None:
            raise CorruptImageError("Missing CRYPTO header for crypt method 2",
                                    errno=errno.EINVAL)
        if header.crypt_method != CRYPT_NONE:
            # QEMU cannot open these without a key, which qemu-img check is
            # given with --object secret; the engine has no decryption.
            raise UnsupportedImageError("Parameter 'encrypt.key-secret' is required for cipher",
                                        errno=errno.EINVAL)
        read_backing_file_name(header, read)
        self.bitmaps: list[_Bitmap] = []
        if header.bitmaps is not None:
            if self.writable:
                raise UnsupportedImageError("Images with persistent dirty bitmaps can only be "
                                            "opened read-only", errno=errno.ENOTSUP)
            self._load_bitmaps()
        # A writable open drops autoclear bits QEMU does not know.
        if self._owns_file and self.writable and header.autoclear_features & ~AUTOCLEAR_MASK:
            header.autoclear_features &= AUTOCLEAR_MASK
            try:
                self.update_header()
            except _Errno as exc:
                raise ImageError(f"Could not update qcow2 header: {_strerror(exc.code)}",
                                 errno=exc.code) from None

    def _bitmap_list(self) -> list[_Bitmap]:
        """bitmap_list_load: the validated bitmap directory; raises _Errno with QEMU's text."""
        extension = self.header.bitmaps
        assert extension is not None
        size = extension.directory_size
        if size == 0:
            raise _Errno(errno.EINVAL, "Requested bitmap directory size is zero")
        if size > 1024 * 65535:
            raise _Errno(errno.EINVAL, "Requested bitmap directory size is too big")
        try:
            directory = self.read(extension.directory_offset, size)
        except _Errno as exc:
            raise _Errno(exc.code, "Failed to read bitmap directory: "
                                   f"{_strerror(exc.code)}") from None
        bitmaps: list[_Bitmap] = []
        position = 0
        entry_size = _BITMAP_DIR_ENTRY.size
        while position < size:
            if position + entry_size > size:
                raise _Errno(errno.EINVAL, "Broken bitmap directory")
            if len(bitmaps) + 1 > extension.nb_bitmaps:
                raise _Errno(errno.EINVAL, "More bitmaps found than specified in header "
                                           "extension")
            (table_offset, table_size, flags, kind, granularity_bits, name_size,
             extra_size) = _BITMAP_DIR_ENTRY.unpack_from(directory, position)
            length = -(-(entry_size + name_size + extra_size) // 8) * 8
            if position + length > size:
                raise _Errno(errno.EINVAL, "Broken bitmap directory")
            if extra_size:
                raise _Errno(errno.EINVAL, "Bitmap extra data is not supported")
            name = directory[position + entry_size:position + entry_size + name_size]
            if not self._bitmap_entry_valid(table_offset, table_size, flags, kind,
                                            granularity_bits, name_size):
                shown = name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                raise _Errno(errno.EINVAL, f"Bitmap '{shown}' doesn't satisfy the constraints")
            bitmaps.append(_Bitmap(table_offset, table_size, flags, granularity_bits, name))
            position += length
        if len(bitmaps) != extension.nb_bitmaps:
            raise _Errno(errno.EINVAL, "Less bitmaps found than specified in header extension")
        if position != size:
            raise _Errno(errno.EINVAL, "Broken bitmap directory")
        return bitmaps

    def _bitmap_entry_valid(self, table_offset: int, table_size: int, flags: int, kind: int,
                            granularity_bits: int, name_size: int) -> bool:
        """check_dir_entry."""
        cs = self.cluster_size
        if (table_size == 0 or table_offset == 0 or table_offset % cs
                or table_size > BME_MAX_TABLE_SIZE
                or not BME_MIN_GRANULARITY_BITS <= granularity_bits <= BME_MAX_GRANULARITY_BITS
                or flags & BME_RESERVED_FLAGS or name_size > BME_MAX_NAME_SIZE
                or kind != BT_DIRTY_TRACKING_BITMAP):
            return False
        physical = table_size * cs
        if physical > BME_MAX_PHYS_SIZE:
            return False
        length = self.total_sectors * 512
        return bool(flags & BME_FLAG_IN_USE) or length <= (physical * 8) << granularity_bits

    def _bitmap_table(self, bitmap: _Bitmap) -> list[int] | None:
        """bitmap_table_load: the table, or None when an entry is malformed."""
        raw = self.read(bitmap.table_offset, bitmap.table_size * 8)
        table = list(struct.unpack(f">{bitmap.table_size}Q", raw))
        for entry in table:
            if not _check_bitmap_table_entry(entry, self.cluster_size):
                return None
        return table

    def _load_bitmaps(self) -> None:
        """qcow2_load_dirty_bitmaps on a read-only open: validate what QEMU would load."""
        try:
            bitmaps = self._bitmap_list()
        except _Errno as exc:
            raise CorruptImageError(exc.text or _strerror(exc.code), errno=exc.code) from None
        length = self.total_sectors * 512
        seen: set[bytes] = set()
        for bitmap in bitmaps:
            name = bitmap.name.split(b"\0", 1)[0]
            shown = name.decode("utf-8", "surrogateescape")
            if name in seen:
                raise CorruptImageError(f"Bitmap already exists: {shown}", errno=errno.EINVAL)
            seen.add(name)
            if bitmap.flags & BME_FLAG_IN_USE:
                continue  # its data is not loaded
            try:
                table = self._bitmap_table(bitmap)
            except _Errno as exc:
                table, code = None, exc.code
            else:
                code = errno.EINVAL
            if table is None:
                raise CorruptImageError(
                    f"Could not read bitmap_table table from image for bitmap '{shown}': "
                    f"{_strerror(code)}", errno=code)
            # The table must be exactly as long as the serialised bitmap.
            words = (((length - 1) >> bitmap.granularity_bits) // 64 + 1) if length else 0
            needed = -(-(words * 8) // self.cluster_size)
            if needed != bitmap.table_size or needed > BME_MAX_TABLE_SIZE:
                raise CorruptImageError(f"Could not read bitmap '{shown}' from image: "
                                        f"{_strerror(errno.EINVAL)}", errno=errno.EINVAL)
        self.bitmaps = bitmaps

    def check_bitmaps_refcounts(self, res: _Counts) -> None:
        """qcow2_check_bitmaps_refcounts."""
        extension = self.header.bitmaps
        if extension is None or not extension.nb_bitmaps:
            return
        self.inc_refcounts(res, extension.directory_offset, extension.directory_size)
        try:
            bitmaps = self._bitmap_list()
        except _Errno:
            res.corruptions += 1
            raise _Errno(errno.EINVAL) from None
        for bitmap in bitmaps:
            self.inc_refcounts(res, bitmap.table_offset, bitmap.table_size * 8)
            try:
                table = self._bitmap_table(bitmap)
            except _Errno:
                table = None
            if table is None:
                res.corruptions += 1
                raise _Errno(errno.EINVAL)
            for entry in table:
                if not _check_bitmap_table_entry(entry, self.cluster_size):
                    res.corruptions += 1
                    continue
                offset = entry & BME_TABLE_ENTRY_OFFSET_MASK
                if offset:
                    self.inc_refcounts(res, offset, self.cluster_size)

    def _open_read(self, offset: int, length: int) -> bytes:
        try:
            return self.read(offset, length)
        except _Errno as exc:
            raise ImageError(_strerror(exc.code), errno=exc.code) from None

    # -- the image file ------------------------------------------------------------------

    def file_length(self) -> int:
        """bdrv_getlength of the file: its size rounded up to a sector."""
        if self._length is None:
            self._length = self.file.length()
        return self._length

    def read(self, offset: int, length: int) -> bytes:
        """bdrv_pread: past the end of the file reads as zeroes."""
        if length == 0:
            return b""
        if (offset < 0 or length < 0 or length > MAX_REQUEST_BYTES
                or offset > MAX_REQUEST_LENGTH - length):
            raise _Errno(errno.EIO)
        try:
            return self.file.pread(offset, length)
        except ImageError as exc:
            raise _Errno(exc.errno or errno.EIO) from None

    def read_table(self, offset: int, length: int) -> bytes:
        """A table read with bdrv_pread, minus its trailing zeroes.

        What lies past the end of the file reads as zeroes, and a zero entry
        is skipped by every walker, so only the stored part is fetched.
        """
        if length and (offset < 0 or length > MAX_REQUEST_BYTES
                       or offset > MAX_REQUEST_LENGTH - length):
            raise _Errno(errno.EIO)
        stored = min(length, max(0, self.file_length() - offset))
        return self.read(offset, stored).rstrip(b"\0") if stored else b""

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset > MAX_REQUEST_LENGTH - len(data):
            raise _Errno(errno.EIO)
        self._length = None
        try:
            self.file.pwrite(offset, data)
        except ImageError as exc:
            raise _Errno(exc.errno or errno.EIO) from None

    def truncate(self, size: int) -> None:
        """bdrv_truncate of the file node; raises _Errno carrying QEMU's error text."""
        if size > MAX_REQUEST_LENGTH:
            raise _Errno(errno.EIO, f"offset({size}) exceeds maximum({MAX_REQUEST_LENGTH})")
        self._length = None
        try:
            self.file.truncate(size)
        except ImageError as exc:
            raise _Errno(exc.errno or errno.EIO, str(exc)) from None

    def say(self, line: str) -> None:
        """A line QEMU prints with fprintf(stderr, ...)."""
        self.messages.append(line)

    def report(self, text: str) -> None:
        """Lines QEMU prints with error_report(): the program name first."""
        lines = text.split("\n")
        if self.program is None:
            from ..errors import ReportedLine

            self.messages.append(ReportedLine(lines[0]))
        else:
            self.messages.append(f"{self.program}: {lines[0]}")
        self.messages.extend(line for line in lines[1:] if line)

    # -- header and corruption ------------------------------------------------------------

    def _update_max_reftable_index(self) -> None:
        index = self.reftable_size - 1
        while index > 0 and not self.reftable[index] & REFT_OFFSET_MASK:
            index -= 1
        self.max_reftable_index = max(index, 0)

    def update_header(self) -> None:
        """qcow2_update_header: rewrite the first cluster from the in-memory state."""
        header: Header = self.header
        header.size = self.total_sectors * 512
        header.l1_size = self.l1_size
        header.l1_table_offset = self.l1_table_offset
        header.refcount_table_offset = self.reftable_offset
        header.refcount_table_clusters = self.reftable_size >> (self.cluster_bits - 3)
        header.nb_snapshots = len(self.snapshots)
        header.snapshots_offset = self.snapshots_offset
        try:
            cluster = pack_header_cluster(header)
        except OSError as exc:
            raise _Errno(exc.errno or errno.ENOSPC) from None
        self.write(0, cluster)

    def signal_corruption(self, fatal: bool, message: str) -> None:
        fatal = fatal and self.writable
        if self.signaled_corruption and (
                not fatal or self.header.incompatible_features & INCOMPAT_CORRUPT):
            return
        if fatal:
            self.say(f"qcow2: Marking image as corrupt: {message}; further corruption "
                     "events will be suppressed")
            self.header.incompatible_features |= INCOMPAT_CORRUPT
            try:
                self.update_header()
            except _Errno:
                pass
            self.unusable = True
        else:
            self.say(f"qcow2: Image is corrupt: {message}; further non-fatal corruption "
                     "events will be suppressed")
        self.signaled_corruption = True

    def metadata_overlap(self, ignore: int, offset: int, size: int) -> int:
        """qcow2_check_metadata_overlap with qemu-img's overlap-check=cached."""
        check = OL_CACHED & ~ignore
        if not size:
            return 0
        cs = self.cluster_size
        if check & OL_MAIN_HEADER and offset < cs:
            return OL_MAIN_HEADER
        size = -(-((offset & (cs - 1)) + size) // cs) * cs
        offset &= ~(cs - 1)

        # ranges_overlap() on uint64_t: an empty range ends just before its
        # start, wrapping round to cover everything when it starts at 0.
        last = (offset + size - 1) & UINT64_MASK

        def overlaps(start: int, length: int) -> bool:
            start &= UINT64_MASK
            return not ((start + length - 1) & UINT64_MASK < offset or last < start)

        if check & OL_ACTIVE_L1 and self.l1_size:
            if overlaps(self.l1_table_offset, self.l1_size * L1E_SIZE):
                return OL_ACTIVE_L1
        if check & OL_REFCOUNT_TABLE and self.reftable_size:
            if overlaps(self.reftable_offset, self.reftable_size * REFTABLE_ENTRY_SIZE):
                return OL_REFCOUNT_TABLE
        if check & OL_SNAPSHOT_TABLE and self.snapshots_size:
            if overlaps(self.snapshots_offset, self.snapshots_size):
                return OL_SNAPSHOT_TABLE
        if check & OL_INACTIVE_L1:
            for snapshot in self.snapshots:
                if snapshot.l1_size and overlaps(snapshot.l1_table_offset,
                                                 snapshot.l1_size * L1E_SIZE):
                    return OL_INACTIVE_L1
        first_cluster = offset >> self.cluster_bits
        last_cluster = last >> self.cluster_bits
        l2_clusters, block_clusters, stray_blocks = self._overlap_index()
        if check & OL_ACTIVE_L2 and _any_between(l2_clusters, first_cluster, last_cluster):
            return OL_ACTIVE_L2
        if check & OL_REFCOUNT_BLOCK and self.reftable_size:
            if _any_between(block_clusters, first_cluster, last_cluster) \
                    or any(overlaps(block, cs) for block in stray_blocks):
                return OL_REFCOUNT_BLOCK
        if check & OL_BITMAP_DIRECTORY and self.header.autoclear_features & AUTOCLEAR_BITMAPS:
            bitmaps = self.header.bitmaps
            if bitmaps is None:
                if overlaps(0, 0):
                    return OL_BITMAP_DIRECTORY
            elif overlaps(bitmaps.directory_offset, bitmaps.directory_size):
                return OL_BITMAP_DIRECTORY
        return 0

    def _overlap_index(self) -> tuple[set[int], set[int], list[int]]:
        """The clusters the active L2 tables and the refcount blocks occupy.

        A table at a 512-byte aligned offset touches two clusters; a block
        whose end would pass 2^64 is kept apart, for QEMU's wrapping test.
        """
        key = (self.max_reftable_index, self._layout_version)
        if self._overlap_key == key:
            return self._overlap_sets
        bits = self.cluster_bits
        cs = self.cluster_size
        l2_clusters: set[int] = set()
        for entry in self.l1_table:
            l2_offset = entry & L1E_OFFSET_MASK
            if l2_offset:
                l2_clusters.add(l2_offset >> bits)
                l2_clusters.add((l2_offset + cs - 1) >> bits)
        block_clusters: set[int] = set()
        stray: list[int] = []
        if self.reftable_size:
            for index in range(self.max_reftable_index + 1):
                block = self.reftable[index] & REFT_OFFSET_MASK
                if not block:
                    continue
                if block + cs - 1 > UINT64_MASK:
                    stray.append(block)
                else:
                    block_clusters.add(block >> bits)
                    block_clusters.add((block + cs - 1) >> bits)
        self._overlap_key = key
        self._overlap_sets = (l2_clusters, block_clusters, stray)
        return self._overlap_sets

    def layout_changed(self) -> None:
        """Metadata moved: the overlap index must be rebuilt."""
        self._layout_version += 1

    def overlap_check(self, ignore: int, offset: int, size: int) -> int:
        """qcow2_pre_write_overlap_check: 0, or -EIO after signalling corruption."""
        kind = self.metadata_overlap(ignore, offset, size)
        if kind:
            self.signal_corruption(True, "Preventing invalid write on metadata (overlaps "
                                         f"with {OVERLAP_NAMES[kind]})")
            return -errno.EIO
        return 0

    def overlap_check_or_raise(self, ignore: int, offset: int, size: int) -> None:
        ret = self.overlap_check(ignore, offset, size)
        if ret < 0:
            raise _Errno(-ret)

    def flush_caches(self) -> None:
        """qcow2_flush_caches (the L2 cache is never dirty while checking)."""
        if not self.header.incompatible_features & INCOMPAT_DIRTY:
            self.cache.flush()  # a dirty image may have stale refcounts on disk

    def mark_clean(self) -> None:
        if self.header.incompatible_features & INCOMPAT_DIRTY:
            self.header.incompatible_features &= ~INCOMPAT_DIRTY
            self.flush_caches()
            self.update_header()

    def mark_consistent(self) -> None:
        if self.header.incompatible_features & INCOMPAT_CORRUPT:
            self.flush_caches()
            self.header.incompatible_features &= ~INCOMPAT_CORRUPT
            self.update_header()

    # -- on-disk refcounts ------------------------------------------------------------------

    def get_refcount(self, cluster_index: int) -> int:
        """qcow2_get_refcount; raises _Errno."""
        table_index = cluster_index >> self.refblock_bits
        if table_index >= self.reftable_size:
            return 0
        block_offset = self.reftable[table_index] & REFT_OFFSET_MASK
        if not block_offset:
            return 0
        if block_offset & (self.cluster_size - 1):
            self.signal_corruption(True, f"Refblock offset {_alt_hex(block_offset)} unaligned "
                                         f"(reftable index: {_alt_hex(table_index)})")
            raise _Errno(errno.EIO)
        slot = self.cache.get(block_offset)
        return self.cache.table(slot)[cluster_index & (self.refblock_size - 1)]

    def _queue_discard(self, offset: int, length: int) -> None:
        queue_discard(self.discards, offset, length)

    def _process_discards(self, success: bool) -> None:
        discards, self.discards = self.discards, []
        if success:
            for offset, length in discards:
                self._length = None
                self.file.discard(offset, length)

    def update_refcount(self, offset: int, length: int, addend: int, decrease: bool,
                        discard_type: int) -> None:
        """update_refcount: add or take ``addend`` to/from every cluster touched."""
        if length < 0:
            raise _Errno(errno.EINVAL)
        if length == 0:
            return
        cs = self.cluster_size
        start = offset & ~(cs - 1)
        last = (offset + length - 1) & ~(cs - 1)
        cluster_offset = start
        old_table_index = -1
        slot = -1
        failure: _Errno | None = None
        try:
            while cluster_offset <= last:
                cluster_index = cluster_offset >> self.cluster_bits
                table_index = cluster_index >> self.refblock_bits
                if table_index != old_table_index:
                    try:
                        slot = self.alloc_refcount_block(cluster_index)
                    except _Errno as exc:
                        if exc.code == errno.EAGAIN \
                                and self.free_cluster_index > start >> self.cluster_bits:
                            self.free_cluster_index = start >> self.cluster_bits
                        raise
                old_table_index = table_index
                self.cache.mark_dirty(slot)
                table = self.cache.table(slot)
                index = cluster_index & (self.refblock_size - 1)
                refcount = table[index]
                if decrease:
                    if refcount < addend:
                        raise _Errno(errno.EINVAL)
                    refcount -= addend
                else:
                    if refcount + addend > self.refcount_max:
                        raise _Errno(errno.EINVAL)
                    refcount += addend
                if refcount == 0 and cluster_index < self.free_cluster_index:
                    self.free_cluster_index = cluster_index
                table[index] = refcount
                if refcount == 0:
                    cached = self.cache.find(offset)
                    if cached is not None:
                        old_table_index = -1
                        self.cache.discard(cached)
                    if DISCARD_PASSTHROUGH[discard_type]:
                        self._queue_discard(cluster_offset, cs)
                cluster_offset += cs
        except _Errno as exc:
            failure = exc
        self._process_discards(failure is None)
        if failure is not None:
            try:
                self.update_refcount(offset, cluster_offset - offset, addend, not decrease,
                                     DISCARD_NEVER)
            except _Errno:
                pass
            raise failure

    def free_clusters(self, offset: int, size: int, discard_type: int) -> None:
        try:
            self.update_refcount(offset, size, 1, True, discard_type)
        except _Errno as exc:
            self.say(f"qcow2_free_clusters failed: {_strerror(exc.code)}")

    def alloc_clusters_noref(self, size: int, max_offset: int) -> int:
        nb_clusters = -(-size // self.cluster_size)
        found = 0
        while found < nb_clusters:
            index = self.free_cluster_index
            self.free_cluster_index += 1
            if self.get_refcount(index):
                found = 0
            else:
                found += 1
        if self.free_cluster_index > 0 \
                and self.free_cluster_index - 1 > max_offset >> self.cluster_bits:
            raise _Errno(errno.EFBIG)
        return (self.free_cluster_index - nb_clusters) << self.cluster_bits

    def alloc_clusters(self, size: int) -> int:
        while True:
            offset = self.alloc_clusters_noref(size, MAX_CLUSTER_OFFSET)
            try:
                self.update_refcount(offset, size, 1, False, DISCARD_NEVER)
            except _Errno as exc:
                if exc.code == errno.EAGAIN:
                    continue
                raise
            return offset

    def _same_refblock(self, offset_a: int, offset_b: int) -> bool:
        shift = self.cluster_bits + self.refblock_bits
        return offset_a >> shift == offset_b >> shift

    def alloc_refcount_block(self, cluster_index: int) -> int:
        """The cache slot of the block covering ``cluster_index``, allocating it if needed.

        After placing new refcount metadata it raises EAGAIN, so that the
        caller searches for free clusters again.
        """
        cs = self.cluster_size
        # QEMU holds this index in an unsigned int: it wraps at 2^32.
        table_index = (cluster_index >> self.refblock_bits) & 0xFFFFFFFF
        if table_index < self.reftable_size:
            block_offset = self.reftable[table_index] & REFT_OFFSET_MASK
            if block_offset:
                if block_offset & (cs - 1):
                    self.signal_corruption(
                        True, f"Refblock offset {_alt_hex(block_offset)} unaligned "
                              f"(reftable index: {_alt_hex(table_index)})")
                    raise _Errno(errno.EIO)
                return self.cache.get(block_offset)

        new_block = self.alloc_clusters_noref(cs, INT64_MAX)
        if new_block == 0:
            self.signal_corruption(True, "Preventing invalid allocation of refcount block "
                                         "at offset 0")
            raise _Errno(errno.EIO)
        if self._same_refblock(new_block, cluster_index << self.cluster_bits):
            slot = self.cache.get(new_block, read=False)
            self.cache.table(slot)[(new_block >> self.cluster_bits)
                                   & (self.refblock_size - 1)] = 1
        else:
            self.update_refcount(new_block, cs, 1, False, DISCARD_NEVER)
            self.cache.flush()
            slot = self.cache.get(new_block, read=False)
        self.cache.mark_dirty(slot)
        self.cache.flush()

        if table_index < self.reftable_size:
            self.write(self.reftable_offset + table_index * REFTABLE_ENTRY_SIZE,
                       struct.pack(">Q", new_block))
            self.reftable[table_index] = new_block
            self.max_reftable_index = max(self.max_reftable_index, table_index)
            self.layout_changed()
            raise _Errno(errno.EAGAIN)

        blocks_used = -(-max(cluster_index + 1, (new_block >> self.cluster_bits) + 1)
                        // self.refblock_size)
        self.refcount_area(blocks_used * self.refblock_size * cs, 0, False, table_index,
                           new_block)
        self.cache.get(new_block)
        raise _Errno(errno.EAGAIN)

    def refcount_area(self, start_offset: int, additional_clusters: int, exact_size: bool,
                      new_block_index: int, new_block_offset: int) -> int:
        """qcow2_refcount_area: a new self-describing table and blocks at ``start_offset``."""
        cs = self.cluster_size
        try:
            area = RefcountAreaLayout(start_offset, additional_clusters, exact_size, cs,
                                      self.refcount_order, self.reftable,
                                      self.max_reftable_index, new_block_index,
                                      new_block_offset)
        except ImageError as error:
            raise _Errno(error.errno or errno.EFBIG) from None
        new_table = list(area.table)        # the checker keeps its table as a list
        table_offset, table_size = area.table_offset, area.table_size
        table_clusters, end_offset = area.table_clusters, area.end_offset

        block_offset = start_offset
        for i in range(area.area_index, area.total_blocks):
            if new_table[i]:
                slot = self.cache.get(new_table[i])
            else:
                slot = self.cache.get(block_offset, read=False)
                self.cache.mark_dirty(slot)
                new_table[i] = block_offset
                block_offset += cs
            own = area.self_references(i, self.refblock_size, cs, start_offset)
            if own:
                table = self.cache.table(slot)
                for k in own:
                    table[k] = 1
                self.cache.mark_dirty(slot)
        self.cache.flush()
        self.write(table_offset, struct.pack(f">{table_size}Q", *new_table))
        self.write(OFFSET_REFCOUNT_TABLE, struct.pack(">QI", table_offset, table_clusters))
        old_offset, old_size = self.reftable_offset, self.reftable_size
        self.reftable = new_table
        self.reftable_size = table_size
        self.reftable_offset = table_offset
        self._update_max_reftable_index()
        self.layout_changed()
        self.free_clusters(old_offset, old_size * REFTABLE_ENTRY_SIZE, DISCARD_OTHER)
        return end_offset

    # -- the in-memory refcount table ----------------------------------------------------------

    def _imrt_grow(self, res: _Counts | None, entries: int) -> None:
        """realloc_refcount_array: room for ``entries`` counts, or ENOMEM."""
        if entries <= self.imrt.size:
            return
        if entries * self.refcount_bits // 8 > MAX_IMRT_BYTES:
            if res is not None:
                res.check_errors += 1
            raise _Errno(errno.ENOMEM)
        self.imrt.size = entries

    def inc_refcounts(self, res: _Counts, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt: count one more reference to a byte range."""
        if size <= 0:
            return
        cs = self.cluster_size
        signed_offset = offset - (1 << 64) if offset > INT64_MAX else offset
        if signed_offset + size - self.file_length() >= cs:
            self.say("ERROR: counting reference for region exceeding the end of the file by "
                     f"one cluster or more: offset 0x{offset:x} size 0x{size:x}")
            res.corruptions += 1
            return
        imrt = self.imrt
        first = offset >> self.cluster_bits
        last = ((offset + size - 1) & UINT64_MASK) >> self.cluster_bits
        if last >= imrt.size:
            self._imrt_grow(res, last + 1)
        limit = self.refcount_max
        block_bits = imrt.block_bits
        mask = imrt.mask
        for index in range(first, last + 1):
            chunk = imrt.chunk(index >> block_bits)
            refcount = chunk[index & mask]
            if refcount == limit:
                self.say(f"ERROR: overflow cluster offset=0x{index << self.cluster_bits:x}")
                self.say("Use qemu-img amend to increase the refcount entry width or qemu-img "
                         "convert to create a clean copy if the image cannot be opened for "
                         "writing")
                res.corruptions += 1
                continue
            chunk[index & mask] = refcount + 1

    # -- walking the mapping ----------------------------------------------------------------------

    def _fix_l2_entry_by_zero(self, res: _Counts, l2_offset: int, entries: list[int],
                              l2_index: int, active: bool) -> tuple[int, bool]:
        """Make a misaligned preallocated entry a plain zero cluster.

        Returns (0 or -errno, whether an overlap check refused the write).
        """
        if self.extended_l2:
            base = l2_index * 2
            bitmap = entries[base + 1]
            bitmap |= bitmap << 32
            bitmap &= L2_BITMAP_ALL_ZEROES
            entries[base + 1] = bitmap
            entries[base] = 0
            raw = struct.pack(">QQ", 0, bitmap)
        else:
            entries[l2_index] = OFLAG_ZERO
            raw = struct.pack(">Q", OFLAG_ZERO)
        entry_offset = l2_offset + l2_index * self.l2_entry_size
        ret = self.overlap_check(OL_ACTIVE_L2 if active else OL_INACTIVE_L2, entry_offset,
                                 self.l2_entry_size)
        if ret < 0:
            self.say("ERROR: Overlap check failed")
            res.check_errors += 1
            return ret, True
        try:
            self.write(entry_offset, raw)
        except _Errno as exc:
            self.say(f"ERROR: Failed to overwrite L2 table entry: {_strerror(exc.code)}")
            res.check_errors += 1
            return -exc.code, False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return 0, False

    def check_refcounts_l2(self, res: _Counts, l2_offset: int, frag_info: bool, fix: int,
                           active: bool) -> None:
        cs = self.cluster_size
        try:
            raw = self.read_table(l2_offset, cs)
        except _Errno:
            self.say("ERROR: I/O error in check_refcounts_l2")
            res.check_errors += 1
            raise
        extended = self.extended_l2
        step = 2 if extended else 1
        words = -(-len(raw) // (8 * step)) * step
        entries = list(struct.unpack(f">{words}Q", raw + bytes(8 * words - len(raw))))
        next_contiguous = 0
        inc = self.inc_refcounts
        for i in range(words // step):
            entry = entries[i * step]
            bitmap = entries[i * step + 1] if extended else 0
            if not entry and not bitmap:
                continue
            if entry & OFLAG_COMPRESSED:
                if entry & OFLAG_COPIED:
                    self.say(f"ERROR: coffset=0x{entry & self.cluster_offset_mask:x}: copied "
                             "flag must never be set for compressed clusters")
                    entry &= ~OFLAG_COPIED
                    res.corruptions += 1
                if bitmap:
                    self.say(f"ERROR compressed cluster {i} with non-zero subcluster "
                             f"allocation bitmap, entry=0x{entry:x}")
                    res.corruptions += 1
                    continue
                coffset = entry & self.cluster_offset_mask
                sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
                inc(res, coffset, sectors * COMPRESSED_SECTOR_SIZE
                    - (coffset & (COMPRESSED_SECTOR_SIZE - 1)))
                if frag_info:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            if entry & L2E_STD_RESERVED_MASK:
                self.say(f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            offset = entry & L2E_OFFSET_MASK
            if entry & OFLAG_ZERO and not extended and not offset:
                continue  # a plain zero cluster
            if not offset:
                if bitmap & L2_BITMAP_ALL_ALLOC:
                    res.corruptions += 1
                    self.say("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                continue
            # A normal cluster, or a preallocated zero cluster.
            if (bitmap >> 32) & bitmap:
                res.corruptions += 1
                self.say(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                         "allocation bitmap")
            if offset & (cs - 1):
                res.corruptions += 1
                if extended:
                    contains_data = bool(bitmap & L2_BITMAP_ALL_ALLOC)
                else:
                    contains_data = not entry & OFLAG_ZERO
                if not contains_data:
                    repairing = bool(fix & FIX_ERRORS)
                    self.say(f"{'Repairing' if repairing else 'ERROR'} offset={offset:x}: "
                             "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                    if repairing:
                        ret, overlap = self._fix_l2_entry_by_zero(res, l2_offset, entries, i,
                                                                  active)
                        if overlap:
                            raise _Errno(-ret)
                        if ret == 0:
                            continue
                else:
                    self.say(f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                             "L2 entry corrupted.")
            if frag_info:
                res.allocated_clusters += 1
                if next_contiguous and offset != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = offset + cs
            inc(res, offset, cs)

    def check_refcounts_l1(self, res: _Counts, l1_offset: int, l1_size: int, frag_info: bool,
                           fix: int, active: bool) -> None:
        if not l1_size:
            return
        self.inc_refcounts(res, l1_offset, l1_size * L1E_SIZE)
        try:
            raw = self.read_table(l1_offset, l1_size * L1E_SIZE)
        except _Errno:
            self.say("ERROR: I/O error in check_refcounts_l1")
            res.check_errors += 1
            raise
        cs = self.cluster_size
        raw += bytes(-len(raw) % 8)
        for entry in struct.unpack(f">{len(raw) // 8}Q", raw):
            if not entry:
                continue
            if entry & L1E_RESERVED_MASK:
                self.say(f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            self.inc_refcounts(res, l2_offset, cs)
            if l2_offset & (cs - 1):
                self.say(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; "
                         "L1 entry corrupted")
                res.corruptions += 1
            self.check_refcounts_l2(res, l2_offset, frag_info, fix, active)

    def check_refblocks(self, res: _Counts, fix: int, rebuild: list[bool]) -> None:
        cs = self.cluster_size
        for i in range(self.reftable_size):
            entry = self.reftable[i]
            offset = entry & REFT_OFFSET_MASK
            cluster = offset >> self.cluster_bits
            if entry & REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild[0] = True
                continue
            if offset & (cs - 1):
                self.say(f"ERROR refcount block {i} is not cluster aligned; refcount table "
                         "entry corrupted")
                res.corruptions += 1
                rebuild[0] = True
                continue
            if cluster >= self.imrt.size:
                res.corruptions += 1
                repairing = bool(fix & FIX_ERRORS)
                self.say(f"{'Repairing' if repairing else 'ERROR'} refcount block {i} is "
                         "outside image")
                if repairing:
                    code = self._grow_for_refblock(res, offset, cluster)
                    if code == 0:
                        continue
                    rebuild[0] = True
                    self.say(f"ERROR could not resize image: {_strerror(code)}")
                continue
            if offset:
                self.inc_refcounts(res, offset, cs)
                if self.imrt.get(cluster) != 1:
                    self.say(f"ERROR refcount block {i} refcount={self.imrt.get(cluster)}")
                    res.corruptions += 1
                    rebuild[0] = True

    def _grow_for_refblock(self, res: _Counts, offset: int, cluster: int) -> int:
        """Extend the file so a refcount block past its end exists; 0 or an errno."""
        cs = self.cluster_size
        if offset > INT64_MAX - cs:
            return errno.EINVAL
        try:
            self.truncate(offset + cs)
        except _Errno as exc:
            if exc.text:
                self.report(exc.text)
            return exc.code
        new_clusters = -(-self.file_length() // cs)
        self._imrt_grow(res, new_clusters)
        if cluster >= self.imrt.size:
            return errno.EINVAL
        res.corruptions -= 1
        res.corruptions_fixed += 1
        self.inc_refcounts(res, offset, cs)
        return 0

    def calculate_refcounts(self, res: _Counts, fix: int, rebuild: list[bool]) -> None:
        cs = self.cluster_size
        self.inc_refcounts(res, 0, cs)
        self.check_refcounts_l1(res, self.l1_table_offset, self.l1_size, True, fix, True)
        for snapshot in self.snapshots:
            if snapshot.l1_table_offset & (cs - 1):
                self.say(f"ERROR snapshot {snapshot.label()} "
                         f"l1_offset={_alt_hex(snapshot.l1_table_offset)}: L1 table is not "
                         "cluster aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if snapshot.l1_size > MAX_L1_SIZE // L1E_SIZE:
                self.say(f"ERROR snapshot {snapshot.label()} "
                         f"l1_size={_alt_hex(snapshot.l1_size)}: L1 table is too large; "
                         "snapshot table entry corrupted")
                res.corruptions += 1
                continue
            self.check_refcounts_l1(res, snapshot.l1_table_offset, snapshot.l1_size, False,
                                    fix, False)
        self.inc_refcounts(res, self.snapshots_offset, self.snapshots_size)
        self.inc_refcounts(res, self.reftable_offset, self.reftable_size * REFTABLE_ENTRY_SIZE)
        self.check_bitmaps_refcounts(res)
        self.check_refblocks(res, fix, rebuild)

    # -- comparing ----------------------------------------------------------------------------------

    def _disk_refcounts(self, table_index: int) -> array | None:
        """The refcounts a whole block holds, or None where looking them up fails."""
        if table_index >= self.reftable_size:
            return array(self.refcount_code)
        offset = self.reftable[table_index] & REFT_OFFSET_MASK
        if not offset:
            return array(self.refcount_code)
        if offset & (self.cluster_size - 1):
            return None
        try:
            slot = self.cache.get(offset)
        except _Errno:
            return None
        return self.cache.table(slot)

    def compare_refcounts(self, res: _Counts, fix: int, rebuild: list[bool]) -> int:
        """Compare the counted references with the stored refcounts; the highest cluster in use.

        Whole refcount blocks are compared at once; only where they differ
        (or cannot be read) is QEMU's cluster-by-cluster walk repeated.  A
        stretch with neither a count nor a refcount block is all zeroes on
        both sides and is skipped.
        """
        imrt = self.imrt
        total = imrt.size
        per_block = self.refblock_size
        blocks = set(imrt.keys)
        last_block = (total - 1) >> self.refblock_bits if total else -1
        for table_index in range(min(self.reftable_size, last_block + 1)):
            if self.reftable[table_index] & REFT_OFFSET_MASK:
                blocks.add(table_index)
        highest = 0
        itemsize = self.refcount_itemsize
        for table_index in sorted(blocks):
            start = table_index << self.refblock_bits
            if start >= total:
                break
            end = min(total, start + per_block)
            stored = self._disk_refcounts(table_index)
            if stored is not None:
                counted = imrt.block_bytes(table_index, 0, end - start)
                on_disk = stored[:end - start].tobytes()
                if len(on_disk) < len(counted):
                    on_disk += bytes(len(counted) - len(on_disk))
                if counted == on_disk:
                    used = len(counted.rstrip(b"\0"))
                    if used:
                        highest = start + (used - 1) // itemsize
                    continue
            for cluster in range(start, end):
                highest = self._compare_one(res, fix, rebuild, cluster, highest)
        return highest

    def _compare_one(self, res: _Counts, fix: int, rebuild: list[bool], cluster: int,
                     highest: int) -> int:
        try:
            stored = self.get_refcount(cluster)
        except _Errno as exc:
            self.say(f"Can't get refcount for cluster {cluster}: {_strerror(exc.code)}")
            res.check_errors += 1
            return highest
        counted = self.imrt.get(cluster)
        if stored or counted:
            highest = cluster
        if stored == counted:
            return highest
        fixing = None
        if stored == 0:
            rebuild[0] = True
        elif stored > counted and fix & FIX_LEAKS:
            fixing = "leaks_fixed"
        elif stored < counted and fix & FIX_ERRORS:
            fixing = "corruptions_fixed"
        if fixing:
            word = "Repairing"
        elif stored < counted:
            word = "ERROR"
        else:
            word = "Leaked"
        self.say(f"{word} cluster {cluster} refcount={stored} reference={counted}")
        if fixing:
            try:
                self.update_refcount(cluster << self.cluster_bits, 1, abs(stored - counted),
                                     stored > counted, DISCARD_ALWAYS)
            except _Errno:
                pass
            else:
                setattr(res, fixing, getattr(res, fixing) + 1)
                return highest
        if stored < counted:
            res.corruptions += 1
        else:
            res.leaks += 1
        return highest

    # -- OFLAG_COPIED --------------------------------------------------------------------------------

    def check_oflag_copied(self, res: _Counts, fix: int) -> None:
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        word = "Repairing" if repair else "ERROR"
        cs = self.cluster_size
        extended = self.extended_l2
        step = 2 if extended else 1
        for i in range(self.l1_size):
            l1_entry = self.l1_table[i]
            l2_offset = l1_entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = self.get_refcount(l2_offset >> self.cluster_bits)
            except _Errno:
                continue  # already reported by the comparison
            if (refcount == 1) != bool(l1_entry & OFLAG_COPIED):
                res.corruptions += 1
                self.say(f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} "
                         f"refcount={refcount}")
                if repair:
                    self.l1_table[i] = (l1_entry | OFLAG_COPIED if refcount == 1
                                        else l1_entry & ~OFLAG_COPIED)
                    try:
                        self._write_l1_entry(i)
                    except _Errno:
                        res.check_errors += 1
                        raise
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            try:
                raw = self.read_table(l2_offset, cs)
            except _Errno as exc:
                self.say(f"ERROR: Could not read L2 table: {_strerror(exc.code)}")
                res.check_errors += 1
                raise
            words = -(-len(raw) // (8 * step)) * step
            entries = list(struct.unpack(f">{cs // 8}Q", raw + bytes(cs - len(raw))))
            dirty = 0
            for j in range(words // step):
                entry = entries[j * step]
                if entry & OFLAG_COMPRESSED:
                    continue
                data_offset = entry & L2E_OFFSET_MASK
                if not data_offset:
                    continue  # unallocated, or a plain zero cluster
                try:
                    refcount = self.get_refcount(data_offset >> self.cluster_bits)
                except _Errno:
                    continue
                if (refcount == 1) != bool(entry & OFLAG_COPIED):
                    res.corruptions += 1
                    self.say(f"{word} OFLAG_COPIED data cluster: l2_entry={entry:x} "
                             f"refcount={refcount}")
                    if repair:
                        entries[j * step] = (entry | OFLAG_COPIED if refcount == 1
                                             else entry & ~OFLAG_COPIED)
                        dirty += 1
            if dirty:
                ret = self.overlap_check(OL_ACTIVE_L2, l2_offset, cs)
                if ret < 0:
                    self.say("ERROR: Could not write L2 table; metadata overlap check failed: "
                             f"{_strerror(-ret)}")
                    res.check_errors += 1
                    raise _Errno(-ret)
                try:
                    self.write(l2_offset, struct.pack(f">{cs // 8}Q", *entries))
                except _Errno as exc:
                    self.say(f"ERROR: Could not write L2 table: {_strerror(exc.code)}")
                    res.check_errors += 1
                    raise
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    def _write_l1_entry(self, index: int) -> None:
        offset = self.l1_table_offset + L1E_SIZE * index
        self.overlap_check_or_raise(OL_ACTIVE_L1, offset, L1E_SIZE)
        self.write(offset, struct.pack(">Q", self.l1_table[index]))

    # -- rebuilding the refcount structure ---------------------------------------------------------

    def _alloc_clusters_imrt(self, count: int, first_free: list[int]) -> int:
        """Take ``count`` contiguous clusters in the in-memory table; their offset."""
        imrt = self.imrt
        block_bits = imrt.block_bits
        cluster = first_free[0]
        first_gap = True
        contiguous = 0
        size = imrt.size
        while cluster < size and contiguous < count:
            chunk = imrt.chunks.get(cluster >> block_bits)
            if chunk is None:
                # A stretch without counts is free all the way through.
                run = min(((cluster >> block_bits) + 1) << block_bits, size) - cluster
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
                take = min(run, count - contiguous)
                contiguous += take
                cluster += take
                continue
            if not chunk[cluster & imrt.mask]:
                contiguous += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            self._imrt_grow(None, cluster + count - contiguous)
        cluster -= contiguous
        for k in range(count):
            imrt.set(cluster + k, 1)
        return cluster << self.cluster_bits

    def _write_refblocks(self, first_cluster: int, end_cluster: int,
                         reftable: list[int]) -> bool:
        """Write the blocks that cover allocated clusters in a range; True if ``reftable`` grew."""
        imrt = self.imrt
        cs = self.cluster_size
        per_block = self.refblock_size
        first_free = [0]
        grown = False
        block_index = first_cluster >> self.refblock_bits
        while True:
            found = imrt.next_block(block_index)
            if found is None:
                break
            block_index = found
            block_start = block_index << self.refblock_bits
            low = max(first_cluster, block_start)
            if low >= end_cluster:
                break
            high = min(end_cluster, block_start + per_block)
            if not imrt.block_bytes(block_index, low - block_start,
                                    high - block_start).rstrip(b"\0"):
                block_index += 1
                continue
            if len(reftable) > block_index and reftable[block_index]:
                block_offset = reftable[block_index]
            else:
                first_free[0] = max(first_free[0], block_start)
                try:
                    block_offset = self._alloc_clusters_imrt(1, first_free)
                except _Errno as exc:
                    raise _Errno(exc.code, f"ERROR allocating refblock: "
                                           f"{_strerror(exc.code)}") from None
                if block_offset // cs >= end_cluster:
                    end_cluster = block_offset // cs + 1
                if len(reftable) <= block_index:
                    entries = -(-((block_index + 1) * REFTABLE_ENTRY_SIZE) // cs) * cs \
                        // REFTABLE_ENTRY_SIZE
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[block_index] = block_offset
            ret = self.overlap_check(0, block_offset, cs)
            if ret < 0:
                raise _Errno(-ret, f"ERROR writing refblock: {_strerror(-ret)}")
            chunk = imrt.chunks.get(block_index)
            values = chunk if chunk is not None else array(self.refcount_code)
            try:
                self.write(block_offset, self.encode_refblock(values))
            except _Errno as exc:
                raise _Errno(exc.code, f"ERROR writing refblock: {_strerror(exc.code)}") \
                    from None
            block_index += 1
        return grown

    def rebuild_refcount_structure(self, res: _Counts) -> None:
        """Write fresh refcount blocks and table from the counted references.

        The old structure is left behind as leaked clusters for the caller to
        free.  Raises _Errno carrying the error text QEMU reports.
        """
        cs = self.cluster_size
        try:
            self.cache.empty()
        except _Errno:
            pass
        reftable: list[int] = []
        try:
            grown = self._write_refblocks(0, self.imrt.size, reftable)
        except _Errno:
            res.check_errors += 1
            raise
        if not grown:
            raise _Errno(errno.EIO, "ERROR writing refblock: nothing to describe")
        reftable_offset = -1
        while True:
            reftable_clusters = -(-len(reftable) * REFTABLE_ENTRY_SIZE // cs)
            try:
                reftable_offset = self._alloc_clusters_imrt(reftable_clusters, [0])
            except _Errno as exc:
                res.check_errors += 1
                raise _Errno(exc.code, f"ERROR allocating reftable: "
                                       f"{_strerror(exc.code)}") from None
            start = reftable_offset // cs
            try:
                grown = self._write_refblocks(start, start + reftable_clusters, reftable)
            except _Errno:
                res.check_errors += 1
                raise
            if not grown:
                break
        length = len(reftable) * REFTABLE_ENTRY_SIZE
        ret = self.overlap_check(0, reftable_offset, length)
        if ret < 0:
            raise _Errno(-ret, f"ERROR writing reftable: {_strerror(-ret)}")
        try:
            self.write(reftable_offset, struct.pack(f">{len(reftable)}Q", *reftable))
        except _Errno as exc:
            raise _Errno(exc.code, f"ERROR writing reftable: {_strerror(exc.code)}") from None
        try:
            self.write(OFFSET_REFCOUNT_TABLE, struct.pack(">QI", reftable_offset,
                                                          reftable_clusters))
        except _Errno as exc:
            raise _Errno(exc.code, f"ERROR setting reftable: {_strerror(exc.code)}") from None
        self.reftable = reftable
        self.reftable_offset = reftable_offset
        self.reftable_size = len(reftable)
        self._update_max_reftable_index()
        self.layout_changed()

    # -- the whole refcount check -------------------------------------------------------------------

    def check_refcounts(self, res: _Counts, fix: int) -> None:
        """qcow2_check_refcounts."""
        cs = self.cluster_size
        size = self.file_length()
        nb_clusters = -(-size // cs)
        if nb_clusters > INT_MAX:
            res.check_errors += 1
            raise _Errno(errno.EFBIG)
        res.total_clusters = -(-(self.total_sectors * 512) // cs)
        self.imrt = _CountedRefs(self.refcount_code, self.refcount_itemsize,
                                 self.refblock_bits)
        self._imrt_grow(res, nb_clusters)
        rebuild = [False]
        self.calculate_refcounts(res, fix, rebuild)

        before_compare = res.copy()
        highest = self.compare_refcounts(res, 0, rebuild)

        if rebuild[0] and fix & FIX_ERRORS:
            old = res.copy()
            fresh_leaks = 0
            self.say("Rebuilding refcount structure")
            try:
                self.rebuild_refcount_structure(res)
            except _Errno as exc:
                if exc.text:
                    self.report(exc.text)
                raise
            res.corruptions = 0
            res.leaks = 0
            rebuild[0] = False
            self.imrt.clear()
            self.calculate_refcounts(res, 0, rebuild)
            if fix & FIX_LEAKS:
                saved = res.copy()
                res.assign(_Counts())
                highest = self.compare_refcounts(res, FIX_LEAKS, rebuild)
                if rebuild[0]:
                    self.say("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = res.leaks
                res.assign(saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild[0]:
                self.say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _Errno(errno.EIO)
            if res.leaks or res.corruptions:
                res.assign(before_compare)
                highest = self.compare_refcounts(res, fix, rebuild)

        self.check_oflag_copied(res, fix)
        res.image_end_offset = (highest + 1) * cs

    # -- the snapshot table -------------------------------------------------------------------------

    def _read_snapshots(self, nb_snapshots: int, repair: bool,
                        counters: list[int]) -> None:
        """qcow2_do_read_snapshots; ``counters`` is [reduced, extra_data_dropped].

        Raises _Errno carrying QEMU's error text (and hint, after a newline).
        """
        self.snapshots = []
        self.snapshots_size = 0
        if not nb_snapshots:
            return
        offset = self.snapshots_offset
        table_length = 0
        for i in range(nb_snapshots):
            entry_start = offset
            table_length = -(-table_length // 8) * 8
            offset = -(-offset // 8) * 8
            fields = _SNAPSHOT_HEADER.unpack(self._snapshot_read(offset, SNAPSHOT_HEADER_SIZE))
            offset += SNAPSHOT_HEADER_SIZE
            (l1_table_offset, l1_size, id_size, name_size, date_sec, date_nsec,
             vm_clock_nsec, vm_state_size, extra_data_size) = fields
            truncate_extra = False
            if extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
                if not repair:
                    raise _Errno(errno.EFBIG,
                                 f"Too much extra metadata in snapshot table entry {i}\n"
                                 "You can force-remove this extra metadata with qemu-img "
                                 "check -r all")
                self.say(f"Discarding too much extra metadata in snapshot table entry {i} "
                         f"({extra_data_size} > {MAX_SNAPSHOT_EXTRA_DATA})")
                counters[1] += 1
                truncate_extra = True
            known = min(SNAPSHOT_EXTRA_DATA_SIZE, extra_data_size)
            extra = self._snapshot_read(offset, known) + bytes(SNAPSHOT_EXTRA_DATA_SIZE - known)
            offset += known
            large_state, disk_size, icount = struct.unpack(">QQQ", extra)
            if extra_data_size >= 8:
                vm_state_size = large_state
            if extra_data_size < 16:
                disk_size = self.total_sectors * 512
            if extra_data_size < 24:
                icount = UINT64_MASK
            unknown_extra = b""
            if extra_data_size > SNAPSHOT_EXTRA_DATA_SIZE:
                extra_end = offset + extra_data_size - SNAPSHOT_EXTRA_DATA_SIZE
                if truncate_extra:
                    extra_data_size = MAX_SNAPSHOT_EXTRA_DATA
                unknown_extra = self._snapshot_read(
                    offset, extra_data_size - SNAPSHOT_EXTRA_DATA_SIZE)
                offset = extra_end
            id_str = self._snapshot_read(offset, id_size)
            offset += id_size
            name = self._snapshot_read(offset, name_size)
            offset += name_size
            table_length += SNAPSHOT_HEADER_SIZE + extra_data_size + id_size + name_size
            if table_length > MAX_SNAPSHOTS_SIZE or offset - self.snapshots_offset > INT_MAX:
                overhanging = nb_snapshots - i
                if not repair:
                    raise _Errno(errno.EFBIG,
                                 "Snapshot table is too big\nYou can force-remove all "
                                 f"{overhanging} overhanging snapshots with qemu-img check "
                                 "-r all")
                self.say(f"Discarding {overhanging} overhanging snapshots (snapshot table is "
                         "too big)")
                counters[0] += overhanging
                offset = entry_start
                break
            self.snapshots.append(_Snapshot(
                l1_table_offset, l1_size, id_str, name, date_sec, date_nsec, vm_clock_nsec,
                vm_state_size, extra_data_size, disk_size, icount, unknown_extra))
        self.snapshots_size = offset - self.snapshots_offset

    def _snapshot_read(self, offset: int, length: int) -> bytes:
        try:
            return self.read(offset, length)
        except _Errno as exc:
            self.snapshots = []
            raise _Errno(exc.code, f"Failed to read snapshot table: "
                                   f"{_strerror(exc.code)}") from None

    def check_read_snapshot_table(self, res: _Counts, fix: int) -> None:
        try:
            raw = self.read(OFFSET_NB_SNAPSHOTS, 12)
        except _Errno as exc:
            res.check_errors += 1
            self.say("ERROR failed to read the snapshot table pointer from the image header: "
                     f"{_strerror(exc.code)}")
            raise
        nb_snapshots, self.snapshots_offset = struct.unpack(">IQ", raw)
        reduced = 0
        if nb_snapshots > MAX_SNAPSHOTS and fix & FIX_ERRORS:
            self.say(f"Discarding {nb_snapshots - MAX_SNAPSHOTS} overhanging snapshots")
            reduced += nb_snapshots - MAX_SNAPSHOTS
            nb_snapshots = MAX_SNAPSHOTS
        try:
            validate_table(self.header, self.snapshots_offset, nb_snapshots,
                           SNAPSHOT_HEADER_SIZE, SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
                           "snapshot table")
        except CorruptImageError as exc:
            res.check_errors += 1
            self.report(f"ERROR {exc}")
            if nb_snapshots > MAX_SNAPSHOTS:
                self.say(f"You can force-remove all {nb_snapshots - MAX_SNAPSHOTS} overhanging "
                         "snapshots with qemu-img check -r all")
            self.snapshots_offset = 0
            self.snapshots = []
            self.snapshots_size = 0
            raise _Errno(exc.errno or errno.EINVAL) from None
        counters = [reduced, 0]
        try:
            self._read_snapshots(nb_snapshots, bool(fix & FIX_ERRORS), counters)
        except _Errno as exc:
            res.check_errors += 1
            self.report(f"ERROR failed to read the snapshot table: {exc.text}")
            self.snapshots_offset = 0
            self.snapshots = []
            self.snapshots_size = 0
            raise
        reduced, dropped = counters
        res.corruptions += reduced + dropped
        if reduced:
            try:
                self.write(OFFSET_NB_SNAPSHOTS, struct.pack(">I", len(self.snapshots)))
            except _Errno as exc:
                res.check_errors += 1
                self.say("ERROR failed to update the snapshot count in the image header: "
                         f"{_strerror(exc.code)}")
                raise
            res.corruptions_fixed += reduced
            res.corruptions -= reduced
        if self.header.version >= 3:
            for i, snapshot in enumerate(self.snapshots):
                if snapshot.extra_data_size < 16:
                    res.corruptions += 1
                    self.say(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} snapshot table "
                             f"entry {i} is incomplete")

    def write_snapshots(self) -> None:
        """qcow2_write_snapshots: a new snapshot table at a newly allocated place."""
        size = 0
        for snapshot in self.snapshots:
            size = -(-size // 8) * 8
            size += (SNAPSHOT_HEADER_SIZE
                     + max(SNAPSHOT_EXTRA_DATA_SIZE, snapshot.extra_data_size)
                     + len(snapshot.id_str.split(b"\0", 1)[0])
                     + len(snapshot.name.split(b"\0", 1)[0]))
            if size > MAX_SNAPSHOTS_SIZE:
                raise _Errno(errno.EFBIG)
        new_offset = self.alloc_clusters(size)
        try:
            self.flush_caches()
            self.overlap_check_or_raise(0, new_offset, size)
            position = new_offset
            for snapshot in self.snapshots:
                id_str = snapshot.id_str.split(b"\0", 1)[0]
                name = snapshot.name.split(b"\0", 1)[0]
                position = -(-position // 8) * 8
                state_size = snapshot.vm_state_size if snapshot.vm_state_size <= 0xFFFFFFFF \
                    else 0
                record = _SNAPSHOT_HEADER.pack(
                    snapshot.l1_table_offset, snapshot.l1_size, len(id_str), len(name),
                    snapshot.date_sec, snapshot.date_nsec, snapshot.vm_clock_nsec, state_size,
                    max(SNAPSHOT_EXTRA_DATA_SIZE, snapshot.extra_data_size))
                record += struct.pack(">QQQ", snapshot.vm_state_size, snapshot.disk_size,
                                      snapshot.icount)
                if snapshot.extra_data_size > SNAPSHOT_EXTRA_DATA_SIZE:
                    record += snapshot.unknown_extra_data
                record += id_str + name
                self.write(position, record)
                position += len(record)
            self.flush_caches()
            self.write(OFFSET_NB_SNAPSHOTS, struct.pack(">IQ", len(self.snapshots), new_offset))
        except _Errno:
            if new_offset > 0:
                self.free_clusters(new_offset, size, DISCARD_ALWAYS)
            raise
        self.free_clusters(self.snapshots_offset, self.snapshots_size, DISCARD_SNAPSHOT)
        self.snapshots_offset = new_offset
        self.snapshots_size = size

    def check_fix_snapshot_table(self, res: _Counts, fix: int) -> None:
        if res.corruptions and fix & FIX_ERRORS:
            try:
                self.write_snapshots()
            except _Errno as exc:
                res.check_errors += 1
                self.say(f"ERROR failed to update snapshot table: {_strerror(exc.code)}")
                raise
            res.corruptions_fixed += res.corruptions
            res.corruptions = 0

    # -- the public operations -------------------------------------------------------------------------

    def check(self, fix: frozenset[str] | set[str] = frozenset()) -> CheckResult:
        """One ``bdrv_check``: counts and messages, repairing what ``fix`` allows.

        ``fix`` is a subset of {"leaks", "all"}; "all" repairs everything
        (qemu-img's ``-r all``), "leaks" only leaked clusters.  Raises
        CheckFailedError where QEMU's check returns an error.
        """
        mode = 0
        if "leaks" in fix:
            mode |= FIX_LEAKS
        if "all" in fix:
            mode |= FIX_LEAKS | FIX_ERRORS
        unknown = set(fix) - {"leaks", "all"}
        if unknown:
            raise ImageError(f"Unknown repair mode: {', '.join(sorted(unknown))}",
                             errno=errno.EINVAL)
        if mode and not self.writable:
            raise ImageError("Image is read-only", errno=errno.EACCES)
        self.messages = []
        if self.unusable:
            raise CheckFailedError(_strerror(errno.ENOMEDIUM), errno=errno.ENOMEDIUM)
        result = _Counts()
        try:
            self._check_locked(result, mode)
        except _Errno as exc:
            raise CheckFailedError(_strerror(exc.code), errno=exc.code,
                                   messages=self.messages) from None
        return CheckResult(
            check_errors=_c_int(result.check_errors), corruptions=_c_int(result.corruptions),
            leaks=_c_int(result.leaks), corruptions_fixed=_c_int(result.corruptions_fixed),
            leaks_fixed=_c_int(result.leaks_fixed), image_end_offset=result.image_end_offset,
            total_clusters=result.total_clusters, allocated_clusters=result.allocated_clusters,
            fragmented_clusters=result.fragmented_clusters,
            compressed_clusters=result.compressed_clusters, messages=self.messages)

    def _check_locked(self, result: _Counts, fix: int) -> None:
        """qcow2_co_check_locked."""
        snapshot_res = _Counts()
        refcount_res = _Counts()
        try:
            self.check_read_snapshot_table(snapshot_res, fix)
        except _Errno:
            result.add(snapshot_res, False)
            raise
        try:
            self.check_refcounts(refcount_res, fix)
        except _Errno:
            result.add(refcount_res, True)
            result.add(snapshot_res, False)
            raise
        result.add(refcount_res, True)
        try:
            self.check_fix_snapshot_table(snapshot_res, fix)
        finally:
            result.add(snapshot_res, False)
        if fix and result.check_errors == 0 and result.corruptions == 0:
            self.mark_clean()
            self.mark_consistent()

    def close(self) -> list[str]:
        """Write back what is cached and close, as QEMU does when the image is closed.

        Returns the lines QEMU would print meanwhile (normally none).
        """
        messages: list[str] = []
        if self._closed or self.file.fd < 0:
            return messages
        self._closed = True
        self.messages = messages
        try:
            if self.writable and not self.unusable:
                # bdrv_close flushes first; a failure there is not reported,
                # but an overlap it runs into makes the node unusable.
                if not self.header.incompatible_features & INCOMPAT_DIRTY:
                    self.cache.write_all()
            if self.writable and not self.unusable:
                # qcow2_close has already let go of the L1 table, so the
                # overlap checks of its final flush skip the active L2 tables.
                self.l1_table = []
                self.layout_changed()
                failed = self.cache.write_all()
                if failed < 0:
                    self.report("Failed to flush the refcount block cache: "
                                f"{_strerror(-failed)}")
                else:
                    try:
                        self.mark_clean()
                    except _Errno:
                        pass
            if self.writable:
                self.file.flush()
        finally:
            self._close_file()
        return messages

    def _close_file(self) -> None:
        if self._owns_file:
            self.file.close()

    def __enter__(self) -> Qcow2Checker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_qcow2(path: str, fix: frozenset[str] = frozenset(), *,
                program: str = "qemu-img") -> CheckResult:
    """Check (and with ``fix``, repair) the qcow2 image at ``path`` once.

    Opens the file itself, read-only unless ``fix`` asks for repairs.  Raises
    the engine's CorruptImageError/UnsupportedImageError where QEMU refuses to
    open the image, CheckFailedError where its check fails.
    """
    checker = Qcow2Checker(path, writable=bool(fix), program=program)
    try:
        result = checker.check(fix)
    finally:
        closing = checker.close()
    result.messages.extend(closing)
    return result


def check_image(driver: Qcow2Driver, fix: frozenset[str] = frozenset(), *,
                repairing_open: bool = False, program: str = "qemu-img") -> CheckResult:
    """Check the image the engine's qcow2 driver has open (``BlockNode.check``).

    The check runs on the driver's own file, from what is on disk (the
    driver's caches are written first), and afterwards the driver takes over
    what the check changed: feature bits, L1 and refcount tables, the
    snapshot table, a corruption signalled.  ``repairing_open`` is the
    repair QEMU runs when it opens a dirty image read/write; it changes
    nothing in the check itself.
    """
    del repairing_open  # the same qcow2_co_check_locked either way
    if driver.broken:
        raise CheckFailedError(_strerror(errno.ENOMEDIUM), errno=errno.ENOMEDIUM)
    if not driver.read_only:
        driver.write_caches()
    checker = Qcow2Checker(driver.file.filename, writable=not driver.read_only,
                           program=program, file=driver.file)
    checker.signaled_corruption = driver.signaled_corruption
    try:
        return checker.check(fix)
    finally:
        if checker.writable and not checker.unusable:
            # What QEMU would keep in its shared cache goes to disk now, as
            # the driver's own cache starts afresh.
            checker.cache.write_all()
        _hand_back(driver, checker)


def _same_kind(template: object, values: list[int]) -> list[int] | array:
    """``values`` as the same kind of sequence as ``template`` (a list or an array)."""
    if isinstance(template, array):
        return array(template.typecode, values)
    return list(values)


def _hand_back(driver: Qcow2Driver, checker: Qcow2Checker) -> None:
    """Bring the driver's in-memory metadata up to what the check left on disk."""
    from .driver import Snapshot

    header = checker.header
    driver.incompatible_features = header.incompatible_features
    driver.compatible_features = header.compatible_features
    driver.autoclear_features = header.autoclear_features
    driver.l1_table = _same_kind(driver.l1_table, checker.l1_table)
    refcounts = driver.refcounts
    refcounts.table_offset = checker.reftable_offset
    refcounts.table_size = checker.reftable_size
    refcounts.table = _same_kind(refcounts.table, checker.reftable)
    refcounts.max_table_index = checker.max_reftable_index
    refcounts.free_cluster_index = checker.free_cluster_index
    refcounts.cache.clear()
    driver.l2_cache.clear()
    driver.snapshots = [
        Snapshot(snapshot.l1_table_offset, snapshot.l1_size,
                 snapshot.id_str.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
                 snapshot.name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
        for snapshot in checker.snapshots]
    driver.snapshots_offset = checker.snapshots_offset
    driver.snapshots_size = checker.snapshots_size
    driver.header.nb_snapshots = len(checker.snapshots)
    driver.signaled_corruption = checker.signaled_corruption
    if checker.unusable:
        driver.broken = True
    driver.metadata_changed()


__all__ = ["CheckFailedError", "CheckResult", "Qcow2Checker", "check_image", "check_qcow2"]
