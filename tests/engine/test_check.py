"""The engine's qcow2 check and repair, compared with QEMU 7.2's ``qemu-img check``.

Every image is made by real qemu-img/qemu-io; damaged images are made from
those by struct writes into their metadata.  Each image is copied twice and
checked once by QEMU and once by the engine, read-only and with ``-r leaks``
and ``-r all``: the exit status, the JSON report and every stderr line must
be the same, a repaired file must be byte-for-byte what QEMU's repair left,
and a read-only check must not change a byte.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import random
import struct
import sys
from pathlib import Path

import pytest

from imgengine import open_image
from imgengine.errors import CorruptImageError, ImageError
from imgengine.qcow2 import format as fmt
from imgengine.qcow2.check import CheckFailedError, Qcow2Checker, check_qcow2


def _load_tools():
    name = "check_tools"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("check_tools.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tools = _load_tools()
MODES = (None, "leaks", "all")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_image(qemu_img: str, qemu_io: str, folder: Path, *, size: str = "16M",
               options: str = "", io: tuple[str, ...] = (), snapshots: tuple[str, ...] = (),
               name: str = "test.qcow2") -> Path:
    """An image made by QEMU: qemu-img create, then qemu-io commands and snapshots."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    argv = [qemu_img, "create", "-f", "qcow2"]
    if options:
        argv += ["-o", options]
    done = tools.run(argv + [str(path), size])
    assert done.returncode == 0, done.stderr
    for step in io:
        if step.startswith("snapshot "):
            done = tools.run([qemu_img, "snapshot", "-c", step.split()[1], str(path)])
        else:
            done = tools.run([qemu_io, "-c", step, str(path)])
        assert done.returncode == 0, done.stderr
        assert "error" not in done.stderr.lower(), done.stderr
    for snapshot in snapshots:
        done = tools.run([qemu_img, "snapshot", "-c", snapshot, str(path)])
        assert done.returncode == 0, done.stderr
    return path


def compare_with_qemu(qemu_img: str, image: Path, work: Path, modes=MODES) -> list:
    """Check ``image`` with QEMU and the engine in each mode; the outcomes must agree."""
    outcomes = []
    for mode in modes:
        theirs, ours = tools.twin_copies(image, work / f"mode-{mode}")
        before = digest(ours)
        expected = tools.qemu_check(qemu_img, theirs, mode)
        actual = tools.engine_check(ours, mode)
        assert actual == expected, f"-r {mode}"
        if mode is None:
            assert digest(ours) == before, "a read-only check changed the image"
        else:
            assert tools.same_content(theirs, ours), \
                f"-r {mode}: {tools.first_difference(theirs, ours)}"
            assert tools.qemu_check(qemu_img, ours) == tools.qemu_check(qemu_img, theirs)
        outcomes.append(expected)
    return outcomes


# -- clean images of many shapes -------------------------------------------------------------

DATA = ("write -P 0x11 0 300k", "write -P 0x22 1M 64k", "write -P 0x33 5M 20k")

