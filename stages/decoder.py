"""Decoder: turns the reader's raw ring-buffer records into typed event batches.

Input: batches from :class:`stages.reader.RingBufferReader` (rows of
``offset``/``length``/``type`` into raw bytes carried in the payload, with the
program's :class:`~stages.raw_records.EventSchema`; the contract lives in
:mod:`stages.raw_records`). Output: batches whose ``events`` are numpy
structured arrays of the event type's dtype (derived by the loader from the C
struct: one schema source).

Design
------
* **One output batch per event type per input batch.** A structured array has
  one dtype, so a batch with several event types fans out; the decoder sends
  one batch per type present, in ascending type id, each with the input's
  ``source``, ``seq`` and ``read_time_ns`` (``(seq, type)`` is unique) and the
  type's name from the schema as ``event_name`` (what exporters write as
  ``"event"``; a type the schema names nothing is ``type<id>``). Order
  is kept within a type; across types only the kernel timestamps ``ts_ns``
  order events. Most programs emit one type, so most inputs give one batch.
  This fan-out is why the decoder is a :class:`pipeline.Stage` driving its own
  loop, not a ``BatchStage`` returning one batch per input.
* **Vectorised.** All ring records start on 8-byte boundaries, so the raw
  bytes are viewed (no copy) as "an event of this type starting at every 8th
  byte" — a strided array — and decoding is one slice when the records are
  evenly spaced (one type, one length: the common case) or one fancy index
  otherwise, per type. Either way the result is a compact copy, and the raw
  bytes can be freed.
* **Weights** are carried from the input: the reader stamps each record's
  header ``rate`` (an event kept at rate 1/N weighs N), so they equal the rate
  unless a stage in between rescaled them.
* **Accounting.** Every input record leaves in exactly one output batch or is
  dropped. **Malformed records** — shorter than their type's struct, or of a
  type the schema does not know — are dropped and counted (``ctx.drop(...,
  reason="malformed")``); never fatal. An input that cannot be decoded at all
  is logged as an error and dropped whole (reason ``error``), as the runtime
  does for a ``BatchStage`` whose ``process`` raises.
* Batches without raw records (already decoded, or from another source) pass
  through unchanged.
* **Two parsers** (``config.parser``; unset: ``feature_flags.new_parser`` picks
  ``strict``, else ``lenient``; switchable live by a config reload). ``lenient``
  (the default) checks only lengths and types, as above; a C string is read up to
  its first NUL, or the whole field if it has none, and exporters replace invalid
  UTF-8. ``strict`` also drops — recorded with reason ``malformed``, counted in
  ``strict_rejected_events`` — every event with a char-array field that has no
  NUL within the field (a truncated or garbage string) or whose text before the
  NUL is not valid UTF-8. Vectorised: numpy finds the NULs and the non-ASCII
  bytes; only events with non-ASCII text are checked one by one.

Per-event access for plug-in authors: :func:`event_view` gives a
``msgspec.Struct`` per event (class generated from the dtype, C strings as
``str``). It costs about 1 µs per event (:func:`event_views`, for a whole
batch, about 0.4 µs): fine for a few thousand events a second, never for a hot
path — there, use numpy on ``batch.events``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt
import trio

import pipeline
from pipeline import HEARTBEAT_EVENT, Batch, BatchReceiver, BatchSender, Stage, StageContext

from .raw_records import EventSchema, RawRecords

__all__ = [
    "Decoded",
    "Decoder",
    "DecoderConfig",
    "bad_strings",
    "decode_records",
    "event_struct",
    "event_view",
    "event_views",
]


@dataclass(frozen=True, slots=True)
class Decoded:
    """What one raw batch decodes to: a batch per event type (ascending type id),
    and the records that could not be decoded."""

    batches: list[Batch]
    malformed: int = 0
    malformed_weight: float = 0.0


def _every_8th_byte(raw: npt.NDArray[np.uint8], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """A view of ``raw`` as one ``dtype`` record starting at each 8-byte boundary
    (records overlap; only the ones a ring record starts at are ever read)."""
    count = (raw.size - dtype.itemsize) // 8 + 1 if raw.size >= dtype.itemsize else 0
    return np.ndarray(shape=(count,), dtype=dtype, buffer=raw, offset=0, strides=(8,))


def _gather(
    raw: npt.NDArray[np.uint8], dtype: np.dtype[Any], offsets: npt.NDArray[np.uint32]
) -> npt.NDArray[Any]:
    view = _every_8th_byte(raw, dtype)
    slots = offsets >> 3
    if len(slots) > 1:
        gaps = np.diff(slots)
        stride = int(gaps[0])
        if stride > 0 and bool((gaps == stride).all()):  # evenly spaced: one strided copy
            compact: npt.NDArray[Any] = view[int(slots[0]) : int(slots[-1]) + 1 : stride].copy()
            return compact
    gathered: npt.NDArray[Any] = view[slots]
    return gathered


_FEW_RECORDS = 256
"""Up to this many records, the checks run on Python ints. Warm, numpy's per-call
overhead (about a microsecond a call) pays back from a few dozen records; but a
batch this small comes from a reader woken every ``max_batch_delay_ms`` with
nothing in cache, where the numpy path's dozen distinct calls cost more than the
loop: 100 records, 126 µs against 92 (median, one batch every 100 ms)."""


def _decode_few(batch: Batch, raw: npt.NDArray[np.uint8], schema: EventSchema) -> Decoded | None:
    """The common case of a small batch — one known type, aligned, every record whole —
    without numpy reductions; None if the batch is anything else (the general path
    then decides, with the same result and errors)."""
    rows = batch.events
    type_ids: list[int] = rows["type"].tolist()
    type_id = type_ids[0]
    dtype = schema.types.get(type_id)
    if dtype is None:
        return None
    itemsize = dtype.itemsize
    end = raw.size - itemsize
    offsets: list[int] = rows["offset"].tolist()
    for offset, length, record_type in zip(offsets, rows["length"].tolist(), type_ids, strict=True):
        if record_type != type_id or offset & 7 or length < itemsize or offset > end:
            return None
    view = _every_8th_byte(raw, dtype)
    first, last = offsets[0] >> 3, offsets[-1] >> 3
    stride = ((offsets[1] >> 3) - first) if len(offsets) > 1 else 1
    if stride > 0 and all(o >> 3 == first + i * stride for i, o in enumerate(offsets)):
        events: npt.NDArray[Any] = view[first : last + 1 : stride].copy()
    else:
        events = view[np.array(offsets, dtype=np.int64) >> 3]
    out = Batch(
        events,
        batch.weights,
        source=batch.source,
        seq=batch.seq,
        read_time_ns=batch.read_time_ns,
        event_name=schema.name(type_id),
    )
    return Decoded([out])


def decode_records(batch: Batch) -> Decoded:
    """Decode a reader batch (pure). Raises TypeError if it has no raw records."""
    payload = batch.payload
    if not isinstance(payload, RawRecords):
        raise TypeError(f"batch payload is {type(payload).__name__}, not RawRecords from a reader")
    rows = batch.events
    n = len(rows)
    if n == 0:
        return Decoded([])
    raw = payload.raw
    schema = payload.schema
    if raw.ndim != 1 or raw.dtype != np.uint8:
        raise TypeError(f"raw records must be a 1-D uint8 array, got {raw.dtype}{raw.shape}")
    if n <= _FEW_RECORDS:
        few = _decode_few(batch, raw, schema)
        if few is not None:
            return few
    types = rows["type"]
    offsets = rows["offset"]
    lengths = rows["length"]
    if bool((offsets & 7).any()):
        raise ValueError("record offsets must be multiples of 8 (ring-buffer records are 8-byte aligned)")

    first_type = int(types[0])
    groups: list[tuple[int, npt.NDArray[np.bool_] | None]]
    if bool((types == first_type).all()):
        groups = [(first_type, None)]
    else:
        # The type ids present, ascending. (Not np.unique: its first call imports numpy.ma,
        # a 14-450 ms stall in the middle of a run.)
        groups = [(t, types == t) for t in np.flatnonzero(np.bincount(types)).tolist()]

    out: list[Batch] = []
    malformed = 0
    malformed_weight = 0.0
    for type_id, member in groups:
        dtype = schema.types.get(type_id)
        if member is None:
            sel_offsets, sel_lengths, sel_weights = offsets, lengths, batch.weights
        else:
            sel_offsets, sel_lengths, sel_weights = offsets[member], lengths[member], batch.weights[member]
        if dtype is None:
            malformed += len(sel_offsets)
            malformed_weight += float(sel_weights.sum())
            continue
        fits = sel_lengths >= dtype.itemsize
        # An offset + itemsize past the end of raw can only come from a lying length.
        fits &= sel_offsets.astype(np.int64) + dtype.itemsize <= raw.size
        if not bool(fits.all()):
            malformed += int((~fits).sum())
            malformed_weight += float(sel_weights[~fits].sum())
            sel_offsets, sel_weights = sel_offsets[fits], sel_weights[fits]
        if len(sel_offsets) == 0:
            continue
        events = _gather(raw, dtype, sel_offsets)
        out.append(
            Batch(
                events,
                sel_weights,
                source=batch.source,
                seq=batch.seq,
                read_time_ns=batch.read_time_ns,
                event_name=schema.name(type_id),
            )
        )
    return Decoded(out, malformed, malformed_weight)


def bad_strings(events: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Per event: whether a char-array field has no NUL within it, or text before its
    first NUL that is not valid UTF-8 (the ``strict`` parser's rule; pure)."""
    bad = np.zeros(len(events), dtype=bool)
    fields: Mapping[str, Any] = events.dtype.fields or {}
    for name in events.dtype.names or ():
        dtype = fields[name][0]
        if dtype.kind != "S" or not len(events):
            continue
        width = dtype.itemsize
        raw = np.ascontiguousarray(events[name]).view(np.uint8).reshape(len(events), width)
        nul = raw == 0
        terminated = nul.any(axis=1)
        bad |= ~terminated
        text_end = np.where(terminated, nul.argmax(axis=1), width)
        non_ascii = ((raw >= 0x80) & (np.arange(width) < text_end[:, None])).any(axis=1) & ~bad
        for i in np.flatnonzero(non_ascii).tolist():
            try:
                raw[i, : text_end[i]].tobytes().decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
    return bad


class DecoderConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    parser: Literal["lenient", "strict"] | None = None
    """Which checks decoded events must pass (module docstring); unset:
    ``strict`` when ``feature_flags.new_parser`` is on, else ``lenient``."""


class Decoder(Stage):
    """Raw ring-buffer records in, one typed batch per event type out."""

    Config = DecoderConfig
    config: DecoderConfig = DecoderConfig(parser="lenient")
    """The resolved config (the class's own: the lenient parser, for a decoder used
    without being constructed, e.g. only for :meth:`process`)."""
    strict_rejected_events = 0

    @classmethod
    def resolve_config(cls, config: DecoderConfig, settings: pipeline.Config) -> DecoderConfig:
        if config.parser is not None:
            return config
        return DecoderConfig(parser="strict" if settings.feature_flags.new_parser else "lenient")

    def __init__(self, config: DecoderConfig, ctx: StageContext) -> None:
        super().__init__(self.resolve_config(config, ctx.settings), ctx)
        self.strict_rejected_events = 0

    def reconfigure(self, config: DecoderConfig) -> None:
        """Switch parsers while running (a config reload): from the next batch on."""
        self.config = self.resolve_config(config, self.ctx.settings)

    def _checked(self, batch: Batch) -> Batch | None:
        """``batch`` less what the strict parser rejects (recorded); as is when lenient."""
        if self.config.parser != "strict" or batch.event_name == HEARTBEAT_EVENT:
            return batch
        bad = bad_strings(batch.events)
        rejected = int(np.count_nonzero(bad))
        if not rejected:
            return batch
        self.strict_rejected_events += rejected
        self.ctx.drop(rejected, float(batch.weights[bad].sum()), reason="malformed")
        return batch.select(~bad) if rejected < len(batch) else None

    def process(self, batch: Batch) -> Batch | None:
        """Decode a batch that holds (at most) one event type; other batches come back
        unchanged.

        For callers that want exactly one batch back (e.g. a wrapping stage); the
        pipeline uses :meth:`run`, which also fans out batches with several types.
        Raises ValueError for such a batch: use :func:`decode_records`.
        """
        if not isinstance(batch.payload, RawRecords):
            return batch
        decoded = decode_records(batch)
        if len(decoded.batches) > 1:
            raise ValueError(
                f"batch holds {len(decoded.batches)} event types; Decoder.process returns one "
                "batch — use decode_records() (Decoder.run sends one batch per type)"
            )
        return self._checked(decoded.batches[0]) if decoded.batches else None

    async def run(
        self,
        rx: BatchReceiver,
        tx: BatchSender,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        ctx = self.ctx
        task_status.started()
        async for batch in rx:
            if not isinstance(batch.payload, RawRecords):
                await tx.send(batch)
                continue
            try:
                decoded = decode_records(batch)
            except Exception as exc:
                ctx.error(exc, "decode")
                ctx.drop_batch(batch, reason="error")
                continue
            if decoded.malformed:
                ctx.drop(decoded.malformed, decoded.malformed_weight, reason="malformed")
            for out in decoded.batches:
                checked = self._checked(out)
                if checked is not None:
                    await tx.send(checked)


# -- per-event views ----------------------------------------------------------------------


def _c_string(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return _c_string(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):  # a sub-array field of np.void.item()
        return _plain(value.tolist())
    return value


def _field_type(dtype: np.dtype[Any]) -> Any:
    if dtype.subdtype is not None:
        return list[Any]
    if dtype.names is not None:
        return dict[str, Any]
    return {"S": str, "U": str, "f": float, "b": bool, "V": bytes}.get(dtype.kind, int)


def _converter(dtype: np.dtype[Any]) -> Callable[[Any], Any] | None:
    if dtype.subdtype is not None or dtype.names is not None:
        return _plain
    return _c_string if dtype.kind == "S" else None


@dataclass(frozen=True, slots=True)
class _ViewPlan:
    cls: type[msgspec.Struct]
    converters: tuple[tuple[int, Callable[[Any], Any]], ...]


@functools.lru_cache(maxsize=256)
def _plan(dtype: np.dtype[Any], name: str) -> _ViewPlan:
    if dtype.names is None or dtype.fields is None:
        raise TypeError(f"event dtype must be structured, got {dtype}")
    field_dtypes = [dtype.fields[field][0] for field in dtype.names]
    cls = msgspec.defstruct(
        name,
        [(field, _field_type(d)) for field, d in zip(dtype.names, field_dtypes, strict=True)],
        frozen=True,
        module=__name__,
    )
    converters = tuple((i, conv) for i, d in enumerate(field_dtypes) if (conv := _converter(d)) is not None)
    return _ViewPlan(cls, converters)


def event_struct(dtype: np.dtype[Any], name: str = "Event") -> type[msgspec.Struct]:
    """A frozen ``msgspec.Struct`` class with one field per field of ``dtype``, in
    order (cached: one class per dtype and name). C strings become ``str``."""
    return _plan(dtype, name).cls


def event_view(record: np.void, name: str = "Event") -> msgspec.Struct:
    """One event (``batch.events[i]``) as a ``msgspec.Struct``: about 1 µs."""
    plan = _plan(record.dtype, name)
    values = list(record.item())
    for i, convert in plan.converters:
        values[i] = convert(values[i])
    return plan.cls(*values)


def event_views(batch: Batch, name: str = "Event") -> list[msgspec.Struct]:
    """Every event of a decoded batch as a ``msgspec.Struct``: about 0.4 µs per event."""
    events = batch.events
    plan = _plan(events.dtype, name)
    names = events.dtype.names or ()
    columns = [events[field].tolist() for field in names]
    for i, convert in plan.converters:
        columns[i] = [convert(v) for v in columns[i]]
    cls = plan.cls
    return [cls(*values) for values in zip(*columns, strict=True)]
