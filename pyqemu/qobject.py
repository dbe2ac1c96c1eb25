"""QEMU's QObject output: dictionary order, pretty JSON, and the human dump.

QEMU keeps dictionaries in a 512-bucket hash table and prints them in bucket
order, so `qemu-img info --output=json` shows keys in an order that only the
hash explains.  qdict_order reproduces it from the insertion order; to_json
writes the pretty JSON QEMU writes; dump_human writes the indented "key: value"
form of `Format specific information:`.
"""

# QEMU's printf formats are reproduced as printf formats on purpose.
# ruff: noqa: UP031

from __future__ import annotations

from collections.abc import Iterable

_BUCKETS = 512
_MASK32 = 0xFFFFFFFF


def _bucket(key: str) -> int:
    data = key.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & _MASK32
    for index, byte in enumerate(data):
        value = (value + (byte << (index * 5 % 24))) & _MASK32
    return ((1103515243 * value + 12345) & _MASK32) % _BUCKETS


def qdict_order(keys: Iterable[str]) -> list[str]:
    """Keys in the order QEMU iterates a QDict they were inserted into.

    Within a bucket the most recently inserted key comes first.
    """
    buckets: dict[int, list[str]] = {}
    for key in keys:
        chain = buckets.setdefault(_bucket(key), [])
        if key not in chain:
            chain.insert(0, key)
    return [key for bucket in sorted(buckets) for key in buckets[bucket]]


def ordered(value: object) -> object:
    """A copy of value whose dicts iterate in QDict order (recursively)."""
    if isinstance(value, dict):
        return {key: ordered(value[key]) for key in qdict_order(value)}
    if isinstance(value, list):
        return [ordered(item) for item in value]
    return value


def _quote(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\b":
            out.append("\\b")
        elif char == "\f":
            out.append("\\f")
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append("\\uFFFD")       # an undecodable byte: QEMU's replacement
        elif code > 0xFFFF:
            code -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)))
        elif code < 0x20 or code >= 0x7F:
            out.append("\\u%04X" % code)
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return _quote(str(value))


def to_json(value: object, pretty: bool = True) -> str:
    """qobject_to_json_pretty: dicts in the order given (see ordered())."""
    parts: list[str] = []

    def newline(depth: int) -> None:
        if pretty:
            parts.append("\n" + " " * (4 * depth))

    def emit(item: object, depth: int) -> None:
        if isinstance(item, dict):
            parts.append("{")
            first = True
            for key, child in item.items():
                if not first:
                    parts.append(",")
                    if not pretty:
                        parts.append(" ")
                first = False
                newline(depth + 1)
                parts.append(_quote(key) + ": ")
                emit(child, depth + 1)
            newline(depth)
            parts.append("}")
        elif isinstance(item, list):
            parts.append("[")
            first = True
            for child in item:
                if not first:
                    parts.append(",")
                    if not pretty:
                        parts.append(" ")
                first = False
                newline(depth + 1)
                emit(child, depth + 1)
            newline(depth)
            parts.append("]")
        else:
            parts.append(_scalar(item))

    emit(value, 0)
    return "".join(parts)


def dump_human(value: object, indent: int = 1) -> str:
    """block/qapi.c's dump of format-specific data: "    key name: value"."""
    lines: list[str] = []

    def scalar(item: object) -> str:
        if item is True:
            return "true"
        if item is False:
            return "false"
        return str(item)

    def dump(item: object, depth: int) -> None:
        if isinstance(item, dict):
            for key, child in item.items():
                composite = isinstance(child, (dict, list))
                label = " " * (4 * depth) + key.replace("-", " ") + ":"
                if composite:
                    lines.append(label + "\n")
                    dump(child, depth + 1)
                else:
                    lines.append(f"{label} {scalar(child)}\n")
        elif isinstance(item, list):
            for index, child in enumerate(item):
                composite = isinstance(child, (dict, list))
                label = " " * (4 * depth) + f"[{index}]:"
                if composite:
                    lines.append(label + "\n")
                    dump(child, depth + 1)
                else:
                    lines.append(f"{label} {scalar(child)}\n")

    dump(value, indent)
    return "".join(lines)
