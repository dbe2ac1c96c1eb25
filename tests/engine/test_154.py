"""Every operation of QEMU's iotest 154, through the engine and through QEMU.

The steps below are those of tests/qemu-iotests/154 (write-zeroes over
backing files, unaligned image tails, preallocated zero clusters).  Each
step runs once on real QEMU (one qemu-img/qemu-io process per step, as the
iotest does) and once on the engine (one open/close per step).  After every
``map`` step the engine's entries must equal QEMU's unfiltered
``qemu-img map --output=json``, host offsets included; reads and ``alloc``
must agree, and the image files must be identical byte for byte.
"""

from __future__ import annotations

import os
import re

import pytest

from imgengine import create_image, open_image
from imgengine.sizes import parse_size

SIZE = 128 * 1024 * 1024

# (image, command) steps; image is "base" or "test".  "create" takes
# cluster size, virtual size (None: from the backing file) and whether the
# test image has the base as backing file.
SECTIONS: list[tuple[str, list[tuple]]] = []


def _section(title: str, *steps: tuple) -> None:
    SECTIONS.append((title, list(steps)))


def _both(size_test=None, base_cluster="512", base_size=SIZE):
    return [("base", "create", base_cluster, base_size, False),
            ("test", "create", "4k", size_test, True)]


def _io(image: str, command: str) -> tuple:
    return (image, "io", command)


MAP = ("test", "map")

_section("backing file contains zeros", *_both(),
         _io("test", "write -z 0 2k"), _io("test", "write -z 10k 2k"),
         _io("test", "write -z 17k 2k"), _io("test", "write -z 27k 2k"), MAP)
_section("backing file contains non-zero data before write_zeroes", *_both(),
         _io("base", "write -P 0x11 32k 1k"), _io("test", "write -z 34k 1k"),
         _io("test", "read -P 0x11 32k 1k"), _io("test", "read -P 0 33k 3k"),
         _io("base", "write -P 0x11 65k 1k"), _io("test", "write -z 66k 1k"),
         _io("test", "read -P 0x11 65k 1k"), _io("test", "read -P 0 64k 1k"),
         _io("test", "read -P 0 66k 2k"), MAP)
_section("backing file contains non-zero data after write_zeroes", *_both(),
         _io("base", "write -P 0x11 34k 1k"), _io("test", "write -z 33k 1k"),
         _io("test", "read -P 0 32k 2k"), _io("test", "read -P 0x11 34k 1k"),
         _io("test", "read -P 0 35k 1k"),
         _io("base", "write -P 0x11 43k 1k"), _io("test", "write -z 41k 1k"),
         _io("test", "read -P 0x11 43k 1k"), _io("test", "read -P 0 40k 3k"), MAP)
_section("write_zeroes covers non-zero data", *_both(),
         _io("base", "write -P 0x11 5k 1k"), _io("test", "write -z 5k 2k"),
         _io("test", "read -P 0 4k 4k"),
         _io("base", "write -P 0x11 14k 1k"), _io("test", "write -z 13k 2k"),
         _io("test", "read -P 0 12k 4k"),
         _io("base", "write -P 0x11 21k 2k"), _io("test", "write -z 21k 2k"),
         _io("test", "read -P 0 20k 4k"),
         _io("base", "write -P 0x11 30208 1k"), _io("test", "write -z 29k 2k"),
         _io("test", "read -P 0 28k 4k"), MAP)
_section("spanning two clusters, non-zero before request", *_both(),
         _io("base", "write -P 0x11 32k 1k"), _io("test", "write -z 35k 2k"),
         _io("test", "read -P 0x11 32k 1k"), _io("test", "read -P 0 33k 7k"),
         _io("base", "write -P 0x11 49k 1k"), _io("test", "write -z 51k 2k"),
         _io("test", "read -P 0 48k 1k"), _io("test", "read -P 0x11 49k 1k"),
         _io("test", "read -P 0 50k 6k"),
         _io("base", "write -P 0x11 66k 1k"), _io("test", "write -z 67k 2k"),
         _io("test", "read -P 0 64k 2k"), _io("test", "read -P 0x11 66k 1k"),
         _io("test", "read -P 0 67k 5k"), MAP)
