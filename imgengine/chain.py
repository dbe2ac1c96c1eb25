"""The backing chain: block status above a node, and the ``qemu-img map`` walk.

``status_above`` is QEMU's bdrv_co_common_block_status_above: it asks each
layer in turn until one holds the range, and turns a range that a short
backing file cannot supply into zeroes "allocated" at that layer.
``map_entry`` and ``map_entries`` reproduce qemu-img map's per-layer walk
(depth counting, ``present``) and its merging of adjacent entries.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterator

from .hostfile import HostFile
from .node import ALLOCATED, DATA, EOF, OFFSET_VALID, RAW, RECURSE, ZERO, BlockNode

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from .api import MapEntry


# Block status through a chain: (flags: int, pnum: int, offset: int | None,
# node: BlockNode | None, depth: int).
ChainStatus = namedtuple("ChainStatus", "flags pnum offset node depth")


def status_above(top: BlockNode, base: BlockNode | None, include_base: bool,
                 want_zero: bool, offset: int, length: int) -> ChainStatus:
    """Block status of ``top`` through its chain down to (not into) ``base``."""
    if not include_base and top is base:
        return ChainStatus(0, length, None, None, 0)
    flags, pnum, host, file = top.status(want_zero, offset, length)
    depth = 1
    if not pnum or flags & ALLOCATED or top is base:
        return ChainStatus(flags, pnum, host, top, depth)
    eof = offset + pnum if flags & EOF else 0
    length = pnum
    layer = top.backing
    found = top
    while layer is not None and (include_base or layer is not base):
        flags, pnum, host, file = layer.status(want_zero, offset, length)
        depth += 1
        found = layer
        if not pnum:
            # The layer above deferred to this one, which is too short: the
            # zeroes beyond its end count as allocated here.
            pnum = length
            flags = ZERO | ALLOCATED
            host = None
            break
        if flags & ALLOCATED:
            flags &= ~EOF
            break
        if layer is base:
            break
        length = pnum
        layer = layer.backing
    if offset + pnum == eof:
        flags |= EOF
    return ChainStatus(flags, pnum, host, found, depth)


def is_zero_fast(node: BlockNode, offset: int, length: int) -> bool:
    """bdrv_co_is_zero_fast: the range is known to read as zeroes."""
    if not length:
        return True
    st = status_above(node, None, False, False, offset, length)
    return st.pnum == length and bool(st.flags & ZERO)


def is_zero(node: BlockNode, offset: int, length: int) -> bool:
    """qcow2's is_zero: every byte of the range reads as zero through the chain."""
    size = node.length()
    if offset + length > size:
        length = size - offset
    if length <= 0:
        return True
    while True:
        st = status_above(node, None, False, True, offset, length)
        offset += st.pnum
        length -= st.pnum
        if not (st.flags & ZERO and st.pnum and length):
            break
    return bool(st.flags & ZERO) and length == 0


def map_entry(node: BlockNode, offset: int, length: int) -> MapEntry:
    """qemu-img map's get_block_status: the first layer holding the range."""
    from .api import MapEntry

    depth = 0
    layer: BlockNode | None = node
    while True:
        assert layer is not None
        flags, pnum, host, file = layer.status(True, offset, length)
        length = pnum
        if flags & (ZERO | DATA):
            break
        below = layer.backing
        if below is None:
            flags = 0
            break
        layer = below
        depth += 1
    has_offset = bool(flags & OFFSET_VALID)
    return MapEntry(start=offset, length=length, depth=depth,
                    present=bool(flags & ALLOCATED), zero=bool(flags & ZERO),
                    data=bool(flags & DATA),
                    offset=host if has_offset else None,
                    filename=file.filename if has_offset and file is not None else None)