CLEAN_SHAPES = {
    "cluster-512": dict(options="cluster_size=512", io=DATA),
    "cluster-4k": dict(options="cluster_size=4096", io=DATA),
    "cluster-64k": dict(io=DATA),
    "cluster-2M": dict(options="cluster_size=2M", size="64M",
                       io=("write 0 3M", "write -P 7 20M 64k")),
    "refcount-1": dict(options="cluster_size=4096,refcount_bits=1", io=DATA),
    "refcount-2": dict(options="cluster_size=4096,refcount_bits=2", io=DATA),
    "refcount-4": dict(options="cluster_size=4096,refcount_bits=4", io=DATA),
    "refcount-8": dict(options="cluster_size=4096,refcount_bits=8", io=DATA),
    "refcount-32": dict(options="refcount_bits=32", io=DATA),
    "refcount-64": dict(options="refcount_bits=64", io=DATA),
    "empty": dict(),
    "zero-clusters": dict(io=("write -P 1 0 256k", "write -z 64k 64k", "write -z -u 128k 64k",
                              "write -z 2M 128k")),
    "preallocated-zeros": dict(options="preallocation=metadata", size="4M",
                               io=("write -P 5 0 64k", "write -z 64k 128k")),
    "compressed": dict(io=("write -c -P 0x41 0 64k", "write -c -P 0x42 64k 64k",
                           "write -P 0x43 128k 64k", "write -c 1M 64k")),
    "compressed-512": dict(options="cluster_size=512",
                           io=("write -c -P 0x41 0 512", "write -c -P 0x42 512 512",
                               "write -c -P 3 8k 512")),
    "snapshots": dict(io=("write -P 1 0 192k", "snapshot one", "write -P 2 64k 64k",
                          "write -c 1M 64k", "snapshot two", "write -P 3 0 64k")),
    "snapshots-512": dict(options="cluster_size=512",
                          io=("write -P 1 0 4k", "snapshot a", "write -P 2 1k 1k")),
    "reftable-grew": dict(options="cluster_size=512,refcount_bits=64", size="8M",
                          io=("write -P 9 0 6M",)),
    "compat-0.10": dict(options="compat=0.10", io=DATA),
    "compat-0.10-snapshots": dict(options="compat=0.10",
                                  io=("write 0 128k", "snapshot s", "write 64k 64k")),
    "lazy-refcounts": dict(options="lazy_refcounts=on", io=DATA),
    "extended-l2": dict(options="extended_l2=on", io=("write -P 1 0 2k", "write 64k 64k",
                                                       "write -z 128k 4k", "write 300k 33k")),
    "extended-l2-compressed": dict(options="extended_l2=on,cluster_size=128k",
                                   io=("write -c 0 128k", "write -P 1 128k 4k")),
}


@pytest.mark.parametrize("shape", sorted(CLEAN_SHAPES))
def test_clean_image_matches_qemu(qemu_img, qemu_io, tmp_path, shape):
    image = make_image(qemu_img, qemu_io, tmp_path / "src", **CLEAN_SHAPES[shape])
    outcomes = compare_with_qemu(qemu_img, image, tmp_path)
    assert outcomes[0].status == 0 and outcomes[0].stderr == []


def test_backing_file_is_not_needed_for_the_counts(qemu_img, qemu_io, tmp_path):
    base = make_image(qemu_img, qemu_io, tmp_path / "src", name="base.qcow2", io=DATA)
    overlay = tmp_path / "src" / "overlay.qcow2"
    done = tools.run([qemu_img, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                      str(overlay)])
    assert done.returncode == 0, done.stderr
    assert tools.run([qemu_io, "-c", "write -P 8 64k 64k", str(overlay)]).returncode == 0
    for mode in MODES:
        work = tmp_path / f"mode-{mode}"
        theirs, ours = tools.twin_copies(overlay, work)
        for copy in (theirs, ours):
            (copy.parent / "base.qcow2").write_bytes(base.read_bytes())
        assert tools.engine_check(ours, mode) == tools.qemu_check(qemu_img, theirs, mode)


def test_dirty_image_left_by_an_aborted_writer(qemu_img, qemu_io, tmp_path):
    """lazy_refcounts and qemu-io abort leave a dirty image with stale refcounts."""
    image = make_image(qemu_img, qemu_io, tmp_path / "src", options="lazy_refcounts=on",
                       io=("write -P 1 0 64k",))
    done = tools.run([qemu_io, "-c", "write -P 0x5a 512k 128k", "-c", "abort", str(image)])
    assert done.returncode != 0
    header = tools.Qcow2Surgery(image).header
    assert header.incompatible_features & fmt.INCOMPAT_DIRTY
    outcomes = compare_with_qemu(qemu_img, image, tmp_path)
    assert outcomes[0].status == 2


