"""The qemu-iotests output filters, as small pure functions.

Each function takes the raw text of one command's output and a
FilterContext (the values the bash filters read from the environment:
TEST_DIR, IMGFMT, ...) and returns what the filter of the same name in
qemu-iotests' `common.filter` (or the pipeline in `common.rc` it is named
after) would print for it. They work line by line, as sed does; where the
bash filter reads lines with `read`, so do these (a final line without a
newline is dropped; plain `read` trims surrounding blanks).

tests/harness/test_filters.py feeds real QEMU output to both these
functions and the bash originals and requires identical results.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import methodcaller


@dataclass(frozen=True)
class FilterContext:
    test_dir: str  # the case's temporary directory (no trailing slash)
    imgfmt: str  # the case's image format
    sock_dir: str | None = None
    imgproto: str = "file"

    @property
    def remote_test_dir(self) -> str:
        """For the file protocol, qemu-iotests' REMOTE_TEST_DIR is TEST_DIR."""
        return self.test_dir


Filter = Callable[[str, FilterContext], str]


def _lines(text: str) -> Iterator[str]:
    """Lines with their line ends, as sed sees them."""
    return iter(text.splitlines(keepends=True))


def _split_end(line: str) -> tuple[str, str]:
    if line.endswith("\n"):
        return line[:-1], "\n"
    return line, ""


def _read_lines(text: str, *, trim: bool) -> Iterator[str]:
    """What `while read -r line` yields: complete lines only; `trim` is the
    default IFS (surrounding spaces and tabs removed), IFS='' keeps them."""
    parts = text.split("\n")
    for line in parts[:-1]:
        yield line.strip(" \t") if trim else line


def _per_line(text: str, edit: Callable[[str], str | None]) -> str:
    """Apply `edit` to each line without its newline; None deletes the line."""
    out = []
    for line in _lines(text):
        body, end = _split_end(line)
        edited = edit(body)
        if edited is not None:
            out.append(edited + end)
    return "".join(out)


# -- paths and names -----------------------------------------------------------

def filter_testdir(text: str, ctx: FilterContext) -> str:
    """_filter_testdir: the test directory (and socket directory) by name."""
    text = text.replace(ctx.test_dir + "/", "TEST_DIR/")
    if ctx.sock_dir:
        text = text.replace(ctx.sock_dir + "/", "SOCK_DIR/")
    return text.replace("SOCK_DIR/fuse-", "TEST_DIR/")


def filter_imgfmt(text: str, ctx: FilterContext) -> str:
    """_filter_imgfmt: the image format by name."""
    return text.replace(ctx.imgfmt, "IMGFMT")


def filter_win32(text: str, ctx: FilterContext) -> str:
    """_filter_win32: carriage returns removed."""
    return text.replace("\r", "")


def filter_img_create_filenames(text: str, ctx: FilterContext) -> str:
    """_filter_img_create_filenames: directories and format in create output.

    (Its NBD address forms are left out: the harness only uses files.)
    """
    text = _dir_names(text, ctx)
    if ctx.sock_dir:
        text = text.replace(ctx.sock_dir, "SOCK_DIR")
    text = text.replace("SOCK_DIR/fuse-", "TEST_DIR/")
    return text.replace(ctx.imgfmt, "IMGFMT")


def _dir_names(text: str, ctx: FilterContext) -> str:
    """The remote, protocol-prefixed and plain test directory, in the order the
    bash filters replace them (so for files the `proto:` form never matches)."""
    text = text.replace(ctx.remote_test_dir, "TEST_DIR")
    text = text.replace(f"{ctx.imgproto}:{ctx.test_dir}", "TEST_DIR")
    return text.replace(ctx.test_dir, "TEST_DIR")


# -- qemu-io -------------------------------------------------------------------

_IO_TIMING = re.compile(
    r"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec and [0-9/.inf]* ops/sec\)"
)
_IO_TIMING_SHOWN = "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)"
_SHELL_CRASH = re.compile(r": line [0-9][0-9]*:  *[0-9][0-9]*( Aborted| Killed)")


def filter_qemu_io(text: str, ctx: FilterContext) -> str:
    """_filter_qemu_io: the timing line of each request made constant."""
    text = filter_win32(text, ctx)

    def edit(line: str) -> str:
        if " ops" in line:
            line = _IO_TIMING.sub(_IO_TIMING_SHOWN, line, count=1)
        if ": line " in line:
            line = _SHELL_CRASH.sub(r":\1", line, count=1)
        return line.replace("qemu-io> ", "")

    return _per_line(text, edit)


# -- qemu-img create -----------------------------------------------------------

_KEPT_OPTIONS = ("fmt", "size", "backing", "preallocation", "encryption")
_OPTION_RANK = (("fmt", "0-"), ("size", "1-"), ("backing", "2-"), ("data_file", "3-"),
                ("encryption", "4-"), ("preallocation", "8-"))
