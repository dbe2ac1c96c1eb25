"""Load a case file (`cases/NNN-name.yaml`) into a validated, expanded Case.

Top-level keys:

    title:         what the case is about (required)
    seq:           the number, if written, must match the file name's NNN
    format:        IMGFMT: qcow2 (default) or raw
    cluster_size:  CLUSTER_SIZE: added to every qcow2 `create` that sets none
    vars:          variables for `${...}` placeholders, in order
    images:        NAME: {file, format, size, cluster_size, backing,
                          backing_format, options}; file defaults to
                   t.IMGFMT for an image named `test`, t.IMGFMT.NAME otherwise
                   (the names qemu-iotests give $TEST_IMG and $TEST_IMG.NAME)
    blocks:        NAME: [steps] or NAME: {params: [...], steps: [...]}
    steps:         the steps (see harness.expand)

Every error is a CaseError: `file:line: message`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from harness.expand import (
    IMAGE_NAME,
    NAME,
    SIZE_TEXT,
    Block,
    Expander,
    check_keys,
    create_options,
    expect,
)
from harness.expr import PathRef, Value, deferred_images, describe_value, interpolate
from harness.schema import IMAGE_FORMATS, Case, CaseError, Image
from harness.yamltree import Map, Node, Scalar, Seq, parse

CASE_FILE_NAME = re.compile(r"(?P<seq>[0-9]+)-[A-Za-z0-9][A-Za-z0-9_.-]*\.yaml")

TOP_KEYS = ("title", "seq", "format", "cluster_size", "vars", "images", "blocks", "steps")
IMAGE_KEYS = ("file", "format", "size", "cluster_size", "backing", "backing_format", "options")
PREDEFINED = ("fmt",)
# the longest file name Linux file systems take (NAME_MAX)
MAX_FILE_NAME = 255


def load_case(path: str | Path) -> Case:
    """Read, validate and expand one case file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CaseError(path, 1, f"cannot read the case file: {error}") from None
    return load_case_text(text, path)


def load_case_text(text: str, path: Path) -> Case:
    match = CASE_FILE_NAME.fullmatch(path.name)
    if match is None:
        raise CaseError(path, 1, "case files are named NNN-name.yaml "
                                 "(a number, a dash, a name)")
    seq = match.group("seq")
    root = parse(text, path)
    expect(path, root, Map, "a case")
    assert isinstance(root, Map)
    check_keys(path, root, TOP_KEYS, "the case")

    if (seq_node := root.get("seq")) is not None:
        if not isinstance(seq_node, Scalar) or str(seq_node.value) != seq:
            raise CaseError(path, seq_node.line, f"seq must match the file name ({seq}), "
                                                 f"not {_shown(seq_node)}")
    title = _required_text(path, root, "title")
    case_format = _choice(path, root.get("format"), "format", IMAGE_FORMATS, "qcow2")

    scope: dict[str, Value] = {"fmt": case_format}
    var_lines: dict[str, int] = {}
    if (vars_node := root.get("vars")) is not None:
        _define_vars(path, vars_node, scope, var_lines)

    cluster_size = None
    if (cluster_node := root.get("cluster_size")) is not None:
        cluster_size = _size(path, cluster_node, scope, "cluster_size")

    images: dict[str, Image] = {}
    if (images_node := root.get("images")) is not None:
        images = _images(path, images_node, scope, case_format)

    for name, line in var_lines.items():
        value = scope[name]
        for image in deferred_images(value) if isinstance(value, str) else ():
            if image not in images:
                raise CaseError(path, line, f"unknown image {image!r} "
                                            f"(declared images: {', '.join(images) or 'none'})")

    blocks: dict[str, Block] = {}
    if (blocks_node := root.get("blocks")) is not None:
        blocks = _blocks(path, blocks_node)

    steps_node = root.get("steps")
    if steps_node is None:
        raise CaseError(path, root.line, "the case has no 'steps'")
    expander = Expander(path, case_format, cluster_size, dict(scope), images, blocks)
    steps = expander.steps(steps_node, scope)
    for name, block in blocks.items():
        if name not in expander.used_blocks:
            raise CaseError(path, block.line, f"block {name!r} is never used")
    return Case(path=path, seq=seq, title=title, format=case_format, images=images,
                steps=tuple(steps))


