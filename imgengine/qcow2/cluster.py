"""Guest-to-host cluster mapping: L1/L2 tables (QEMU's qcow2-cluster.c).

Looking up where a guest range lives, allocating clusters for writes with
copy-on-write of the untouched parts, turning clusters into zero clusters,
discarding them, and growing the L1 table.  The decisions (which clusters
are kept, which are newly allocated, in which order L2 tables and data
clusters are taken) follow QEMU 7.2 exactly, because host offsets are
compared with QEMU's.

The engine supports standard (not extended) L2 entries, so a subcluster is
always a whole cluster.
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections.abc import Iterator

from ..errors import CorruptImageError, ImageError
from ..node import DATA, OFFSET_VALID, RECURSE, ZERO
from ..record import Record
from .format import (
    L1E_OFFSET_MASK,
    L1E_SIZE,
    L2E_OFFSET_MASK,
    MAX_L1_SIZE,
    OFFSET_L1_SIZE,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    encode_table,
    hexc,
)
from .refcount import DISCARD_ALWAYS, DISCARD_NEVER, DISCARD_OTHER, DISCARD_REQUEST

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from .driver import Qcow2Driver

# Cluster types, named after QEMU's QCow2SubclusterType.
UNALLOCATED = 0
ZERO_PLAIN = 2
ZERO_ALLOC = 3
NORMAL = 4
COMPRESSED = 5

# The bits of a standard L2 entry that decide its type (cluster_type): an
# entry with none of them is unallocated (COPIED or reserved bits alone do
# not allocate), one with only the zero flag among them is a plain zero
# cluster. The bulk walks test entries against this mask directly.
L2E_TYPE_BITS = OFLAG_ZERO | L2E_OFFSET_MASK | OFLAG_COMPRESSED

INT_MAX = 0x7FFFFFFF
REQUEST_MAX_BYTES = (INT_MAX >> 9) << 9
INVALID_OFFSET = -1


def cluster_type(entry: int) -> int:
    """The type of a standard L2 entry."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO:
        return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
    if not entry & L2E_OFFSET_MASK:
        return UNALLOCATED
    return NORMAL


def is_allocated_type(ctype: int) -> bool:
    return ctype in (COMPRESSED, NORMAL, ZERO_ALLOC)


def needs_new_alloc(entry: int) -> bool:
    """Writing this cluster needs a new host cluster (it is not ours alone)."""
    if entry & OFLAG_COMPRESSED:
        return True
    if entry & L2E_OFFSET_MASK and entry & OFLAG_COPIED:
        return False
    return True


class CowRegion(Record):
    """A part of newly allocated clusters that keeps its old contents."""

    __slots__ = _fields = ("offset", "nb_bytes")

    def __init__(self, offset: int, nb_bytes: int) -> None:
        self.offset = offset
        self.nb_bytes = nb_bytes


class L2Meta(Record):
    """An in-flight allocation: QEMU's QCowL2Meta."""

    __slots__ = _fields = ("offset", "alloc_offset", "nb_clusters", "keep_old_clusters",
                           "cow_start", "cow_end", "skip_cow", "data")

    def __init__(self, offset: int, alloc_offset: int, nb_clusters: int,
                 keep_old_clusters: bool, cow_start: CowRegion, cow_end: CowRegion,
                 skip_cow: bool = False, data: memoryview | None = None) -> None:
        self.offset = offset                # guest offset of the first cluster
        self.alloc_offset = alloc_offset    # host offset of the first cluster
        self.nb_clusters = nb_clusters
        self.keep_old_clusters = keep_old_clusters
        self.cow_start = cow_start
        self.cow_end = cow_end
        self.skip_cow = skip_cow
        self.data = data


