"""The fast JSON-lines encoder writes exactly the bytes of the per-event reference.

Reference: for each dict of ``batch.records()``, ``{"event": batch.event_name,
"time": <ts_ns + offset as RFC 3339>, **record}`` (``event`` only for a named batch,
``time`` only for an integer ``ts_ns``, neither when a field already has that name),
encoded with ``msgspec.json.Encoder().encode_lines``; the time is formatted here
with ``datetime``, independently of the encoder's numpy path. Random dtypes (ints of
every width, floats incl. NaN/inf, bools, char arrays with NULs inside, invalid
UTF-8, quotes, backslashes and control bytes, nested records, ``ts_ns`` of several
types, fields named ``event``/``time``), random contents and timestamps (garbage,
near each other, far apart), named and unnamed batches; slicing must not change the
output either.

Batches large enough for the byte-matrix encoder (``stages._jsonl_fast``) get their
own strategy, built to hit its cases: integer columns of every width and byte order
that are constant, count across powers of ten (so widths change mid-batch), come in
a few runs, scatter over the whole range, or sit on the edges (``0``, ``-1``,
``10**k - 1``, ``uint64`` max, ``int64`` min); bools; integral floats up to and past
``1e16`` with a stray ``-0.0`` or ``0.5``; constant and varying weights; char arrays
that are constant, plain ASCII of varying lengths, or hold one value with an escape
or bytes after its NUL; ``ts_ns`` close together, across seconds, near digit
boundaries or partly invalid (``null`` times). Whatever the encoder declines must
fall back invisibly.
"""

from __future__ import annotations

import datetime
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import Batch
from stages.jsonl_sink import (
    FAST_MIN_EVENTS,
    FAST_MIN_EVENTS_WITH_TEXT,
    JsonLinesEncoder,
    monotonic_offset_ns,
)

REFERENCE = msgspec.json.Encoder()
INTERESTING_BYTES = b'\x00"\\\n\r\t\x01\x1f\x7f\x80\xc3\xa9\xe2\x82\xac\xff /aZ'
EPOCH = datetime.datetime(1970, 1, 1)

scalar_types = st.sampled_from(
    ["|b1", "<i1", "<u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8", ">i4", ">f8"]
)
char_types = st.integers(1, 24).map(lambda n: f"S{n}")
field_types: st.SearchStrategy[Any] = st.one_of(scalar_types, char_types)
nested_types = st.lists(field_types, min_size=1, max_size=3).map(
    lambda ts: np.dtype([(f"n{i}", t) for i, t in enumerate(ts)])
)
names = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8),
    st.sampled_from(["event", "time", "pid", "ppid", "uid", "cpu", "comm", "filename"]),
).filter(lambda n: n not in ("weight", "ts_ns"))
ts_types = st.sampled_from(["<u8", ">u8", "<i8", "<u4", "<i2", "<f8", "|b1", "S8"])
event_names = st.one_of(st.just(""), st.sampled_from(["exec", "exit", "xdp_drop"]), st.text(max_size=6))
offsets = st.one_of(st.just(monotonic_offset_ns()), st.integers(-(2**63) + 1, 2**63 - 1))


@st.composite
def dtypes(draw: st.DrawFn, *, nested: bool) -> np.dtype[Any]:
    kinds = st.one_of(field_types, nested_types) if nested else field_types
    fields = draw(st.lists(st.tuples(names, kinds), min_size=1, max_size=6, unique_by=lambda f: f[0]))
    if draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), ("ts_ns", draw(ts_types)))
    return np.dtype(fields)


def char_bytes(width: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(list(INTERESTING_BYTES)), max_size=width).map(bytes)


@st.composite
def timestamps(draw: st.DrawFn, dtype: np.dtype[Any], n: int) -> np.ndarray | None:
    """Kernel-like ``ts_ns`` (close together, maybe across a second), far apart, or
    ``None`` to keep the random bits."""
    info = np.iinfo(dtype)
    how = draw(st.sampled_from(["garbage", "close", "far"]))
    if how == "close":
        start = draw(st.integers(int(info.min), int(info.max)))
        step = draw(st.integers(0, 10**9))
        return np.clip(start + np.arange(n, dtype=object) * step, int(info.min), int(info.max)).astype(dtype)
    if how == "far":
        return np.array(
            draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=n, max_size=n)), dtype
        )
    return None


@st.composite
def batches(draw: st.DrawFn, *, nested: bool = False) -> Batch:
    dtype = draw(dtypes(nested=nested))
    n = draw(st.integers(0, 40))
    raw = draw(hnp.arrays(np.uint8, n * dtype.itemsize))
    events = np.frombuffer(raw.tobytes(), dtype=dtype).copy()  # every bit pattern: NaNs, infs, garbage
    for name in dtype.names or ():
        if dtype[name].kind == "S" and draw(st.booleans()):
            width = dtype[name].itemsize
            events[name] = draw(st.lists(char_bytes(width), min_size=n, max_size=n)) or events[name]
    if "ts_ns" in (dtype.names or ()) and dtype["ts_ns"].kind in "iu":
        ts = draw(timestamps(dtype["ts_ns"], n))
        if ts is not None:
            events["ts_ns"] = ts
    weights = draw(
        st.one_of(
            st.just(np.ones(n)),
            hnp.arrays(np.float64, n, elements=st.floats(allow_nan=False, allow_infinity=False)),
        )
    )
    return Batch(events, weights, event_name=draw(event_names))


