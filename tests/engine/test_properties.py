"""Property tests: random operations on random chains against a byte model.

The model keeps, for every layer, which clusters the layer holds itself and
their bytes; a range a layer does not hold reads from the layer below (zero
past its end).  The first modification of a cluster copies the whole
cluster from below (copy-on-write), a discard only affects whole clusters
(or the partial cluster at the end of the image), and on a v2 image with a
backing file discard does nothing.  Hypothesis draws chains of 1 to 3 layers
(mixed cluster sizes, v2 and v3, unaligned and differing sizes, raw bases)
and sequences of writes, write-zeroes, discards and reads; every read must
equal the model, and block status must agree with it: a range reported zero
reads as zero, ``present``/``depth`` name the layer that holds the range,
and ``is_allocated`` matches the layer's own clusters.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgengine import create_image, open_image

KIB = 1024


class ModelLayer:
    def __init__(self, name: str, fmt: str, size: int, cluster_size: int, v2: bool) -> None:
        self.name = name
        self.fmt = fmt
        self.size = size
        self.cluster_size = cluster_size
        self.v2 = v2
        self.data = bytearray(size)
        clusters = -(-size // cluster_size)
        self.owned = bytearray([1 if fmt == "raw" else 0]) * clusters

    def __repr__(self) -> str:
        kind = self.fmt if self.fmt == "raw" else \
            f"qcow2 v{2 if self.v2 else 3} cluster={self.cluster_size}"
        return f"<{self.name} {kind} size={self.size}>"


class Model:
    def __init__(self, layers: list[ModelLayer]) -> None:
        self.layers = layers

    def view(self, index: int, offset: int, length: int) -> bytes:
        """What reading layer ``index`` returns (zero past its end)."""
        if index < 0:
            return bytes(length)
        layer = self.layers[index]
        out = bytearray(length)
        pos = offset
        end = offset + length
        cs = layer.cluster_size
        while pos < end:
            if pos >= layer.size:
                break
            cluster = pos // cs
            chunk_end = min(end, (cluster + 1) * cs, layer.size)
            if layer.owned[cluster]:
                out[pos - offset:chunk_end - offset] = layer.data[pos:chunk_end]
            else:
                out[pos - offset:chunk_end - offset] = self.view(index - 1, pos,
                                                                 chunk_end - pos)
            pos = chunk_end
        return bytes(out)

    def _own(self, index: int, offset: int, length: int) -> None:
        layer = self.layers[index]
        cs = layer.cluster_size
        for cluster in range(offset // cs, (offset + length - 1) // cs + 1):
            if not layer.owned[cluster]:
                start = cluster * cs
                stop = min(start + cs, layer.size)
                layer.data[start:stop] = self.view(index - 1, start, stop - start)
                layer.owned[cluster] = 1

    def write(self, index: int, offset: int, data: bytes) -> None:
        self._own(index, offset, len(data))
        self.layers[index].data[offset:offset + len(data)] = data

    def _whole_clusters(self, layer: ModelLayer, offset: int, length: int) -> range:
        """Clusters a request covers entirely (the image's last partial
        cluster counts when the request reaches the end of the image)."""
        cs = layer.cluster_size
        end = offset + length
        first = -(-offset // cs)
        stop = end // cs
        if end == layer.size:
            stop = -(-layer.size // cs)
        return range(first, max(first, stop))

    def write_zeroes(self, index: int, offset: int, length: int) -> None:
        layer = self.layers[index]
        if layer.fmt == "raw" or not layer.v2 or index > 0:
            self.write(index, offset, bytes(length))
            return
        # A v2 image without backing file has no zero flag: whole clusters are
        # discarded (unallocated reads as zero), a partial cluster stays
        # unallocated if it is, and is written with zeroes otherwise.
        cs = layer.cluster_size
        whole = self._whole_clusters(layer, offset, length)
        for cluster in range(offset // cs, (offset + length - 1) // cs + 1):
            start = max(offset, cluster * cs)
            stop = min(offset + length, (cluster + 1) * cs)
            if cluster in whole:
                layer.owned[cluster] = 0
                layer.data[cluster * cs:min((cluster + 1) * cs, layer.size)] = \
                    bytes(min((cluster + 1) * cs, layer.size) - cluster * cs)
            elif layer.owned[cluster]:
                layer.data[start:stop] = bytes(stop - start)

    def discard(self, index: int, offset: int, length: int) -> None:
        layer = self.layers[index]
        if layer.fmt == "raw":
            # A raw discard punches a hole in the file: the range reads as zero.
            layer.data[offset:offset + length] = bytes(length)
            return
        if layer.v2 and index > 0:
            return  # would expose the backing file: QEMU refuses
        cs = layer.cluster_size
        for cluster in self._whole_clusters(layer, offset, length):
            begin = cluster * cs
            end = min(begin + cs, layer.size)
            if layer.v2:
                # No zero flag: the cluster is simply dropped.
                layer.owned[cluster] = 0
                layer.data[begin:end] = bytes(end - begin)
            elif index > 0 or layer.owned[cluster]:
                # Becomes a zero cluster (an unallocated one without backing
                # file already reads as zero and is left alone).
                layer.data[begin:end] = bytes(end - begin)
                layer.owned[cluster] = 1

    def holder(self, index: int, offset: int) -> int | None:
        """The layer (counting down from ``index``) that holds ``offset``."""
        while index >= 0:
            layer = self.layers[index]
            if offset < layer.size and layer.owned[offset // layer.cluster_size]:
                return index
            if offset >= layer.size:
                return None
            index -= 1
        return None


@st.composite
def chains(draw) -> list[ModelLayer]:
    depth = draw(st.integers(1, 3))
    layers = []
    for index in range(depth):
        size = draw(st.integers(1, 1536)) * 512
        if index == 0 and depth > 1 and draw(st.integers(0, 4)) == 0:
            layers.append(ModelLayer(f"l{index}.img", "raw", size, 512, False))
            continue
        cluster = draw(st.sampled_from([512, 1024, 4096, 65536, 2 * 1024 * KIB]))
        v2 = draw(st.integers(0, 4)) == 0
        layers.append(ModelLayer(f"l{index}.img", "qcow2", size, cluster, v2))
    return layers


def make_images(directory: str, layers: list[ModelLayer]) -> None:
    for index, layer in enumerate(layers):
        options = {"size": str(layer.size)}
        if layer.fmt == "qcow2":
            options["cluster_size"] = str(layer.cluster_size)
            if layer.v2:
                options["compat"] = "0.10"
            if index:
                options["backing_file"] = layers[index - 1].name
                options["backing_fmt"] = layers[index - 1].fmt
        create_image(os.path.join(directory, layer.name), layer.fmt, options)


def stepwise_map(node) -> list:
    """qemu-img map the slow way: one block-status walk per step, then merging.

    ``BlockNode.map`` works a whole L2 slice at a time; this is the oracle it
    must agree with.
    """
    from imgengine.chain import map_entry, mergeable

    entries = []
    offset, end = 0, node.length()
    while offset < end:
        entry = map_entry(node, offset, end - offset)
        assert entry.length > 0
        if entries and mergeable(entries[-1], entry):
            entries[-1].length += entry.length
        else:
            entries.append(entry)
        offset += entry.length
    return entries


def check_status(node, model: Model, index: int) -> None:
    """Block status of a layer's chain against the model."""
    layer_size = model.layers[index].size
    entries = list(node.map())
    assert entries == stepwise_map(node)
    assert sum(e.length for e in entries) == layer_size
    position = 0
    for entry in entries:
        assert entry.start == position
        position += entry.length
        content = model.view(index, entry.start, entry.length)
        if entry.zero:
            assert content == bytes(entry.length), entry
        for probe in {entry.start, entry.start + entry.length - 1}:
            holder = model.holder(index, probe)
            if entry.present:
                if holder is None:
                    # Zeroes past the end of a short backing file count as
                    # allocated at that layer.
                    assert entry.zero
                else:
                    assert holder == index - entry.depth, (entry, holder)
            else:
                assert holder is None, (entry, holder)
    offset = 0
    while offset < layer_size:
        allocated, count = node.is_allocated(offset, layer_size - offset)
        assert count > 0
        own = model.holder(index, offset) == index
        if model.layers[index].fmt == "qcow2":
            assert allocated == own, (offset, count)
        offset += count


