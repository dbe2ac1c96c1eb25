"""The fuzz corpus: a committed set of generated cases (tests/fuzz/corpus.txt,
SEED INDEX per line) run on the engine and on real QEMU on every change, so
the corners the fuzzer reaches stay covered in CI at a small, fixed cost.
`make fuzz` runs the long, random version.

A line may end with `# known: REASON` for a disagreement already reported
and not yet fixed: that case is expected to fail (strictly, so that the
mark goes as soon as the fix lands).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.fuzz.compare import run_pair
from harness.fuzz.findings import reproduce_command
from harness.fuzz.generate import CORNERS, features, generate

CORPUS = Path(__file__).with_name("corpus.txt")


def _entries() -> list[tuple[int, int, str | None, int]]:
    """(seed, index, known disagreement or None, line number) per corpus line."""
    entries = []
    for number, line in enumerate(CORPUS.read_text().splitlines(), 1):
        text, _, comment = line.partition("#")
        if not text.strip():
            continue
        seed, index = (int(word) for word in text.split())
        known = comment.strip().removeprefix("known:").strip() \
            if comment.strip().startswith("known:") else None
        entries.append((seed, index, known, number))
    return entries


def _params() -> list:
    return [pytest.param(seed, index, id=f"{seed}-{index}",
                         marks=[pytest.mark.xfail(strict=True, reason=known)] if known else [])
            for seed, index, known, _ in _entries()]


def test_the_corpus_reaches_every_corner():
    reached = set().union(*(features(generate(seed, index)) for seed, index, *_ in _entries()))
    assert CORNERS - reached == set(), "pick the corpus again (see corpus.txt's header)"
    assert 30 <= len(_entries()) <= 60


@pytest.mark.parametrize("seed,index", _params())
def test_corpus_case_agrees_with_qemu(seed, index, engine, qemu):
    case = generate(seed, index)
    outcome = run_pair(case, engine, qemu, qemu, timeout=120)
    report = [f"{d.kind} of {d.step_kind}: {d.where}\n{d.diff('qemu', 'engine')}"
              for d in outcome.differences]
    assert outcome.agrees, (f"the engine disagrees with QEMU on {case.origin} (reproduce and "
                            f"shrink: {reproduce_command(case.origin)}):\n" + "\n".join(report))
