"""Refcount table and blocks, and host cluster allocation in QEMU's order.

Mirrors qcow2-refcount.c: the free-cluster search starts at cluster 0 on
every open and moves forward (dropping back when clusters are freed), a new
refcount block is placed where it can describe itself, and when the refcount
table is full a new table and blocks are laid out at the end of the image.
Refcounts always go up before the clusters are used and down only after the
mapping to them is gone.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array

from ..errors import CorruptImageError, ImageError
from .cache import TableCache, entry_codec
from .format import (
    L2E_OFFSET_MASK,
    MAX_CLUSTER_OFFSET,
    MAX_REFTABLE_SIZE,
    OFFSET_REFCOUNT_TABLE,
    OFLAG_COMPRESSED,
    REFT_OFFSET_MASK,
    REFTABLE_ENTRY_SIZE,
    decode_table,
    encode_table,
    hexc,
)

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from collections.abc import Sequence

    from .driver import Qcow2Driver

# Discard types (enum qcow2_discard_type).
DISCARD_NEVER = 0
DISCARD_ALWAYS = 1
DISCARD_REQUEST = 2
DISCARD_SNAPSHOT = 3
DISCARD_OTHER = 4

MIN_REFCOUNT_CACHE_SIZE = 4


class RetryAllocation(Exception):
    """QEMU's -EAGAIN: new refcount metadata was placed; search again."""


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool) -> tuple[int, int]:
    """Refcount blocks and table needed to cover ``clusters`` (and themselves).

    Returns (bytes of table and blocks, number of refcount blocks), the fixed
    point QEMU's qcow2_refcount_metadata_size computes.
    """
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = 0
    blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // refcounts_per_block)
        table = -(-blocks // blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
            continue
        if n == last:
            break
    return (blocks + table) * cluster_size, blocks


class RefcountAreaLayout:
    """Where qcow2_refcount_area puts a new self-describing refcount table and
    the blocks it still lacks: computed alike by the engine and the checker."""

    __slots__ = ("area_index", "total_blocks", "table", "table_size", "table_clusters",
                 "table_offset", "end_offset")

    def __init__(self, start_offset: int, additional_clusters: int, exact_size: bool,
                 cluster_size: int, refcount_order: int, table: Sequence[int],
                 max_table_index: int, new_block_index: int, new_block_offset: int) -> None:
        cs = cluster_size
        _, total_blocks = refcount_metadata_size(start_offset // cs + additional_clusters,
                                                 cs, refcount_order, not exact_size)
        if total_blocks > MAX_REFTABLE_SIZE:
            raise ImageError("File too large", errno=errno.EFBIG)
        block_entries = cs * 8 >> refcount_order
        self.area_index = (start_offset // cs) // block_entries
        self.total_blocks = total_blocks
        table_size = total_blocks if exact_size else total_blocks + -(-total_blocks // 2)
        per_cluster = cs // REFTABLE_ENTRY_SIZE
        table_size = -(-table_size // per_cluster) * per_cluster
        if table_size > MAX_REFTABLE_SIZE:
            raise ImageError("File too large", errno=errno.EFBIG)
        self.table_size = table_size
        self.table_clusters = table_size * REFTABLE_ENTRY_SIZE // cs
        new_table = array("Q", bytes(8 * table_size))
        keep = max_table_index + 1 if table_size > max_table_index else table_size
        new_table[:keep] = array("Q", table[:keep])
        if new_block_offset:
            new_table[new_block_index] = new_block_offset
        self.table = new_table
        missing = sum(1 for i in range(self.area_index, total_blocks) if not new_table[i])
        self.table_offset = start_offset + missing * cs
        self.end_offset = self.table_offset + self.table_clusters * cs

    def self_references(self, block_index: int, block_entries: int, cluster_size: int,
                        start_offset: int) -> range:
        """The entries of refcount block ``block_index`` that count the area itself."""
        first_covered = block_index * block_entries * cluster_size
        if first_covered >= self.end_offset:
            return range(0)
        first = (start_offset - first_covered) // cluster_size \
            if first_covered < start_offset else 0
        return range(first, min((self.end_offset - first_covered) // cluster_size,
                                block_entries))


def queue_discard(discards: list[list[int]], offset: int, length: int) -> None:
    """Add a freed range to the pending discards, merged with those it touches
    (update_refcount_discard)."""
    for region in discards:
        new_start = min(offset, region[0])
        new_end = max(offset + length, region[0] + region[1])
        if new_end - new_start <= length + region[1]:
            region[0] = new_start
            region[1] = new_end - new_start
            merged = region
            break
    else:
        merged = [offset, length]
        discards.append(merged)
    for other in list(discards):
        if other is merged:
            continue
        if other[0] > merged[0] + merged[1] or merged[0] > other[0] + other[1]:
            continue
        discards.remove(other)
        merged[0] = min(merged[0], other[0])
        merged[1] += other[1]


class Refcounts:
    """The refcount structures of one open image."""

    def __init__(self, s: Qcow2Driver, table_offset: int, table_clusters: int) -> None:
        self.s = s
        self.file = s.file
        self.cluster_bits = s.cluster_bits
        self.cluster_size = s.cluster_size
        self.order = s.refcount_order
        self.bits = 1 << self.order
        self.max = (1 << self.bits) - 1
        self.block_bits = s.cluster_bits - (self.order - 3)
        self.block_entries = 1 << self.block_bits
        self.table_offset = table_offset
        self.table_size = table_clusters << (s.cluster_bits - 3)
        self.table: array = array("Q")
        self.max_table_index = 0
        self.free_cluster_index = 0
        self.free_byte_offset = 0
        self.discards: list[list[int]] = []
        self.cache_discards = False
        # Clusters were freed whose unmapping may not be on disk yet.
        self.freed_pending = False
        decode, encode = entry_codec(self.bits, self.block_entries)
        entries = getattr(s, "refcount_cache_entries", MIN_REFCOUNT_CACHE_SIZE)
        self.cache = TableCache(self.file, entries, self.cluster_size,
                                decode, encode, before_write=self._before_block_write)

    # -- loading ----------------------------------------------------------------

    def load_table(self) -> None:
        size = self.table_size * REFTABLE_ENTRY_SIZE
        if self.table_size:
            raw = self.file.pread(self.table_offset, size)
            self.table = decode_table(raw)
        else:
            self.table = array("Q")
        self._update_max_table_index()

    def _update_max_table_index(self) -> None:
        table = self.table
        # Entries past the last non-zero byte are zero: start the scan there.
        nonzero_bytes = len(table.tobytes().rstrip(b"\0"))
        index = min(self.table_size, (nonzero_bytes + 7) // 8) - 1
        while index > 0 and not table[index] & REFT_OFFSET_MASK:
            index -= 1
        self.max_table_index = max(index, 0)

    def _before_block_write(self, offset: int, size: int) -> None:
        self.s.check_metadata_write(offset, size, ignore="refcount block")

    def _block(self, block_offset: int, table_index: int) -> array:
        """A refcount block, validated before it is first read."""
        cache = self.cache
        block = cache.tables.get(block_offset)
        if block is not None:
            cache.tables.move_to_end(block_offset)
            return block
        if block_offset & (self.cluster_size - 1):
            raise self.s.signal_corruption(
                f"Refblock offset {hexc(block_offset)} unaligned (reftable index: "
                f"{hexc(table_index)})")
        return cache.get(block_offset)

    # -- reading refcounts ---------------------------------------------------------

    def get(self, cluster_index: int) -> int:
        """The refcount of a host cluster."""
        table_index = cluster_index >> self.block_bits
        if table_index >= self.table_size:
            return 0
        block_offset = self.table[table_index] & REFT_OFFSET_MASK
        if not block_offset:
            return 0
        block = self._block(block_offset, table_index)
        return block[cluster_index & (self.block_entries - 1)]

    def count_used(self, end_cluster: int, limit: int) -> int:
        """How many clusters below ``end_cluster`` have a refcount (up to ``limit``)."""
        count = 0
        entries = self.block_entries
        table_index = 0
        while table_index * entries < end_cluster and count < limit:
            if table_index >= self.table_size:
                break
            block_offset = self.table[table_index] & REFT_OFFSET_MASK
            stop = min(entries, end_cluster - table_index * entries)
            if block_offset:
                block = self._block(block_offset, table_index)
                used = stop - block[:stop].count(0) if stop < entries else \
                    entries - block.count(0)
                if count + used >= limit:
                    # QEMU stops counting at the limit; so do we.
                    return limit
                count += used
            table_index += 1
        return count

    # -- allocation ------------------------------------------------------------------

    def settle_frees(self) -> None:
        """Put on disk the L2 changes that freed clusters, before reusing any.

        A cluster freed by dropping its mapping must not get new contents
        while the old mapping is still on disk: a process killed then would
        leave the old guest offset reading someone else's data.
        """
        if self.freed_pending:
            self.freed_pending = False
            self.s.l2_cache.flush()

    def alloc_clusters_noref(self, size: int, max_offset: int = MAX_CLUSTER_OFFSET) -> int:
        """Find free clusters for ``size`` bytes without taking them yet."""
        if self.cache_discards:
            self.process_discards(True)
        self.settle_frees()
        nb_clusters = -(-size // self.cluster_size)
        found = 0
        block_bits = self.block_bits
        entry_mask = self.block_entries - 1
        table = self.table
        table_size = self.table_size
        index = self.free_cluster_index
        current_table_index = -1
        block: array | None = None
        while found < nb_clusters:
            table_index = index >> block_bits
            if table_index != current_table_index:
                current_table_index = table_index
                block = None
                if table_index < table_size:
                    block_offset = table[table_index] & REFT_OFFSET_MASK
                    if block_offset:
                        block = self._block(block_offset, table_index)
            if block is None:
                # A whole block of free clusters (or the rest of it).
                room = self.block_entries - (index & entry_mask)
                take = min(room, nb_clusters - found)
                found += take
                index += take
                continue
            if block[index & entry_mask]:
                found = 0
            else:
                found += 1
            index += 1
        self.free_cluster_index = index
        if index > 0 and index - 1 > (max_offset >> self.cluster_bits):
            raise ImageError("File too large", errno=errno.EFBIG)
        return (index - nb_clusters) << self.cluster_bits

    def alloc_clusters(self, size: int) -> int:
        """Allocate clusters for ``size`` bytes and take a reference to them."""
        while True:
            offset = self.alloc_clusters_noref(size)
            try:
                self.update(offset, size, 1, False, DISCARD_NEVER)
            except RetryAllocation:
                continue
            return offset

    def alloc_clusters_at(self, offset: int, nb_clusters: int) -> int:
        """Take as many free clusters as possible starting exactly at ``offset``."""
        if nb_clusters == 0:
            return 0
        self.settle_frees()
        while True:
            cluster_index = offset >> self.cluster_bits
            count = 0
            while count < nb_clusters and self.get(cluster_index + count) == 0:
                count += 1
            try:
                self.update(offset, count << self.cluster_bits, 1, False, DISCARD_NEVER)
            except RetryAllocation:
                continue
            return count

    def alloc_bytes(self, size: int) -> int:
        """Allocate ``size`` bytes for compressed data, packing clusters."""
        cs = self.cluster_size
        offset = self.free_byte_offset
        if offset:
            if self.get(offset >> self.cluster_bits) == self.max:
                offset = 0
        free_in_cluster = cs - (offset & (cs - 1))
        while True:
            if not offset or free_in_cluster < size:
                limit = min((1 << self.s.csize_shift) - 1, MAX_CLUSTER_OFFSET)
                new_cluster = self.alloc_clusters_noref(cs, limit)
                if new_cluster == 0:
                    raise self.s.signal_corruption("Preventing invalid allocation of compressed "
                                             "cluster at offset 0")
                if not offset or -(-offset // cs) * cs != new_cluster:
                    offset = new_cluster
                    free_in_cluster = cs
                else:
                    free_in_cluster += cs
            try:
                self.update(offset, size, 1, False, DISCARD_NEVER)
            except RetryAllocation:
                offset = 0
                continue
            break
        self.s.l2_cache.set_dependency(self.cache)
        self.free_byte_offset = offset + size
        if not self.free_byte_offset & (cs - 1):
            self.free_byte_offset = 0
        return offset

    # -- refcount updates ----------------------------------------------------------

    def update(self, offset: int, length: int, addend: int, decrease: bool,
               discard_type: int) -> None:
        """Add (or subtract) ``addend`` to the refcount of every cluster touched.

        Raises RetryAllocation when a refcount block had to be allocated
        first (its cluster may be one the caller wanted); the partial update
        is undone first, as QEMU does.
        """
        if length < 0:
            raise ImageError("Invalid argument", errno=errno.EINVAL)
        if length == 0:
            return
        cs = self.cluster_size
        if decrease:
            self.cache.set_dependency(self.s.l2_cache)
        start = offset & ~(cs - 1)
        last = (offset + length - 1) & ~(cs - 1)
        cluster_offset = start
        block: array | None = None
        block_offset = 0
        old_table_index = -1
        error: BaseException | None = None
        entry_mask = self.block_entries - 1
        try:
            while cluster_offset <= last:
                cluster_index = cluster_offset >> self.cluster_bits
                table_index = cluster_index >> self.block_bits
                if table_index != old_table_index:
                    try:
                        block, block_offset = self._alloc_block(cluster_index)
                    except RetryAllocation:
                        if self.free_cluster_index > (start >> self.cluster_bits):
                            self.free_cluster_index = start >> self.cluster_bits
                        raise
                old_table_index = table_index
                assert block is not None
                self.cache.mark_dirty(block_offset)
                position = cluster_index & entry_mask
                refcount = block[position]
                if decrease:
                    if refcount < addend:
                        raise ImageError("Invalid argument", errno=errno.EINVAL)
                    refcount -= addend
                else:
                    if refcount + addend > self.max:
                        raise ImageError("Invalid argument", errno=errno.EINVAL)
                    refcount += addend
                if refcount == 0:
                    if decrease:
                        self.freed_pending = True
                    if cluster_index < self.free_cluster_index:
                        self.free_cluster_index = cluster_index
                block[position] = refcount
                if refcount == 0:
                    # QEMU drops a cached table whose cluster was freed; it
                    # looks the table up by the start of the whole range.
                    if self.cache.lookup(offset) is not None:
                        old_table_index = -1
                        self.cache.discard(offset)
                    if self.s.l2_cache.lookup(offset) is not None:
                        self.s.l2_cache.discard(offset)
                    if self.s.discard_passthrough[discard_type]:
                        self._queue_discard(cluster_offset, cs)
                cluster_offset += cs
        except BaseException as exc:
            error = exc
        if not self.cache_discards:
            self.process_discards(error is None)
        if error is not None:
            if cluster_offset > offset:
                try:
                    self.update(offset, cluster_offset - offset, addend, not decrease,
                                DISCARD_NEVER)
                except ImageError:
                    pass
            raise error

    def _queue_discard(self, offset: int, length: int) -> None:
        queue_discard(self.discards, offset, length)

    def process_discards(self, success: bool) -> None:
        """Pass queued discards down to the file (punch holes)."""
        discards = self.discards
        self.discards = []
        if success:
            for offset, length in discards:
                self.file.discard(offset, length)

    def free_clusters(self, offset: int, size: int, discard_type: int) -> None:
        """Drop one reference to the clusters of a byte range.

        A failure leaks the clusters rather than failing the request, as in
        QEMU; the line QEMU prints then is kept in the driver's messages.
        """
        try:
            self.update(offset, size, 1, True, discard_type)
        except CorruptImageError:
            raise
        except RetryAllocation:
            self.s.messages.append("qcow2_free_clusters failed: "
                                   + os.strerror(errno.EAGAIN))
        except ImageError as exc:
            self.s.messages.append(f"qcow2_free_clusters failed: {exc}")

    def free_any_cluster(self, l2_entry: int, discard_type: int) -> None:
        """Free whatever an L2 entry points to (normal or compressed)."""
        s = self.s
        if l2_entry & OFLAG_COMPRESSED:
            coffset, csize = s.parse_compressed_entry(l2_entry)
            self.free_clusters(coffset, csize, discard_type)
            return
        host = l2_entry & L2E_OFFSET_MASK
        if not host:
            return  # unallocated or a plain zero cluster
        if host & (self.cluster_size - 1):
            s.report_corruption(f"Cannot free unaligned cluster {hexc(host)}")
            return
        self.free_clusters(host, self.cluster_size, discard_type)

    # -- refcount blocks and table growth ----------------------------------------------

    def _alloc_block(self, cluster_index: int) -> tuple[array, int]:
        """The refcount block covering ``cluster_index``, allocating it if needed.

        Returns (block, its offset) or raises RetryAllocation after placing
        a new block (and possibly a new table).
        """
        s = self.s
        cs = self.cluster_size
        table_index = cluster_index >> self.block_bits
        if table_index < self.table_size:
            block_offset = self.table[table_index] & REFT_OFFSET_MASK
            if block_offset:
                if block_offset >= self.file.size():
                    # As for L2 tables: never grow the file to a hostile offset.
                    raise CorruptImageError(
                        f"Refblock offset {hexc(block_offset)} lies beyond the end of the "
                        f"file (reftable index: {hexc(table_index)})", errno=errno.EIO)
                return self._block(block_offset, table_index), block_offset

        # Writing to the refcount table may make L2 tables reachable.
        s.flush_metadata(s.l2_cache)
        new_block = self.alloc_clusters_noref(cs)
        if new_block == 0:
            raise s.signal_corruption("Preventing invalid allocation of refcount block at offset 0")

        if self._same_block(new_block, cluster_index << self.cluster_bits):
            block = self.cache.get_empty(new_block)
            block[(new_block >> self.cluster_bits) & (self.block_entries - 1)] = 1
        else:
            # Described by another block; this recurses at most twice.
            self.update(new_block, cs, 1, False, DISCARD_NEVER)
            self.s.flush_metadata(self.cache)
            self.cache.get_empty(new_block)
        self.cache.mark_dirty(new_block)
        self.s.flush_metadata(self.cache)

        if table_index < self.table_size:
            s.check_metadata_write(self.table_offset + table_index * REFTABLE_ENTRY_SIZE,
                                   REFTABLE_ENTRY_SIZE, ignore="refcount table")
            self.file.pwrite(self.table_offset + table_index * REFTABLE_ENTRY_SIZE,
                             struct.pack(">Q", new_block))
            self.table[table_index] = new_block
            self.max_table_index = max(self.max_table_index, table_index)
            s.metadata_changed()
            raise RetryAllocation()

        # The table is full: lay out a new table and blocks at the end.
        blocks_used = -(-max(cluster_index + 1, (new_block >> self.cluster_bits) + 1)
                        // self.block_entries)
        meta_offset = blocks_used * self.block_entries * cs
        self.refcount_area(meta_offset, 0, False, table_index, new_block)
        raise RetryAllocation()

    def _same_block(self, offset_a: int, offset_b: int) -> bool:
        shift = self.cluster_bits + self.block_bits
        return offset_a >> shift == offset_b >> shift

    def refcount_area(self, start_offset: int, additional_clusters: int, exact_size: bool,
                      new_block_index: int, new_block_offset: int) -> int:
        """Create a self-describing refcount table and blocks at ``start_offset``.

        Returns the offset just past the new structures.
        """
        s = self.s
        cs = self.cluster_size
        area = RefcountAreaLayout(start_offset, additional_clusters, exact_size, cs,
                                  self.order, self.table, self.max_table_index,
                                  new_block_index, new_block_offset)
        new_table = area.table
        table_offset, table_size = area.table_offset, area.table_size
        table_clusters, end_offset = area.table_clusters, area.end_offset

        block_offset = start_offset
        for i in range(area.area_index, area.total_blocks):
            if new_table[i]:
                block = self.cache.get(new_table[i] & REFT_OFFSET_MASK)
                this_offset = new_table[i] & REFT_OFFSET_MASK
            else:
                block = self.cache.get_empty(block_offset)
                this_offset = block_offset
                new_table[i] = block_offset
                block_offset += cs
            own = area.self_references(i, self.block_entries, cs, start_offset)
            if own:
                for k in own:
                    block[k] = 1
                self.cache.mark_dirty(this_offset)
        self.s.flush_metadata(self.cache)

        raw_table = encode_table(new_table)
        self.file.pwrite(table_offset, raw_table)
        self.file.pwrite(OFFSET_REFCOUNT_TABLE, struct.pack(">QI", table_offset, table_clusters))

        old_offset = self.table_offset
        old_size = self.table_size
        self.table = new_table
        self.table_size = table_size
        self.table_offset = table_offset
        self._update_max_table_index()
        s.metadata_changed()
        self.free_clusters(old_offset, old_size * REFTABLE_ENTRY_SIZE, DISCARD_OTHER)
        return end_offset
