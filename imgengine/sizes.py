"""QEMU's parsing of option values: sizes with suffixes, numbers and booleans.

``parse_size`` follows qemu_strtosz (decimal or hex, an optional fraction,
an optional B/K/M/G/T/P/E suffix in powers of 1024); ``parse_number``
follows qemu_strtou64 with base detection; ``parse_bool`` accepts the words
QEMU accepts.  They raise ValueError (OverflowError when out of range), the
callers turn that into QEMU's messages.
"""

from __future__ import annotations

import re

_SUFFIXES = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_NUMBER = re.compile(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+)(\.[0-9]*)?(.*)\Z", re.S)
UINT64_MAX = (1 << 64) - 1


def parse_size(text: str, default_unit: int = 1) -> int:
    """A byte count such as ``512``, ``64k``, ``1.5M`` or ``0x200``."""
    match = _NUMBER.match(text)
    if not match or "-" in text:
        raise ValueError(text)
    digits, fraction, rest = match.groups()
    is_hex = digits[:2].lower() == "0x"
    value = int(digits, 16 if is_hex else 10)
    if value > UINT64_MAX:
        raise OverflowError(text)
    if is_hex and fraction is not None:
        raise ValueError(text)
    multiplier = default_unit
    if rest:
        exponent = _SUFFIXES.get(rest[0].upper())
        if exponent is None or len(rest) > 1:
            raise ValueError(text)
        multiplier = 1024 ** exponent
    frac = float(fraction) if fraction not in (None, ".") else 0.0
    if multiplier == 1:
        if frac:
            raise ValueError(text)
        result = value
    else:
        # QEMU computes in 64.64 fixed point and rounds half a byte upward.
        frac_fixed = int(frac * (1 << 64))
        total = value * multiplier + ((frac_fixed * multiplier) >> 64)
        total += ((frac_fixed * multiplier) >> 63) & 1
        result = total
    if result > UINT64_MAX:
        raise OverflowError(text)
    return result


def parse_number(text: str) -> int:
    """An unsigned integer in C notation (decimal, 0x hex or 0 octal)."""
    stripped = text.strip()
    if not stripped or stripped.startswith("-"):
        raise ValueError(text)
    if stripped.startswith("+"):
        stripped = stripped[1:]
    try:
        if stripped[:2].lower() == "0x":
            value = int(stripped[2:], 16)
        elif len(stripped) > 1 and stripped[0] == "0":
            value = int(stripped[1:], 8)
        else:
            value = int(stripped, 10)
    except ValueError:
        raise ValueError(text) from None
    if value > UINT64_MAX:
        raise OverflowError(text)
    return value


def parse_bool(text: str) -> bool:
    """QEMU's boolean words: on/yes/true/y and off/no/false/n."""
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise ValueError(text)
