"""Tools for the qcow2 check tests: image surgery, and both checks side by side.

``Qcow2Surgery`` reads and damages the metadata of a qcow2 file with plain
struct writes (the images themselves always come from real qemu-img/qemu-io).
``qemu_check`` runs the real ``qemu-img check``; ``engine_check`` runs the
pyqemu front end's ``qemu-img check`` in-process over the engine, so the two
give the same kind of outcome: exit status, the JSON report and stderr lines.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from imgengine.qcow2 import format as fmt


@dataclass
class Outcome:
    """What one ``qemu-img check --output=json`` run produced."""

    status: int
    report: dict[str, int] | None
    stderr: list[str] = field(default_factory=list)


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


def qemu_check(qemu_img: str, path: Path, repair: str | None = None) -> Outcome:
    """The real qemu-img check of ``path`` (run in its folder, by file name)."""
    argv = [qemu_img, "check", "--output=json"]
    if repair:
        argv += ["-r", repair]
    argv.append(path.name)
    done = run(argv, cwd=path.parent, errors="surrogateescape")
    report = None
    if done.stdout.strip():
        report = json.loads(done.stdout)
        report.pop("filename")
        report.pop("format")
    return Outcome(done.returncode, report, done.stderr.splitlines())


def engine_check(path: Path, repair: str | None = None) -> Outcome:
    """The engine's check of ``path`` as its users get it: ``qemu-img check
    --output=json`` of the pyqemu front end, run in-process in the file's folder
    (open_image as qemu-img check opens, BlockNode.check, img_check's statuses)."""
    from pyqemu import img

    argv = ["check", "--output=json"]
    if repair:
        argv += ["-r", repair]
    argv.append(path.name)
    stdout, stderr = io.StringIO(), io.StringIO()
    home = os.getcwd()
    os.chdir(path.parent)
    try:
        status = img.run(argv, io.StringIO(""), stdout, stderr)
    finally:
        os.chdir(home)
    report = None
    if stdout.getvalue().strip():
        report = json.loads(stdout.getvalue())
        report.pop("filename")
        report.pop("format")
    return Outcome(status, report, stderr.getvalue().splitlines())


def twin_copies(image: Path, folder: Path) -> tuple[Path, Path]:
    """Two identical copies of ``image``: one for QEMU, one for the engine."""
    ours = folder / "engine" / image.name
    theirs = folder / "qemu" / image.name
    for target in (ours, theirs):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
    return theirs, ours


def _data_extents(path: Path) -> list[tuple[int, int]]:
    """The (start, end) stretches of a file that are not holes."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        while True:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:
                    return extents
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            position = end
    finally:
        os.close(fd)


def same_content(a: Path, b: Path) -> bool:
    """Byte-for-byte equality (a hole and written zeroes read the same).

    Only the stretches where either file holds data are read, so a repair
    that grew a file to a terabyte of holes is compared quickly.
    """
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        for start, end in sorted(_data_extents(a) + _data_extents(b)):
            fa.seek(start)
            fb.seek(start)
            while start < end:
                chunk = min(end - start, 1 << 20)
                if fa.read(chunk) != fb.read(chunk):
                    return False
                start += chunk
    return True


def first_difference(a: Path, b: Path) -> str:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    if len(data_a) != len(data_b):
        return f"sizes differ: {len(data_a)} != {len(data_b)}"
    for offset in range(0, len(data_a), 8):
        if data_a[offset:offset + 8] != data_b[offset:offset + 8]:
            return (f"first difference at {offset:#x}: {data_a[offset:offset + 8].hex()} "
                    f"!= {data_b[offset:offset + 8].hex()}")
    return "identical"


class Qcow2Surgery:
    """Direct reads and writes of a qcow2 file's metadata, for damaging it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            self.header = fmt.unpack_fixed_header(f.read(fmt.HEADER_V3_LENGTH))
        h = self.header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = 1 << h.cluster_bits
        self.refcount_bits = 1 << h.refcount_order
        self.refblock_entries = self.cluster_size * 8 // self.refcount_bits
        self.extended_l2 = bool(h.incompatible_features & fmt.INCOMPAT_EXTL2)
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_entries = self.cluster_size // self.l2_entry_size

    # -- raw access --------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        with self.path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes) -> None:
        with self.path.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    def u64(self, offset: int) -> int:
        return struct.unpack(">Q", self.read(offset, 8))[0]

    def set_u64(self, offset: int, value: int) -> None:
        self.write(offset, struct.pack(">Q", value & (2**64 - 1)))

    def file_size(self) -> int:
        return self.path.stat().st_size

    def grow(self, clusters: int = 1) -> int:
        """Append zeroed clusters (rounding the file up first); the first one's offset."""
        size = self.file_size()
        start = -(-size // self.cluster_size) * self.cluster_size
        os.truncate(self.path, start + clusters * self.cluster_size)
        return start

    # -- tables --------------------------------------------------------------------------

    def l1_offset(self, index: int) -> int:
        return self.header.l1_table_offset + 8 * index

    def l1_entries(self) -> list[int]:
        raw = self.read(self.header.l1_table_offset, 8 * self.header.l1_size)
        return list(struct.unpack(f">{self.header.l1_size}Q", raw))

    def l2_entry_offset(self, l2_table: int, index: int) -> int:
        return l2_table + index * self.l2_entry_size

    def l2_tables(self) -> list[tuple[int, int]]:
        """(L1 index, L2 table offset) of every allocated L2 table."""
        return [(i, e & fmt.L1E_OFFSET_MASK) for i, e in enumerate(self.l1_entries())
                if e & fmt.L1E_OFFSET_MASK]

    def mapped_entries(self) -> list[tuple[int, int]]:
        """(file offset of the L2 entry, entry) for entries with a host cluster."""
        found = []
        for _, table in self.l2_tables():
            for i in range(self.l2_entries):
                where = self.l2_entry_offset(table, i)
                entry = self.u64(where)
                if entry & fmt.OFLAG_COMPRESSED:
                    continue
                if entry & fmt.L2E_OFFSET_MASK:
                    found.append((where, entry))
        return found

    def reftable(self) -> list[int]:
        count = self.header.refcount_table_clusters * self.cluster_size // 8
        raw = self.read(self.header.refcount_table_offset, 8 * count)
        return list(struct.unpack(f">{count}Q", raw))

    def reftable_entry_offset(self, index: int) -> int:
        return self.header.refcount_table_offset + 8 * index

    def refcount_location(self, cluster: int) -> tuple[int, int, int]:
        """(byte offset, bit shift, width) of a cluster's refcount entry."""
        table_index, index = divmod(cluster, self.refblock_entries)
        block = self.reftable()[table_index] & fmt.REFT_OFFSET_MASK
        assert block, f"cluster {cluster} has no refcount block"
        bits = self.refcount_bits
        if bits >= 8:
            return block + index * bits // 8, 0, bits
        per_byte = 8 // bits
        return block + index // per_byte, bits * (index % per_byte), bits

    def refcount(self, cluster: int) -> int:
        offset, shift, bits = self.refcount_location(cluster)
        if bits >= 8:
            return int.from_bytes(self.read(offset, bits // 8), "big")
        return (self.read(offset, 1)[0] >> shift) & ((1 << bits) - 1)

    def set_refcount(self, cluster: int, value: int) -> None:
        offset, shift, bits = self.refcount_location(cluster)
        if bits >= 8:
            self.write(offset, value.to_bytes(bits // 8, "big"))
            return
        mask = ((1 << bits) - 1) << shift
        byte = self.read(offset, 1)[0]
        self.write(offset, bytes(((byte & ~mask) | ((value << shift) & mask),)))
