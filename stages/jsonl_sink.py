"""JSON-lines sink: one object per event, to stdout (``path = "-"``) or a file.

A line is ``{"event": <type name>, "time": <RFC 3339 UTC, ns>, <the event's
fields in dtype order>, "weight": <float>}``::

    {"event":"exec","time":"2026-12-02T18:20:00.123456789Z","type":1,"cpu":3,...,"weight":1.0}

* ``event`` is the batch's ``event_name`` (the decoder sets it from the program's
  schema); a batch without one gets no ``event`` key.
* ``time`` is the event's ``ts_ns`` (``bpf_ktime_get_ns``: CLOCK_MONOTONIC) plus
  :func:`monotonic_offset_ns`, measured once per process, so times keep the
  kernel's order and spacing (an NTP step after start does not move them). Only
  events with an integer ``ts_ns`` field get one; ``null`` when the sum falls
  outside 1970-01-01 … 2262-04-11 (a garbage timestamp). ``ts_ns`` stays as is.
* An event field already named ``event`` or ``time`` wins: that key is not added.

Encoding (:class:`JsonLinesEncoder`) is per column, not per event, in one of two
ways; the bytes are exactly those of the reference — a dict per event from
``pipeline.Batch.records()`` with ``event`` and ``time`` put in front, through
msgspec's ``encode_lines`` — either way (a property test holds us to it):

* A batch of at least ``FAST_MIN_EVENTS`` events (``FAST_MIN_EVENTS_WITH_TEXT`` if
  the type has char arrays) is written as a byte matrix by ``stages._jsonl_fast``:
  one line template per batch holding everything that is the same in every event,
  then numpy writes the digits that differ (and char arrays that need no escaping)
  into it, with no Python object per event. At 1024 events that is about a third of
  the other way's time per loadgen event (0.12-0.25 µs on the reference VM; half of
  it when a column's width varies within the batch) and about 0.8 of it per exec
  event; but it costs 60-250 µs per batch in numpy calls, so small batches do not
  take it. It declines what it cannot write exactly (a varying non-integral float, a
  char array with escapes or non-ASCII text), which then goes the other way.
* Otherwise each column becomes a Python list once per batch (char arrays decoded
  as text in one pass, times formatted by numpy for the whole batch), rows are
  msgspec structs built from those lists and encoded with one ``encode_lines``
  call: several times the speed of the reference (about 0.45-0.7 µs per loadgen
  event and 0.8 µs per exec event at 1024).

Batches are encoded in slices of ``SLICE_EVENTS`` with a checkpoint between slices,
so a huge batch does not hold the event loop.

Writing never blocks the loop for long either: a :class:`pipeline.output.LineOutput`
thread does the ``write(2)`` (an append of up to 1 MiB to a file is written inline,
while each takes under 5 ms: see there); ``write`` waits for it, so a stalled reader
of stdout is back-pressure, and signals still work. A batch is written whole or not at all (a
file that fills up is truncated back to its last whole line), so delivered events
are exactly the lines in the file. An output that is gone (EPIPE, ENOSPC, EIO)
raises ``SinkClosed``: the pipeline stops and records the rest as ``output closed``.
"""

from __future__ import annotations

import functools
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import trio

from pipeline import Batch, BatchSink, ConfigError, LineOutput, StageContext, appendable_problem
from pipeline import Config as Settings

from ._jsonl_fast import Slot, encode_lines, second_prefixes, slots_for, valid_ts_range

__all__ = [
    "EVENT_KEY",
    "FAST_MIN_EVENTS",
    "FAST_MIN_EVENTS_WITH_TEXT",
    "SLICE_EVENTS",
    "TIME_KEY",
    "JsonLinesConfig",
    "JsonLinesEncoder",
    "JsonLinesSink",
    "monotonic_offset_ns",
    "rfc3339_times",
]

SLICE_EVENTS = 65536
"""Events encoded between two checkpoints."""
FAST_MIN_EVENTS = 256
"""From this many events on, a batch of numbers is encoded as a byte matrix
(``stages._jsonl_fast``): its fixed cost (about 60-120 µs of numpy calls) is then paid
back. Measured break-even: about 150-250 events."""
FAST_MIN_EVENTS_WITH_TEXT = 1024
"""The same for a dtype with char arrays (exec events): more columns vary, so about
250 µs of fixed cost; break-even near 500 events."""