@settings(parent=settings.get_profile(os.environ.get("IMGENGINE_HYPOTHESIS", "imgengine-ci")),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_engine_matches_byte_model(data):
    layers = data.draw(chains(), label="chain")
    model = Model(layers)
    directory = tempfile.mkdtemp(prefix="imgengine-prop-")
    try:
        make_images(directory, layers)
        for _ in range(data.draw(st.integers(1, 15), label="steps")):
            index = data.draw(st.integers(0, len(layers) - 1), label="layer")
            layer = layers[index]
            unit = data.draw(st.sampled_from([1, 512]), label="unit")
            offset = data.draw(st.integers(0, layer.size // unit - 1), label="offset") * unit
            length = data.draw(st.integers(1, min(layer.size - offset, 160 * KIB) // unit),
                               label="length") * unit
            kind = data.draw(st.sampled_from(["write", "zero", "zero-unmap", "discard",
                                              "read"]), label="kind")
            path = os.path.join(directory, layer.name)
            with open_image(path, fmt=layer.fmt) as node:
                if kind == "write":
                    payload = bytes([data.draw(st.integers(1, 255), label="byte")]) * length
                    node.write(offset, payload)
                    model.write(index, offset, payload)
                elif kind in ("zero", "zero-unmap"):
                    node.write_zeroes(offset, length, may_unmap=kind == "zero-unmap")
                    model.write_zeroes(index, offset, length)
                elif kind == "discard":
                    node.discard(offset, length)
                    model.discard(index, offset, length)
                elif data.draw(st.booleans(), label="into"):
                    buffer = bytearray(length)
                    node.read_into(offset, buffer)
                    assert buffer == model.view(index, offset, length)
                else:
                    assert node.read(offset, length) == model.view(index, offset, length)
        for index, layer in enumerate(layers):
            with open_image(os.path.join(directory, layer.name), fmt=layer.fmt) as node:
                assert node.read(0, layer.size) == model.view(index, 0, layer.size)
                check_status(node, model, index)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
