"""run_pair against real QEMU: a sound case agrees, and each kind of
disagreement is caught and named, shown with backends that change exactly
one thing about what real QEMU does."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

from harness.backends.base import Result
from harness.fuzz.compare import run_pair
from harness.fuzz.model import Check, FuzzCase, Info, Io, IoOp, Layer, Map

from .conftest import slow_result

CASE = FuzzCase(
    layers=(Layer("base", size=1 << 20, cluster_size=4096), Layer("test")),
    steps=(Io("base", (IoOp("write", 0, (65536,), (), 0x11),)),
           Io("test", (IoOp("write", 4096, (512,), (), 0x22),
                       IoOp("aio_write", 8192, (4096,), ("-z",)))),
           Map("test"), Map("test", human=True), Io("test", (IoOp("map"),)),
           Check("test"), Info("test", backing_chain=True)),
    origin="hand-made")


def _kinds(outcome):
    return [(d.kind, d.step_kind, d.image) for d in outcome.differences]


def test_a_sound_case_agrees_between_the_engine_and_qemu(engine, qemu):
    outcome = run_pair(CASE, engine, qemu, qemu)
    assert outcome.agrees, [d.diff("qemu", "engine") for d in outcome.differences]
    assert "TEST_DIR/t.IMGFMT" in outcome.reference_transcript
    assert outcome.tested_transcript == outcome.reference_transcript


def test_qemu_against_itself_agrees_whatever_the_directories(qemu):
    outcome = run_pair(CASE, qemu, qemu, qemu, compare_files=True)
    assert outcome.agrees


def test_different_output_is_found_at_its_step(qemu, tampered):
    def after(tool, argv, cwd, result):
        if argv[:2] == ["map", "--output=json"]:
            return Result(result.stdout.replace('"present": true', '"present": false', 1),
                          result.stderr, result.status)
        return result

    outcome = run_pair(CASE, tampered(after=after), qemu, qemu)
    assert _kinds(outcome) == [("output", "map", "test")]
    first = outcome.first
    assert first.step_index == 4  # two creates, two io steps, then the map
    assert first.where.startswith("qemu-img map --output=json TEST_DIR/t.qcow2")
    assert first.signature == ("output", "map")
    assert first.detail.startswith('- [{ "start": N, "length": N, "depth": N, "present": true')


def test_different_exit_status_is_found(qemu, tampered):
    def after(tool, argv, cwd, result):
        return Result(result.stdout, result.stderr, 1) if argv[0] == "check" else result

    outcome = run_pair(CASE, tampered(after=after), qemu, qemu)
    assert _kinds(outcome) == [("status", "check", "test")]
    assert "[exit status 1]" in outcome.first.tested


def test_a_difference_only_the_unfiltered_output_shows(qemu, tampered):
    def after(tool, argv, cwd, result):
        if argv[:2] == ["map", "--output=json"]:
            moved = re.sub(r'"offset": (\d+)', lambda m: f'"offset": {int(m[1]) + 512}',
                           result.stdout)
            return Result(moved, result.stderr, result.status)
        return result

    outcome = run_pair(CASE, tampered(after=after), qemu, qemu)
    assert _kinds(outcome) == [("unfiltered", "map", "test")]
    assert '"offset": OFFSET' not in outcome.first.tested


def test_different_image_contents_are_found_by_qemu_img_compare(qemu, tampered):
    def before(tool, argv):
        return [arg.replace("-P 0x22", "-P 0x23") for arg in argv]

    outcome = run_pair(CASE, tampered(before=before), qemu, qemu)
    assert _kinds(outcome) == [("contents", "image", "test")]
    assert "Content mismatch at offset 4096!" in outcome.first.tested


def _leak_a_cluster(image: Path) -> int:
    """Add a cluster (64k) to the end of a small qcow2 image with a reference
    count of 1 that nothing uses; return its index."""
    with open(image, "r+b") as file:
        header = file.read(64)
        (table,) = struct.unpack(">Q", header[48:56])
        file.seek(table)
        (block,) = struct.unpack(">Q", file.read(8))
        index = -(-os.path.getsize(image) // 65536)
        file.seek(block + 2 * index)
        file.write(struct.pack(">H", 1))
        file.truncate((index + 1) * 65536)
    return index


def test_an_image_real_qemu_img_check_objects_to_is_found(qemu, tampered):
    leaked = []

    def after(tool, argv, cwd, result):
        if argv[0] == "info":  # the last step: nothing after it sees the leak
            leaked.append(_leak_a_cluster(Path(cwd, "t.qcow2")))
        return result

    outcome = run_pair(CASE, tampered(after=after), qemu, qemu)
    assert _kinds(outcome) == [("check", "image", "test")]
    assert f"Leaked cluster {leaked[0]} refcount=1 reference=0" in outcome.first.tested


def test_files_that_differ_where_qemu_never_looks(qemu, tampered):
    def after(tool, argv, cwd, result):
        if argv[0] == "info":
            with open(Path(cwd, "t.qcow2"), "r+b") as file:
                file.seek(4000)  # past the header's extensions, inside cluster 0
                file.write(b"x")
        return result

    outcome = run_pair(CASE, tampered(after=after), qemu, qemu)
    assert outcome.agrees
    outcome = run_pair(CASE, tampered(after=after), qemu, qemu, compare_files=True)
    assert _kinds(outcome) == [("files", "image", "test")]
    assert outcome.first.tested == "first different byte at offset 4000\n"


def test_a_case_past_its_time_limit_is_a_disagreement(qemu, tampered):
    small = FuzzCase(layers=(Layer("test", size=65536),), steps=(Map("test"), Map("test")))
    outcome = run_pair(small, tampered(after=slow_result(0.6)), qemu, qemu, timeout=0.5)
    assert _kinds(outcome) == [("timeout", "case", None)]


def test_an_exception_in_the_engine_is_a_crash(engine, qemu, monkeypatch):
    import imgengine.chain as chain

    def explode(*args, **kwargs):
        raise RuntimeError("deliberately broken for the test")

    monkeypatch.setattr(chain, "map_entry", explode)
    outcome = run_pair(CASE, engine, qemu, qemu)
    kinds = {(d.kind, d.step_kind) for d in outcome.differences}
    assert ("crash", "map") in kinds
    crash = next(d for d in outcome.differences if d.kind == "crash")
    assert "RuntimeError: deliberately broken for the test" in crash.tested


@pytest.mark.parametrize("step", [Check("test", json=True), Info("test", json=True)])
def test_json_forms_agree_too(engine, qemu, step):
    outcome = run_pair(CASE.with_steps(CASE.steps[:2] + (step,)), engine, qemu, qemu)
    assert outcome.agrees, [d.diff("qemu", "engine") for d in outcome.differences]
