"""What a generated case is before it becomes text.

The generator builds, and the shrinker edits, plain frozen values: a chain
of layers (bottom first, each backing the next, the last one named `test`)
and a list of steps (qemu-io processes made of operations, qemu-img map,
check and info). `render` turns one into a case file in the harness's case
language, which the loader then validates and expands like any hand-written
case, so a finding can be committed exactly as it was run.

Numbers stay integers here so that the shrinker can make them smaller and
rounder; rendering writes them the way a person would (`64k`, `${1M + 512}`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

# Names of the layers of a chain of 1-4, bottom first: the top is always
# `test` (t.IMGFMT), the others t.IMGFMT.NAME as qemu-iotests names them.
CHAIN_NAMES: dict[int, tuple[str, ...]] = {
    1: ("test",),
    2: ("base", "test"),
    3: ("base", "mid", "test"),
    4: ("base", "mid", "upper", "test"),
}

DEFAULT_CLUSTER_SIZE = 65536
SECTOR = 512

# qemu-io verbs whose requests are asynchronous: each is followed by an
# `aio_flush`, so that completions (and their output) come in a fixed order.
AIO_VERBS = ("aio_read", "aio_write")

# Filters that hide nothing but what differs between two runs of the same
# case (the directory, qemu-io's timings, the host file system's disk
# usage): a step carrying `reveal` is written with these instead of its
# qemu-iotests filter, so that a difference only the raw output shows
# (host offsets, check statistics, create options) reaches the golden.
REVEAL_FILTERS: dict[str, tuple[str, ...]] = {
    "create": ("testdir",),
    "io": ("qemu_io",),
    "map": ("testdir",),
    "check": ("testdir",),
    "info": ("img_info_rc_format_specific",),
}


@dataclass(frozen=True)
class Layer:
    """One image of the chain; it is backed by the layer before it."""

    name: str
    format: str = "qcow2"
    size: int | None = None  # bytes; None: the backing file's size
    cluster_size: int | None = None  # None: QEMU's default
    options: tuple[tuple[str, str], ...] = ()  # more qemu-img create -o options
    reveal: bool = False  # write its create step with REVEAL_FILTERS


@dataclass(frozen=True)
class IoOp:
    """One qemu-io command: `verb [flags] [-P pattern] [offset [length...]]`."""

    verb: str
    offset: int | None = None
    lengths: tuple[int, ...] = ()
    flags: tuple[str, ...] = ()
    pattern: int | None = None

    def render(self) -> str:
        words = [self.verb, *self.flags]
        if self.pattern is not None:
            words += ["-P", f"0x{self.pattern:x}"]
        if self.offset is not None:
            words.append(number_text(self.offset))
        words += [number_text(length) for length in self.lengths]
        return " ".join(words)

    def commands(self) -> tuple[str, ...]:
        if self.verb in AIO_VERBS:
            return (self.render(), "aio_flush")
        return (self.render(),)


@dataclass(frozen=True)
class Io:
    """One qemu-io process on one image, running its operations in order;
    with `cut_backing` the image is opened alone (`"backing": null`)."""

    image: str
    ops: tuple[IoOp, ...]
    cut_backing: bool = False
    reveal: bool = False
    kind = "io"


@dataclass(frozen=True)
class Map:
    """qemu-img map, json (default) or human, optionally over a range; with
    `cut_backing` the image is opened alone, so what it leaves to its
    backing file is not present."""

    image: str
    human: bool = False
    start: int | None = None
    length: int | None = None
    cut_backing: bool = False
    reveal: bool = False
    kind = "map"


@dataclass(frozen=True)
class Check:
    """qemu-img check (as _check_test_img), human or json output."""

    image: str
    json: bool = False
    reveal: bool = False
    kind = "check"


@dataclass(frozen=True)
class Info:
    """qemu-img info (as _img_info), optionally the whole chain or json."""

    image: str
    backing_chain: bool = False
    json: bool = False
    reveal: bool = False
    kind = "info"


FuzzStep = Io | Map | Check | Info


@dataclass(frozen=True)
class FuzzCase:
    """A generated case: its chain, its steps, and where it came from."""

    layers: tuple[Layer, ...]
    steps: tuple[FuzzStep, ...]
    origin: str = ""  # e.g. "seed 7, case 12"
    comment: tuple[str, ...] = field(default=(), compare=False)  # lines for the file's head

    @property
    def format(self) -> str:
        """The case's IMGFMT: raw only for a lone raw image."""
        if len(self.layers) == 1 and self.layers[0].format == "raw":
            return "raw"
        return "qcow2"

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def backing_of(self, name: str) -> Layer | None:
        names = [layer.name for layer in self.layers]
        index = names.index(name)
        return self.layers[index - 1] if index else None

    def virtual_size(self, name: str) -> int:
        """The layer's size as qemu-img create settles it (rounded up to a sector)."""
        size = 0
        for layer in self.layers:
            if layer.size is not None:
                size = layer.size
            size = -(-size // SECTOR) * SECTOR
            if layer.name == name:
                return size
        raise KeyError(name)

    def cluster_size(self, name: str) -> int:
        layer = self.layer(name)
        return layer.cluster_size or DEFAULT_CLUSTER_SIZE

    def step_count(self) -> int:
        """Steps of the rendered case: one create per layer, then the steps."""
        return len(self.layers) + len(self.steps)

    def operation_count(self) -> int:
        """Commands the case runs: creates, qemu-img steps, each qemu-io command."""
        count = len(self.layers)
        for step in self.steps:
            count += sum(len(op.commands()) for op in step.ops) if isinstance(step, Io) else 1
        return count

    def with_steps(self, steps: tuple[FuzzStep, ...]) -> FuzzCase:
        return replace(self, steps=steps)


# -- rendering ------------------------------------------------------------------------

_UNITS = ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "k"))


