"""Image creation compared byte for byte with ``qemu-img create``.

For a spread of options (cluster sizes 512 B to 2 MiB, unaligned sizes,
backing file and format, compat=0.10, lazy refcounts, refcount widths) the
engine and real qemu-img each create an image; the files must be identical,
down to the allocated blocks.  Invalid options must fail with QEMU's message.
"""

from __future__ import annotations

import os

import pytest

from imgengine import (
    ImageError,
    UnsupportedImageError,
    create_image,
    create_options,
    formatting_options,
    open_image,
    resolve_create_options,
)

OPTION_SETS = [
    {},
    {"cluster_size": "512"},
    {"cluster_size": "1k"},
    {"cluster_size": "4096", "lazy_refcounts": "on"},
    {"cluster_size": "2M"},
    {"cluster_size": "2M", "refcount_bits": "64"},
    {"compat": "0.10"},
    {"compat": "1.1", "refcount_bits": "8"},
    {"refcount_bits": "1", "cluster_size": "512"},
    {"refcount_bits": "2"},
    {"refcount_bits": "4", "cluster_size": "8192"},
    {"refcount_bits": "32", "cluster_size": "16k"},
]
SIZES = [0, 512, 1024 * 1024, 128 * 1024 * 1024 + 2048, 3 * 1024 ** 3 + 512]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()) or "defaults")
def test_create_matches_qemu(qemu, tmp_path, options, size):
    ours = str(tmp_path / "engine.qcow2")
    theirs = str(tmp_path / "qemu.qcow2")
    qemu.create(theirs, "qcow2", size, options)
    create_image(ours, "qcow2", dict(options, size=str(size)))
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
    assert os.stat(ours).st_blocks == os.stat(theirs).st_blocks


def test_create_huge_image_with_small_clusters_grows_reftable(qemu, tmp_path):
    # 128 GiB in 512-byte clusters needs an L1 table far larger than the
    # first refcount block covers, so the refcount table has to grow.
    ours = str(tmp_path / "engine.qcow2")
    theirs = str(tmp_path / "qemu.qcow2")
    options = {"cluster_size": "512", "refcount_bits": "1"}
    qemu.create(theirs, "qcow2", 128 * 1024 ** 3, options)
    create_image(ours, "qcow2", dict(options, size=str(128 * 1024 ** 3)))
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
    assert qemu.check(ours)["check-errors"] == 0


@pytest.mark.parametrize("options", [{}, {"cluster_size": "512"}, {"compat": "0.10"}],
                         ids=["defaults", "512", "v2"])
@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
def test_create_with_backing_matches_qemu(qemu, tmp_path, options, backing_fmt):
    base = str(tmp_path / "base.img")
    qemu.create(base, backing_fmt, 3 * 1024 * 1024 + 512)
    ours = str(tmp_path / "engine.qcow2")
    theirs = str(tmp_path / "qemu.qcow2")
    backing = {"backing_file": "base.img", "backing_fmt": backing_fmt}
    qemu.create(theirs, "qcow2", None, dict(options, **backing))
    create_image(ours, "qcow2", dict(options, **backing))
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
    with open_image(ours) as node:
        assert node.length() == 3 * 1024 * 1024 + 512
        assert node.backing is not None and node.backing.format_name == backing_fmt


@pytest.mark.parametrize("size", [0, 1000, 4096, 1024 * 1024 + 512])
def test_create_raw_matches_qemu(qemu, tmp_path, size):
    ours = str(tmp_path / "engine.raw")
    theirs = str(tmp_path / "qemu.raw")
    qemu.create(theirs, "raw", size)
    create_image(ours, "raw", {"size": str(size)})
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()
    assert os.stat(ours).st_blocks == os.stat(theirs).st_blocks
    with open_image(ours, fmt="raw") as node:
        assert list(node.map()) and [(e.start, e.length, e.data, e.zero) for e in node.map()] \
            == [(e.start, e.length, e.data, e.zero) for e in qemu.map(theirs, fmt="raw")]


BAD_OPTIONS = [
    {"compat": "foo"},
    {"preallocation": "foo"},
    {"compression_type": "foo"},
    {"refcount_bits": "3"},
    {"refcount_bits": "128"},
    {"compat": "0.10", "lazy_refcounts": "on"},
    {"compat": "0.10", "refcount_bits": "8"},
    {"backing_fmt": "qcow2"},
    {"compat": "0.10", "extended_l2": "on"},
    {"cluster_size": "256"},
    {"cluster_size": "4M"},
    {"cluster_size": "1000"},
    {"cluster_size": "foo"},
    {"extended_l2": "on", "cluster_size": "4k"},
    {"data_file_raw": "on"},
    {"lazy_refcounts": "maybe"},
    {"refcount_bits": "abc"},
    {"cluster_size": "99999999999999999999999"},
    {"no_such_option": "1"},
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in o.items()))
def test_create_errors_match_qemu(qemu, tmp_path, options):
    theirs = str(tmp_path / "qemu.qcow2")
    ours = str(tmp_path / "engine.qcow2")
    result = qemu.create(theirs, "qcow2", 1024 * 1024, options, check=False)
    assert result.returncode == 1
    first_line = result.stderr.splitlines()[0]
    prefix = f"qemu-img: {theirs}: "
    assert first_line.startswith(prefix)
    with pytest.raises(ImageError) as info:
        create_image(ours, "qcow2", dict(options, size=str(1024 * 1024)))
    assert str(info.value) == first_line[len(prefix):]
    assert not isinstance(info.value, UnsupportedImageError)
    assert os.path.exists(theirs) == os.path.exists(ours)