def rfc3339(wall_ns: int) -> str | None:
    if not 0 <= wall_ns < 2**63:
        return None
    seconds, nanos = divmod(wall_ns, 10**9)
    return f"{EPOCH + datetime.timedelta(seconds=seconds):%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def reference(batch: Batch, offset_ns: int) -> bytes:
    dtype = batch.events.dtype
    names = dtype.names or ()
    timed = "ts_ns" in names and dtype["ts_ns"].kind in "iu" and "time" not in names
    named = bool(batch.event_name) and "event" not in names
    lines = []
    for record in batch.records():
        head: dict[str, Any] = {}
        if named:
            head["event"] = batch.event_name
        if timed:
            head["time"] = rfc3339(record["ts_ns"] + offset_ns)
        lines.append({**head, **record})
    return REFERENCE.encode_lines(lines)


def encode(batch: Batch, offset_ns: int) -> bytes:
    return JsonLinesEncoder(clock_offset_ns=offset_ns).encode(batch.events, batch.weights, batch.event_name)


@given(batches(), offsets)
def test_flat_batches_encode_exactly_like_the_reference(batch: Batch, offset_ns: int) -> None:
    assert encode(batch, offset_ns) == reference(batch, offset_ns)


@given(batches(nested=True), offsets)
def test_nested_records_encode_exactly_like_the_reference(batch: Batch, offset_ns: int) -> None:
    assert encode(batch, offset_ns) == reference(batch, offset_ns)


