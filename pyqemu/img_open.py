"""qemu-img's img_open: a filename, json: filename or --image-opts string to a node.

Failures are reported as qemu-img reports them ("Could not open 'x': ...") and
end the subcommand with status 1 (compare passes its own status).
"""

from __future__ import annotations

from pyqemu.blockopts import OptionError
from pyqemu.img import Exit, ImgTool
from pyqemu.opening import (
    error_text,
    force_share_conflict,
    from_filename,
    from_image_opts,
    open_node,
    print_notice,
    print_open_messages,
)

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any


def open_image(tool: ImgTool, filename: str, fmt: str | None, image_opts: bool,
               *, read_only: bool, without_backing: bool = False,
               force_share: bool = False, failure_status: int = 1,
               check: bool = False) -> Any:
    """Open one image the way qemu-img's img_open does, or raise Exit."""
    import imgengine

    console = tool.console
    if image_opts and fmt is not None:
        tool.error("--image-opts and --format are mutually exclusive")
        raise Exit(failure_status)

    def deprecated_flag(message: str, follow_up: str) -> None:
        console.warn_report(message)
        console.err(follow_up)

    try:
        if image_opts:
            request = from_image_opts(filename, console.warn_report, deprecated_flag)
        else:
            request = from_filename(filename, fmt, console.warn_report)
    except OptionError as error:
        if image_opts:
            tool.error(str(error))
        else:
            tool.error(f"Could not open '{filename}': {error}")
        raise Exit(failure_status) from None
    if image_opts and force_share and force_share_conflict(request):
        tool.error("--force-share/-U conflicts with image options")
        raise Exit(failure_status)
    if without_backing and not any(key == "backing" for key in request.flat):
        request.flat["backing"] = None
        request.options = dict(request.options or {}, backing=None)
    try:
        node = open_node(request, read_only, check=check, no_backing=without_backing)
    except (imgengine.ImageError, OSError) as error:
        print_notice(console, error)
        tool.error(f"Could not open '{filename}': {error_text(error)}")
        hint = getattr(error, "hint", None)
        if hint:
            console.err(hint)
        raise Exit(failure_status) from None
    print_open_messages(console, node)
    return node
