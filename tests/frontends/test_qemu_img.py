"""qemu-img create, info, map, check and compare, side by side with real QEMU.

Every case prepares the same images in two folders with real QEMU, runs one
command line with qemu-img in one and pyqemu-img in the other, and compares
status, stdout and stderr.  Cases that write also compare the resulting images
as real qemu-img sees them.
"""

from __future__ import annotations

import struct

import pytest

BASE = ("img", "create", "-f", "qcow2", "base.qcow2", "1M")
TOP = ("img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
RAW = ("img", "create", "-f", "raw", "r.raw", "1M")
DATA_IN_BASE = ("io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 192k 4k", "base.qcow2")
DATA_IN_TOP = ("io", "-c", "write -P 0x33 32k 64k", "-c", "write -z 512k 64k", "top.qcow2")


def _id(args) -> str:
    return " ".join(args)


# Where the engine does not (yet) do what QEMU does; strict, so that each
# flips to a failure (and is removed here) once the engine catches up.
ENGINE_GAPS: dict[str, str] = {
    "resize --preallocation=falloc big.qcow2 6M":
        "the engine does not preallocate data when growing a qcow2 image",
    "resize --preallocation=full big.qcow2 6M":
        "the engine does not preallocate data when growing a qcow2 image",
    "rebase -b small.qcow2 -F qcow2 top.qcow2":
        "qemu-img rebase is offered only in its unsafe mode (-u)",
}


def _with_gaps(cases, command):
    marked = []
    for case in cases:
        reason = ENGINE_GAPS.get(f"{command} {_id(case)}")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        marked.append(pytest.param(case, marks=marks, id=_id(case)))
    return marked


CREATE_CASES = [
    ["-f", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "x.qcow2", "0"],
    ["-f", "qcow2", "x.qcow2", "1"],
    ["-f", "qcow2", "x.qcow2", "511"],
    ["-f", "qcow2", "x.qcow2", "1.5M"],
    ["-f", "qcow2", "x.qcow2", "128M"],
    ["-f", "qcow2", "x.qcow2", "1G"],
    ["-f", "qcow2", "x.qcow2", "2T"],
    ["-f", "qcow2", "x.qcow2", "0x10000"],
    ["-f", "qcow2", "x.qcow2", "0x10k"],
    ["-f", "qcow2", "x.qcow2", "1kB"],
    ["-q", "-f", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=512", "x.qcow2", "128M"],
    ["-f", "qcow2", "-o", "cluster_size=4k", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=2M", "x.qcow2", "16M"],
    ["-f", "qcow2", "-o", "cluster_size=0x1000", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=1000", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=4M", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=abc", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=4k,cluster_size=8k", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=4k", "-o", "lazy_refcounts=on", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=0.10", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=v2", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=1.1", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=v3", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=1.0", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts=on", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts=yes", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=1", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=8", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=64", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=3", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=abc", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=99999999999999999999", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "compat=0.10,refcount_bits=8", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "size=2M", "x.qcow2"],
    ["-f", "qcow2", "-o", "preallocation=metadata", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "preallocation=metadata", "x.qcow2", "100000"],
    ["-f", "qcow2", "-o", "preallocation=metadata", "x.qcow2", "5G"],
    ["-f", "qcow2", "-o", "preallocation=metadata,cluster_size=512", "x.qcow2", "3M"],
    ["-f", "qcow2", "-o", "preallocation=metadata,refcount_bits=1,cluster_size=4k",
     "x.qcow2", "3M"],
    ["-f", "qcow2", "-o", "preallocation=metadata,compat=0.10", "x.qcow2", "3M"],
    ["-f", "qcow2", "-o", "preallocation=metadata", "-b", "base.qcow2", "-F", "qcow2",
     "x.qcow2"],
    ["-f", "qcow2", "-o", "size=2M", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "size=abc", "x.qcow2"],
    ["-f", "qcow2", "-o", "foo=bar", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "nocow=on", "x.qcow2", "1M"],
    ["-f", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-o", "help"],
    ["-f", "qcow2", "-o", "?"],
    ["-f", "qcow2", "-o", "help", "x.qcow2"],
    ["-f", "qcow2", "-o", "size=1M,help", "x.qcow2"],
    ["-f", "raw", "-o", "help"],
    ["-f", "raw", "-o", "help", "x.raw"],
    ["-f", "nope", "-o", "help"],
    ["-f", "nope", "x.img", "1M"],
    ["-f", "raw", "x.raw", "1M"],
    ["x.raw", "1M"],
    ["-f", "raw", "x.raw", "0"],
    ["-f", "raw", "x.raw", "1000"],
    ["-f", "raw", "-o", "preallocation=off", "x.raw", "1M"],
    ["-f", "raw", "-b", "base.qcow2", "-F", "qcow2", "x.raw"],
    ["-f", "raw", "-o", "cluster_size=4k", "x.raw", "1M"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "x.qcow2", "4M"],
    ["-f", "qcow2", "-b", "base.qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "raw", "x.qcow2"],
    ["-f", "qcow2", "-b", "nonexistent", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-u", "-b", "nonexistent", "-F", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "-u", "-b", "nonexistent", "x.qcow2", "1M"],
    ["-f", "qcow2", "-u", "-b", "nonexistent", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "x.qcow2"],
    ["-f", "qcow2", "-b", "", "-F", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "x.qcow2"],
    ["-f", "qcow2", "-o", "backing_file=a,,b.qcow2", "-u", "-F", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/x.qcow2"],
    ["-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "sub/x.qcow2"],
    ["-f", "qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    ["-f", "qcow2", "nope/x.qcow2", "1M"],
    ["-f", "qcow2", "foo:x.qcow2", "1M"],
]


@pytest.mark.parametrize("args", CREATE_CASES, ids=_id)
def test_create(twins, engine, args):
    twins.setup(BASE)
    (twins.qemu.folder / "sub").mkdir()
    (twins.ours.folder / "sub").mkdir()
    result = twins.compare("img", "create", *args)
    if result.status == 0 and not any(arg == "help" or arg == "?" for arg in args):
        created = args[-1] if not args[-1][0].isdigit() else args[-2]
        fmt = "raw" if created.endswith(".raw") else "qcow2"
        twins.same_images(created, fmt=fmt)
        twins.compare("img", "info", created)


INFO_CASES = [
    ["base.qcow2"],
    ["top.qcow2"],
    ["--output=json", "top.qcow2"],
    ["--output=human", "top.qcow2"],
    ["--backing-chain", "top.qcow2"],
    ["--backing-chain", "--output=json", "top.qcow2"],
    ["-U", "top.qcow2"],
    ["--force-share", "--output=json", "base.qcow2"],
    ["r.raw"],
    ["--output=json", "r.raw"],
    ["-f", "raw", "base.qcow2"],
    ["-f", "qcow2", "r.raw"],
    ["-f", "nope", "base.qcow2"],
    ["nonexistent"],
    ["--backing-chain", "lonely.qcow2"],
    ["lonely.qcow2"],
    ["v2.qcow2"],
    ["--output=json", "v2.qcow2"],
    ["small.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2"],
    ["--image-opts", "top.qcow2"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,overlap-check=blubb"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,cache-size=1M,l2-cache-size=2M"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,cache.direct=x"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,backing.node-name=b"],
    # info opens without the backing file: a node name given for it is left over
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,backing=null"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,backing="],
    ["--image-opts", "driver=raw,file.filename=r.raw,backing=null"],
    ["--image-opts", "driver=raw,file.filename=r.raw,backing.driver=qcow2"],
    ['json:{"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}, '
     '"backing": "null"}'],
    ["image:top.qcow2"],
    ["file:top.qcow2"],
    ['json:{"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}}'],
    ['json:{"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"'],
    ["json:[1]"],
    ["json:"],
]


@pytest.mark.parametrize("args", _with_gaps(INFO_CASES, "info"))
def test_info(twins, engine, args):
    twins.setup(BASE, TOP, RAW, DATA_IN_BASE, DATA_IN_TOP,
                ("img", "create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
                 "lonely.qcow2", "1M"),
                ("img", "create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M"),
                ("img", "create", "-f", "qcow2", "-o", "cluster_size=512", "small.qcow2",
                 "12345"))
    twins.compare("img", "info", *args)


MAP_CASES = [
    ["base.qcow2"],
    ["top.qcow2"],
    ["--output=json", "base.qcow2"],
    ["--output=json", "top.qcow2"],
    ["--output=human", "top.qcow2"],
    ["--output=json", "--start-offset=64k", "top.qcow2"],
    ["--output=json", "--start-offset=100k", "--max-length=300k", "top.qcow2"],
    ["--output=json", "--max-length=0", "top.qcow2"],
    ["--output=json", "--start-offset=1M", "top.qcow2"],
    ["--output=json", "--start-offset=2M", "top.qcow2"],
    ["--start-offset=96k", "--max-length=1k", "top.qcow2"],
    ["-s", "4k", "-l", "4k", "--output=json", "top.qcow2"],
    ["--output=json", "r.raw"],
    ["r.raw"],
    ["--output=json", "-f", "raw", "top.qcow2"],
    ["--output=json", 'json:{"driver": "qcow2", "file": {"driver": "file", '
                      '"filename": "top.qcow2"}, "backing": null}'],
    ["--output=json", "json:{'driver': 'qcow2', 'file.filename': 'top.qcow2'}"],
    ["--output=json", "--image-opts", "driver=qcow2,file.filename=top.qcow2"],
    ["--output=json", "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing="],
    ["--output=json", "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing=null"],
    ["--output=json", "lonely.qcow2"],
    ["nonexistent"],
    ["-f", "nope", "top.qcow2"],
    ["--output=json", "tail.qcow2"],
    ["tail.qcow2"],
]


@pytest.mark.parametrize("args", _with_gaps(MAP_CASES, "map"))
def test_map(twins, engine, args):
    twins.setup(BASE, TOP, RAW, DATA_IN_BASE, DATA_IN_TOP,
                ("io", "-f", "raw", "-c", "write -P 1 4k 8k", "r.raw"),
                ("img", "create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
                 "lonely.qcow2", "1M"),
                ("img", "create", "-f", "qcow2", "-o", "cluster_size=2k", "tail.qcow2",
                 "100000"),
                ("io", "-c", "write -P 7 97k 1k", "-c", "write -z 96k 1k", "tail.qcow2"))
    twins.compare("img", "map", *args)


def _leak_a_cluster(path):
    """Bump the refcount of a cluster nobody uses: a leak, nothing worse."""
    data = bytearray(path.read_bytes())
    cluster_bits = struct.unpack(">I", data[20:24])[0]
    table_offset = struct.unpack(">Q", data[48:56])[0]
    block_offset = struct.unpack(">Q", data[table_offset:table_offset + 8])[0]
    cluster = len(data) >> cluster_bits
    data[block_offset + 2 * cluster:block_offset + 2 * cluster + 2] = b"\0\1"
    data += bytes(1 << cluster_bits)
    path.write_bytes(bytes(data))


def _corrupt_a_refcount(path):
    """Drop the refcount of the L1 table's cluster: a corruption."""
    data = bytearray(path.read_bytes())
    cluster_bits = struct.unpack(">I", data[20:24])[0]
    l1_offset = struct.unpack(">Q", data[40:48])[0]
    table_offset = struct.unpack(">Q", data[48:56])[0]
    block_offset = struct.unpack(">Q", data[table_offset:table_offset + 8])[0]
    index = l1_offset >> cluster_bits
    data[block_offset + 2 * index:block_offset + 2 * index + 2] = b"\0\0"
    path.write_bytes(bytes(data))


def _dirty_after_crash(path):
    """A lazy-refcounts image whose writer was killed: dirty bit set, refcounts stale."""
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
                    str(path), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 512", "-c", "sigraise 9", str(path)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


CHECK_CASES = [
    (["base.qcow2"], None),
    (["top.qcow2"], None),
    (["--output=json", "top.qcow2"], None),
    (["-q", "top.qcow2"], None),
    (["-f", "raw", "r.raw"], None),
    (["r.raw"], None),
    (["--output=json", "r.raw"], None),
    (["nonexistent"], None),
    (["leaky.qcow2"], _leak_a_cluster),
    (["--output=json", "leaky.qcow2"], _leak_a_cluster),
    (["-r", "leaks", "leaky.qcow2"], _leak_a_cluster),
    (["-r", "all", "leaky.qcow2"], _leak_a_cluster),
    (["-r", "leaks", "--output=json", "leaky.qcow2"], _leak_a_cluster),
    (["-q", "-r", "all", "leaky.qcow2"], _leak_a_cluster),
    (["leaky.qcow2"], _corrupt_a_refcount),
    (["--output=json", "leaky.qcow2"], _corrupt_a_refcount),
    (["-r", "leaks", "leaky.qcow2"], _corrupt_a_refcount),
    (["-r", "all", "leaky.qcow2"], _corrupt_a_refcount),
    (["leaky.qcow2"], _dirty_after_crash),
    (["--output=json", "leaky.qcow2"], _dirty_after_crash),
    (["-r", "all", "leaky.qcow2"], _dirty_after_crash),
    (["-r", "leaks", "leaky.qcow2"], _dirty_after_crash),
]
CHECK_GAPS: dict[str, str] = {}


def _check_params():
    params = []
    for args, damage in CHECK_CASES:
        name = _id(args) + (f" ({damage.__name__})" if damage else "")
        reason = CHECK_GAPS.get(name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(args, damage, marks=marks, id=name))
    return params


@pytest.mark.parametrize("args, damage", _check_params())
def test_check(twins, engine, args, damage):
    twins.setup(BASE, TOP, RAW, DATA_IN_BASE, DATA_IN_TOP,
                ("img", "create", "-f", "qcow2", "leaky.qcow2", "1M"),
                ("io", "-c", "write -P 5 0 128k", "leaky.qcow2"))
    if damage is not None:
        twins.patch("leaky.qcow2", damage)
    twins.compare("img", "check", *args)
    if damage is not None:
        twins.same_images("leaky.qcow2")


COMPARE_CASES = [
    ["base.qcow2", "base.qcow2"],
    ["base.qcow2", "copy.qcow2"],
    ["top.qcow2", "base.qcow2"],
    ["-q", "top.qcow2", "base.qcow2"],
    ["-s", "base.qcow2", "copy.qcow2"],
    ["-s", "top.qcow2", "base.qcow2"],
    ["base.qcow2", "big.qcow2"],
    ["-s", "base.qcow2", "big.qcow2"],
    ["big.qcow2", "base.qcow2"],
    ["big.qcow2", "bigger-data.qcow2"],
    ["-f", "qcow2", "-F", "raw", "base.qcow2", "r.raw"],
    ["r.raw", "empty.qcow2"],
    ["-F", "qcow2", "r.raw", "empty.qcow2"],
    ["empty.qcow2", "zeroed.qcow2"],
    ["-s", "empty.qcow2", "zeroed.qcow2"],
    ["base.qcow2", "nonexistent"],
    ["nonexistent", "base.qcow2"],
    ["-f", "nope", "base.qcow2", "copy.qcow2"],
]


@pytest.mark.parametrize("args", COMPARE_CASES, ids=_id)
def test_compare(twins, engine, args):
    twins.setup(BASE, TOP, RAW, DATA_IN_BASE, DATA_IN_TOP,
                ("img", "create", "-f", "qcow2", "copy.qcow2", "1M"),
                ("io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 192k 4k",
                 "copy.qcow2"),
                ("img", "create", "-f", "qcow2", "big.qcow2", "2M"),
                ("io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 192k 4k",
                 "big.qcow2"),
                ("img", "create", "-f", "qcow2", "bigger-data.qcow2", "1M"),
                ("io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 192k 4k",
                 "-c", "write -P 0x23 1000k 4k", "bigger-data.qcow2"),
                ("img", "create", "-f", "qcow2", "empty.qcow2", "1M"),
                ("img", "create", "-f", "qcow2", "zeroed.qcow2", "1M"),
                ("io", "-c", "write -z 0 256k", "-c", "write -P 0 512k 64k", "zeroed.qcow2"))
    twins.compare("img", "compare", *args)


CONVERT_CASES = [
    ["-O", "qcow2", "top.qcow2", "out.qcow2"],
    ["-O", "raw", "top.qcow2", "out.raw"],
    ["top.qcow2", "out.raw"],
    ["-f", "qcow2", "-O", "qcow2", "base.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-S", "0", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-S", "64k", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-S", "1000", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "top.qcow2",
     "out.qcow2"],
    ["-O", "raw", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "out.raw"],
    ["-O", "qcow2", "base.qcow2", "r.raw", "out.qcow2"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "base.qcow2", "r.raw", "out.qcow2"],
    ["-n", "-O", "qcow2", "top.qcow2", "big.qcow2"],
    ["-n", "--target-is-zero", "-O", "qcow2", "top.qcow2", "big.qcow2"],
    ["-n", "-O", "qcow2", "big.qcow2", "top.qcow2"],
    ["-n", "-O", "qcow2", "-o", "cluster_size=4k", "top.qcow2", "big.qcow2"],
    ["--target-is-zero", "-O", "qcow2", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-o", "help"],
    ["-o", "help", "top.qcow2", "out.qcow2"],
    ["-O", "nope", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "nonexistent", "out.qcow2"],
    ["-O", "qcow2", "top.qcow2"],
    ["-O", "qcow2", "-m", "0", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-m", "16", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-T", "bogus", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-t", "bogus", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-o", "foo=bar", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-p", "top.qcow2", "out.qcow2"],
    ["-q", "-p", "-O", "qcow2", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-C", "top.qcow2", "out.qcow2"],
    ["-O", "qcow2", "-C", "-S", "4k", "top.qcow2", "out.qcow2"],
    ["-c", "-O", "qcow2", "top.qcow2", "out.qcow2"],
    ["-c", "-O", "qcow2", "-o", "cluster_size=4k", "top.qcow2", "out.qcow2"],
    ["-c", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "out.qcow2"],
    ["-c", "-O", "raw", "top.qcow2", "out.raw"],
    ["-c", "-O", "qcow2", "-o", "preallocation=metadata", "top.qcow2", "out.qcow2"],
    ["-c", "-C", "-O", "qcow2", "top.qcow2", "out.qcow2"],
    ["-c", "-n", "-O", "qcow2", "top.qcow2", "big.qcow2"],
]


@pytest.mark.parametrize("args", CONVERT_CASES, ids=_id)
def test_convert(twins, engine, args):
    twins.setup(BASE, TOP, RAW, DATA_IN_BASE, DATA_IN_TOP,
                ("io", "-f", "raw", "-c", "write -P 0x44 8k 8k", "-c", "write -P 0 32k 8k",
                 "r.raw"),
                ("io", "-c", "write -P 0 640k 64k", "-c", "write -P 0x55 700k 1k", "top.qcow2"),
                ("img", "create", "-f", "qcow2", "big.qcow2", "4M"),
                ("io", "-c", "write -P 0x66 0 1M", "big.qcow2"))
    result = twins.compare("img", "convert", *args)
    for name, fmt in (("out.qcow2", "qcow2"), ("out.raw", "raw"), ("big.qcow2", "qcow2")):
        if (twins.qemu.folder / name).exists() or (twins.ours.folder / name).exists():
            twins.same_images(name, fmt=fmt)
    if result.status == 0 and "out.qcow2" in args:
        twins.compare("img", "compare", "top.qcow2", "out.qcow2")


DD_CASES = [
    ["if=top.qcow2", "of=out.raw"],
    ["-O", "qcow2", "if=top.qcow2", "of=out.qcow2"],
    ["-O", "qcow2", "bs=64k", "if=top.qcow2", "of=out.qcow2"],
    ["-O", "qcow2", "bs=4k", "count=10", "if=top.qcow2", "of=out.qcow2"],
    ["-O", "qcow2", "bs=4k", "skip=10", "if=top.qcow2", "of=out.qcow2"],
    ["-O", "qcow2", "bs=4k", "skip=10", "count=20", "if=top.qcow2", "of=out.qcow2"],
    ["-O", "qcow2", "bs=4k", "skip=1000", "if=top.qcow2", "of=out.qcow2"],
    ["-O", "qcow2", "bs=1000", "count=3", "if=top.qcow2", "of=out.qcow2"],
    ["-f", "raw", "bs=1M", "if=r.raw", "of=out.raw"],
    ["bs=0", "if=top.qcow2", "of=out.raw"],
    ["bs=3G", "if=top.qcow2", "of=out.raw"],
    ["count=x", "if=top.qcow2", "of=out.raw"],
    ["if=top.qcow2"],
    ["if=top.qcow2", "of=out.raw", "bogus"],
    ["if=top.qcow2", "of=out.raw", "foo=bar"],
    ["-O", "nope", "if=top.qcow2", "of=out.raw"],
    ["if=nonexistent", "of=out.raw"],
]


@pytest.mark.parametrize("args", DD_CASES, ids=_id)
def test_dd(twins, engine, args):
    twins.setup(BASE, TOP, RAW, DATA_IN_BASE, DATA_IN_TOP)
    twins.compare("img", "dd", *args)
    for name, fmt in (("out.qcow2", "qcow2"), ("out.raw", "raw")):
        if (twins.qemu.folder / name).exists() or (twins.ours.folder / name).exists():
            twins.same_images(name, fmt=fmt)


RESIZE_CASES = [
    ["top.qcow2", "2M"],
    ["top.qcow2", "+1M"],
    ["top.qcow2", "+0"],
    ["top.qcow2", "1M"],
    ["top.qcow2", "+1.5k"],
    ["-q", "top.qcow2", "4M"],
    ["top.qcow2", "--", "-64k"],
    ["--shrink", "top.qcow2", "--", "-64k"],
    ["--shrink", "top.qcow2", "200k"],
    ["--shrink", "top.qcow2", "1000"],
    ["--shrink", "big.qcow2", "64k"],
    ["big.qcow2", "+3G"],
    ["top.qcow2", "0"],
    ["top.qcow2", "--", "-2M"],
    ["top.qcow2", "1000"],
    ["top.qcow2", "x"],
    ["top.qcow2", "-x"],
    ["top.qcow2", "16E"],
    ["top.qcow2", "9E"],
    ["top.qcow2", "18446744073709551615"],
    ["top.qcow2", "9223372036854775807"],
    ["top.qcow2", "+8E"],
    ["top.qcow2", "1M", "2M"],
    ["top.qcow2"],
    ["2M"],
    ["-f", "raw", "r.raw", "3M"],
    ["r.raw", "3M"],
    ["-q", "r.raw", "3M"],
    ["-f", "raw", "r.raw", "1000"],
    ["--shrink", "-f", "raw", "r.raw", "1000"],
    ["--preallocation=falloc", "-f", "raw", "r.raw", "3M"],
    ["--preallocation=full", "-f", "raw", "r.raw", "+64k"],
    ["--preallocation=full", "-f", "raw", "r.raw", "1M"],
    ["--preallocation=off", "top.qcow2", "3M"],
    ["--preallocation=metadata", "big.qcow2", "6M"],
    ["--preallocation=metadata", "big.qcow2", "+100000"],
    ["--preallocation=metadata", "v2.qcow2", "+1M"],
    ["--preallocation=falloc", "big.qcow2", "6M"],
    ["--preallocation=full", "big.qcow2", "6M"],
    ["--preallocation=bogus", "top.qcow2", "3M"],
    ["--preallocation=full", "--shrink", "top.qcow2", "64k"],
    ["-f", "qcow2", "r.raw", "2M"],
    ["-f", "nope", "top.qcow2", "2M"],
    ["nonexistent", "2M"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2", "2M"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,read-only=on", "2M"],
    ["--image-opts", "driver=qcow2,file.filename=top.qcow2,file.read-only=on", "2M"],
    ['json:{"driver": "qcow2", "read-only": true, "file": "top.qcow2"}', "2M"],
    ["--image-opts", "-f", "qcow2", "top.qcow2", "2M"],
    ["-x", "top.qcow2", "2M"],
    ["-f"],
    ["--shrink", "v2.qcow2", "1M"],
    ["v2.qcow2", "+1M"],
    ["lonely.qcow2", "2M"],
]


@pytest.mark.parametrize("args", _with_gaps(RESIZE_CASES, "resize"))
def test_resize(twins, engine, args):
    twins.setup(BASE, TOP, RAW, DATA_IN_BASE, DATA_IN_TOP,
                ("img", "create", "-f", "qcow2", "big.qcow2", "4M"),
                ("io", "-c", "write -P 0x66 0 4M", "big.qcow2"),
                ("img", "create", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "64M"),
                ("io", "-c", "write -P 0x77 63M 1M", "v2.qcow2"),
                ("img", "create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
                 "lonely.qcow2", "1M"))
    result = twins.compare("img", "resize", *args)
    for name, fmt in (("top.qcow2", "qcow2"), ("big.qcow2", "qcow2"), ("v2.qcow2", "qcow2"),
                      ("r.raw", "raw")):
        twins.same_images(name, fmt=fmt)
    if result.status == 0:
        twins.compare("img", "map", "--output=json", "top.qcow2")
        twins.compare("img", "check", "big.qcow2")


def _dirty_with_refblock_out_of_reach(path):
    """A dirty lazy-refcounts image whose refcount block lies past any possible file
    size: repairing it on open fails to grow the file and error_report()s that."""
    _dirty_after_crash(path)
    with path.open("r+b") as image:
        image.seek(48)
        (table,) = struct.unpack(">Q", image.read(8))
        image.seek(table)
        image.write(struct.pack(">Q", 1 << 56))


@pytest.mark.parametrize("tool, args", [
    ("img", ["resize", "dirty.qcow2", "+1M"]),
    ("img", ["rebase", "-u", "-b", "", "dirty.qcow2"]),
    ("io", ["-c", "read -P 0x5a 0 512", "dirty.qcow2"]),
], ids=lambda value: value if isinstance(value, str) else " ".join(value))
def test_dirty_image_repaired_on_open(twins, engine, tool, args):
    """The repair's error_report() lines carry the name of the program that opened it."""
    twins.setup(("img", "create", "-f", "qcow2", "dirty.qcow2", "1M"))
    twins.patch("dirty.qcow2", _dirty_with_refblock_out_of_reach)
    twins.compare(tool, *args)
    twins.same_images("dirty.qcow2")


@pytest.mark.parametrize("size", [2**63 - 1, 2**64 - 2**29, 2**64 - 2**29 + 1, 2**64 - 1,
                                  2**50])
@pytest.mark.parametrize("cluster_size", ["64k", "2M"])
def test_header_size_out_of_range(twins, engine, size, cluster_size):
    """A virtual size near 2^64 wraps in QEMU's L1 index arithmetic and is refused
    only once the format has opened; others are "too big" or need a larger L1."""
    twins.setup(("img", "create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
                 "big.qcow2", "1M"))

    def set_size(path):
        with path.open("r+b") as image:
            image.seek(24)
            image.write(struct.pack(">Q", size))

    twins.patch("big.qcow2", set_size)
    twins.compare("img", "info", "big.qcow2")
    twins.compare("img", "check", "big.qcow2")
    twins.compare("io", "-c", "read 0 64k", "big.qcow2")


def _unalign_snapshot_l1(path):
    """Move the first snapshot's L1 table offset off its cluster boundary."""
    with path.open("r+b") as image:
        image.seek(64)
        (table,) = struct.unpack(">Q", image.read(8))
        image.seek(table)
        (l1_offset,) = struct.unpack(">Q", image.read(8))
        image.seek(table)
        image.write(struct.pack(">Q", l1_offset + 512))


# bytes that are not UTF-8, as Python carries them in str (surrogateescape)
NOT_UTF8 = b"\xff\xfe".decode("utf-8", "surrogateescape")


def test_non_utf8_names_byte_for_byte(twins, engine):
    """Names read from an image go out as the bytes stored, as QEMU prints them."""
    twins.setup(BASE, DATA_IN_BASE, ("img", "snapshot", "-c", f"sn{NOT_UTF8}", "base.qcow2"),
                ("img", "create", "-f", "qcow2", "-u", "-b", f"gone{NOT_UTF8}.qcow2",
                 "-F", "qcow2", "lonely.qcow2", "1M"))
    twins.patch("base.qcow2", _unalign_snapshot_l1)
    twins.compare("img", "check", "base.qcow2")
    twins.compare("img", "info", "lonely.qcow2")
    twins.compare("img", "map", "lonely.qcow2")
    twins.compare("io", "-c", "read 0 512", "lonely.qcow2")


def _unknown_feature_named_in_short_table(path):
    """Incompatible bit 63 set, and a feature table whose one entry is cut short."""
    with path.open("r+b") as image:
        image.seek(72)
        (features,) = struct.unpack(">Q", image.read(8))
        image.seek(72)
        image.write(struct.pack(">Q", features | 1 << 63))
        image.seek(100)
        (header_length,) = struct.unpack(">I", image.read(4))
        payload = b"\x00\x3fTest feature"
        image.seek(header_length)
        image.write(struct.pack(">II", 0x6803F857, len(payload)) + payload
                    + bytes(-len(payload) % 8) + bytes(8))


def test_unsupported_feature_named_from_the_table(twins, engine):
    twins.setup(BASE)
    twins.patch("base.qcow2", _unknown_feature_named_in_short_table)
    twins.compare("img", "info", "base.qcow2")
    twins.compare("io", "-c", "read 0 512", "base.qcow2")


def test_filenames_with_colons(twins, engine):
    """A "file:" prefix lets a name hold a colon; QEMU then calls it "./name"."""
    twins.setup(BASE, DATA_IN_BASE,
                ("img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 "file:image:top.qcow2"))
    twins.compare("img", "create", "-f", "qcow2", "file:a:b.qcow2", "1M")
    twins.compare("img", "create", "-f", "qcow2", "-b", "./image:top.qcow2", "-F", "qcow2",
                  "file:image:more.qcow2")
    twins.compare("img", "info", "file:image:top.qcow2")
    twins.compare("img", "info", "--backing-chain", "file:image:more.qcow2")
    twins.compare("img", "map", "--output=json", "file:image:more.qcow2")
    twins.compare("img", "info", "image:top.qcow2")
    twins.compare("io", "-c", "read -P 0x11 0 64k", "-c", "info", "file:image:top.qcow2")
    twins.same_images("./image:top.qcow2", "./image:more.qcow2")


REBASE_CASES = [
    ["-u", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-u", "-b", "base.qcow2", "-F", "raw", "top.qcow2"],
    ["-u", "-b", "new.qcow2", "top.qcow2"],
    ["-u", "-b", "", "top.qcow2"],
    ["-u", "top.qcow2"],
    ["-u", "-F", "qcow2", "top.qcow2"],
    ["-u", "-b", "x", "-F", "host_device", "top.qcow2"],
    ["-u", "-b", "x", "-F", "bogus", "top.qcow2"],
    ["-u", "-b", "a" * 1100, "-F", "qcow2", "top.qcow2"],
    ["-u", "-b", "b" * 1000, "-F", "qcow2", "small.qcow2"],
    ["-u", "-t", "bogus", "-b", "x", "-F", "qcow2", "top.qcow2"],
    ["-u", "-T", "bogus", "-b", "x", "-F", "qcow2", "top.qcow2"],
    ["-p", "-u", "-b", "y", "-F", "raw", "top.qcow2"],
    ["-q", "-p", "-u", "-b", "y", "-F", "raw", "top.qcow2"],
    ["-u", "-b", "new.qcow2", "-F", "qcow2", "lonely.qcow2"],
    ["-u", "-b", "new.qcow2", "-F", "qcow2", "-f", "raw", "r.raw"],
    ["-u", "-b", "base.qcow2", "-F", "qcow2", "--image-opts",
     "driver=qcow2,file.filename=lonely.qcow2"],
    ["-u", "-b", "", "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing=null"],
    ["top.qcow2"],
    ["-b", "small.qcow2", "-F", "qcow2", "top.qcow2"],
    ["-u", "top.qcow2", "extra"],
    ["-u", "nonexistent"],
    ["-x", "top.qcow2"],
]


@pytest.mark.parametrize("args", _with_gaps(REBASE_CASES, "rebase"))
def test_rebase(twins, engine, args):
    twins.setup(BASE, TOP, RAW, DATA_IN_BASE, DATA_IN_TOP,
                ("img", "create", "-f", "qcow2", "-o", "cluster_size=512", "small.qcow2",
                 "1M"),
                ("img", "create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
                 "lonely.qcow2", "1M"))
    twins.compare("img", "rebase", *args)
    for name in ("top.qcow2", "small.qcow2", "lonely.qcow2"):
        twins.same_images(name)
        twins.compare("img", "info", "--output=json", name)
