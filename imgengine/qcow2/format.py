"""qcow2 on-disk format: constants, the header and its extensions.

Parsing, validating and serialising the image header exactly as QEMU 7.2
lays it out (see docs/interop/qcow2.txt).  Validation raises the engine's
error classes with QEMU's own wording, in the order QEMU checks things, so
that a hostile header is refused before any of its offsets is used.
"""

from __future__ import annotations

import errno
import struct
import sys
from array import array
from collections.abc import Callable

from ..errors import CorruptImageError, UnsupportedImageError
from ..record import Record

MAGIC = 0x514649FB  # "QFI\xfb"

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_SIZE = 65536

# Header sizes: the version 2 header, the minimal version 3 header and the
# header QEMU 7.2 writes (with the compression type byte and padding).
HEADER_V2_LENGTH = 72
HEADER_V3_MIN_LENGTH = 104
HEADER_V3_LENGTH = 112
COMPRESSION_TYPE_OFFSET = 104

# Field offsets QEMU updates in place.
OFFSET_SIZE = 24
OFFSET_L1_SIZE = 36
OFFSET_REFCOUNT_TABLE = 48
OFFSET_INCOMPATIBLE_FEATURES = 72

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                 | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)

COMPAT_LAZY_REFCOUNTS = 1 << 0

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

FEATURE_TYPE_INCOMPATIBLE = 0
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# L1/L2/refcount-table entry layout.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
MAX_CLUSTER_OFFSET = (1 << 56) - 1

L1E_SIZE = 8
L2E_SIZE = 8
REFTABLE_ENTRY_SIZE = 8
COMPRESSED_SECTOR_SIZE = 512

MAX_REFTABLE_SIZE = 8 * 1024 * 1024
MAX_L1_SIZE = 32 * 1024 * 1024
MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS

# Room QEMU keeps for a backing format name (bs->backing_format).
BACKING_FORMAT_BUFFER = 16
MAX_BACKING_FILE_NAME = 1023

INT64_MAX = (1 << 63) - 1

