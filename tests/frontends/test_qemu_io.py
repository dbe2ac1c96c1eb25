"""qemu-io's commands, side by side with real QEMU.

Each case runs one qemu-io command line (a series of -c commands, or a script
on standard input) against images prepared identically by real QEMU, compares
status, stdout and stderr, and then compares the images as real qemu-img sees
them.
"""

from __future__ import annotations

import pytest

SETUP = (
    ("img", "create", "-f", "qcow2", "base.qcow2", "1M"),
    ("io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 128k 4k", "base.qcow2"),
    ("img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"),
    ("img", "create", "-f", "qcow2", "-o", "cluster_size=512", "small.qcow2", "100000"),
    ("img", "create", "-f", "raw", "r.raw", "1M"),
)


def _id(commands) -> str:
    return " ; ".join(commands)


# Where the engine does not (yet) do what QEMU does; strict, so that each
# flips to a failure (and is removed here) once the engine catches up.
ENGINE_GAPS: dict[str, str] = {
    "close ; open base.qcow2 ; truncate -m falloc 2M":
        "the engine does not preallocate data when growing a qcow2 image",
}


def _with_gaps(cases, name):
    marked = []
    for case in cases:
        reason = ENGINE_GAPS.get(name(case))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        marked.append(pytest.param(case, marks=marks, id=name(case)))
    return marked


