"""qemu-img map: the allocation of every range, human or JSON.

JSON output prints the engine's merged entries (BlockNode.map_runs, which
walks and merges in bulk, as qemu-img would entry by entry). The human
format keeps img_map's own walk: one step of block status through the chain
at a time (BlockNode.map_entry), steps that continue each other merged,
every range without plain data treated as a hole, exactly as QEMU does.
"""

# QEMU's printf formats are reproduced as printf formats on purpose.
# ruff: noqa: UP031

from __future__ import annotations

from pyqemu.getopt import REQUIRED_ARGUMENT, LongOption
from pyqemu.img import FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT, Exit, ImgTool
from pyqemu.img_create import cvtnum
from pyqemu.img_open import open_image

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any

    from imgengine import MapEntry

START_OFFSET = LongOption("start-offset", REQUIRED_ARGUMENT, "s")
MAX_LENGTH = LongOption("max-length", REQUIRED_ARGUMENT, "l")


def _continues(entry: MapEntry, other: MapEntry) -> bool:
    """entry_mergeable: does other carry on where entry ends?"""
    if entry.length == 0:
        return False
    if (entry.zero, entry.data, entry.depth, entry.present) != \
            (other.zero, other.data, other.depth, other.present):
        return False
    if (entry.filename is None) != (other.filename is None):
        return False
    if (entry.offset is None) != (other.offset is None):
        return False
    if entry.filename is not None and entry.filename != other.filename:
        return False
    if entry.offset is not None and entry.offset + entry.length != other.offset:
        return False
    return True


def _empty(start: int) -> MapEntry:
    import imgengine
    return imgengine.MapEntry(start, 0, 0, False, False, False, None)


def _hex(value: int) -> str:
    """C's %#-16x: 0x-prefixed, left-justified, but a bare 0 for zero."""
    text = "0" if value == 0 else "%#x" % value
    return text.ljust(16)


def _json(entry: MapEntry) -> str:
    text = ('{ "start": %d, "length": %d, "depth": %d, "present": %s, "zero": %s, "data": %s'
            % (entry.start, entry.length, entry.depth, _bool(entry.present),
               _bool(entry.zero), _bool(entry.data)))
    if entry.offset is not None:
        text += ', "offset": %d' % entry.offset
    return text + "}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def main(tool: ImgTool, argv: list[str]) -> int:
    fmt: str | None = None
    output: str | None = None
    image_opts = False
    force_share = False
    start_offset = 0
    max_length = -1
    parser = tool.getopt(argv, ":f:s:l:hU", (HELP, FORMAT, OUTPUT, OBJECT, IMAGE_OPTS,
                                             FORCE_SHARE, START_OFFSET, MAX_LENGTH))
    for option, value in tool.options(parser):
        if option == "f":
            fmt = value
        elif option == "U":
            force_share = True
        elif option == "output":
            output = value
        elif option == "s":
            start_offset = cvtnum(tool, "start offset", value or "")
        elif option == "l":
            max_length = cvtnum(tool, "max length", value or "")
        elif option == "image-opts":
            image_opts = True
    filename = tool.one_filename(parser)
    as_json = tool.output_is_json(output)

    node = open_image(tool, filename, fmt, image_opts, read_only=True, force_share=force_share)
    try:
        return _walk(tool, node, filename, as_json, start_offset, max_length)
    finally:
        node.close()


