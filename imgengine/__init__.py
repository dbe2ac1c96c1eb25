"""Pure-Python qcow2 and raw image engine with QEMU 7.2 block-layer semantics.

The public API (see docs/architecture.md): the error classes, ``open_image``,
``create_image``, ``create_options``, ``BlockNode`` and the records it
returns.  Importing this package is cheap: the format drivers load when an
image is first opened.
"""

from __future__ import annotations

from .api import (
    CreateOption,
    ImageInfo,
    MapEntry,
    create_image,
    create_options,
    formatting_options,
    join_reopen_options,
    open_image,
    resolve_backing_filename,
    resolve_create_options,
)
from .errors import (
    CorruptImageError,
    ImageError,
    OpenError,
    ReportedLine,
    RequestError,
    UnsupportedImageError,
)
from .node import BlockNode, BlockStatus, BlockStatusFlag

__all__ = [
    "BlockNode",
    "BlockStatus",
    "BlockStatusFlag",
    "CheckResult",
    "CorruptImageError",
    "CreateOption",
    "ImageError",
    "ImageInfo",
    "MapEntry",
    "OpenError",
    "ReportedLine",
    "RequestError",
    "UnsupportedImageError",
    "create_image",
    "create_options",
    "formatting_options",
    "join_reopen_options",
    "open_image",
    "resolve_backing_filename",
    "resolve_create_options",
]


def __getattr__(name: str) -> object:
    # CheckResult lives with the check logic; load it only when asked for.
    if name == "CheckResult":
        from .qcow2.check import CheckResult

        return CheckResult
    raise AttributeError(f"module 'imgengine' has no attribute {name!r}")
