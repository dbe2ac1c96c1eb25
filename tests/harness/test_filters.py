"""Each harness filter against the qemu-iotests bash filter of the same name.

Real qemu-img / qemu-io produce the output here, in a scratch TEST_DIR; the
Python filter and QEMU's own filter (common.filter sourced in bash) must
print the same for it. A few inputs are made up to reach corners of the bash
code (lines without newline, padding), never copies of QEMU output.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import filters
from harness.filters import FilterContext


def _run(argv: list[str], cwd: Path) -> str:
    """stdout and stderr of one process, merged as `2>&1` merges them."""
    done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, check=False)
    return done.stdout


@pytest.fixture
def test_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "scratch"
    directory.mkdir()
    return directory


@pytest.fixture
def images(qemu_img: str, qemu_io: str, test_dir: Path) -> dict[str, str]:
    """A base/overlay pair with data in both layers, and a raw image; returns
    the outputs of creating and writing them."""
    out = {}
    out["create_base"] = _run([qemu_img, "create", "-f", "qcow2", "-o", "cluster_size=4k",
                               f"{test_dir}/t.qcow2.base", "1M"], test_dir)
    out["create_top"] = _run([qemu_img, "create", "-f", "qcow2", "-b",
                              f"{test_dir}/t.qcow2.base", "-F", "qcow2",
                              f"{test_dir}/t.qcow2"], test_dir)
    out["write_base"] = _run([qemu_io, "-f", "qcow2", "-c", "write -P 0x11 0 64k",
                              "-c", "write -z 128k 64k", f"{test_dir}/t.qcow2.base"], test_dir)
    out["write_top"] = _run([qemu_io, "-f", "qcow2", "-c", "write -P 0x22 32k 96k",
                             "-c", "discard 64k 64k", f"{test_dir}/t.qcow2"], test_dir)
    out["create_raw"] = _run([qemu_img, "create", "-f", "raw", f"{test_dir}/t.raw", "64k"],
                             test_dir)
    return out


def _both(bash_filter, pipeline: str, name: str, text: str, test_dir: Path,
          imgfmt: str = "qcow2") -> tuple[str, str]:
    ctx = FilterContext(test_dir=str(test_dir), imgfmt=imgfmt)
    return filters.REGISTRY[name](text, ctx), bash_filter(pipeline, text, test_dir, imgfmt)


def test_qemu_io_timing_lines(bash_filter, images, qemu_io, test_dir):
    image = f"{test_dir}/t.qcow2"
    text = _run([qemu_io, "--cache", "writeback", "--aio", "threads", "-f", "qcow2",
                 "-c", "read -P 0x22 32k 4k", "-c", "read -v 0 512", "-c", "alloc 0 1M",
                 "-c", "map", "-c", "read 2M 512", "-c", "writev -P 3 0 512 1k",
                 "-c", "aio_write -P 4 8k 4k", "-c", "aio_flush", image], test_dir)
    text += images["write_base"] + images["write_top"]
    ours, theirs = _both(bash_filter, "_filter_qemu_io", "qemu_io", text, test_dir)
    assert "XX:XX:XX.X" in ours
    assert ours == theirs


def test_img_create_formatting_lines(bash_filter, qemu_img, test_dir):
    base = f"{test_dir}/t.qcow2.base"
    runs = [
        ["create", "-f", "qcow2", base, "128M"],
        ["create", "-f", "qcow2", "-o", "cluster_size=512,lazy_refcounts=on", base, "64M"],
        ["create", "-f", "qcow2", "-o", "compat=0.10,preallocation=metadata", base, "1M"],
        ["create", "-f", "qcow2", "-o", "extended_l2=on,refcount_bits=8", base, "1M"],
        ["create", "-f", "qcow2", "-b", base, "-F", "qcow2", f"{test_dir}/t.qcow2"],
        ["create", "-f", "qcow2", "-b", base, "-F", "qcow2", f"{test_dir}/t.qcow2", "2M"],
        ["create", "-f", "qcow2", "-o", f"data_file={test_dir}/t.qcow2.data",
         f"{test_dir}/t.qcow2", "1M"],
        ["create", "-f", "raw", f"{test_dir}/t.raw", "1M"],
        ["create", "-f", "raw", "-o", "preallocation=falloc", f"{test_dir}/t.raw", "64k"],
        ["create", "-f", "qcow2", "-b", f"{test_dir}/missing", "-F", "qcow2",
         f"{test_dir}/t.qcow2"],
        ["create", "-f", "qcow2", f"{test_dir}/t.qcow2", "1X"],
    ]
    text = "".join(_run([qemu_img, *argv], test_dir) for argv in runs)
    ours, theirs = _both(bash_filter, "_filter_img_create", "img_create", text, test_dir)
    assert "Formatting 'TEST_DIR/t.IMGFMT.base', fmt=IMGFMT size=134217728" in ours
    assert ours == theirs


def test_img_create_on_raw_case(bash_filter, qemu_img, test_dir):
    text = _run([qemu_img, "create", "-f", "raw", f"{test_dir}/t.raw", "1M"], test_dir)
    text += _run([qemu_img, "create", "-f", "qcow2", "-b", f"{test_dir}/t.raw", "-F", "raw",
                  f"{test_dir}/t.raw.top"], test_dir)
    ours, theirs = _both(bash_filter, "_filter_img_create", "img_create", text, test_dir, "raw")
    assert ours == theirs


def test_img_create_corners(bash_filter, test_dir):
    # Made-up lines reaching the bash filter's corners: padding that `read`
    # trims, a last option kept at the end (its line end comes back as blank
    # lines), no options at all, and a final line without a newline.
    text = (f"  Formatting '{test_dir}/a', fmt=raw size=1024  \n"
            f"Formatting '{test_dir}/b', fmt=qcow2 lazy_refcounts=off size=5\n"
            f"Formatting '{test_dir}/c'\n"
            "qemu-img: something else\n"
            f"Formatting '{test_dir}/d', fmt=raw size=1")
    ours, theirs = _both(bash_filter, "_filter_img_create", "img_create", text, test_dir)
    assert ours == theirs


@pytest.mark.parametrize("output", ["json", "human"])
def test_qemu_img_map(bash_filter, images, qemu_img, test_dir, output):
    text = _run([qemu_img, "map", f"--output={output}", f"{test_dir}/t.qcow2"], test_dir)
    text += _run([qemu_img, "map", f"--output={output}", f"{test_dir}/t.qcow2.base"], test_dir)
    text += _run([qemu_img, "map", f"--output={output}", "-f", "raw", f"{test_dir}/t.raw"],
                 test_dir)
    cut = ('json:{"driver": "qcow2", "backing": null, "file": {"driver": "file", '
           f'"filename": "{test_dir}/t.qcow2"}}}}')
    text += _run([qemu_img, "map", f"--output={output}", cut], test_dir)
    ours, theirs = _both(bash_filter, "_filter_qemu_img_map", "qemu_img_map", text, test_dir)
    assert ours != text
    assert ours == theirs


def test_qemu_img_check(bash_filter, images, qemu_img, test_dir):
    text = _run([qemu_img, "check", "-f", "qcow2", f"{test_dir}/t.qcow2"], test_dir)
    text += _run([qemu_img, "check", "-f", "qcow2", f"{test_dir}/t.qcow2.base"], test_dir)
    text += _run([qemu_img, "check", "-f", "raw", f"{test_dir}/t.raw"], test_dir)
    text += _run([qemu_img, "check", "--output=json", "-f", "qcow2", f"{test_dir}/t.qcow2"],
                 test_dir)
    text += _run([qemu_img, "check", "-f", "qcow2", f"{test_dir}/missing"], test_dir)
    ctx = FilterContext(test_dir=str(test_dir), imgfmt="qcow2")
    ours = filters.apply(("testdir", "qemu_img_check"), text, ctx)
    theirs = bash_filter("_filter_testdir | _filter_qemu_img_check", text, test_dir)
    assert "Image end offset" in text and "Image end offset" not in ours
    assert ours == theirs


@pytest.mark.parametrize("name, pipeline", [
    ("img_info", "_filter_img_info"),
    ("img_info_format_specific", "_filter_img_info --format-specific"),
    ("img_info_rc", "_img_info"),
    ("img_info_rc_format_specific", "_img_info --format-specific"),
])
@pytest.mark.parametrize("args", [[], ["--output=json"], ["--backing-chain"],
                                  ["--output=json", "--backing-chain"]])
def test_img_info(bash_filter, images, qemu_img, test_dir, name, pipeline, args):
    text = _run([qemu_img, "info", *args, f"{test_dir}/t.qcow2"], test_dir)
    text += _run([qemu_img, "info", *args, f"{test_dir}/t.raw"], test_dir)
    ours, theirs = _both(bash_filter, pipeline, name, text, test_dir)
    assert ours != text
    assert ours == theirs


def test_img_info_corners(bash_filter, images, qemu_img, test_dir):
    # A last line without a newline is dropped by the bash `read` loop.
    text = _run([qemu_img, "info", f"{test_dir}/t.qcow2"], test_dir).rstrip("\n")
    for name, pipeline in (("img_info", "_filter_img_info"), ("img_info_rc", "_img_info")):
        ours, theirs = _both(bash_filter, pipeline, name, text, test_dir)
        assert ours == theirs


@pytest.mark.parametrize("name, pipeline", [
    ("testdir", "_filter_testdir"),
    ("imgfmt", "_filter_imgfmt"),
    ("win32", "_filter_win32"),
    ("img_create_filenames", "_filter_img_create_filenames"),
    ("img_create_size", "_filter_img_create_size"),
    ("actual_image_size", "_filter_actual_image_size"),
])
def test_simple_filters(bash_filter, images, qemu_img, test_dir, name, pipeline):
    text = "".join(images.values())
    text += _run([qemu_img, "info", "--output=json", "--backing-chain",
                  f"{test_dir}/t.qcow2"], test_dir)
    text += _run([qemu_img, "map", f"{test_dir}/t.qcow2"], test_dir)
    ours, theirs = _both(bash_filter, pipeline, name, text, test_dir)
    assert ours == theirs


def test_filters_are_listed_with_their_functions():
    for name, function in filters.REGISTRY.items():
        assert function.__name__ == f"filter_{name}"
