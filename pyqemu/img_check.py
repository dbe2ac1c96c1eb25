"""qemu-img check: the engine's consistency check, reported as QEMU reports it.

Exit status is QEMU's: 0 clean, 1 check not completed, 2 corruptions, 3 only
leaks, 63 format without checks.  With -r the image is repaired, the repair
summarised, and the image checked again.
"""

# QEMU's printf formats are reproduced as printf formats on purpose.
# ruff: noqa: UP031

from __future__ import annotations

import errno as errno_codes

from pyqemu.getopt import REQUIRED_ARGUMENT, LongOption
from pyqemu.img import FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT, Exit, ImgTool
from pyqemu.img_open import open_image
from pyqemu.qobject import ordered, to_json

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any

REPAIR = LongOption("repair", REQUIRED_ARGUMENT, "r")
CACHE_MODES = ("none", "off", "directsync", "writeback", "unsafe", "writethrough")


class _CheckError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _collect(tool: ImgTool, node: Any, filename: str, fix: frozenset[str]) -> dict[str, Any]:
    """collect_image_check: run the engine's check and build ImageCheck."""
    import imgengine

    try:
        result = node.check(fix)
    except (imgengine.ImageError, OSError) as error:
        tool.notice(error)
        # what QEMU printed while checking, before it gave up
        for message in getattr(error, "messages", None) or ():
            tool.console.err(message if message.endswith("\n") else message + "\n")
        code = getattr(error, "errno", None)
        if isinstance(error, imgengine.UnsupportedImageError) and not code:
            code = errno_codes.ENOTSUP
        raise _CheckError(code if isinstance(code, int) and code > 0 else errno_codes.EIO) \
            from None
    for message in result.messages:
        tool.console.err(message if message.endswith("\n") else message + "\n")
    record: dict[str, Any] = {"filename": filename, "format": node.format_name,
                              "check-errors": result.check_errors}
    for key, value in (("image-end-offset", result.image_end_offset),
                       ("corruptions", result.corruptions),
                       ("leaks", result.leaks),
                       ("corruptions-fixed", result.corruptions_fixed),
                       ("leaks-fixed", result.leaks_fixed),
                       ("total-clusters", result.total_clusters),
                       ("allocated-clusters", result.allocated_clusters),
                       ("fragmented-clusters", result.fragmented_clusters),
                       ("compressed-clusters", result.compressed_clusters)):
        if value:
            record[key] = value
    return record


_SCHEMA_ORDER = ("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
                 "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
                 "fragmented-clusters", "compressed-clusters")


def _in_schema_order(record: dict[str, Any]) -> dict[str, Any]:
    """ImageCheck's members in the order QEMU's visitor inserts them."""
    return {key: record[key] for key in _SCHEMA_ORDER if key in record}


def _human(record: dict[str, Any]) -> str:
    """dump_human_image_check."""
    corruptions = record.get("corruptions", 0)
    leaks = record.get("leaks", 0)
    errors = record.get("check-errors", 0)
    text = []
    if not (corruptions or leaks or errors):
        text.append("No errors were found on the image.\n")
    else:
        if corruptions:
            text.append(f"\n{corruptions} errors were found on the image.\n"
                        "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if leaks:
            text.append(f"\n{leaks} leaked clusters were found on the image.\n"
                        "This means waste of disk space, but no harm to data.\n")
        if errors:
            text.append(f"\n{errors} internal errors have occurred during the check.\n")
    total = record.get("total-clusters", 0)
    allocated = record.get("allocated-clusters", 0)
    if total and allocated:
        text.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n"
                    % (allocated, total, allocated * 100.0 / total,
                       record.get("fragmented-clusters", 0) * 100.0 / allocated,
                       record.get("compressed-clusters", 0) * 100.0 / allocated))
    if record.get("image-end-offset"):
        text.append(f"Image end offset: {record['image-end-offset']}\n")
    return "".join(text)


def main(tool: ImgTool, argv: list[str]) -> int:
    import os

    fmt: str | None = None
    output: str | None = None
    cache = "writeback"
    fix: frozenset[str] = frozenset()
    quiet = False
    image_opts = False
    force_share = False
    parser = tool.getopt(argv, ":hf:r:T:qU", (HELP, FORMAT, REPAIR, OUTPUT, OBJECT,
                                              IMAGE_OPTS, FORCE_SHARE))
    for option, value in tool.options(parser):
        if option == "f":
            fmt = value
        elif option == "r":
            if value == "leaks":
                fix = frozenset({"leaks"})
            elif value == "all":
                fix = frozenset({"leaks", "all"})
            else:
                raise tool.error_exit(
                    f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}")
        elif option == "output":
            output = value
        elif option == "T":
            cache = value or ""
        elif option == "q":
            quiet = True
        elif option == "U":
            force_share = True
        elif option == "image-opts":
            image_opts = True
    filename = tool.one_filename(parser)
    as_json = tool.output_is_json(output)
    if cache not in CACHE_MODES:
        tool.error(f"Invalid source cache option: {cache}")
        return 1

    node = open_image(tool, filename, fmt, image_opts, read_only=not fix,
                      force_share=force_share, check=True)
    try:
        try:
            record = _collect(tool, node, filename, fix)
        except _CheckError as failure:
            if failure.code == errno_codes.ENOTSUP:
                tool.error("This image format does not support checks")
                return 63
            tool.error(f"Check failed: {os.strerror(failure.code)}")
            return 1
        failed_code = 0
        if record.get("corruptions-fixed") or record.get("leaks-fixed"):
            if not as_json and not quiet:
                tool.out("The following inconsistencies were found and repaired:\n\n"
                         f"    {record.get('leaks-fixed', 0)} leaked clusters\n"
                         f"    {record.get('corruptions-fixed', 0)} corruptions\n\n"
                         "Double checking the fixed image now...\n")
            fixed = {key: record[key] for key in ("leaks-fixed", "corruptions-fixed")
                     if key in record}
            try:
                record = _collect(tool, node, filename, frozenset())
            except _CheckError as failure:
                failed_code = failure.code
                record = {"check-errors": 0}
            record = {key: value for key, value in record.items()
                      if key not in ("leaks-fixed", "corruptions-fixed")}
            record.update(fixed)
        if not failed_code and not quiet:
            tool.out(to_json(ordered(_in_schema_order(record))) + "\n" if as_json
                     else _human(record))
        if failed_code or record.get("check-errors"):
            tool.error(f"Check failed: {os.strerror(failed_code)}" if failed_code
                       else "Check failed")
            return 1
        if record.get("corruptions"):
            return 2
        if record.get("leaks"):
            return 3
        return 0
    finally:
        node.close()


__all__ = ["main", "Exit"]
