"""A bounded write-back cache of metadata tables (QEMU's qcow2-cache.c).

L2 table slices and refcount blocks are kept decoded (an ``array`` per
table) in an LRU of fixed capacity.  Dirty tables are written back when
evicted or flushed.  A cache may depend on another one: before it writes
anything the other is flushed first, which is how refcount updates reach the
file before the L2 entries that rely on them.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

from ..hostfile import HostFile

Decoder = Callable[[bytes], array]
Encoder = Callable[[array], bytes]


# Every open asks for two codecs, and the same few shapes recur.
@lru_cache(maxsize=64)
def entry_codec(bits: int, count: int) -> tuple[Decoder, Encoder]:
    """Big-endian decoder/encoder for ``count`` entries of ``bits`` each.

    Tables are kept as ``array`` objects, as compact as on disk.  Entries
    narrower than a byte are packed from the least significant bits of each
    byte, as the qcow2 refcount format lays them out.
    """
    if bits >= 8:
        code = {8: "B", 16: "H", 32: "I", 64: "Q"}[bits]
        swap = bits > 8 and sys.byteorder == "little"

        def decode(raw: bytes) -> array:
            table = array(code, raw)
            if swap:
                table.byteswap()
            return table

        def encode(values: array) -> bytes:
            if not swap:
                return values.tobytes()
            copy = array(code, values)
            copy.byteswap()
            return copy.tobytes()

        return decode, encode

    per_byte = 8 // bits
    mask = (1 << bits) - 1

    def decode_small(raw: bytes) -> array:
        out = array("B", bytes(count))
        for index in range(count):
            byte = raw[index // per_byte]
            out[index] = (byte >> (bits * (index % per_byte))) & mask
        return out

    def encode_small(values: array) -> bytes:
        out = bytearray(count // per_byte)
        for index, value in enumerate(values):
            if value:
                out[index // per_byte] |= (value & mask) << (bits * (index % per_byte))
        return bytes(out)

    return decode_small, encode_small


class TableCache:
    """LRU cache of decoded tables, each ``table_size`` bytes on disk."""

    def __init__(self, file: HostFile, capacity: int, table_size: int,
                 decode: Decoder, encode: Encoder,
                 before_write: Callable[[int, int], None] | None = None) -> None:
        self.file = file
        self.capacity = max(1, capacity)
        self.table_size = table_size
        self.decode = decode
        self.encode = encode
        self.tables: OrderedDict[int, array] = OrderedDict()
        self.dirty: set[int] = set()
        self.depends: TableCache | None = None
        # Called with (offset, size) before a table is written, so the
        # driver can refuse writes over other metadata.
        self.before_write = before_write

    def get(self, offset: int) -> array:
        """The table stored at ``offset`` (read from the file if needed)."""
        tables = self.tables
        table = tables.get(offset)
        if table is not None:
            tables.move_to_end(offset)
            return table
        self._make_room()
        table = self.decode(self.file.pread(offset, self.table_size))
        tables[offset] = table
        return table

    def get_empty(self, offset: int) -> array:
        """A zeroed table for ``offset`` without reading the file; marked dirty."""
        tables = self.tables
        if offset in tables:
            tables.move_to_end(offset)
        else:
            self._make_room()
        table = self.decode(bytes(self.table_size))
        tables[offset] = table
        self.dirty.add(offset)
        return table

    def lookup(self, offset: int) -> array | None:
        """The table at ``offset`` if cached, without touching the LRU order."""
        return self.tables.get(offset)

    def mark_dirty(self, offset: int) -> None:
        # A table dropped meanwhile (its cluster was freed) stays dropped.
        if offset in self.tables:
            self.dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed; its changes are dropped."""
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def set_dependency(self, other: TableCache) -> None:
        """Flush ``other`` before this cache writes anything.

        Two caches never wait for each other: if ``other`` already waits for
        a cache, that one is written now (QEMU's qcow2_cache_set_dependency).
        """
        if other.depends is not None:
            pending = other.depends
            other.depends = None
            pending.flush()
        if self.depends is not None and self.depends is not other:
            pending = self.depends
            self.depends = None
            pending.flush()
        self.depends = other

    def _make_room(self) -> None:
        tables = self.tables
        while len(tables) >= self.capacity:
            offset = next(iter(tables))
            if offset in self.dirty:
                self._write(offset)
            del tables[offset]

    def _write(self, offset: int) -> None:
        if self.depends is not None:
            depends = self.depends
            self.depends = None
            depends.flush()
        if self.before_write is not None:
            self.before_write(offset, self.table_size)
        self.file.pwrite(offset, self.encode(self.tables[offset]))
        self.dirty.discard(offset)

    def flush(self) -> None:
        """Write every dirty table back (dependencies first), lowest offset first."""
        if self.depends is not None:
            depends = self.depends
            self.depends = None
            depends.flush()
        for offset in sorted(self.dirty):
            self._write(offset)

    def clear(self) -> None:
        self.tables.clear()
        self.dirty.clear()
