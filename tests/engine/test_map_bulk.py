"""The qcow2 driver's one-loop map of an image without backing
(Qcow2Driver.map_runs_alone) against the general chain walk it short-cuts.

The short cut classifies L2 entries and merges entries itself, for speed;
these tests draw single-layer images (plain data, zero clusters with and
without host clusters, discarded and compressed clusters, unaligned image
tails, ranges starting and ending mid-cluster) and require the same entries
from both walks, and that BlockNode.map and BlockNode.map_runs agree.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import given
from hypothesis import strategies as st

from imgengine import ImageError, create_image, open_image
from imgengine.qcow2.driver import Qcow2Driver

KIB = 1024


def _general_walk(node, start: int, length: int) -> list[tuple]:
    """map_runs with the driver's short cut switched off."""
    short_cut = Qcow2Driver.map_runs_alone
    Qcow2Driver.map_runs_alone = lambda self, start, end: None  # type: ignore[method-assign]
    try:
        return list(node.map_runs(start, length))
    finally:
        Qcow2Driver.map_runs_alone = short_cut  # type: ignore[method-assign]


@given(data=st.data())
def test_single_layer_map_matches_general_walk(data):
    cluster = data.draw(st.sampled_from([512, 4096, 65536]), label="cluster")
    clusters = data.draw(st.integers(1, 300), label="clusters")
    tail = data.draw(st.sampled_from([0, 512, cluster // 2 if cluster > 1024 else 0]),
                     label="tail")
    size = clusters * cluster + tail
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "t.qcow2")
        create_image(path, "qcow2", {"size": str(size), "cluster_size": str(cluster)})
        with open_image(path) as node:
            for _ in range(data.draw(st.integers(0, 25), label="steps")):
                offset = data.draw(st.integers(0, size // 512 - 1), label="offset") * 512
                length = data.draw(st.integers(1, min(size - offset, 8 * cluster) // 512),
                                   label="length") * 512
                kind = data.draw(st.sampled_from(["write", "zero", "zero-unmap", "discard",
                                                  "compressed"]), label="kind")
                try:
                    if kind == "write":
                        node.write(offset, b"\x5a" * length)
                    elif kind == "zero":
                        node.write_zeroes(offset, length)
                    elif kind == "zero-unmap":
                        node.write_zeroes(offset, length, may_unmap=True)
                    elif kind == "discard":
                        node.discard(offset, length)
                    elif offset // cluster < clusters:
                        start = offset // cluster * cluster
                        node.write_compressed(start, b"\x11" * 512 + bytes(cluster - 512))
                except ImageError:
                    # An allocated cluster cannot be written compressed; and a
                    # compressed write that needs a new L2 table can trip the
                    # overlap check and mark the image corrupt, as in QEMU 7.2
                    # (no more writes then). What is on disk is mapped anyway.
                    if node.driver.broken:
                        break
        with open_image(path, read_only=True) as node:
            ranges = [(0, size)] + [
                (start, data.draw(st.integers(0, size), label="range length"))
                for start in data.draw(st.lists(st.integers(0, size), max_size=3),
                                       label="range starts")]
            for start, length in ranges:
                fast = list(node.map_runs(start, length))
                assert fast == _general_walk(node, start, length)
                assert fast == [(e.start, e.length, e.depth, e.present, e.zero, e.data,
                                 e.offset, e.filename) for e in node.map(start, length)]
