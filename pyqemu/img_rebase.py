"""qemu-img rebase -u: store another backing file name in an image.

The rules are img_rebase's (qemu-img.c) for the unsafe mode: the image is
opened read/write without its backing chain, the new format name must be one
QEMU knows, and the engine rewrites the header (BlockNode.change_backing_file);
its errno picks QEMU's message.  The safe mode, which first copies into the
image every range where the old and the new backing file differ, is not
offered yet and is refused with a message that says so.
"""

from __future__ import annotations

import errno
import os

from pyqemu.img import HELP, IMAGE_OPTS, OBJECT, ImgTool
from pyqemu.img_check import CACHE_MODES
from pyqemu.img_open import open_image
from pyqemu.progress import Progress

# Every block driver name QEMU 7.2 (Debian's build) accepts for -F; an unsafe
# rebase records the name whether or not this engine can open such a file.
QEMU_DRIVER_NAMES = (
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster",
    "host_cdrom", "host_device", "http", "https", "iscsi", "iser", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
    "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi",
    "vhdx", "vmdk", "vpc", "vvfat",
)


def main(tool: ImgTool, argv: list[str]) -> int:
    fmt: str | None = None
    base_fmt: str | None = None
    base: str | None = None
    cache = "writeback"
    src_cache = "writeback"
    unsafe = progress_wanted = quiet = image_opts = False
    parser = tool.getopt(argv, ":hf:F:b:upt:T:qU", (HELP, OBJECT, IMAGE_OPTS))
    for option, value in tool.options(parser):
        if option == "f":
            fmt = value
        elif option == "F":
            base_fmt = value
        elif option == "b":
            base = value
        elif option == "u":
            unsafe = True
        elif option == "p":
            progress_wanted = True
        elif option == "t":
            cache = value or ""
        elif option == "T":
            src_cache = value or ""
        elif option == "q":
            quiet = True
        elif option == "image-opts":
            image_opts = True
    filename = tool.one_filename(parser)
    if not unsafe and base is None:
        raise tool.error_exit("Must specify backing file (-b) or use unsafe mode (-u)")
    progress = Progress(tool.console, progress_wanted and not quiet, 2.0)
    progress.print(0, 100)
    try:
        for mode, what in ((cache, "cache"), (src_cache, "source cache")):
            if mode not in CACHE_MODES:
                tool.error(f"Invalid {what} option: {mode}")
                return 1
        node = open_image(tool, filename, fmt, image_opts, read_only=False,
                          without_backing=unsafe)
        try:
            return _rebase(tool, node, base, base_fmt, unsafe, progress)
        finally:
            node.close()
    finally:
        progress.end()


def _rebase(tool: ImgTool, node: object, base: str | None, base_fmt: str | None,
            unsafe: bool, progress: Progress) -> int:
    import imgengine

    if base_fmt is not None and base_fmt not in QEMU_DRIVER_NAMES:
        tool.error(f"Invalid format name: '{base_fmt}'")
        return 1
    if not unsafe:
        tool.error("rebase without -u (a safe rebase) is not offered by this qemu-img (pyqemu)")
        return 1
    try:
        if base:
            node.change_backing_file(base, base_fmt)  # type: ignore[attr-defined]
        else:
            node.change_backing_file(None, None)  # type: ignore[attr-defined]
    except (imgengine.ImageError, OSError) as error:
        code = getattr(error, "errno", None) or errno.EIO
        shown = "(null)" if base is None else base
        if code == errno.ENOSPC:
            tool.error(f"Could not change the backing file to '{shown}': "
                       f"No space left in the file header")
        elif code == errno.EINVAL and base and base_fmt is None:
            tool.error(f"Could not change the backing file to '{shown}': "
                       f"backing format must be specified")
        else:
            tool.error(f"Could not change the backing file to '{shown}': {os.strerror(code)}")
        progress.print(100, 0)
        return 1
    progress.print(100, 0)
    return 0
