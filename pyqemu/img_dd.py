"""qemu-img dd: copy an image block by block into a new one, dd(1) style.

Operands are bs=, count=, if=, of=, skip=; the output image is created with
the size left after skipping (QEMU's arithmetic, quirks included: count
limits the input end, not the amount after the skip) and every block is
written, as img_dd does.
"""

from __future__ import annotations

from pyqemu.blockopts import QemuOpts, path_has_protocol
from pyqemu.img import FORCE_SHARE, HELP, IMAGE_OPTS, OBJECT, Exit, ImgTool
from pyqemu.img_create import cvtnum, format_options
from pyqemu.img_open import open_image
from pyqemu.units import INT64_MAX

INT_MAX = (1 << 31) - 1


def main(tool: ImgTool, argv: list[str]) -> int:
    import imgengine

    out_fmt = "raw"
    fmt: str | None = None
    image_opts = False
    force_share = False
    parser = tool.getopt(argv, ":hf:O:U", (HELP, OBJECT, IMAGE_OPTS, FORCE_SHARE))
    for option, value in tool.options(parser):
        if option == "O":
            out_fmt = value or ""
        elif option == "f":
            fmt = value
        elif option == "U":
            force_share = True
        elif option == "image-opts":
            image_opts = True

    block_size = 512
    count: int | None = None
    skip: int | None = None
    in_name: str | None = None
    out_name: str | None = None
    for operand in parser.argv[parser.optind:]:
        key, equals, value = operand.partition("=")
        if not equals:
            tool.error(f"unrecognized operand {operand}")
            return 1
        if key not in ("bs", "count", "if", "of", "skip"):
            tool.error(f"unrecognized operand {key}")
            return 1
        try:
            if key == "bs":
                block_size = cvtnum(tool, "bs", value, 1, INT_MAX)
            elif key == "count":
                count = cvtnum(tool, "count", value)
            elif key == "if":
                in_name = value
            elif key == "of":
                out_name = value
            else:
                skip = cvtnum(tool, "skip", value)
        except Exit:
            return 1
    if in_name is None or out_name is None:
        tool.error("Must specify both input and output files")
        return 1

    try:
        source = open_image(tool, in_name, fmt, image_opts, read_only=True,
                            force_share=force_share)
    except Exit:
        return 1
    target = None
    try:
        descs = format_options(out_fmt)
        if descs is None:
            tool.error("Unknown file format")
            return 1
        if path_has_protocol(out_name) and not out_name.startswith("file:"):
            tool.error(f"Unknown protocol '{out_name.split(':', 1)[0]}'")
            return 1
        size = source.length()
        if count is not None and count <= INT64_MAX // block_size and \
                count * block_size < size:
            size = count * block_size
        beyond = skip is not None and (skip > INT64_MAX // block_size or
                                       size < block_size * skip)
        offset = 0 if skip is None else skip * block_size
        opts = QemuOpts(descs)
        opts.set_number("size", 0 if beyond else size - offset)
        try:
            imgengine.create_image(out_name, out_fmt, {"size": opts.get("size") or "0"},
                                   unsafe=True)
        except (imgengine.ImageError, OSError) as error:
            from pyqemu.opening import error_text
            tool.error(f"{out_name}: error while creating output image: {error_text(error)}")
            return 1
        try:
            target = open_image(tool, out_name, out_fmt, False, read_only=False)
        except Exit:
            return 1
        if beyond:
            tool.error(f"{in_name}: cannot skip to specified offset")
            position = size
        else:
            position = offset
        written = 0
        while position < size:
            length = min(block_size, size - position)
            try:
                data = source.read(position, length)
            except (imgengine.ImageError, OSError) as error:
                tool.notice(error)
                tool.error("error while reading from input image file: "
                           f"{_strerror(error)}")
                return 1
            position += length
            try:
                target.write(written, data)
            except (imgengine.ImageError, OSError) as error:
                tool.notice(error)
                tool.error(f"error while writing to output image file: {_strerror(error)}")
                return 1
            written += length
        return 0
    finally:
        source.close()
        if target is not None:
            target.close()


def _strerror(error: BaseException) -> str:
    import os
    code = getattr(error, "errno", None)
    return os.strerror(code if isinstance(code, int) and code > 0 else 5)
