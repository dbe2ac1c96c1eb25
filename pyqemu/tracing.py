"""The -T/--trace option of qemu-img and qemu-io.

These front ends have no trace events, so the option only does what QEMU does
for names that match none: warn about a name that is not a pattern, list the
(empty) event set for "help", and report an unreadable events file.
"""

from __future__ import annotations

from pyqemu.blockopts import OptionDesc, OptionError, QemuOpts, parse_into
from pyqemu.console import Console

_TRACE_OPTIONS = (OptionDesc("enable", "string"), OptionDesc("events", "string"),
                  OptionDesc("file", "string"))


def _enable(console: Console, pattern: str, where: str = "") -> bool:
    """trace_enable_events: False when QEMU would exit (after listing events)."""
    if pattern in ("help", "?"):
        return False
    name = pattern[1:] if pattern.startswith("-") else pattern
    if "*" not in name:
        console.err(f"{console.prog}:{where} warning: trace event '{name}' does not exist\n"
                    if where else f"{console.prog}: warning: trace event '{name}' does not exist\n")
    return True


def trace_option(console: Console, text: str) -> int | None:
    """Apply -T text; an exit status when QEMU would exit right away."""
    opts = QemuOpts(_TRACE_OPTIONS)
    try:
        if parse_into(opts, text, implied_name="enable"):
            from pyqemu.blockopts import help_text
            console.out("trace options:\n" + "".join(line + "\n"
                                                     for line in help_text(_TRACE_OPTIONS)))
            return 1
    except OptionError as error:
        console.error_report(str(error))
        return 1
    enable = opts.get("enable")
    if enable is not None and not _enable(console, enable):
        return 0
    events = opts.get("events")
    if events is not None:
        try:
            with open(events, encoding="utf-8", errors="surrogateescape") as listing:
                lines = listing.read().splitlines()
        except OSError as error:
            console.err(f"{console.prog}:{events}: {error.strerror}\n")
            return 1
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#") and \
                    not _enable(console, line, f"{events}:{number}:"):
                return 0
    return None
