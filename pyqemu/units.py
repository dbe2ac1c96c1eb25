"""Numbers as QEMU 7.2 reads and writes them on the command line.

Size parsing follows qemu_strtosz (decimal, hex, fractions, binary suffixes),
size_to_str gives qemu-img's "128 MiB", cvtstr and timestr give qemu-io's
statistics units, and report_lines builds qemu-io's two-line I/O report.
"""

# QEMU's printf formats are reproduced as printf formats on purpose.
# ruff: noqa: UP031

from __future__ import annotations

import math

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable

EINVAL = 22
ERANGE = 34
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

_C_SPACE = " \t\n\v\f\r"
_SCALE_EXPONENT = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}


class SizeError(ValueError):
    """A size string QEMU would refuse; errno is EINVAL or ERANGE."""

    def __init__(self, errno: int, text: str) -> None:
        super().__init__(text)
        self.errno = errno
        self.text = text


def c_strtoull(text: str, pos: int = 0, base: int = 10) -> tuple[int, int, bool]:
    """C strtoull from pos: (value, end, overflowed); end == pos if nothing parsed.

    base is 0 (decimal, 0x hex or 0 octal), 8, 10 or 16; a leading '-' negates
    modulo 2**64 as C does.
    """
    i = pos
    n = len(text)
    while i < n and text[i] in _C_SPACE:
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    hex_digits = "0123456789abcdefABCDEF"
    if base in (0, 16) and text[i:i + 2] in ("0x", "0X") and text[i + 2:i + 3] != "" and \
            text[i + 2] in hex_digits:
        base = 16
        i += 2
    elif base == 0:
        base = 8 if text[i:i + 1] == "0" else 10
    digits = hex_digits if base == 16 else "0123456789"[:base]
    start = i
    while i < n and text[i] in digits:
        i += 1
    if i == start:
        return 0, pos, False
    value = int(text[start:i], base)
    if value > UINT64_MAX:
        return UINT64_MAX, i, True
    if negative:
        value = (-value) & UINT64_MAX
    return value, i, False


def c_strtoull_base0(text: str) -> tuple[int, int, bool]:
    """strtoull(text, &end, 0): (value, characters consumed, overflowed)."""
    return c_strtoull(text, 0, 0)


def _fraction(text: str, pos: int) -> tuple[float | None, int, bool]:
    """strtod on text[pos:] which starts with '.': (value, end, has_exponent)."""
    i = pos + 1
    n = len(text)
    while i < n and text[i].isdigit() and text[i].isascii():
        i += 1
    if i == pos + 1:
        return None, pos, False
    value = float(text[pos:i])
    j = i
    if j < n and text[j] in "eE":
        k = j + 1
        if k < n and text[k] in "+-":
            k += 1
        if k < n and text[k].isdigit():
            return value, k, True
    return value, i, False


def strtosz(text: str, warn: Callable[[str], None] | None = None,
            default_suffix: str = "B", unit: int = 1024) -> int:
    """Parse a size the way qemu_strtosz does; raise SizeError on failure.

    warn receives QEMU's deprecation warning for hex numbers with a suffix.
    """
    val, end, overflow = c_strtoull(text, 0, 10)
    if end == 0:
        raise SizeError(EINVAL, text)
    if overflow:
        raise SizeError(ERANGE if end == len(text) else EINVAL, text)
    if "-" in text[:end]:
        raise SizeError(EINVAL, text)
    hex_number = False
    fraction = 0
    if val == 0 and text[end:end + 1] in ("x", "X"):
        val, end, overflow = c_strtoull(text, 0, 16)
        if overflow:
            raise SizeError(ERANGE if end == len(text) else EINVAL, text)
        if text[end:end + 1] == ".":
            raise SizeError(EINVAL, text)
        hex_number = True
    elif text[end:end + 1] == ".":
        value, frac_end, has_exponent = _fraction(text, end)
        if value is None:
            end += 1
        elif has_exponent:
            raise SizeError(EINVAL, text)
        else:
            end = frac_end
            fraction = min(int(value * 2.0 ** 64), UINT64_MAX)
    suffix = text[end:end + 1].upper()
    if suffix in _SCALE_EXPONENT:
        multiplier = unit ** _SCALE_EXPONENT[suffix]
        if hex_number and warn is not None:
            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        end += 1
    else:
        multiplier = unit ** _SCALE_EXPONENT[default_suffix.upper()]
    if multiplier == 1:
        if fraction:
            raise SizeError(EINVAL, text)
    else:
        product = fraction * multiplier
        # 64.64 fixed point: the high word adds, bit 63 of the low word rounds
        val = val * multiplier + (product >> 64) + ((product >> 63) & 1)
        if val > UINT64_MAX:
            raise SizeError(ERANGE if end == len(text) else EINVAL, text)
    if end != len(text):
        raise SizeError(EINVAL, text)
    return val


