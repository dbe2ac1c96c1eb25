"""qemu-img info: one image or its whole backing chain, human or JSON.

Each layer is opened on its own (its backing file is not opened, as QEMU opens
with BDRV_O_NO_BACKING), asked for its ImageInfo, and printed the way
bdrv_image_info_dump or QEMU's JSON visitor print it.
"""

from __future__ import annotations

from pyqemu.getopt import NO_ARGUMENT, LongOption
from pyqemu.img import FORCE_SHARE, FORMAT, HELP, IMAGE_OPTS, OBJECT, OUTPUT, Exit, ImgTool
from pyqemu.img_open import open_image
from pyqemu.qobject import dump_human, ordered, to_json
from pyqemu.units import size_to_str

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any

BACKING_CHAIN = LongOption("backing-chain", NO_ARGUMENT, "backing-chain")


def info_record(info: Any) -> dict[str, object]:
    """ImageInfo as QEMU's visitor builds it: only the members QEMU has."""
    record: dict[str, object] = {"filename": info.filename, "format": info.format_name}
    if info.dirty_flag is not None:
        record["dirty-flag"] = bool(info.dirty_flag)
    if info.actual_size is not None and info.actual_size >= 0:
        record["actual-size"] = info.actual_size
    record["virtual-size"] = info.virtual_size
    if info.cluster_size:
        record["cluster-size"] = info.cluster_size
    if getattr(info, "encrypted", False):
        record["encrypted"] = True
    if info.backing_filename:
        record["backing-filename"] = info.backing_filename
        if info.full_backing_filename is not None:
            record["full-backing-filename"] = info.full_backing_filename
        if info.backing_format:
            record["backing-filename-format"] = info.backing_format
    if info.format_specific is not None:
        record["format-specific"] = {"type": info.format_name, "data": info.format_specific}
    return record


def human_info(record: dict[str, Any]) -> str:
    """bdrv_image_info_dump."""
    actual = record.get("actual-size")
    disk = size_to_str(actual) if actual is not None else "unavailable"
    lines = [f"image: {record['filename']}\n",
             f"file format: {record['format']}\n",
             f"virtual size: {size_to_str(record['virtual-size'])} "
             f"({record['virtual-size']} bytes)\n",
             f"disk size: {disk}\n"]
    if record.get("encrypted"):
        lines.append("encrypted: yes\n")
    if "cluster-size" in record:
        lines.append(f"cluster_size: {record['cluster-size']}\n")
    if record.get("dirty-flag"):
        lines.append("cleanly shut down: no\n")
    if "backing-filename" in record:
        backing = record["backing-filename"]
        line = f"backing file: {backing}"
        full = record.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != backing:
            line += f" (actual path: {full})"
        lines.append(line + "\n")
        if "backing-filename-format" in record:
            lines.append(f"backing file format: {record['backing-filename-format']}\n")
    if "format-specific" in record:
        lines.append("Format specific information:\n")
        specific = ordered(record["format-specific"]["data"])
        lines.append(dump_human(specific, 1))
    return "".join(lines)


def main(tool: ImgTool, argv: list[str]) -> int:
    fmt: str | None = None
    output: str | None = None
    chain = False
    image_opts = False
    parser = tool.getopt(argv, ":f:hU", (HELP, FORMAT, OUTPUT, BACKING_CHAIN, OBJECT,
                                         IMAGE_OPTS, FORCE_SHARE))
    for option, value in tool.options(parser):
        if option == "f":
            fmt = value
        elif option == "output":
            output = value
        elif option == "backing-chain":
            chain = True
        elif option == "image-opts":
            image_opts = True
    filename: str | None = tool.one_filename(parser)
    as_json = tool.output_is_json(output)

    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    while filename is not None:
        if filename in seen:
            tool.error(f"Backing file '{filename}' creates an infinite loop.")
            return 1
        seen.add(filename)
        node = open_image(tool, filename, fmt, image_opts, read_only=True, without_backing=True)
        import imgengine

        try:
            record = info_record(node.info())
        except (imgengine.ImageError, OSError) as error:
            from pyqemu.opening import error_text
            tool.notice(error)
            tool.error(error_text(error))
            return 1
        finally:
            node.close()
        records.append(record)
        filename, fmt, image_opts = None, None, False
        if chain:
            if "full-backing-filename" in record:
                filename = str(record["full-backing-filename"])
            elif "backing-filename" in record:
                tool.error("Could not determine absolute backing filename, but backing "
                           f"filename '{record['backing-filename']}' present")
                return 1
            if "backing-filename-format" in record:
                fmt = str(record["backing-filename-format"])

    if as_json:
        if chain:
            tool.out(to_json([ordered(record) for record in records]) + "\n")
        else:
            tool.out(to_json(ordered(records[0])) + "\n")
    else:
        tool.out("\n".join(human_info(record) for record in records))
    return 0


__all__ = ["main", "info_record", "human_info", "Exit"]
