"""The `cli` backend: the `pyqemu-img` / `pyqemu-io` console scripts as
processes, through `sh` — what a user of the front ends runs.

The scripts are looked up next to the running Python first (the project's
virtual environment), then on the PATH. A missing script is an install
problem, so it fails the items rather than skipping them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness.backends.process import ProcessBackend, which
from harness.schema import QEMU_IMG, QEMU_IO

SCRIPTS = {QEMU_IMG: "pyqemu-img", QEMU_IO: "pyqemu-io"}


def find_script(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return which(name)


class CliBackend(ProcessBackend):
    name = "cli"

    def programs(self) -> dict[str, str | None]:
        return {tool: find_script(script) for tool, script in SCRIPTS.items()}

    def missing_program_message(self, tool: str) -> str:
        return (f"{SCRIPTS[tool]} not found beside {sys.executable} or on the PATH "
                "(`pip install -e .` installs it)")