COMMAND_CASES = [
    # read
    ["read 0 512"],
    ["read 0 64k"],
    ["r 0 1"],
    ["read -q 0 512"],
    ["read -C 0 512"],
    ["read -P 0x11 0 64k"],
    ["read -P 17 0 512"],
    ["read -P 021 0 512"],
    ["read -P 0x12 0 512"],
    ["read -P 0x11 0 128k"],
    ["read -P 0 64k 64k"],
    ["read -P 0x11 -s 512 -l 512 0 4k"],
    ["read -P 0x11 -s 4k 0 4k"],
    ["read -P 0x11 -s 5k 0 4k"],
    ["read -P 0x11 -l 5k 0 4k"],
    ["read -s 512 0 4k"],
    ["read -l 512 0 4k"],
    ["read -P 256 0 512"],
    ["read -P -1 0 512"],
    ["read -P x 0 512"],
    ["read -v 0 40"],
    ["read -v 130k 64"],
    ["read -v -q 0 40"],
    ["read -p 0 512"],
    ["read -b 0 512"],
    ["read -b 1 512"],
    ["read -b 0 511"],
    ["read -x 0 512"],
    ["read 0"],
    ["read 0 1 2"],
    ["read 1M 1"],
    ["read 1023k 2k"],
    ["read 2M 512"],
    ["read 0 2G"],
    ["read 0 4G"],
    ["read x 512"],
    ["read 0 1Q"],
    ["read 0 -5"],
    ["read 0 99999999999999999999"],
    ["read 0 0"],
    ["read 1M 0"],
    ["read 0x10 0x20"],
    ["read 1.5k 0.5k"],
    # readv and aio_read
    ["readv 0 512 512"],
    ["readv -P 0x11 0 1k 2k 3k"],
    ["readv -P 0x11 60k 2k 2k"],
    ["readv -v 0 16 16"],
    ["readv -q 0 512"],
    ["readv -C 0 512"],
    ["readv 0"],
    ["readv 0 3G"],
    ["readv 0 1G 1G 1G"],
    ["readv 1M 512"],
    ["aio_read 0 512", "aio_flush"],
    ["aio_read -P 0x11 0 512 512"],
    ["aio_read -P 0x12 0 512"],
    ["aio_read -i 0 512"],
    ["aio_read -v 0 32"],
    ["aio_read 2M 512"],
    # write
    ["write 0 512", "read -P 0xcd 0 512"],
    ["write -P 0x55 4k 4k", "read -P 0x55 4k 4k"],
    ["w 0 1"],
    ["write -q 0 512"],
    ["write -C 0 512"],
    ["write -z 0 64k", "read -P 0 0 64k"],
    ["write -z 1k 2k", "read -P 0 0 4k"],
    ["write -z -u 0 64k"],
    ["write -z -u 0 1k"],
    ["write -z -n 0 64k"],
    ["write -z -f 0 512"],
    ["write -f 0 512"],
    ["write -n 0 512"],
    ["write -u 0 512"],
    ["write -z -P 1 0 512"],
    ["write -b -z 0 512"],
    ["write -f -b 0 512"],
    ["write -c 0 64k"],
    ["write -c 0 100"],
    ["write -c 64k 64k", "read -P 0xcd 64k 64k", "map"],
    ["write -c 0 64k", "write -c 0 64k"],
    ["write -c 1000k 24k", "read -P 0xcd 1000k 24k"],
    ["write -c 512 64k"],
    ["write -b 0 512"],
    ["write -b -P 0x33 1M 4k", "read -b -P 0x33 1M 4k", "read -b -v 1M 32", "read -P 0 0 4k"],
    ["write -b -P 0x44 0 64k", "read -b -P 0x44 -s 512 -l 1k 0 64k", "info", "map"],
    ["write -b -q 10G 512", "read -b -C 10G 512"],
    ["write -b -s pattern.bin 512 1k", "read -b -v 512 64"],
    ["write -b 0 0", "read -b 0 0"],
    ["write -b 1 512"],
    ["read -b 0 100"],
    ["read -b 0 3G"],
    ["write -b 0 3G"],
    ["reopen -r", "write -b 0 512"],
    ["close", "open -t writethrough top.qcow2", "write -b 0 512", "read -b -P 0xcd 0 512"],
    ["write -p 0 512"],
    ["write -x 0 512"],
    ["write 0"],
    ["write 1M 1"],
    ["write 1023k 2k"],
    ["write 0 3G"],
    ["write -z -n 0 3G"],
    ["write 0 1Q"],
    ["write -P 0x100 0 512"],
    ["write -s pattern.bin 0 4k", "read -v 0 48"],
    ["write -s nonexistent 0 4k"],
    ["write -s empty.bin 0 4k"],
    ["write -s pattern.bin 0 0"],
    ["write -P 1 -s pattern.bin 0 4k"],
    ["write -P 0x66 1000k 48k", "read -P 0x66 1000k 24k"],
    ["write -P 0x66 60k 8k", "read -P 0x11 0 60k", "read -P 0x66 60k 8k"],
    # writev and aio_write
    ["writev 0 512 1k", "read -P 0xcd 0 1536"],
    ["writev -P 0x44 1k 1k 1k", "read -P 0x44 1k 2k"],
    ["writev -q 0 512"],
    ["writev -C 0 512"],
    ["writev -f 0 512"],
    ["writev 0"],
    ["writev 1M 512"],
    ["aio_write 0 512", "aio_flush", "read -P 0xcd 0 512"],
    ["aio_write -P 0x77 0 512 512", "aio_flush", "read -P 0x77 0 1k"],
    ["aio_write -i 0 512"],
    ["aio_write -q -z 0 64k", "read -P 0 0 64k"],
    ["aio_write -z 0 512 512"],
    ["aio_write -u 0 512"],
    ["aio_write 2M 512"],
    # discard
    ["discard 0 64k", "read -P 0x11 0 64k"],
    ["discard -q 0 64k"],
    ["discard -C 0 512"],
    ["discard 0 2M"],
    ["discard 0 3G"],
    ["discard 0"],
    ["d 0 1k"],
    # alloc, map, length, info, flush
    ["alloc 0"],
    ["alloc 0 64k"],
    ["alloc 0 1M"],
    ["alloc 64k 64k"],
    ["alloc 1M"],
    ["alloc 2M 512"],
    ["alloc 1000k 100k"],
    ["a 1.5k"],
    ["alloc x"],
    ["write -P 1 96k 4k", "alloc 0 1M", "map"],
    ["map"],
    ["map 0"],
    ["length"],
    ["l"],
    ["length 1"],
    ["info"],
    ["i"],
    ["flush"],
    ["f"],
    ["aio_flush"],
    # open, close, reopen and friends
    ["close", "read 0 512"],
    ["close", "open top.qcow2", "read -P 0x11 0 512"],
    ["close", "open -r top.qcow2", "write 0 512"],
    ["open top.qcow2"],
    ["close", "open nonexistent", "length"],
    ["close", "open -o driver=qcow2 top.qcow2", "length"],
    ["close", "open -o driver=raw top.qcow2", "length"],
    ["close", "open -o driver=qcow2,file.filename=top.qcow2", "length"],
    ["close", "open -o driver=qcow2", "length"],
    ["close", "open -n top.qcow2", "length"],
    ["close", "open -t writethrough top.qcow2", "length"],
    ["close", "open -i threads top.qcow2", "length"],
    ["close", "open -i native top.qcow2"],
    ["close", "open -n -i native top.qcow2", "length"],
    ["close", "open -U top.qcow2"],
    ["close", "open -o read-only=on top.qcow2", "write 0 512"],
    # options merged with the backing file's own (iotest 133)
    ["close", "open -o backing.node-name=foo top.qcow2", "read -P 0x11 0 512",
     "reopen -o backing.node-name=foo", "read -P 0x11 0 512"],
    ["close", "open -o backing.driver=raw top.qcow2", "read -P 0x11 0 512"],
    ["reopen -o cache.no-flush=bar"],
    ["reopen -o cache.direct=baz"],
    ["reopen -o auto-read-only=x"],
    ["close", "open -o cache.direct=baz top.qcow2"],
    # qcow2 runtime options (iotest 137)
    ["reopen -o cache-size=1M", "reopen -o l2-cache-size=512k",
     "reopen -o refcount-cache-size=128k", "reopen -o cache-size=2M", "write 0 64k"],
    ["reopen -o cache-size=1M,l2-cache-size=64k,refcount-cache-size=64k"],
    ["reopen -o cache-size=1M,l2-cache-size=2M"],
    ["reopen -o cache-size=1M,refcount-cache-size=2M"],
    ["reopen -o refcount-cache-size=256T"],
    ["reopen -o overlap-check=constant,overlap-check.template=all"],
    ["reopen -o overlap-check.template=all,overlap-check=constant"],
    ["reopen -o overlap-check=all,overlap-check.template=all", "write 0 512"],
    ["reopen -o overlap-check=blubb"],
    ["reopen -o overlap-check.template=blubb"],
    ["reopen -o overlap-check.main-header=maybe"],
    ["reopen -o overlap-check.active-l2=off", "reopen -o overlap-check=none", "write 0 512"],
    ["reopen -o cache-clean-interval=-1"],
    ["reopen -o cache-clean-interval=x"],
    ["reopen -o cache-clean-interval=10", "write 0 512"],
    ["reopen -o lazy-refcounts=42"],
    ["reopen -o lazy-refcounts=y,pass-discard-other=n", "discard 0 64k"],
    ["close", "open -o overlap-check=blubb top.qcow2"],
    ["close", "open -r -o read-only=on top.qcow2", "read -P 0x11 0 512"],
    ["close", "open -r -o read-only=off top.qcow2", "write 0 512"],
    ["close", "open -o file.read-only=on top.qcow2", "length"],
    ["close", "open -r -U top.qcow2", "length"],
    ["close", "open top.qcow2 extra"],
    ["close", "close"],
    ["reopen -r", "write 0 512", "reopen -w", "write 0 512"],
    ["reopen -r -w"],
    ["reopen extra"],
    ["quit", "read 0 512"],
    ["read 0 512", "q"],
    ["help", "length"],
    ["nope", "length"],
    ["break event tag"],
    ["remove_break tag"],
    ["resume tag"],
    ["sleep 10", "length"],
    ["truncate 2M", "length"],
    ["close", "open base.qcow2", "truncate -m metadata 2M", "map", "read -P 0 1M 1M"],
    ["close", "open base.qcow2", "truncate -m falloc 2M"],
]


