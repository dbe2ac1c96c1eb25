"""What the generator draws: the shapes QEMU allows, and every corner the
issue asks for, reached within a few hundred cases."""

from __future__ import annotations

from harness.fuzz.generate import CORNERS, covering_corpus, features, generate
from harness.fuzz.model import CHAIN_NAMES, Io, Map

CASES = [generate(99, index) for index in range(400)]

def test_every_corner_is_drawn():
    seen = set().union(*(features(case) for case in CASES))
    assert CORNERS - seen == set()


def test_a_covering_corpus_covers_what_its_range_does_with_few_cases():
    def reach(indices):
        return set().union(*(features(generate(99, index)) for index in indices))

    assert reach(covering_corpus(99, range(150), 25)) == reach(range(150))
    bigger = covering_corpus(99, range(150), 40)
    assert len(bigger) == 40 and set(covering_corpus(99, range(150), 25)) <= set(bigger)


def test_chains_are_what_qemu_allows():
    for case in CASES:
        assert 1 <= len(case.layers) <= 4
        assert tuple(layer.name for layer in case.layers) == CHAIN_NAMES[len(case.layers)]
        # a raw image has no backing file, so it can only be the base
        assert all(layer.format == "qcow2" for layer in case.layers[1:])
        assert case.layers[0].size is not None
        for layer in case.layers:
            if layer.format == "raw":
                assert layer.cluster_size is None and not layer.options
            elif layer.cluster_size is not None:
                assert 512 <= layer.cluster_size <= 2 * 1024 * 1024
                assert layer.cluster_size & (layer.cluster_size - 1) == 0


def test_steps_name_images_of_the_chain_and_keep_aio_ordered():
    for case in CASES:
        names = [layer.name for layer in case.layers]
        assert 1 <= len(case.steps) <= 20
        for step in case.steps:
            assert step.image in names
            if isinstance(step, Io | Map) and step.cut_backing:
                assert step.image != names[0]  # only an overlay has a backing file to cut
            if isinstance(step, Io):
                commands = [c for op in step.ops for c in op.commands()]
                for position, command in enumerate(commands):
                    if command.startswith(("aio_read", "aio_write")):
                        assert commands[position + 1] == "aio_flush"


def test_requests_stay_small_enough_to_run_quickly():
    for case in CASES:
        for step in case.steps:
            if isinstance(step, Io):
                for op in step.ops:
                    assert sum(op.lengths) <= 2 * 1024 * 1024
                    if "-v" in op.flags:
                        assert sum(op.lengths) <= 4096