_section("spanning two clusters, non-zero after request", *_both(),
         _io("base", "write -P 0x11 37k 1k"), _io("test", "write -z 35k 2k"),
         _io("test", "read -P 0 32k 5k"), _io("test", "read -P 0x11 37k 1k"),
         _io("test", "read -P 0 38k 2k"),
         _io("base", "write -P 0x11 54k 1k"), _io("test", "write -z 51k 2k"),
         _io("test", "read -P 0 48k 6k"), _io("test", "read -P 0x11 54k 1k"),
         _io("test", "read -P 0 55k 1k"),
         _io("base", "write -P 0x11 71k 1k"), _io("test", "write -z 67k 2k"),
         _io("test", "read -P 0 64k 7k"), _io("test", "read -P 0x11 71k 1k"), MAP)
_section("spanning two clusters, partially overwriting backing file", *_both(),
         _io("base", "write -P 0x11 2k 4k"), _io("test", "write -z 3k 2k"),
         _io("test", "read -P 0 0k 2k"), _io("test", "read -P 0x11 2k 1k"),
         _io("test", "read -P 0 3k 2k"), _io("test", "read -P 0x11 5k 1k"),
         _io("test", "read -P 0 6k 2k"), MAP)
_section("spanning multiple clusters, non-zero in first cluster", *_both(),
         _io("base", "write -P 0x11 64k 2k"), _io("test", "write -z 66k 7k"),
         _io("test", "read -P 0x11 64k 2k"), _io("test", "read -P 0 66k 10k"), MAP)
_section("spanning multiple clusters, non-zero in intermediate cluster", *_both(),
         _io("base", "write -P 0x11 69k 2k"), _io("test", "write -z 66k 7k"),
         _io("test", "read -P 0 64k 12k"), MAP)
_section("spanning multiple clusters, non-zero in final cluster", *_both(),
         _io("base", "write -P 0x11 74k 2k"), _io("test", "write -z 66k 7k"),
         _io("test", "read -P 0 64k 10k"), _io("test", "read -P 0x11 74k 2k"), MAP)
_section("spanning multiple clusters, partially overwriting backing file", *_both(),
         _io("base", "write -P 0x11 65k 10k"), _io("test", "write -z 66k 7k"),
         _io("test", "read -P 0 64k 1k"), _io("test", "read -P 0x11 65k 1k"),
         _io("test", "read -P 0 66k 7k"), _io("test", "read -P 0x11 73k 2k"),
         _io("test", "read -P 0 75k 1k"), MAP)


def _tail_steps(writes_with_backing: bool, base_steps: list[tuple]) -> list[tuple]:
    steps = list(base_steps)
    for command in (f"write -z {SIZE} 512", f"write -z {SIZE + 1536} 512",
                    f"write -z {SIZE + 512} 1024", f"write -z {SIZE} 2048"):
        steps += [("test", "create", "4k", SIZE + 2048, writes_with_backing),
                  _io("test", command), _io("test", f"alloc {SIZE} 2048"), MAP]
    return steps


_section("unaligned image tail cluster, no allocation needed",
         *_tail_steps(False, []),
         *_tail_steps(True, [("base", "create", "2048", SIZE + 1024, False)]),
         _io("base", f"write -z {SIZE} 512"),
         *_tail_steps(True, []),
         ("test", "create", "4k", SIZE + 1024, False),
         _io("test", f"write -P 1 {SIZE} 1024"), _io("test", f"write -z {SIZE + 512} 512"),
         _io("test", f"read -P 1 {SIZE} 512"), _io("test", f"read -P 0 {SIZE + 512} 512"),
         _io("test", f"alloc {SIZE} 1024"), MAP,
         _io("test", f"write -z {SIZE} 1024"), _io("test", f"alloc {SIZE} 1024"),
         _io("test", f"read -P 0 {SIZE} 1024"), MAP)
_section("unaligned image tail cluster, allocation required",
         ("base", "create", "512", SIZE + 1024, False),
         ("test", "create", "4k", SIZE + 2048, True),
         _io("base", f"write -P 1 {SIZE} 512"), _io("test", f"write -z {SIZE + 1024} 512"),
         _io("test", f"read -P 1 {SIZE} 512"), _io("test", f"read -P 0 {SIZE + 512} 1536"),
         MAP,
         ("base", "create", "512", SIZE + 1024, False),
         ("test", "create", "4k", SIZE + 2048, True),
         _io("base", f"write -P 1 {SIZE + 512} 512"), _io("test", f"write -z {SIZE} 512"),
         _io("test", f"read -P 0 {SIZE} 512"), _io("test", f"read -P 1 {SIZE + 512} 512"),
         _io("test", f"read -P 0 {SIZE + 1024} 1024"),
         _io("test", f"write -z {SIZE + 1536} 512"),
         _io("test", f"read -P 0 {SIZE} 512"), _io("test", f"read -P 1 {SIZE + 512} 512"),
         _io("test", f"read -P 0 {SIZE + 1024} 1024"), MAP)


