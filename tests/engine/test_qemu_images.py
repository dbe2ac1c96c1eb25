"""Images written by QEMU in ways the engine does not write them itself.

Compressed clusters (``qemu-io write -c``, ``qemu-img convert -c``) must
read back as QEMU reads them, and writing over them must copy-on-write like
QEMU.  Internal snapshots (``qemu-img snapshot -c``) share clusters: a write
must never change a shared cluster in place, so the snapshot still reads
its old data, and the result must match QEMU's, byte for byte.  Lazy
refcounts: an image QEMU left dirty is repaired when opened read/write.
``info()`` reports what ``qemu-img info`` reports.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from imgengine import ImageError, create_image, open_image

KIB = 1024
MIB = 1024 * KIB



def contents(path: str) -> bytes:
    with open_image(path, read_only=True) as node:
        return node.read(0, node.length())


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_compressed_clusters_read_like_qemu(qemu, tmp_path, cluster_size):
    path = str(tmp_path / "c.qcow2")
    size = 2 * MIB + 1536
    qemu.create(path, "qcow2", size, {"cluster_size": str(cluster_size)})
    cs = cluster_size
    qemu.io(path, f"write -c -P 0x41 0 {4 * cs}")
    qemu.io(path, f"write -c -P 0x42 {8 * cs} {cs}")
    # The last, partial cluster can be written compressed too.
    tail = size - size % cs if size % cs else size - cs
    qemu.io(path, f"write -c -P 0x43 {tail} {size - tail}")
    qemu.io(path, f"write -P 0x44 {4 * cs + 100} 1000")
    expected = qemu.to_raw(path, str(tmp_path / "c.raw"))
    assert contents(path) == expected
    assert qemu.engine_map(path) == qemu.map(path)


def test_compressed_image_from_convert(qemu, tmp_path):
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        for index in range(48):
            f.write(bytes([index]) * 4096 + os.urandom(512) + bytes(61440 - 512))
    path = str(tmp_path / "conv.qcow2")
    qemu.run(qemu.img, "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), path)
    assert contents(path) == raw.read_bytes()
    assert qemu.engine_map(path) == qemu.map(path)


@pytest.mark.parametrize("command", [
    "write -P 0x55 1000 3000",          # partial write into a compressed cluster
    "write -P 0x56 0 131072",           # whole clusters over compressed ones
    "write -z 4096 8192",               # zeroes over compressed clusters
    "write -z -u 0 65536",
    "discard 0 131072",
])
def test_writes_over_compressed_clusters_match_qemu(qemu, tmp_path, command):
    # QEMU compresses the clusters of one request in parallel, so where they
    # land varies from run to run; one cluster per request is deterministic.
    # (Both sides are made by QEMU: a copy would not keep the file's holes.)
    qpath = str(tmp_path / "qemu.qcow2")
    epath = str(tmp_path / "engine.qcow2")
    for path in (qpath, epath):
        qemu.create(path, "qcow2", 1 * MIB, {"cluster_size": "65536"})
        qemu.io(path, "write -c -P 0x61 0 65536")
        qemu.io(path, "write -c -P 0x61 65536 65536")
        qemu.io(path, "write -c -P 0x62 262144 65536")
    assert open(qpath, "rb").read() == open(epath, "rb").read()
    qemu.io(qpath, command)
    words = command.split()
    with open_image(epath) as node:
        if words[0] == "write" and words[1] == "-P":
            node.write(int(words[3]), bytes([int(words[2], 0)]) * int(words[4]))
        elif words[:2] == ["write", "-z"] and words[2] == "-u":
            node.write_zeroes(int(words[3]), int(words[4]), may_unmap=True)
        elif words[:2] == ["write", "-z"]:
            node.write_zeroes(int(words[2]), int(words[3]))
        else:
            node.discard(int(words[1]), int(words[2]))
    assert qemu.engine_map(epath) == qemu.map(qpath)
    assert open(epath, "rb").read() == open(qpath, "rb").read()
    assert qemu.check(epath).get("corruptions", 0) == 0
    assert qemu.check(epath).get("leaks", 0) == 0


def snapshot_pair(qemu, tmp_path, cluster_size: str) -> tuple[str, str]:
    qpath = str(tmp_path / "qemu.qcow2")
    epath = str(tmp_path / "engine.qcow2")
    for path in (qpath, epath):
        qemu.create(path, "qcow2", 4 * MIB, {"cluster_size": cluster_size})
        qemu.io(path, "write -P 0x71 0 1M")
        qemu.io(path, "write -z 2M 128k")
        qemu.run(qemu.img, "snapshot", "-c", "snap1", path)
    # The snapshot table records the time of day: give both the same one.
    with open(qpath, "rb") as f:
        header = f.read(72)
        table = int.from_bytes(header[64:72], "big")
        f.seek(table)
        entry = f.read(64)
    with open(epath, "r+b") as f:
        f.seek(table)
        f.write(entry)
    assert open(qpath, "rb").read() == open(epath, "rb").read()
    return qpath, epath


@pytest.mark.parametrize("cluster_size", ["4096", "65536"])
def test_writes_after_internal_snapshot_match_qemu(qemu, tmp_path, cluster_size):
    qpath, epath = snapshot_pair(qemu, tmp_path, cluster_size)
    commands = ["write -P 0x72 4096 8192", "write -z 65536 65536", "discard 131072 131072",
                "write -z -u 196608 65536", "write -P 0x73 3M 4096"]
    for command in commands:
        qemu.io(qpath, command)
    steps = [lambda node: node.write(4096, b"\x72" * 8192),
             lambda node: node.write_zeroes(65536, 65536),
             lambda node: node.discard(131072, 131072),
             lambda node: node.write_zeroes(196608, 65536, may_unmap=True),
             lambda node: node.write(3 * MIB, b"\x73" * 4096)]
    for step in steps:  # one open per step, as QEMU ran one process per step
        with open_image(epath) as node:
            step(node)
    assert qemu.engine_map(epath) == qemu.map(qpath)
    assert open(epath, "rb").read() == open(qpath, "rb").read()
    report = qemu.check(epath)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    # The snapshot still has the old data: apply it in a copy and compare.
    qemu.run(qemu.img, "snapshot", "-a", "snap1", epath)
    data = contents(epath)
    assert data[:MIB] == b"\x71" * MIB
    assert data[2 * MIB:2 * MIB + 128 * KIB] == bytes(128 * KIB)


def test_lazy_refcounts_dirty_image_is_repaired_on_open(qemu, tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    qemu.create(path, "qcow2", 4 * MIB, {"lazy_refcounts": "on", "cluster_size": "4096"})
    # Kill qemu-io after its write, leaving the dirty bit and stale refcounts.
    proc = subprocess.run([qemu.io_program, "-c", "write -P 0x11 0 512", "-c", "sigraise 9",
                           path], capture_output=True)
    assert proc.returncode != 0
    with open(path, "rb") as f:
        f.seek(72)
        assert int.from_bytes(f.read(8), "big") & 1
    with open_image(path, read_only=True) as node:
        assert node.read(0, 512) == b"\x11" * 512
    with open_image(path) as node:
        assert node.open_messages  # what QEMU prints while repairing
        assert node.read(0, 512) == b"\x11" * 512
        node.write(8192, b"\x22" * 512)
    report = qemu.check(path)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    with open(path, "rb") as f:
        f.seek(72)
        assert not int.from_bytes(f.read(8), "big") & 1


@pytest.mark.parametrize("options", [{}, {"compat": "0.10"}, {"cluster_size": "4096",
                                                            "lazy_refcounts": "on"},
                                     {"refcount_bits": "8"}])
def test_info_matches_qemu_img_info(qemu, tmp_path, options):
    base = str(tmp_path / "base.qcow2")
    create_image(base, "qcow2", {"size": str(3 * MIB)})
    path = str(tmp_path / "t.qcow2")
    create_image(path, "qcow2", dict(options, backing_file="base.qcow2", backing_fmt="qcow2"))
    with open_image(path) as node:
        node.write(0, b"x" * 70000)
    report = json.loads(qemu.run(qemu.img, "info", "--output=json", path).stdout)
    with open_image(path, read_only=True) as node:
        info = node.info()
    assert info.virtual_size == report["virtual-size"]
    assert info.actual_size == report["actual-size"]
    assert info.cluster_size == report["cluster-size"]
    assert info.dirty_flag == report["dirty-flag"]
    assert info.backing_filename == report["backing-filename"]
    assert info.full_backing_filename == report["full-backing-filename"]
    assert info.backing_format == report["backing-filename-format"]
    assert info.format_specific == report["format-specific"]["data"]
    assert list(info.format_specific) == list(report["format-specific"]["data"])


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_write_compressed_matches_qemu(qemu, tmp_path, cluster_size):
    cs = cluster_size
    size = 64 * cs + 1024 if cs > 1024 else 64 * cs
    qpath = str(tmp_path / "qemu.qcow2")
    epath = str(tmp_path / "engine.qcow2")
    for path in (qpath, epath):
        qemu.create(path, "qcow2", size, {"cluster_size": str(cs)})
    tail = size - size % cs if size % cs else size - cs
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(cs))  # does not compress: becomes a normal cluster
    writes = [(0, cs, b"\x41" * cs), (5 * cs, cs, b"\x42" * cs), (6 * cs, cs, None),
              (tail, size - tail, b"\x43" * (size - tail))]
    for offset, length, data in writes:
        # One cluster per request: QEMU places those deterministically.
        if data is None:
            qemu.io(qpath, f"write -c -s {noise} {offset} {length}")
            data = noise.read_bytes()
        else:
            qemu.io(qpath, f"write -c -P {data[0]:#x} {offset} {length}")
        with open_image(epath) as node:
            node.write_compressed(offset, data)
    assert open(epath, "rb").read() == open(qpath, "rb").read()
    assert qemu.engine_map(epath) == qemu.map(qpath)
    report = qemu.check(epath)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    assert report.get("compressed-clusters", 0) == 3
    # An allocated cluster cannot be written compressed.
    with open_image(epath) as node:
        with pytest.raises(ImageError) as info:
            node.write_compressed(0, b"\x44" * cs)
        assert info.value.errno == errno.EIO
        with pytest.raises(ImageError) as info:
            node.write_compressed(cs // 2, b"\x44" * cs)
        assert info.value.errno == errno.EINVAL


TRUNCATE_CASES = [
    # (image options, backing size or None, writes before, new size)
    ({"cluster_size": "65536"}, None, ["write -P 0x11 0 300k"], 4 * MIB),
    ({"cluster_size": "65536"}, None, ["write -P 0x11 0 300k"], 128 * KIB + 512),
    ({"cluster_size": "512"}, None, ["write -P 0x22 0 1M", "write -P 0x23 3M 64k"], 1 * MIB),
    ({"cluster_size": "512", "refcount_bits": "64"}, None, ["write -P 0x24 0 3M"], 4096),
    ({"cluster_size": "4096", "compat": "0.10"}, None, ["write -P 0x25 0 2M"], 6 * MIB),
    ({"cluster_size": "4096"}, 4 * MIB, ["write -P 0x26 4096 4096"], 3 * MIB + 512),
    ({"cluster_size": "65536"}, 4 * MIB, [], 6 * MIB),
]


@pytest.mark.parametrize("options,backing_size,writes,new_size", TRUNCATE_CASES)
def test_truncate_matches_qemu(qemu, tmp_path, options, backing_size, writes, new_size):
    paths = {}
    for side in ("qemu", "engine"):
        directory = tmp_path / side
        directory.mkdir()
        path = str(directory / "t.qcow2")
        opts = dict(options)
        if backing_size is not None:
            base = str(directory / "base.qcow2")
            qemu.create(base, "qcow2", backing_size)
            qemu.io(base, f"write -P 0x77 0 {backing_size}")
            opts.update(backing_file="base.qcow2", backing_fmt="qcow2")
        qemu.create(path, "qcow2", 1 * MIB if backing_size else 4 * MIB, opts)
        for command in writes:
            qemu.io(path, command)
        paths[side] = path
    qemu.io(paths["qemu"], f"truncate {new_size}", extra=("-t", "writeback"))
    with open_image(paths["engine"]) as node:
        node.truncate(new_size)
    assert open(paths["engine"], "rb").read() == open(paths["qemu"], "rb").read()
    assert qemu.engine_map(paths["engine"]) == qemu.map(paths["qemu"])
    report = qemu.check(paths["engine"])
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    with open_image(paths["engine"], read_only=True) as node:
        assert node.length() == new_size


def test_truncate_errors(qemu, tmp_path):
    path = str(tmp_path / "t.qcow2")
    create_image(path, "qcow2", {"size": str(MIB)})
    # No QEMU command line reaches these two checks of the block layer
    # (qemu-io refuses a write on a read-only node, and neither qemu-io nor
    # qemu-img passes a negative size on), so only their meaning is checked.
    with open_image(path, read_only=True) as node:
        with pytest.raises(ImageError) as info:
            node.truncate(2 * MIB)
        assert info.value.errno == errno.EACCES
    with open_image(path) as node:
        with pytest.raises(ImageError) as info:
            node.truncate(-1)
        assert info.value.errno == errno.EINVAL
    theirs = str(tmp_path / "theirs.qcow2")
    qemu.create(theirs, "qcow2", MIB)
    result = qemu.run(qemu.io_program, "-f", "qcow2", "-c", "truncate 1000", theirs,
                      check=False)
    assert result.returncode == 1
    with open_image(path) as node:
        with pytest.raises(ImageError) as info:
            node.truncate(1000)
        assert f"qemu-io: {info.value}\n" == result.stderr
        assert node.length() == MIB
    raw = str(tmp_path / "r.raw")
    create_image(raw, "raw", {"size": str(MIB)})
    with open_image(raw, fmt="raw") as node:
        node.truncate(3 * MIB + 100)
        assert node.length() == 3 * MIB + 512
    assert os.path.getsize(raw) == 3 * MIB + 100


def test_vmstate_matches_qemu(qemu, tmp_path):
    qpath = str(tmp_path / "qemu.qcow2")
    epath = str(tmp_path / "engine.qcow2")
    for path in (qpath, epath):
        qemu.create(path, "qcow2", 1 * MIB + 512, {"cluster_size": "4096"})
    qemu.io(qpath, "write -b -P 0x33 1024 5120")
    qemu.io(qpath, "write -P 0x44 0 4096")
    with open_image(epath) as node:
        node.write_vmstate(1024, b"\x33" * 5120)
    with open_image(epath) as node:
        node.write(0, b"\x44" * 4096)
        assert node.read_vmstate(1024, 5120) == b"\x33" * 5120
        assert node.read_vmstate(0, 1024) == bytes(1024)
    assert open(epath, "rb").read() == open(qpath, "rb").read()
    assert qemu.engine_map(epath) == qemu.map(qpath)
    raw = str(tmp_path / "r.raw")
    create_image(raw, "raw", {"size": str(MIB)})
    with open_image(raw, fmt="raw") as node:
        with pytest.raises(ImageError) as info:
            node.write_vmstate(0, b"x" * 512)
        assert info.value.errno == errno.ENOTSUP