def c_strtol(text: str, base: int = 0) -> tuple[int, int]:
    """C strtol: (value, characters consumed, 0 if none); base 0 reads 0x and octal."""
    i = 0
    n = len(text)
    while i < n and text[i] in _C_SPACE:
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    hex_digits = "0123456789abcdefABCDEF"
    if base in (0, 16) and text[i:i + 2] in ("0x", "0X") and text[i + 2:i + 3] and \
            text[i + 2] in hex_digits:
        base = 16
        i += 2
    elif base == 0:
        base = 8 if text[i:i + 1] == "0" else 10
    allowed = hex_digits if base == 16 else "0123456789"[:base]
    start = i
    while i < n and text[i] in allowed:
        i += 1
    if i == start:
        return 0, 0
    value = int(text[start:i], base)
    if negative:
        value = -value
    limit = 1 << 63
    return max(-limit, min(limit - 1, value)), i


def size_to_str(value: int) -> str:
    """qemu-img's human size: three significant digits and an IEC prefix."""
    exponent = math.frexp(value / (1000.0 / 1024.0))[1]
    exponent = (exponent - 1) // 10 * 10 if exponent > 0 else 0
    prefix = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[exponent // 10]
    return "%0.3g %sB" % (value / (1 << exponent), prefix)


_CVT_UNITS = ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"),
              (10, " KiB"))


def cvtstr(value: float) -> str:
    """qemu-io's unit string: "1.500 KiB", "512 bytes", "64 KiB"."""
    suffix = " bytes"
    text = "%f" % value
    for shift, unit_name in _CVT_UNITS:
        if value >= float(1 << shift):
            suffix = unit_name
            text = "%.3f" % (value / float(1 << shift))
            break
    cut = text.find(".000")
    if cut >= 0:
        return text[:cut] + suffix
    return text + suffix


def timestr(elapsed_ns: int, verbose: bool = False) -> str:
    """qemu-io's elapsed time: "00.00 sec", or h:mm:ss.ss when verbose or long."""
    seconds, nanoseconds = divmod(elapsed_ns, 1_000_000_000)
    frac = nanoseconds / 1e9
    if verbose or seconds:
        return "%u:%02u:%05.2f" % (seconds // 3600, seconds % 3600 // 60, seconds % 60 + frac)
    return "%05.2f sec" % frac


def _per_second(value: float, elapsed_ns: int) -> float:
    seconds, nanoseconds = divmod(elapsed_ns, 1_000_000_000)
    span = seconds + nanoseconds / 1e9
    if span == 0.0:
        return math.inf if value > 0 else math.nan
    return value / span


def report_lines(op: str, elapsed_ns: int, offset: int, count: int, total: int,
                 ops: int, machine: bool) -> str:
    """The statistics qemu-io prints after an I/O command (print_report)."""
    time_text = timestr(elapsed_ns, verbose=machine)
    if machine:
        return "%d,%d,%s,%.3f,%.3f\n" % (total, ops, time_text,
                                         _per_second(float(total), elapsed_ns),
                                         _per_second(float(ops), elapsed_ns))
    return "%s %d/%d bytes at offset %d\n%s, %d ops; %s (%s/sec and %.4f ops/sec)\n" % (
        op, total, count, offset, cvtstr(float(total)), ops, time_text,
        cvtstr(_per_second(float(total), elapsed_ns)), _per_second(float(ops), elapsed_ns))
