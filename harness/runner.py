"""Run a case on a backend and build its transcript, as qemu-iotests would.

The transcript is `QA output created by NNN`, then each step's output (a
command's stdout through its filters, its stderr merged into them or passed
around them), then `*** done`. Each case runs in a fresh temporary
directory of its own, removed afterwards. The runner knows nothing about
the backend beyond its one `run` method.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from harness import filters
from harness.backends.base import Backend, Result
from harness.filters import FilterContext
from harness.schema import Case, Command, Echo, Remove

Step = Echo | Command | Remove


@dataclass(frozen=True)
class Piece:
    """The text one step added to the transcript (step None: header/footer).

    `result` is what a command step's process printed, unfiltered, and its
    exit status; None for other steps."""

    step: Step | None
    text: str
    result: Result | None = None


@dataclass(frozen=True)
class Transcript:
    case: Case
    pieces: tuple[Piece, ...]

    @property
    def text(self) -> str:
        return "".join(piece.text for piece in self.pieces)

    def step_at_line(self, number: int) -> Step | None:
        """The step whose output holds line `number` (1-based) of the text."""
        seen = 0
        for piece in self.pieces:
            seen += piece.text.count("\n")
            if seen >= number:
                return piece.step
        return None


def header(case: Case) -> str:
    return f"QA output created by {case.seq}\n"


FOOTER = "*** done\n"


def run_case(case: Case, backend: Backend, *, tmp_root: str | None = None,
             directory: str | None = None) -> Transcript:
    """Run every step of `case` on `backend` in a new directory under
    `tmp_root` (the system's temporary folder by default), removed afterwards.

    With `directory` (an existing, empty folder, given without a trailing
    slash) the case runs there instead and its images are left behind."""
    test_dir = directory if directory is not None else \
        tempfile.mkdtemp(prefix=f"harness-{case.seq}-", dir=tmp_root)
    context = FilterContext(test_dir=test_dir, imgfmt=case.format)
    pieces = [Piece(None, header(case))]
    try:
        for step in case.steps:
            pieces.append(run_step(step, backend, context))
    finally:
        if directory is None:
            shutil.rmtree(test_dir, ignore_errors=True)
    pieces.append(Piece(None, FOOTER))
    return Transcript(case, tuple(pieces))


def run_step(step: Step, backend: Backend, context: FilterContext) -> Piece:
    if isinstance(step, Command):
        result = backend.run(step.tool, step.argv(context.test_dir), cwd=context.test_dir,
                             merge_stderr=step.merge_stderr)
        text = result.stderr + filters.apply(step.filters, result.stdout, context)
        return Piece(step, text, result)
    if isinstance(step, Echo):
        return Piece(step, step.text + "\n")
    try:
        os.remove(os.path.join(context.test_dir, step.file))
    except FileNotFoundError:
        pass
    return Piece(step, "")
