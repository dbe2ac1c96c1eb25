"""The table `make check` ends with: case, backend, result, time.

Case items carry their case and backend as pytest user properties, which
pytest-xdist sends back to the controlling process with each report, so the
table is the same with or without `-n`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

CASE_PROPERTY = "harness_case"
BACKEND_PROPERTY = "harness_backend"

_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


@dataclass
class Row:
    case: str
    backend: str
    result: str = "passed"
    time: float = 0.0


class CaseReport:
    """Collects one row per case item from the run's reports."""

    def __init__(self, backend_order: list[str]) -> None:
        self.backend_order = backend_order
        self.rows: dict[str, Row] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        properties = dict(report.user_properties)
        if CASE_PROPERTY not in properties:
            return
        row = self.rows.setdefault(report.nodeid, Row(str(properties[CASE_PROPERTY]),
                                                      str(properties[BACKEND_PROPERTY])))
        if report.when == "call":
            row.time = report.duration
        result = report.outcome
        if report.failed and report.when != "call":
            result = "error"
        if _RANK[result] > _RANK[row.result]:
            row.result = result

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        # A case file that fails to load has no items; it still gets a row,
        # so the table accounts for every case.
        path = report.nodeid.split("::")[0]
        if report.failed and path.endswith(".yaml"):
            name = path.rsplit("/", 1)[-1].removesuffix(".yaml")
            self.rows[report.nodeid] = Row(name, "-", "error")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.rows:
            return
        terminalreporter.section("cases")
        for line in format_table(sorted(self.rows.values(), key=self._order)):
            terminalreporter.write_line(line)

    def _order(self, row: Row) -> tuple[str, int]:
        position = (self.backend_order.index(row.backend)
                    if row.backend in self.backend_order else len(self.backend_order))
        return row.case, position


def format_table(rows: list[Row]) -> list[str]:
    """The rows as aligned text lines, with a heading and a count at the end."""
    header = ("case", "backend", "result", "time")
    cells = [(row.case, row.backend, row.result, f"{row.time:.2f}s") for row in rows]
    widths = [max(len(str(column)) for column in columns)
              for columns in zip(header, *cells, strict=False)]
    lines = ["  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True))
             .rstrip() for line in (header, *cells)]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.result] = counts.get(row.result, 0) + 1
    lines.append(", ".join(f"{counts[result]} {result}" for result in _RANK if result in counts))
    return lines