# The feature name table QEMU 7.2 writes into v3 images with clusters larger
# than 4 KiB: (type, bit, name).
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (FEATURE_TYPE_INCOMPATIBLE, 0, "dirty bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 1, "corrupt bit"),
    (FEATURE_TYPE_INCOMPATIBLE, 2, "external data file"),
    (FEATURE_TYPE_INCOMPATIBLE, 3, "compression type"),
    (FEATURE_TYPE_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEATURE_TYPE_COMPATIBLE, 0, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
)
FEATURE_ENTRY_SIZE = 48

_V2_FIELDS = struct.Struct(">IIQIIQIIQQIIQ")
_V3_FIELDS = struct.Struct(">QQQII")
_EXT_HEADER = struct.Struct(">II")
_BITMAPS_EXT = struct.Struct(">IIQQ")
_CRYPTO_EXT = struct.Struct(">QQ")


def decode_table(raw: bytes) -> array:
    """A table of big-endian 64-bit entries (L1, refcount table), as an array."""
    table = array("Q", raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def encode_table(table: array) -> bytes:
    """The on-disk bytes of a table of 64-bit entries."""
    if sys.byteorder == "little":
        table = array("Q", table)
        table.byteswap()
    return table.tobytes()


def hexc(value: int) -> str:
    """An integer as C's ``%#x`` prints it: with 0x, except zero is "0"."""
    return f"{value:#x}" if value else "0"


class Feature(Record):
    """One entry of the feature name table extension."""

    _fields = ("type", "bit", "name")

    def __init__(self, type: int, bit: int, name: str) -> None:
        self.type = type
        self.bit = bit
        self.name = name


class BitmapsExtension(Record):
    """The persistent dirty bitmaps header extension."""

    _fields = ("nb_bitmaps", "directory_size", "directory_offset")

    def __init__(self, nb_bitmaps: int, directory_size: int, directory_offset: int) -> None:
        self.nb_bitmaps = nb_bitmaps
        self.directory_size = directory_size
        self.directory_offset = directory_offset


class Header(Record):
    """The qcow2 header, its extensions and the backing file name."""

    _fields = ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits",
               "size", "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
               "refcount_table_clusters", "nb_snapshots", "snapshots_offset",
               "incompatible_features", "compatible_features", "autoclear_features",
               "refcount_order", "header_length", "compression_type", "unknown_fields",
               "backing_format", "backing_file", "data_file", "feature_table", "bitmaps",
               "crypto_header", "unknown_extensions")

    def __init__(self, magic: int = MAGIC, version: int = 3, backing_file_offset: int = 0,
                 backing_file_size: int = 0, cluster_bits: int = 16, size: int = 0,
                 crypt_method: int = CRYPT_NONE, l1_size: int = 0, l1_table_offset: int = 0,
                 refcount_table_offset: int = 0, refcount_table_clusters: int = 0,
                 nb_snapshots: int = 0, snapshots_offset: int = 0,
                 incompatible_features: int = 0, compatible_features: int = 0,
                 autoclear_features: int = 0, refcount_order: int = 4,
                 header_length: int = HEADER_V3_LENGTH,
                 compression_type: int = COMPRESSION_ZLIB, unknown_fields: bytes = b"",
                 backing_format: str | None = None, backing_file: str | None = None,
                 data_file: str | None = None, feature_table: list[Feature] | None = None,
                 bitmaps: BitmapsExtension | None = None,
                 crypto_header: tuple[int, int] | None = None,
                 unknown_extensions: list[tuple[int, bytes]] | None = None) -> None:
        self.magic = magic
        self.version = version
        self.backing_file_offset = backing_file_offset
        self.backing_file_size = backing_file_size
        self.cluster_bits = cluster_bits
        self.size = size
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        # Header bytes beyond what QEMU 7.2 knows, kept when rewriting.
        self.unknown_fields = unknown_fields
        self.backing_format = backing_format
        self.backing_file = backing_file
        self.data_file = data_file
        self.feature_table: list[Feature] = feature_table if feature_table is not None else []
        self.bitmaps = bitmaps
        self.crypto_header = crypto_header
        # Extensions QEMU does not know, as (magic, payload), in the order QEMU
        # would write them back.
        self.unknown_extensions: list[tuple[int, bytes]] = \
            unknown_extensions if unknown_extensions is not None else []

    def copy(self) -> Header:
        """A shallow copy, field by field."""
        return Header(**{name: getattr(self, name) for name in self._fields})

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def unpack_fixed_header(buf: bytes) -> Header:
    """Decode the fixed part of a header (at least 112 bytes, zero-padded).

    Version 2 images get the implied version 3 defaults, as QEMU does.
    Nothing is validated here.
    """
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
     crypt_method, l1_size, l1_table_offset, refcount_table_offset,
     refcount_table_clusters, nb_snapshots, snapshots_offset) = _V2_FIELDS.unpack_from(buf, 0)
    header = Header(magic=magic, version=version, backing_file_offset=backing_file_offset,
                    backing_file_size=backing_file_size, cluster_bits=cluster_bits,
                    size=size, crypt_method=crypt_method, l1_size=l1_size,
                    l1_table_offset=l1_table_offset,
                    refcount_table_offset=refcount_table_offset,
                    refcount_table_clusters=refcount_table_clusters,
                    nb_snapshots=nb_snapshots, snapshots_offset=snapshots_offset)
    if version == 2:
        header.refcount_order = 4
        header.header_length = HEADER_V2_LENGTH
    else:
        (header.incompatible_features, header.compatible_features,
         header.autoclear_features, header.refcount_order,
         header.header_length) = _V3_FIELDS.unpack_from(buf, HEADER_V2_LENGTH)
        header.compression_type = buf[COMPRESSION_TYPE_OFFSET]
    return header


