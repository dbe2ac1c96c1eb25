"""The small hooks the fuzzer added to the harness: the runner can run a case
in a directory it is given and leave the images there, every piece keeps
its unfiltered output and exit status, and `create` takes `args`, `stderr`
and `filter` like the other command steps."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from harness.backends.base import Backend, Result
from harness.loader import load_case, load_case_text
from harness.runner import run_case
from harness.schema import CaseError


class Recorder(Backend):
    """Writes a file for each command (as a real image would be) and prints
    something that mentions the directory, so filters have work to do."""

    name = "recorder"

    def run(self, tool: str, argv: list[str], *, cwd: str, merge_stderr: bool) -> Result:
        Path(cwd, f"made-by-{len(list(Path(cwd).iterdir()))}").write_text(tool)
        return Result(stdout=f'{{ "offset": 327680, "file": "{cwd}/t.qcow2"}}\n',
                      stderr="", status=3)


def _case(tmp_path: Path, text: str):
    path = tmp_path / "976-hooks.yaml"
    path.write_text(textwrap.dedent(text))
    return load_case(path)


def test_a_given_directory_is_used_and_kept(tmp_path):
    case = _case(tmp_path, """\
        title: t
        images: {test: {size: 1M}}
        steps: [map test, map test]
        """)
    directory = tmp_path / "run"
    directory.mkdir()
    transcript = run_case(case, Recorder(), directory=str(directory))
    assert sorted(p.name for p in directory.iterdir()) == ["made-by-0", "made-by-1"]
    assert transcript.text.count('"offset": OFFSET') == 2


def test_pieces_keep_the_unfiltered_output_and_status(tmp_path):
    case = _case(tmp_path, """\
        title: t
        images: {test: {size: 1M}}
        steps:
          - echo: hello
          - map test
        """)
    transcript = run_case(case, Recorder(), tmp_root=str(tmp_path))
    echo, mapped = transcript.pieces[1:3]
    assert echo.result is None
    assert mapped.result is not None and mapped.result.status == 3
    assert '"offset": 327680' in mapped.result.stdout
    assert mapped.text == '{ "offset": OFFSET, "file": "TEST_DIR/t.IMGFMT"}\n'


def test_create_takes_args_stderr_and_filter(tmp_path):
    case = load_case_text(textwrap.dedent("""\
        title: t
        images: {base: {size: 1M}, test: {backing: base}}
        steps:
          - create base: {args: [-q], filter: [testdir]}
          - create test: {stderr: separate, filter: []}
          - create test
        """), tmp_path / "975-create.yaml")
    first, second, third = case.steps
    assert first.args[:4] == ("create", "-f", "qcow2", "-q")
    assert first.filters == ("testdir",) and first.merge_stderr
    assert second.filters == () and not second.merge_stderr
    assert third.filters == ("img_create",) and third.merge_stderr
    assert second.args == third.args


def test_create_still_refuses_unknown_keys(tmp_path):
    with pytest.raises(CaseError, match="unknown key 'output' in 'create'"):
        load_case_text("title: t\nimages: {test: {size: 1M}}\n"
                       "steps:\n  - create test: {output: json}\n", tmp_path / "974-x.yaml")
