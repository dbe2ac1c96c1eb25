"""qemu-img resize: grow or shrink an image through the engine's truncate.

The rules are img_resize's (qemu-img.c): the size is taken off the end of the
command line before option parsing (so "-1G" is a size, not an option), parsed
as a QEMU size option, applied absolutely or relative to the current length in
signed 64-bit arithmetic, and checked (positive, --shrink to shrink,
preallocation only when growing) before the engine resizes the image.
"""

from __future__ import annotations

from pyqemu.blockopts import OptionDesc, OptionError, QemuOpts
from pyqemu.getopt import NO_ARGUMENT, REQUIRED_ARGUMENT, LongOption
from pyqemu.img import HELP, IMAGE_OPTS, OBJECT, ImgTool
from pyqemu.img_open import open_image
from pyqemu.opening import error_text

PREALLOCATION = LongOption("preallocation", REQUIRED_ARGUMENT, "preallocation")
SHRINK = LongOption("shrink", NO_ARGUMENT, "shrink")
# QEMU's PreallocMode names
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def _signed64(value: int) -> int:
    """value wrapped to a C int64_t, as img_resize's arithmetic wraps it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def main(tool: ImgTool, argv: list[str]) -> int:
    if len(argv) < 3:
        raise tool.error_exit("Not enough arguments")
    size_text = argv[-1]
    fmt: str | None = None
    quiet = image_opts = shrink = False
    prealloc = "off"
    parser = tool.getopt(argv[:-1], ":f:hq", (HELP, OBJECT, IMAGE_OPTS, PREALLOCATION, SHRINK))
    for option, value in tool.options(parser):
        if option == "f":
            fmt = value
        elif option == "q":
            quiet = True
        elif option == "image-opts":
            image_opts = True
        elif option == "preallocation":
            if value not in PREALLOCATION_MODES:
                tool.error(f"Invalid preallocation mode '{value}'")
                return 1
            prealloc = value
        elif option == "shrink":
            shrink = True
    if parser.optind != len(parser.argv) - 1:
        raise tool.error_exit("Expecting image file name and size")
    filename = parser.argv[parser.optind]

    relative = {"+": 1, "-": -1}.get(size_text[:1], 0)
    if relative:
        size_text = size_text[1:]
    opts = QemuOpts([OptionDesc("size", "size", "Virtual disk size")])
    try:
        opts.set("size", size_text)
    except OptionError as error:
        tool.error(str(error))
        if error.hint:
            tool.console.err(error.hint)
        return 1
    item = opts.find("size")
    assert item is not None
    amount = _signed64(int(item.value))

    node = open_image(tool, filename, fmt, image_opts, read_only=False)
    try:
        return _resize(tool, node, amount, relative, prealloc, shrink, quiet)
    finally:
        node.close()


def _resize(tool: ImgTool, node: object, amount: int, relative: int, prealloc: str,
            shrink: bool, quiet: bool) -> int:
    import imgengine

    try:
        current = node.length()  # type: ignore[attr-defined]
    except (imgengine.ImageError, OSError) as error:
        tool.error(f"Failed to inquire current image length: {error_text(error)}")
        return 1
    total = _signed64(current + amount * relative) if relative else amount
    if total <= 0:
        tool.error("New image size must be positive")
        return 1
    if total <= current and prealloc != "off":
        tool.error("Preallocation can only be used for growing images")
        return 1
    if total < current and not shrink:
        tool.error("Use the --shrink option to perform a shrink operation.")
        tool.console.warn_report("Shrinking an image will delete all data beyond the shrunken "
                                 "image's end. Before performing such an operation, make sure "
                                 "there is no important data there.")
        return 1
    try:
        node.truncate(total, exact=True, prealloc=prealloc)  # type: ignore[attr-defined]
    except (imgengine.ImageError, OSError) as error:
        tool.notice(error)
        tool.error(error_text(error))
        hint = getattr(error, "hint", None)
        if hint:
            tool.console.err(hint)
        return 1
    if not quiet:
        tool.out("Image resized.\n")
    return 0

