"""Random command lines, pyqemu against real QEMU: same output, never a traceback.

hypothesis assembles qemu-io command strings and qemu-img argument lists from
the words these tools take (options, sizes good and bad, commands real and
made up); each one runs on both sides on freshly made identical images.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SIZES = ["0", "1", "511", "512", "1k", "4k", "64k", "1M", "2M", "1.5k", "0x200", "-1", "x",
         "1Q", "4G", "99999999999999999999", "0.5"]
PATTERNS = ["0", "0x11", "0xcd", "256", "-1", "q"]
IO_COMMANDS = ["read", "r", "readv", "write", "w", "writev", "discard", "alloc", "map",
               "length", "info", "flush", "help", "quit", "nope", "open", "close", "reopen",
               "break", "remove_break", "resume"]
IO_FLAGS = ["-q", "-v", "-C", "-z", "-u", "-f", "-n", "-p", "-x", "-r", "-w", "-P", "-s",
            "-l", "-o"]

io_words = st.lists(st.one_of(st.sampled_from(SIZES), st.sampled_from(IO_FLAGS),
                              st.sampled_from(PATTERNS)), max_size=5)
io_command = st.builds(lambda name, words: " ".join([name, *words]),
                       st.sampled_from(IO_COMMANDS), io_words)

IMG_WORDS = ["-f", "qcow2", "raw", "-F", "-O", "-o", "cluster_size=4k", "size=1M", "-q", "-U",
             "-s", "-l", "--output=json", "--output=human", "--output", "--start-offset=64k",
             "--max-length=1k", "--backing-chain", "-r", "leaks", "all", "-b", "-u", "-x",
             "--image-opts", "top.qcow2", "base.qcow2", "new.qcow2", "nonexistent", "1M", "2k",
             "-1", "help"]
img_command = st.builds(lambda name, words: [name, *words],
                        st.sampled_from(["create", "info", "map", "check", "compare", "convert",
                                         "dd", "nope"]),
                        st.lists(st.sampled_from(IMG_WORDS), max_size=6))


def _fresh_twins(make_twins):
    root = Path(tempfile.mkdtemp(prefix="pyqemu-fuzz-"))
    twins = make_twins(root)
    twins.setup(("img", "create", "-f", "qcow2", "base.qcow2", "1M"),
                ("io", "-c", "write -P 0x11 0 64k", "base.qcow2"),
                ("img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 "top.qcow2"))
    return root, twins


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(commands=st.lists(io_command, min_size=1, max_size=4))
def test_random_qemu_io_commands(make_twins, engine, commands):
    root, twins = _fresh_twins(make_twins)
    try:
        args = []
        for command in commands:
            args += ["-c", command]
        ours = twins.compare("io", *args, "top.qcow2")
        assert "Traceback" not in ours.stderr
        twins.same_images("top.qcow2", "base.qcow2")
    finally:
        shutil.rmtree(root)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=img_command)
def test_random_qemu_img_command_lines(make_twins, engine, args):
    root, twins = _fresh_twins(make_twins)
    try:
        ours = twins.compare("img", *args)
        assert "Traceback" not in ours.stderr
        twins.same_images("top.qcow2", "base.qcow2")
    finally:
        shutil.rmtree(root)