def _shown(node: Node) -> str:
    return repr(node.value) if isinstance(node, Scalar) else node.kind


def _required_text(path: Path, root: Map, key: str) -> str:
    node = root.get(key)
    if node is None:
        raise CaseError(path, root.line, f"the case needs a '{key}'")
    if not isinstance(node, Scalar) or not isinstance(node.value, str) or not node.value.strip():
        raise CaseError(path, node.line, f"{key} must be a non-empty text")
    return node.value


def _choice(path: Path, node: Node | None, what: str, choices: tuple[str, ...],
            default: str) -> str:
    if node is None:
        return default
    if not isinstance(node, Scalar) or node.value not in choices:
        raise CaseError(path, node.line, f"{what} must be one of {', '.join(choices)}, "
                                         f"not {_shown(node)}")
    return str(node.value)


def _value(path: Path, node: Node, scope: dict[str, Value], what: str, *,
           defer_paths: bool = False) -> Value:
    """A scalar with placeholders substituted. Image paths exist only in
    steps; a variable may hold one (`defer_paths`) for the steps to resolve."""
    if not isinstance(node, Scalar):
        raise CaseError(path, node.line, f"{what} must be a single value, not {node.kind}")
    if not isinstance(node.value, str):
        return node.value

    def paths(ref: PathRef) -> str:
        if defer_paths:
            return ref.deferred()
        raise ValueError(f"'${{path:{ref.image}}}' cannot be used here, only in steps "
                         "and variables")

    try:
        return interpolate(node.value, scope, paths)
    except ValueError as error:
        raise CaseError(path, node.line, str(error)) from None


def _size(path: Path, node: Node, scope: dict[str, Value], what: str) -> str | None:
    value = _value(path, node, scope, what)
    if value is None:
        return None
    text = "" if isinstance(value, bool) else str(value)
    if not SIZE_TEXT.fullmatch(text):
        raise CaseError(path, node.line, f"{what} must be a byte count such as 1048576 or "
                                         f"128M, not {value!r}")
    return text


def _define_vars(path: Path, node: Node, scope: dict[str, Value],
                 var_lines: dict[str, int]) -> None:
    expect(path, node, Map, "vars")
    assert isinstance(node, Map)
    for key, value in node.items():
        name = str(key.value)
        if not NAME.fullmatch(name):
            raise CaseError(path, key.line, f"{name!r} is not a valid variable name "
                                            "(letters, digits, underscores)")
        if name in PREDEFINED:
            raise CaseError(path, key.line, f"{name!r} is predefined (the case format)")
        scope[name] = _value(path, value, scope, f"variable {name!r}", defer_paths=True)
        var_lines[name] = value.line


