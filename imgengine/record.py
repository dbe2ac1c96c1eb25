"""A light base for the engine's plain data records.

The records (ImageInfo, MapEntry, BlockStatus, the qcow2 header, ...) were
dataclasses; importing ``dataclasses`` pulls in inspect, ast, dis and
tokenize, which is most of a front end's start-up time.  ``Record`` gives the
same field-wise ``repr`` and equality from a ``_fields`` tuple; each record
writes its own ``__init__``.
"""

from __future__ import annotations


class Record:
    """Field-wise ``repr`` and ``==`` over ``_fields``, as a dataclass has."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    # Mutable records that compare by value are not hashable (as dataclasses).
    __hash__ = None  # type: ignore[assignment]

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]
