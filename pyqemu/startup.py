"""Start-up cost of the front ends, measured the way the brief states the budget.

`python -m pyqemu.startup [IMAGE]` times (median of many runs) the bare
interpreter of this virtual environment (`python -c pass`), the installed
`pyqemu-io -c "read 0 512" IMAGE` and real `qemu-io` on the same image, and
prints the figures and the pyqemu-io/python ratio.  measure() returns them for
a benchmark harness.  Timing is reported, never asserted.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _median_ms(argv: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000.0


def measure(image: str | None = None, runs: int = 30) -> dict[str, float]:
    """Median wall times in ms: python, pyqemu_io, qemu_io (when installed), ratio."""
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as scratch:
        if image is None:
            image = os.path.join(scratch, "startup.qcow2")
            from pyqemu.img import run
            with open(os.devnull, "w") as sink:
                run(["create", "-q", "-f", "qcow2", image, "1M"], sys.stdin, sink, sink)
        command = ["-c", "read 0 512", image]
        figures = {
            "python": _median_ms([sys.executable, "-c", "pass"], runs),
            "pyqemu_io": _median_ms([str(bin_dir / "pyqemu-io"), *command], runs),
        }
        real = shutil.which("qemu-io")
        if real is not None:
            figures["qemu_io"] = _median_ms([real, *command], runs)
    figures["ratio"] = figures["pyqemu_io"] / figures["python"]
    return figures


def main() -> None:
    figures = measure(sys.argv[1] if len(sys.argv) > 1 else None)
    for name, value in figures.items():
        unit = "" if name == "ratio" else " ms"
        print(f"{name:10} {value:8.2f}{unit}")


if __name__ == "__main__":
    main()