EVENT_KEY = "event"
"""The key naming an event's type (from ``Batch.event_name``)."""
TIME_KEY = "time"
"""The key of an event's wall-clock time (from its ``ts_ns``)."""

_SIMPLE_KINDS = frozenset("biuf")
_INT64_MAX = (1 << 63) - 1

# "YYYY-MM-DDTHH:MM:SS" + ".mmm" + "uuu" + "nnnZ": 30 characters, no padding, so an
# array of these records is also an array of 30-character strings.
_TIME_LAYOUT = np.dtype([("seconds", "U19"), ("millis", "U4"), ("micros", "U3"), ("nanos", "U4")])
_MILLIS = np.array([f".{i:03d}" for i in range(1000)], dtype="U4")
_MICROS = np.array([f"{i:03d}" for i in range(1000)], dtype="U3")
_NANOS = np.array([f"{i:03d}Z" for i in range(1000)], dtype="U4")


@functools.cache
def monotonic_offset_ns() -> int:
    """Nanoseconds to add to a CLOCK_MONOTONIC time (the kernel's ``bpf_ktime_get_ns``,
    Python's ``time.monotonic_ns``) to get Unix time. Measured once per process (the
    first call), between two monotonic readings."""
    before = time.monotonic_ns()
    wall = time.time_ns()
    after = time.monotonic_ns()
    return wall - (before + after) // 2


def rfc3339_times(ts_ns: npt.NDArray[Any], offset_ns: int) -> list[str | None]:
    """``ts_ns + offset_ns`` as RFC 3339 UTC strings with nanoseconds
    (``2026-12-02T18:20:00.123456789Z``), ``None`` where the sum is outside
    ``[0, 2**63)``. ``ts_ns`` is an integer array. Vectorised past ``_FEW_TIMES``
    events (about 70 ns per event, most of it making the Python strings, plus some
    fifteen numpy calls); a smaller batch in a Python loop (:func:`_rfc3339_few`)."""
    n = len(ts_ns)
    if n == 0:
        return []
    if n <= _FEW_TIMES:
        return _rfc3339_few(ts_ns.tolist(), offset_ns)
    return _rfc3339_vectorised(ts_ns, offset_ns)


def _rfc3339_few(ts_ns: list[int], offset_ns: int) -> list[str | None]:
    """:func:`rfc3339_times` of a list (the same strings): each second is formatted
    once, and a time within it needs one subtraction and one ``str``. The last second
    formatted is kept for the next call: at a trickle most batches fall within it (100
    times 0-100 ms old, one call every 100 ms: 176-180 µs → 144-145, median)."""
    global _last_second
    out: list[str | None] = []
    append = out.append
    # [low, high): the wall times within the second `prefix` formats; below = low - 1 s,
    # so wall - below has 10 digits, the first a 1.
    low, high, prefix = _last_second
    below = low - 1_000_000_000
    for t in ts_ns:
        wall = t + offset_ns
        if not low <= wall < high:
            if not 0 <= wall <= _INT64_MAX:
                append(None)
                continue
            seconds = wall // 1_000_000_000
            low = seconds * 1_000_000_000
            high = min(low + 1_000_000_000, _INT64_MAX + 1)  # the last second is cut short
            below = low - 1_000_000_000
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(seconds))
            _last_second = (low, high, prefix)
        append(f"{prefix}{str(wall - below)[1:]}Z")
    return out


_last_second: tuple[int, int, str] = (0, 0, "")
"""(low, high, prefix) of the second :func:`_rfc3339_few` formatted last (one tuple,
rebound whole: safe to share between threads)."""


_FEW_TIMES = 256
"""Up to this many times, the Python loop. Warm, numpy's fixed cost pays back from
about 100 events (best of 7: 100 events 42 µs in either; 256 events 103 µs in the
loop, 57 vectorised). But at ordinary rates the sink runs a few times a second, and
after 100 ms of sleep nothing is in cache: numpy's calls, each a different code path,
then cost more (100 events: 133-141 µs in the loop against about 240 vectorised;
median per call, one call every 100 ms)."""


