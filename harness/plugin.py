"""The pytest side of the harness: collect cases, run them, report.

The repository's conftest.py loads this plugin. Every `cases/NNN-name.yaml`
becomes one item per selected backend, `NNN[backend]`, so `pytest
cases/154*.yaml`, `-k`, `-x` and `-n auto` behave as usual. The file is
parsed and expanded once, at collection; an invalid case fails collection
with `file:line: message`. The cases folder also holds one more item,
`goldens-have-cases`, which fails for a golden that no case produces.

Options: `--backend engine|cli|qemu|all` (or a comma list; default engine)
and `--case-report` (end with the case/backend/result/time table).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

from harness.backends import DEFAULT, BackendError, get_backend, parse_backends
from harness.golden import GoldenMismatch, GoldenMissing, bad_path, check_golden
from harness.loader import CASE_FILE_NAME, load_case
from harness.report import BACKEND_PROPERTY, CASE_PROPERTY, CaseReport
from harness.runner import Transcript, run_case
from harness.schema import Case, CaseError, Command

BACKENDS_KEY = pytest.StashKey[list[str]]()
CASES_DIR = "cases"
GOLDEN_DIR = "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "golden-output cases (cases/*.yaml)")
    group.addoption("--backend", default=DEFAULT, metavar="NAME",
                    help="run cases on engine (default, in-process), cli (pyqemu-* "
                         "processes), qemu (real QEMU), a comma list, or all")
    group.addoption("--case-report", action="store_true", default=False,
                    help="end with a table of case, backend, result and time")


def pytest_configure(config: pytest.Config) -> None:
    try:
        names = parse_backends(config.getoption("backend"))
    except ValueError as error:
        raise pytest.UsageError(f"--backend: {error}") from None
    regenerating = config.getoption("force_regen", False) or config.getoption("regen_all", False)
    if regenerating and len(names) > 1:
        raise pytest.UsageError("--force-regen/--regen-all write goldens from one backend; "
                                "choose it with --backend NAME (make bless uses qemu)")
    config.stash[BACKENDS_KEY] = names
    if config.getoption("case_report"):
        config.pluginmanager.register(CaseReport(names), "harness-case-report")


def cases_dir(config: pytest.Config) -> Path:
    return config.rootpath / CASES_DIR


def golden_dir(config: pytest.Config) -> Path:
    return config.rootpath / GOLDEN_DIR


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path == cases_dir(parent.config):
        return CasesDir.from_parent(parent, path=path)
    return None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".yaml" and file_path.parent == cases_dir(parent.config):
        return CaseFile.from_parent(parent, path=file_path)
    return None


class CasesDir(pytest.Dir):
    """The cases folder: its case files, then the orphan-golden check."""

    def collect(self) -> Any:
        yield from super().collect()
        yield GoldensHaveCases.from_parent(self, name="goldens-have-cases")


class CaseFile(pytest.Module):
    """One case file. A Module, so that module-scoped fixtures (which
    pytest-regressions uses) have a node to live on; there is no Python
    module behind it."""

    def _getobj(self) -> types.ModuleType:
        return types.ModuleType(self.path.stem)

    def collect(self) -> Any:
        case = load_case(self.path)
        for other in sorted(self.path.parent.glob(f"{case.seq}-*.yaml")):
            if other != self.path:
                raise CaseError(self.path, 1, f"case number {case.seq} is also used by "
                                              f"{other.name}; each case needs its own "
                                              "(it names the golden file)")
        for backend in self.config.stash[BACKENDS_KEY]:
            item = CaseItem.from_parent(self, name=f"{case.seq}[{backend}]",
                                        callobj=run_case_item)
            item.case = case
            item.backend_name = backend
            item.user_properties += [(CASE_PROPERTY, case.name), (BACKEND_PROPERTY, backend)]
            reason = get_backend(backend).unavailable()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"{backend} backend: {reason}"))
            yield item

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> Any:
        error = excinfo.value
        if isinstance(error, CaseError):
            shown = Path(error.path)
            if shown.is_absolute() and shown.is_relative_to(self.config.rootpath):
                shown = shown.relative_to(self.config.rootpath)
            return f"{shown}:{error.line}: {error.message}"
        return super().repr_failure(excinfo)


_PLAIN_FAILURES = (GoldenMismatch, GoldenMissing, BackendError, pytest.fail.Exception)


class CaseItem(pytest.Function):
    """One case on one backend."""

    case: Case
    backend_name: str

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"{self.case.name} on {self.backend_name}"

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> Any:
        if isinstance(excinfo.value, _PLAIN_FAILURES):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


def run_case_item(file_regression: Any, request: pytest.FixtureRequest) -> None:
    """Run the item's case on its backend and compare with the golden file."""
    item = request.node
    assert isinstance(item, CaseItem)
    backend = get_backend(item.backend_name)
    transcript = run_case(item.case, backend)
    golden = golden_dir(request.config) / item.case.golden_name
    check_golden(file_regression, transcript.text, golden, bad_path(golden, backend.name),
                 backend=backend.name, explain_line=lambda n: explain(transcript, n))


def explain(transcript: Transcript, line: int) -> str | None:
    """Which step of the case printed `line` of the transcript."""
    step = transcript.step_at_line(line)
    if step is None:
        return "the transcript's header or footer"
    where = step.where(transcript.case.path.name)
    if isinstance(step, Command):
        return f"{where}: {step.display()}"
    return where


class GoldensHaveCases(pytest.Item):
    """Fails when golden/ holds an NNN.out that no cases/NNN-*.yaml produces."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user_properties += [(CASE_PROPERTY, "(golden files)"), (BACKEND_PROPERTY, "-")]

    def runtest(self) -> None:
        seqs = {match.group("seq") for path in cases_dir(self.config).glob("*.yaml")
                if (match := CASE_FILE_NAME.fullmatch(path.name))}
        golden = golden_dir(self.config)
        orphans = sorted(path.name for path in golden.glob("*.out") if path.stem not in seqs)
        if orphans:
            raise OrphanGoldens(
                f"no case in {CASES_DIR}/ produces these goldens: "
                + ", ".join(f"{GOLDEN_DIR}/{name}" for name in orphans)
                + " (add cases/NNN-name.yaml for each, or delete the file)")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> Any:
        if isinstance(excinfo.value, OrphanGoldens):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, "every golden file has a case"


class OrphanGoldens(AssertionError):
    pass
