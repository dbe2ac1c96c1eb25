"""Shrink a failing case to a small one that still fails the same way.

A greedy reducer in the spirit of delta debugging: it proposes simpler
variants of the current case, in passes from coarse to fine, and keeps the
first variant for which the test still fails; it stops when no variant is
kept (a local minimum) or a run or time budget is spent.

The passes: drop runs of steps (halves, quarters, ... single steps), drop a
layer of the chain (the layers above keep their sizes), drop a qemu-io
operation, make an operation plainer (aio and vectored forms to plain
reads and writes, flags dropped), make numbers smaller and rounder
(offsets, lengths and sizes towards 0, a cluster, a sector, or the nearest
cluster or sector boundary), cluster sizes back to QEMU's default, create
options dropped, and map/check/info steps to their plain forms.

Every variant must be strictly simpler by `cost`, so the reduction ends
whatever the test says; variants already tried are never run again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from harness.fuzz.model import (
    AIO_VERBS,
    CHAIN_NAMES,
    SECTOR,
    Check,
    FuzzCase,
    FuzzStep,
    Info,
    Io,
    IoOp,
    Layer,
    Map,
    render,
)

RAW_GRAIN = 4096

# qemu-io forms and what each becomes when made plainer
_PLAINER_VERB = {"aio_write": "write", "aio_read": "read", "writev": "write", "readv": "read"}
# operation verbs from simplest to most involved, for the cost
_VERB_RANK = {"write": 0, "read": 1, "discard": 1, "alloc": 2, "map": 2, "length": 2,
              "info": 2, "flush": 2, "writev": 3, "readv": 3, "aio_write": 4, "aio_read": 4}


@dataclass(frozen=True)
class ShrinkResult:
    case: FuzzCase
    runs: int  # how many variants were tested
    accepted: int  # how many of them were kept
    seconds: float
    complete: bool  # False when a budget ran out before a local minimum


def number_cost(value: int) -> int:
    """Rounder and smaller is cheaper: 0, then multiples of 64k, 4k, 512, then
    anything; within one roundness, smaller values."""
    if value == 0:
        level = 0
    elif value % 65536 == 0:
        level = 1
    elif value % 4096 == 0:
        level = 2
    elif value % SECTOR == 0:
        level = 3
    else:
        level = 4
    return (level << 48) + value


def cost(case: FuzzCase) -> tuple[int, ...]:
    """How involved a case is; every accepted variant makes this smaller."""
    ops = [op for step in case.steps if isinstance(step, Io) for op in step.ops]
    layer_numbers = sum(number_cost(layer.size) for layer in case.layers
                        if layer.size is not None)
    op_numbers = sum(number_cost(value) for op in ops
                     for value in ((op.offset or 0), *op.lengths))
    step_numbers = sum(number_cost(value) for step in case.steps if isinstance(step, Map)
                       for value in (step.start or 0, step.length or 0))
    step_forms = sum(_step_form_cost(step) for step in case.steps)
    op_forms = sum(_VERB_RANK.get(op.verb, 5) * 16 + len(op.lengths) * 4 + len(op.flags)
                   for op in ops)
    layer_forms = sum((layer.cluster_size is not None) + len(layer.options) * 2
                      + (layer.size is not None) for layer in case.layers)
    return (len(case.layers), len(case.steps), len(ops), op_forms + step_forms + layer_forms,
            layer_numbers + op_numbers + step_numbers)


def _step_form_cost(step: FuzzStep) -> int:
    if isinstance(step, Io):
        return int(step.cut_backing)
    if isinstance(step, Map):
        return (step.human + (step.start is not None) + (step.length is not None)
                + step.cut_backing)
    if isinstance(step, Check):
        return int(step.json)
    if isinstance(step, Info):
        return step.backing_chain + step.json
    return 0


def shrink(case: FuzzCase, still_fails: Callable[[FuzzCase], bool], *,
           max_runs: int = 400, max_seconds: float = 300.0) -> ShrinkResult:
    """The smallest case this reducer reaches from `case` for which
    `still_fails` holds (it is assumed to hold for `case` itself)."""
    started = time.monotonic()
    current = case
    tried = {render(case)}
    runs = accepted = 0
    progress = True
    while progress:
        progress = False
        current_cost = cost(current)
        for candidate in variants(current):
            if runs >= max_runs or time.monotonic() - started > max_seconds:
                return ShrinkResult(current, runs, accepted, time.monotonic() - started, False)
            text = render(candidate)
            if text in tried or cost(candidate) >= current_cost:
                continue
            tried.add(text)
            runs += 1
            if still_fails(candidate):
                current = candidate
                accepted += 1
                progress = True
                break
    return ShrinkResult(current, runs, accepted, time.monotonic() - started, True)


def variants(case: FuzzCase) -> Iterator[FuzzCase]:
    """Simpler cases than `case`, coarse changes first."""
    yield from _drop_steps(case)
    yield from _drop_layers(case)
    yield from _drop_ops(case)
    yield from _plainer_ops(case)
    yield from _plainer_steps(case)
    yield from _plainer_layers(case)
    yield from _smaller_numbers(case)


def _drop_steps(case: FuzzCase) -> Iterator[FuzzCase]:
    steps = case.steps
    chunk = len(steps)
    while chunk >= 1:
        for start in range(0, len(steps), chunk):
            yield case.with_steps(steps[:start] + steps[start + chunk:])
        chunk //= 2


def without_layer(case: FuzzCase, index: int) -> FuzzCase:
    """The case with layer `index` gone: the layer above it is backed by the
    one below, keeps its virtual size, and the steps on the dropped layer go.
    Layers are renamed by their new position (the top is always `test`)."""
    kept = [layer for position, layer in enumerate(case.layers) if position != index]
    names = CHAIN_NAMES[len(kept)]
    renamed: dict[str, str] = {}
    layers = []
    for position, layer in enumerate(kept):
        size = layer.size
        if size is None and (position == 0 or case.layers.index(layer) == index + 1):
            size = case.virtual_size(layer.name)
        renamed[layer.name] = names[position]
        layers.append(replace(layer, name=names[position], size=size))
    bottom = layers[0].name
    steps = tuple(replace(step, image=renamed[step.image]) for step in case.steps
                  if step.image in renamed)
    # an image opened without its backing file needs one to leave out
    steps = tuple(replace(step, cut_backing=False)
                  if isinstance(step, Io | Map) and step.image == bottom else step
                  for step in steps)
    return replace(case, layers=tuple(layers), steps=steps)


def _drop_layers(case: FuzzCase) -> Iterator[FuzzCase]:
    if len(case.layers) < 2:
        return
    for index in range(len(case.layers)):
        yield without_layer(case, index)


def _replace_step(case: FuzzCase, index: int, step: FuzzStep) -> FuzzCase:
    return case.with_steps(case.steps[:index] + (step,) + case.steps[index + 1:])


def _replace_op(case: FuzzCase, index: int, op_index: int, op: IoOp) -> FuzzCase:
    step = case.steps[index]
    assert isinstance(step, Io)
    ops = step.ops[:op_index] + (op,) + step.ops[op_index + 1:]
    return _replace_step(case, index, replace(step, ops=ops))


def _drop_ops(case: FuzzCase) -> Iterator[FuzzCase]:
    for index, step in enumerate(case.steps):
        if isinstance(step, Io) and len(step.ops) > 1:
            for op_index in range(len(step.ops)):
                ops = step.ops[:op_index] + step.ops[op_index + 1:]
                yield _replace_step(case, index, replace(step, ops=ops))


def _plainer_forms(op: IoOp) -> Iterator[IoOp]:
    if op.verb in _PLAINER_VERB:
        verb = _PLAINER_VERB[op.verb]
        if op.verb in AIO_VERBS:
            yield replace(op, verb=verb)
        elif op.lengths:
            yield replace(op, verb=verb, lengths=(sum(op.lengths),))
    if len(op.lengths) > 1:
        yield replace(op, lengths=(sum(op.lengths),))
    flags = list(op.flags)
    if "-s" in flags:  # read's partial pattern check: -s OFF -l LEN
        at = flags.index("-s")
        yield replace(op, flags=tuple(flags[:at] + flags[at + 4:]))
    for flag in ("-c", "-f", "-q", "-n", "-u"):
        if flag in flags:
            yield replace(op, flags=tuple(f for f in flags if f != flag))
    if "-v" in flags:
        yield replace(op, flags=tuple(f for f in flags if f != "-v"), pattern=0)
    if op.verb == "alloc" and op.lengths:
        yield replace(op, lengths=())


def _plainer_ops(case: FuzzCase) -> Iterator[FuzzCase]:
    for index, step in enumerate(case.steps):
        if isinstance(step, Io):
            for op_index, op in enumerate(step.ops):
                for plainer in _plainer_forms(op):
                    yield _replace_op(case, index, op_index, plainer)


def _plainer_steps(case: FuzzCase) -> Iterator[FuzzCase]:
    for index, step in enumerate(case.steps):
        if isinstance(step, Io | Map) and step.cut_backing:
            yield _replace_step(case, index, replace(step, cut_backing=False))
        if isinstance(step, Map):
            if step.start is not None or step.length is not None:
                yield _replace_step(case, index, replace(step, start=None, length=None))
            if step.human:
                yield _replace_step(case, index, replace(step, human=False))
        elif isinstance(step, Check) and step.json:
            yield _replace_step(case, index, replace(step, json=False))
        elif isinstance(step, Info):
            if step.backing_chain:
                yield _replace_step(case, index, replace(step, backing_chain=False))
            if step.json:
                yield _replace_step(case, index, replace(step, json=False))


def _replace_layer(case: FuzzCase, index: int, layer: Layer) -> FuzzCase:
    return replace(case, layers=case.layers[:index] + (layer,) + case.layers[index + 1:])


def _plainer_layers(case: FuzzCase) -> Iterator[FuzzCase]:
    for index, layer in enumerate(case.layers):
        if layer.cluster_size is not None:
            yield _replace_layer(case, index, replace(layer, cluster_size=None))
        for option in layer.options:
            kept = tuple(other for other in layer.options if other != option)
            yield _replace_layer(case, index, replace(layer, options=kept))
        if index and layer.size is not None:
            yield _replace_layer(case, index, replace(layer, size=None))


def rounder(value: int, grain: int, minimum: int) -> list[int]:
    """Values to try instead of `value`, cheaper by number_cost and at least
    `minimum`: the smallest first, then halfway, three quarters of the way
    and so on towards `value` (each also rounded down to the grain and to a
    sector), so that a number that can shrink a lot does so in few runs."""
    options = [minimum, 0, SECTOR, grain]
    for unit in (grain, SECTOR):
        options += [value - value % unit, value - value % unit + unit]
    shift = 1
    while value >> shift:
        smaller = value - (value >> shift)
        options += [smaller - smaller % grain, smaller - smaller % SECTOR, smaller]
        shift += 1
    options += [value - grain, value - SECTOR, value - 1]
    seen: list[int] = []
    for option in options:
        if option >= minimum and option not in seen and number_cost(option) < number_cost(value):
            seen.append(option)
    return seen


def _grain(case: FuzzCase, image: str) -> int:
    layer = case.layer(image)
    return RAW_GRAIN if layer.format == "raw" else case.cluster_size(image)


def _smaller_numbers(case: FuzzCase) -> Iterator[FuzzCase]:
    # requests first: an image can only shrink once nothing reaches its end
    for index, step in enumerate(case.steps):
        grain = _grain(case, step.image)
        if isinstance(step, Io):
            for op_index, op in enumerate(step.ops):
                if op.offset is not None:
                    for offset in rounder(op.offset, grain, 0):
                        yield _replace_op(case, index, op_index, replace(op, offset=offset))
                for position, length in enumerate(op.lengths):
                    for smaller in rounder(length, grain, 1):
                        if "-c" in op.flags and smaller > max(length, grain):
                            continue  # see generate.write_compressed: one cluster at most
                        lengths = op.lengths[:position] + (smaller,) + op.lengths[position + 1:]
                        yield _replace_op(case, index, op_index, replace(op, lengths=lengths))
        elif isinstance(step, Map):
            if step.start is not None:
                for start in rounder(step.start, grain, 0):
                    yield _replace_step(case, index, replace(step, start=start))
            if step.length is not None:
                for length in rounder(step.length, grain, 0):
                    yield _replace_step(case, index, replace(step, length=length))
    for index, layer in enumerate(case.layers):
        if layer.size is not None:
            for size in rounder(layer.size, _grain(case, layer.name), SECTOR):
                yield _replace_layer(case, index, replace(layer, size=size))
