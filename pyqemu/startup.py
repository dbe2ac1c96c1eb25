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


def _run_ms(argv: list[str]) -> tuple[float, float]:
    """(wall, CPU) milliseconds of one run; CPU time is steadier on a busy machine."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    wall = (time.perf_counter() - started) * 1000.0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000.0
    return wall, cpu


def measure(image: str | None = None, runs: int = 40) -> dict[str, float]:
    """Median times in ms of python, pyqemu_io and qemu_io (when installed), wall
    and CPU (the *_cpu entries), and the pyqemu-io/python ratios of both.

    The commands take turns run after run, so that a change in the machine's
    load affects them alike.
    """
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as scratch:
        if image is None:
            image = os.path.join(scratch, "startup.qcow2")
            from pyqemu.img import run
            with open(os.devnull, "w") as sink:
                run(["create", "-q", "-f", "qcow2", image, "1M"], sys.stdin, sink, sink)
        command = ["-c", "read 0 512", image]
        argvs = {
            "python": [sys.executable, "-c", "pass"],
            "pyqemu_io": [str(bin_dir / "pyqemu-io"), *command],
        }
        real = shutil.which("qemu-io")
        if real is not None:
            argvs["qemu_io"] = [real, *command]
        for argv in argvs.values():     # warm the caches (and bytecode) once
            _run_ms(argv)
        samples: dict[str, list[float]] = {}
        for _ in range(runs):
            for name, argv in argvs.items():
                wall, cpu = _run_ms(argv)
                samples.setdefault(name, []).append(wall)
                samples.setdefault(name + "_cpu", []).append(cpu)
    figures = {name: statistics.median(values) for name, values in samples.items()}
    figures["ratio"] = figures["pyqemu_io"] / figures["python"]
    figures["ratio_cpu"] = figures["pyqemu_io_cpu"] / figures["python_cpu"]
    return figures


def main() -> None:
    figures = measure(sys.argv[1] if len(sys.argv) > 1 else None)
    for name, value in figures.items():
        unit = "" if name.startswith("ratio") else " ms"
        print(f"{name:14} {value:8.2f}{unit}")


if __name__ == "__main__":
    main()
