"""The public API: opening options, errors with QEMU's words, request checks.

Where QEMU has a message for the same situation, the engine's ``str(error)``
is compared with what real qemu-img/qemu-io print (minus their prefixes).
"""

from __future__ import annotations

import errno
import os

import pytest

from imgengine import (
    BlockStatusFlag,
    CorruptImageError,
    ImageError,
    OpenError,
    RequestError,
    create_image,
    open_image,
)

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
def chain(tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    create_image(base, "qcow2", {"size": str(2 * MIB), "cluster_size": "4096"})
    create_image(top, "qcow2", {"backing_file": "base.qcow2", "backing_fmt": "qcow2",
                                "size": str(3 * MIB)})
    with open_image(base) as node:
        node.write(0, b"\xbb" * 256 * KIB)
    with open_image(top) as node:
        node.write(64 * KIB, b"\xcc" * 4096)
    return base, top


def test_missing_file_message_matches_qemu(qemu, tmp_path):
    path = str(tmp_path / "missing.qcow2")
    result = qemu.run(qemu.io_program, "-c", "read 0 512", path, check=False)
    with pytest.raises(OpenError) as info:
        open_image(path)
    assert info.value.errno == errno.ENOENT
    assert result.stderr.strip() == f"qemu-io: can't open device {path}: {info.value}"


def test_missing_backing_file_message_matches_qemu(qemu, tmp_path):
    path = str(tmp_path / "ov.qcow2")
    create_image(path, "qcow2", {"size": str(MIB), "backing_file": "nowhere.qcow2",
                                 "backing_fmt": "qcow2"}, unsafe=True)
    result = qemu.run(qemu.io_program, "-c", "read 0 512", path, check=False)
    with pytest.raises(OpenError) as info:
        open_image(path)
    assert result.stderr.strip() == f"qemu-io: can't open device {path}: {info.value}"
    # Cutting the chain opens the overlay alone.
    with open_image(path, options={"backing": None}) as node:
        assert node.backing is None
        assert node.read(0, 512) == bytes(512)


def test_backing_resolves_next_to_the_overlay(chain, tmp_path, monkeypatch):
    base, top = chain
    monkeypatch.chdir("/")
    with open_image(top) as node:
        assert node.backing is not None
        assert node.backing.filename == base
        assert node.read(64 * KIB - 512, 1024) == b"\xbb" * 512 + b"\xcc" * 512
        info = node.info()
        assert info.backing_filename == "base.qcow2"
        assert info.full_backing_filename == base


def test_backing_override_and_cut(chain, tmp_path):
    base, top = chain
    other = str(tmp_path / "other.raw")
    create_image(other, "raw", {"size": str(MIB)})
    with open(other, "r+b") as f:
        f.write(b"\xee" * 4096)
    with open_image(top, options={"backing": {"driver": "raw", "file": {
            "driver": "file", "filename": other}}}) as node:
        assert node.backing.format_name == "raw"
        assert node.read(0, 4096) == b"\xee" * 4096
    with open_image(None, options={"driver": "qcow2", "file.filename": top,
                                   "backing": None}) as node:
        assert node.backing is None
        entries = list(node.map())
        assert [(e.start, e.depth, e.present) for e in entries] == [
            (0, 0, False), (64 * KIB, 0, True), (128 * KIB, 0, False)]


def test_map_entries_name_their_files(chain):
    base, top = chain
    with open_image(top) as node:
        entries = list(node.map())
    data = [e for e in entries if e.data]
    assert {e.filename for e in data} == {base, top}
    assert all(e.filename is None for e in entries if not e.data and e.offset is None)


def test_block_status_and_is_allocated(chain):
    base, top = chain
    with open_image(top) as node:
        status = node.block_status(64 * KIB, MIB)
        assert status.flags & BlockStatusFlag.DATA and status.flags & BlockStatusFlag.ALLOCATED
        assert status.pnum == 64 * KIB and status.offset is not None
        status = node.block_status(0, 64 * KIB)
        assert not status.flags & BlockStatusFlag.ALLOCATED
        assert node.is_allocated(0, MIB) == (False, 64 * KIB)
        assert node.is_allocated(64 * KIB, MIB) == (True, 64 * KIB)
        # Past the end of the shorter backing file the top reads as zero.
        status = node.block_status(2 * MIB, 4096)
        assert status.flags & BlockStatusFlag.ZERO
        assert status.flags & BlockStatusFlag.EOF == 0


def test_request_errors(chain):
    base, top = chain
    with open_image(top, read_only=True) as node:
        with pytest.raises(RequestError) as info:
            node.read(3 * MIB - 10, 11)
        assert info.value.errno == errno.EIO and str(info.value) == "Input/output error"
        with pytest.raises(RequestError) as info:
            node.write(0, b"x")
        assert info.value.errno == errno.EPERM
        with pytest.raises(RequestError):
            node.read(-1, 1)
    node = open_image(top)
    node.close()
    with pytest.raises(RequestError):
        node.read(0, 1)


def test_discard_ignored_when_asked(chain):
    base, top = chain
    with open_image(top, options={"discard": "ignore"}) as node:
        node.discard(64 * KIB, 64 * KIB)
        assert node.read(64 * KIB, 4096) == b"\xcc" * 4096
    with open_image(top) as node:
        node.discard(64 * KIB, 64 * KIB)
        assert node.read(64 * KIB, 4096) == bytes(4096)


def test_unknown_option_is_refused(chain):
    base, top = chain
    with pytest.raises(ImageError, match="does not support the option 'no-such-option'"):
        open_image(top, options={"no-such-option": "1"})


def test_probing_and_explicit_formats(chain, tmp_path):
    base, top = chain
    raw = str(tmp_path / "r.img")
    create_image(raw, "raw", {"size": str(MIB)})
    with open_image(raw) as node:
        assert node.format_name == "raw"
        # A probed raw image may not be turned into something else.
        with open(top, "rb") as f:
            header = f.read(512)
        with pytest.raises(RequestError) as info:
            node.write(0, header)
        assert info.value.errno == errno.EPERM
    with open_image(raw, fmt="raw") as node:
        node.write(0, b"QFI\xfb" + bytes(508))
    with open_image(top, fmt="raw", read_only=True) as node:
        assert node.format_name == "raw"
    with pytest.raises(CorruptImageError, match="Unsupported qcow2 version 0"):
        open_image(raw, fmt="qcow2")
    with open_image(raw, fmt="raw") as node:
        node.write(0, b"XXXX")
    with pytest.raises(CorruptImageError, match="Image is not in qcow2 format"):
        open_image(raw, fmt="qcow2")


def test_directory_is_refused(tmp_path):
    with pytest.raises(OpenError) as info:
        open_image(str(tmp_path), read_only=True)
    assert "driver requires" in str(info.value)


def test_check_through_the_node(chain, tmp_path):
    base, top = chain
    with open_image(top) as node:
        node.write(MIB, b"\x01" * 100 * KIB)
        result = node.check()
        assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)
        assert result.allocated_clusters >= 2
    # A leaked cluster: bump a refcount behind the engine's back.
    from imgengine.qcow2 import format as fmt

    size = os.path.getsize(top)
    cluster = -(-size // 65536)
    with open(top, "rb") as f:
        header = fmt.unpack_fixed_header(f.read(112))
        f.seek(header.refcount_table_offset)
        block = int.from_bytes(f.read(8), "big")
    with open(top, "r+b") as f:
        f.truncate((cluster + 1) * 65536)
        f.seek(block + 2 * cluster)
        f.write(b"\0\1")
    with open_image(top) as node:
        result = node.check()
        assert result.leaks == 1
        result = node.check(frozenset({"leaks"}))
        assert result.leaks_fixed == 1
        node.write(2 * MIB, b"\x02" * 4096)
        assert node.check().leaks == 0


def test_zero_length_image(tmp_path):
    path = str(tmp_path / "empty.qcow2")
    create_image(path, "qcow2", {"size": "0"})
    with open_image(path) as node:
        assert node.length() == 0
        assert node.read(0, 0) == b""
        entries = list(node.map())
        assert len(entries) == 1 and entries[0].length == 0
    assert os.path.getsize(path) == 3 * 65536


def test_check_mode_opens_a_corrupt_image_for_repair(chain):
    base, top = chain
    from imgengine.qcow2 import format as fmt

    with open(top, "r+b") as f:
        f.seek(72)
        features = int.from_bytes(f.read(8), "big")
        f.seek(72)
        f.write((features | fmt.INCOMPAT_CORRUPT).to_bytes(8, "big"))
    with pytest.raises(CorruptImageError, match="cannot be opened read/write"):
        open_image(top)
    with open_image(top, check=True) as node:
        result = node.check(frozenset({"all"}))
        assert (result.corruptions, result.check_errors) == (0, 0)
    with open_image(top) as node:  # repaired: the corrupt bit is gone
        assert node.read(64 * KIB, 4096) == b"\xcc" * 4096


def test_check_mode_admits_extended_l2_for_checking_only(qemu, tmp_path):
    from imgengine import UnsupportedImageError

    image = tmp_path / "ext.qcow2"
    qemu.create(str(image), "qcow2", MIB, {"extended_l2": "on"})
    with pytest.raises(UnsupportedImageError, match="extended L2"):
        open_image(str(image))
    with open_image(str(image), check=True) as node:
        result = node.check(frozenset())
        assert (result.corruptions, result.leaks, result.check_errors) == (0, 0, 0)
        with pytest.raises(UnsupportedImageError, match="extended L2"):
            node.read(0, 512)
        with pytest.raises(UnsupportedImageError, match="extended L2"):
            node.map_entry(0, 512)


@pytest.mark.parametrize("image_opts,options", [
    ("driver=qcow2,file=somenode", {"driver": "qcow2", "file": "somenode"}),
    ("driver=qcow2,file.filename={top},backing=null",
     {"driver": "qcow2", "file.filename": "{top}", "backing": "null"}),
    ("driver=qcow2", {"driver": "qcow2"}),
])
def test_node_references_and_missing_files_match_qemu(qemu, chain, image_opts, options):
    base, top = chain
    result = qemu.run(qemu.img, "map", "--image-opts", image_opts.format(top=top), check=False)
    prefix = f"qemu-img: Could not open '{image_opts.format(top=top)}': "
    assert result.stderr.startswith(prefix)
    options = {key: value.format(top=top) for key, value in options.items()}
    with pytest.raises(OpenError) as info:
        open_image(None, options=options)
    assert prefix + str(info.value) == result.stderr.strip()
    # An empty string cuts the chain, like null.
    with open_image(top, options={"backing": ""}) as node:
        assert node.backing is None