def probe(buf: bytes) -> bool:
    """True when ``buf`` (the first bytes of a file) looks like qcow2."""
    if len(buf) < HEADER_V3_LENGTH:
        return False
    magic, version = struct.unpack_from(">II", buf, 0)
    return magic == MAGIC and version >= 2


def validate_basic(header: Header) -> None:
    """The checks QEMU makes on the fixed header before anything is read.

    Covers magic, version, cluster size, header length and the backing file
    offset; the caller then reads unknown header fields and continues with
    :func:`validate_features`.
    """
    if header.magic != MAGIC:
        raise CorruptImageError("Image is not in qcow2 format", errno=errno.EINVAL)
    if header.version < 2 or header.version > 3:
        raise CorruptImageError(f"Unsupported qcow2 version {header.version}",
                                errno=errno.ENOTSUP)
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImageError(f"Unsupported cluster size: 2^{header.cluster_bits}",
                                errno=errno.EINVAL)
    if header.version == 3 and header.header_length < HEADER_V3_MIN_LENGTH:
        raise CorruptImageError("qcow2 header too short", errno=errno.EINVAL)
    if header.header_length > header.cluster_size:
        raise CorruptImageError("qcow2 header exceeds cluster size", errno=errno.EINVAL)
    if header.backing_file_offset > header.cluster_size:
        raise CorruptImageError("Invalid backing file offset", errno=errno.EINVAL)
    if header.header_length <= COMPRESSION_TYPE_OFFSET:
        header.compression_type = COMPRESSION_ZLIB


def extensions_end(header: Header) -> int:
    """Where the header extension area ends (exclusive)."""
    if header.backing_file_offset:
        return header.backing_file_offset
    return header.cluster_size


def validate_compression_type(header: Header) -> None:
    """QEMU's check that the compression type and its feature bit agree."""
    if header.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise UnsupportedImageError(
            f"qcow2: unknown compression type: {header.compression_type}",
            errno=errno.ENOTSUP)
    has_bit = bool(header.incompatible_features & INCOMPAT_COMPRESSION)
    if header.compression_type == COMPRESSION_ZLIB and has_bit:
        raise CorruptImageError(
            "qcow2: Compression type incompatible feature bit must not be set",
            errno=errno.EINVAL)
    if header.compression_type != COMPRESSION_ZLIB and not has_bit:
        raise CorruptImageError(
            "qcow2: Compression type incompatible feature bit must be set",
            errno=errno.EINVAL)