@pytest.mark.parametrize("commands", _with_gaps(COMMAND_CASES, _id))
def test_commands(twins, engine, commands):
    twins.setup(*SETUP)
    twins.write_file("pattern.bin", bytes(range(97, 123)))
    twins.write_file("empty.bin", b"")
    args = []
    for command in commands:
        args += ["-c", command]
    twins.compare("io", *args, "top.qcow2")
    twins.same_images("top.qcow2", "base.qcow2")


IMAGE_CASES = [
    ["-r", "-c", "write 0 512", "top.qcow2"],
    ["-r", "-c", "read -P 0x11 0 512", "-c", "discard 0 512", "top.qcow2"],
    ["-f", "raw", "-c", "read -P 0 0 512", "-c", "info", "-c", "map", "r.raw"],
    ["-f", "raw", "-c", "write -P 3 4k 4k", "-c", "alloc 0 1M", "-c", "length", "r.raw"],
    ["-f", "raw", "-c", "write -b 0 512", "-c", "read -b 0 512", "r.raw"],
    ["--image-opts", "-c", "write 0 512", "driver=qcow2,file.filename=top.qcow2,read-only=on"],
    ["-r", "--image-opts", "-c", "length", "driver=qcow2,file.filename=top.qcow2,read-only=on"],
    ["-f", "qcow2", "-c", "length", "r.raw"],
    ["-f", "raw", "-c", "length", "top.qcow2"],
    ["-f", "nope", "-c", "length", "top.qcow2"],
    ["-c", "length", "nonexistent"],
    ["-c", "length", "-c", "info", "small.qcow2"],
    ["-c", "write -P 9 99k 1k", "-c", "read -P 9 99k 1k", "-c", "alloc 96k 4k",
     "-c", "write -z 99000 1000", "-c", "read -v 99000 1000", "small.qcow2"],
    ["-c", "read 99999 1", "-c", "read 100000 1", "-c", "write 99999 2", "small.qcow2"],
    ["-c", "write -P 0x17 0 2M", "-c", "read -P 0x17 0 1M", "top.qcow2"],
    ["--image-opts", "-c", "length", "driver=qcow2,file.filename=top.qcow2"],
    ["--image-opts", "-c", "read -P 0 0 512", "driver=qcow2,file.filename=top.qcow2,backing="],
    ["--image-opts", "-c", "length", "driver=qcow2,file.filename=top.qcow2,backing=null"],
    ["--image-opts", "-c", "length", "driver=raw,file.filename=r.raw,backing=null"],
    ["--image-opts", "-c", "length", "driver=raw,file.filename=r.raw,backing="],
    ["--image-opts", "-c", "length", "driver=raw,file.filename=r.raw,backing.driver=qcow2"],
    ["-c", "open -o driver=qcow2,file.filename=top.qcow2,backing=null", "-c", "length"],
    ["-c", "open -o driver=raw,backing=null r.raw", "-c", "length"],
    ["--image-opts", "-c", "length", "top.qcow2"],
    ["--image-opts", "-c", "open -o driver=qcow2 top.qcow2"],
    ["-c", "read -P 0 0 512",
     'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"},'
     ' "backing": null}'],
    ["-c", "length", 'json:{"driver": "qcow2"'],
    ["-U", "-c", "length", "top.qcow2"],
    ["-U", "-r", "-c", "length", "top.qcow2"],
    ["-n", "-c", "read 0 512", "top.qcow2"],
    ["--cache=none", "-c", "read 0 512", "top.qcow2"],
    ["-t", "writeback", "-i", "threads", "-c", "read 0 512", "top.qcow2"],
    ["-i", "native", "-c", "length", "top.qcow2"],
    ["-n", "-i", "native", "-c", "length", "top.qcow2"],
    ["-d", "unmap", "-c", "discard 0 64k", "top.qcow2"],
    ["-m", "-c", "read 0 512", "top.qcow2"],
    ["-k", "-c", "length", "top.qcow2"],
    # a raw image whose format was probed warns when it is opened writable
    ["-c", "read -P 0 0 512", "r.raw"],
    ["-r", "-c", "read -P 0 0 512", "r.raw"],
    ["-c", "open r.raw", "-c", "length", "-c", "open -r r.raw", "-c", "length"],
    ["-c", "length", "file:r.raw"],
]


