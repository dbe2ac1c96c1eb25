"""Fixtures for the fuzzer's tests: the backends it compares, and backends
that misbehave on purpose so that every kind of disagreement can be shown."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from harness.backends import get_backend
from harness.backends.base import Backend, Result


@pytest.fixture(scope="session")
def engine(qemu_img, qemu_io) -> Backend:
    """The engine backend, for tests that also need real QEMU beside it."""
    return get_backend("engine")


@pytest.fixture(scope="session")
def qemu(qemu_img, qemu_io) -> Backend:
    """The real QEMU backend (skipped with the reason where it is absent)."""
    return get_backend("qemu")


class Tampered(Backend):
    """Real QEMU with one thing changed: `before` may rewrite the arguments,
    `after` the result (and touch the case's directory)."""

    name = "tampered"

    def __init__(self, inner: Backend,
                 before: Callable[[str, list[str]], list[str]] | None = None,
                 after: Callable[[str, list[str], str, Result], Result] | None = None) -> None:
        self.inner = inner
        self.before = before
        self.after = after

    def run(self, tool: str, argv: list[str], *, cwd: str, merge_stderr: bool) -> Result:
        if self.before is not None:
            argv = self.before(tool, list(argv))
        result = self.inner.run(tool, argv, cwd=cwd, merge_stderr=merge_stderr)
        if self.after is not None:
            result = self.after(tool, argv, cwd, result)
        return result


@pytest.fixture
def tampered(qemu) -> Callable[..., Tampered]:
    def make(before=None, after=None) -> Tampered:
        return Tampered(qemu, before, after)
    return make


@pytest.fixture
def broken_present(monkeypatch) -> None:
    """The engine bug docs/walkthrough.md introduces by hand: qemu-img map's
    `present` taken from the data flag, so a zero cluster (or a hole in a
    raw file) reads as not present. Broken at the public BlockNode.map,
    map_runs and map_entry, whatever paths the engine takes inside them."""
    from imgengine import MapEntry
    from imgengine.node import BlockNode

    original_map, original_entry = BlockNode.map, BlockNode.map_entry
    original_runs = BlockNode.map_runs

    def broken(entry: MapEntry) -> MapEntry:
        return MapEntry(entry.start, entry.length, entry.depth, entry.data, entry.zero,
                        entry.data, entry.offset, entry.filename)

    def map_entry(self, offset, length):
        return broken(original_entry(self, offset, length))

    def map_all(self, start=0, length=None):
        for entry in original_map(self, start, length):
            yield broken(entry)

    def map_runs(self, start=0, length=None):
        for run_start, size, depth, _present, zero, data, offset, filename in \
                original_runs(self, start, length):
            yield run_start, size, depth, data, zero, data, offset, filename

    monkeypatch.setattr(BlockNode, "map_entry", map_entry)
    monkeypatch.setattr(BlockNode, "map", map_all)
    monkeypatch.setattr(BlockNode, "map_runs", map_runs)


def slow_result(seconds: float) -> Callable[[str, list[str], str, Result], Result]:
    def after(tool: str, argv: list[str], cwd: str, result: Result) -> Result:
        time.sleep(seconds)
        return result
    return after
