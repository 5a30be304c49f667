"""Event dtypes from ctypes layouts (``bpf.layout``): no root, no bcc, no kernel.

bcc hands the loader each event struct as a ctypes ``Structure`` with clang's
layout; these tests build such Structures by hand (ctypes lays them out by the
same C ABI) and check the derived numpy dtypes against numpy's own view:
offsets, itemsize, names, and bytes written by ctypes read back through numpy.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from bpf.layout import SchemaError, dtype_from_ctypes, event_layout


class bpfpipe_hdr(ctypes.Structure):  # named like the C struct, as bcc names it
    _fields_ = [
        ("type", ctypes.c_uint16),
        ("cpu", ctypes.c_uint16),
        ("rate", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
    ]


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int32), ("y", ctypes.c_int32)]


class Value(ctypes.Union):
    _fields_ = [("u", ctypes.c_uint64), ("bytes", ctypes.c_uint8 * 8)]


class Event(ctypes.Structure):
    _fields_ = [
        ("hdr", bpfpipe_hdr),
        ("flag", ctypes.c_uint8),  # then 3 bytes of implicit padding
        ("pid", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
        ("initial", ctypes.c_char),
        ("__pad_0", ctypes.c_uint8 * 3),  # bcc's name for the padding clang inserts
        ("where", Point),
        ("samples", ctypes.c_uint32 * 4),
        ("grid", (ctypes.c_uint16 * 3) * 2),
        ("value", Value),
        ("delta", ctypes.c_int64),
        ("last", ctypes.c_uint8),  # then 7 bytes of tail padding
    ]


def offsets(dtype: np.dtype[Any]) -> dict[str, int]:
    assert dtype.fields is not None
    return {name: spec[1] for name, spec in dtype.fields.items()}


def test_header_fields_keep_their_names_and_clang_offsets() -> None:
    dtype = dtype_from_ctypes(bpfpipe_hdr, "struct bpfpipe_hdr")
    assert dtype.names == ("type", "cpu", "rate", "ts_ns")
    assert offsets(dtype) == {"type": 0, "cpu": 2, "rate": 4, "ts_ns": 8}
    assert dtype.itemsize == 16
    assert dtype == np.dtype([("type", "<u2"), ("cpu", "<u2"), ("rate", "<u4"), ("ts_ns", "<u8")])


def test_event_is_flattened_with_ctypes_offsets_and_size() -> None:
    dtype = dtype_from_ctypes(Event, "event 'test'")
    assert dtype.names == (
        "type",
        "cpu",
        "rate",
        "ts_ns",
        "flag",
        "pid",
        "comm",
        "initial",
        "where_x",
        "where_y",
        "samples",
        "grid",
        "value",
        "delta",
        "last",
    )
    expected = {name: getattr(Event, name).offset for name, *_ in Event._fields_ if not name.startswith("__")}
    flat = offsets(dtype)
    for member in ("flag", "pid", "comm", "initial", "samples", "grid", "value", "delta", "last"):
        assert flat[member] == expected[member], member
    assert flat["pid"] == 20  # after the header (16), the u8 and 3 bytes of padding
    assert flat["where_x"] == expected["where"] and flat["where_y"] == expected["where"] + 4
    assert dtype.itemsize == ctypes.sizeof(Event) == 104  # includes the tail padding

    assert dtype.fields is not None
    formats = {name: spec[0] for name, spec in dtype.fields.items()}
    assert formats["comm"] == np.dtype("S16")
    assert formats["initial"] == np.dtype("S1")
    assert formats["samples"] == np.dtype(("<u4", (4,)))
    grid = np.zeros(1, dtype)["grid"]  # a 2-d array: numpy nests the sub-array dtypes
    assert (grid.shape, grid.dtype) == ((1, 2, 3), np.dtype("<u2"))
    assert formats["value"] == np.dtype("V8")  # a union stays opaque bytes
    assert formats["delta"] == np.dtype("<i8")


def test_bytes_written_by_ctypes_read_back_through_numpy() -> None:
    event = Event()
    event.hdr.type, event.hdr.cpu, event.hdr.rate, event.hdr.ts_ns = 7, 3, 10, 123456789
    event.flag, event.pid, event.comm, event.initial = 1, 4242, b"python3", b"p"
    event.where.x, event.where.y = -5, 9
    event.samples[:] = [1, 2, 3, 4]
    for row in range(2):
        for column in range(3):
            event.grid[row][column] = 10 * row + column
    event.value.u = 0x0102030405060708
    event.delta, event.last = -1, 255

    record = np.frombuffer(bytes(event), dtype_from_ctypes(Event, "event 'test'"), count=1)[0]
    assert (record["type"], record["cpu"], record["rate"], record["ts_ns"]) == (7, 3, 10, 123456789)
    assert (record["flag"], record["pid"], record["comm"], record["initial"]) == (1, 4242, b"python3", b"p")
    assert (record["where_x"], record["where_y"]) == (-5, 9)
    assert record["samples"].tolist() == [1, 2, 3, 4]
    assert record["grid"].tolist() == [[0, 1, 2], [10, 11, 12]]
    assert bytes(record["value"]) == bytes(Value.from_buffer_copy(bytes(event.value)))
    assert (record["delta"], record["last"]) == (-1, 255)


def test_only_a_leading_hdr_of_the_header_struct_keeps_bare_names() -> None:
    class Pair(ctypes.Structure):
        _fields_ = [("hdr", bpfpipe_hdr), ("inner", bpfpipe_hdr)]

    class NotTheHeader(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint16)]

    class Other(ctypes.Structure):
        _fields_ = [("hdr", NotTheHeader)]

    assert dtype_from_ctypes(Pair, "pair").names == (
        *("type", "cpu", "rate", "ts_ns"),
        *("inner_type", "inner_cpu", "inner_rate", "inner_ts_ns"),
    )
    assert dtype_from_ctypes(Other, "other").names == ("hdr_type",)


def test_bit_fields_are_refused() -> None:
    class Flags(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32, 3), ("b", ctypes.c_uint32, 5)]

    with pytest.raises(ValueError, match=r"^struct flags: bit-field 'a' has no numpy equivalent$"):
        dtype_from_ctypes(Flags, "struct flags")


def test_colliding_flattened_names_are_refused() -> None:
    class Inner(ctypes.Structure):
        _fields_ = [("b", ctypes.c_uint8)]

    class Outer(ctypes.Structure):
        _fields_ = [("a", Inner), ("a_b", ctypes.c_uint8)]

    with pytest.raises(ValueError, match=r"^outer: flattened field names collide: a_b$"):
        dtype_from_ctypes(Outer, "outer")


# -- a program's events ----------------------------------------------------------------


class seq_event(ctypes.Structure):
    _fields_ = [("hdr", bpfpipe_hdr), ("seq", ctypes.c_uint64)]


class tick_event(ctypes.Structure):
    _fields_ = [("hdr", bpfpipe_hdr), ("seq", ctypes.c_uint32)]


def test_event_layout_maps_type_ids_to_dtypes_and_names() -> None:
    layout = event_layout(bpfpipe_hdr, [("seq", 1, seq_event), ("tick", 2, tick_event)])
    assert layout.header_dtype == dtype_from_ctypes(bpfpipe_hdr, "header")
    assert layout.event_names == {1: "seq", 2: "tick"}
    assert layout.event_types[1].names == ("type", "cpu", "rate", "ts_ns", "seq")
    assert layout.event_types[1].itemsize == 24
    assert layout.event_types[2].itemsize == 24  # u32 after the header, padded to 8
    assert offsets(layout.event_types[2])["seq"] == 16


def test_event_layout_refuses_what_the_reader_cannot_decode() -> None:
    class headless(ctypes.Structure):
        _fields_ = [("seq", ctypes.c_uint64), ("hdr", bpfpipe_hdr)]

    class flagged(ctypes.Structure):
        _fields_ = [("hdr", bpfpipe_hdr), ("flags", ctypes.c_uint32, 1)]

    with pytest.raises(
        SchemaError,
        match=r"^has event 'x' \(struct headless\) that does not begin with 'struct bpfpipe_hdr hdr'$",
    ):
        event_layout(bpfpipe_hdr, [("x", 1, headless)])
    with pytest.raises(SchemaError, match=r"^declares type id 1 twice \('seq', 'tick'\)$"):
        event_layout(bpfpipe_hdr, [("seq", 1, seq_event), ("tick", 1, tick_event)])
    with pytest.raises(SchemaError, match=r"^has an event numpy cannot describe: .*bit-field 'flags'"):
        event_layout(bpfpipe_hdr, [("f", 5, flagged)])


def test_layout_and_loader_import_without_bcc() -> None:
    """The pure parts, and the loader's module, must not need bcc (or root) to import."""
    code = (
        "import sys; sys.modules['bcc'] = None\n"  # any `import bcc` now raises ImportError
        "import bpf.layout, bpf.loader, bpf.programs, bpf.sizing, bpf.source\n"
        "assert 'bcc' not in {m for m, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