@pytest.mark.parametrize("args", _with_gaps(IMAGE_CASES, " ".join))
def test_images_and_options(twins, engine, args):
    twins.setup(*SETUP)
    twins.compare("io", *args)
    twins.same_images("top.qcow2", "base.qcow2", "small.qcow2")
    twins.same_images("r.raw", fmt="raw")


@pytest.mark.parametrize("args", [["-c", "read 0 64k", "bad.qcow2"],
                                  ["-r", "-c", "read 0 64k", "bad.qcow2"],
                                  ["-c", "write 0 512", "bad.qcow2"]], ids=" ".join)
def test_bad_magic_probes_as_raw(twins, engine, args):
    """A qcow2 image with a broken magic is probed as raw, with raw's warning."""
    twins.setup(("img", "create", "-f", "qcow2", "bad.qcow2", "1M"))

    def break_magic(path):
        with path.open("r+b") as image:
            image.write(b"XXXX")

    twins.patch("bad.qcow2", break_magic)
    twins.compare("io", *args)
    twins.same_images("bad.qcow2", fmt="raw")


STDIN_CASES = [
    "read -P 0x11 0 512\nwrite -P 1 0 512\nread -P 1 0 512\n",
    "length\nnope\ninfo\nquit\nlength\n",
    "read 0 512",
    "\n\n  \nmap\n",
    "write 0 1\n" * 3,
    "read -v 0 " + "1" * 2000 + "\nlength\n",
]


