"""Compare a transcript with its golden file through pytest-regressions.

`golden/NNN.out` is the expected transcript. The comparison is byte for
byte; on a difference the failure shows a unified diff and which case step
printed the first differing line, and the obtained output stays behind as
`golden/NNN.out.bad` (`golden/NNN.BACKEND.out.bad` for backends other than
the default engine, so concurrent backends never overwrite each other's).
A run that matches removes a stale `.bad`.

pytest-regressions' `--force-regen` (rewrite differing goldens, failing
those items) and `--regen-all` (rewrite all, passing) work as usual. Without
them a missing golden is only created from real QEMU: a golden states what
QEMU does, so an engine or front-end run never invents one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.backends import DEFAULT

QEMU_BACKEND = "qemu"


class GoldenMismatch(AssertionError):
    """The transcript differs from the golden file (the message is the report)."""


class GoldenMissing(AssertionError):
    """There is no golden file and this backend may not create one."""


def bad_path(golden: Path, backend: str) -> Path:
    if backend == DEFAULT:
        return golden.with_name(golden.name + ".bad")
    return golden.with_name(f"{golden.stem}.{backend}{golden.suffix}.bad")


def unified_diff(expected: str, obtained: str, expected_name: str, obtained_name: str) -> str:
    def lines(text: str) -> list[str]:
        result = text.splitlines(keepends=True)
        if result and not result[-1].endswith("\n"):
            result[-1] += "\n\\ No newline at end of file\n"
        return result

    return "".join(difflib.unified_diff(lines(expected), lines(obtained),
                                        fromfile=expected_name, tofile=obtained_name))


def first_difference(expected: str, obtained: str) -> int | None:
    """The 1-based line of `obtained` where it first departs from `expected`."""
    old, new = expected.splitlines(keepends=True), obtained.splitlines(keepends=True)
    for tag, _, _, j1, _ in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag != "equal":
            return min(j1 + 1, max(len(new), 1))
    return None


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_golden(file_regression: Any, obtained: str, golden: Path, bad: Path, *,
                 backend: str, explain_line: Callable[[int], str | None] | None = None) -> None:
    """Compare `obtained` with `golden` using the `file_regression` fixture.

    `explain_line(n)` may describe where line n of `obtained` came from; it
    is added to a mismatch report.
    """
    __tracebackhide__ = True
    config = file_regression.request.config
    regenerating = config.getoption("force_regen") or config.getoption("regen_all")
    golden.parent.mkdir(parents=True, exist_ok=True)
    if not golden.is_file() and not regenerating and backend != QEMU_BACKEND:
        bad.write_text(obtained, encoding="utf-8", newline="")
        raise GoldenMissing(
            f"{_display(golden)} does not exist. Goldens come from real QEMU: run "
            f"`make bless` (or pytest --backend qemu on this case) to write it. "
            f"This run's output is in {_display(bad)}.")

    def compare(obtained_file: Path, expected_file: Path) -> None:
        __tracebackhide__ = True
        got_bytes, want_bytes = obtained_file.read_bytes(), expected_file.read_bytes()
        if got_bytes == want_bytes:
            return
        got = got_bytes.decode("utf-8", "replace")
        want = want_bytes.decode("utf-8", "replace")
        report = [f"{_display(expected_file)} differs from this run's output "
                  f"(kept in {_display(obtained_file)}):", ""]
        report.append(unified_diff(want, got, _display(expected_file), _display(obtained_file)))
        line = first_difference(want, got)
        if line is not None and explain_line is not None:
            where = explain_line(line)
            if where:
                report += ["", f"first difference at line {line}: {where}"]
        raise GoldenMismatch("\n".join(report))

    try:
        file_regression.check(obtained, fullpath=golden, obtained_filename=bad,
                              check_fn=compare, encoding="utf-8", newline="")
    finally:
        if golden.is_file() and golden.read_bytes() == obtained.encode("utf-8"):
            bad.unlink(missing_ok=True)
