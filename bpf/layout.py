"""Numpy dtypes from clang's layout of the event structs (pure: no bcc, no kernel).

bcc describes each struct it compiled as a ctypes ``Structure`` with clang's
offsets, size and padding (``__pad_N`` members). This module turns those into
the flat numpy dtypes the decoder uses, so nothing in Python restates a field,
offset or size: the C struct in the program's header is the one schema source.

Rules of the flattening (:func:`dtype_from_ctypes`):

- a nested struct member ``m`` becomes columns ``m_field``, except the leading
  ``struct bpfpipe_hdr hdr``, whose fields keep their names (``type``, ``cpu``,
  ``rate``, ``ts_ns``) in every event;
- ``char[n]`` becomes ``S<n>``, other arrays numpy sub-arrays, a union opaque
  bytes (``V<size>``); members named ``__*`` (padding) are left out;
- bit-fields and flattened names that collide are errors: numpy cannot say them.

:func:`event_layout` applies the rules to a program's event structs and checks
what the reader relies on: each begins with the header, and type ids are unique.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "HEADER_MEMBER",
    "HEADER_STRUCT",
    "EventLayout",
    "SchemaError",
    "dtype_from_ctypes",
    "event_layout",
]

HEADER_STRUCT = "bpfpipe_hdr"
"""The C struct every event begins with (bpfpipe_types.h)."""
HEADER_MEMBER = "hdr"
"""The name of that leading member in every event struct."""


class SchemaError(ValueError):
    """A program's events cannot be decoded as declared. The message continues
    "BPF program 'name' ..." (the loader turns it into a ``BpfLoadError``)."""


@dataclass(frozen=True, slots=True)
class EventLayout:
    """A program's events as numpy sees them."""

    header_dtype: np.dtype[Any]
    """The common header every record starts with."""
    event_types: dict[int, np.dtype[Any]]
    """Type id -> the dtype of its record."""
    event_names: dict[int, str]
    """Type id -> the event's name (the third ``BPFPIPE_EVENTS`` column)."""


def _numpy_format(ctype: Any) -> Any:
    if issubclass(ctype, ctypes.Array):
        if ctype._type_ is ctypes.c_char:
            return f"S{ctype._length_}"
        return (_numpy_format(ctype._type_), (ctype._length_,))
    if issubclass(ctype, ctypes.Union):
        return f"V{ctypes.sizeof(ctype)}"
    if ctype is ctypes.c_char:
        return "S1"
    return np.dtype(ctype).newbyteorder("<")


def _flatten(cls: Any, base: int, prefix: str, fields: list[tuple[str, Any, int]], where: str) -> None:
    for spec in cls._fields_:
        name, ctype = spec[0], spec[1]
        if len(spec) > 2:
            raise ValueError(f"{where}: bit-field {name!r} has no numpy equivalent")
        if name.startswith("__"):  # bcc's __pad_N alignment fillers and explicit padding
            continue
        offset = base + getattr(cls, name).offset
        if issubclass(ctype, ctypes.Structure):
            is_header = name == HEADER_MEMBER and ctype.__name__ == HEADER_STRUCT and offset == 0
            _flatten(ctype, offset, "" if is_header else f"{prefix}{name}_", fields, where)
            continue
        fields.append((prefix + name, _numpy_format(ctype), offset))


def dtype_from_ctypes(cls: Any, where: str) -> np.dtype[Any]:
    """A flat numpy dtype with clang's offsets and size (see the module docstring).

    ``where`` names the struct in error messages. Raises ``ValueError`` for a
    bit-field or colliding flattened names.
    """
    fields: list[tuple[str, Any, int]] = []
    _flatten(cls, 0, "", fields, where)
    names = [name for name, _, _ in fields]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{where}: flattened field names collide: {', '.join(duplicates)}")
    return np.dtype(
        {
            "names": names,
            "formats": [fmt for _, fmt, _ in fields],
            "offsets": [offset for _, _, offset in fields],
            "itemsize": ctypes.sizeof(cls),
        }
    )


def event_layout(header: Any, events: Iterable[tuple[str, int, Any]]) -> EventLayout:
    """The dtypes of ``header`` (the ctypes ``struct bpfpipe_hdr``) and of each
    ``(event name, type id, ctypes struct)``. Raises :class:`SchemaError` for an
    event that does not begin with the header, a type id used twice, or a
    struct numpy cannot describe."""
    header_dtype = dtype_from_ctypes(header, f"struct {HEADER_STRUCT}")
    types: dict[int, np.dtype[Any]] = {}
    names: dict[int, str] = {}
    for event, type_id, struct in events:
        where = f"event {event!r} (struct {struct.__name__})"
        first = struct._fields_[0] if struct._fields_ else None
        if first is None or first[0] != HEADER_MEMBER or first[1].__name__ != HEADER_STRUCT:
            raise SchemaError(
                f"has {where} that does not begin with 'struct {HEADER_STRUCT} {HEADER_MEMBER}'"
            )
        if type_id in types:
            raise SchemaError(f"declares type id {type_id} twice ({names[type_id]!r}, {event!r})")
        try:
            types[type_id] = dtype_from_ctypes(struct, where)
        except ValueError as exc:
            raise SchemaError(f"has an event numpy cannot describe: {exc}") from None
        names[type_id] = event
    return EventLayout(header_dtype, types, names)
