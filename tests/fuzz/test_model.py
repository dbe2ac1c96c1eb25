"""Generated cases are valid cases of the harness's language: rendered to
YAML they read back as the same data, load through the ordinary loader, and
expand to exactly the commands the model describes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from harness.expr import interpolate, parse_size_literal
from harness.fuzz.compare import load_fuzz_case
from harness.fuzz.generate import generate
from harness.fuzz.model import (
    Check,
    FuzzCase,
    Info,
    Io,
    IoOp,
    Layer,
    Map,
    as_data,
    number_text,
    render,
)
from harness.loader import load_case_text
from harness.schema import TEST_DIR_MARK

SEEDS = [(seed, index) for seed in (0, 1, 2024) for index in range(150)]


def _bytes(text: str) -> int:
    value = interpolate(text, {}, None) if "$" in text else text
    number = value if isinstance(value, int) else parse_size_literal(str(value))
    assert number is not None, text
    return number


@given(st.integers(min_value=0, max_value=1 << 42))
def test_number_text_reads_back_as_the_same_count(value):
    assert _bytes(number_text(value)) == value


def test_number_text_is_what_a_person_writes():
    assert [number_text(v) for v in (512, 4096, 65536, 66048, 1 << 20, (1 << 20) - 1,
                                     (3 << 20) + 65536, 101910)] == \
        ["512", "4k", "64k", "${64k + 512}", "1M", "${1M - 1}", "${3M + 64k}", "101910"]


@pytest.mark.parametrize("seed,index", SEEDS[::10])
def test_rendered_yaml_is_the_model_data(seed, index):
    case = generate(seed, index)
    assert yaml.safe_load(render(case)) == as_data(case)


@pytest.mark.parametrize("seed", (0, 1, 2024))
def test_every_generated_case_loads_and_expands_as_modelled(seed):
    for index in range(150):
        case = generate(seed, index)
        loaded = load_case_text(render(case), Path("123-fuzz.yaml"))
        assert loaded.format == case.format
        assert len(loaded.steps) == case.step_count()
        creates, rest = loaded.steps[:len(case.layers)], loaded.steps[len(case.layers):]
        for layer, create in zip(case.layers, creates, strict=True):
            assert create.args[:3] == ("create", "-f", layer.format)
            assert loaded.images[layer.name].path in create.args
            if layer.size is not None:
                assert _bytes(create.args[-1]) == layer.size
            backing = case.backing_of(layer.name)
            if backing is None:
                assert "-b" not in create.args
            else:
                at = create.args.index("-b")
                assert create.args[at + 1] == loaded.images[backing.name].path
        for step, command in zip(case.steps, rest, strict=True):
            path = f"{TEST_DIR_MARK}/{loaded.images[step.image].file}"
            if isinstance(step, Io | Map) and step.cut_backing:
                opened = json.loads(command.argv("/T")[-1].removeprefix("json:"))
                assert opened == {"driver": "qcow2", "backing": None, "file": {
                    "driver": "file", "filename": f"/T/{loaded.images[step.image].file}"}}
                assert "-f" not in command.args
            else:
                assert command.args[-1] == path
            if isinstance(step, Io):
                expected = [c for op in step.ops for c in op.commands()]
                given_commands = [command.args[i + 1] for i, arg in enumerate(command.args)
                                  if arg == "-c"]
                assert len(given_commands) == len(expected)
                for rendered, sent in zip(expected, given_commands, strict=True):
                    # placeholders are worked out; every word means the same bytes
                    assert [_bytes(w) if w[0].isdigit() or w[0] == "$" else w
                            for w in _words(rendered)] == \
                        [_bytes(w) if w[0].isdigit() else w for w in sent.split()]
            else:
                assert command.tool == "qemu-img"
                assert command.args[0] == step.kind


def _words(command: str) -> list[str]:
    """Split a rendered qemu-io command, keeping `${a + b}` as one word."""
    words, current, depth = [], "", 0
    for char in command:
        if char == " " and depth == 0:
            words.append(current)
            current = ""
            continue
        depth += char == "{"
        depth -= char == "}"
        current += char
    return [*words, current]


def test_a_hand_built_case_renders_every_step_form():
    case = FuzzCase(
        layers=(Layer("base", format="raw", size=1000),
                Layer("test", cluster_size=512, options=(("compat", "0.10"),), reveal=True)),
        steps=(Io("test", (IoOp("aio_write", 0, (4096,), ("-z", "-u")),
                           IoOp("readv", 512, (512, 1024), (), 0x5))),
               Io("base", (IoOp("map"),), reveal=True),
               Map("test", human=True, start=512, length=4096, reveal=True),
               Check("test", json=True), Info("test", backing_chain=True, json=True,
                                              reveal=True)),
        origin="hand", comment=("what it is",))
    text = render(case, title="a: title")
    assert text.startswith("# what it is\ntitle: \"a: title\"\n")
    loaded = load_fuzz_case(case, text)
    commands = [step.args for step in loaded.steps]
    assert commands[1][:6] == ("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512",
                               "-b")
    assert loaded.steps[1].filters == ("testdir",)
    assert ["-c", "aio_write -z -u 0 4k", "-c", "aio_flush", "-c", "readv -P 0x5 512 512 1k"] \
        == list(commands[2][6:12])
    assert loaded.steps[3].filters == ("qemu_io",)
    assert commands[4][:4] == ("map", "--start-offset=512", "--max-length=4096",
                               f"{TEST_DIR_MARK}/t.qcow2")
    assert loaded.steps[4].filters == ("testdir",)
    assert commands[5][:2] == ("check", "--output=json")
    assert commands[6][:3] == ("info", "--backing-chain", "--output=json")
    assert loaded.steps[6].filters == ("img_info_rc_format_specific",)
    assert yaml.safe_load(text) == {**as_data(case), "title": "a: title"}


def test_counts_are_the_rendered_steps_and_commands():
    case = FuzzCase(layers=(Layer("base", size=65536), Layer("test")),
                    steps=(Io("test", (IoOp("aio_read", 0, (512,), (), 0), IoOp("map"))),
                           Map("test")))
    assert case.step_count() == 4
    assert case.operation_count() == 2 + 3 + 1
    assert case.virtual_size("test") == 65536


def test_virtual_sizes_are_rounded_up_to_a_sector_and_inherited():
    case = FuzzCase(layers=(Layer("base", format="raw", size=1000), Layer("mid"),
                            Layer("test", size=70000)), steps=())
    assert [case.virtual_size(name) for name in ("base", "mid", "test")] == [1024, 1024, 70144]


def test_generation_is_reproducible_and_independent_per_index():
    assert render(generate(5, 17)) == render(generate(5, 17))
    assert render(generate(5, 17)) != render(generate(5, 18))
    state = random.getstate()
    generate(5, 3)
    assert random.getstate() == state  # the global stream is left alone
