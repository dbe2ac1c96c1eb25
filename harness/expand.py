"""Turn the step lists of a case into concrete steps, validating as it goes.

Step forms (`IMG` is an image declared under `images:`):

    - section: TITLE              blank line, then `== TITLE ==`
    - echo: TEXT                  one line of text
    - create IMG                  qemu-img create, as _make_test_img does it
    - create IMG: {size, cluster_size, backing, backing_format, options, args,
                   stderr, filter}
    - io IMG: CMD | [CMD, ...]    one qemu-io process, one -c per command
    - io IMG: {commands, args, stderr, filter}
    - map IMG                     qemu-img map --output=json IMG
    - map IMG: {output: json|human, args, stderr, filter}
    - check IMG                   qemu-img check -f FMT IMG (as _check_test_img)
    - check IMG: {args, stderr, filter}
    - info IMG                    qemu-img info IMG (as _img_info)
    - info IMG: {args, format_specific, stderr, filter}
    - remove IMG                  delete the image file
    - qemu-img: ARGS | {args, stderr, filter}
    - qemu-io: ARGS | {args, format, stderr, filter}
    - use: BLOCK                  the steps of a block, optionally
      with: {PARAM: VALUE}        with its parameters bound
    - for each: [{VAR: VALUE, ...}, ...]
      do: [STEPS]                 the steps once per set of bindings

Every string may hold `${...}` placeholders (see harness.expr). Anything
unknown or inconsistent raises CaseError at the line that holds it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from harness import filters
from harness.expr import PathRef, Value, describe_value, interpolate, resolve_deferred
from harness.schema import (
    QEMU_IMG,
    QEMU_IO,
    TEST_DIR_MARK,
    CaseError,
    Command,
    Echo,
    Image,
    Remove,
)
from harness.yamltree import Map, Node, Scalar, Seq

Scope = Mapping[str, Value]
Step = Echo | Command | Remove

IMAGE_KINDS = ("create", "io", "map", "check", "info", "remove")
PLAIN_KINDS = ("section", "echo", QEMU_IMG, QEMU_IO)
BARE_KINDS = ("create", "map", "check", "info", "remove")  # usable without a value
CONTROL_KEYS = ("use", "for each")

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
IMAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
OPTION_NAME = re.compile(r"[a-z0-9_.-]+")
SIZE_TEXT = re.compile(r"[0-9]+(\.[0-9]+)?[bBkKmMgGtTpPeE]?")

STDERR_MODES = {"merged": True, "separate": False}


@dataclass(frozen=True)
class Block:
    name: str
    line: int
    params: tuple[str, ...]
    steps: Seq


def create_options(path: Path, node: Node, value_of: Callable[[Node, str], Value],
                   owner: str) -> dict[str, str | None]:
    """An `options:` mapping as qemu-img -o values (booleans as on/off; None
    where the case unsets an option). `owner` names where size, cluster_size
    and the backing belong instead, for the error."""
    expect(path, node, Map, "options")
    assert isinstance(node, Map)
    result: dict[str, str | None] = {}
    for key, value in node.items():
        name = str(key.value)
        if not OPTION_NAME.fullmatch(name):
            raise CaseError(path, key.line, f"{name!r} is not a qemu-img option name")
        if name in ("size", "cluster_size", "backing_file", "backing_fmt"):
            raise CaseError(path, key.line, f"give {name} as {owner} own key, "
                                            "not under options")
        option = value_of(value, f"option {name!r}")
        if isinstance(option, bool):
            option = "on" if option else "off"
        result[name] = None if option is None else str(option)
    return result


def expect(path: Path, node: Node, kind: type, what: str) -> None:
    if not isinstance(node, kind):
        raise CaseError(path, node.line, f"{what} must be {_kind_name(kind)}, not {node.kind}")


def _kind_name(kind: type) -> str:
    return {Map: "a mapping", Seq: "a list", Scalar: "a value"}[kind]


def check_keys(path: Path, node: Map, allowed: tuple[str, ...], where: str) -> None:
    for key, _ in node.items():
        if key.value not in allowed:
            raise CaseError(path, key.line, f"unknown key {str(key.value)!r} in {where} "
                                            f"(expected one of: {', '.join(allowed)})")


class Expander:
    """Expands the steps of one case; holds what all of its steps share."""

    def __init__(self, path: Path, case_format: str, cluster_size: str | None,
                 case_scope: Scope, images: Mapping[str, Image],
                 blocks: Mapping[str, Block]) -> None:
        self.path = path
        self.format = case_format
        self.cluster_size = cluster_size
        self.case_scope = case_scope  # what a block's steps see, besides its parameters
        self.images = images
        self.blocks = blocks
        self.used_blocks: set[str] = set()

    # -- values -----------------------------------------------------------

    def fail(self, node: Node, message: str) -> CaseError:
        return CaseError(self.path, node.line, message)

    def value(self, node: Node, scope: Scope, what: str) -> Value:
        """A scalar with its placeholders substituted (typed when it is just one)."""
        if not isinstance(node, Scalar):
            raise self.fail(node, f"{what} must be a single value, not {node.kind}")
        if not isinstance(node.value, str):
            return node.value
        try:
            return interpolate(node.value, scope, self._render_path)
        except ValueError as error:
            raise self.fail(node, str(error)) from None

    def text(self, node: Node, scope: Scope, what: str, *, allow_empty: bool = True) -> str:
        value = self.value(node, scope, what)
        if value is None or isinstance(value, bool):
            raise self.fail(node, f"{what} must be a text, not {describe_value(value)}")
        text = str(value)
        if not allow_empty and not text.strip():
            raise self.fail(node, f"{what} must not be empty")
        return text

    def _render_path(self, ref: PathRef) -> str:
        image = self.images.get(ref.image)
        if image is None:
            raise ValueError(self._unknown_image(ref.image))
        return image.path

    def _unknown_image(self, name: str) -> str:
        declared = ", ".join(self.images) or "none"
        return f"unknown image {name!r} (declared images: {declared})"

    def image(self, node: Node, name: str) -> Image:
        image = self.images.get(name)
        if image is None:
            raise self.fail(node, self._unknown_image(name))
        return image

    def size(self, node: Node, scope: Scope, what: str) -> str | None:
        value = self.value(node, scope, what)
        if value is None:
            return None
        text = str(value) if not isinstance(value, bool) else ""
        if not SIZE_TEXT.fullmatch(text):
            raise self.fail(node, f"{what} must be a byte count such as 1048576 or 128M, "
                                  f"not {value!r}")
        return text

    def arguments(self, node: Node, scope: Scope, what: str) -> list[str]:
        """A string split the way a shell splits words, or a list taken as is."""
        if isinstance(node, Seq):
            return [self.text(item, scope, f"each item of {what}") for item in node.items]
        text = self.text(node, scope, what)
        try:
            return shlex.split(text)
        except ValueError as error:
            raise self.fail(node, f"cannot split {what} into words: {error}") from None

    def filter_names(self, node: Node, scope: Scope) -> tuple[str, ...]:
        if isinstance(node, Scalar) and node.value is None:
            return ()
        items = node.items if isinstance(node, Seq) else (node,)
        names = []
        for item in items:
            name = self.text(item, scope, "a filter name")
            if name not in filters.REGISTRY:
                raise self.fail(item, f"unknown filter {name!r} (known filters: "
                                      f"{', '.join(sorted(filters.REGISTRY))})")
            names.append(name)
        return tuple(names)

    def stderr_mode(self, node: Node, scope: Scope) -> bool:
        mode = self.text(node, scope, "stderr")
        if mode not in STDERR_MODES:
            raise self.fail(node, f"stderr must be 'merged' (2>&1 through the filter) or "
                                  f"'separate' (stderr around the filter), not {mode!r}")
        return STDERR_MODES[mode]

    # -- step lists --------------------------------------------------------

    def steps(self, node: Node, scope: Scope, via: tuple[int, ...] = (),
              stack: tuple[str, ...] = ()) -> list[Step]:
        expect(self.path, node, Seq, "steps")
        assert isinstance(node, Seq)
        result: list[Step] = []
        for item in node.items:
            result.extend(self.step(item, scope, via, stack))
        return result

    def step(self, node: Node, scope: Scope, via: tuple[int, ...],
             stack: tuple[str, ...]) -> list[Step]:
        if isinstance(node, Scalar):
            if not isinstance(node.value, str):
                raise self.fail(node, f"a step must be a command such as 'map test' or a "
                                      f"mapping, not {node.kind}")
            return [self.command(node, node, None, scope, via)]
        if not isinstance(node, Map):
            raise self.fail(node, f"a step must be a command or a mapping, not {node.kind}")
        keys = node.keys()
        if "use" in keys:
            return self.use(node, scope, via, stack)
        if "for each" in keys:
            return self.for_each(node, scope, via, stack)
        if len(node.entries) != 1:
            raise self.fail(node, "a step has exactly one key, the command "
                                  f"(found: {', '.join(keys)})")
        key, value = node.entries[0]
        if not isinstance(key.value, str):
            raise self.fail(key, f"unknown step {key.value!r}")
        return [self.command(node, key, value, scope, via)]

    def use(self, node: Map, scope: Scope, via: tuple[int, ...],
            stack: tuple[str, ...]) -> list[Step]:
        check_keys(self.path, node, ("use", "with"), "a 'use' step")
        name_node = node.get("use")
        assert name_node is not None
        name = self.text(name_node, scope, "use")
        block = self.blocks.get(name)
        if block is None:
            known = ", ".join(self.blocks) or "none"
            raise self.fail(name_node, f"unknown block {name!r} (defined blocks: {known})")
        if name in stack:
            chain = " -> ".join((*stack, name))
            raise self.fail(name_node, f"block {name!r} uses itself ({chain})")
        self.used_blocks.add(name)
        bindings: dict[str, Value] = {}
        with_node = node.get("with")
        if with_node is not None and not (isinstance(with_node, Scalar) and with_node.value is None):
            expect(self.path, with_node, Map, "'with'")
            assert isinstance(with_node, Map)
            for key, value in with_node.items():
                if key.value not in block.params:
                    params = ", ".join(block.params) or "none"
                    raise self.fail(key, f"block {name!r} has no parameter {str(key.value)!r} "
                                         f"(its parameters: {params})")
                bindings[str(key.value)] = self.value(value, scope, f"parameter {key.value!r}")
        missing = [param for param in block.params if param not in bindings]
        if missing:
            raise self.fail(node, f"block {name!r} needs a value for parameter "
                                  f"{missing[0]!r} (give it under 'with:')")
        inner = {**self.case_scope, **bindings}
        return self.steps(block.steps, inner, (*via, node.line), (*stack, name))

    def for_each(self, node: Map, scope: Scope, via: tuple[int, ...],
                 stack: tuple[str, ...]) -> list[Step]:
        check_keys(self.path, node, ("for each", "do"), "a 'for each' step")
        sets = node.get("for each")
        body = node.get("do")
        assert sets is not None
        if body is None:
            raise self.fail(node, "'for each' needs the steps to repeat under 'do:'")
        expect(self.path, sets, Seq, "'for each'")
        assert isinstance(sets, Seq)
        if not sets.items:
            raise self.fail(sets, "'for each' needs at least one set of bindings")
        result: list[Step] = []
        for bindings_node in sets.items:
            expect(self.path, bindings_node, Map, "each item of 'for each'")
            assert isinstance(bindings_node, Map)
            inner = dict(scope)
            for key, value in bindings_node.items():
                name = str(key.value)
                if not NAME.fullmatch(name):
                    raise self.fail(key, f"{name!r} is not a valid variable name")
                inner[name] = self.value(value, scope, f"variable {name!r}")
            result.extend(self.steps(body, inner, (*via, bindings_node.line), stack))
        return result

    # -- commands ----------------------------------------------------------

    def command(self, node: Node, key_node: Node, value: Node | None, scope: Scope,
                via: tuple[int, ...]) -> Step:
        words = self.text(key_node, scope, "the step").split()
        if not words:
            raise self.fail(key_node, "empty step")
        kind, rest = words[0], words[1:]
        if kind in PLAIN_KINDS:
            if rest:
                raise self.fail(key_node, f"'{kind}' takes no image name")
            if value is None:
                raise self.fail(node, f"'{kind}' needs a value: write '{kind}: ...'")
            return self.plain_command(kind, node.line, value, scope, via)
        if kind not in IMAGE_KINDS:
            known = ", ".join((*PLAIN_KINDS, *IMAGE_KINDS, *CONTROL_KEYS))
            raise self.fail(key_node, f"unknown step {kind!r} (known steps: {known})")
        if len(rest) != 1:
            raise self.fail(key_node, f"'{kind}' needs exactly one image name, "
                                      f"as in '{kind} test'")
        image = self.image(key_node, rest[0])
        if value is not None and isinstance(value, Scalar) and value.value is None:
            value = None
        if value is None and kind not in BARE_KINDS:
            raise self.fail(node, f"'{kind} {image.name}' needs commands: "
                                  f"write '{kind} {image.name}: CMD'")
        method = getattr(self, f"step_{kind}")
        return method(node.line, image, value, scope, via)

    def plain_command(self, kind: str, line: int, value: Node, scope: Scope,
                      via: tuple[int, ...]) -> Step:
        if kind == "section":
            return Echo(line, text=f"\n== {self.text(value, scope, 'section')} ==", via=via)
        if kind == "echo":
            if isinstance(value, Scalar) and value.value is None:
                return Echo(line, text="", via=via)
            return Echo(line, text=self.text(value, scope, "echo"), via=via)
        return self.raw_command(kind, line, value, scope, via)

    def raw_command(self, tool: str, line: int, value: Node, scope: Scope,
                    via: tuple[int, ...]) -> Command:
        """`qemu-img: ARGS` / `qemu-io: ARGS`: the program with the arguments as
        written (qemu-io gets the options every qemu-io step has, `-f` included
        unless `format: null`). qemu-img defaults to `2>&1 | _filter_testdir`,
        qemu-io to `| _filter_qemu_io`."""
        allowed = ("args", "stderr", "filter", "format") if tool == QEMU_IO else \
            ("args", "stderr", "filter")
        options = self.options_of(value, allowed, tool)
        args_node = options.get("args", value if not isinstance(value, Map) else None)
        if args_node is None:
            raise self.fail(value, f"'{tool}' needs its arguments under 'args:'")
        args = self.arguments(args_node, scope, f"the {tool} arguments")
        if tool == QEMU_IMG:
            return self.finish(QEMU_IMG, line, args, options, scope, via, True, ("testdir",))
        fmt = self.optional_text(options["format"], scope, "format") \
            if "format" in options else self.format
        return self.finish(QEMU_IO, line, [*self.io_prefix(fmt), *args], options, scope, via,
                           False, ("qemu_io",))

    def options_of(self, value: Node | None, allowed: tuple[str, ...],
                   where: str) -> dict[str, Node]:
        if not isinstance(value, Map):
            return {}
        check_keys(self.path, value, allowed, f"'{where}'")
        return {str(key.value): node for key, node in value.items()}

    def finish(self, tool: str, line: int, args: list[str], options: dict[str, Node],
               scope: Scope, via: tuple[int, ...], merge: bool,
               default_filters: tuple[str, ...]) -> Command:
        """The Command, with the step's own `stderr:`/`filter:` over the defaults."""
        # (the test directory and image paths are still NUL-marked here)
        if any("\0" in resolve_deferred(arg, lambda ref: "").replace(TEST_DIR_MARK, "")
               for arg in args):
            raise CaseError(self.path, line, "a command-line argument cannot hold a NUL "
                                             "character")
        if "stderr" in options:
            merge = self.stderr_mode(options["stderr"], scope)
        chosen = default_filters
        if "filter" in options:
            chosen = self.filter_names(options["filter"], scope)
        return Command(line, tool=tool, args=tuple(args), filters=chosen,
                       merge_stderr=merge, via=via)

    @staticmethod
    def io_prefix(fmt: str | None) -> list[str]:
        prefix = ["--cache", "writeback", "--aio", "threads"]
        if fmt is not None:
            prefix += ["-f", fmt]
        return prefix

    def extra_args(self, options: dict[str, Node], scope: Scope) -> list[str]:
        node = options.get("args")
        return [] if node is None else self.arguments(node, scope, "args")

    def step_create(self, line: int, image: Image, value: Node | None, scope: Scope,
                    via: tuple[int, ...]) -> Command:
        options = self.options_of(value, ("size", "cluster_size", "backing",
                                          "backing_format", "options", "args", "stderr",
                                          "filter"), "create")
        size = image.size
        cluster_size = image.cluster_size
        backing = image.backing
        backing_format = image.backing_format
        create_opts = dict(image.options)
        if "size" in options:
            size = self.size(options["size"], scope, "size")
        if "cluster_size" in options:
            cluster_size = self.size(options["cluster_size"], scope, "cluster_size")
            if cluster_size is not None and image.format != "qcow2":
                raise self.fail(options["cluster_size"],
                                f"cluster_size applies to qcow2 images; {image.name!r} is "
                                f"{image.format}")
        if "backing" in options:
            backing = self.backing_name(options["backing"], scope, image)
        if "backing_format" in options:
            backing_format = self.optional_text(options["backing_format"], scope,
                                                "backing_format")
        if "options" in options:
            create_opts.update(self.create_options(options["options"], scope))
        if backing is None and size is None:
            raise CaseError(self.path, line, f"'create {image.name}' needs a size "
                                             "(or a backing image to take it from)")
        if cluster_size is None and image.format == "qcow2" and self.format == "qcow2":
            cluster_size = self.cluster_size
        # qemu-img reads ",," as a comma inside a value, so a value cannot add options
        optstr = [f"{name}={val.replace(',', ',,')}" for name, val in create_opts.items()
                  if val is not None]
        if cluster_size is not None:
            optstr.append(f"cluster_size={cluster_size}")
        args = ["create", "-f", image.format]
        if optstr:
            args += ["-o", ",".join(optstr)]
        args += self.extra_args(options, scope)
        if backing is not None:
            backing_image = self.images[backing]
            args += ["-b", backing_image.path, image.path]
            args += ["-F", backing_format or backing_image.format]
        else:
            args.append(image.path)
        if size is not None:
            args.append(size)
        return self.finish(QEMU_IMG, line, args, options, scope, via, True, ("img_create",))

    def optional_text(self, node: Node, scope: Scope, what: str) -> str | None:
        value = self.value(node, scope, what)
        if value is None:
            return None
        if isinstance(value, bool):
            raise self.fail(node, f"{what} must be a text, not a boolean")
        return str(value)

    def backing_name(self, node: Node, scope: Scope, image: Image) -> str | None:
        name = self.optional_text(node, scope, "backing")
        if name is None:
            return None
        self.image(node, name)
        if name == image.name:
            raise self.fail(node, f"image {image.name!r} cannot be its own backing file")
        return name

    def create_options(self, node: Node, scope: Scope) -> dict[str, str | None]:
        return create_options(self.path, node, lambda value, what: self.value(value, scope, what),
                              "the create step's")

    def step_io(self, line: int, image: Image, value: Node | None, scope: Scope,
                via: tuple[int, ...]) -> Command:
        assert value is not None
        options = self.options_of(value, ("commands", "args", "stderr", "filter"), "io")
        commands_node = options.get("commands", value if not isinstance(value, Map) else None)
        if commands_node is None:
            raise self.fail(value, "'io' needs its qemu-io commands under 'commands:'")
        items = commands_node.items if isinstance(commands_node, Seq) else (commands_node,)
        if not items:
            raise self.fail(commands_node, "'io' needs at least one qemu-io command")
        args = self.io_prefix(image.format) + self.extra_args(options, scope)
        for item in items:
            args += ["-c", self.text(item, scope, "a qemu-io command", allow_empty=False)]
        args.append(image.path)
        return self.finish(QEMU_IO, line, args, options, scope, via, False, ("qemu_io",))

    def step_map(self, line: int, image: Image, value: Node | None, scope: Scope,
                 via: tuple[int, ...]) -> Command:
        options = self.options_of(value, ("output", "args", "stderr", "filter"), "map")
        args = ["map"]
        output = "json"
        if "output" in options:
            output = self.text(options["output"], scope, "output")
            if output not in ("json", "human"):
                raise self.fail(options["output"], f"output must be json or human, "
                                                   f"not {output!r}")
        if output == "json":
            args.append("--output=json")
        args += self.extra_args(options, scope)
        args.append(image.path)
        return self.finish(QEMU_IMG, line, args, options, scope, via, False, ("qemu_img_map",))

    def step_check(self, line: int, image: Image, value: Node | None, scope: Scope,
                   via: tuple[int, ...]) -> Command:
        options = self.options_of(value, ("args", "stderr", "filter"), "check")
        args = ["check", *self.extra_args(options, scope), "-f", image.format, image.path]
        return self.finish(QEMU_IMG, line, args, options, scope, via, True,
                           ("testdir", "qemu_img_check"))

    def step_info(self, line: int, image: Image, value: Node | None, scope: Scope,
                  via: tuple[int, ...]) -> Command:
        options = self.options_of(value, ("args", "format_specific", "stderr", "filter"),
                                  "info")
        specific = False
        if "format_specific" in options:
            flag = self.value(options["format_specific"], scope, "format_specific")
            if not isinstance(flag, bool):
                raise self.fail(options["format_specific"],
                                "format_specific must be true or false")
            specific = flag
        args = ["info", *self.extra_args(options, scope), image.path]
        default = ("img_info_rc_format_specific",) if specific else ("img_info_rc",)
        return self.finish(QEMU_IMG, line, args, options, scope, via, True, default)

    def step_remove(self, line: int, image: Image, value: Node | None, scope: Scope,
                    via: tuple[int, ...]) -> Remove:
        if value is not None:
            raise self.fail(value, f"'remove {image.name}' takes no value")
        return Remove(line, file=image.file, via=via)

