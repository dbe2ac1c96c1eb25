"""Large qemu-io requests: done in bounded chunks, allocated as one request would be.

pyqemu-io cuts big reads and writes into pieces at fixed absolute offsets, so
memory stays small whatever the length; the images must still come out as
QEMU's single request leaves them, which real qemu-img confirms.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SETUP = (
    ("img", "create", "-f", "qcow2", "base.qcow2", "32M"),
    ("io", "-c", "write -P 0x11 3M 6M", "base.qcow2"),
    ("img", "create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2",
     "top.qcow2"),
)


@pytest.mark.parametrize("commands", [
    ["write -P 0x17 1000k 9M", "read -P 0x17 1000k 9M", "read -P 0x11 10216k 1000k"],
    ["write -z 1000k 9M", "read -P 0 1000k 9M"],
    ["writev -P 0x18 4095k 3M 3M 1k", "readv -P 0x18 4095k 5M 1M 1k"],
    ["aio_write -P 0x19 7M 5M", "aio_flush", "aio_read -P 0x19 7M 5M", "aio_flush",
     "read -P 0x11 3M 4M"],
    ["write -P 0x1a 30M 3M"],
    ["read -P 0x11 3M 7M"],
    ["read -v 4194290 32"],
    ["write -P 1 20M 200M", "writev 30M 100M 100M", "read 20M 200M", "read -P 0 0 1M"],
], ids=" ; ".join)
def test_chunked_requests_match_qemu(twins, engine, commands):
    twins.setup(*SETUP)
    args = []
    for command in commands:
        args += ["-c", command]
    twins.compare("io", *args, "top.qcow2")
    twins.same_images("top.qcow2", "base.qcow2")


def test_memory_stays_bounded(tmp_path, engine, pyqemu_img, pyqemu_io, child_env):
    """A 128 MiB write and read-back peak far below 128 MiB of memory."""
    image = tmp_path / "big.qcow2"
    subprocess.run([str(pyqemu_img), "create", "-q", "-f", "qcow2", str(image), "256M"],
                   check=True, env=child_env)
    probe = ("import resource, subprocess, sys\n"
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    completed = subprocess.run(
        [sys.executable, "-c", probe, str(pyqemu_io), "-c", "write -P 0x5a 0 128M",
         "-c", "read -P 0x5a 0 128M", str(image)],
        capture_output=True, text=True, check=True, env=child_env)
    peak_kib = int(completed.stdout)
    assert peak_kib < 96 * 1024, f"peak RSS {peak_kib} KiB"
