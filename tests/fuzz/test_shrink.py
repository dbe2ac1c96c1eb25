"""The reducer on its own, with predicates that need no backend: it keeps
the failure, reaches a small case, only ever moves to cheaper cases, and
respects its budgets."""

from __future__ import annotations

from harness.fuzz.generate import generate
from harness.fuzz.model import FuzzCase, Io, IoOp, Layer, Map, render
from harness.fuzz.shrink import cost, number_cost, rounder, shrink, variants, without_layer


def _ops(case: FuzzCase) -> list[IoOp]:
    return [op for step in case.steps if isinstance(step, Io) for op in step.ops]


def _has_unmapping_zero_write(case: FuzzCase) -> bool:
    return any(op.verb in ("write", "aio_write") and "-u" in op.flags for op in _ops(case))


def _first_case(predicate) -> FuzzCase:
    for index in range(500):
        case = generate(7, index)
        if predicate(case) and case.step_count() >= 8:
            return case
    raise AssertionError("no generated case fits")


def test_shrinks_to_the_one_operation_that_matters():
    case = _first_case(_has_unmapping_zero_write)
    result = shrink(case, _has_unmapping_zero_write)
    assert result.complete
    small = result.case
    assert _has_unmapping_zero_write(small)
    assert len(small.layers) == 1 and len(small.steps) == 1
    (op,) = _ops(small)
    # plainest form, roundest numbers (one default cluster), no create options
    assert (op.verb, op.flags, op.offset, op.lengths) == ("write", ("-z", "-u"), 0, (65536,))
    assert small.layers[0].cluster_size is None and not small.layers[0].options


def test_keeps_what_the_failure_needs():
    def needs_chain_and_unaligned_write(case: FuzzCase) -> bool:
        return len(case.layers) >= 2 and any(
            op.verb == "write" and op.offset is not None and op.offset % 512
            for op in _ops(case))

    case = _first_case(needs_chain_and_unaligned_write)
    small = shrink(case, needs_chain_and_unaligned_write).case
    assert len(small.layers) == 2 and len(small.steps) == 1
    (op,) = _ops(small)
    assert op.offset == 1  # the smallest offset that is still unaligned


def test_every_variant_is_cheaper_so_shrinking_ends():
    for index in range(40):
        case = generate(3, index)
        for variant in variants(case):
            assert cost(variant) < cost(case), (render(case), render(variant))
    case = generate(3, 11)
    seen = []

    def record(candidate: FuzzCase) -> bool:
        seen.append(cost(candidate))
        return True

    shrink(case, record)
    assert seen == sorted(seen, reverse=True)  # each accepted run is cheaper than the last


def test_budgets_stop_it():
    case = _first_case(_has_unmapping_zero_write)
    runs = []

    def count(candidate: FuzzCase) -> bool:
        runs.append(candidate)
        return False

    result = shrink(case, count, max_runs=5)
    assert len(runs) == 5 and not result.complete and result.case is case
    result = shrink(case, count, max_seconds=0)
    assert not result.complete


def test_dropping_a_layer_keeps_the_sizes_above_it():
    case = FuzzCase(layers=(Layer("base", size=1 << 20), Layer("mid"), Layer("test")),
                    steps=(Map("mid"), Map("test")))
    without_base = without_layer(case, 0)
    assert [(layer.name, layer.size) for layer in without_base.layers] == \
        [("base", 1 << 20), ("test", None)]
    assert [step.image for step in without_base.steps] == ["base", "test"]
    without_mid = without_layer(case, 1)
    assert [(layer.name, layer.size) for layer in without_mid.layers] == \
        [("base", 1 << 20), ("test", 1 << 20)]
    assert [step.image for step in without_mid.steps] == ["test"]


def test_rounder_values_are_cheaper_and_in_range():
    assert rounder(66049, 65536, 1)[:5] == [1, 512, 65536, 131072, 66048]
    for value in (1, 513, 4097, 65535, 70000, 1 << 30):
        for option in rounder(value, 4096, 1):
            assert option >= 1 and number_cost(option) < number_cost(value)
    assert rounder(0, 512, 0) == []
