"""The exception classes the engine raises on purpose.

Every error the engine raises deliberately is an ``ImageError``; anything else
escaping from the engine is a bug.  ``str(error)`` is QEMU's own wording for
the same situation (without the ``qemu-img:`` / ``qemu-io:`` prefixes and the
file names the front ends add), ``errno`` is the POSIX error number QEMU
would report, and ``hint`` holds the extra lines QEMU appends after some
errors (``error_append_hint``), or None.
"""

from __future__ import annotations

import os


class ImageError(Exception):
    """Base of every error the engine raises on purpose."""

    errno: int | None
    hint: str | None

    def __init__(self, message: str, *, errno: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def prefixed(self, prefix: str) -> ImageError:
        """The same error with ``prefix`` put in front of its message."""
        clone = type(self)(prefix + self.message, errno=self.errno, hint=self.hint)
        return clone


class OpenError(ImageError):
    """A missing file, permissions, an unknown format or bad open options."""


class CorruptImageError(ImageError):
    """On-disk data failed validation (one class for all of it)."""


class UnsupportedImageError(ImageError):
    """A feature of the image that the engine refuses to handle."""


class RequestError(ImageError):
    """An I/O request QEMU would refuse (out of range, read-only, ...)."""


class ReportedLine(str):
    """A line QEMU prints with error_report() while it works (e.g. repairing a
    dirty image on open): the front end puts its own program's name first."""


def errno_message(message: str, err: int) -> str:
    """QEMU's ``error_setg_errno`` text: the message, a colon, strerror."""
    return f"{message}: {os.strerror(err)}"
