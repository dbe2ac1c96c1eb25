"""Run one generated case on two backends and find where they part.

The case is rendered to its case file text and loaded by the harness's own
loader, then run by the harness's runner once on the backend under test
(the engine, by default) and once on the reference (real QEMU), each in a
directory of its own that is kept until the comparison is done. The two
directories have names of the same length, so that paths stored in image
headers take the same room and host offsets can be compared.

What is compared, step by step and then on the images left behind:

- `output`: each step's filtered output, as the golden would hold it;
- `crash`: the same, when the tested side died with a Python traceback;
- `status`: each process's exit status;
- `unfiltered`: each step's output with only what differs between any two
  runs hidden (the directory, qemu-io timings, disk usage): host offsets,
  check statistics, create options;
- `contents`: every image, with its backing chain, through real
  `qemu-img compare -s` (guest data and allocation status);
- `check`: real `qemu-img check` of every qcow2 image of both runs;
- `files`: (optional) the image files byte for byte.

Everything printed is compared with each run's directory replaced by
TEST_DIR, so only differences that do not come from where a case ran count.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from harness import filters
from harness.backends.base import Backend, Result
from harness.filters import FilterContext
from harness.fuzz.model import REVEAL_FILTERS, FuzzCase
from harness.fuzz.model import render as render_case
from harness.golden import unified_diff
from harness.loader import load_case_text
from harness.runner import Piece, Transcript, run_case
from harness.schema import QEMU_IMG, Case, Command

# the number generated cases carry while they are fuzzed (it only appears in
# the transcript's first line, the same on both sides)
FUZZ_SEQ = "0"
TRACEBACK = "Traceback (most recent call last)"

KINDS = ("output", "crash", "status", "unfiltered", "contents", "check", "files", "timeout")


@dataclass(frozen=True)
class Difference:
    """One place where the tested backend and the reference disagree."""

    kind: str  # one of KINDS
    where: str  # the step's command line or the image's name, for people
    step_kind: str  # create, io, map, check, info, or image
    reference: str  # what the reference printed (or said about its image)
    tested: str  # what the tested backend printed (or said about its image)
    step_index: int | None = None  # into the rendered steps: creates first
    image: str | None = None

    @property
    def signature(self) -> tuple[str, str]:
        """What must stay the same while shrinking: the kind of the
        disagreement and the kind of step (or image check) that shows it."""
        return (self.kind, self.step_kind)

    def diff(self, reference_name: str, tested_name: str) -> str:
        return unified_diff(self.reference, self.tested, reference_name, tested_name)

    @property
    def detail(self) -> str:
        """The first differing line, numbers blotted out: disagreements with
        the same signature and detail are most likely one bug."""
        for line in self.diff("reference", "tested").splitlines()[2:]:
            if line[:1] in "+-":
                line = line[0] + " " + " ".join(line[1:].split())
                return re.sub(r"[0-9]+", "N", line)[:100]
        return ""


@dataclass
class Outcome:
    """The result of running one case on both backends."""

    case: FuzzCase
    text: str  # the rendered case file
    differences: list[Difference] = field(default_factory=list)
    reference_transcript: str = ""
    tested_transcript: str = ""
    seconds: float = 0.0

    @property
    def agrees(self) -> bool:
        return not self.differences

    @property
    def first(self) -> Difference:
        return self.differences[0]


class CaseTimeout(BaseException):
    """A case ran past its time limit. A BaseException, so that the engine
    backend (which turns an Exception into a traceback) lets it through."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CaseTimeout in this thread after `seconds` (only the main thread
    can take signals; elsewhere there is no limit)."""
    if not seconds or not hasattr(signal, "setitimer") or \
            threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise CaseTimeout(f"the case ran longer than {seconds:g} seconds")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_fuzz_case(case: FuzzCase, text: str | None = None) -> Case:
    """The harness Case of a generated case, through the ordinary loader."""
    text = render_case(case) if text is None else text
    return load_case_text(text, Path(f"{FUZZ_SEQ}-fuzz.yaml"))


def run_pair(case: FuzzCase, tested: Backend, reference: Backend, qemu: Backend, *,
             compare_files: bool = False, timeout: float | None = None,
             tmp_root: str | None = None) -> Outcome:
    """Run `case` on both backends and compare everything (see the module doc).

    `qemu` runs the image checks (`qemu-img compare` and `check`): real QEMU,
    whatever the two backends are."""
    text = render_case(case)
    loaded = load_fuzz_case(case, text)
    outcome = Outcome(case=case, text=text)
    started = time.monotonic()
    root = tempfile.mkdtemp(prefix="harness-fuzz-", dir=tmp_root)
    tested_dir, reference_dir = os.path.join(root, "t"), os.path.join(root, "r")
    os.mkdir(tested_dir)
    os.mkdir(reference_dir)
    try:
        with time_limit(timeout):
            tested_run = run_case(loaded, tested, directory=tested_dir)
            reference_run = run_case(loaded, reference, directory=reference_dir)
            outcome.tested_transcript = _normalise(tested_run.text, tested_dir)
            outcome.reference_transcript = _normalise(reference_run.text, reference_dir)
            outcome.differences += compare_steps(case, tested_run, reference_run,
                                                 tested_dir, reference_dir)
            outcome.differences += compare_images(case, loaded, qemu, tested_dir,
                                                  reference_dir, compare_files=compare_files)
    except CaseTimeout as expired:
        outcome.differences.append(Difference("timeout", "the whole case", "case",
                                              "", str(expired) + "\n"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    outcome.seconds = time.monotonic() - started
    return outcome


def _normalise(text: str, directory: str) -> str:
    return text.replace(directory, "TEST_DIR")


def step_names(case: FuzzCase) -> list[tuple[str, str]]:
    """(kind, image) of each rendered step: the creates, then the steps."""
    return [("create", layer.name) for layer in case.layers] + \
        [(step.kind, step.image) for step in case.steps]


def _reveal(command: Command, result: Result, kind: str, directory: str,
            imgfmt: str) -> str:
    context = FilterContext(test_dir=directory, imgfmt=imgfmt)
    shown = filters.apply(REVEAL_FILTERS[kind], result.stdout, context)
    return _normalise(result.stderr + shown, directory)


def compare_steps(case: FuzzCase, tested: Transcript, reference: Transcript,
                  tested_dir: str, reference_dir: str) -> list[Difference]:
    """Step by step, the first way each step differs (at most one per step)."""
    differences = []
    names = step_names(case)
    step_pieces = zip(tested.pieces[1:-1], reference.pieces[1:-1], strict=True)
    for index, (mine, theirs) in enumerate(step_pieces):
        kind, image = names[index]
        step = mine.step
        where = step.display() if isinstance(step, Command) else f"step {index + 1}"
        difference = _step_difference(mine, theirs, kind, tested_dir, reference_dir,
                                      case.format)
        if difference is not None:
            what, ours, reference_text = difference
            differences.append(Difference(what, where, kind, reference_text, ours,
                                          step_index=index, image=image))
    return differences


def _step_difference(mine: Piece, theirs: Piece, kind: str, tested_dir: str,
                     reference_dir: str, imgfmt: str) -> tuple[str, str, str] | None:
    ours = _normalise(mine.text, tested_dir)
    reference_text = _normalise(theirs.text, reference_dir)
    if ours != reference_text:
        return ("crash" if TRACEBACK in ours else "output", ours, reference_text)
    if mine.result is None or theirs.result is None or not isinstance(mine.step, Command):
        return None
    if mine.result.status != theirs.result.status:
        return ("status", ours + f"[exit status {mine.result.status}]\n",
                reference_text + f"[exit status {theirs.result.status}]\n")
    ours = _reveal(mine.step, mine.result, kind, tested_dir, imgfmt)
    reference_text = _reveal(theirs.step, theirs.result, kind, reference_dir, imgfmt)
    if ours != reference_text:
        return ("unfiltered", ours, reference_text)
    return None


def compare_images(case: FuzzCase, loaded: Case, qemu: Backend, tested_dir: str,
                   reference_dir: str, *, compare_files: bool = False) -> list[Difference]:
    """Each image of the chain as real QEMU sees it after both runs."""
    differences = []
    for layer in case.layers:
        image = loaded.images[layer.name]
        tested_file = os.path.join(tested_dir, image.file)
        reference_file = os.path.join(reference_dir, image.file)
        exists = (os.path.exists(tested_file), os.path.exists(reference_file))
        if exists != (True, True):
            if exists != (False, False):
                differences.append(Difference(
                    "files", image.file, "image", _presence(exists[1]), _presence(exists[0]),
                    image=layer.name))
            continue
        compared = qemu.run(QEMU_IMG, ["compare", "-s", "-f", layer.format, "-F", layer.format,
                                       tested_file, reference_file],
                            cwd=tested_dir, merge_stderr=True)
        if compared.status != 0:
            said = compared.stdout.replace(tested_file, "TESTED/" + image.file)
            said = said.replace(reference_file, "REFERENCE/" + image.file)
            differences.append(Difference(
                "contents", image.file, "image", "Images are identical.\n", said,
                image=layer.name))
        if layer.format == "qcow2":
            checks = [qemu.run(QEMU_IMG, ["check", "-f", layer.format, path],
                               cwd=directory, merge_stderr=True)
                      for path, directory in ((tested_file, tested_dir),
                                              (reference_file, reference_dir))]
            ours = _normalise(checks[0].stdout, tested_dir) + f"[exit status {checks[0].status}]\n"
            theirs = _normalise(checks[1].stdout, reference_dir) + \
                f"[exit status {checks[1].status}]\n"
            if ours != theirs:
                differences.append(Difference("check", f"qemu-img check {image.file}",
                                              "image", theirs, ours, image=layer.name))
        if compare_files:
            difference = _file_difference(tested_file, reference_file,
                                          tested_dir.encode(), reference_dir.encode())
            if difference is not None:
                differences.append(Difference("files", image.file, "image",
                                              "the same bytes\n", difference,
                                              image=layer.name))
    return differences


def _presence(exists: bool) -> str:
    return "the file exists\n" if exists else "no such file\n"


def _file_difference(first: str, second: str, first_dir: bytes,
                     second_dir: bytes) -> str | None:
    """Where two image files first differ, counting a backing file name that
    differs only by the run's directory as the same (the directories have
    names of the same length, so nothing after them moves)."""
    with open(first, "rb") as one, open(second, "rb") as two:
        left, right = one.read(), two.read()
    left = left.replace(first_dir, second_dir)
    if left == right:
        return None
    for index, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return f"first different byte at offset {index}\n"
    return f"sizes differ: {len(left)} bytes here, {len(right)} in the reference\n"