class ClusterMapping:
    """Mixin for the qcow2 driver: the L1/L2 half of QEMU's qcow2 state."""

    s: Qcow2Driver

    # -- lookups -----------------------------------------------------------------------

    def l2_load(self: Qcow2Driver, offset: int, l2_offset: int) -> tuple[array, int]:
        """The cached L2 slice covering guest ``offset`` and its cache key."""
        index_in_table = (offset >> self.cluster_bits) & (self.l2_size - 1)
        key = l2_offset + (index_in_table & ~(self.l2_slice_size - 1)) * 8
        return self.l2_cache.get(key), key

    def get_host_offset(self: Qcow2Driver, offset: int, nbytes: int) -> tuple[int, int, int]:
        """(bytes of the same type from ``offset``, host offset or entry, type).

        For compressed clusters the whole L2 entry is returned instead of a
        host offset; unallocated and plain zero ranges return 0.
        """
        cb = self.cluster_bits
        cs = self.cluster_size
        offset_in_cluster = offset & (cs - 1)
        bytes_needed = nbytes + offset_in_cluster
        slice_index = (offset >> cb) & (self.l2_slice_size - 1)
        bytes_available = (self.l2_slice_size - slice_index) << cb
        if bytes_needed > bytes_available:
            bytes_needed = bytes_available
        host = 0
        l1_index = offset >> (self.l2_bits + cb)
        ctype = UNALLOCATED
        if l1_index < self.l1_size:
            l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK
            if l2_offset:
                if l2_offset & (cs - 1):
                    raise self.signal_corruption(f"L2 table offset {hexc(l2_offset)} unaligned "
                                           f"(L1 index: {hexc(l1_index)})")
                table, _ = self.l2_load(offset, l2_offset)
                entry = table[slice_index]
                ctype = cluster_type(entry)
                if self.qcow_version < 3 and ctype in (ZERO_PLAIN, ZERO_ALLOC):
                    raise self.signal_corruption(
                        f"Zero cluster entry found in pre-v3 image (L2 offset: "
                        f"{hexc(l2_offset)}, L2 index: {hexc(slice_index)})")
                if ctype == COMPRESSED:
                    host = entry
                elif ctype in (NORMAL, ZERO_ALLOC):
                    host_cluster = entry & L2E_OFFSET_MASK
                    host = host_cluster + offset_in_cluster
                    if host_cluster & (cs - 1):
                        raise self.signal_corruption(
                            f"Cluster allocation offset {hexc(host_cluster)} unaligned (L2 "
                            f"offset: {hexc(l2_offset)}, L2 index: {hexc(slice_index)})")
                nb_clusters = (bytes_needed + cs - 1) >> cb
                count = count_contiguous(table, slice_index, nb_clusters, ctype, cs)
                bytes_available = count << cb
        if bytes_available > bytes_needed:
            bytes_available = bytes_needed
        return bytes_available - offset_in_cluster, host, ctype

    def status_runs(self: Qcow2Driver, start: int, end: int) -> Iterator[tuple]:
        """Block status in bulk over ``[start, end)``, a whole L2 slice at a time.

        Yields (flags, length, host offset, file) tuples: what block_status
        reports, run after run (runs are not necessarily maximal; compressed
        clusters come one by one).  This is what qemu-img map is built on.
        """
        self._check_usable()
        if self.metadata_prealloc is None:
            self.metadata_prealloc = self._detect_metadata_preallocation()
        data_flags = DATA | OFFSET_VALID | (RECURSE if self.metadata_prealloc else 0)
        zero_alloc_flags = ZERO | OFFSET_VALID
        file = self.file
        cb = self.cluster_bits
        cs = self.cluster_size
        l2_span_bits = self.l2_bits + cb
        slice_entries = self.l2_slice_size
        v2 = self.qcow_version < 3
        offset_mask = L2E_OFFSET_MASK
        type_bits = L2E_TYPE_BITS
        pos = start
        while pos < end:
            l1_index = pos >> l2_span_bits
            span_end = min(end, (l1_index + 1) << l2_span_bits)
            l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK \
                if l1_index < self.l1_size else 0
            if not l2_offset:
                # Following L1 entries without an L2 table are the same run.
                next_index = self._next_l2_table(l1_index + 1, ((end - 1) >> l2_span_bits) + 1)
                if next_index >= self.l1_size:
                    span_end = end
                else:
                    span_end = min(end, next_index << l2_span_bits)
                yield 0, span_end - pos, None, None
                pos = span_end
                continue
            if l2_offset & (cs - 1):
                raise self.signal_corruption(f"L2 table offset {hexc(l2_offset)} unaligned "
                                       f"(L1 index: {hexc(l1_index)})")
            while pos < span_end:
                first = (pos >> cb) & (slice_entries - 1)
                slice_end = min(span_end, ((pos >> cb) - first + slice_entries) << cb)
                table, _ = self.l2_load(pos, l2_offset)
                stop = (((slice_end - 1) >> cb) & (slice_entries - 1)) + 1
                base = ((pos >> cb) - first) << cb   # guest offset of table[0]
                i = first
                run_start = pos
                while i < stop:
                    entry = table[i]
                    j = i + 1
                    if not entry & type_bits:
                        while j < stop and not table[j] & type_bits:
                            j += 1
                        flags = 0
                        host = None
                        run_file = None
                    elif not entry & 0x4000000000000001:
                        # A normal cluster: extend over host-contiguous ones.
                        host = entry & offset_mask
                        if host & (cs - 1):
                            self._unaligned_cluster(host, l2_offset, i)
                        expected = host + cs
                        while j < stop:
                            nxt = table[j]
                            if nxt & 0x4000000000000001 or nxt & offset_mask != expected:
                                break
                            expected += cs
                            j += 1
                        host += run_start - base - (i << cb)
                        flags = data_flags
                        run_file = file
                    elif entry & type_bits == OFLAG_ZERO and not v2:
                        # Plain zero clusters (ZERO_PLAIN), without calls.
                        while j < stop and table[j] & type_bits == OFLAG_ZERO:
                            j += 1
                        flags = ZERO
                        host = None
                        run_file = None
                    else:
                        ctype = cluster_type(entry)
                        if v2 and ctype in (ZERO_PLAIN, ZERO_ALLOC):
                            raise self.signal_corruption(
                                f"Zero cluster entry found in pre-v3 image (L2 offset: "
                                f"{hexc(l2_offset)}, L2 index: {hexc(i)})")
                        if ctype == COMPRESSED:
                            flags, host, run_file = DATA, None, None
                        else:
                            j = i + count_contiguous(table, i, stop - i, ctype, cs)
                            if ctype == ZERO_PLAIN:
                                flags, host, run_file = ZERO, None, None
                            else:
                                host = entry & offset_mask
                                if host & (cs - 1):
                                    self._unaligned_cluster(host, l2_offset, i)
                                host += run_start - base - (i << cb)
                                flags, run_file = zero_alloc_flags, file
                    run_end = base + (j << cb)
                    if run_end > slice_end:
                        run_end = slice_end
                    yield flags, run_end - run_start, host, run_file
                    run_start = run_end
                    i = j
                pos = slice_end

    def map_runs_alone(self: Qcow2Driver, start: int, end: int) -> Iterator[tuple] | None:
        """``qemu-img map``'s merged entries over ``[start, end)`` for this image
        taken alone (no backing file), as BlockNode.map_runs tuples; None where
        only the general walk applies (v2 images, metadata preallocation).

        The same classification as ``status_runs`` and the same merging as
        the chain's walk, done cluster by cluster in one loop: per entry this
        is most of what mapping an image of 100,000 extents costs.
        """
        self._check_usable()
        if self.metadata_prealloc is None:
            self.metadata_prealloc = self._detect_metadata_preallocation()
        if self.metadata_prealloc or self.qcow_version < 3:
            return None
        return self._map_runs_alone(start, end)

    def _map_runs_alone(self: Qcow2Driver, start: int, end: int) -> Iterator[tuple]:
        # Entries are merged while their kind (DATA | ZERO | OFFSET_VALID, 0 for
        # unallocated) stays the same and host offsets continue.
        data_kind = DATA | OFFSET_VALID
        zero_alloc_kind = ZERO | OFFSET_VALID
        # (present, zero, data) of each kind; unallocated reads as zeroes.
        kinds = {0: (False, True, False), ZERO: (True, True, False), DATA: (True, False, True),
                 data_kind: (True, False, True), zero_alloc_kind: (True, True, False)}
        filename = self.file.filename
        cb = self.cluster_bits
        cs = self.cluster_size
        in_cluster = cs - 1
        l2_span_bits = self.l2_bits + cb
        slice_entries = self.l2_slice_size
        offset_mask = L2E_OFFSET_MASK
        compressed_or_zero = OFLAG_COMPRESSED | OFLAG_ZERO
        type_bits = L2E_TYPE_BITS
        c_start = start
        c_kind = -1
        c_host: int | None = None
        pos = start
        while pos < end:
            l1_index = pos >> l2_span_bits
            span_end = min(end, (l1_index + 1) << l2_span_bits)
            l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK \
                if l1_index < self.l1_size else 0
            if not l2_offset:
                if c_kind != 0:
                    if c_kind >= 0:
                        present, zero, data = kinds[c_kind]
                        yield (c_start, pos - c_start, 0, present, zero, data, c_host,
                               filename if c_host is not None else None)
                    c_start, c_kind, c_host = pos, 0, None
                pos = span_end
                continue
            if l2_offset & in_cluster:
                raise self.signal_corruption(f"L2 table offset {hexc(l2_offset)} unaligned "
                                             f"(L1 index: {hexc(l1_index)})")
            while pos < span_end:
                first = (pos >> cb) & (slice_entries - 1)
                slice_end = min(span_end, ((pos >> cb) - first + slice_entries) << cb)
                table, _ = self.l2_load(pos, l2_offset)
                stop = (((slice_end - 1) >> cb) & (slice_entries - 1)) + 1
                # guest offset of the part of the entry that is mapped: pos for
                # the first (maybe mid-cluster), cluster starts after it
                guest = pos
                for entry in table[first:stop]:
                    if not entry & type_bits:
                        kind = 0
                        host = None
                    elif not entry & compressed_or_zero:
                        host = entry & offset_mask
                        if host & in_cluster:
                            self._unaligned_cluster(host, l2_offset,
                                                    (guest >> cb) & (slice_entries - 1))
                        host += guest & in_cluster
                        kind = data_kind
                    elif entry & type_bits == OFLAG_ZERO:
                        kind = ZERO
                        host = None
                    elif entry & OFLAG_COMPRESSED:
                        kind = DATA
                        host = None
                    else:
                        host = entry & offset_mask
                        if host & in_cluster:
                            self._unaligned_cluster(host, l2_offset,
                                                    (guest >> cb) & (slice_entries - 1))
                        host += guest & in_cluster
                        kind = zero_alloc_kind
                    if kind != c_kind or (host is not None
                                          and host != c_host + guest - c_start):  # type: ignore[operator]
                        if c_kind >= 0:
                            present, zero, data = kinds[c_kind]
                            yield (c_start, guest - c_start, 0, present, zero, data, c_host,
                                   filename if c_host is not None else None)
                        c_start, c_kind, c_host = guest, kind, host
                    guest = (guest | in_cluster) + 1
                pos = slice_end
        if c_kind >= 0:
            present, zero, data = kinds[c_kind]
            yield (c_start, end - c_start, 0, present, zero, data, c_host,
                   filename if c_host is not None else None)

    def _next_l2_table(self: Qcow2Driver, index: int, limit: int) -> int:
        """The first L1 index from ``index`` (below ``limit`` and the L1 size)
        that has an L2 table, or where the search stopped."""
        limit = min(limit, self.l1_size)
        table = self.l1_table
        if index < limit and not table[index]:
            # Skip all-zero entries in one go (the table is mostly zero in a
            # sparse image); what is left is checked entry by entry.
            raw = table[index:limit].tobytes()
            index += (len(raw) - len(raw.lstrip(b"\0"))) // 8
        while index < limit and not table[index] & L1E_OFFSET_MASK:
            index += 1
        return index

    def _unaligned_cluster(self: Qcow2Driver, host: int, l2_offset: int, index: int) -> None:
        raise self.signal_corruption(f"Cluster allocation offset {hexc(host)} unaligned (L2 "
                               f"offset: {hexc(l2_offset)}, L2 index: {hexc(index)})")

    # -- L1 table ------------------------------------------------------------------------

    def grow_l1_table(self: Qcow2Driver, min_size: int, exact_size: bool) -> None:
        """Give the L1 table at least ``min_size`` entries in a new place."""
        if min_size <= self.l1_size:
            return
        if min_size > INT_MAX // L1E_SIZE:
            raise ImageError("File too large", errno=errno.EFBIG)
        if exact_size:
            new_size = min_size
        else:
            new_size = max(self.l1_size, 1)
            while min_size > new_size:
                new_size = -(-new_size * 3 // 2)
        if new_size > MAX_L1_SIZE // L1E_SIZE:
            raise ImageError("File too large", errno=errno.EFBIG)
        new_bytes = new_size * L1E_SIZE
        new_table = array("Q", self.l1_table)
        new_table.extend(array("Q", bytes(8 * (new_size - self.l1_size))))
        refcounts = self.refcounts
        new_offset = refcounts.alloc_clusters(new_bytes)
        try:
            self.flush_metadata(refcounts.cache)
            self.check_metadata_write(new_offset, new_bytes, ignore=None)
            self.file.pwrite(new_offset, encode_table(new_table))
            self.file.pwrite(OFFSET_L1_SIZE, struct.pack(">IQ", new_size, new_offset))
        except BaseException:
            refcounts.free_clusters(new_offset, new_bytes, DISCARD_OTHER)
            raise
        old_offset, old_size = self.l1_table_offset, self.l1_size
        self.l1_table = new_table
        self.l1_table_offset = new_offset
        self.l1_size = new_size
        self.metadata_changed()
        refcounts.free_clusters(old_offset, old_size * L1E_SIZE, DISCARD_OTHER)

    def write_l1_entry(self: Qcow2Driver, l1_index: int) -> None:
        position = self.l1_table_offset + L1E_SIZE * l1_index
        self.check_metadata_write(position, L1E_SIZE, ignore="active L1 table")
        self.file.pwrite(position, struct.pack(">Q", self.l1_table[l1_index]))

    # -- L2 tables -------------------------------------------------------------------------

    def l2_allocate(self: Qcow2Driver, l1_index: int) -> None:
        """Give L1 entry ``l1_index`` a new L2 table (a copy of the old one, if any)."""
        old_entry = self.l1_table[l1_index]
        old_l2 = old_entry & L1E_OFFSET_MASK
        cs = self.cluster_size
        refcounts = self.refcounts
        l2_offset = refcounts.alloc_clusters(cs)
        try:
            if l2_offset == 0:
                raise self.signal_corruption("Preventing invalid allocation of L2 table at offset 0")
            self.flush_metadata(refcounts.cache)
            cache = self.l2_cache
            slice_bytes = self.l2_slice_size * 8
            for index in range(cs // slice_bytes):
                if old_l2:
                    # Copy the old slice before taking a cache slot for the new
                    # one, so that neither can be evicted half-done.
                    old_table = cache.get(old_l2 + index * slice_bytes)
                    contents = array(old_table.typecode, old_table)
                    table = cache.get_empty(l2_offset + index * slice_bytes)
                    table[:] = contents
                else:
                    cache.get_empty(l2_offset + index * slice_bytes)
                cache.mark_dirty(l2_offset + index * slice_bytes)
            self.flush_metadata(cache)
            self.l1_table[l1_index] = l2_offset | OFLAG_COPIED
            self.metadata_changed()
            self.write_l1_entry(l1_index)
        except BaseException:
            self.l1_table[l1_index] = old_entry
            self.metadata_changed()
            refcounts.free_clusters(l2_offset, cs, DISCARD_ALWAYS)
            raise

    def get_cluster_table(self: Qcow2Driver, offset: int) -> tuple[array, int, int]:
        """The L2 slice for ``offset``, creating or un-sharing the table if needed.

        Returns (slice, index in the slice, cache key of the slice).
        """
        cb = self.cluster_bits
        l1_index = offset >> (self.l2_bits + cb)
        if l1_index >= self.l1_size:
            self.grow_l1_table(l1_index + 1, False)
        l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK
        if l2_offset & (self.cluster_size - 1):
            raise self.signal_corruption(f"L2 table offset {hexc(l2_offset)} unaligned "
                                   f"(L1 index: {hexc(l1_index)})")
        if not self.l1_table[l1_index] & OFLAG_COPIED:
            self.l2_allocate(l1_index)
            if l2_offset:
                self.refcounts.free_clusters(l2_offset, self.cluster_size, DISCARD_OTHER)
            l2_offset = self.l1_table[l1_index] & L1E_OFFSET_MASK
        elif l2_offset >= self.file.size():
            # An L2 table in use always lies inside the file; updating one a
            # hostile L1 entry places far beyond it would only grow the file.
            # (A check of the engine's own: reads see zeroes there, as QEMU's.)
            raise CorruptImageError(f"L2 table offset {hexc(l2_offset)} lies beyond the end "
                                    f"of the file (L1 index: {hexc(l1_index)})",
                                    errno=errno.EIO)
        table, key = self.l2_load(offset, l2_offset)
        return table, (offset >> cb) & (self.l2_slice_size - 1), key

    # -- allocation for writes ---------------------------------------------------------------

    def alloc_host_offset(self: Qcow2Driver, offset: int,
                          nbytes: int) -> tuple[int, int, list[L2Meta]]:
        """Find or allocate host space for a guest range (qcow2_alloc_host_offset).

        Returns (bytes handled from ``offset``, host offset of ``offset``,
        the allocations to link, newest first).
        """
        start = offset
        remaining = nbytes
        cluster_offset = INVALID_OFFSET
        host_offset = INVALID_OFFSET
        cur_bytes = 0
        metas: list[L2Meta] = []
        while True:
            if host_offset == INVALID_OFFSET and cluster_offset != INVALID_OFFSET:
                host_offset = cluster_offset
            start += cur_bytes
            remaining -= cur_bytes
            if cluster_offset != INVALID_OFFSET:
                cluster_offset += cur_bytes
            if remaining == 0:
                break
            cur_bytes = remaining
            done, cluster_offset, cur_bytes = self.handle_copied(start, cluster_offset,
                                                                 cur_bytes, metas)
            if done:
                continue
            if cur_bytes == 0:
                break
            done, cluster_offset, cur_bytes = self.handle_alloc(start, cluster_offset,
                                                                cur_bytes, metas)
            if done:
                continue
            break
        return nbytes - remaining, host_offset, metas

    def _clusters_in_slice(self: Qcow2Driver, guest_offset: int, nbytes: int) -> int:
        """Clusters the range touches, capped at the end of its L2 slice and at
        the largest request (handle_copied and handle_alloc look no further)."""
        cb = self.cluster_bits
        oic = guest_offset & (self.cluster_size - 1)
        slice_index = (guest_offset >> cb) & (self.l2_slice_size - 1)
        return min((oic + nbytes + self.cluster_size - 1) >> cb,
                   self.l2_slice_size - slice_index, REQUEST_MAX_BYTES >> cb)

    def handle_copied(self: Qcow2Driver, guest_offset: int, host_offset: int, nbytes: int,
                      metas: list[L2Meta]) -> tuple[bool, int, int]:
        """Count clusters that can be overwritten in place."""
        cs = self.cluster_size
        oic = guest_offset & (cs - 1)
        nb_clusters = self._clusters_in_slice(guest_offset, nbytes)
        table, index, _ = self.get_cluster_table(guest_offset)
        entry = table[index]
        cluster_offset = entry & L2E_OFFSET_MASK
        if needs_new_alloc(entry):
            return False, host_offset, nbytes
        if cluster_offset & (cs - 1):
            kind = "Preallocated zero" if entry & OFLAG_ZERO else "Data"
            raise self.signal_corruption(f"{kind} cluster offset {hexc(cluster_offset)} unaligned "
                                   f"(guest offset: {hexc(guest_offset)})")
        if host_offset != INVALID_OFFSET and cluster_offset != host_offset:
            return False, host_offset, 0
        if cluster_offset >= self.file.size():
            # Allocated clusters always lie inside the file: writing there
            # would only grow the file to wherever a hostile entry points.
            # (A check of the engine's own: no QEMU notice, no corrupt bit.)
            raise CorruptImageError(f"Data cluster offset {hexc(cluster_offset)} lies beyond "
                                    f"the end of the file (guest offset: "
                                    f"{hexc(guest_offset)})", errno=errno.EIO)
        keep = count_single_write_clusters(table, index, nb_clusters, False, cs)
        nbytes = min(nbytes, keep * cs - oic)
        self.calculate_l2_meta(cluster_offset, guest_offset, nbytes, table, True, metas)
        return True, cluster_offset + oic, nbytes

    def handle_alloc(self: Qcow2Driver, guest_offset: int, host_offset: int, nbytes: int,
                     metas: list[L2Meta]) -> tuple[bool, int, int]:
        """Allocate new clusters for a range that cannot be written in place."""
        cs = self.cluster_size
        cb = self.cluster_bits
        oic = guest_offset & (cs - 1)
        nb_clusters = self._clusters_in_slice(guest_offset, nbytes)
        table, index, _ = self.get_cluster_table(guest_offset)
        nb_clusters = count_single_write_clusters(table, index, nb_clusters, True, cs)
        if host_offset == INVALID_OFFSET:
            alloc_offset = self.refcounts.alloc_clusters(nb_clusters * cs)
        else:
            alloc_offset = host_offset & ~(cs - 1)
            nb_clusters = self.refcounts.alloc_clusters_at(alloc_offset, nb_clusters)
            if nb_clusters == 0:
                return False, host_offset, 0
        requested = nbytes + oic
        nb_bytes = min(requested, nb_clusters << cb)
        nbytes = min(nbytes, nb_bytes - oic)
        self.calculate_l2_meta(alloc_offset, guest_offset, nbytes, table, False, metas)
        return True, alloc_offset + oic, nbytes

    def calculate_l2_meta(self: Qcow2Driver, host_cluster_offset: int, guest_offset: int,
                          nbytes: int, table: array, keep_old: bool,
                          metas: list[L2Meta]) -> None:
        """Record which parts of the touched clusters must be copied on write."""
        cs = self.cluster_size
        index = (guest_offset >> self.cluster_bits) & (self.l2_slice_size - 1)
        cow_start_to = guest_offset & (cs - 1)
        cow_end_from = cow_start_to + nbytes
        nb_clusters = (cow_end_from + cs - 1) >> self.cluster_bits
        if keep_old:
            for i in range(nb_clusters):
                if cluster_type(table[index + i]) != NORMAL:
                    break
            else:
                return  # plain overwrite in place: nothing to copy or link
        first_type = cluster_type(table[index])
        if not keep_old or first_type != NORMAL:
            cow_start_from = 0
        else:
            cow_start_from = cow_start_to
        last_type = cluster_type(table[index + nb_clusters - 1])
        if keep_old and last_type == NORMAL:
            cow_end_to = cow_end_from
        else:
            cow_end_to = -(-cow_end_from // cs) * cs
        metas.insert(0, L2Meta(
            offset=guest_offset & ~(cs - 1), alloc_offset=host_cluster_offset,
            nb_clusters=nb_clusters, keep_old_clusters=keep_old,
            cow_start=CowRegion(cow_start_from, cow_start_to - cow_start_from),
            cow_end=CowRegion(cow_end_from, cow_end_to - cow_end_from)))

    def perform_cow(self: Qcow2Driver, m: L2Meta) -> None:
        """Copy the untouched parts of newly allocated clusters from the old view."""
        start, end = m.cow_start, m.cow_end
        if (start.nb_bytes == 0 and end.nb_bytes == 0) or m.skip_cow:
            return
        data_bytes = end.offset - (start.offset + start.nb_bytes)
        merge_reads = start.nb_bytes and end.nb_bytes and data_bytes <= 16384
        if merge_reads:
            whole = self.preadv(m.offset + start.offset,
                                start.nb_bytes + data_bytes + end.nb_bytes)
            start_buf = whole[:start.nb_bytes]
            end_buf = whole[len(whole) - end.nb_bytes:]
        else:
            start_buf = self.preadv(m.offset + start.offset, start.nb_bytes) \
                if start.nb_bytes else b""
            end_buf = self.preadv(m.offset + end.offset, end.nb_bytes) \
                if end.nb_bytes else b""
        if m.data is not None:
            buffers = [b for b in (start_buf, m.data, end_buf) if len(b)]
            total = sum(len(b) for b in buffers)
            self.check_metadata_write(m.alloc_offset + start.offset, total, ignore=None)
            self.file.pwritev(m.alloc_offset + start.offset, buffers)
        else:
            if start.nb_bytes:
                self.check_metadata_write(m.alloc_offset + start.offset, start.nb_bytes,
                                          ignore=None)
                self.file.pwrite(m.alloc_offset + start.offset, start_buf)
            if end.nb_bytes:
                self.check_metadata_write(m.alloc_offset + end.offset, end.nb_bytes,
                                          ignore=None)
                self.file.pwrite(m.alloc_offset + end.offset, end_buf)

    def link_l2(self: Qcow2Driver, m: L2Meta) -> None:
        """Copy on write, then point the L2 entries at the new clusters."""
        self.perform_cow(m)
        if self.use_lazy_refcounts:
            self.mark_dirty()
        if self.need_accurate_refcounts():
            self.l2_cache.set_dependency(self.refcounts.cache)
        table, index, key = self.get_cluster_table(m.offset)
        self.l2_cache.mark_dirty(key)
        cs = self.cluster_size
        old_entries = []
        host = m.alloc_offset
        for i in range(m.nb_clusters):
            old = table[index + i]
            if old:
                old_entries.append(old)
            table[index + i] = (host + i * cs) | OFLAG_COPIED
        if not m.keep_old_clusters:
            for old in old_entries:
                self.refcounts.free_any_cluster(old, DISCARD_NEVER)

    def alloc_cluster_abort(self: Qcow2Driver, m: L2Meta) -> None:
        if not m.keep_old_clusters:
            self.refcounts.free_clusters(m.alloc_offset, m.nb_clusters << self.cluster_bits,
                                         DISCARD_NEVER)

    # -- zeroing and discarding -----------------------------------------------------------

    def zero_in_l2_slice(self: Qcow2Driver, offset: int, nb_clusters: int,
                         may_unmap: bool) -> int:
        table, index, key = self.get_cluster_table(offset)
        nb_clusters = min(nb_clusters, self.l2_slice_size - index)
        cache = self.l2_cache
        free_any = self.refcounts.free_any_cluster
        for i in range(index, index + nb_clusters):
            old = table[i]
            ctype = cluster_type(old)
            unmap = ctype == COMPRESSED or (may_unmap and is_allocated_type(ctype))
            new = (0 if unmap else old) | OFLAG_ZERO
            if old == new:
                continue
            cache.mark_dirty(key)
            table[i] = new
            if unmap:
                free_any(old, DISCARD_REQUEST)
        return nb_clusters

    def subcluster_zeroize(self: Qcow2Driver, offset: int, nbytes: int, may_unmap: bool) -> None:
        """Turn whole clusters into zero clusters (qcow2_subcluster_zeroize)."""
        if self.qcow_version < 3:
            if self.backing is None:
                self.cluster_discard(offset, nbytes, DISCARD_REQUEST, False)
                return
            from ..hostfile import NotSupported

            raise NotSupported()
        cs = self.cluster_size
        nb_clusters = (nbytes + cs - 1) >> self.cluster_bits
        refcounts = self.refcounts
        refcounts.cache_discards = True
        ok = False
        try:
            while nb_clusters > 0:
                cleared = self.zero_in_l2_slice(offset, nb_clusters, may_unmap)
                nb_clusters -= cleared
                offset += cleared * cs
            ok = True
        finally:
            refcounts.cache_discards = False
            refcounts.process_discards(ok)

    def discard_in_l2_slice(self: Qcow2Driver, offset: int, nb_clusters: int,
                            discard_type: int, full_discard: bool) -> int:
        table, index, key = self.get_cluster_table(offset)
        nb_clusters = min(nb_clusters, self.l2_slice_size - index)
        has_backing = self.backing is not None
        zero_entry = OFLAG_ZERO if self.qcow_version >= 3 else 0
        cache = self.l2_cache
        free_any = self.refcounts.free_any_cluster
        for i in range(index, index + nb_clusters):
            old = table[i]
            if full_discard:
                new = 0
            elif has_backing or is_allocated_type(cluster_type(old)):
                new = zero_entry
            else:
                new = old
            if old == new:
                continue
            cache.mark_dirty(key)
            table[i] = new
            free_any(old, discard_type)
        return nb_clusters

    def cluster_discard(self: Qcow2Driver, offset: int, nbytes: int, discard_type: int,
                        full_discard: bool) -> None:
        """Drop the clusters of an aligned range (qcow2_cluster_discard)."""
        cs = self.cluster_size
        nb_clusters = (nbytes + cs - 1) >> self.cluster_bits
        refcounts = self.refcounts
        refcounts.cache_discards = True
        ok = False
        try:
            while nb_clusters > 0:
                cleared = self.discard_in_l2_slice(offset, nb_clusters, discard_type,
                                                   full_discard)
                nb_clusters -= cleared
                offset += cleared * cs
            ok = True
        finally:
            refcounts.cache_discards = False
            refcounts.process_discards(ok)


def count_contiguous(table: array, index: int, nb_clusters: int, ctype: int,
                     cluster_size: int) -> int:
    """How many clusters from ``index`` share the type (and host contiguity)."""
    if ctype == COMPRESSED:
        return 1
    end = index + nb_clusters
    if ctype == UNALLOCATED:
        i = index + 1
        while i < end and not table[i] & (L2E_OFFSET_MASK | OFLAG_ZERO | OFLAG_COMPRESSED):
            i += 1
        return i - index
    if ctype == ZERO_PLAIN:
        i = index + 1
        while i < end:
            entry = table[i]
            if entry & OFLAG_COMPRESSED or not entry & OFLAG_ZERO or entry & L2E_OFFSET_MASK:
                break
            i += 1
        return i - index
    expected = table[index] & L2E_OFFSET_MASK
    want_zero = ctype == ZERO_ALLOC
    i = index + 1
    while i < end:
        entry = table[i]
        expected += cluster_size
        if (entry & OFLAG_COMPRESSED or bool(entry & OFLAG_ZERO) != want_zero
                or entry & L2E_OFFSET_MASK != expected):
            break
        i += 1
    return i - index


def count_single_write_clusters(table: array, index: int, nb_clusters: int,
                                new_alloc: bool, cluster_size: int) -> int:
    """Clusters from ``index`` that all need (or all don't need) new allocation."""
    expected = table[index] & L2E_OFFSET_MASK
    i = 0
    while i < nb_clusters:
        entry = table[index + i]
        if needs_new_alloc(entry) != new_alloc:
            break
        if not new_alloc:
            if expected != entry & L2E_OFFSET_MASK:
                break
            expected += cluster_size
        i += 1
    return i