def number_text(value: int) -> str:
    """A byte count as a person writes it: 4096 -> 4k, 1049088 -> ${1M + 512},
    1048064 -> ${1M - 512}; a count with no such shape stays in decimal.

    qemu-io and qemu-img read the k/M/G suffixes themselves; a sum is a
    case-language placeholder, worked out before the command runs."""
    if value < 1024:
        return str(value)
    for unit, suffix in _UNITS:
        if value % unit == 0 and (value // unit < 1024 or unit == _UNITS[0][0]):
            return f"{value // unit}{suffix}"
    for unit, suffix in _UNITS:
        whole, below = divmod(value, unit)
        above = unit - below
        if above <= unit // 16 and _round(above):
            return f"${{{whole + 1}{suffix} - {_term(above)}}}"
        if whole and _round(below):
            return f"${{{whole}{suffix} + {_term(below)}}}"
    return str(value)


def _round(count: int) -> bool:
    return count % SECTOR == 0 or count < 16


def _term(count: int) -> str:
    return f"{count // 1024}k" if count >= 1024 and count % 1024 == 0 else str(count)


_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .+=/-]*[A-Za-z0-9_]|[A-Za-z0-9_]")


def yaml_text(text: str) -> str:
    """A YAML scalar for `text`: plain when that is unambiguous, else quoted."""
    if _PLAIN.fullmatch(text) and not _looks_typed(text):
        return text
    return json.dumps(text)


def _looks_typed(text: str) -> bool:
    """Plain scalars YAML would read as something other than this string."""
    lowered = text.lower()
    if lowered in ("null", "true", "false", "yes", "no", "on", "off", "y", "n", "~"):
        return True
    return re.fullmatch(r"[-+]?(\d[\d_]*)?(\.\d*)?([eE][-+]?\d+)?|0[xob][0-9a-fA-F_]+",
                        text) is not None


def _flow_map(pairs: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{key}: {value}" for key, value in pairs) + "}"


def _size_value(value: int) -> str:
    text = number_text(value)
    if text.isdigit():
        return text
    return json.dumps(text) if text.startswith("$") else yaml_text(text)


def _layer_spec(case: FuzzCase, layer: Layer) -> str:
    pairs: list[tuple[str, str]] = []
    if layer.format != case.format:
        pairs.append(("format", layer.format))
    backing = case.backing_of(layer.name)
    if backing is not None:
        pairs.append(("backing", backing.name))
    if layer.size is not None:
        pairs.append(("size", _size_value(layer.size)))
    if layer.cluster_size is not None:
        pairs.append(("cluster_size", _size_value(layer.cluster_size)))
    if layer.options:
        pairs.append(("options", _flow_map([(name, json.dumps(value))
                                            for name, value in layer.options])))
    return _flow_map(pairs)


def alone(image: str) -> str:
    """A qcow2 image opened without its backing file, as a json: filename."""
    return ('json:{"driver": "qcow2", "backing": null, '
            f'"file": {{"driver": "file", "filename": "${{path:{image}}}"}}}}')