def _images(path: Path, node: Node, scope: dict[str, Value],
            case_format: str) -> dict[str, Image]:
    expect(path, node, Map, "images")
    assert isinstance(node, Map)
    names = node.keys()
    images: dict[str, Image] = {}
    for key, spec in node.items():
        name = str(key.value)
        if not IMAGE_NAME.fullmatch(name):
            raise CaseError(path, key.line, f"{name!r} is not a valid image name")
        if isinstance(spec, Scalar) and spec.value is None:
            spec = Map(spec.line, ())
        expect(path, spec, Map, f"image {name!r}")
        assert isinstance(spec, Map)
        check_keys(path, spec, IMAGE_KEYS, f"image {name!r}")
        fmt = _choice(path, spec.get("format"), "format", IMAGE_FORMATS, case_format)
        default_file = f"t.{case_format}" if name == "test" else f"t.{case_format}.{name}"
        file = default_file
        if (file_node := spec.get("file")) is not None:
            value = _value(path, file_node, scope, "file")
            if not isinstance(value, str):
                raise CaseError(path, file_node.line,
                                f"file must be a text, not {describe_value(value)}")
            file = value
            if not file or "/" in file or "\0" in file or file in (".", ".."):
                raise CaseError(path, file_node.line, "file must be a plain file name "
                                                      "(images live in the case's directory)")
            if len(os.fsencode(file)) > MAX_FILE_NAME:
                raise CaseError(path, file_node.line,
                                f"file name is longer than {MAX_FILE_NAME} bytes")
        size = cluster_size = backing = backing_format = None
        if (size_node := spec.get("size")) is not None:
            size = _size(path, size_node, scope, "size")
        if (cluster_node := spec.get("cluster_size")) is not None:
            cluster_size = _size(path, cluster_node, scope, "cluster_size")
            if cluster_size is not None and fmt != "qcow2":
                raise CaseError(path, cluster_node.line,
                                f"cluster_size applies to qcow2 images; {name!r} is {fmt}")
        if (backing_node := spec.get("backing")) is not None:
            value = _value(path, backing_node, scope, "backing")
            if value is not None:
                backing = str(value)
                if backing not in names:
                    raise CaseError(path, backing_node.line, f"unknown image {backing!r} "
                                                             f"(declared images: {', '.join(names)})")
                if backing == name:
                    raise CaseError(path, backing_node.line,
                                    f"image {name!r} cannot be its own backing file")
        if (bfmt_node := spec.get("backing_format")) is not None:
            value = _value(path, bfmt_node, scope, "backing_format")
            backing_format = None if value is None else str(value)
        options: tuple[tuple[str, str], ...] = ()
        if (options_node := spec.get("options")) is not None:
            options = _image_options(path, options_node, scope)
        if any(other.file == file for other in images.values()):
            raise CaseError(path, key.line, f"image {name!r} uses the same file ({file}) as "
                                            "another image")
        images[name] = Image(name=name, file=file, format=fmt, size=size,
                             cluster_size=cluster_size, backing=backing,
                             backing_format=backing_format, options=options)
    return images


def _image_options(path: Path, node: Node, scope: dict[str, Value]) -> tuple[tuple[str, str], ...]:
    options = create_options(path, node, lambda value, what: _value(path, value, scope, what),
                             "the image's")
    return tuple((name, value) for name, value in options.items() if value is not None)


def _blocks(path: Path, node: Node) -> dict[str, Block]:
    expect(path, node, Map, "blocks")
    assert isinstance(node, Map)
    blocks: dict[str, Block] = {}
    for key, spec in node.items():
        name = str(key.value)
        if not IMAGE_NAME.fullmatch(name):
            raise CaseError(path, key.line, f"{name!r} is not a valid block name")
        params: tuple[str, ...] = ()
        steps = spec
        if isinstance(spec, Map):
            check_keys(path, spec, ("params", "steps"), f"block {name!r}")
            params_node = spec.get("params")
            steps_node = spec.get("steps")
            if steps_node is None:
                raise CaseError(path, spec.line, f"block {name!r} has no 'steps'")
            steps = steps_node
            if params_node is not None:
                expect(path, params_node, Seq, "params")
                assert isinstance(params_node, Seq)
                names = []
                for item in params_node.items:
                    if not isinstance(item, Scalar) or not isinstance(item.value, str) \
                            or not NAME.fullmatch(item.value):
                        raise CaseError(path, item.line, "each parameter must be a variable "
                                                         f"name, not {_shown(item)}")
                    if item.value in names:
                        raise CaseError(path, item.line, f"parameter {item.value!r} is "
                                                         "listed twice")
                    names.append(item.value)
                params = tuple(names)
        expect(path, steps, Seq, f"block {name!r}")
        assert isinstance(steps, Seq)
        blocks[name] = Block(name=name, line=key.line, params=params, steps=steps)
    return blocks
