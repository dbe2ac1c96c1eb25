"""The `qemu` backend: the real qemu-img and qemu-io (QEMU 7.2), through `sh`.

The programs come from $QEMU_IMG_PROG / $QEMU_IO_PROG (as in qemu-iotests)
or the PATH; where they are missing the backend's items are skipped.
"""

from __future__ import annotations

import os

from harness.backends.process import ProcessBackend, which
from harness.schema import QEMU_IMG, QEMU_IO

_ENV = {QEMU_IMG: "QEMU_IMG_PROG", QEMU_IO: "QEMU_IO_PROG"}


def find_qemu(tool: str) -> str | None:
    return os.environ.get(_ENV[tool]) or which(tool)


class QemuBackend(ProcessBackend):
    name = "qemu"

    def programs(self) -> dict[str, str | None]:
        return {tool: find_qemu(tool) for tool in (QEMU_IMG, QEMU_IO)}

    def missing_program_message(self, tool: str) -> str:
        return f"{tool} is not installed (apt-get install -y qemu-utils)"

    def describe_program(self, tool: str, program: str) -> str:
        variable = _ENV[tool]
        if os.environ.get(variable):
            return f"${variable}={program}"
        return super().describe_program(tool, program)

    def unavailable(self) -> str | None:
        for tool, program in self.programs().items():
            if program is None:
                return self.missing_program_message(tool)
        return None