def _step_data(step: FuzzStep) -> object:
    """The step as YAML data (what `yaml.safe_load` gives for its lines)."""
    key = f"{step.kind} {step.image}"
    if isinstance(step, Io):
        commands = [command for op in step.ops for command in op.commands()]
        if step.cut_backing:
            args = [word for command in commands for word in ("-c", command)]
            return {"qemu-io": {"args": [*args, alone(step.image)], "format": None}}
        if step.reveal:
            return {key: {"commands": commands, "filter": list(REVEAL_FILTERS["io"])}}
        return {key: commands[0] if len(commands) == 1 else commands}
    options: dict[str, object] = {}
    args: list[str] = []
    if isinstance(step, Map):
        if not step.human and step.cut_backing:
            args.append("--output=json")
        elif step.human and not step.cut_backing:
            options["output"] = "human"
        if step.start is not None:
            args.append(f"--start-offset={step.start}")
        if step.length is not None:
            args.append(f"--max-length={step.length}")
    elif isinstance(step, Check):
        if step.json:
            args.append("--output=json")
    else:
        if step.backing_chain:
            args.append("--backing-chain")
        if step.json:
            args.append("--output=json")
        if step.reveal:
            options["format_specific"] = True
    if isinstance(step, Map) and step.cut_backing:
        options["args"] = ["map", *args, alone(step.image)]
        options["stderr"] = "separate"
        options["filter"] = list(REVEAL_FILTERS["map"] if step.reveal else ("qemu_img_map",))
        return {"qemu-img": options}
    if args:
        options["args"] = args
    if step.reveal:
        options["filter"] = list(REVEAL_FILTERS[step.kind])
    return {key: options} if options else key


def _flow(value: object) -> str:
    """YAML flow text for step data: texts, lists, mappings, true and null."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text if _PLAIN.fullmatch(text) and not _looks_typed(text) else json.dumps(text)


def _step_lines(step: FuzzStep) -> list[str]:
    """The YAML lines of one step (under `steps:`, indented by two)."""
    data = _step_data(step)
    if isinstance(data, str):
        return [f"  - {data}"]
    assert isinstance(data, dict)
    ((key, value),) = data.items()
    if isinstance(value, str):
        return [f"  - {key}: {yaml_text(value)}"]
    if isinstance(value, list):
        return [f"  - {key}:"] + [f"      - {yaml_text(command)}" for command in value]
    assert isinstance(value, dict)
    if "commands" in value:
        lines = [f"  - {key}:", "      commands:"]
        lines += [f"        - {yaml_text(command)}" for command in value["commands"]]
        return lines + [f"      filter: {_flow(value['filter'])}"]
    if key == "qemu-io":
        lines = [f"  - {key}:", "      args:"]
        lines += [f"        - {_flow(arg)}" for arg in value["args"]]
        return lines + ["      format: null"]
    return [f"  - {key}: {_flow(value)}"]


def render(case: FuzzCase, title: str | None = None) -> str:
    """The case file's text (without a `seq:`, so any number may name it)."""
    lines = [f"# {line}".rstrip() for line in case.comment]
    lines.append(f"title: {yaml_text(title or 'fuzz: ' + (case.origin or 'generated case'))}")
    if case.format != "qcow2":
        lines.append(f"format: {case.format}")
    lines.append("images:")
    lines += [f"  {layer.name}: {_layer_spec(case, layer)}" for layer in case.layers]
    lines.append("")
    lines.append("steps:")
    for layer in case.layers:
        if layer.reveal:
            lines.append(f"  - create {layer.name}: {_flow({'filter': list(REVEAL_FILTERS['create'])})}")
        else:
            lines.append(f"  - create {layer.name}")
    for step in case.steps:
        lines += _step_lines(step)
    return "\n".join(lines) + "\n"


def as_data(case: FuzzCase) -> dict[str, object]:
    """What `yaml.safe_load(render(case))` must give, numbers as written: the
    round-trip tests compare the two."""
    data: dict[str, object] = {"title": "fuzz: " + (case.origin or "generated case")}
    if case.format != "qcow2":
        data["format"] = case.format
    images: dict[str, object] = {}
    for layer in case.layers:
        spec: dict[str, object] = {}
        if layer.format != case.format:
            spec["format"] = layer.format
        backing = case.backing_of(layer.name)
        if backing is not None:
            spec["backing"] = backing.name
        if layer.size is not None:
            spec["size"] = _loaded_number(number_text(layer.size))
        if layer.cluster_size is not None:
            spec["cluster_size"] = _loaded_number(number_text(layer.cluster_size))
        if layer.options:
            spec["options"] = dict(layer.options)
        images[layer.name] = spec
    data["images"] = images
    steps: list[object] = [f"create {layer.name}" if not layer.reveal else
                           {f"create {layer.name}": {"filter": list(REVEAL_FILTERS["create"])}}
                           for layer in case.layers]
    for step in case.steps:
        steps.append(_step_data(step))
    data["steps"] = steps
    return data


def _loaded_number(text: str) -> object:
    return int(text) if text.isdigit() else text