def unsupported_feature_message(feature_table: list[Feature], mask: int) -> str:
    """QEMU's "Unsupported qcow2 feature(s): ..." text for unknown bits."""
    names = []
    for feature in feature_table:
        if feature.type == FEATURE_TYPE_INCOMPATIBLE and feature.bit < 64 \
                and mask & (1 << feature.bit):
            names.append(feature.name[:46])
            mask &= ~(1 << feature.bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def validate_table(header: Header, offset: int, entries: int, entry_len: int,
                   max_size_bytes: int, table_name: str) -> None:
    """QEMU's qcow2_validate_table: size limit, overflow and alignment."""
    if entries > max_size_bytes // entry_len:
        raise CorruptImageError(f"{table_name} too large", errno=errno.EFBIG)
    if INT64_MAX - entries * entry_len < offset or offset & (header.cluster_size - 1):
        raise CorruptImageError(f"{table_name} offset invalid", errno=errno.EINVAL)


def parse_feature_table(payload: bytes) -> list[Feature]:
    """Decode a feature name table extension payload.

    QEMU reads the payload into a zeroed buffer, so a last, partial entry
    counts with its missing bytes as zeroes.
    """
    features = []
    payload = payload + bytes(-len(payload) % FEATURE_ENTRY_SIZE)
    for pos in range(0, len(payload), FEATURE_ENTRY_SIZE):
        ftype, bit = payload[pos], payload[pos + 1]
        raw_name = payload[pos + 2:pos + FEATURE_ENTRY_SIZE]
        name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
        if not name:
            break
        features.append(Feature(ftype, bit, name))
    return features


def read_extensions(header: Header, read: Callable[[int, int], bytes],
                    *, feature_table_only: bool = False) -> None:
    """Parse the header extensions into ``header``.

    ``read(offset, length)`` returns file bytes (zero-padded past the end).
    With ``feature_table_only`` errors are ignored and only the feature name
    table is collected, the way QEMU reads it to name unknown features.
    """
    start = header.header_length
    end = extensions_end(header)
    cluster_size = header.cluster_size
    offset = start
    while offset < end:
        magic, length = _EXT_HEADER.unpack(read(offset, _EXT_HEADER.size))
        offset += _EXT_HEADER.size
        if offset > end or length > end - offset:
            if feature_table_only:
                return
            raise CorruptImageError("Header extension too large", errno=errno.EINVAL)
        if magic == EXT_END:
            return
        if feature_table_only:
            if magic == EXT_FEATURE_TABLE:
                header.feature_table = parse_feature_table(read(offset, length))
        elif magic == EXT_BACKING_FORMAT:
            if length >= BACKING_FORMAT_BUFFER:
                raise CorruptImageError(
                    f"ERROR: ext_backing_format: len={length} too large "
                    f"(>={BACKING_FORMAT_BUFFER})", errno=errno.EINVAL)
            name = read(offset, length).split(b"\0", 1)[0]
            header.backing_format = name.decode("utf-8", "surrogateescape")
        elif magic == EXT_FEATURE_TABLE:
            header.feature_table = parse_feature_table(read(offset, length))
        elif magic == EXT_CRYPTO_HEADER:
            if header.crypt_method != CRYPT_LUKS:
                raise CorruptImageError("CRYPTO header extension only expected with "
                                        "LUKS encryption method", errno=errno.EINVAL)
            if length != _CRYPTO_EXT.size:
                raise CorruptImageError(
                    f"CRYPTO header extension size {length}, but expected size "
                    f"{_CRYPTO_EXT.size}", errno=errno.EINVAL)
            crypto_offset, crypto_length = _CRYPTO_EXT.unpack(read(offset, length))
            if crypto_offset % cluster_size:
                raise CorruptImageError(
                    f"Encryption header offset '{crypto_offset}' is not a multiple of "
                    f"cluster size '{cluster_size}'", errno=errno.EINVAL)
            header.crypto_header = (crypto_offset, crypto_length)
        elif magic == EXT_BITMAPS:
            _parse_bitmaps_extension(header, read(offset, length), length)
        elif magic == EXT_DATA_FILE:
            name = read(offset, length).split(b"\0", 1)[0]
            header.data_file = name.decode("utf-8", "surrogateescape")
        else:
            # QEMU keeps unknown extensions newest-first and writes them back
            # in that order, so every header rewrite reverses them.
            header.unknown_extensions.insert(0, (magic, read(offset, length)))
        offset += (length + 7) & ~7


def _parse_bitmaps_extension(header: Header, payload: bytes, length: int) -> None:
    if length != _BITMAPS_EXT.size:
        raise CorruptImageError("bitmaps_ext: Invalid extension length", errno=errno.EINVAL)
    if not header.autoclear_features & AUTOCLEAR_BITMAPS:
        # Written by a program without bitmap support: QEMU ignores the
        # extension (and drops it on the next header update).
        return
    nb_bitmaps, reserved, directory_size, directory_offset = _BITMAPS_EXT.unpack(payload)
    if reserved:
        raise CorruptImageError("bitmaps_ext: Reserved field is not zero", errno=errno.EINVAL)
    if nb_bitmaps > MAX_BITMAPS:
        raise CorruptImageError(
            f"bitmaps_ext: Image has {nb_bitmaps} bitmaps, exceeding the QEMU "
            f"supported maximum of {MAX_BITMAPS}", errno=errno.EINVAL)
    if nb_bitmaps == 0:
        raise CorruptImageError("found bitmaps extension with zero bitmaps",
                                errno=errno.EINVAL)
    if directory_offset & (header.cluster_size - 1):
        raise CorruptImageError("bitmaps_ext: invalid bitmap directory offset",
                                errno=errno.EINVAL)
    if directory_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise CorruptImageError(
            f"bitmaps_ext: bitmap directory size ({directory_size}) exceeds the "
            f"maximum supported size ({MAX_BITMAP_DIRECTORY_SIZE})", errno=errno.EINVAL)
    header.bitmaps = BitmapsExtension(nb_bitmaps, directory_size, directory_offset)


def read_backing_file_name(header: Header, read: Callable[[int, int], bytes]) -> None:
    """Read the backing file name the header points to, if any."""
    if not header.backing_file_offset:
        return
    length = header.backing_file_size
    if length > min(MAX_BACKING_FILE_NAME, header.cluster_size - header.backing_file_offset):
        raise CorruptImageError("Backing file name too long", errno=errno.EINVAL)
    name = read(header.backing_file_offset, length).split(b"\0", 1)[0]
    header.backing_file = name.decode("utf-8", "surrogateescape")


def _extension(magic: int, payload: bytes) -> bytes:
    padded = payload + b"\0" * (-len(payload) % 8)
    return _EXT_HEADER.pack(magic, len(payload)) + padded


def feature_table_payload() -> bytes:
    """The feature name table extension payload QEMU 7.2 writes."""
    out = bytearray()
    for ftype, bit, name in FEATURE_NAMES:
        encoded = name.encode()
        out += bytes((ftype, bit)) + encoded + b"\0" * (46 - len(encoded))
    return bytes(out)


def pack_header_cluster(header: Header) -> bytes:
    """The whole first cluster as qcow2_update_header writes it.

    Raises ``OSError(ENOSPC)`` (as QEMU fails with -ENOSPC) when the header,
    its extensions and the backing file name do not fit in one cluster.
    """
    cluster_size = header.cluster_size
    header_length = HEADER_V3_LENGTH + len(header.unknown_fields)
    fixed = _V2_FIELDS.pack(
        MAGIC, header.version, 0, 0, header.cluster_bits, header.size,
        header.crypt_method, header.l1_size, header.l1_table_offset,
        header.refcount_table_offset, header.refcount_table_clusters,
        header.nb_snapshots, header.snapshots_offset)
    if header.version >= 3:
        fixed += _V3_FIELDS.pack(header.incompatible_features, header.compatible_features,
                                 header.autoclear_features, header.refcount_order,
                                 header_length)
        fixed += bytes((header.compression_type,)) + b"\0" * 7
        fixed += header.unknown_fields
    body = bytearray(fixed)
    if header.backing_format is not None:
        body += _extension(EXT_BACKING_FORMAT, header.backing_format.encode(
            "utf-8", "surrogateescape"))
    if header.crypto_header is not None and header.crypto_header[0] != 0:
        body += _extension(EXT_CRYPTO_HEADER, _CRYPTO_EXT.pack(*header.crypto_header))
    if header.version >= 3 and cluster_size > 4096:
        body += _extension(EXT_FEATURE_TABLE, feature_table_payload())
    if header.bitmaps is not None and header.bitmaps.nb_bitmaps > 0:
        body += _extension(EXT_BITMAPS, _BITMAPS_EXT.pack(
            header.bitmaps.nb_bitmaps, 0, header.bitmaps.directory_size,
            header.bitmaps.directory_offset))
    for magic, payload in header.unknown_extensions:
        body += _extension(magic, payload)
    body += _extension(EXT_END, b"")
    if len(body) > cluster_size:
        raise OSError(errno.ENOSPC, "header does not fit in the first cluster")
    if header.backing_file is not None:
        name = header.backing_file.encode("utf-8", "surrogateescape")
        if cluster_size - len(body) < len(name):
            raise OSError(errno.ENOSPC, "backing file name does not fit")
        struct.pack_into(">QI", body, 8, len(body), len(name))
        body += name
    body += b"\0" * (cluster_size - len(body))
    return bytes(body)
