"""qemu-img's -p progress line, "    (12.34/100%)\r", printed as QEMU prints it.

QEMU keeps the progress in single-precision floats and prints only when it
moved by more than a step, so the arithmetic is rounded to float32 here too:
that decides which lines appear.
"""

# QEMU's printf formats are reproduced as printf formats on purpose.
# ruff: noqa: UP031

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from pyqemu.console import Console


def f32(value: float) -> float:
    """value rounded to the nearest IEEE single, as a C float holds it."""
    return struct.unpack("f", struct.pack("f", value))[0]


class Progress:
    """qemu_progress_init/print/end for one command."""

    def __init__(self, console: Console, enabled: bool, min_skip: float) -> None:
        self.console = console
        self.enabled = enabled
        self.min_skip = f32(min_skip)
        self.current = 0.0
        self.last_print = 0.0

    def print(self, delta: float, scale: int) -> None:
        """qemu_progress_print(delta, max)."""
        delta = f32(delta)
        if scale == 0:
            current = delta
        else:
            current = f32(self.current + f32(f32(delta / 100.0) * scale))
        current = min(current, 100.0)
        self.current = current
        if (current > f32(self.last_print + self.min_skip)
                or current < f32(self.last_print - self.min_skip)
                or current in (100.0, 0.0)):
            self.last_print = current
            if self.enabled:
                self.console.out("    (%3.2f/100%%)\r" % current)
                self.console.flush()

    def end(self) -> None:
        if self.enabled:
            self.console.out("\n")
