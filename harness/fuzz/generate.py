"""Random cases, reproducible from a seed and an index.

`generate(seed, index)` draws one FuzzCase from its own random stream
(seeded with the text "SEED:INDEX", so any single case can be made again
without the ones before it). The draws lean towards the corners where a
block layer goes wrong: small and odd cluster sizes, chains of one to four
layers with a raw image at the bottom (a raw image cannot have a backing
file, so it is only ever the base), overlays shorter or longer than their
backing files, image sizes that end inside a cluster or a sector, requests
that start or end inside clusters, sit on a layer's end or run past it, and
every qemu-io form the engine supports for writing (plain, FUA,
compressed), zeroing (with and without unmap), discarding and reading, synchronous, vectored and aio,
between qemu-io/qemu-img map, alloc, check and info steps; qemu-img map
and qemu-io also open overlays alone (`"backing": null`), where what a layer
leaves to its backing file is not `present`.

`features(case)` names what a case exercises; the committed corpus test
uses it to show that its few seeds still cover every kind of draw.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from harness.fuzz.model import (
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
)

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# (cluster size, weight): small clusters put many cluster boundaries inside
# small requests; 64k is QEMU's default; 2M is the largest QEMU allows.
CLUSTER_SIZES = ((512, 4), (1 * KIB, 2), (2 * KIB, 2), (4 * KIB, 4), (8 * KIB, 1),
                 (16 * KIB, 1), (32 * KIB, 1), (64 * KIB, 3), (128 * KIB, 1), (256 * KIB, 1),
                 (2 * MIB, 1))
IMAGE_SIZES = (4 * KIB, 16 * KIB, 64 * KIB, 128 * KIB, 192 * KIB, 256 * KIB, 512 * KIB,
               1 * MIB, 2 * MIB, 4 * MIB)
SPARSE_SIZES = (64 * MIB, 256 * MIB, 1 * GIB, 4 * GIB)
# the largest L1 table a generated image may need, which bounds the work of
# creating sparse images with small clusters
MAX_L1_BYTES = 64 * KIB
RAW_GRAIN = 4 * KIB  # the alignment raw requests are drawn around (a page)
MAX_REQUEST = 2 * MIB
MAX_DUMP = 4 * KIB  # read -v prints 16 bytes a line; keep transcripts short


def generate(seed: int, index: int) -> FuzzCase:
    """The case number `index` of the run seeded with `seed`."""
    rng = random.Random(f"{seed}:{index}")
    layers = _layers(rng)
    case = FuzzCase(layers=layers, steps=(), origin=f"seed {seed}, case {index}")
    drawer = _StepDrawer(rng, case)
    count = rng.choice((1, 2, 3, 4, 5, 6, 6, 8, 8, 10, 12, 14, 16, 20))
    return case.with_steps(tuple(drawer.step() for _ in range(count)))


def _layers(rng: random.Random) -> tuple[Layer, ...]:
    depth = rng.choices((1, 2, 3, 4), weights=(3, 4, 3, 2))[0]
    layers = []
    for position, name in enumerate(CHAIN_NAMES[depth]):
        if position == 0 and rng.random() < 0.3:
            layers.append(Layer(name=name, format="raw", size=_raw_size(rng)))
            continue
        cluster = None if rng.random() < 0.35 else \
            rng.choices([size for size, _ in CLUSTER_SIZES],
                        weights=[weight for _, weight in CLUSTER_SIZES])[0]
        size = _qcow2_size(rng, cluster or 64 * KIB) \
            if position == 0 or rng.random() < 0.45 else None
        layers.append(Layer(name=name, size=size, cluster_size=cluster,
                            options=_qcow2_options(rng)))
    return tuple(layers)


def _tail(rng: random.Random, size: int, grain: int) -> int:
    """Make `size` end on a cluster, inside one, or off a sector boundary."""
    draw = rng.random()
    if draw < 0.5:
        return max(grain, size - size % grain)
    if draw < 0.75:
        return size + SECTOR * rng.randint(1, max(1, grain // SECTOR - 1))
    if draw < 0.9:
        return size + rng.randint(1, SECTOR - 1)  # qemu-img rounds it up to a sector
    return max(SECTOR, size - SECTOR)


def _raw_size(rng: random.Random) -> int:
    return _tail(rng, rng.choice(IMAGE_SIZES), RAW_GRAIN)


def _qcow2_size(rng: random.Random, cluster: int) -> int:
    if cluster >= 16 * KIB and rng.random() < 0.1:
        size = rng.choice(SPARSE_SIZES)
        if _l1_bytes(size, cluster) <= MAX_L1_BYTES:
            return size
    size = _tail(rng, rng.choice(IMAGE_SIZES), cluster)
    while _l1_bytes(size, cluster) > MAX_L1_BYTES:
        size //= 2
    return size


def _l1_bytes(size: int, cluster: int) -> int:
    per_l2 = cluster * (cluster // 8)
    return -(-size // per_l2) * 8


def _qcow2_options(rng: random.Random) -> tuple[tuple[str, str], ...]:
    draw = rng.random()
    if draw < 0.08:
        return (("compat", "0.10"),)
    if draw < 0.15:
        return (("lazy_refcounts", "on"),)
    if draw < 0.25:
        return (("refcount_bits", str(rng.choice((1, 2, 4, 8, 32, 64)))),)
    return ()


class _StepDrawer:
    """Draws steps for one case, remembering the patterns it has written so
    that reads can mostly expect what is there."""

    def __init__(self, rng: random.Random, case: FuzzCase) -> None:
        self.rng = rng
        self.case = case
        self.names = [layer.name for layer in case.layers]
        self.boundaries = sorted({case.virtual_size(name) for name in self.names})
        self.patterns: list[int] = [0]

    def step(self) -> FuzzStep:
        draw = self.rng.random()
        if draw < 0.7:
            return self.io()
        if draw < 0.85:
            return self.map()
        if draw < 0.93:
            return Check(self.image(), json=self.rng.random() < 0.2)
        return Info(self.image(), backing_chain=self.rng.random() < 0.3,
                    json=self.rng.random() < 0.3)

    def image(self) -> str:
        if self.rng.random() < 0.55:
            return self.names[-1]
        return self.rng.choice(self.names)

    def map(self) -> Map:
        image = self.image()
        human = self.rng.random() < 0.3
        cut = self.has_backing(image) and self.rng.random() < 0.25
        if self.rng.random() < 0.12:
            size = self.case.virtual_size(image)
            grain = self.grain(image)
            return Map(image, human=human, start=self.offset(size, grain),
                       length=self.length(size, grain, 0), cut_backing=cut)
        return Map(image, human=human, cut_backing=cut)

    def has_backing(self, image: str) -> bool:
        return self.names.index(image) > 0

    def grain(self, image: str) -> int:
        layer = self.case.layer(image)
        return RAW_GRAIN if layer.format == "raw" else self.case.cluster_size(image)

    def io(self) -> Io:
        image = self.image()
        count = self.rng.choices((1, 2, 3, 4), weights=(5, 3, 2, 1))[0]
        cut = self.has_backing(image) and self.rng.random() < 0.1
        return Io(image, tuple(self.op(image) for _ in range(count)), cut_backing=cut)

    def op(self, image: str) -> IoOp:
        size = self.case.virtual_size(image)
        grain = self.grain(image)
        kinds: list[tuple[Callable[[int, int], IoOp], int]] = [
            (self.write_data, 20), (self.write_zeroes, 16), (self.discard, 8),
            (self.write_compressed, 4),
            (self.read_pattern, 9), (self.read_dump, 3), (self.aio_write, 6),
            (self.aio_read, 3), (self.writev, 4), (self.readv, 3), (self.alloc, 6),
            (self.simple("map"), 4), (self.simple("length"), 1), (self.simple("info"), 1),
            (self.simple("flush"), 1),
        ]
        draw = self.rng.choices([kind for kind, _ in kinds],
                                weights=[weight for _, weight in kinds])[0]
        return draw(size, grain)

    # -- numbers ---------------------------------------------------------------------

    def offset(self, size: int, grain: int) -> int:
        draw = self.rng.random()
        span = max(size, 1)
        if draw < 0.35:
            return self.rng.randrange(0, -(-span // grain)) * grain
        if draw < 0.55:
            return self.rng.randrange(0, -(-span // SECTOR)) * SECTOR
        if draw < 0.68:
            return self.rng.randrange(0, span)
        if draw < 0.93:
            # on or just around the end of this layer or of another one
            edge = self.rng.choice(self.boundaries + [size, size])
            step = self.rng.choice((0, 1, SECTOR, grain // 2 or 1, grain, 2 * grain))
            below = edge - step if self.rng.random() < 0.8 else edge + step
            return max(0, min(below, size - 1 if self.rng.random() < 0.9 else size + step))
        return size + self.rng.choice((0, 1, SECTOR, grain))  # beyond the end

    def length(self, size: int, grain: int, offset: int) -> int:
        draw = self.rng.random()
        if draw < 0.3:
            length = grain * self.rng.randint(1, 4)
        elif draw < 0.55:
            length = SECTOR * self.rng.randint(1, 16)
        elif draw < 0.7:
            length = self.rng.randint(1, 3 * SECTOR)
        elif draw < 0.85:
            length = max(1, grain + self.rng.choice((-SECTOR, SECTOR, -1, 1)))
        else:
            length = max(1, size - offset)
        length = min(length, MAX_REQUEST)
        if offset + length > size and self.rng.random() < 0.85:
            length = max(1, size - offset) if offset < size else length
        return length

    def pattern(self) -> int:
        value = self.rng.randint(1, 255)
        self.patterns.append(value)
        return value

    def expected(self) -> int:
        return self.rng.choice(self.patterns[-4:] + [0])

    # -- operations ------------------------------------------------------------------

    def write_data(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        flags: tuple[str, ...] = ()
        draw = self.rng.random()
        if draw < 0.1:
            flags = ("-f",)  # FUA
        elif draw < 0.13:
            flags = ("-q",)
        return IoOp("write", offset, (self.length(size, grain, offset),), flags,
                    self.pattern())

    def write_compressed(self, size: int, grain: int) -> IoOp:
        """write -c of one cluster (the last one may stop at the image's end);
        now and then from inside a cluster, which QEMU refuses. One cluster
        only: QEMU compresses the clusters of a longer request in parallel
        tasks (block/qcow2.c, qcow2_co_pwritev_compressed_part) and places
        them in whatever order those finish, which no second run repeats."""
        clusters = max(-(-size // grain), 1)
        offset = self.rng.randrange(0, clusters) * grain
        length = max(1, min(grain, size - offset))
        if self.rng.random() < 0.1:
            offset += self.rng.choice((1, SECTOR)) if grain > SECTOR else 1
            length = max(1, min(length, size - offset))
        return IoOp("write", offset, (length,), ("-c",), self.pattern())

    def write_zeroes(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        flags = self.rng.choices((("-z",), ("-z", "-u"), ("-z", "-n"), ("-z", "-u", "-n"),
                                  ("-f", "-z")), weights=(8, 8, 2, 1, 1))[0]
        return IoOp("write", offset, (self.length(size, grain, offset),), flags)

    def discard(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        return IoOp("discard", offset, (self.length(size, grain, offset),))

    def read_pattern(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        length = self.length(size, grain, offset)
        if self.rng.random() < 0.1 and length > 2:
            inner = self.rng.randrange(0, length - 1)
            return IoOp("read", offset, (length,),
                        ("-s", str(inner), "-l", str(self.rng.randint(1, length - inner))),
                        self.expected())
        return IoOp("read", offset, (length,), (), self.expected())

    def read_dump(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        return IoOp("read", offset, (min(self.length(size, grain, offset), MAX_DUMP),),
                    ("-v",))

    def aio_write(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        length = self.length(size, grain, offset)
        draw = self.rng.random()
        if draw < 0.6:
            return IoOp("aio_write", offset, (length,), (), self.pattern())
        if draw < 0.75:
            return IoOp("aio_write", offset, (length,), ("-f",), self.pattern())
        flags = ("-z", "-u") if draw < 0.88 else ("-z",)
        return IoOp("aio_write", offset, (length,), flags)

    def aio_read(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        length = self.length(size, grain, offset)
        if self.rng.random() < 0.25:
            return IoOp("aio_read", offset, (min(length, MAX_DUMP),), ("-v",))
        return IoOp("aio_read", offset, (length,), (), self.expected())

    def pieces(self, size: int, grain: int, offset: int) -> tuple[int, ...]:
        total = self.length(size, grain, offset)
        count = self.rng.randint(2, 4)
        if total < count:
            return (total,)
        cuts = sorted(self.rng.sample(range(1, total), count - 1))
        return tuple(b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True))

    def writev(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        return IoOp("writev", offset, self.pieces(size, grain, offset), (), self.pattern())

    def readv(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        if self.rng.random() < 0.2:
            return IoOp("readv", offset, (min(self.length(size, grain, offset), MAX_DUMP),),
                        ("-v",))
        return IoOp("readv", offset, self.pieces(size, grain, offset), (), self.expected())

    def alloc(self, size: int, grain: int) -> IoOp:
        offset = self.offset(size, grain)
        if self.rng.random() < 0.2:
            return IoOp("alloc", offset)
        return IoOp("alloc", offset, (self.length(size, grain, offset),))

    @staticmethod
    def simple(verb: str) -> Callable[[int, int], IoOp]:
        def draw(size: int, grain: int) -> IoOp:
            return IoOp(verb)
        return draw


# What a few hundred generated cases reach between them (tests/fuzz checks
# the generator against it, and the committed corpus must cover all of it).
CORNERS = frozenset({
    "layers:1", "layers:2", "layers:3", "layers:4", "raw-base", "raw-alone",
    "cluster:512", "cluster:4096", "cluster:65536", "cluster:2097152",
    "option:compat=0.10", "option:lazy_refcounts=on",
    "size:unaligned-sector", "size:unaligned-cluster", "overlay-longer", "overlay-shorter",
    "request:unaligned", "request:past-end",
    "op:write -P", "op:write -f -P", "op:write -c -P", "op:write -z", "op:write -z -u", "op:write -z -n",
    "op:discard", "op:read -P", "op:read -v", "op:read -s -l -P",
    "op:aio_write -P", "op:aio_write -z", "op:aio_write -z -u", "op:aio_read -P",
    "op:aio_read -v", "op:writev -P", "op:readv -P", "op:readv -v", "op:alloc", "op:map",
    "op:length", "op:info", "op:flush",
    "step:map-json", "step:map-human", "step:map-range", "step:map-cut-backing",
    "step:io-cut-backing", "step:check", "step:check-json",
    "step:info", "step:info-chain", "step:info-json",
})


def covering_corpus(seed: int, indices: range, limit: int) -> list[int]:
    """Up to `limit` of the cases `indices` of run `seed`: first a few that
    between them reach every corner the whole range reaches, then more that
    reach the most new pairs of corners (a raw base with write -z -u, 512-byte
    clusters with aio, ...); each pick is the one adding the most per
    operation, so the corpus stays quick to run."""
    cases = {index: generate(seed, index) for index in indices}
    found = {index: features(case) for index, case in cases.items()}
    costs = {index: case.operation_count() + 4 for index, case in cases.items()}
    chosen: list[int] = []
    for measure in (_singles, _pairs):
        covered: set[object] = set().union(*(measure(found[i]) for i in chosen))
        while len(chosen) < limit:
            left = [i for i in found if i not in chosen]
            if not left:
                break
            best = max(left, key=lambda i: (len(measure(found[i]) - covered) / costs[i], -i))
            if not measure(found[best]) - covered:
                break
            chosen.append(best)
            covered |= measure(found[best])
    return sorted(chosen)


def _singles(corners: set[str]) -> set[object]:
    return set(corners)


def _pairs(corners: set[str]) -> set[object]:
    ordered = sorted(corners)
    return {(a, b) for position, a in enumerate(ordered) for b in ordered[position + 1:]}


def features(case: FuzzCase) -> set[str]:
    """Names for what the case exercises (chain shape, formats, sizes, verbs)."""
    found = {f"layers:{len(case.layers)}"}
    for position, layer in enumerate(case.layers):
        if layer.format == "raw":
            found.add("raw-base" if len(case.layers) > 1 else "raw-alone")
        else:
            found.add(f"cluster:{case.cluster_size(layer.name)}")
        found.update(f"option:{name}={value}" for name, value in layer.options)
        size = case.virtual_size(layer.name)
        grain = RAW_GRAIN if layer.format == "raw" else case.cluster_size(layer.name)
        if layer.size is not None and layer.size % SECTOR:
            found.add("size:unaligned-sector")
        elif size % grain:
            found.add("size:unaligned-cluster")
        if position:
            below = case.virtual_size(case.layers[position - 1].name)
            if size > below:
                found.add("overlay-longer")
            elif size < below:
                found.add("overlay-shorter")
    for step in case.steps:
        if isinstance(step, Io):
            if step.cut_backing:
                found.add("step:io-cut-backing")
            for op in step.ops:
                words = [op.verb, *[f for f in op.flags if f.startswith("-") and f != "-q"]]
                if op.pattern is not None:
                    words.append("-P")
                found.add("op:" + " ".join(words))
                grain = RAW_GRAIN if case.layer(step.image).format == "raw" else \
                    case.cluster_size(step.image)
                if op.offset is not None and op.lengths:
                    end = op.offset + sum(op.lengths)
                    if op.offset % grain or end % grain:
                        found.add("request:unaligned")
                    if end > case.virtual_size(step.image):
                        found.add("request:past-end")
        elif isinstance(step, Map):
            found.add("step:map-human" if step.human else "step:map-json")
            if step.start is not None:
                found.add("step:map-range")
            if step.cut_backing:
                found.add("step:map-cut-backing")
        elif isinstance(step, Check):
            found.add("step:check-json" if step.json else "step:check")
        else:
            found.add("step:info" + ("-chain" if step.backing_chain else "")
                      + ("-json" if step.json else ""))
    return found
