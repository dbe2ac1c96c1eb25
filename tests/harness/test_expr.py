"""`${...}` placeholders: arithmetic as the shell's $((...)), sizes, types."""

from __future__ import annotations

import pytest

from harness.expr import PathRef, evaluate, interpolate, parse_size_literal


def render(ref: PathRef) -> str:
    return f"<{ref.image}>"


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("128 * 1024 * 1024 + 1536", 134219264),
    ("7 / 2", 3),
    ("-7 / 2", -3),
    ("7 % -3", 1),
    ("-7 % 3", -1),
    ("--4", 4),
    ("2k + 1M", 1050624),
    ("0x10 * 4K", 65536),
    ("1G / 512", 2097152),
    ("size - 1k", 1047552),
    ("text_size * 2", 8192),
])
def test_arithmetic(expression, value):
    assert evaluate(expression, {"size": 1048576, "text_size": "4k"}) == value


@pytest.mark.parametrize("expression, message", [
    ("1 +", "bad arithmetic in '${1 +}': expression ends too early"),
    ("(1 + 2", "bad arithmetic in '${(1 + 2}': missing ')'"),
    ("1 2", "bad arithmetic in '${1 2}': unexpected '2'"),
    ("2kb", "bad arithmetic in '${2kb}': unexpected 'kb'"),
    ("1 ^ 2", "bad arithmetic in '${1 ^ 2}': unexpected '^'"),
    ("x + 1", "undefined variable 'x' (defined here: flag, name, nothing)"),
    ("name + 1", "variable 'name' is 'abc', not a number"),
    ("flag * 2", "variable 'flag' is a boolean, not a number"),
    ("nothing - 1", "variable 'nothing' is null, not a number"),
    ("", "empty placeholder '${}'"),
    ("path:", "'${path:}' needs an image name after 'path:'"),
])
def test_errors(expression, message):
    with pytest.raises(ValueError) as caught:
        evaluate(expression, {"name": "abc", "flag": True, "nothing": None})
    assert str(caught.value) == message


def test_interpolation_keeps_the_type_of_a_lone_placeholder():
    scope = {"n": 5, "s": "128M", "z": None, "b": False}
    assert interpolate("${n}", scope, render) == 5
    assert interpolate("${s}", scope, render) == "128M"
    assert interpolate("${z}", scope, render) is None
    assert interpolate("${b}", scope, render) is False
    assert interpolate("${n + 1}", scope, render) == 6
    assert interpolate("at ${n}, ${s} and $${literal} $$", scope, render) == (
        "at 5, 128M and ${literal} $")
    assert interpolate("file=${path:base}", scope, render) == "file=<base>"
    assert interpolate("${path: base }", scope, render) == "<base>"
    assert interpolate("plain text", scope, render) == "plain text"


def test_deferred_paths_resolve_when_used():
    stored = interpolate('{"f": "${path:top}"}', {}, lambda ref: ref.deferred())
    assert interpolate("${v}", {"v": stored}, render) == '{"f": "<top>"}'
    assert interpolate("x ${v}", {"v": stored}, render) == 'x {"f": "<top>"}'


def test_size_literals():
    assert parse_size_literal("4096") == 4096
    assert parse_size_literal("64k") == 65536
    assert parse_size_literal("0x200") == 512
    assert parse_size_literal("1.5G") is None
    assert parse_size_literal("k") is None
