"""pyqemu.units against real QEMU as the oracle.

Sizes are parsed by `qemu-img map --start-offset=S` (whose JSON echoes the
parsed start), sizes are printed by `qemu-img info` of a raw file of that size,
qemu-io's unit strings come from `alloc N 0`; hypothesis picks the inputs.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyqemu.units import INT64_MAX, SizeError, cvtstr, size_to_str, strtosz

SUFFIXES = ["", "b", "B", "k", "K", "m", "M", "g", "G", "t", "T", "p", "P", "e", "E", "x",
            "kb", "KiB", " "]
size_texts = st.one_of(
    st.builds(lambda n, s: f"{n}{s}", st.integers(0, 2**66), st.sampled_from(SUFFIXES)),
    st.builds(lambda n, f, s: f"{n}.{f}{s}", st.integers(0, 20000), st.integers(0, 10**12),
              st.sampled_from(SUFFIXES)),
    st.builds(lambda n, s: f"0x{n:x}{s}", st.integers(0, 2**66), st.sampled_from(SUFFIXES)),
    st.builds(lambda sign, n: f"{sign}{n}", st.sampled_from(["-", "+", " ", "  -"]),
              st.integers(0, 10**6)),
    st.text(alphabet="0123456789.xXeEkKmM+- ", min_size=0, max_size=8),
)


@pytest.fixture(scope="module")
def raw_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("units") / "tiny.raw"
    path.write_bytes(b"")
    return path


def qemu_parse(qemu_img: str, image, text: str) -> int | str:
    """What qemu-img makes of text as a size: the number, or 'EINVAL'/'ERANGE'."""
    completed = subprocess.run([qemu_img, "map", "--output=json", "-f", "raw",
                                f"--start-offset={text}", str(image)],
                               capture_output=True, text=True)
    if completed.returncode == 0:
        return int(re.search(r'"start": (\d+)', completed.stdout).group(1))
    if "Must be between" in completed.stderr:
        return "ERANGE"
    assert "You may use k, M, G, T, P or E" in completed.stderr, completed.stderr
    return "EINVAL"


def our_parse(text: str) -> int | str:
    try:
        value = strtosz(text)
    except SizeError as error:
        return "ERANGE" if error.errno == 34 else "EINVAL"
    return "ERANGE" if value > INT64_MAX else value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=size_texts)
def test_strtosz_matches_qemu(qemu_img, raw_image, text):
    if "\0" in text or text.startswith("-") and not text.strip("-"):
        return
    assert our_parse(text) == qemu_parse(qemu_img, raw_image, text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.integers(0, 2**40), st.sampled_from(
    [0, 1, 1023, 1024, 1000 * 1024, 1023 * 1024, 1024**2 - 1, 1024**3, 1000 * 1024**3,
     1000 * 1024**4, 1024**5])))
def test_size_to_str_matches_qemu(qemu_img, tmp_path_factory, size):
    folder = tmp_path_factory.mktemp("sized")
    if size <= 2**40:
        path = folder / "sized.raw"
        with open(path, "wb") as handle:
            handle.truncate(size)
        fmt = "raw"
    else:   # beyond what a host file may hold: a qcow2 image of that size
        path = folder / "sized.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M",
                        str(path), str(size)],
                       check=True)
        fmt = "qcow2"
    completed = subprocess.run([qemu_img, "info", "-f", fmt, str(path)],
                               capture_output=True, text=True, check=True)
    line = next(line for line in completed.stdout.splitlines()
                if line.startswith("virtual size:"))
    reported = int(re.search(r"\((\d+) bytes\)", line).group(1))   # raw rounds up to 512
    assert line == f"virtual size: {size_to_str(reported)} ({reported} bytes)"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 2**21)))
def test_cvtstr_matches_qemu(qemu_io, raw_image, value):
    completed = subprocess.run([qemu_io, "-f", "raw", "-c", f"alloc {value} 0", str(raw_image)],
                               capture_output=True, text=True, check=True)
    assert completed.stdout == f"0/0 bytes allocated at offset {cvtstr(float(value))}\n"
