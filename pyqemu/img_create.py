"""qemu-img create: options, the "Formatting ..." line, and the engine's create.

The option handling is bdrv_img_create's: -o lists are checked against the
format's creation options plus the file protocol's, -b/-F override them, a
backing file is opened (unless -u) to learn its size and check its format, and
the line QEMU prints before creating lists every option that has a value.
"""

from __future__ import annotations

import errno as errno_codes

from pyqemu.blockopts import (
    OptionDesc,
    OptionError,
    QemuOpts,
    full_backing_filename,
    has_help_option,
    help_text,
    is_valid_option_list,
    parse_into,
    path_has_protocol,
)
from pyqemu.img import HELP, OBJECT, Exit, ImgTool
from pyqemu.units import INT64_MAX, SizeError, strtosz

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any

# file-posix's creation options: the protocol layer under every format here
FILE_PROTOCOL_OPTIONS = (
    OptionDesc("size", "size", "Virtual disk size"),
    OptionDesc("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    OptionDesc("preallocation", "string", "Preallocation mode (allowed values: off, falloc, full)"),
    OptionDesc("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
)

_TYPE_NAMES = {"str": "string", "string": "string", "bool": "bool", "boolean": "bool",
               "num": "number", "number": "number", "int": "number", "size": "size"}


def _desc_from_engine(option: Any) -> OptionDesc:
    """imgengine.CreateOption (or a tuple of its fields) as an OptionDesc."""
    if isinstance(option, tuple):
        name, kind, help_line, default = (tuple(option) + (None, None, None))[:4]
    else:
        name = option.name
        kind = option.type
        help_line = getattr(option, "help", "")
        default = getattr(option, "default", None)
    return OptionDesc(name, _TYPE_NAMES.get(str(kind), str(kind)), help_line or "",
                      None if default is None else str(default))


def format_options(fmt: str, with_protocol: bool = True) -> list[OptionDesc] | None:
    """The format's creation options (with the file protocol's appended, as QEMU
    appends them once a file name is known), or None for an unknown format."""
    import imgengine
    try:
        try:
            table = imgengine.create_options(fmt, with_protocol=with_protocol)
            protocol_included = True
        except TypeError:       # an engine whose create_options takes only fmt
            table = imgengine.create_options(fmt)
            protocol_included = False
    except (imgengine.ImageError, KeyError, ValueError):
        return None
    descs = [_desc_from_engine(option) for option in table]
    if with_protocol and not protocol_included:
        descs = append_options(descs, FILE_PROTOCOL_OPTIONS)
    return descs


def append_options(first: list[OptionDesc], more: tuple[OptionDesc, ...]) -> list[OptionDesc]:
    """qemu_opts_append: later lists add only names not seen yet."""
    names = {desc.name for desc in first}
    return first + [desc for desc in more if desc.name not in names]


def cvtnum(tool: ImgTool, name: str, value: str, low: int = 0, high: int = INT64_MAX) -> int:
    """qemu-img's cvtnum_full, reporting with its two-line wording."""
    try:
        number = strtosz(value, tool.console.warn_report)
    except SizeError as error:
        if error.errno != errno_codes.ERANGE:
            tool.error(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for")
            tool.error("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            raise Exit(1) from None
        number = None
    if number is None or number > high or number < low:
        tool.error(f"Invalid {name} specified. Must be between {low} and {high}.")
        raise Exit(1)
    return number


def _print_option_help(tool: ImgTool, filename: str | None, fmt: str) -> int:
    descs = format_options(fmt, with_protocol=filename is not None)
    if descs is None:
        tool.error(f"Unknown file format '{fmt}'")
        return 1
    if filename is not None:
        if path_has_protocol(filename) and not filename.startswith("file:"):
            tool.error(f"Unknown protocol '{filename.split(':', 1)[0]}'")
            return 1
        tool.out("Supported options:\n")
    else:
        tool.out(f"Supported {fmt} options:\n")
    lines = help_text(descs)
    tool.out("".join(line + "\n" for line in lines))
    if filename is None:
        tool.out("\nThe protocol level may support further options.\n"
                 "Specify the target filename to include those options.\n")
    return 0


class _CreateFailed(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


def main(tool: ImgTool, argv: list[str]) -> int:
    fmt = "raw"
    base_fmt: str | None = None
    base_filename: str | None = None
    options: str | None = None
    quiet = False
    no_backing = False
    parser = tool.getopt(argv, ":F:b:f:ho:qu", (HELP, OBJECT))
    for option, value in tool.options(parser):
        if option == "F":
            base_fmt = value
        elif option == "b":
            base_filename = value
        elif option == "f":
            fmt = value or ""
        elif option == "o":
            assert value is not None
            if not is_valid_option_list(value):
                tool.error(f"Invalid option list: {value}")
                return 1
            options = value if options is None else f"{options},{value}"
        elif option == "q":
            quiet = True
        elif option == "u":
            no_backing = True
    args = parser.argv[parser.optind:]
    filename = args[0] if args else None
    if options is not None and has_help_option(options):
        return _print_option_help(tool, filename, fmt)
    if filename is None:
        raise tool.error_exit("Expecting image file name")
    size = -1
    if len(args) > 1:
        size = cvtnum(tool, "image size", args[1])
    if len(args) > 2:
        raise tool.error_exit(f"Unexpected argument: {args[2]}")
    try:
        _create(tool, filename, fmt, base_filename, base_fmt, options, size, no_backing, quiet)
    except _CreateFailed as failure:
        tool.error(f"{filename}: {failure}")
        if failure.hint:
            tool.console.err(failure.hint)
        return 1
    return 0


def _create(tool: ImgTool, filename: str, fmt: str, base_filename: str | None,
            base_fmt: str | None, options: str | None, size: int, no_backing: bool,
            quiet: bool) -> None:
    import imgengine

    descs = format_options(fmt)
    if descs is None:
        raise _CreateFailed(f"Unknown file format '{fmt}'")
    if path_has_protocol(filename) and not filename.startswith("file:"):
        raise _CreateFailed(f"Unknown protocol '{filename.split(':', 1)[0]}'")
    opts = QemuOpts(descs)
    try:
        if options is not None:
            parse_into(opts, options)
    except OptionError as error:
        raise _CreateFailed(str(error), error.hint) from None
    if not opts.has("size"):
        opts.set_number("size", size & ((1 << 64) - 1))
    elif size != -1:
        raise _CreateFailed("The image size must be specified only once")
    for value, name, what in ((base_filename, "backing_file", "Backing file"),
                              (base_fmt, "backing_fmt", "Backing file format")):
        if value is None:
            continue
        try:
            opts.set(name, value)
        except OptionError:
            raise _CreateFailed(f"{what} not supported for file format '{fmt}'") from None
    backing_file = opts.get("backing_file")
    if backing_file is not None:
        if backing_file == filename:
            raise _CreateFailed(
                "Error: Trying to create an image with the same filename as the backing file")
        if backing_file == "":
            raise _CreateFailed("Expected backing file name, got empty string")
    backing_fmt = opts.get("backing_fmt")
    size_item = opts.find("size")
    image_size = int(size_item.value) if size_item is not None else -1  # type: ignore[call-overload]
    if image_size >= 1 << 63:
        image_size -= 1 << 64
    if backing_file is not None and not no_backing:
        try:
            full = full_backing_filename(filename, backing_file)
        except OptionError as error:
            raise _CreateFailed(str(error)) from None
        try:
            node = imgengine.open_image(full, fmt=backing_fmt, read_only=True)
        except (imgengine.ImageError, OSError) as error:
            from pyqemu.opening import error_text
            raise _CreateFailed(error_text(error), "Could not open backing image.\n") from None
        try:
            if backing_fmt is None:
                raise _CreateFailed("Backing file specified without backing format",
                                    f"Detected format of {node.format_name}.")
            if image_size == -1:
                image_size = node.length()
                opts.set_number("size", image_size)
        finally:
            node.close()
    elif backing_file is not None and backing_fmt is None:
        raise _CreateFailed("Backing file specified without backing format")
    if image_size == -1:
        raise _CreateFailed("Image creation needs a size parameter")
    if not quiet:
        tool.out(f"Formatting '{filename}', fmt={fmt} {opts.print_line()}\n")
        tool.console.flush()
    values = opts.command_line_values()
    values["size"] = str(image_size)
    try:
        # the backing file was checked above, as QEMU checks it: the engine
        # need not open it again
        imgengine.create_image(filename, fmt, values, unsafe=True)
    except (imgengine.ImageError, OSError) as error:
        if getattr(error, "errno", None) == errno_codes.EFBIG:
            hint = " (try using a larger cluster size)" if _cluster_size(opts) else ""
            raise _CreateFailed(
                f"The image size is too large for file format '{fmt}'{hint}") from None
        from pyqemu.opening import error_text
        raise _CreateFailed(error_text(error)) from None


def _cluster_size(opts: QemuOpts) -> int:
    item = opts.find("cluster_size")
    if item is not None:
        return int(item.value)  # type: ignore[call-overload]
    default = opts.get("cluster_size")
    return strtosz(default) if default else 0
