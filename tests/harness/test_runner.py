"""The runner on a tiny fake backend: transcript layout, filters and stderr,
one fresh directory per run, and which step printed which line."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from harness.backends.base import Backend, BackendError, Result
from harness.loader import load_case
from harness.runner import run_case


class FakeBackend(Backend):
    """Answers each command from a script of (stdout, stderr) pairs and records
    what it was asked to run and where."""

    name = "fake"

    def __init__(self, replies: list[tuple[str, str]] | None = None) -> None:
        self.replies = list(replies or [])
        self.calls: list[tuple[str, list[str], str, bool]] = []
        self.dir_existed: list[bool] = []

    def run(self, tool: str, argv: list[str], *, cwd: str, merge_stderr: bool) -> Result:
        self.calls.append((tool, argv, cwd, merge_stderr))
        self.dir_existed.append(os.path.isdir(cwd))
        stdout, stderr = self.replies.pop(0) if self.replies else ("", "")
        if merge_stderr:
            return Result(stdout=stderr + stdout, stderr="", status=0)
        return Result(stdout=stdout, stderr=stderr, status=0)


def case(tmp_path: Path, text: str):
    path = tmp_path / "977-fake.yaml"
    path.write_text(textwrap.dedent(text))
    return load_case(path)


def test_transcript_has_iotests_header_steps_and_footer(tmp_path):
    c = case(tmp_path, """\
        title: t
        images: {test: {size: 1M}}
        steps:
          - section: first
          - echo: some text
          - echo:
          - map test
        """)
    backend = FakeBackend([('[{ "start": 0, "offset": 327680}]\n', "")])
    text = run_case(c, backend).text
    assert text == ("QA output created by 977\n"
                    "\n== first ==\n"
                    "some text\n"
                    "\n"
                    '[{ "start": 0, "offset": OFFSET}]\n'
                    "*** done\n")


def test_separate_stderr_bypasses_the_filter_merged_goes_through(tmp_path):
    c = case(tmp_path, """\
        title: t
        images: {test: {size: 1M}}
        steps:
          - io test: read 0 1k
          - io test: {commands: read 0 1k, stderr: merged, filter: [qemu_io, testdir]}
        """)
    timing = "1 KiB, 1 ops; 00.00 sec (1 MiB/sec and 1000.0 ops/sec)\n"
    backend = FakeBackend()

    def reply(tool, argv, *, cwd, merge_stderr):
        err = f"warning about {cwd}/t.qcow2\n"
        FakeBackend.run(backend, tool, argv, cwd=cwd, merge_stderr=merge_stderr)
        if merge_stderr:
            return Result(stdout=err + timing, stderr="", status=0)
        return Result(stdout=timing, stderr=err, status=0)

    backend.run = reply
    transcript = run_case(c, backend)
    test_dir = backend.calls[0][2]
    shown = "1 KiB, X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)\n"
    assert transcript.pieces[1].text == f"warning about {test_dir}/t.qcow2\n" + shown
    assert transcript.pieces[2].text == "warning about TEST_DIR/t.qcow2\n" + shown
    assert [call[3] for call in backend.calls] == [False, True]


def test_each_run_gets_a_fresh_directory_that_is_removed(tmp_path):
    c = case(tmp_path, """\
        title: t
        images: {test: {size: 1M}}
        steps:
          - create test
          - io test: write 0 1k
        """)
    first, second = FakeBackend(), FakeBackend()
    run_case(c, first, tmp_root=str(tmp_path))
    run_case(c, second, tmp_root=str(tmp_path))
    dirs = {call[2] for call in first.calls} | {call[2] for call in second.calls}
    assert len(dirs) == 2
    assert all(first.dir_existed + second.dir_existed)
    assert not any(os.path.exists(d) for d in dirs)
    for backend in (first, second):
        test_dir = backend.calls[0][2]
        assert Path(test_dir).parent == tmp_path
        assert backend.calls[0][1] == ["create", "-f", "qcow2", f"{test_dir}/t.qcow2", "1M"]
        assert backend.calls[1][1][-1] == f"{test_dir}/t.qcow2"


def test_directory_is_removed_when_the_backend_fails(tmp_path):
    c = case(tmp_path, "title: t\nimages: {test: {size: 1M}}\nsteps: [create test]\n")

    class Broken(FakeBackend):
        def run(self, tool, argv, *, cwd, merge_stderr):
            self.seen = cwd
            raise BackendError("no such program")

    backend = Broken()
    with pytest.raises(BackendError):
        run_case(c, backend, tmp_root=str(tmp_path))
    assert not os.path.exists(backend.seen)


def test_remove_deletes_the_image_file(tmp_path):
    c = case(tmp_path, """\
        title: t
        images: {test: {size: 1M}, base: {size: 1M}}
        steps:
          - create base
          - remove base
          - remove base
          - create test
        """)

    class Touching(FakeBackend):
        def run(self, tool, argv, *, cwd, merge_stderr):
            listing = sorted(os.listdir(cwd))
            self.listings = [*getattr(self, "listings", []), listing]
            Path(argv[-2]).touch()
            return super().run(tool, argv, cwd=cwd, merge_stderr=merge_stderr)

    backend = Touching()
    assert run_case(c, backend).text == "QA output created by 977\n*** done\n"
    assert backend.listings == [[], []]


def test_step_at_line_names_the_step_that_printed_it(tmp_path):
    c = case(tmp_path, """\
        title: t
        images: {test: {size: 1M}}
        steps:
          - section: s
          - io test: read 0 1k
          - map test
        """)
    backend = FakeBackend([("line a\nline b\n", ""), ("line c\n", "")])
    transcript = run_case(c, backend)
    lines = transcript.text.splitlines()
    assert lines[4] == "line b" and lines[5] == "line c"
    assert transcript.step_at_line(1) is None
    assert transcript.step_at_line(3).line == 4
    assert transcript.step_at_line(5).line == 5
    assert transcript.step_at_line(6).line == 6
    assert transcript.step_at_line(7) is None
