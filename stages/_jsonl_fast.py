"""The JSON-lines sink's byte-matrix encoder: whole batches, no Python object per event.

Theory of operation. A line is cut into *segments* whose width is the same in every
event, separated by *variable* values whose width is not (an integer whose number of
digits varies, a bool, a ``time`` that is sometimes ``null``, a char array).

* A segment is a template repeated ``n`` times (``bytearray * n``): keys,
  punctuation, and every value that is the same in all events — the event name,
  ``type``, ``rate``, a weight of ``1.0``, the leading digits that all values of a
  column share, the date and second of a time. Only the digits that vary are then
  written, four at a time: one ``np.take`` from a table of ``"0000"`` … ``"9999"``
  per four digits per column, through a strided view of the ``n`` by ``width`` block.
* When every value has a fixed width (the common case: a counter does not pass a
  power of ten in every batch), the line is one segment and its block is the output.
* Otherwise the line lengths are summed first (segments plus each value's true
  length), so every line's start is known; then the pieces are written left to
  right at a per-event cursor, one fancy assignment of fixed-size ``void`` items per
  piece: a segment's block, or a variable value left-aligned and NUL-padded to the
  column's widest (an integer's digits moved to the front through a sliding-window
  view, a char array as its bytes). The padding spills past the value onto text
  written later — at most into the next line's first segment, which is written last.
  When a value's padding could reach further, every line gets a NUL-filled row as
  wide as the longest possible line instead, and ``tolist`` on the rows viewed as
  ``S<width>`` strips the padding in C before one ``b"".join`` (JSON never holds a
  raw NUL).

Exact by construction: integers are written in decimal; a float only when it is
constant (its text then comes from msgspec) or integral below ``1e16`` (msgspec writes
``<digits>.0`` there); a char array when constant (text from msgspec) or when it is
printable ASCII without ``"`` or ``\\`` before its first NUL and nothing after it (then
its JSON is the bytes in quotes). Anything else: ``None``, the caller uses msgspec.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = ["Slot", "encode_lines", "second_prefixes", "slots_for", "valid_ts_range"]

_INT64_MAX = (1 << 63) - 1
_NS_PER_S = 1_000_000_000
_FLOAT_INTEGRAL_LIMIT = 1e16
"""msgspec writes an integral float below this as ``<digits>.0`` (from here on: ``1e16``)."""
_DIGITS = [np.array([f"{i:0{w}d}".encode() for i in range(10**w)], dtype=f"S{w}") for w in range(1, 5)]
"""``_DIGITS[w - 1][i]``: ``i`` as ``w`` zero-padded digits."""
_SMALL = np.array([b"%d" % i for i in range(10**4)], dtype="S4").view("V4")
"""``_SMALL[i]``: ``i`` left-aligned, NUL-padded (a ``cpu``, a length)."""
_SMALL_LENGTHS = np.array([len(b"%d" % i) for i in range(10**4)], dtype=np.intp)
_POW10 = np.array([10**k for k in range(1, 20)], dtype=np.uint64)
_PREFIX_RANGE = 64
"""Up to this many distinct seconds, their date prefixes are formatted as a range (no sort);
beyond it (a garbage ``ts_ns``), via ``np.unique``."""
_BOOLS = np.array([b"false", b"true"], dtype="S5").view("V5")
_TIME_WIDTH = len(b'"2026-12-02T18:20:00.123456789Z"')
_NULL_TIME = np.frombuffer(b"null".ljust(_TIME_WIDTH, b"\0"), dtype=f"V{_TIME_WIDTH}")[0]

_encode_json = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Slot:
    """One key of a line: its JSON text (``,"key":``) and its value's source: ``kind``
    is ``event`` (the batch's name), ``time`` (from ``ts_ns``), ``weight``, or a field's
    numpy kind (``b``, ``i``, ``u``, ``f``, ``S``) with the field's ``name``."""

    key: bytes
    kind: str
    name: str = ""


def slots_for(dtype: np.dtype[Any], *, event: bool, time: bool) -> tuple[Slot, ...]:
    """The slots of a flat dtype's lines (every field a scalar or char array), in order."""
    keys = [("event", "event")] if event else []
    if time:
        keys.append(("time", "time"))
    keys += [(name, dtype[name].kind) for name in dtype.names or ()]
    keys.append(("weight", "weight"))
    return tuple(
        Slot((b"," if i else b"{") + _encode_json(key) + b":", kind, "ts_ns" if kind == "time" else key)
        for i, (key, kind) in enumerate(keys)
    )


def encode_lines(
    events: npt.NDArray[Any],
    weights: npt.NDArray[np.float64],
    slots: tuple[Slot, ...],
    event_name: str,
    offset_ns: int,
) -> bytes | None:
    """The JSON lines of these events (at least one), or ``None`` if this encoder does
    not handle them."""
    chars: dict[str, _Layout] = {}
    for slot in slots:  # the cheapest refusal first: a char array that needs escapes
        if slot.kind == "S":
            text = _chars(events[slot.name])
            if text is None:
                return None
            chars[slot.name] = text
    layout = _Layout()
    bounds: dict[str, tuple[int, int]] = {}
    for slot in slots:
        layout.text(slot.key)
        kind = slot.kind
        if kind == "event":
            layout.text(_encode_json(event_name))
        elif kind == "weight":
            if not _float(layout, weights):
                return None
        elif kind == "time":
            _time(layout, events["ts_ns"], offset_ns, bounds)
        elif kind in "iu":
            column = events[slot.name]
            _integer(layout, column, _bounds(column, slot.name, bounds))
        elif kind == "f":
            if not _float(layout, events[slot.name]):
                return None
        elif kind == "b":
            truth = events[slot.name].view(np.uint8) != 0
            if truth.all() or not truth.any():
                layout.text(b"true" if truth[0] else b"false")
            else:
                layout.variable(_BOOLS[truth.view(np.uint8)], np.where(truth, 4, 5))
        else:
            layout.extend(chars[slot.name])
    layout.text(b"}\n")
    return layout.encode(len(events))


class _Segment:
    """Text of the same width in every event: a template, and the digits and
    fixed-width texts that differ between events."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.digits: list[tuple[int, int, npt.NDArray[Any]]] = []
        """(offset, count, values below ``10**count``): zero-padded digits."""
        self.texts: list[tuple[int, npt.NDArray[Any], npt.NDArray[Any]]] = []
        """(offset, table, index): a text from a table."""

    def text(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)

    def number(self, values: npt.NDArray[Any], low: int, high: int, width: int) -> None:
        """``values`` (non-negative, in ``[low, high]``) as ``width`` zero-padded digits;
        the leading digits they all share go into the template."""
        varying = width
        while varying and low // 10 ** (varying - 1) == high // 10 ** (varying - 1):
            varying -= 1
        shared = low // 10**varying
        if width > varying:
            self.text(f"{shared:0{width - varying}d}".encode())
        if varying:
            if shared:
                values = values - values.dtype.type(shared * 10**varying)
            if varying <= 18 and values.dtype != np.int64:
                values = values.astype(np.int64)  # in range; and int64 indexes fastest
            self.digits.append((self.size, varying, values))
            self.text(b"0" * varying)

    def fill(self, n: int) -> bytearray:
        """``n`` rows of this segment, back to back."""
        stride = self.size
        buffer = bytearray(b"".join(self.parts)) * n
        for offset, table, index in self.texts:
            np.take(table, index, out=np.ndarray((n,), table.dtype, buffer, offset, (stride,)), mode="clip")
        for offset, count, values in self.digits:
            end = offset + count
            rest = values
            while end > offset:
                width = min(end - offset, 4)
                end -= width
                if end > offset:
                    upper = rest // 10_000
                    chunk = rest - upper * 10_000
                    rest = upper
                else:
                    chunk = rest
                table = _DIGITS[width - 1]
                np.take(table, chunk, out=np.ndarray((n,), table.dtype, buffer, end, (stride,)), mode="clip")
        return buffer


class _Layout:
    """A line: segments, with a variable-width value between each two."""

    def __init__(self) -> None:
        self.segments = [_Segment()]
        self.variables: list[tuple[npt.NDArray[np.void], npt.NDArray[np.intp]]] = []
        """(values left-aligned and NUL-padded, their lengths), after ``segments[i]``."""

    @property
    def segment(self) -> _Segment:
        return self.segments[-1]

    def text(self, data: bytes) -> None:
        self.segment.text(data)

    def variable(self, values: npt.NDArray[np.void], lengths: npt.NDArray[np.intp]) -> None:
        self.variables.append((values, lengths))
        self.segments.append(_Segment())

    def extend(self, other: _Layout) -> None:
        """Append ``other``'s pieces (its first segment joins our last)."""
        first, *rest = other.segments
        offset = self.segment.size
        self.segment.digits += [(offset + o, c, v) for o, c, v in first.digits]
        self.segment.texts += [(offset + o, t, i) for o, t, i in first.texts]
        self.text(b"".join(first.parts))
        self.variables += other.variables
        self.segments += rest

    def encode(self, n: int) -> bytes:
        if not self.variables:
            return bytes(self.segment.fill(n))
        head, *tail = self.segments
        behind = list(itertools.accumulate(s.size for s in reversed(tail)))[::-1]  # after each variable
        if any(
            v.dtype.itemsize > head.size + after for (v, _), after in zip(self.variables, behind, strict=True)
        ):
            return self._encode_padded(n)
        # Each line written in place, left to right; a variable's NUL padding spills at most
        # into the next line's head, which is written last.
        lengths = sum((lengths for _, lengths in self.variables), start=np.full(n, head.size + behind[0]))
        starts = np.zeros(n, dtype=np.intp)
        np.cumsum(lengths[:-1], out=starts[1:])
        size = int(starts[-1] + lengths[-1])
        lines = bytearray(size + max(v.dtype.itemsize for v, _ in self.variables))
        cursor = starts + head.size
        for (values, widths), segment in zip(self.variables, tail, strict=True):
            _window(lines, values.dtype.itemsize)[cursor] = values
            cursor += widths
            if segment.size:
                _window(lines, segment.size)[cursor] = np.frombuffer(segment.fill(n), f"V{segment.size}")
                cursor += segment.size
        if head.size:
            _window(lines, head.size)[starts] = np.frombuffer(head.fill(n), f"V{head.size}")
        del lines[size:]
        return bytes(lines)

    def _encode_padded(self, n: int) -> bytes:
        """Each line in a NUL-filled row as wide as the longest possible line, then the
        rows' NUL padding stripped by ``tolist`` (in C)."""
        width = sum(s.size for s in self.segments) + sum(v.dtype.itemsize for v, _ in self.variables)
        rows = bytearray(n * width)
        cursor = np.arange(0, n * width, width, dtype=np.intp)
        for segment, variable in itertools.zip_longest(self.segments, self.variables):
            if segment.size:
                _window(rows, segment.size)[cursor] = np.frombuffer(segment.fill(n), f"V{segment.size}")
                cursor += segment.size
            if variable is not None:
                values, lengths = variable
                _window(rows, values.dtype.itemsize)[cursor] = values
                cursor += lengths
        lines: list[bytes] = np.frombuffer(rows, f"S{width}").tolist()
        return b"".join(lines)


def _window(buffer: bytearray, size: int) -> npt.NDArray[np.void]:
    """Every ``size``-byte run of ``buffer``, indexed by its start."""
    return np.ndarray((len(buffer) - size + 1,), f"V{size}", buffer, 0, (1,))


def _left_aligned(segment: _Segment, lengths: npt.NDArray[np.intp], n: int) -> npt.NDArray[np.void]:
    """Each of the ``n`` rows of a right-aligned segment, its last ``lengths`` bytes moved
    to the front and NUL-padded to the segment's width."""
    width = segment.size
    segment.text(b"\0" * width)
    rows = segment.fill(n)
    starts = np.arange(n, dtype=np.intp) * (2 * width) + (width - lengths)
    values: npt.NDArray[np.void] = _window(rows, width)[starts]
    return values


def _bounds(column: npt.NDArray[Any], name: str, bounds: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """The column's (min, max), computed once per batch (``ts_ns`` is used twice)."""
    if name not in bounds:
        bounds[name] = (int(column.min()), int(column.max()))
    return bounds[name]


def _chars(column: npt.NDArray[Any]) -> _Layout | None:
    """A char-array column's JSON, ``None`` if it needs escapes (msgspec's job)."""
    first: bytes = column[0]
    layout = _Layout()
    if first == column[-1] and bool((column == first).all()):  # equal up to trailing NULs
        layout.text(_encode_json(first.split(b"\0", 1)[0].decode("utf-8", "replace")))
        return layout
    n = len(column)
    used = np.flatnonzero(np.bitwise_or.reduce(column[:, None].view(np.uint8), axis=0))
    width = int(used[-1]) + 2  # the longest value and a NUL: every row has one
    rows = column.astype(f"S{width}").view(np.uint8).reshape(n, width)
    nul = rows.reshape(-1) == 0
    # Bytes after a row's first NUL: a NUL followed by a non-NUL, other than at a row's end.
    if np.count_nonzero(nul[:-1] & ~nul[1:]) != np.count_nonzero(rows[1:, 0]):
        return None
    printable = rows - np.uint8(0x20) <= np.uint8(0x7E - 0x20)  # wraps below 0x20
    if np.count_nonzero(printable) + np.count_nonzero(nul) != rows.size:
        return None  # a control character or non-ASCII: escapes or replacement characters
    if np.count_nonzero((rows == ord('"')) | (rows == ord("\\"))):
        return None
    layout.text(b'"')
    layout.variable(rows.view(f"V{width}").reshape(n), np.argmax(nul.reshape(n, width), axis=1))
    layout.text(b'"')
    return layout


def _integer(layout: _Layout, column: npt.NDArray[Any], bounds: tuple[int, int]) -> None:
    low, high = bounds
    if low == high:
        layout.text(b"%d" % low)
        return
    width = len(str(high))
    if low >= 0 and len(str(low)) == width:
        values = column if high > _INT64_MAX else column.astype(np.int64)
        layout.segment.number(values, low, high, width)
        return
    width = len(str(-low))
    if high < 0 and len(str(-high)) == width:
        layout.text(b"-")
        magnitudes = np.negative(column.astype(np.int64)).view(np.uint64)  # exact, even for -2**63
        layout.segment.number(magnitudes, -high, -low, width)
        return
    # Widths vary. Small ones from a table; others right-aligned, then moved to the front.
    if low >= 0 and high < len(_SMALL):
        small = column.astype(np.intp)
        layout.variable(_SMALL[small], _SMALL_LENGTHS[small])
        return
    if column.dtype.kind == "u":
        magnitudes = column.astype(np.uint64)
        negative = None
    else:
        signed = column.astype(np.int64)
        negative = signed < 0
        magnitudes = np.where(negative, np.negative(signed).view(np.uint64), signed.view(np.uint64))
    lengths = np.searchsorted(_POW10, magnitudes, side="right") + 1
    top = max(abs(low), abs(high))
    digits = len(str(top))
    segment = _Segment()
    if negative is not None and low < 0:
        lengths += negative
        segment.text(b"\0")
    segment.number(magnitudes, 0, top, digits)
    if negative is not None and low < 0:
        width = segment.size
        values = _left_aligned(segment, lengths, len(column))
        raw = values.view(np.uint8).reshape(len(column), width)
        raw[negative, 0] = ord("-")  # over a padding zero, or the NUL slot before the digits
    else:
        values = _left_aligned(segment, lengths, len(column))
    layout.variable(values, lengths)


def _float(layout: _Layout, column: npt.NDArray[Any]) -> bool:
    """Write a float column if it is constant or integral (in msgspec's ``.0`` range)."""
    bits = column.view(f"u{column.dtype.itemsize}")
    if bits.min() == bits.max():
        layout.text(_encode_json(float(column[0])))
        return True
    values = column.astype(np.float64)
    integral = (np.abs(values) < _FLOAT_INTEGRAL_LIMIT) & (values == np.trunc(values))
    if not integral.all() or (np.signbit(values) & (values == 0)).any():  # NaN, 1.5, 1e16, -0.0
        return False
    integers = values.astype(np.int64)
    _integer(layout, integers, (int(integers.min()), int(integers.max())))
    layout.text(b".0")
    return True


def valid_ts_range(dtype: np.dtype[Any], offset_ns: int) -> tuple[int, int]:
    """The ``ts_ns`` values of this integer dtype whose ``ts_ns + offset_ns`` is a time,
    i.e. in ``[0, 2**63)`` (empty when low > high)."""
    info = np.iinfo(dtype)
    return max(-offset_ns, int(info.min)), min(_INT64_MAX - offset_ns, int(info.max))


def second_prefixes(
    seconds: npt.NDArray[np.int64], first: int, last: int
) -> tuple[npt.NDArray[np.str_], npt.NDArray[Any]]:
    """``YYYY-MM-DDTHH:MM:SS`` of each distinct second in ``seconds`` (between ``first``
    and ``last``), and which of them each element is."""
    if last - first < _PREFIX_RANGE:
        stamps = np.arange(first, last + 1, dtype=np.int64)
        which: npt.NDArray[Any] = seconds - first
    else:
        stamps, which = np.unique(seconds, return_inverse=True)
    prefixes: npt.NDArray[np.str_] = np.datetime_as_string(stamps.view("M8[s]"), unit="s")
    return prefixes, which


def _time(
    layout: _Layout, ts_ns: npt.NDArray[Any], offset_ns: int, bounds: dict[str, tuple[int, int]]
) -> None:
    """``"<RFC 3339, ns>Z"`` from ``ts_ns + offset_ns``, ``null`` outside ``[0, 2**63)``."""
    valid_low, valid_high = valid_ts_range(ts_ns.dtype, offset_ns)
    low, high = _bounds(ts_ns, "ts_ns", bounds)
    if low > valid_high or high < valid_low:
        layout.text(b"null")
        return
    # Wrapping int64 arithmetic is exact wherever the true sum is in range.
    wall = ts_ns.astype(np.int64) + np.int64(offset_ns)
    if valid_low <= low and high <= valid_high:
        _times(layout.segment, wall, low + offset_ns, high + offset_ns)
        return
    valid = (ts_ns >= valid_low) & (ts_ns <= valid_high)
    wall[~valid] = 0
    segment = _Segment()
    _times(segment, wall, int(wall.min()), int(wall.max()))
    values = np.frombuffer(segment.fill(len(wall)), f"V{_TIME_WIDTH}")  # writable: a bytearray
    values[~valid] = _NULL_TIME
    layout.variable(values, np.where(valid, _TIME_WIDTH, 4))


def _times(segment: _Segment, wall: npt.NDArray[np.int64], low: int, high: int) -> None:
    """Unix times in ``[0, 2**63)`` ns, ``low`` and ``high`` their bounds, as quoted text."""
    first, last = low // _NS_PER_S, high // _NS_PER_S
    segment.text(b'"')
    if first == last:
        segment.text(np.datetime_as_string(np.datetime64(first, "s")).encode() + b".")
        fraction = wall - np.int64(first * _NS_PER_S)
        segment.number(fraction, low - first * _NS_PER_S, high - first * _NS_PER_S, 9)
    else:
        seconds = wall // _NS_PER_S
        fraction = wall - seconds * _NS_PER_S
        prefixes, which = second_prefixes(seconds, first, last)
        segment.texts.append((segment.size, prefixes.astype("S19"), which))
        segment.text(b"0" * 19 + b".")
        segment.number(fraction, int(fraction.min()), int(fraction.max()), 9)
    segment.text(b'Z"')
