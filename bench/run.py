"""`make bench`: how fast and how lean the engine, the front ends and the
harness are, each measured as a ratio against QEMU 7.2 (or the bare
interpreter) in the same run on the same machine.

Absolute seconds mean little across machines; the ratios are what the
project's targets are stated in. Every figure is the best of several runs
(the least disturbed by whatever else the machine is doing) and peak memory
is the child's maximum resident set size, both taken from `wait4`.

    .venv/bin/python bench/run.py [--only NAME ...] [--repeat N] [--skip-check]

Targets that are missed are reported as such, never hidden; `--strict` makes
a missed target fail the run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYQEMU_IMG = str(BIN / "pyqemu-img")
PYQEMU_IO = str(BIN / "pyqemu-io")
GIB = 1 << 30


class BenchError(Exception):
    """A benchmark could not be run here (a tool missing, a command failing)."""


@dataclass(frozen=True)
class Sample:
    seconds: float
    peak_kib: int


@dataclass(frozen=True)
class Row:
    name: str
    ours_label: str
    ours: Sample
    theirs_label: str
    theirs: Sample
    # "at most": ours/theirs must stay at or below target;
    # "at least": theirs/ours (a speed-up) must reach target.
    sense: str
    target: float | None

    @property
    def ratio(self) -> float:
        if self.sense == "at least":
            return self.theirs.seconds / self.ours.seconds
        return self.ours.seconds / self.theirs.seconds

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.sense == "at least" else self.ratio <= self.target


# A child forked from this (large) Python process inherits its resident-set
# high-water mark across exec, so the kernel's ru_maxrss would report this
# process's size; GNU time forks from a tiny process and reports the
# command's own peak.
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_once(argv: list[str], *, cwd: str | None = None,
             env: dict[str, str] | None = None) -> Sample:
    """Run one process to completion; its wall time and peak RSS (0 where
    GNU time is not installed to measure it)."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as peak:
        command = [GNU_TIME, "-q", "-f", "%M", "-o", peak.name, *argv] if GNU_TIME else argv
        start = time.perf_counter()
        status = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err).returncode
        elapsed = time.perf_counter() - start
        if status != 0:
            err.seek(0)
            detail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise BenchError(f"{' '.join(argv)} exited with {status}: " + " / ".join(detail))
        peak_kib = int(peak.read().strip() or 0) if GNU_TIME else 0
    return Sample(elapsed, peak_kib)


def best_of(repeat: int, measure: Callable[[], Sample]) -> Sample:
    samples = [measure() for _ in range(repeat)]
    return Sample(min(s.seconds for s in samples), max(s.peak_kib for s in samples))


def quiet(argv: list[str], **kwargs: object) -> None:
    """An untimed preparation step that must succeed."""
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {result.returncode}: "
                         f"{result.stderr.strip()}")


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise BenchError(f"{program} is not installed (apt-get install -y qemu-utils)")
    return path


# -- the engine: bulk I/O and block status (issue 2) -------------------------

