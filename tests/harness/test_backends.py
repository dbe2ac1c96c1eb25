"""The backends behind the one `run` interface: engine in-process, processes
through `sh` (a stand-in script, then real QEMU), and the --backend parsing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from harness.backends import BACKENDS, get_backend, parse_backends
from harness.backends.base import BackendError
from harness.backends.engine import EngineBackend
from harness.backends.process import ProcessBackend
from harness.backends.qemu import QemuBackend


def test_parse_backends():
    assert parse_backends("engine") == ["engine"]
    assert parse_backends("all") == ["engine", "cli", "qemu"]
    assert parse_backends("qemu, engine,qemu") == ["qemu", "engine"]
    with pytest.raises(ValueError, match="unknown backend 'qmeu'"):
        parse_backends("qmeu")
    assert set(BACKENDS) == {"engine", "cli", "qemu"}
    assert get_backend("engine") is get_backend("engine")


def engine_with(img=None, io=None) -> EngineBackend:
    backend = EngineBackend()
    backend._entry_points = {"qemu-img": img, "qemu-io": io}
    return backend


def test_engine_passes_string_buffers_and_keeps_streams_apart():
    seen = {}

    def fake_img(argv, stdin, stdout, stderr):
        seen["argv"], seen["stdin"] = argv, stdin.read()
        stdout.write("out 1\n")
        stderr.write("err\n")
        stdout.write("out 2\n")
        return 3

    result = engine_with(img=fake_img).run("qemu-img", ["info", "x"], cwd="/", merge_stderr=False)
    assert (result.stdout, result.stderr, result.status) == ("out 1\nout 2\n", "err\n", 3)
    assert seen == {"argv": ["info", "x"], "stdin": ""}


def test_engine_merged_streams_share_one_buffer_in_write_order():
    def fake_io(argv, stdin, stdout, stderr):
        assert stdout is stderr
        stdout.write("a\n")
        stderr.write("b\n")
        return 0

    result = engine_with(io=fake_io).run("qemu-io", [], cwd="/", merge_stderr=True)
    assert (result.stdout, result.stderr) == ("a\nb\n", "")


def test_engine_prints_an_escaping_exception_like_a_dying_process():
    def crashing(argv, stdin, stdout, stderr):
        stdout.write("partial\n")
        raise ZeroDivisionError("boom")

    result = engine_with(img=crashing).run("qemu-img", [], cwd="/", merge_stderr=False)
    assert result.stdout == "partial\n"
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.endswith("ZeroDivisionError: boom\n")
    assert result.status == 1


def test_engine_runs_the_call_in_the_case_directory(tmp_path):
    def fake_img(argv, stdin, stdout, stderr):
        stdout.write(os.getcwd())
        return 0

    home = os.getcwd()
    result = engine_with(img=fake_img).run("qemu-img", [], cwd=str(tmp_path), merge_stderr=False)
    assert result.stdout == str(tmp_path)
    assert os.getcwd() == home


def test_engine_reports_an_in_process_kill_like_a_killed_process():
    def aborting(argv, stdin, stdout, stderr):
        stdout.write("partial\n")
        return 128 + 6

    result = engine_with(io=aborting).run("qemu-io", [], cwd="/", merge_stderr=False)
    assert (result.stdout, result.stderr, result.status) == (
        "partial\n", "qemu-io: killed by signal 6\n", -6)


def test_engine_reports_front_ends_that_cannot_be_imported(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyqemu.img", None)
    with pytest.raises(BackendError, match="cannot be imported"):
        EngineBackend().run("qemu-img", [], cwd="/", merge_stderr=False)


class ScriptBackend(ProcessBackend):
    """Both tools are one shell script written by the test."""

    name = "script"

    def __init__(self, script: Path | None) -> None:
        super().__init__()
        self.script = script

    def programs(self):
        program = None if self.script is None else str(self.script)
        return {"qemu-img": program, "qemu-io": program}


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "tool.sh"
    path.write_text('#!/bin/sh\n'
                    'echo "args:$*"\n'
                    'echo "cwd:$(pwd)"\n'
                    'echo "to stderr" >&2\n'
                    'read line && echo "stdin:$line"\n'
                    'if [ -t 1 ]; then echo "stdout is a terminal"; fi\n'
                    'case "$1" in die) kill -ABRT $$ ;; esac\n'
                    'echo after\n'
                    'exit 4\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_process_backend_runs_one_process_per_call(script, tmp_path):
    backend = ScriptBackend(script)
    result = backend.run("qemu-io", ["-c", "read 0 1k", "x y"], cwd=str(tmp_path),
                         merge_stderr=False)
    assert result.stdout == f"args:-c read 0 1k x y\ncwd:{tmp_path}\nafter\n"
    assert result.stderr == "to stderr\n"
    assert result.status == 4


def test_process_backend_merged_stderr_shares_the_pipe(script, tmp_path):
    result = ScriptBackend(script).run("qemu-img", ["a"], cwd=str(tmp_path), merge_stderr=True)
    assert result.stdout == f"args:a\ncwd:{tmp_path}\nto stderr\nafter\n"
    assert result.stderr == ""


def test_process_backend_reports_a_signal(script, tmp_path):
    result = ScriptBackend(script).run("qemu-img", ["die"], cwd=str(tmp_path),
                                       merge_stderr=False)
    assert result.status == -6
    assert result.stdout == f"args:die\ncwd:{tmp_path}\n"
    assert result.stderr == "to stderr\nqemu-img: killed by signal 6\n"


def test_process_backend_kills_a_step_that_hangs(script, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_STEP_TIMEOUT", "0.5")
    script.write_text("#!/bin/sh\nsleep 30\n")
    result = ScriptBackend(script).run("qemu-io", [], cwd=str(tmp_path), merge_stderr=True)
    assert result.status == -9
    assert result.stdout == ("qemu-io: killed after 0.5 s without finishing "
                             "($HARNESS_STEP_TIMEOUT)\n")


def test_process_backend_without_its_program_fails_clearly(tmp_path):
    with pytest.raises(BackendError, match="qemu-img not found"):
        ScriptBackend(None).run("qemu-img", [], cwd=str(tmp_path), merge_stderr=False)


def test_process_backend_refuses_a_program_that_cannot_run(tmp_path):
    text = tmp_path / "not-a-program"
    text.write_text("just text\n")
    for program in (str(text), str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(BackendError, match=" is not an executable file$"):
            ScriptBackend(program).run("qemu-img", [], cwd=str(tmp_path), merge_stderr=False)


def test_qemu_backend_names_the_variable_of_a_program_that_cannot_run(monkeypatch, tmp_path):
    monkeypatch.setenv("QEMU_IMG_PROG", str(tmp_path / "missing"))
    with pytest.raises(BackendError) as caught:
        QemuBackend().run("qemu-img", [], cwd=str(tmp_path), merge_stderr=False)
    assert str(caught.value) == f"$QEMU_IMG_PROG={tmp_path}/missing is not an executable file"


def test_qemu_backend_takes_a_bare_program_name_from_the_path(monkeypatch, script):
    monkeypatch.setenv("PATH", str(script.parent))
    monkeypatch.setenv("QEMU_IO_PROG", script.name)
    result = QemuBackend().run("qemu-io", ["x"], cwd=os.getcwd(), merge_stderr=True)
    assert result.stdout.startswith("args:x\n")


def test_qemu_backend_runs_real_qemu(qemu_img, tmp_path):
    backend = QemuBackend()
    assert backend.unavailable() is None
    image = str(tmp_path / "t.qcow2")
    created = backend.run("qemu-img", ["create", "-f", "qcow2", image, "1M"],
                          cwd=str(tmp_path), merge_stderr=True)
    assert created.status == 0 and created.stdout.startswith(f"Formatting '{image}'")
    missing = backend.run("qemu-img", ["info", str(tmp_path / "missing")],
                          cwd=str(tmp_path), merge_stderr=False)
    assert missing.status == 1 and missing.stdout == ""
    assert missing.stderr.startswith("qemu-img: Could not open")


def test_qemu_backend_is_unavailable_without_qemu(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("QEMU_IMG_PROG", raising=False)
    monkeypatch.delenv("QEMU_IO_PROG", raising=False)
    assert QemuBackend().unavailable() == "qemu-img is not installed (apt-get install -y qemu-utils)"


def test_qemu_backend_takes_programs_from_the_environment(monkeypatch, script):
    monkeypatch.setenv("QEMU_IMG_PROG", str(script))
    monkeypatch.setenv("QEMU_IO_PROG", str(script))
    result = QemuBackend().run("qemu-io", ["x"], cwd=os.getcwd(), merge_stderr=True)
    assert result.stdout.startswith("args:x\n")