def test_image_marked_corrupt_is_checked_and_repair_clears_the_bit(qemu_img, qemu_io,
                                                                   tmp_path):
    image = make_image(qemu_img, qemu_io, tmp_path / "src", io=DATA)
    surgery = tools.Qcow2Surgery(image)
    features = surgery.u64(fmt.OFFSET_INCOMPATIBLE_FEATURES)
    surgery.set_u64(fmt.OFFSET_INCOMPATIBLE_FEATURES, features | fmt.INCOMPAT_CORRUPT)
    compare_with_qemu(qemu_img, image, tmp_path)


# -- deliberate damage -------------------------------------------------------------------------

def _data_cluster(s, nth: int = 0) -> tuple[int, int, int]:
    """(L2 entry offset, entry, host cluster index) of the nth mapped data cluster."""
    where, entry = s.mapped_entries()[nth]
    return where, entry, (entry & fmt.L2E_OFFSET_MASK) >> s.cluster_bits


def damage_raised_refcount(s):
    _, _, cluster = _data_cluster(s)
    s.set_refcount(cluster, s.refcount(cluster) + 1)


def damage_leaked_cluster(s):
    where, _, _ = _data_cluster(s, 1)
    s.set_u64(where, 0)


def damage_leak_past_data(s):
    cluster = s.grow(2) >> s.cluster_bits
    s.set_refcount(cluster + 1, 1)


def damage_refcount_too_low(s):
    # a cluster shared with the snapshot has refcount 2
    for _, entry in s.mapped_entries():
        cluster = (entry & fmt.L2E_OFFSET_MASK) >> s.cluster_bits
        if s.refcount(cluster) == 2:
            s.set_refcount(cluster, 1)
            return
    raise AssertionError("no shared cluster")


def damage_refcount_zero(s):
    _, _, cluster = _data_cluster(s, 2)
    s.set_refcount(cluster, 0)


def damage_entry_to_free_cluster(s):
    where, entry, _ = _data_cluster(s)
    free = s.grow(1)
    s.set_u64(where, (entry & ~fmt.L2E_OFFSET_MASK) | free)


def damage_copied_flag_data(s):
    where, entry, _ = _data_cluster(s, 1)
    s.set_u64(where, entry & ~fmt.OFLAG_COPIED)


def damage_copied_flag_l1(s):
    index, _ = s.l2_tables()[0]
    entry = s.l1_entries()[index]
    s.set_u64(s.l1_offset(index), entry & ~fmt.OFLAG_COPIED)


def damage_copied_flag_compressed(s):
    for _, table in s.l2_tables():
        for i in range(s.l2_entries):
            where = s.l2_entry_offset(table, i)
            entry = s.u64(where)
            if entry & fmt.OFLAG_COMPRESSED:
                s.set_u64(where, entry | fmt.OFLAG_COPIED)
                return
    raise AssertionError("no compressed cluster")


def damage_missing_refblock(s):
    s.set_u64(s.reftable_entry_offset(0), 0)


def damage_shared_cluster(s):
    (_, entry), (where, _) = s.mapped_entries()[:2]
    s.set_u64(where, entry)


def damage_misaligned_l2(s):
    index, _ = s.l2_tables()[0]
    s.set_u64(s.l1_offset(index), s.l1_entries()[index] + 512)


def damage_l2_past_eof(s):
    index, _ = s.l2_tables()[0]
    entry = s.l1_entries()[index]
    s.set_u64(s.l1_offset(index), (entry & ~fmt.L1E_OFFSET_MASK) | (1 << 40))


def damage_reftable_entry_past_eof(s):
    s.set_u64(s.reftable_entry_offset(1), s.grow(0) + 4 * s.cluster_size)


def damage_misaligned_data_cluster(s):
    where, entry, _ = _data_cluster(s)
    s.set_u64(where, entry + 512)


def damage_misaligned_preallocated_zero(s):
    where, entry, _ = _data_cluster(s)
    s.set_u64(where, (entry + 512) | fmt.OFLAG_ZERO)