_OPTION_BREAK = re.compile(r" ([a-z0-9_.-]*)=")
_RANK_PREFIX = re.compile(r"^[0-9]-")


def _formatting_line(line: str, ctx: FilterContext, keep_data_file: bool) -> str | None:
    """_do_filter_img_create on one `Formatting '...', fmt=...` line.

    The options part is cut into one option per line, only fmt, size,
    backing*, preallocation, encryption (and data_file) are kept, and they
    are put in that order. The bash original carries the line's end through
    its pipeline as NUL bytes, which come back as newlines if the last
    option survives; that is reproduced because it decides blank output.
    """
    head, found, tail = line.partition(", fmt=")
    options = "fmt=" + (tail + "\n" if found else "")
    filename_part = filter_img_create_filenames(head, ctx).rstrip("\n")

    stream = (options + "\n").replace("\n", "\0")
    pieces = _OPTION_BREAK.sub(lambda m: "\n" + m.group(1) + "=", stream).split("\n")
    kept = [p for p in pieces
            if p.startswith(_KEPT_OPTIONS) or (keep_data_file and "data_file" in p)]
    ranked = []
    for piece in kept:
        piece = filter_img_create_filenames(piece, ctx)
        for name, rank in _OPTION_RANK:
            if piece.startswith(name):
                piece = rank + piece
                break
        ranked.append(piece)
    ordered = [_RANK_PREFIX.sub("", piece, count=1) for piece in sorted(ranked)]
    joined = "".join(piece + " " for piece in ordered).replace("\0", "\n")
    cleaned = [re.sub(r" *$", "", "" if re.fullmatch(r" *", part) else part)
               for part in joined.split("\n")]
    text = "\n".join(cleaned).rstrip("\n")
    if text:
        return f"{filename_part}, {text}"
    if filename_part:
        return filename_part
    return None


def filter_img_create(text: str, ctx: FilterContext) -> str:
    """_filter_img_create: the `Formatting` line reduced to the stable options."""
    out = []
    for line in _read_lines(text, trim=True):
        if line.startswith("Formatting"):
            shown = _formatting_line(line, ctx, keep_data_file=True)
            if shown is not None:
                out.append(shown + "\n")
        else:
            out.append(filter_img_create_filenames(line, ctx) + "\n")
    return "".join(out)


def filter_img_create_size(text: str, ctx: FilterContext) -> str:
    """_filter_img_create_size: the size option made constant."""
    return re.sub(r" size=[0-9]+", " size=SIZE", text)


# -- qemu-img map --------------------------------------------------------------

_MAP_COLUMNS = re.compile(r"([0-9a-fx]* *[0-9a-fx]* *)[0-9a-fx]* *")
_MAP_OFFSET = re.compile(r'"offset": [0-9]+')
# The replacement r"\1", as a C-level callable: _MAP_COLUMNS matches (mostly
# empty) at nearly every position of a line, and expanding a template per
# match is most of this filter's time.
_first_group = methodcaller("group", 1)


def filter_qemu_img_map(text: str, ctx: FilterContext) -> str:
    """_filter_qemu_img_map: host offsets removed (human and json output)."""

    def edit(line: str) -> str:
        line = _MAP_COLUMNS.sub(_first_group, line)
        line = _MAP_OFFSET.sub('"offset": OFFSET', line)
        return re.sub(r"Mapped to *", "", line, count=1)

    return filter_imgfmt(filter_testdir(_per_line(text, edit), ctx), ctx)


# -- qemu-img check ------------------------------------------------------------

_CHECK_STATS = re.compile(r"allocated.*fragmented.*compressed clusters")
_CHECK_END = re.compile(r"Image end offset: [0-9]+")


def filter_qemu_img_check(text: str, ctx: FilterContext) -> str:
    """_filter_qemu_img_check: statistics and end offset dropped."""

    def edit(line: str) -> str | None:
        if _CHECK_STATS.search(line):
            return None
        line = line.replace("qemu-img: This image format does not support checks",
                            "No errors were found on the image.", 1)
        if _CHECK_END.search(line):
            return None
        return line

    return _per_line(text, edit)


# -- qemu-img info -------------------------------------------------------------

_SPECIFIC_JSON_START = re.compile(r'^ *"format-specific": \{')


def _drop_format_specific(text: str, keep: bool) -> str:
    """The `while IFS='' read -r line` loop both info filters end with: the
    human `Format specific information:` section (up to its blank line) and
    the json `"format-specific": {...}` object are left out unless `keep`."""
    out = []
    discard = 0
    end: re.Pattern[str] | None = None
    for line in _read_lines(text, trim=False):
        if keep:
            discard = 0
        elif line == "Format specific information:":
            discard = 1
        elif _SPECIFIC_JSON_START.search(line):
            discard = 2
            indent = line[: len(line) - len(line.lstrip(" "))]
            end = re.compile("^" + re.escape(indent) + r"\},? *$")
        if discard == 0:
            out.append(line + "\n")
        elif discard == 1 and not line:
            out.append("\n")
            discard = 0
        elif discard == 2 and end is not None and end.search(line):
            discard = 0
    return "".join(out)