@given(batches(), offsets, st.integers(1, 7))
def test_slices_join_to_the_reference(batch: Batch, offset_ns: int, slice_events: int) -> None:
    async def encode_slices() -> list[bytes]:
        return await JsonLinesEncoder(clock_offset_ns=offset_ns).encode_batch(batch, slice_events)

    blobs = trio.run(encode_slices)
    assert len(blobs) == -(-len(batch) // slice_events)
    assert b"".join(blobs) == reference(batch, offset_ns)


def test_the_comparison_can_fail() -> None:
    """A column decoded without cutting at the first NUL would differ: the test sees bytes."""
    events = np.array([(b"ab\0cd",)], dtype=[("comm", "S8")])
    batch = Batch(events)
    wrong = REFERENCE.encode_lines([{"comm": "ab\0cd", "weight": 1.0}])
    assert encode(batch, 0) == reference(batch, 0) != wrong


def test_the_reference_formats_time_as_rfc3339_utc_with_nanoseconds() -> None:
    """Pin the reference itself, so both sides cannot drift together."""
    assert rfc3339(1_796_235_600_123_456_789) == "2026-12-02T18:20:00.123456789Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000000000Z"
    assert rfc3339(2**63 - 1) == "2262-04-11T23:47:16.854775807Z"
    assert rfc3339(-1) is None and rfc3339(2**63) is None


# -- the byte-matrix encoder (stages._jsonl_fast): large, mostly integer batches ----------

FAST_TYPES = ["<u1", "<i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", ">u8", ">i4", "|b1", "<f8", "<f4"]
PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def anchors(low: int, high: int) -> list[int]:
    """Values where the number of characters changes, and the type's ends."""
    near = [s * 10**k + d for k in range(21) for s in (1, -1) for d in (-1, 0, 1)]
    return sorted({v for v in [low, high, 0, *near] if low <= v <= high})


@st.composite
def integer_values(draw: st.DrawFn, low: int, high: int, n: int) -> list[int]:
    """Constant, counting (across powers of ten), a few runs, or scattered."""
    edge = anchors(low, high)
    base = draw(st.one_of(st.integers(low, high), st.sampled_from(edge)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from(["constant", "count", "runs", "narrow", "scattered", "edges"]))
    if shape == "constant":
        values = [base] * n
    elif shape == "count":
        step = draw(st.one_of(st.integers(-3, 3), st.sampled_from([997, 10**6, 10**9, 10**15])))
        values = [base + i * step for i in range(n)]
    elif shape == "runs":
        cuts = sorted(draw(st.lists(st.integers(0, n), min_size=1, max_size=4)))
        values = []
        for start, stop in zip([0, *cuts], [*cuts, n], strict=True):
            value, wobble = draw(st.sampled_from(edge)), draw(st.integers(0, 1))
            values += [value + (i % 3) * wobble for i in range(stop - start)]
    elif shape == "narrow":
        values = [base + int(v) for v in rng.integers(0, draw(st.sampled_from([2, 10, 100, 10**4])), n)]
    elif shape == "scattered":
        values = [
            int(v)
            for v in rng.integers(low, high, n, endpoint=True, dtype=np.uint64 if low == 0 else np.int64)
        ]
    else:
        values = [edge[i] for i in rng.integers(0, len(edge), n)]
    return [min(max(v, low), high) for v in values]


@st.composite
def char_values(draw: st.DrawFn, width: int, n: int) -> list[bytes]:
    """Constant (anything), plain ASCII of varying lengths (the fast path), or with one
    value that needs an escape or has bytes after its NUL (msgspec's path)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(st.sampled_from(["constant", "plain", "plain", "escape", "after nul"]))
    if shape == "constant":
        return [draw(char_bytes(width))] * n
    pool = [
        rng.choice(np.frombuffer(PLAIN, np.uint8), int(rng.integers(0, width + 1))).tobytes()
        for _ in range(8)
    ]
    values = [pool[i] for i in rng.integers(0, len(pool), n)]
    if shape != "plain" and n:
        odd = draw(char_bytes(width)) if shape == "escape" else b"a\0b"[:width]
        values[draw(st.integers(0, n - 1))] = odd
    return values


@st.composite
def float_values(draw: st.DrawFn, n: int) -> list[float]:
    """Integral floats (constant or not, up to and past 1e16), maybe one -0.0 or 0.5."""
    values = [float(v) for v in draw(integer_values(-(10**17), 10**17, n))]
    if n and draw(st.booleans()):
        values[draw(st.integers(0, n - 1))] = draw(
            st.sampled_from([-0.0, 0.5, 1e16, 9999999999999998.0, -1e16])
        )
    return values


@st.composite
def large_batches(draw: st.DrawFn) -> Batch:
    fields = draw(
        st.lists(
            st.tuples(names, st.one_of(st.sampled_from(FAST_TYPES), char_types)),
            min_size=1,
            max_size=6,
            unique_by=lambda f: f[0],
        )
    )
    if draw(st.booleans()):
        fields.insert(
            draw(st.integers(0, len(fields))), ("ts_ns", draw(st.sampled_from(["<u8", "<i8", ">u8", "<u4"])))
        )
    dtype = np.dtype(fields)
    text = any(dtype[name].kind == "S" for name in dtype.names or ())
    least = FAST_MIN_EVENTS_WITH_TEXT if text else FAST_MIN_EVENTS
    n = draw(st.integers(least, least + FAST_MIN_EVENTS))
    events = np.zeros(n, dtype)
    for name in dtype.names or ():
        kind = dtype[name].kind
        if kind in "iu" and name == "ts_ns":
            ts = draw(timestamps(dtype[name], n))
            info = np.iinfo(dtype[name])
            events[name] = ts if ts is not None else draw(integer_values(int(info.min), int(info.max), n))
        elif kind in "iu":
            info = np.iinfo(dtype[name])
            events[name] = draw(integer_values(int(info.min), int(info.max), n))
        elif kind == "b":
            events[name] = np.array(draw(integer_values(0, 1, n)), dtype=bool)
        elif kind == "f":
            events[name] = draw(float_values(n))
        else:
            events[name] = draw(char_values(dtype[name].itemsize, n))
    weights = draw(
        st.one_of(
            st.sampled_from([1.0, 2.0, 64.0, 1e16, 0.5]).map(lambda w: np.full(n, w)),
            float_values(n).map(lambda w: np.array(w)),
        )
    )
    return Batch(events, weights, event_name=draw(event_names))


@settings(max_examples=max(10, settings().max_examples // 2))  # each example is ~1000 events
@given(large_batches(), offsets, st.integers(FAST_MIN_EVENTS, 2 * FAST_MIN_EVENTS))
def test_large_batches_encode_exactly_like_the_reference(
    batch: Batch, offset_ns: int, slice_events: int
) -> None:
    """Large enough for the byte-matrix encoder; its refusals fall back, invisibly."""
    expected = reference(batch, offset_ns)
    assert encode(batch, offset_ns) == expected

    async def encode_slices() -> list[bytes]:
        return await JsonLinesEncoder(clock_offset_ns=offset_ns).encode_batch(batch, slice_events)

    assert b"".join(trio.run(encode_slices)) == expected


@pytest.mark.parametrize("named", [False, True])
def test_long_text_right_after_the_brace_encodes_exactly(named: bool) -> None:
    """A wide char array first and a short line: the one layout whose NUL padding could
    reach past the next line's start (the encoder then pads every row instead)."""
    rng = np.random.default_rng(3)
    words = [rng.choice(np.frombuffer(PLAIN, np.uint8), int(k)).tobytes() for k in rng.integers(0, 41, 16)]
    events = np.zeros(FAST_MIN_EVENTS_WITH_TEXT + 3, dtype=[("s", "S40"), ("n", "<i2")])
    events["s"] = [words[i] for i in rng.integers(0, len(words), len(events))]
    events["n"] = rng.integers(0, 10, len(events))
    batch = Batch(events, np.ones(len(events)), event_name="x" if named else "")
    assert encode(batch, 0) == reference(batch, 0)