def damage_reserved_bits(s):
    where, entry, _ = _data_cluster(s)
    s.set_u64(where, entry | 2)
    index, _ = s.l2_tables()[0]
    s.set_u64(s.l1_offset(index), s.l1_entries()[index] | (1 << 57))


def damage_reftable_reserved_bits(s):
    s.set_u64(s.reftable_entry_offset(0), s.reftable()[0] | 1)


def damage_unaligned_refblock(s):
    s.set_u64(s.reftable_entry_offset(0), s.reftable()[0] + 512)


def damage_refblock_refcount(s):
    block = s.reftable()[0] >> s.cluster_bits
    s.set_refcount(block, 2)


def damage_l2_on_refblock(s):
    index, _ = s.l2_tables()[0]
    entry = s.l1_entries()[index]
    s.set_u64(s.l1_offset(index), (entry & ~fmt.L1E_OFFSET_MASK) | s.reftable()[0])


def damage_snapshot_l1_unaligned(s):
    h = s.header
    s.set_u64(h.snapshots_offset, s.u64(h.snapshots_offset) + 512)


def damage_snapshot_incomplete(s):
    """Rewrite every snapshot table entry with only 8 bytes of extra data."""
    h = s.header
    table = s.read(h.snapshots_offset, 1 << 20)
    position, rewritten = 0, b""
    for _ in range(h.nb_snapshots):
        position = -(-position // 8) * 8
        fields = list(struct.unpack(">QIHHIIQII", table[position:position + 40]))
        extra_size = fields[-1]
        strings = table[position + 40 + extra_size:
                        position + 40 + extra_size + fields[2] + fields[3]]
        extra = table[position + 40:position + 48]
        fields[-1] = 8
        rewritten += bytes(-len(rewritten) % 8)
        rewritten += struct.pack(">QIHHIIQII", *fields) + extra + strings
        position += 40 + extra_size + fields[2] + fields[3]
    s.write(h.snapshots_offset, rewritten)


def damage_snapshot_too_much_extra(s):
    h = s.header
    s.write(h.snapshots_offset + 36, struct.pack(">I", 2000))


def damage_snapshot_table_offset(s):
    s.write(64, struct.pack(">Q", 12345))  # header.snapshots_offset, unaligned


def damage_many_snapshots(s):
    s.write(60, struct.pack(">I", 70000))


def damage_overflow_refcount(s):
    # with 1-bit refcounts a shared cluster overflows the in-memory count
    (_, entry), (where, _) = s.mapped_entries()[:2]
    s.set_u64(where, entry)


def header_write(offset: int, layout: str, *values: int):
    """Damage that overwrites header fields."""
    def harm(s):
        s.write(offset, struct.pack(layout, *values))
    return harm


SNAPSHOTTED = dict(io=("write 0 128k", "snapshot s", "write 64k 64k"))

DAMAGE = {
    "header-no-refcount-table": (header_write(56, ">I", 0), SNAPSHOTTED),
    "header-refcount-order-7": (header_write(96, ">I", 7), SNAPSHOTTED),
    "header-l1-past-eof": (header_write(40, ">Q", 1 << 28), SNAPSHOTTED),
    "header-reftable-past-eof": (header_write(48, ">Q", 1 << 28), SNAPSHOTTED),
    "header-odd-size": (header_write(24, ">Q", (16 << 20) + 100), SNAPSHOTTED),
    "header-dirty": (header_write(72, ">Q", fmt.INCOMPAT_DIRTY), SNAPSHOTTED),
    # a writable open drops unknown autoclear bits, rewriting the header
    # from a check-mode open that has not read the snapshot table
    "header-unknown-autoclear": (header_write(88, ">Q", 1 << 5), SNAPSHOTTED),
    "header-size-too-big": (header_write(24, ">Q", 1 << 62), SNAPSHOTTED),
    "header-crypt-method": (header_write(32, ">I", 0xC3000000), SNAPSHOTTED),
    "raised-refcount": (damage_raised_refcount, dict(io=DATA)),
    "raised-refcount-refcount-1": (damage_raised_refcount,
                                   dict(options="cluster_size=4096,refcount_bits=2", io=DATA)),
    "leaked-cluster": (damage_leaked_cluster, dict(io=DATA)),
    "leak-past-data": (damage_leak_past_data, dict(io=DATA)),
    "refcount-too-low": (damage_refcount_too_low,
                         dict(io=("write 0 128k", "snapshot s", "write 64k 64k"))),
    "refcount-zero": (damage_refcount_zero, dict(io=DATA)),
    "entry-to-free-cluster": (damage_entry_to_free_cluster, dict(io=DATA)),
    "copied-flag-data": (damage_copied_flag_data, dict(io=DATA)),
    "copied-flag-l1": (damage_copied_flag_l1, dict(io=DATA)),
    "copied-flag-compressed": (damage_copied_flag_compressed,
                               dict(io=("write -c 0 64k", "write 64k 64k"))),
    "missing-refblock": (damage_missing_refblock, dict(io=DATA)),
    "missing-refblock-512": (damage_missing_refblock,
                             dict(options="cluster_size=512", io=DATA)),
    "shared-cluster": (damage_shared_cluster, dict(io=DATA)),
    "misaligned-l2": (damage_misaligned_l2, dict(io=DATA)),
    "l2-past-eof": (damage_l2_past_eof, dict(io=DATA)),
    "reftable-entry-past-eof": (damage_reftable_entry_past_eof, dict(io=DATA)),
    "misaligned-data-cluster": (damage_misaligned_data_cluster, dict(io=DATA)),
    "misaligned-preallocated-zero": (damage_misaligned_preallocated_zero, dict(io=DATA)),
    "reserved-bits": (damage_reserved_bits, dict(io=DATA)),
    "reftable-reserved-bits": (damage_reftable_reserved_bits, dict(io=DATA)),
    "unaligned-refblock": (damage_unaligned_refblock, dict(options="cluster_size=4096",
                                                           io=DATA)),
    "refblock-refcount": (damage_refblock_refcount, dict(io=DATA)),
    "l2-on-refblock": (damage_l2_on_refblock, dict(io=DATA)),
    "snapshot-l1-unaligned": (damage_snapshot_l1_unaligned,
                              dict(io=("write 0 128k", "snapshot s", "write 64k 64k"))),
    "snapshot-incomplete": (damage_snapshot_incomplete,
                            dict(io=("write 0 128k", "snapshot s", "write 64k 64k"))),
    "snapshot-too-much-extra": (damage_snapshot_too_much_extra,
                                dict(io=("write 0 128k", "snapshot s"))),
    "snapshot-table-offset": (damage_snapshot_table_offset,
                              dict(io=("write 0 128k", "snapshot s"))),
    "many-snapshots": (damage_many_snapshots, dict(io=("write 0 128k", "snapshot s"))),
    "overflow-refcount": (damage_overflow_refcount,
                          dict(options="cluster_size=4096,refcount_bits=1", io=DATA)),
    "extended-l2-misaligned": (damage_misaligned_data_cluster,
                               dict(options="extended_l2=on", io=("write 0 64k",
                                                                  "write 64k 64k"))),
}


# Changes a read-only check rightly reports nothing about: they matter to
# what a repair writes (the header is rewritten), which the files compare.
QUIET_DAMAGE = {"header-odd-size", "header-dirty", "header-unknown-autoclear"}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_image_matches_qemu(qemu_img, qemu_io, tmp_path, damage):
    harm, shape = DAMAGE[damage]
    image = make_image(qemu_img, qemu_io, tmp_path / "src", **shape)
    harm(tools.Qcow2Surgery(image))
    outcomes = compare_with_qemu(qemu_img, image, tmp_path)
    if damage not in QUIET_DAMAGE:
        assert outcomes[0].status != 0 or outcomes[0].stderr, "the damage went unnoticed"


def _count_calls(monkeypatch, name: str, only_eagain: bool = False) -> list[int]:
    """Count calls of a Qcow2Checker method (or only those that placed new metadata)."""
    from imgengine.qcow2 import check as check_module

    calls = [0]
    original = getattr(check_module.Qcow2Checker, name)

    def spy(self, *args, **kwargs):
        if not only_eagain:
            calls[0] += 1
            return original(self, *args, **kwargs)
        try:
            return original(self, *args, **kwargs)
        except check_module._Errno as error:
            if error.code == errno.EAGAIN:  # a refcount block was placed
                calls[0] += 1
            raise

    monkeypatch.setattr(check_module.Qcow2Checker, name, spy)
    return calls


# Layouts found by searching QEMU-made images: the repaired snapshot table
# lands at the end of the file, where its clusters need a new refcount block
# (or, with the refcount table full, a new table too).
SNAPSHOT_REWRITE_LAYOUTS = {
    "new-refblock": ("alloc_refcount_block", ("snapshot s", "write 0 61440")),
    "reftable-grows": ("refcount_area", ("snapshot " + "a" * 255, "snapshot " + "b" * 255,
                                         f"write 0 {3871 * 512}")),
}


@pytest.mark.parametrize("layout", sorted(SNAPSHOT_REWRITE_LAYOUTS))
def test_snapshot_table_rewrite_allocates_like_qemu(qemu_img, qemu_io, tmp_path, monkeypatch,
                                                   layout):
    method, io = SNAPSHOT_REWRITE_LAYOUTS[layout]
    image = make_image(qemu_img, qemu_io, tmp_path / "src", size="64M",
                       options="cluster_size=512,refcount_bits=64", io=io)
    damage_snapshot_incomplete(tools.Qcow2Surgery(image))
    calls = _count_calls(monkeypatch, method, only_eagain=method == "alloc_refcount_block")
    outcome, = compare_with_qemu(qemu_img, image, tmp_path, modes=("all",))
    assert outcome.report["corruptions-fixed"] >= 1
    assert calls[0] >= 1, f"the layout no longer reaches {method}"


# -- random damage -------------------------------------------------------------------------------

def _random_value(rng: random.Random, s, old: int) -> int:
    cs = s.cluster_size
    size = s.file_size()
    choice = rng.randrange(9)
    if choice == 0:
        return 0
    if choice == 1:
        return old ^ (1 << rng.randrange(64))
    if choice == 2:
        return (old & ~fmt.L2E_OFFSET_MASK) | rng.randrange(0, size + 2 * cs, cs)
    if choice == 3:
        return rng.randrange(0, size + 2 * cs, 512)
    if choice == 4:
        return old + rng.choice((1, 512, cs, -cs))
    if choice == 5:
        return rng.randrange(1 << 64)
    if choice == 6:
        return old | fmt.OFLAG_COPIED
    if choice == 7:
        return old & ~fmt.OFLAG_COPIED
    return rng.randrange(16)


def _random_damage(rng: random.Random, s) -> str:
    """Change one metadata word of ``s``; a description of what was changed."""
    targets = []
    for index, table in s.l2_tables():
        targets.append(("L1", s.l1_offset(index)))
        for i in range(min(s.l2_entries, 64)):
            targets.append(("L2", s.l2_entry_offset(table, i)))
    for index, entry in enumerate(s.reftable()[:4]):
        targets.append(("reftable", s.reftable_entry_offset(index)))
        block = entry & fmt.REFT_OFFSET_MASK
        if block:
            for k in range(0, min(s.cluster_size, 256), 8):
                targets.append(("refblock", block + k))
    kind, where = rng.choice(targets)
    if kind == "refblock":
        old = s.u64(where)
        value = old + rng.choice((1, -1, 1 << 48, 1 << 16, 1 << 8)) if old else rng.randrange(4)
    else:
        value = _random_value(rng, s, s.u64(where))
    s.set_u64(where, value)
    return f"{kind} at {where:#x} := {value & (2**64 - 1):#x}"


RANDOM_SHAPES = (
    dict(io=DATA),
    dict(options="cluster_size=512,refcount_bits=4", io=DATA),
    dict(options="cluster_size=4096", io=("write -P 1 0 64k", "snapshot s", "write -c 128k 4k",
                                          "write -z 32k 8k")),
)


@pytest.mark.parametrize("seed", range(24))
def test_random_damage_matches_qemu(qemu_img, qemu_io, tmp_path, seed):
    rng = random.Random(seed)
    image = make_image(qemu_img, qemu_io, tmp_path / "src", **RANDOM_SHAPES[seed % 3])
    surgery = tools.Qcow2Surgery(image)
    changes = [_random_damage(rng, surgery) for _ in range(1 + seed % 3)]
    try:
        compare_with_qemu(qemu_img, image, tmp_path)
    except AssertionError as failure:
        raise AssertionError(f"after {changes}: {failure}") from failure


# -- persistent dirty bitmaps (read-only) ----------------------------------------------------------

def _bitmap_image(qemu_img, qemu_io, folder: Path) -> Path:
    """Bitmaps made by qemu-img bitmap; qemu-io's writes dirty the enabled ones."""
    image = make_image(qemu_img, qemu_io, folder, size="64M")
    for argv in (["--add", "b0"], ["--add", "-g", "64k", "b1"]):
        assert tools.run([qemu_img, "bitmap", *argv[:-1], str(image), argv[-1]]).returncode == 0
    done = tools.run([qemu_io, "-c", "write 0 1M", "-c", "write 30M 64k", str(image)])
    assert done.returncode == 0, done.stderr
    done = tools.run([qemu_img, "bitmap", "--add", "--disable", str(image), "b2"])
    assert done.returncode == 0, done.stderr
    return image


def _bitmap_directory(s) -> tuple[int, list[int]]:
    """(directory offset, bitmap table offsets) from the bitmaps header extension."""
    header = s.read(0, s.cluster_size)
    position = s.header.header_length
    while True:
        magic, length = struct.unpack(">II", header[position:position + 8])
        if magic == fmt.EXT_BITMAPS:
            _, _, size, offset = struct.unpack(">IIQQ", header[position + 8:position + 32])
            break
        assert magic, "no bitmaps extension"
        position += 8 + -(-length // 8) * 8
    directory = s.read(offset, size)
    tables, at = [], 0
    while at < size:
        table, _, _, _, _, name_size, extra = struct.unpack(">QIIBBHI", directory[at:at + 24])
        tables.append(table)
        at += -(-(24 + name_size + extra) // 8) * 8
    return offset, tables


def bitmap_damage_none(s):
    pass


def bitmap_damage_leaked_data(s):
    _, tables = _bitmap_directory(s)
    data = s.u64(tables[0]) & fmt.L2E_OFFSET_MASK
    s.set_refcount(data >> s.cluster_bits, 2)


def bitmap_damage_table_entry(s):
    _, tables = _bitmap_directory(s)
    s.set_u64(tables[1], s.u64(tables[1]) | 2)


def bitmap_damage_directory(s):
    offset, _ = _bitmap_directory(s)
    s.write(offset + 17, b"\x07")  # granularity_bits below the minimum


def bitmap_damage_unreferenced_table(s):
    _, tables = _bitmap_directory(s)
    s.set_refcount(tables[2] >> s.cluster_bits, 0)


@pytest.mark.parametrize("damage", ["none", "leaked_data", "table_entry", "directory",
                                    "unreferenced_table"])
def test_bitmaps_are_counted_like_qemu(qemu_img, qemu_io, tmp_path, damage):
    image = _bitmap_image(qemu_img, qemu_io, tmp_path / "src")
    globals()[f"bitmap_damage_{damage}"](tools.Qcow2Surgery(image))
    compare_with_qemu(qemu_img, image, tmp_path, modes=(None,))
    # Any read-only open loads the bitmaps, and fails as QEMU's does.
    info = tools.run([qemu_img, "info", image.name], cwd=image.parent)
    if info.returncode:
        with pytest.raises(ImageError) as error:
            open_image(str(image), read_only=True)
        assert info.stderr == f"qemu-img: Could not open '{image.name}': {error.value}\n"
    else:
        open_image(str(image), read_only=True).close()
    # Repairs would have to rewrite the bitmap directory: refused, as the
    # engine refuses to open such images read/write.
    with pytest.raises(ImageError):
        check_qcow2(str(image), frozenset({"leaks"}))


# -- through the engine's public API ------------------------------------------------------------

# Every damage: open_image(check=True) admits what QEMU's check-mode open
# admits (a broken snapshot table, tables past the end of the file, extended
# L2 entries) and refuses the rest with QEMU's words.
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_block_node_check_matches_qemu(qemu_img, qemu_io, tmp_path, damage):
    """BlockNode.check (the driver hands its open file to check_image) repairs as QEMU does."""
    harm, shape = DAMAGE[damage]
    image = make_image(qemu_img, qemu_io, tmp_path / "src", **shape)
    harm(tools.Qcow2Surgery(image))
    for mode in MODES:
        theirs, ours = tools.twin_copies(image, tmp_path / f"mode-{mode}")
        expected = tools.qemu_check(qemu_img, theirs, mode)
        assert tools.engine_check(ours, mode) == expected, f"-r {mode}"
        assert tools.same_content(theirs, ours), \
            f"-r {mode}: {tools.first_difference(theirs, ours)}"


# -- opening, and the API -------------------------------------------------------------------------

def test_qemu_refuses_and_so_does_the_engine(qemu_img, qemu_io, tmp_path):
    image = make_image(qemu_img, qemu_io, tmp_path, io=DATA)
    surgery = tools.Qcow2Surgery(image)
    surgery.write(36, struct.pack(">I", 0))  # L1 table too small for the virtual size
    expected = tools.qemu_check(qemu_img, image)
    assert expected.status == 1
    with pytest.raises(CorruptImageError) as caught:
        check_qcow2(str(image))
    assert expected.stderr == [f"qemu-img: Could not open '{image.name}': {caught.value}"]


def test_read_only_checker_refuses_to_repair(qemu_img, qemu_io, tmp_path):
    image = make_image(qemu_img, qemu_io, tmp_path, io=DATA)
    with Qcow2Checker(str(image)) as checker, pytest.raises(ImageError):
        checker.check(frozenset({"leaks"}))


def test_failed_check_carries_its_messages(qemu_img, qemu_io, tmp_path):
    image = make_image(qemu_img, qemu_io, tmp_path, io=DATA)
    damage_missing_refblock(tools.Qcow2Surgery(image))
    with pytest.raises(CheckFailedError) as caught:
        check_qcow2(str(image), frozenset({"leaks"}))
    assert caught.value.errno == errno.EIO
    assert caught.value.messages[-1] == "ERROR need to rebuild refcount structures"


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_block_codec_round_trips(bits):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from imgengine.qcow2.check import _refcount_codec

    entries = 512 * 8 // bits
    decode, encode = _refcount_codec(bits, entries)

    @settings(max_examples=60, deadline=None)
    @given(st.binary(min_size=512, max_size=512))
    def round_trip(raw):
        values = decode(raw)
        assert len(values) == entries
        assert encode(values) == raw
        # entry 0 sits in the low bits of the first byte (or the first word)
        if bits < 8:
            assert values[0] == raw[0] & ((1 << bits) - 1)
        else:
            assert values[0] == int.from_bytes(raw[:bits // 8], "big")

    round_trip()


def test_check_result_is_the_engine_export():
    import imgengine
    from imgengine.qcow2.check import CheckResult

    assert imgengine.CheckResult is CheckResult
