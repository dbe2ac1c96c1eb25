"""The case loader: each kind of malformed case fails with `file:line: message`,
and well-formed cases expand into the command lines qemu-iotests would run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from harness.loader import load_case
from harness.schema import TEST_DIR_MARK, CaseError, Command, Echo, Remove

ROOT = Path(__file__).resolve().parents[2]

GOOD_HEAD = """\
title: t
images:
  test: {size: 1M}
  base: {size: 1M}
"""


def write(tmp_path: Path, text: str, name: str = "900-case.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str, name: str = "900-case.yaml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(CaseError) as caught:
        load_case(path)
    return str(caught.value).replace(str(path), "CASE")


MALFORMED = [
    # (case text, expected "CASE:line: message")
    pytest.param("", "CASE:1: the case file is empty", id="empty"),
    pytest.param("title: t\nsteps:\n  - io test: [read ${a}, map]\n",
                 "CASE:3: YAML syntax error: did not find expected ',' or ']' (inside [...] "
                 "or {...}, quote text that holds ${...})", id="yaml-flow-placeholder"),
    pytest.param("- a\n- b\n", "CASE:1: a case must be a mapping, not a list", id="not-a-mapping"),
    pytest.param("title: t\ntitel: u\nsteps: []\n",
                 "CASE:2: unknown key 'titel' in the case (expected one of: title, seq, "
                 "format, cluster_size, vars, images, blocks, steps)", id="unknown-top-key"),
    pytest.param("steps: []\n", "CASE:1: the case needs a 'title'", id="no-title"),
    pytest.param("title: t\n", "CASE:1: the case has no 'steps'", id="no-steps"),
    pytest.param("title: t\ntitle: u\nsteps: []\n",
                 "CASE:2: duplicate key 'title' (first at line 1)", id="duplicate-key"),
    pytest.param("title: t\nseq: 901\nsteps: []\n",
                 "CASE:2: seq must match the file name (900), not 901", id="seq-mismatch"),
    pytest.param("title: t\nformat: vmdk\nsteps: []\n",
                 "CASE:2: format must be one of qcow2, raw, not 'vmdk'", id="bad-format"),
    pytest.param("title: t\nvars: {size: 1.5}\nsteps: []\n",
                 "CASE:2: unsupported YAML value '1.5' (use strings, integers, booleans or "
                 "null)", id="float-value"),
    pytest.param("title: t\nimages:\n  test: {size: 1M, sise: 2M}\nsteps: []\n",
                 "CASE:3: unknown key 'sise' in image 'test' (expected one of: file, format, "
                 "size, cluster_size, backing, backing_format, options)", id="unknown-image-key"),
    pytest.param("title: t\nimages:\n  test:\n    backing: bsae\nsteps: []\n",
                 "CASE:4: unknown image 'bsae' (declared images: test)", id="unknown-backing"),
    pytest.param("title: t\nimages:\n  test: {format: raw, cluster_size: 4k}\nsteps: []\n",
                 "CASE:3: cluster_size applies to qcow2 images; 'test' is raw",
                 id="cluster-size-on-raw"),
    pytest.param("title: t\nimages:\n  test: {size: lots}\nsteps: []\n",
                 "CASE:3: size must be a byte count such as 1048576 or 128M, not 'lots'",
                 id="bad-size"),
    pytest.param(GOOD_HEAD + "steps:\n  - io tset: read 0 1k\n",
                 "CASE:6: unknown image 'tset' (declared images: test, base)",
                 id="unknown-image-in-step"),
    pytest.param(GOOD_HEAD + "steps:\n  - frobnicate test\n",
                 "CASE:6: unknown step 'frobnicate' (known steps: section, echo, qemu-img, "
                 "qemu-io, create, io, map, check, info, remove, use, for each)",
                 id="unknown-step"),
    pytest.param(GOOD_HEAD + "steps:\n  - io test: read 0 1k\n    map: test\n",
                 "CASE:6: a step has exactly one key, the command (found: io test, map)",
                 id="two-keys"),
    pytest.param(GOOD_HEAD + "steps:\n  - io test\n",
                 "CASE:6: 'io test' needs commands: write 'io test: CMD'", id="io-without-cmd"),
    pytest.param(GOOD_HEAD + "steps:\n  - map\n",
                 "CASE:6: 'map' needs exactly one image name, as in 'map test'",
                 id="map-without-image"),
    pytest.param(GOOD_HEAD + "steps:\n  - section test: x\n",
                 "CASE:6: 'section' takes no image name", id="section-with-image"),
    pytest.param(GOOD_HEAD + "steps:\n  - io test: read ${sise} 1k\n",
                 "CASE:6: undefined variable 'sise' (defined here: fmt)",
                 id="undefined-variable"),
    pytest.param(GOOD_HEAD + "vars: {size: 1M}\nsteps:\n  - io test: read ${size +} 1k\n",
                 "CASE:7: bad arithmetic in '${size +}': expression ends too early",
                 id="bad-arithmetic"),
    pytest.param(GOOD_HEAD + "vars: {size: 1M}\nsteps:\n  - io test: read ${size / 0} 1k\n",
                 "CASE:7: bad arithmetic in '${size / 0}': division by zero",
                 id="division-by-zero"),
    pytest.param(GOOD_HEAD + "vars: {size: 1M}\nsteps:\n  - io test: read ${size & 1} 1k\n",
                 "CASE:7: bad arithmetic in '${size & 1}': unexpected '&'",
                 id="bad-operator"),
    pytest.param(GOOD_HEAD + "vars: {name: abc}\nsteps:\n  - io test: read ${name + 1} 1k\n",
                 "CASE:7: variable 'name' is 'abc', not a number", id="text-in-arithmetic"),
    pytest.param(GOOD_HEAD + "steps:\n  - io test: read $size 1k\n",
                 "CASE:6: a '$' must start a '${...}' placeholder (write '$$' for a '$')",
                 id="stray-dollar"),
    pytest.param(GOOD_HEAD + "vars: {none: null}\nsteps:\n  - echo: x${none}\n",
                 "CASE:7: '${none}' is null and cannot be part of a text", id="null-in-text"),
    pytest.param(GOOD_HEAD + "vars: {fmt: raw}\nsteps: []\n",
                 "CASE:5: 'fmt' is predefined (the case format)", id="predefined-var"),
    pytest.param(GOOD_HEAD + "steps:\n  - map test: {output: xml}\n",
                 "CASE:6: output must be json or human, not 'xml'", id="bad-map-output"),
    pytest.param(GOOD_HEAD + "steps:\n  - map test: {outptu: json}\n",
                 "CASE:6: unknown key 'outptu' in 'map' (expected one of: output, args, "
                 "stderr, filter)", id="unknown-option"),
    pytest.param(GOOD_HEAD + "steps:\n  - qemu-img: {args: [info], filter: qemu_img_mpa}\n",
                 "CASE:6: unknown filter 'qemu_img_mpa' (known filters: actual_image_size, "
                 "img_create, img_create_filenames, img_create_size, img_info, "
                 "img_info_format_specific, img_info_rc, img_info_rc_format_specific, imgfmt, "
                 "qemu_img_check, qemu_img_map, qemu_io, testdir, win32)",
                 id="unknown-filter"),
    pytest.param(GOOD_HEAD + "steps:\n  - qemu-img: {args: [info], stderr: both}\n",
                 "CASE:6: stderr must be 'merged' (2>&1 through the filter) or 'separate' "
                 "(stderr around the filter), not 'both'", id="bad-stderr"),
    pytest.param(GOOD_HEAD + "steps:\n  - qemu-img: 'map \"unclosed'\n",
                 "CASE:6: cannot split the qemu-img arguments into words: No closing quotation",
                 id="bad-quoting"),
    pytest.param("title: t\nimages: {test: {}}\nsteps:\n  - create test\n",
                 "CASE:4: 'create test' needs a size (or a backing image to take it from)",
                 id="create-without-size"),
    pytest.param(GOOD_HEAD + "steps:\n  - create test: {backing: test}\n",
                 "CASE:6: image 'test' cannot be its own backing file", id="self-backing"),
    pytest.param(GOOD_HEAD + "steps:\n  - create test: {options: {size: 1}}\n",
                 "CASE:6: give size as the create step's own key, not under options",
                 id="size-under-options"),
    pytest.param(GOOD_HEAD + "steps:\n  - remove test: now\n",
                 "CASE:6: 'remove test' takes no value", id="remove-with-value"),
    pytest.param(GOOD_HEAD + "steps:\n  - use: fresh\n",
                 "CASE:6: unknown block 'fresh' (defined blocks: none)", id="unknown-block"),
    pytest.param(GOOD_HEAD + "blocks:\n  b:\n    params: [x]\n    steps: [echo: '${x}']\n"
                 "steps:\n  - use: b\n",
                 "CASE:10: block 'b' needs a value for parameter 'x' (give it under 'with:')",
                 id="missing-parameter"),
    pytest.param(GOOD_HEAD + "blocks:\n  b: [echo: hi]\nsteps:\n  - use: b\n    with: {y: 1}\n",
                 "CASE:9: block 'b' has no parameter 'y' (its parameters: none)",
                 id="unknown-parameter"),
    pytest.param(GOOD_HEAD + "blocks:\n  a: [use: b]\n  b: [use: a]\nsteps:\n  - use: a\n",
                 "CASE:7: block 'a' uses itself (a -> b -> a)", id="recursive-block"),
    pytest.param(GOOD_HEAD + "blocks:\n  a: [echo: hi]\n  b: [echo: ho]\nsteps:\n  - use: a\n",
                 "CASE:7: block 'b' is never used", id="unused-block"),
    pytest.param(GOOD_HEAD + "steps:\n  - for each: [{a: 1}]\n",
                 "CASE:6: 'for each' needs the steps to repeat under 'do:'", id="for-without-do"),
    pytest.param(GOOD_HEAD + "steps:\n  - for each: []\n    do: [echo: x]\n",
                 "CASE:6: 'for each' needs at least one set of bindings", id="for-empty"),
    pytest.param(GOOD_HEAD + "steps:\n  - for each: [1, 2]\n    do: [echo: x]\n",
                 "CASE:6: each item of 'for each' must be a mapping, not a number",
                 id="for-not-mappings"),
    pytest.param(GOOD_HEAD + "vars:\n  alone: '${path:nothere}'\nsteps: []\n",
                 "CASE:6: unknown image 'nothere' (declared images: test, base)",
                 id="path-to-unknown-image"),
    pytest.param("title: t\nimages:\n  test: {size: '${path:test}'}\nsteps: []\n",
                 "CASE:3: '${path:test}' cannot be used here, only in steps and variables",
                 id="path-in-image"),
    pytest.param("title: t\nvars: {a: " + "9" * 5000 + "}\nsteps: []\n",
                 "CASE:2: number 99999999999999999999... is too large", id="huge-number"),
    pytest.param("title: t\nvars: {a: '${0x" + "f" * 5000 + "}'}\nsteps: []\n",
                 "CASE:2: number 0xffffffffffffffffff... is too large",
                 id="huge-number-in-placeholder"),
    pytest.param("title: t\nvars: {a: '${0xffffffffffff * 0xffffffffffff}'}\nsteps: []\n",
                 "CASE:2: bad arithmetic in '${0xffffffffffff * 0xffffffffffff}': the result "
                 "is 2**64 or more", id="huge-result"),
    pytest.param('title: t\nsteps:\n  - qemu-img: {args: [info, "a\\0b"]}\n',
                 "CASE:3: a command-line argument cannot hold a NUL character", id="nul-in-args"),
    pytest.param("title: t\nsteps: &s [*s]\n",
                 "CASE:2: YAML aliases are not supported (use blocks: and use: to repeat steps)",
                 id="recursive-alias"),
    pytest.param("title: t\nx: &a [1, 2]\ny: &b [*a, *a]\nsteps: []\n",
                 "CASE:3: YAML aliases are not supported (use blocks: and use: to repeat steps)",
                 id="nested-aliases"),
    pytest.param("title: t\nimages:\n  test: {size: 1M, file: null}\nsteps: []\n",
                 "CASE:3: file must be a text, not null", id="file-null"),
    pytest.param("title: t\nimages:\n  test: {size: 1M, file: 5}\nsteps: []\n",
                 "CASE:3: file must be a text, not 5", id="file-number"),
    pytest.param("title: t\nimages:\n  test:\n    size: 1M\n    file: \"a\\0b\"\nsteps: []\n",
                 "CASE:5: file must be a plain file name (images live in the case's directory)",
                 id="file-with-nul"),
    pytest.param("title: t\nimages:\n  test: {size: 1M, file: " + "a" * 256 + "}\nsteps: []\n",
                 "CASE:3: file name is longer than 255 bytes", id="file-too-long"),
]


@pytest.mark.parametrize("text, expected", MALFORMED)
def test_malformed_case_names_file_and_line(tmp_path, text, expected):
    assert error_of(tmp_path, text) == expected


def test_yaml_syntax_error_names_the_line(tmp_path):
    text = "title: t\nsteps:\n  - map test\n  - [unclosed\n"
    path = write(tmp_path, text)
    with pytest.raises(yaml.MarkedYAMLError) as parsed:
        yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    line = parsed.value.problem_mark.line + 1
    assert line == 5
    with pytest.raises(CaseError) as caught:
        load_case(path)
    assert str(caught.value) == f"{path}:{line}: YAML syntax error: {parsed.value.problem}"


def test_file_name_must_carry_a_number(tmp_path):
    assert error_of(tmp_path, "title: t\nsteps: []\n", name="case.yaml") == (
        "CASE:1: case files are named NNN-name.yaml (a number, a dash, a name)")


def test_errors_inside_blocks_point_at_the_block_line(tmp_path):
    text = GOOD_HEAD + "blocks:\n  b:\n    - io test: read ${nope} 1k\nsteps:\n  - use: b\n"
    assert error_of(tmp_path, text) == (
        "CASE:7: undefined variable 'nope' (defined here: fmt)")


def test_block_steps_see_case_variables_and_parameters_only(tmp_path):
    # Lexical scope: the loop variable of the caller is not visible in the block.
    text = GOOD_HEAD + ("blocks:\n  b:\n    params: [p]\n    steps: ['echo: ${p} ${i}']\n"
                        "steps:\n  - for each: [{i: 1}]\n    do:\n      - use: b\n"
                        "        with: {p: 2}\n")
    assert error_of(tmp_path, text) == (
        "CASE:8: undefined variable 'i' (defined here: fmt, p)")


def load(tmp_path: Path, text: str) -> list:
    return list(load_case(write(tmp_path, text)).steps)


def argv(step: Command) -> list[str]:
    return step.argv("/D")


def test_steps_become_iotests_command_lines(tmp_path):
    steps = load(tmp_path, """\
        title: t
        cluster_size: 4k
        vars: {size: 1M}
        images:
          test: {}
          base: {cluster_size: 512, size: "${size}"}
          raw: {format: raw, size: 64k, file: plain.img}
        steps:
          - section: heading
          - echo:
          - create base
          - create test: {backing: base}
          - create test: {size: "${size + 2048}", options: {lazy_refcounts: true}}
          - create raw
          - io test: write -z 0 2k
          - io test: [read 0 1k, "alloc ${size} 1k"]   # a variable renders as written
          - io raw: {commands: read 0 1k, args: [-r], stderr: merged}
          - map test
          - map test: {output: human}
          - check test
          - info test: {args: --backing-chain, format_specific: true}
          - qemu-img: map --output=json '${path:test}'
          - qemu-io: {args: [-c, map, "${path:test}"], format: null}
          - remove base
        """)
    assert steps[0] == Echo(9, text="\n== heading ==")
    assert steps[1] == Echo(10, text="")
    assert [argv(s) for s in steps[2:-1]] == [
        ["create", "-f", "qcow2", "-o", "cluster_size=512", "/D/t.qcow2.base", "1M"],
        ["create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "/D/t.qcow2.base",
         "/D/t.qcow2", "-F", "qcow2"],
        ["create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", "/D/t.qcow2",
         "1050624"],
        ["create", "-f", "raw", "/D/plain.img", "64k"],
        ["--cache", "writeback", "--aio", "threads", "-f", "qcow2", "-c", "write -z 0 2k",
         "/D/t.qcow2"],
        ["--cache", "writeback", "--aio", "threads", "-f", "qcow2", "-c", "read 0 1k",
         "-c", "alloc 1M 1k", "/D/t.qcow2"],
        ["--cache", "writeback", "--aio", "threads", "-f", "raw", "-r", "-c", "read 0 1k",
         "/D/plain.img"],
        ["map", "--output=json", "/D/t.qcow2"],
        ["map", "/D/t.qcow2"],
        ["check", "-f", "qcow2", "/D/t.qcow2"],
        ["info", "--backing-chain", "/D/t.qcow2"],
        ["map", "--output=json", "/D/t.qcow2"],
        ["--cache", "writeback", "--aio", "threads", "-c", "map", "/D/t.qcow2"],
    ]
    assert steps[-1] == Remove(24, file="t.qcow2.base")
    tools_filters_merge = [(s.tool, s.filters, s.merge_stderr) for s in steps[2:-1]]
    assert tools_filters_merge == [
        ("qemu-img", ("img_create",), True),
        ("qemu-img", ("img_create",), True),
        ("qemu-img", ("img_create",), True),
        ("qemu-img", ("img_create",), True),
        ("qemu-io", ("qemu_io",), False),
        ("qemu-io", ("qemu_io",), False),
        ("qemu-io", ("qemu_io",), True),
        ("qemu-img", ("qemu_img_map",), False),
        ("qemu-img", ("qemu_img_map",), False),
        ("qemu-img", ("testdir", "qemu_img_check"), True),
        ("qemu-img", ("img_info_rc_format_specific",), True),
        ("qemu-img", ("testdir",), True),
        ("qemu-io", ("qemu_io",), False),
    ]


def test_a_comma_in_an_option_value_cannot_add_an_option(tmp_path):
    steps = load(tmp_path, """\
        title: t
        images:
          test: {size: 1M, options: {compat: "1.1,lazy_refcounts=on"}}
        steps:
          - create test: {options: {refcount_bits: "16,x"}}
        """)
    assert argv(steps[0])[:5] == ["create", "-f", "qcow2", "-o",
                                  "compat=1.1,,lazy_refcounts=on,refcount_bits=16,,x"]


def test_blocks_loops_and_typed_placeholders(tmp_path):
    steps = load(tmp_path, """\
        title: t
        vars: {size: 1M, half: "${size / 2}", label: "x$$y"}
        images:
          test: {}
          base: {size: "${size}"}
        blocks:
          pair:
            params: [backing]
            steps:
              - for each:
                  - {at: 0, len: 512}
                  - {at: "${half}", len: 1k}
                do:
                  - create test: {size: "${size * 2}", backing: "${backing}"}
                  - io test: write -z ${size + at} ${len}
        steps:
          - use: pair
            with: {backing: null}
          - use: pair
            with: {backing: base}
          - echo: ${label} ${-(2 + 3) * 4 % 7} ${0x10 + 1k}
        """)
    commands = [argv(s) for s in steps if isinstance(s, Command)]
    assert commands[0] == ["create", "-f", "qcow2", "/D/t.qcow2", "2097152"]
    assert commands[1][-3:] == ["-c", "write -z 1048576 512", "/D/t.qcow2"]
    assert commands[3][-3:] == ["-c", "write -z 1572864 1k", "/D/t.qcow2"]
    assert commands[4] == ["create", "-f", "qcow2", "-b", "/D/t.qcow2.base", "/D/t.qcow2",
                           "-F", "qcow2", "2097152"]
    assert steps[-1].text == "x$y -6 1040"
    # each expanded step remembers the block line and the use/for-each lines around it
    assert steps[0].line == 14 and steps[0].via == (17, 11)
    assert steps[0].where("c.yaml") == "c.yaml:14 (via line 11, line 17)"


@pytest.mark.parametrize("path", sorted((ROOT / "cases").glob("*.yaml")), ids=lambda p: p.name)
def test_repository_cases_load(path):
    case = load_case(path)
    assert case.steps
    assert all(TEST_DIR_MARK not in arg for s in case.steps if isinstance(s, Command)
               for arg in s.argv("/D"))


def test_case_154_expands_to_the_commands_of_iotest_154():
    case = load_case(ROOT / "cases" / "154-write-zeroes-backing.yaml")
    commands = [s for s in case.steps if isinstance(s, Command)]
    creates = [argv(s) for s in commands if s.args[0] == "create"]
    # 11 sections' pairs, 12 tail overlays and their 2k-cluster base, one
    # overlay without backing, two more pairs
    assert len(creates) == 2 * 11 + 12 + 1 + 1 + 2 * 2
    assert creates[0] == ["create", "-f", "qcow2", "-o", "cluster_size=512",
                          "/D/t.qcow2.base", "134217728"]
    assert creates[22] == ["create", "-f", "qcow2", "-o", "cluster_size=4k", "/D/t.qcow2",
                           "134219776"]
    assert creates[26] == ["create", "-f", "qcow2", "-o", "cluster_size=2048",
                           "/D/t.qcow2.base", "134218752"]
    ios = [s.args[-2] for s in commands if s.tool == "qemu-io"]
    assert ios[:4] == ["write -z 0 2k", "write -z 10k 2k", "write -z 17k 2k", "write -z 27k 2k"]
    assert "write -z 134219264 512" in ios