def _qemu_create_error(qemu, path: str, options: dict[str, str],
                       size: int | None = None) -> tuple[str, str | None]:
    """QEMU's message for a failing ``qemu-img create`` and its hint line."""
    result = qemu.create(path, "qcow2", size, options, check=False)
    assert result.returncode == 1, result.stderr
    first_line, _, hint = result.stderr.partition("\n")
    prefix = f"qemu-img: {path}: "
    assert first_line.startswith(prefix), result.stderr
    # QEMU prints a hint as it is, so whether it ends a line is part of it.
    return first_line[len(prefix):], hint or None


def test_create_size_from_backing_and_missing_size(qemu, tmp_path):
    base = str(tmp_path / "base.qcow2")
    create_image(base, "qcow2", {"size": str(5 * 1024 * 1024 + 1024)})
    overlay = str(tmp_path / "overlay.qcow2")
    theirs = str(tmp_path / "theirs.qcow2")
    resolved = resolve_create_options(overlay, "qcow2", {"backing_file": "base.qcow2",
                                                        "backing_fmt": "qcow2"})
    assert resolved["size"] == str(5 * 1024 * 1024 + 1024)
    failures = [
        ({}, None),
        ({"backing_file": "missing.qcow2", "backing_fmt": "qcow2"}, None),
        ({"backing_file": "base.qcow2"}, 1024 * 1024),
    ]
    for options, size in failures:
        message, hint = _qemu_create_error(qemu, theirs, options, size)
        engine_options = dict(options) if size is None else dict(options, size=str(size))
        with pytest.raises(ImageError) as info:
            create_image(overlay, "qcow2", engine_options)
        assert (str(info.value), info.value.hint) == (message, hint), options
        assert not os.path.exists(overlay) and not os.path.exists(theirs)


@pytest.mark.parametrize("options", [{}, {"cluster_size": "4k", "compat": "0.10"},
                                     {"backing_file": "b,c", "backing_fmt": "raw"}])
def test_formatting_line_matches_qemu(qemu, tmp_path, options):
    path = str(tmp_path / "t.qcow2")
    args = [qemu.img, "create", "-u", "-f", "qcow2"]
    if options:
        args += ["-o", ",".join(f"{k}={v.replace(',', ',,')}" for k, v in options.items())]
    result = qemu.run(*args, path, "1M")
    expected = result.stdout.splitlines()[0]
    pairs = formatting_options("qcow2", dict(options, size="1048576"))
    line = f"Formatting '{path}', fmt=qcow2 " + " ".join(f"{k}={v}" for k, v in pairs)
    assert line == expected


def test_create_options_table_matches_qemu_help(qemu):
    out = qemu.run(qemu.img, "create", "-f", "qcow2", "-o", "help").stdout
    listed = {line.split("=", 1)[0].strip() for line in out.splitlines()
              if line.startswith("  ")}
    ours = {option.name for option in create_options("qcow2", with_protocol=False)}
    assert listed == ours
    for option in create_options("qcow2", with_protocol=False):
        assert f"- {option.help}" in out


def test_create_opens_the_whole_backing_chain(qemu, tmp_path):
    """A backing file whose own backing file is missing fails as in QEMU."""
    middle = str(tmp_path / "middle.qcow2")
    qemu.create(middle, "qcow2", 1024 * 1024,
                {"backing_file": str(tmp_path / "gone.qcow2"), "backing_fmt": "qcow2"},
                unsafe=True)
    theirs = str(tmp_path / "theirs.qcow2")
    result = qemu.create(theirs, "qcow2", None, {"backing_file": middle, "backing_fmt": "qcow2"},
                         check=False)
    assert result.returncode == 1
    first_line, hint = result.stderr.splitlines()[:2]
    ours = str(tmp_path / "ours.qcow2")
    with pytest.raises(ImageError) as info:
        create_image(ours, "qcow2", {"backing_file": middle, "backing_fmt": "qcow2"})
    assert f"qemu-img: {theirs}: {info.value}" == first_line
    assert info.value.hint == hint + "\n"
    assert not os.path.exists(ours) and not os.path.exists(theirs)
