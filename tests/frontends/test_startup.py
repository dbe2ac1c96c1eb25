"""Start-up stays small: what the front ends import, checked structurally.

The wall-time budget (pyqemu-io -c "read 0 512" within twice a bare
interpreter) is measured by `python -m pyqemu.startup`, never asserted here;
these tests only pin down that nothing heavy is imported on the way.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = {"json", "argparse", "yaml", "sh", "pytest", "importlib.metadata", "email", "xml",
         "hypothesis", "harness"}


def _imported(args: list[str], cwd) -> set[str]:
    """Modules a run of the real console script imports (from -X importtime)."""
    script = f"{sys.prefix}/bin/{args[0]}"
    completed = subprocess.run([sys.executable, "-X", "importtime", script, *args[1:]],
                               cwd=cwd, capture_output=True, text=True)
    names = set()
    for line in completed.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert names, completed.stderr
    return names


@pytest.mark.parametrize("args", [
    ["pyqemu-io", "-c", "read 0 512", "probe.qcow2"],
    ["pyqemu-io", "-c", "write -P 1 0 512", "-c", "alloc 0 1M", "probe.qcow2"],
    ["pyqemu-img", "map", "--output=json", "probe.qcow2"],
    ["pyqemu-img", "info", "probe.qcow2"],
    ["pyqemu-io", "-c", "help"],
])
def test_nothing_heavy_is_imported(tmp_path, engine, args):
    from pyqemu.img import run

    with open(tmp_path / "log", "w") as sink:
        assert run(["create", "-q", "-f", "qcow2", str(tmp_path / "probe.qcow2"), "1M"],
                   sys.stdin, sink, sink) == 0
    imported = _imported(args, tmp_path)
    assert not {name for name in imported if name.split(".")[0] in HEAVY or name in HEAVY}


def test_help_does_not_load_the_engine(tmp_path):
    imported = _imported(["pyqemu-io", "-c", "help"], tmp_path)
    assert "imgengine" not in imported
    imported = _imported(["pyqemu-img", "--help"], tmp_path)
    assert "imgengine" not in imported