def _rfc3339_vectorised(ts_ns: npt.NDArray[Any], offset_ns: int) -> list[str | None]:
    n = len(ts_ns)
    low, high = valid_ts_range(ts_ns.dtype, offset_ns)
    if low > high:
        return [None] * n
    valid = (ts_ns >= low) & (ts_ns <= high)
    all_valid = bool(valid.all())
    # Wrapping int64 arithmetic is exact wherever the true sum is in range.
    wall = ts_ns.astype(np.int64) + np.int64(offset_ns)
    if not all_valid:
        wall[~valid] = 0
    seconds, fraction = np.divmod(wall, 1_000_000_000)
    first, last = int(seconds.min()), int(seconds.max())
    span = last - first
    prefixes, which = second_prefixes(seconds, first, last)
    out = np.empty(n, dtype=_TIME_LAYOUT)
    out["seconds"] = prefixes[0] if span == 0 else prefixes[which]
    upper, nanos = np.divmod(fraction.astype(np.uint32), 1000)
    millis, micros = np.divmod(upper, 1000)
    out["millis"] = _MILLIS[millis]
    out["micros"] = _MICROS[micros]
    out["nanos"] = _NANOS[nanos]
    times: list[str | None] = out.view("U30").tolist()
    if not all_valid:
        for i in np.flatnonzero(~valid).tolist():
            times[i] = None
    return times


class JsonLinesConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    path: str = "-"
    """File to append to; ``-`` is standard output."""
    flush: bool = True
    """Kept for compatibility: every batch is written (and so visible) before ``write`` returns."""


def _text_column(column: npt.NDArray[Any]) -> list[str]:
    """A char-array column as text, as ``pipeline.Batch.records`` decodes it: up to the
    first NUL, UTF-8 with replacement. ``tolist`` strips trailing NULs in C, so a NUL
    left in the joined bytes is one inside a value: the rare slow path."""
    values: list[bytes] = column.tolist()
    joined = b"".join(values)
    if b"\0" in joined:
        return [v.split(b"\0", 1)[0].decode("utf-8", "replace") for v in values]
    if joined.isascii():
        return list(map(bytes.decode, values))
    return [v.decode("utf-8", "replace") for v in values]


def _is_simple(field: np.dtype[Any]) -> bool:
    if field.subdtype is not None or field.names is not None:
        return False
    return field.kind in _SIMPLE_KINDS or (field.kind == "S" and field.itemsize > 0)