def _walk(tool: ImgTool, node: object, filename: str, as_json: bool, start_offset: int,
          max_length: int) -> int:
    import imgengine

    if as_json:
        tool.out("[")
    else:
        tool.out("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
    try:
        length = node.length()  # type: ignore[attr-defined]
    except (imgengine.ImageError, OSError) as error:
        tool.notice(error)
        tool.error(f"Failed to get size for '{filename}'")
        return 1
    if max_length != -1:
        length = min(start_offset + max_length, length)
    if as_json:
        return _json_from_engine(tool, node, start_offset, length)

    current = _empty(start_offset)
    while current.start + current.length < length:
        offset = current.start + current.length
        try:
            # a new entry each step: printing may rewrite its flags
            following = node.map_entry(offset, length - offset)  # type: ignore[attr-defined]
        except (imgengine.ImageError, OSError) as error:
            tool.notice(error)
            tool.error(f"Could not read file metadata: {_strerror(error)}")
            return 1
        if _continues(current, following):
            current.length += following.length
            continue
        if current.length > 0 and not _print_human(tool, current, following):
            return 1
        current = following
    if not _print_human(tool, current, None):
        return 1
    return 0


# Entries formatted per batch: one console write per batch instead of one
# per entry.  A batch (~28 KiB of text) stays below malloc's mmap threshold:
# with 4096 entries each batch and its copies were fresh mmaps, and their
# page faults cost more than the batching saved.
_JSON_BATCH = 256


def _json_template(depth: int, present: bool, zero: bool, data: bool,
                   has_offset: bool) -> bytes:
    """_json's text for entries of one kind, with %d left for start, length
    (and offset): formatting an entry is then a single % operation (on
    bytes, which is quicker than on str and needs no encoding after)."""
    text = ('{ "start": %%d, "length": %%d, "depth": %d, "present": %s, "zero": %s, '
            '"data": %s' % (depth, _bool(present), _bool(zero), _bool(data)))
    if has_offset:
        text += ', "offset": %d'
    return (text + "}").encode()


def _json_from_engine(tool: ImgTool, node: Any, start: int, end: int) -> int:
    """JSON output from the engine's merged entries (BlockNode.map_runs does
    QEMU's merging, and in bulk): each entry printed once the next is known."""
    import imgengine

    runs = node.map_runs(start, end - start)
    # Templates by (depth, present, zero, data), for entries without and with
    # a host offset.
    plain: dict[tuple[int, bool, bool, bool], bytes] = {}
    located: dict[tuple[int, bool, bool, bool], bytes] = {}
    # Formatted entries not yet printed; the last is held back until the next
    # one is known, as QEMU prints an entry only once it cannot grow.
    lines: list[bytes] = []
    append = lines.append
    try:
        for run_start, length, depth, present, zero, data, offset, _file in runs:
            kind = (depth, present, zero, data)
            if offset is None:
                template = plain.get(kind)
                if template is None:
                    template = plain[kind] = _json_template(*kind, False)
                append(template % (run_start, length))
            else:
                template = located.get(kind)
                if template is None:
                    template = located[kind] = _json_template(*kind, True)
                append(template % (run_start, length, offset))
            if len(lines) > _JSON_BATCH:
                _out_lines(tool, b",\n".join(lines[:-1]) + b",\n")
                del lines[:-1]
    except (imgengine.ImageError, OSError) as error:
        if len(lines) > 1:
            _out_lines(tool, b",\n".join(lines[:-1]) + b",\n")
        tool.notice(error)
        tool.error(f"Could not read file metadata: {_strerror(error)}")
        return 1
    if not lines:
        lines.append(_json(_empty(start)).encode())
    _out_lines(tool, b",\n".join(lines) + b"]\n")
    return 0


def _out_lines(tool: ImgTool, data: bytes) -> None:
    """Print what QEMU prints in many short printf calls (each shorter than
    stdout's buffer) in one go, leaving stdout's buffer as those calls would:
    all but the last byte in one call, then the last byte, so that output
    ending on a block boundary stays buffered rather than written."""
    tool.console.out_bytes(data[:-1])
    tool.console.out_bytes(data[-1:])


def _print_human(tool: ImgTool, entry: MapEntry, following: MapEntry | None) -> bool:
    """dump_map_entry, human; False after QEMU's error for data it cannot locate."""
    if entry.data and entry.offset is None:
        tool.error("File contains external, encrypted or compressed clusters.")
        return False
    if entry.data and not entry.zero:
        tool.out(_hex(entry.start) + _hex(entry.length) + _hex(entry.offset or 0)
                 + (entry.filename or "") + "\n")
    if following is not None and (not following.data or following.zero):
        following.data = False
        following.zero = True
    return True


def _strerror(error: BaseException) -> str:
    import os
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(error)


__all__ = ["main", "Exit"]