def bench_write_read(work: Path, repeat: int) -> list[Row]:
    qemu_img, qemu_io = require("qemu-img"), require("qemu-io")
    free = shutil.disk_usage(work).free
    if free < 3 * GIB:
        raise BenchError(f"needs 3 GiB free in {work}, has {free >> 20} MiB")
    theirs_img, ours_img = str(work / "q.qcow2"), str(work / "p.qcow2")

    def write(tool: str, maker: str, image: str) -> Callable[[], Sample]:
        def measure() -> Sample:
            quiet([maker, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", image, "1G"])
            os.sync()  # start each run with no dirty pages of the last one
            return run_once([tool, "-c", "write -P 0x5a 0 1G", image])
        return measure

    def read(tool: str, image: str) -> Callable[[], Sample]:
        return lambda: run_once([tool, "-c", "read -P 0x5a 0 1G", image])

    rows = []
    theirs = best_of(repeat, write(qemu_io, qemu_img, theirs_img))
    ours = best_of(repeat, write(PYQEMU_IO, PYQEMU_IMG, ours_img))
    rows.append(Row("1 GiB sequential write, 64 KiB clusters", "pyqemu-io", ours,
                    "qemu-io", theirs, "at most", 1.5))
    theirs = best_of(repeat, read(qemu_io, theirs_img))
    ours = best_of(repeat, read(PYQEMU_IO, ours_img))
    rows.append(Row("1 GiB read back (read -P)", "pyqemu-io", ours, "qemu-io", theirs,
                    "at most", 3.0))
    return rows


def extent_image(work: Path, extents: int) -> str:
    """A QEMU-written 4 KiB-cluster image whose map has `extents` entries:
    data and zero clusters alternating, so that no two entries merge."""
    image = str(work / "extents.qcow2")
    cluster = 4096
    quiet([require("qemu-img"), "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}",
           image, str(extents * cluster)])
    commands = []
    for index in range(0, extents, 2):
        commands.append(f"write -q -P 0x11 {index * cluster} {cluster}")
        commands.append(f"write -q -z {(index + 1) * cluster} {cluster}")
    commands.append("quit")
    quiet([require("qemu-io"), image], input="\n".join(commands) + "\n")
    return image


def bench_map(work: Path, repeat: int) -> list[Row]:
    qemu_img = require("qemu-img")
    image = extent_image(work, 100_000)
    # Each run takes a tenth of a second: more of them (as for start-up), so
    # that a moment's load on this shared machine does not decide the ratio.
    runs = max(repeat * 3, 10)
    theirs = best_of(runs, lambda: run_once([qemu_img, "map", "--output=json", image]))
    ours = best_of(runs, lambda: run_once([PYQEMU_IMG, "map", "--output=json", image]))
    return [Row("qemu-img map --output=json, 100,000 extents", "pyqemu-img", ours,
                "qemu-img", theirs, "at most", 2.0)]


# -- the front ends: start-up (issue 3) -------------------------------------

def compile_bytecode() -> None:
    """Byte-compile the project as any installed package is. Where
    PYTHONDONTWRITEBYTECODE is set (as in some sandboxes) nothing ever
    writes the cache, and every start would recompile every module."""
    quiet([sys.executable, "-m", "compileall", "-q", *(str(ROOT / package) for package in
                                                      ("imgengine", "pyqemu", "harness"))])


def bench_startup(work: Path, repeat: int) -> list[Row]:
    qemu_io = require("qemu-io")
    compile_bytecode()
    image = str(work / "small.qcow2")
    quiet([require("qemu-img"), "create", "-q", "-f", "qcow2", image, "1M"])
    runs = max(repeat * 5, 10)
    bare = best_of(runs, lambda: run_once([sys.executable, "-c", "pass"]))
    ours = best_of(runs, lambda: run_once([PYQEMU_IO, "-c", "read 0 512", image]))
    theirs = best_of(runs, lambda: run_once([qemu_io, "-c", "read 0 512", image]))
    return [
        Row('start-up: -c "read 0 512"', "pyqemu-io", ours, "python -c pass", bare,
            "at most", 2.0),
        Row('start-up: -c "read 0 512"', "pyqemu-io", ours, "qemu-io", theirs,
            "at most", None),
    ]


# -- the harness: case 154 and make check (issue 4) -------------------------

def qemu_iotests_dir() -> Path:
    root = Path(os.environ.get("QEMU_SRC",
                               Path.home() / ".cache" / "qemu-7.2-src" / "qemu-7.2.0"))
    iotests = root / "tests" / "qemu-iotests"
    if not (iotests / "check").exists():
        raise BenchError(f"QEMU 7.2 source not found at {root} (set QEMU_SRC; "
                         "tools/fetch-qemu-source fetches it)")
    return iotests


def iotests_154(iotests: Path) -> Sample:
    env = dict(os.environ, QEMU_IMG_PROG=require("qemu-img"), QEMU_IO_PROG=require("qemu-io"),
               QEMU_NBD_PROG="/bin/false", QEMU_PROG="/bin/true", QSD_PROG="/bin/true")
    return run_once([sys.executable, "./check", "-qcow2", "154"], cwd=str(iotests), env=env)


def case_154_in_process() -> Sample:
    sys.path.insert(0, str(ROOT))
    from harness.backends import get_backend
    from harness.loader import load_case
    from harness.runner import run_case

    case = load_case(next((ROOT / "cases").glob("154-*.yaml")))
    backend = get_backend("engine")
    start = time.perf_counter()
    transcript = run_case(case, backend)
    elapsed = time.perf_counter() - start
    golden = (ROOT / "golden" / "154.out").read_text()
    if transcript.text != golden:
        raise BenchError("case 154 on the engine backend does not match golden/154.out")
    # In-process: this process's memory is not the case's alone; not reported.
    return Sample(elapsed, 0)


def bench_154(work: Path, repeat: int) -> list[Row]:
    iotests = qemu_iotests_dir()
    # Both sides fdatasync their images; start without the write-back that
    # earlier benchmarks (1 GiB of writes) leave pending.
    os.sync()
    theirs = best_of(repeat, lambda: iotests_154(iotests))
    # A run in-process takes a tenth of a second: more of them, as for the
    # start-up figures, so that one undisturbed run is among them.
    ours = best_of(max(repeat * 3, 10), case_154_in_process)
    case = str(next((ROOT / "cases").glob("154-*.yaml")))
    process = best_of(repeat, lambda: run_once(
        [sys.executable, "-m", "harness", "run", case, "--backend", "engine"], cwd=str(ROOT)))
    return [
        Row("case 154, engine backend (in-process)", "harness", ours,
            "QEMU check 154", theirs, "at least", 20.0),
        Row("case 154, engine backend (whole process)", "python -m harness run", process,
            "QEMU check 154", theirs, "at least", None),
    ]


def bench_make_check(work: Path, repeat: int) -> list[Row]:
    ours = run_once([sys.executable, "-m", "harness", "check"], cwd=str(ROOT))
    theirs = iotests_154(qemu_iotests_dir())
    return [Row("make check (every case, every backend)", "harness check", ours,
                "QEMU check 154", theirs, "at least", None)]


BENCHMARKS: dict[str, Callable[[Path, int], list[Row]]] = {
    "io": bench_write_read,
    "map": bench_map,
    "startup": bench_startup,
    "154": bench_154,
    "check": bench_make_check,
}


def fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_mem(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB" if kib else "-"


def report(rows: list[Row], failures: list[str]) -> str:
    header = ("benchmark", "ours", "time", "peak RSS", "against", "time", "peak RSS",
              "ratio", "target", "")
    table = [header]
    for row in rows:
        ratio = row.ratio
        shown = f"{ratio:.2f}x" if math.isfinite(ratio) else "-"
        if row.target is None:
            target, verdict = "-", ""
        else:
            word = ">=" if row.sense == "at least" else "<="
            target = f"{word} {row.target:g}x"
            verdict = "met" if row.met else "MISSED"
        if row.sense == "at least":
            shown += " faster"
        table.append((row.name, row.ours_label, fmt_seconds(row.ours.seconds),
                      fmt_mem(row.ours.peak_kib), row.theirs_label,
                      fmt_seconds(row.theirs.seconds), fmt_mem(row.theirs.peak_kib),
                      shown, target, verdict))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
             .rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.extend(f"not measured: {failure}" for failure in failures)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best counts)")
    parser.add_argument("--skip-check", action="store_true",
                        help="leave out the whole `make check` timing")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)

    names = args.only or [name for name in BENCHMARKS
                          if not (args.skip_check and name == "check")]
    rows: list[Row] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pyqemu-bench-", dir=os.environ.get("BENCH_DIR")) \
            as work:
        for name in names:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                rows.extend(BENCHMARKS[name](Path(work), args.repeat))
            except BenchError as error:
                failures.append(f"{name}: {error}")
    print(report(rows, failures))
    if failures:
        return 2
    if args.strict and any(row.met is False for row in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