def _has_int_timestamp(dtype: np.dtype[Any]) -> bool:
    if dtype.fields is None or "ts_ns" not in dtype.fields:
        return False
    field: np.dtype[Any] = dtype.fields["ts_ns"][0]
    return field.subdtype is None and field.kind in "iu"


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one dtype is encoded: which keys go in front, and the row struct (``None``:
    per event through ``records()``)."""

    event: bool
    time: bool
    row_type: Callable[..., Any] | None
    slots: tuple[Slot, ...] | None
    """For the byte-matrix encoder (``stages._jsonl_fast``); ``None`` with ``row_type``."""
    fast_min_events: int


class JsonLinesEncoder:
    """Batches → JSON lines, byte-identical to the per-event reference: for each dict
    of ``batch.records()``, ``{"event": ..., "time": ..., **record}`` (each of the two
    only when it applies, see the module docstring).

    Scalar fields (bool, int, float, char arrays) take the per-column paths (the byte
    matrix for large batches, msgspec row structs otherwise); a dtype with anything
    else (sub-arrays, nested records, a field named ``weight``) falls back to
    ``records()``, whose output is the definition.

    ``clock_offset_ns`` is what turns ``ts_ns`` into Unix time; by default
    :func:`monotonic_offset_ns`, the process's one measurement."""

    def __init__(self, *, clock_offset_ns: int | None = None) -> None:
        self._encoder = msgspec.json.Encoder()
        self._plans: dict[tuple[np.dtype[Any], bool], _Plan] = {}
        self.clock_offset_ns = monotonic_offset_ns() if clock_offset_ns is None else clock_offset_ns

    def encode(
        self, events: npt.NDArray[Any], weights: npt.NDArray[np.float64], event_name: str = ""
    ) -> bytes:
        """The lines of these events (all of type ``event_name``; ``""``: unnamed)."""
        plan = self._plan(events.dtype, bool(event_name))
        if plan.slots is not None and len(events) >= plan.fast_min_events:
            lines = encode_lines(events, weights, plan.slots, event_name, self.clock_offset_ns)
            if lines is not None:
                return lines
        return self._encode_rows(plan, events, weights, event_name)

    def _encode_rows(
        self, plan: _Plan, events: npt.NDArray[Any], weights: npt.NDArray[np.float64], event_name: str
    ) -> bytes:
        times = rfc3339_times(events["ts_ns"], self.clock_offset_ns) if plan.time else None
        if plan.row_type is None:
            rows: list[Any] = []
            for i, record in enumerate(Batch(events, weights).records()):
                head: dict[str, Any] = {}
                if plan.event:
                    head[EVENT_KEY] = event_name
                if times is not None:
                    head[TIME_KEY] = times[i]
                head.update(record)
                rows.append(head)
            return self._encoder.encode_lines(rows)
        dtype = events.dtype
        columns: list[list[Any]] = []
        if plan.event:
            columns.append([event_name] * len(events))
        if times is not None:
            columns.append(times)
        columns += [
            _text_column(events[name]) if dtype[name].kind == "S" else events[name].tolist()
            for name in dtype.names or ()
        ]
        columns.append(weights.tolist())
        return self._encoder.encode_lines(list(itertools.starmap(plan.row_type, zip(*columns, strict=True))))

    async def encode_batch(self, batch: Batch, slice_events: int = SLICE_EVENTS) -> list[bytes]:
        """The batch's lines in slices, with a checkpoint after each slice but the last."""
        events, weights = batch.events, batch.weights
        blobs = []
        for start in range(0, len(events), slice_events):
            if start:
                await trio.lowlevel.checkpoint()
            stop = start + slice_events
            blobs.append(self.encode(events[start:stop], weights[start:stop], batch.event_name))
        return blobs

    def _plan(self, dtype: np.dtype[Any], named: bool) -> _Plan:
        key = (dtype, named)
        plan = self._plans.get(key)
        if plan is None:
            names = dtype.names or ()
            event = named and EVENT_KEY not in names
            with_time = _has_int_timestamp(dtype) and TIME_KEY not in names
            simple = bool(names) and "weight" not in names
            simple = simple and all(_is_simple(dtype[n]) for n in names)
            row_type = None
            if simple:
                keys = [*([EVENT_KEY] if event else []), *([TIME_KEY] if with_time else []), *names, "weight"]
                try:
                    row_type = msgspec.defstruct(
                        "JsonLinesRow",
                        [(f"f{i}", object) for i in range(len(keys))],
                        rename={f"f{i}": key for i, key in enumerate(keys)},
                        gc=False,
                    )
                except ValueError:  # a name msgspec will not take (quotes, control characters)
                    row_type = None
            slots = None if row_type is None else slots_for(dtype, event=event, time=with_time)
            text = any(dtype[n].kind == "S" for n in names)
            fast_min_events = FAST_MIN_EVENTS_WITH_TEXT if text else FAST_MIN_EVENTS
            plan = self._plans[key] = _Plan(event, with_time, row_type, slots, fast_min_events)
        return plan


def line_ends(lines: bytes) -> npt.NDArray[np.intp]:
    """The offset just past each line of JSON-lines output: every ``b"\\n"`` ends a line
    (strings escape their newlines)."""
    return np.flatnonzero(np.frombuffer(lines, dtype=np.uint8) == 0x0A) + 1


def output_problem(path: str, *, create_parents: bool = False) -> None:
    """Raise ``ConfigError("path", ...)`` if ``path`` cannot be opened for appending."""
    if path == "-":
        return
    problem = appendable_problem(path, create_parents=create_parents)
    if problem is not None:
        raise ConfigError("path", f"cannot write: {problem}")


class JsonLinesSink(BatchSink):
    Config = JsonLinesConfig
    config: JsonLinesConfig

    def __init__(self, config: JsonLinesConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self._encoder = JsonLinesEncoder()
        self._out: LineOutput | None = None

    @classmethod
    def resolve_config(cls, config: JsonLinesConfig, settings: Settings) -> JsonLinesConfig:
        output_problem(config.path)
        return config

    def _output(self) -> LineOutput:
        if self._out is None:
            if self.config.path == "-":
                sys.stdout.flush()
                self._out = LineOutput.inherited(sys.stdout.fileno(), "stdout")
            else:
                self._out = LineOutput.open(self.config.path)
        return self._out

    async def write(self, batch: Batch) -> None:
        blobs = await self._encoder.encode_batch(batch)
        await self._output().write(blobs)

    async def aclose(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            await out.aclose()
