"""How a front end turns its image arguments into an imgengine.open_image call.

A plain filename (with -f), a `json:{...}` filename, or an --image-opts
key=value string all end up as (filename, fmt, nested options); the engine
decides everything else.  Errors in the option syntax itself are reported here
with QEMU's wording, as OptionError.
"""

from __future__ import annotations

from pyqemu.blockopts import OptionError, QemuOpts, flatten, nest, parse_into, parse_json_filename

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any

FORCE_SHARE = "force-share"


if TYPE_CHECKING:
    from collections.abc import Callable

    from pyqemu.console import Console


class OpenRequest:
    """What to hand open_image: filename, format, nested options (and flat ones)."""

    def __init__(self, filename: str | None, fmt: str | None,
                 options: dict[str, Any] | None, flat: dict[str, object]) -> None:
        self.filename = filename
        self.fmt = fmt
        self.options = options
        self.flat = flat


def _finish(filename: str | None, fmt: str | None, flat: dict[str, object],
            warn: Callable[[str], None]) -> OpenRequest:
    for key in list(flat):
        if key == "backing" or key.endswith(".backing"):
            if flat[key] == "":
                warn('Use of "backing": "" is deprecated; use "backing": null instead')
                flat[key] = None
    options = nest(flat) if flat else None
    return OpenRequest(filename, fmt, options, flat)


def from_filename(filename: str, fmt: str | None, warn: Callable[[str], None],
                  extra: dict[str, object] | None = None) -> OpenRequest:
    """A filename as given on the command line, json: pseudo-protocol included.

    extra holds options the tool itself adds (they win over the filename's).
    """
    flat: dict[str, object] = {}
    if filename.startswith("json:"):
        flat.update(flatten(parse_json_filename(filename)))
        filename_arg: str | None = None
    else:
        filename_arg = filename
    if extra:
        flat.update(extra)
    return _finish(filename_arg, fmt, flat, warn)


def from_image_opts(text: str, warn: Callable[[str], None],
                    report: Callable[[str, str], None] | None = None) -> OpenRequest:
    """--image-opts: key=value pairs, a bare first value meaning file=...

    report(message, follow_up) receives QEMU's deprecation of flag shorthand.
    """
    opts = QemuOpts(None)
    parse_into(opts, text, implied_name="file", warn=report)
    flat: dict[str, object] = dict(opts.to_flat_dict())
    return _finish(None, None, flat, warn)


def force_share_conflict(request: OpenRequest) -> bool:
    """True when the options already say force-share=off (QEMU refuses -U then)."""
    value = request.flat.get(FORCE_SHARE)
    return value is not None and value not in ("on", True)


def open_node(request: OpenRequest, read_only: bool, *, check: bool = False,
              no_backing: bool = False) -> Any:
    """imgengine.open_image for the request (the engine raises ImageError);
    `check` opens as qemu-img check does (BDRV_O_CHECK), `no_backing`
    without the backing file (BDRV_O_NO_BACKING)."""
    import imgengine
    # the flat dotted form keeps "x=v,x.y=w" together, where nesting would drop one
    options = request.flat if request.flat else request.options
    return imgengine.open_image(request.filename, fmt=request.fmt, options=options,
                                read_only=read_only, check=check, no_backing=no_backing)


def print_notice(console: Console, error: BaseException) -> None:
    """A line QEMU writes to stderr on its way to failing, which the engine
    attaches to the error as `notice` (e.g. marking an image corrupt)."""
    notice = getattr(error, "notice", None)
    if notice:
        console.err(notice if notice.endswith("\n") else notice + "\n")


def print_open_messages(console: Console, node: Any) -> None:
    """Lines QEMU writes to stderr while opening (e.g. repairing a dirty image)."""
    from imgengine import ReportedLine

    for message in getattr(node, "open_messages", None) or ():
        if isinstance(message, ReportedLine):
            console.error_report(message.rstrip("\n"))
        else:
            console.err(message if message.endswith("\n") else message + "\n")


def error_text(error: BaseException) -> str:
    """The engine's own wording for an error (QEMU's inner message)."""
    if isinstance(error, OSError) and error.strerror:
        if error.filename is not None:
            return f"Could not open '{error.filename}': {error.strerror}"
        return error.strerror
    return str(error)


__all__ = ["OpenRequest", "OptionError", "from_filename", "from_image_opts", "open_node",
           "error_text", "force_share_conflict", "print_notice", "print_open_messages"]