@pytest.mark.parametrize("script", STDIN_CASES, ids=lambda script: repr(script)[:40])
def test_commands_from_stdin(twins, engine, script):
    twins.setup(*SETUP)
    twins.compare("io", "top.qcow2", stdin=script)
    twins.compare("io", "top.qcow2", stdin=script, merged=True)
    twins.same_images("top.qcow2", "base.qcow2")


MERGED_CASES = [
    ["-c", "read -v 0 64k", "-c", "nope", "-c", "read -v 64k 64k", "top.qcow2"],
    ["-c", "read -v 0 4k", "-c", "read -P 9 0 512", "-c", "nope", "top.qcow2"],
    ["-c", "reopen -r", "-c", "write 0 1", "-c", "read 0 1", "top.qcow2"],
    # abort() loses what stdout still buffers; sigraise flushes it first
    ["-c", "write -P 1 0 4k", "-c", "abort", "top.qcow2"],
    ["-c", "write -P 1 0 4k", "-c", "sigraise 6", "top.qcow2"],
]


@pytest.mark.parametrize("args", MERGED_CASES, ids=lambda args: " ".join(args))
def test_merged_streams(twins, engine, args):
    """2>&1: errors overtake buffered results at exactly QEMU's block boundaries."""
    twins.setup(*SETUP)
    twins.compare("io", *args, merged=True)


def test_reader_going_away(twins, engine, qemu_io, pyqemu_io, child_env):
    """Output into a pipe whose reader has gone: no traceback, QEMU's status."""
    import subprocess

    twins.setup(*SETUP)
    results = []
    for program, side in ((qemu_io, twins.qemu), (str(pyqemu_io), twins.ours)):
        process = subprocess.Popen(
            [program, "-c", "read -v 0 1M", "-c", "read -v 0 1M", "top.qcow2"],
            cwd=side.folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env)
        assert process.stdout is not None and process.stderr is not None
        process.stdout.read(100)
        process.stdout.close()
        errors = process.stderr.read()
        results.append((process.wait(), errors))
    assert results[1] == results[0]
