"""The contract between a ring-buffer reader and the decoder: raw records and their schema.

A reader (:class:`stages.reader.RingBufferReader`) decodes nothing. Each batch it
sends has one row per ring-buffer record in ``events`` (:data:`RECORD_DTYPE`:
where the record starts in the copied bytes, its length, its event type id), the
records' sampling rates as ``weights``, and a :class:`RawRecords` as ``payload``:
the bytes copied out of the ring and the program's :class:`EventSchema`. The
decoder (:mod:`stages.decoder`) needs nothing else, and a stage between the two
may filter rows (e.g. by ``type``) without touching the bytes.

Invariants of a batch made by :func:`raw_batch`:

* ``offset`` is a multiple of 8 and ``offset + length <= raw.size`` (the ring's
  8-byte record alignment, kept by the copy);
* ``type`` and the weight come from the record's header, read at the schema's
  ``type``/``rate`` offsets; a record too short for the header gets type
  :data:`UNKNOWN_TYPE` and weight 1, and rate 0 (an ungated event) weighs 1.

Pure: numpy only, no trio, no kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from bpf.ringbuf import RingRead
from pipeline import Batch

__all__ = [
    "RECORD_DTYPE",
    "UNKNOWN_TYPE",
    "EventSchema",
    "EventTypes",
    "RawRecords",
    "raw_batch",
]

RECORD_DTYPE = np.dtype([("offset", "<u4"), ("length", "<u4"), ("type", "<u2")])
"""One row per ring-buffer record in a reader batch: where its payload starts in
the batch's raw bytes, its length, and the event type id from its header."""

UNKNOWN_TYPE = 0xFFFF
"""The ``type`` given to records too short to hold an event header."""


class EventTypes(Protocol):
    """Where a schema comes from: what a loaded program (``bpf.loader.LoadedProgram``)
    says about its events."""

    @property
    def event_types(self) -> Mapping[int, np.dtype[Any]]: ...
    @property
    def event_names(self) -> Mapping[int, str]: ...
    @property
    def header_dtype(self) -> np.dtype[Any]: ...


@dataclass(frozen=True, slots=True, eq=False)
class EventSchema:
    """A program's event types: type id → numpy dtype (each starting with the
    common header), type id → name, and the header's dtype. Derived by the
    loader from clang's layout of the C structs: the one schema source."""

    types: Mapping[int, np.dtype[Any]]
    names: Mapping[int, str]
    header: np.dtype[Any]
    type_offset: int = field(init=False)
    rate_offset: int = field(init=False)

    def __post_init__(self) -> None:
        fields: Mapping[str, Any] = self.header.fields or {}
        for name, size, align in (("type", 2, 2), ("rate", 4, 4)):
            if name not in fields:
                raise ValueError(f"event header dtype has no {name!r} field: {self.header}")
            dtype, offset = fields[name][0], fields[name][1]
            if dtype.kind != "u" or dtype.itemsize != size or offset % align:
                raise ValueError(
                    f"event header field {name!r} must be an aligned u{8 * size}, got {dtype} at {offset}"
                )
        object.__setattr__(self, "type_offset", fields["type"][1])
        object.__setattr__(self, "rate_offset", fields["rate"][1])
        for type_id, dtype in self.types.items():
            if dtype.itemsize < self.header.itemsize:
                raise ValueError(
                    f"event type {type_id} ({dtype.itemsize} bytes) is smaller than the "
                    f"{self.header.itemsize}-byte header"
                )

    @classmethod
    def from_program(cls, program: EventTypes) -> EventSchema:
        return cls(dict(program.event_types), dict(program.event_names), program.header_dtype)

    def name(self, type_id: int) -> str:
        return self.names.get(type_id, f"type{type_id}")


@dataclass(frozen=True, slots=True, eq=False)
class RawRecords:
    """A reader batch's payload: the bytes copied out of the ring and their schema."""

    raw: npt.NDArray[np.uint8]
    schema: EventSchema

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)


def raw_batch(read: RingRead, schema: EventSchema, *, source: str = "", seq: int = 0) -> Batch:
    """The batch a reader sends for one ring read: rows of :data:`RECORD_DTYPE`,
    weights from each header's ``rate`` (at least 1), the bytes as payload."""
    raw = read.raw
    offsets = read.offsets
    lengths = read.lengths
    rows = np.empty(len(offsets), dtype=RECORD_DTYPE)
    rows["offset"] = offsets
    rows["length"] = lengths
    if len(offsets):
        words16 = raw.view(np.uint16)
        words32 = raw.view(np.uint32)
        types = words16[np.minimum((offsets + schema.type_offset) >> 1, len(words16) - 1)]
        rates = words32[np.minimum((offsets + schema.rate_offset) >> 2, len(words32) - 1)]
        short = lengths < schema.header.itemsize
        if short.any():
            types[short] = UNKNOWN_TYPE
            rates[short] = 1
        rows["type"] = types
        weights = np.maximum(rates, 1).astype(np.float64)
    else:
        weights = np.zeros(0, dtype=np.float64)
    return Batch(rows, weights, source=source, seq=seq, payload=RawRecords(raw, schema))
