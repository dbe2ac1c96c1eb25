"""The backing chain: block status above a node, and the ``qemu-img map`` walk.

``status_above`` is QEMU's bdrv_co_common_block_status_above: it asks each
layer in turn until one holds the range, and turns a range that a short
backing file cannot supply into zeroes "allocated" at that layer.
``map_entry`` and ``map_entries`` reproduce qemu-img map's per-layer walk
(depth counting, ``present``) and its merging of adjacent entries.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from .errors import ImageError
from .node import ALLOCATED, DATA, EOF, OFFSET_VALID, ZERO, BlockNode

if TYPE_CHECKING:
    from .api import MapEntry


class ChainStatus(NamedTuple):
    flags: int
    pnum: int
    offset: int | None
    node: BlockNode | None
    depth: int


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


def map_entries(node: BlockNode, start: int = 0,
                length: int | None = None) -> Iterator[MapEntry]:
    """The merged entries ``qemu-img map`` prints for ``[start, start+length)``."""
    from .api import MapEntry

    end = node.length()
    if length is not None:
        end = min(start + length, end)
    curr = MapEntry(start=start, length=0, depth=0, present=False, zero=False,
                    data=False, offset=None, filename=None)
    while curr.start + curr.length < end:
        offset = curr.start + curr.length
        nxt = map_entry(node, offset, end - offset)
        if nxt.length <= 0:
            raise ImageError("Could not read file metadata: Input/output error",
                             errno=errno.EIO)
        if mergeable(curr, nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            yield curr
        curr = nxt
    if curr.length > 0 or start >= end:
        yield curr
