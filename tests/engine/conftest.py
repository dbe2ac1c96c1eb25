"""Fixtures for the engine tests: a way to run real QEMU on scratch images.

Also registers the Hypothesis profiles the engine tests use
(``IMGENGINE_HYPOTHESIS=imgengine-ci`` by default, ``thorough`` for more).
``qemu`` wraps the real qemu-img/qemu-io (skipping where they are absent,
through the shared fixtures) with the few operations the differential
tests need; each call is its own process, as in QEMU's iotests.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from hypothesis import settings

from imgengine import MapEntry

# Hypothesis profiles for the engine's property and differential tests: a
# modest default that keeps CI fast, more with IMGENGINE_HYPOTHESIS=thorough.
settings.register_profile("imgengine-ci", max_examples=25, deadline=None)
settings.register_profile("imgengine-thorough", max_examples=400, deadline=None)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.register_profile("imgengine-exhaustive", max_examples=5000, deadline=None)


class Qemu:
    """Real QEMU 7.2 programs, one process per operation."""

    def __init__(self, img: str, io: str) -> None:
        self.img = img
        self.io_program = io

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} failed: {result.stderr}")
        return result

    def create(self, path: str, fmt: str, size: int | None = None,
               options: dict[str, str] | None = None, *, check: bool = True,
               unsafe: bool = False) -> subprocess.CompletedProcess:
        args = [self.img, "create", "-q", "-f", fmt]
        if unsafe:
            args.append("-u")
        if options:
            args += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
        args.append(path)
        if size is not None:
            args.append(str(size))
        return self.run(*args, check=check)

    def io(self, path: str, command: str, *, fmt: str = "qcow2",
           extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return self.run(self.io_program, "-f", fmt, *extra, "-c", command, path)

    def map(self, path: str, *, fmt: str | None = None) -> list[MapEntry]:
        settle(path)
        args = [self.img, "map", "--output=json"]
        if fmt:
            args += ["-f", fmt]
        out = self.run(*args, path).stdout
        return [MapEntry(start=e["start"], length=e["length"], depth=e["depth"],
                         present=e["present"], zero=e["zero"], data=e["data"],
                         offset=e.get("offset"), filename=None)
                for e in json.loads(out)]

    @staticmethod
    def engine_map(path: str, *, fmt: str | None = None) -> list[MapEntry]:
        """The engine's map of an image, in the form ``map`` returns QEMU's."""
        from imgengine import open_image

        settle(path)
        with open_image(path, fmt=fmt) as node:
            return [MapEntry(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset)
                    for e in node.map()]

    def check(self, path: str) -> dict:
        result = self.run(self.img, "check", "--output=json", path, check=False)
        assert result.returncode in (0, 2, 3), result.stderr
        return json.loads(result.stdout)

    def compare(self, a: str, b: str, *, fmt_a: str = "qcow2",
                fmt_b: str = "qcow2") -> subprocess.CompletedProcess:
        return self.run(self.img, "compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)

    def to_raw(self, path: str, out: str, *, fmt: str = "qcow2") -> bytes:
        """The guest contents as QEMU reads them (converted to a raw file)."""
        self.run(self.img, "convert", "-f", fmt, "-O", "raw", path, out)
        with open(out, "rb") as f:
            return f.read()


def settle(*paths: str) -> None:
    """Write back and drop a file's cached pages.

    Where QEMU suspects metadata preallocation, ``qemu-img map`` asks the
    file system for holes, and ext4 answers differently for unwritten
    extents while pages of them are cached.  Settling both sides' files
    first makes the comparison about the images, not about the page cache.
    """
    import os

    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture(scope="session")
def qemu(qemu_img: str, qemu_io: str) -> Qemu:
    return Qemu(qemu_img, qemu_io)


def entries_without_filename(entries: list[MapEntry]) -> list[MapEntry]:
    return [MapEntry(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset, None)
            for e in entries]


@pytest.fixture
def strip_filenames():
    return entries_without_filename