def mergeable(curr: MapEntry, nxt: MapEntry) -> bool:
    """qemu-img map's entry_mergeable."""
    if curr.length == 0:
        return False
    if (curr.zero != nxt.zero or curr.data != nxt.data or curr.depth != nxt.depth
            or curr.present != nxt.present
            or (curr.filename is None) != (nxt.filename is None)
            or (curr.offset is None) != (nxt.offset is None)):
        return False
    if curr.filename is not None and curr.filename != nxt.filename:
        return False
    if curr.offset is not None and curr.offset + curr.length != nxt.offset:
        return False
    return True


def _file_runs(file: HostFile, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
    """(offset, length, flags) of a file's own block status, run after run."""
    end = offset + length
    while offset < end:
        flags, pnum = file.block_status(offset, end - offset)
        if pnum <= 0:
            # Past the end of the file everything reads as zero.
            yield offset, end - offset, ZERO | EOF
            return
        yield offset, pnum, flags
        offset += pnum


# A map run: (start, length, depth, present, zero, data, host offset, file).
_Run = tuple[int, int, int, bool, bool, bool, "int | None", "HostFile | None"]


def _layer_runs(node: BlockNode, start: int, end: int, depth: int) -> Iterator[_Run]:
    """What qemu-img map finds for ``[start, end)`` from ``node`` down, in bulk.

    Gives the same classification as repeated ``map_entry`` steps (each byte
    gets the layer, flags and host offset QEMU's walk gives it), a run at a
    time instead of a request at a time.
    """
    backing = node.backing
    backing_end = backing.length() if backing is not None else 0
    for flags, length, host, file in node.driver.status_runs(start, end):
        run_start = start
        start += length
        if not flags:
            if backing is None:
                yield run_start, length, depth, False, True, False, None, None
                continue
            below_end = min(run_start + length, backing_end)
            if run_start < below_end:
                yield from _layer_runs(backing, run_start, below_end, depth + 1)
            beyond = max(run_start, backing_end)
            if beyond < run_start + length:
                yield beyond, run_start + length - beyond, depth, False, True, False, None, None
            continue
        if flags & (RAW | RECURSE):
            if flags & RAW:
                for offset, size, file_flags in _file_runs(file, host, length):
                    yield (run_start + offset - host, size, depth, True,
                           bool(file_flags & ZERO), bool(file_flags & DATA), offset, file)
                continue
            # Metadata preallocation: holes in the file read as zero.
            for offset, size, file_flags in _file_runs(file, host, length):
                yield (run_start + offset - host, size, depth, True,
                       bool(file_flags & ZERO), True, offset, file)
            continue
        if flags & OFFSET_VALID:
            yield (run_start, length, depth, True, bool(flags & ZERO), bool(flags & DATA),
                   host, file)
        else:
            yield (run_start, length, depth, True, bool(flags & ZERO), bool(flags & DATA),
                   None, None)


def map_entries(node: BlockNode, start: int = 0,
                length: int | None = None) -> Iterator[MapEntry]:
    """The merged entries ``qemu-img map`` prints for ``[start, start+length)``."""
    from .api import MapEntry

    for run in map_runs(node, start, length):
        yield MapEntry(*run)


# A merged map entry as a plain tuple: MapEntry's fields in MapEntry's order
# (start, length, depth, present, zero, data, host offset, file name).
MapRun = tuple[int, int, int, bool, bool, bool, "int | None", "str | None"]


def map_runs(node: BlockNode, start: int = 0, length: int | None = None) -> Iterator[MapRun]:
    """``map_entries`` as plain tuples, for consumers of many entries."""
    end = node.length()
    if length is not None:
        end = min(start + length, end)
    if start >= end:
        yield start, 0, 0, False, False, False, None, None
        return
    if node.backing is None:
        yield from _single_layer_map(node, start, end)
        return
    # Runs are merged as qemu-img merges entries: same flags and depth, same
    # file, and host offsets that continue.
    c_start = c_size = c_depth = -1
    c_present = c_zero = c_data = False
    c_host: int | None = None
    c_file: HostFile | None = None
    for run_start, size, depth, present, zero, data, host, file in \
            _layer_runs(node, start, end, 0):
        if size <= 0:
            continue
        if (depth == c_depth and zero == c_zero and data == c_data and present == c_present
                and file is c_file
                and (host is None if c_host is None else host == c_host + c_size)):
            c_size += size
            continue
        if c_size > 0:
            yield (c_start, c_size, c_depth, c_present, c_zero, c_data, c_host,
                   c_file.filename if c_file is not None else None)
        c_start, c_size, c_depth, c_present, c_zero, c_data, c_host, c_file = \
            run_start, size, depth, present, zero, data, host, file
    if c_size > 0:
        yield (c_start, c_size, c_depth, c_present, c_zero, c_data, c_host,
               c_file.filename if c_file is not None else None)


# (present, zero, data) of a run of a layer without backing, by the run's
# DATA | ZERO | OFFSET_VALID flags: no flags is a hole, which reads as zeroes.
_SINGLE_LAYER_KINDS = tuple((bool(flags), bool(flags & ZERO) or not flags, bool(flags & DATA))
                            for flags in range(8))


def _single_layer_map(node: BlockNode, start: int, end: int) -> Iterator[MapRun]:
    """``map_runs`` of a node without backing: what ``_layer_runs`` and the
    merging in ``map_runs`` give, in one loop.

    Every entry has depth 0 and its (present, zero, data) follow from its
    flags alone, so runs merge when their flags match (and host offsets
    continue in the same file); this is what makes mapping an image of
    100,000 extents quick.
    """
    in_bulk = getattr(node.driver, "map_runs_alone", None)
    runs = in_bulk(start, end) if in_bulk is not None else None
    if runs is not None:
        yield from runs
        return
    kinds = _SINGLE_LAYER_KINDS
    wanted = DATA | ZERO | OFFSET_VALID
    c_start = start
    c_size = 0
    c_flags = -1
    c_host: int | None = None
    c_file: HostFile | None = None
    for flags, size, host, file in node.driver.status_runs(start, end):
        run_start = start
        start += size
        if size <= 0:
            continue
        if flags & (RAW | RECURSE):
            pieces = _file_pieces(flags, file, host, run_start, size)
        else:
            # The common case, without building pieces.
            flags &= wanted
            if flags & OFFSET_VALID:
                if flags == c_flags and file is c_file and host == c_host + c_size:  # type: ignore[operator]
                    c_size += size
                    continue
            elif flags == c_flags and c_host is None:
                c_size += size
                continue
            else:
                host = file = None
            if c_size > 0:
                present, zero, data = kinds[c_flags]
                yield (c_start, c_size, 0, present, zero, data, c_host,
                       c_file.filename if c_file is not None else None)
            c_start, c_size, c_flags, c_host, c_file = run_start, size, flags, host, file
            continue
        for flags, run_start, size, host in pieces:
            if size <= 0:
                continue
            if flags == c_flags and c_host is not None and file is c_file \
                    and host == c_host + c_size:
                c_size += size
                continue
            if c_size > 0:
                present, zero, data = kinds[c_flags]
                yield (c_start, c_size, 0, present, zero, data, c_host,
                       c_file.filename if c_file is not None else None)
            c_start, c_size, c_flags, c_host, c_file = run_start, size, flags, host, file
    if c_size > 0:
        present, zero, data = kinds[c_flags]
        yield (c_start, c_size, 0, present, zero, data, c_host,
               c_file.filename if c_file is not None else None)


def _file_pieces(flags: int, file: HostFile, host: int, run_start: int,
                 size: int) -> list[tuple[int, int, int, int]]:
    """A RAW or RECURSE run split as the file's own block status splits it:
    (flags, guest start, length, host offset) of each piece."""
    pieces = []
    for offset, piece, file_flags in _file_runs(file, host, size):
        # Metadata preallocation (RECURSE): holes in the file read as zero,
        # and the range is data all the same.
        data = file_flags & DATA if flags & RAW else DATA
        pieces.append(((file_flags & ZERO) | data | OFFSET_VALID,
                       run_start + offset - host, piece, offset))
    return pieces