def engine_io(path: str, command: str) -> str:
    """Carry out one qemu-io command on the engine; returns a comparable summary."""
    words = command.split()
    verb = words[0]
    with open_image(path) as node:
        if verb == "write" and words[1] == "-z":
            node.write_zeroes(parse_size(words[2]), parse_size(words[3]))
            return "ok"
        if verb == "write" and words[1] == "-P":
            pattern = int(words[2], 0)
            length = parse_size(words[4])
            node.write(parse_size(words[3]), bytes([pattern]) * length)
            return "ok"
        if verb == "read":
            pattern = int(words[2], 0)
            length = parse_size(words[4])
            data = node.read(parse_size(words[3]), length)
            return "ok" if data == bytes([pattern]) * length else "pattern mismatch"
        if verb == "alloc":
            offset, count = parse_size(words[1]), parse_size(words[2])
            total, remaining, start = 0, count, offset
            while remaining:
                allocated, num = node.is_allocated(offset, remaining)
                offset += num
                remaining -= num
                total += num if allocated else 0
                if num == 0:
                    count -= remaining
                    remaining = 0
            return f"{total}/{count} bytes allocated at offset {start}"
    raise AssertionError(command)


def qemu_io_summary(qemu, path: str, command: str) -> str:
    out = qemu.io(path, command).stdout
    words = command.split()
    if words[0] == "alloc":
        match = re.search(r"(\d+)/(\d+) bytes allocated at offset", out)
        assert match, out
        return f"{match.group(1)}/{match.group(2)} bytes allocated at offset " \
               f"{parse_size(words[1])}"
    if "Pattern verification failed" in out:
        return "pattern mismatch"
    return "ok"



def run_section(qemu, tmp_path, steps: list[tuple]) -> int:
    dirs = {"qemu": tmp_path / "qemu", "engine": tmp_path / "engine"}
    for d in dirs.values():
        d.mkdir(exist_ok=True)
    maps = 0
    for step in steps:
        image, action = step[0], step[1]
        name = "t.qcow2.base" if image == "base" else "t.qcow2"
        qpath = str(dirs["qemu"] / name)
        epath = str(dirs["engine"] / name)
        if action == "create":
            cluster, size, backed = step[2], step[3], step[4]
            options = {"cluster_size": cluster}
            if backed:
                # A relative name (resolved next to the overlay) keeps the
                # two directories' files byte-identical.
                options.update(backing_file="t.qcow2.base", backing_fmt="qcow2")
            qemu.create(qpath, "qcow2", size, options)
            if size is not None:
                options["size"] = str(size)
            create_image(epath, "qcow2", options)
        elif action == "io":
            command = step[2]
            assert engine_io(epath, command) == qemu_io_summary(qemu, qpath, command), command
        elif action == "map":
            assert qemu.engine_map(epath) == qemu.map(qpath), f"map #{maps}"
            maps += 1
        for which in ("t.qcow2", "t.qcow2.base"):
            a, b = dirs["qemu"] / which, dirs["engine"] / which
            if a.exists():
                assert a.read_bytes() == b.read_bytes(), (step, which)
    return maps


@pytest.mark.parametrize("title,steps", SECTIONS, ids=[s[0] for s in SECTIONS])
def test_154_section_matches_qemu(qemu, tmp_path, title, steps):
    assert run_section(qemu, tmp_path, steps) >= 1


def test_154_images_check_clean(qemu, tmp_path):
    # After the whole of 154's last section the engine's images pass check.
    run_section(qemu, tmp_path, SECTIONS[-1][1])
    for name in ("t.qcow2", "t.qcow2.base"):
        report = qemu.check(os.path.join(tmp_path, "engine", name))
        assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
        assert report.get("check-errors", 0) == 0