_INFO_EDITS: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (kind, re.compile(pattern), replacement) for kind, pattern, replacement in (
        ("d", r"encrypted: yes", ""),
        ("d", r"cluster_size: [0-9]+", ""),
        ("d", r"table_size: [0-9]+", ""),
        ("d", r"compat: '[^']*'", ""),
        ("d", r"compat6: (on|off)", ""),
        ("s", r"cid: [0-9]+", "cid: XXXXXXXXXX"),
        ("d", r"static: (on|off)", ""),
        ("d", r"zeroed_grain: (on|off)", ""),
        ("d", r"subformat: '[^']*'", ""),
        ("d", r"adapter_type: '[^']*'", ""),
        ("d", r"hwversion: '[^']*'", ""),
        ("d", r"lazy_refcounts: (on|off)", ""),
        ("d", r"extended_l2=(on|off)", ""),
        ("d", r"block_size: [0-9]+", ""),
        ("d", r"block_state_zero: (on|off)", ""),
        ("d", r"log_size: [0-9]+", ""),
        ("s", r"iters: [0-9]+", "iters: 1024"),
        ("s", r"(compression type: )(zlib|zstd)", r"\1COMPRESSION_TYPE"),
        ("s", r"uuid: [-a-f0-9]+", "uuid: 00000000-0000-0000-0000-000000000000"),
    )
)


def _img_info(text: str, ctx: FilterContext, format_specific: bool) -> str:
    def edit(line: str) -> str | None:
        line = _dir_names(line, ctx)
        if ctx.sock_dir:
            line = line.replace(ctx.sock_dir, "SOCK_DIR")
        line = line.replace(ctx.imgfmt, "IMGFMT").replace("SOCK_DIR/fuse-", "TEST_DIR/")
        for kind, pattern, replacement in _INFO_EDITS:
            if kind == "d":
                if pattern.search(line):
                    return None
            else:
                line = pattern.sub(replacement, line, count=1)
        return line

    return _drop_format_specific(_per_line(text, edit), format_specific)


_COMPRESSION = re.compile(r"(compression type: )(zlib|zstd)")


def filter_img_info(text: str, ctx: FilterContext) -> str:
    """_filter_img_info: names, variable fields and format-specific data."""
    return _img_info(text, ctx, format_specific=False)


def filter_img_info_format_specific(text: str, ctx: FilterContext) -> str:
    """_filter_img_info --format-specific: the same, keeping format-specific data."""
    return _img_info(text, ctx, format_specific=True)


def _img_info_rc(text: str, ctx: FilterContext, format_specific: bool) -> str:
    def edit(line: str) -> str | None:
        line = _dir_names(line, ctx)
        if ctx.sock_dir:
            line = line.replace(ctx.sock_dir + "/fuse-", "TEST_DIR/")
        line = line.replace(ctx.imgfmt, "IMGFMT")
        line = _COMPRESSION.sub(r"\1COMPRESSION_TYPE", line, count=1)
        if line.startswith("disk size:") or "actual-size" in line:
            return None
        return line

    return _drop_format_specific(_per_line(text, edit), format_specific)


def filter_img_info_rc(text: str, ctx: FilterContext) -> str:
    """What common.rc's `_img_info` pipes `qemu-img info` through: names,
    the disk size lines and format-specific data removed."""
    return _img_info_rc(text, ctx, format_specific=False)


def filter_img_info_rc_format_specific(text: str, ctx: FilterContext) -> str:
    """`_img_info --format-specific`: the same, keeping format-specific data."""
    return _img_info_rc(text, ctx, format_specific=True)


def filter_actual_image_size(text: str, ctx: FilterContext) -> str:
    """_filter_actual_image_size: the json actual-size made constant."""
    return re.sub(r'("actual-size":\s*)[0-9]+', r"\1SIZE", text)


REGISTRY: dict[str, Filter] = {
    "testdir": filter_testdir,
    "imgfmt": filter_imgfmt,
    "win32": filter_win32,
    "qemu_io": filter_qemu_io,
    "img_create": filter_img_create,
    "img_create_filenames": filter_img_create_filenames,
    "img_create_size": filter_img_create_size,
    "qemu_img_map": filter_qemu_img_map,
    "qemu_img_check": filter_qemu_img_check,
    "img_info": filter_img_info,
    "img_info_format_specific": filter_img_info_format_specific,
    "img_info_rc": filter_img_info_rc,
    "img_info_rc_format_specific": filter_img_info_rc_format_specific,
    "actual_image_size": filter_actual_image_size,
}


def apply(names: tuple[str, ...], text: str, ctx: FilterContext) -> str:
    """Run the named filters over `text`, in order (a shell pipeline)."""
    for name in names:
        text = REGISTRY[name](text, ctx)
    return text
