"""Hostile and corrupt images: a clear ImageError, never a crash or a hang.

Valid images are made, then their headers, L1 and L2 tables, refcount tables
and blocks, header extensions and backing chains are damaged systematically
(and randomly, with Hypothesis).  Opening each image and using it (reads,
writes, write-zeroes, discards, map, info) may succeed or raise an
``ImageError`` -- anything else is a bug.  Where the damage is one the
engine must detect, the error is a ``CorruptImageError`` with a message
saying what is wrong.  No file other than the image is ever written.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgengine import (
    CorruptImageError,
    ImageError,
    UnsupportedImageError,
    create_image,
    open_image,
)
from imgengine.qcow2 import format as fmt

KIB = 1024
SIZE = 4 * 1024 * KIB


def make_image(path: str, cluster_size: int = 4096, *, compat: str = "1.1",
               backing: str | None = None) -> None:
    options = {"size": str(SIZE), "cluster_size": str(cluster_size), "compat": compat}
    if backing:
        options.update(backing_file=backing, backing_fmt="qcow2")
    create_image(path, "qcow2", options)
    with open_image(path, options={"backing": None}) as node:
        node.write(0, b"\x11" * 10000)
        node.write(100 * KIB, b"\x22" * 3 * cluster_size)
        node.write_zeroes(200 * KIB, 2 * cluster_size)
        node.write(SIZE - 3000, b"\x33" * 3000)


def read_header(path: str) -> fmt.Header:
    with open(path, "rb") as f:
        return fmt.unpack_fixed_header(f.read(fmt.HEADER_V3_LENGTH))


def poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def exercise(path: str, *, read_only: bool = False, backing: bool = True) -> None:
    """Open and use an image; only ImageError may come out."""
    options = None if backing else {"backing": None}
    try:
        node = open_image(path, options=options, read_only=read_only)
    except ImageError:
        return
    try:
        size = node.length()
        steps = [
            lambda: node.read(0, min(size, 512 * KIB)),
            lambda: node.read(max(0, size - 70 * KIB), min(size, 70 * KIB)),
            lambda: list(node.map(0, min(size, 64 * 1024 * KIB))),
            lambda: node.info(),
            lambda: node.is_allocated(0, size),
            lambda: node.block_status(0, size),
        ]
        if not read_only:
            steps += [
                lambda: node.write(5000, b"\x44" * 70000),
                lambda: node.write_zeroes(64 * KIB, 128 * KIB, may_unmap=True),
                lambda: node.write_zeroes(1000, 3000),
                lambda: node.discard(0, 256 * KIB),
                lambda: node.write(max(0, size - 5000), b"\x55" * min(size, 5000)),
                lambda: node.read(0, min(size, 512 * KIB)),
            ]
        for step in steps:
            try:
                step()
            except ImageError:
                pass
    finally:
        try:
            node.close()
        except ImageError:
            pass


def expect_corrupt(path: str, *, read_only: bool = True, match: str | None = None) -> str:
    with pytest.raises(CorruptImageError) as info:
        with open_image(path, read_only=read_only) as node:
            node.read(0, node.length())
            list(node.map())
    message = str(info.value)
    assert message
    if match:
        assert match in message
    return message


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "t.qcow2")
    make_image(path)
    return path


# -- header fields ---------------------------------------------------------------------

HEADER_FIELDS = {
    # name: (offset, struct format)
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"), "cluster_bits": (20, ">I"), "size": (24, ">Q"),
    "crypt_method": (32, ">I"), "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"), "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, ">B"),
}
INTERESTING = [0, 1, 2, 3, 7, 8, 9, 0x10, 21, 22, 64, 100, 104, 112, 511, 512, 4095, 4096,
               4097, 65536, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
def test_every_header_field_damaged(tmp_path, field):
    offset, layout = HEADER_FIELDS[field]
    bits = struct.calcsize(layout) * 8
    pristine = tmp_path / "pristine.qcow2"
    make_image(str(pristine))
    original = pristine.read_bytes()
    for value in INTERESTING:
        if value >= 1 << bits:
            continue
        path = str(tmp_path / "t.qcow2")
        with open(path, "wb") as f:
            f.write(original)
        poke(path, offset, struct.pack(layout, value))
        exercise(path, read_only=True)
        exercise(path)


@pytest.mark.parametrize("field,value,fragment", [
    ("magic", 0x12345678, "Image is not in qcow2 format"),
    ("version", 1, "Unsupported qcow2 version 1"),
    ("version", 4, "Unsupported qcow2 version 4"),
    ("cluster_bits", 8, "Unsupported cluster size: 2^8"),
    ("cluster_bits", 22, "Unsupported cluster size: 2^22"),
    ("header_length", 100, "qcow2 header too short"),
    ("header_length", 8192, "qcow2 header exceeds cluster size"),
    ("backing_file_offset", 8192, "Invalid backing file offset"),
    ("refcount_order", 7, "Reference count entry width too large"),
    ("refcount_table_clusters", 0, "Image does not contain a reference count table"),
    ("refcount_table_clusters", 1 << 20, "Reference count table too large"),
    ("refcount_table_offset", 4097, "Reference count table offset invalid"),
    ("l1_table_offset", 12345, "Active L1 table offset invalid"),
    ("l1_size", 1 << 30, "Active L1 table too large"),
    ("l1_size", 0, "L1 table is too small"),
    ("size", 1 << 62, "Image is too big"),
    ("size", 1 << 40, "L1 table is too small"),
    ("nb_snapshots", 1 << 20, "Snapshot table too large"),
    ("snapshots_offset", 513, "Snapshot table offset invalid"),
    ("compression_type", 7, "qcow2: unknown compression type: 7"),
    ("incompatible_features", 1 << 2, "external data file"),
])
def test_header_damage_named(image, field, value, fragment):
    offset, layout = HEADER_FIELDS[field]
    poke(image, offset, struct.pack(layout, value))
    with pytest.raises(ImageError) as info:
        with open_image(image, fmt="qcow2", read_only=True) as node:
            node.read(0, node.length())
    assert fragment in str(info.value)
    assert isinstance(info.value, (CorruptImageError, UnsupportedImageError))


def test_unknown_incompatible_feature_is_refused(image):
    header = read_header(image)
    poke(image, 72, struct.pack(">Q", header.incompatible_features | (1 << 40)))
    with pytest.raises(UnsupportedImageError) as info:
        open_image(image)
    assert str(info.value) == "Unsupported qcow2 feature(s): Unknown incompatible feature: " \
                              "10000000000"


@pytest.mark.parametrize("bit,fragment", [(fmt.INCOMPAT_EXTL2, "extended L2"),
                                          (fmt.INCOMPAT_DATA_FILE, "external data file")])
def test_unsupported_features_refused_at_open(tmp_path, bit, fragment):
    image = str(tmp_path / "t.qcow2")
    make_image(image, cluster_size=65536)
    header = read_header(image)
    poke(image, 72, struct.pack(">Q", header.incompatible_features | bit))
    with pytest.raises(UnsupportedImageError, match=fragment):
        open_image(image, read_only=True)


def test_encryption_refused(image):
    poke(image, 32, struct.pack(">I", fmt.CRYPT_AES))
    with pytest.raises(UnsupportedImageError):
        open_image(image, read_only=True)


def test_corrupt_bit_refuses_read_write(image):
    header = read_header(image)
    poke(image, 72, struct.pack(">Q", header.incompatible_features | fmt.INCOMPAT_CORRUPT))
    with pytest.raises(CorruptImageError) as info:
        open_image(image)
    assert str(info.value) == "qcow2: Image is corrupt; cannot be opened read/write"
    assert info.value.errno == errno.EACCES
    with open_image(image, read_only=True) as node:
        assert node.read(0, 10) == b"\x11" * 10


# -- tables ----------------------------------------------------------------------------------


def l1_entries(path: str) -> tuple[int, list[int]]:
    header = read_header(path)
    with open(path, "rb") as f:
        f.seek(header.l1_table_offset)
        raw = f.read(header.l1_size * 8)
    return header.l1_table_offset, list(struct.unpack(f">{header.l1_size}Q", raw))


BAD_POINTERS = [0x200, 0x1001, 0, 4096, 1 << 50, (1 << 55) - 4096]


@pytest.mark.parametrize("pointer", BAD_POINTERS)
def test_l1_entry_damage(image, pointer):
    l1_offset, entries = l1_entries(image)
    header = read_header(image)
    for target in (0, l1_offset, header.refcount_table_offset, pointer):
        poke(image, l1_offset, struct.pack(">Q", target | fmt.OFLAG_COPIED))
        exercise(image, read_only=True)
        exercise(image)


def test_unaligned_l1_entry_is_caught(image):
    l1_offset, _ = l1_entries(image)
    poke(image, l1_offset, struct.pack(">Q", 0x1200 | fmt.OFLAG_COPIED))
    message = expect_corrupt(image)
    assert message == "L2 table offset 0x1200 unaligned (L1 index: 0)"


def test_l2_table_on_the_refcount_table_is_caught_on_write(tmp_path):
    # Reads take the refcount table for an L2 table (as QEMU does); writing
    # the "L2 table" back is caught by the overlap check and marks the image
    # corrupt, as in QEMU.
    path = str(tmp_path / "t.qcow2")
    make_image(path)
    l1_offset, _ = l1_entries(path)
    poke(path, l1_offset, struct.pack(">Q", 0x1000 | fmt.OFLAG_COPIED))
    node = open_image(path)
    node.read(0, 64 * KIB)
    node.write(0, b"x" * 512)  # lands in the cache; the overlap shows on write-back
    node.close()
    assert node.messages == [
        "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps "
        "with refcount table); further corruption events will be suppressed"]
    assert read_header(path).incompatible_features & fmt.INCOMPAT_CORRUPT


def test_l2_table_past_end_of_file(tmp_path):
    # QEMU reads zeroes there; writing would grow the file to 1 TiB, which
    # the engine refuses without marking the image corrupt.
    path = str(tmp_path / "t.qcow2")
    make_image(path)
    l1_offset, _ = l1_entries(path)
    poke(path, l1_offset, struct.pack(">Q", (1 << 40) | fmt.OFLAG_COPIED))
    size = os.path.getsize(path)
    with open_image(path) as node:
        assert node.read(0, 512 * KIB) == bytes(512 * KIB)
        with pytest.raises(CorruptImageError, match="lies beyond the end of the file"):
            node.write(0, b"x" * 512)
    assert os.path.getsize(path) == size
    assert not read_header(path).incompatible_features & fmt.INCOMPAT_CORRUPT


def l2_entries(path: str) -> tuple[int, list[int]]:
    _, entries = l1_entries(path)
    l2_offset = entries[0] & fmt.L1E_OFFSET_MASK
    with open(path, "rb") as f:
        f.seek(l2_offset)
        raw = f.read(4096)
    return l2_offset, list(struct.unpack(">512Q", raw))


@pytest.mark.parametrize("entry", [
    0x1001 | fmt.OFLAG_COPIED,                     # unaligned data cluster
    0x0 | fmt.OFLAG_COPIED,                        # header as data
    (1 << 50) | fmt.OFLAG_COPIED,                  # far past the end
    fmt.OFLAG_COMPRESSED | 12345,                  # junk compressed data
    fmt.OFLAG_COMPRESSED | (0xFF << 54) | 4096,    # compressed, huge size
    fmt.OFLAG_ZERO | 0x1200 | fmt.OFLAG_COPIED,    # unaligned preallocated zero
    0x1000 | fmt.OFLAG_COPIED,                     # the refcount table as data
    0x3000,                                        # the L1 table, shared (COW)
    (1 << 63) - 1,
])
def test_l2_entry_damage(image, entry):
    l2_offset, entries = l2_entries(image)
    for index in (0, 1, 25, 511):
        poke(image, l2_offset + 8 * index, struct.pack(">Q", entry))
    exercise(image, read_only=True)
    exercise(image)


@pytest.mark.parametrize("entry", [
    fmt.OFLAG_COPIED,                              # no offset: unallocated to QEMU
    (0xFF << 56) & ~fmt.OFLAG_COMPRESSED,          # only flags and reserved bits
    0x1001 | fmt.OFLAG_COPIED,
    (1 << 50) | fmt.OFLAG_COPIED,
    fmt.OFLAG_ZERO | fmt.OFLAG_COPIED,
    fmt.OFLAG_ZERO | 0x1200 | fmt.OFLAG_COPIED,
    0x3000,
])
def test_l2_entry_damage_maps_as_qemu_maps_it(image, entry, qemu_img):
    # qemu-img map's bulk walk must classify a damaged entry exactly as the
    # request-by-request block status does, and as QEMU does
    import io
    import subprocess

    from pyqemu.img import run

    l2_offset, _ = l2_entries(image)
    for index in (0, 1, 25):
        poke(image, l2_offset + 8 * index, struct.pack(">Q", entry))
    for output in ("json", "human"):
        argv = ["map", "-U", f"--output={output}", image]
        qemu = subprocess.run([qemu_img, *argv], capture_output=True, text=True, check=False)
        out, err = io.StringIO(), io.StringIO()
        status = run(list(argv), io.StringIO(), out, err)
        assert (out.getvalue(), err.getvalue(), status) == \
            (qemu.stdout, qemu.stderr.replace(qemu_img, "qemu-img"), qemu.returncode)


def test_data_write_onto_metadata_is_refused(image):
    # A data cluster pointing at the refcount table must not be written.
    l2_offset, _ = l2_entries(image)
    header = read_header(image)
    poke(image, l2_offset, struct.pack(">Q", header.refcount_table_offset | fmt.OFLAG_COPIED))
    before = open(image, "rb").read()
    with open_image(image) as node:
        with pytest.raises(CorruptImageError) as info:
            node.write(0, b"x" * 512)
    assert "Preventing invalid write on metadata (overlaps with refcount table)" in \
        str(info.value)
    after = open(image, "rb").read()
    reftable = header.refcount_table_offset
    assert after[reftable:reftable + 4096] == before[reftable:reftable + 4096]
    # QEMU marks the image corrupt; it cannot be opened read/write any more.
    with pytest.raises(CorruptImageError):
        open_image(image)


def test_v2_image_with_zero_flag_is_corrupt(tmp_path):
    path = str(tmp_path / "v2.qcow2")
    make_image(path, compat="0.10")
    l2_offset, entries = l2_entries(path)
    poke(path, l2_offset + 8 * 30, struct.pack(">Q", fmt.OFLAG_ZERO))
    message = expect_corrupt(path)
    assert "Zero cluster entry found in pre-v3 image" in message


@pytest.mark.parametrize("pointer", [0, 0x200, 0x1000, 1 << 45, 0x3000])
def test_refcount_table_damage(image, pointer):
    header = read_header(image)
    for index in (0, 1, 511):
        poke(image, header.refcount_table_offset + 8 * index, struct.pack(">Q", pointer))
        exercise(image, read_only=True)
        exercise(image)


def test_refcount_block_damage(image):
    header = read_header(image)
    with open(image, "rb") as f:
        f.seek(header.refcount_table_offset)
        block = struct.unpack(">Q", f.read(8))[0]
    # Refcounts of every used cluster dropped to zero: new allocations would
    # land on metadata, which the overlap check must stop.
    poke(image, block, bytes(4096))
    exercise(image)
    poke(image, block, b"\xff" * 4096)
    exercise(image)


# -- extensions and backing chains -------------------------------------------------------


def test_extension_damage(tmp_path):
    path = str(tmp_path / "t.qcow2")
    make_image(path, cluster_size=65536, backing=None)
    original = open(path, "rb").read()
    for position in range(fmt.HEADER_V3_LENGTH, fmt.HEADER_V3_LENGTH + 64, 4):
        for value in (0, 1, 0xFFFFFFFF, 0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77,
                      0x44415441, 16, 65536):
            with open(path, "wb") as f:
                f.write(original)
            poke(path, position, struct.pack(">I", value))
            exercise(path, read_only=True)


def test_backing_loop_is_refused(tmp_path):
    a = str(tmp_path / "a.qcow2")
    b = str(tmp_path / "b.qcow2")
    # a -> b -> a -> ...  (-u: the backing files are not opened on create)
    create_image(a, "qcow2", {"size": str(SIZE), "backing_file": "b.qcow2",
                              "backing_fmt": "qcow2"}, unsafe=True)
    create_image(b, "qcow2", {"size": str(SIZE), "backing_file": "a.qcow2",
                              "backing_fmt": "qcow2"}, unsafe=True)
    for path in (a, b):
        with pytest.raises(CorruptImageError, match="creates an infinite loop"):
            open_image(path, read_only=True)
    with open_image(a, read_only=True, options={"backing": None}) as node:
        assert node.read(0, 512) == bytes(512)


def test_backing_file_name_too_long(image):
    poke(image, 8, struct.pack(">QI", 2048, 3000))
    with pytest.raises(CorruptImageError, match="Backing file name too long"):
        open_image(image, read_only=True)


def test_truncated_and_tiny_files(tmp_path):
    path = str(tmp_path / "t.qcow2")
    make_image(path)
    original = open(path, "rb").read()
    for length in (0, 1, 4, 8, 100, 111, 112, 4096, 4097, 8192, 12288, 16384,
                   len(original) // 2, len(original) - 1):
        with open(path, "wb") as f:
            f.write(original[:length])
        exercise(path, read_only=True)
        exercise(path)


# -- random damage ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pristine")
    images = {}
    for cluster_size, compat in ((512, "1.1"), (4096, "0.10"), (65536, "1.1")):
        path = str(directory / f"c{cluster_size}.qcow2")
        make_image(path, cluster_size, compat=compat)
        images[cluster_size] = open(path, "rb").read()
    return images


@settings(parent=settings.get_profile(os.environ.get("IMGENGINE_HYPOTHESIS", "imgengine-ci")),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_random_metadata_damage(tmp_path, pristine, data):
    cluster_size = data.draw(st.sampled_from(sorted(pristine)))
    image = bytearray(pristine[cluster_size])
    header = fmt.unpack_fixed_header(bytes(image[:fmt.HEADER_V3_LENGTH]))
    # Damage lands in metadata: the header cluster, the refcount table and
    # block, the L1 table and the first L2 table.
    regions = [(0, 200), (header.refcount_table_offset, 64),
               (header.l1_table_offset, 64), (2 * cluster_size, 64)]
    l1_first = struct.unpack(">Q", image[header.l1_table_offset:header.l1_table_offset + 8])[0]
    if l1_first & fmt.L1E_OFFSET_MASK:
        regions.append((l1_first & fmt.L1E_OFFSET_MASK, 256))
    file_clusters = -(-len(image) // cluster_size)
    pointers = st.one_of(
        st.integers(0, file_clusters + 2).map(lambda c: c * cluster_size),
        st.integers(0, 1 << 20),
        st.integers(0, (1 << 64) - 1))
    flags = st.sampled_from([0, fmt.OFLAG_COPIED, fmt.OFLAG_ZERO, fmt.OFLAG_COMPRESSED,
                             fmt.OFLAG_COPIED | fmt.OFLAG_ZERO])
    for _ in range(data.draw(st.integers(1, 6))):
        start, length = data.draw(st.sampled_from(regions))
        position = start + data.draw(st.integers(0, length - 1))
        if position >= len(image):
            continue
        if data.draw(st.booleans()):
            image[position] = data.draw(st.integers(0, 255))
        else:
            position &= ~7
            word = (data.draw(pointers) | data.draw(flags)) & ((1 << 64) - 1)
            image[position:position + 8] = struct.pack(">Q", word)
    path = str(tmp_path / f"damaged-{cluster_size}.qcow2")
    with open(path, "wb") as f:
        f.write(image)
    neighbours = sorted(os.listdir(tmp_path))
    exercise(path, read_only=True)
    exercise(path, backing=False)
    assert sorted(os.listdir(tmp_path)) == neighbours


def test_data_cluster_far_past_the_end_is_not_written(image):
    # An in-place write there would only grow the file to where the entry
    # points; the engine refuses (without marking the image corrupt).
    l2_offset, _ = l2_entries(image)
    poke(image, l2_offset, struct.pack(">Q", (1 << 40) | fmt.OFLAG_COPIED))
    size = os.path.getsize(image)
    with open_image(image) as node:
        assert node.read(0, 4096) == bytes(4096)  # reads as zero, as in QEMU
        with pytest.raises(CorruptImageError, match="beyond the end of the file"):
            node.write(0, b"x" * 512)
    assert os.path.getsize(image) == size
    with open_image(image) as node:
        node.write(100 * KIB, b"y" * 512)
