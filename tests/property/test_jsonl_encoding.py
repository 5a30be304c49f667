"""The fast JSON-lines encoder writes exactly the bytes of the per-event reference.

Reference: ``msgspec.json.Encoder().encode_lines(list(batch.records()))``. Random
dtypes (ints of every width, floats incl. NaN/inf, bools, char arrays with NULs
inside, invalid UTF-8, quotes, backslashes and control bytes, nested records) and
random contents; slicing must not change the output either.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import trio
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import Batch
from stages.jsonl_sink import JsonLinesEncoder

REFERENCE = msgspec.json.Encoder()
INTERESTING_BYTES = b'\x00"\\\n\r\t\x01\x1f\x7f\x80\xc3\xa9\xe2\x82\xac\xff /aZ'

scalar_types = st.sampled_from(
    ["|b1", "<i1", "<u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8", ">i4", ">f8"]
)
char_types = st.integers(1, 24).map(lambda n: f"S{n}")
field_types: st.SearchStrategy[Any] = st.one_of(scalar_types, char_types)
nested_types = st.lists(field_types, min_size=1, max_size=3).map(
    lambda ts: np.dtype([(f"n{i}", t) for i, t in enumerate(ts)])
)
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8).filter(
    lambda n: n != "weight"
)


@st.composite
def dtypes(draw: st.DrawFn, *, nested: bool) -> np.dtype[Any]:
    kinds = st.one_of(field_types, nested_types) if nested else field_types
    fields = draw(st.lists(st.tuples(names, kinds), min_size=1, max_size=6, unique_by=lambda f: f[0]))
    return np.dtype(fields)


def char_bytes(width: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(list(INTERESTING_BYTES)), max_size=width).map(bytes)


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
    weights = draw(
        st.one_of(
            st.just(np.ones(n)),
            hnp.arrays(np.float64, n, elements=st.floats(allow_nan=False, allow_infinity=False)),
        )
    )
    return Batch(events, weights)


def reference(batch: Batch) -> bytes:
    return REFERENCE.encode_lines(list(batch.records()))


@given(batches())
def test_flat_batches_encode_exactly_like_the_reference(batch: Batch) -> None:
    assert JsonLinesEncoder().encode(batch.events, batch.weights) == reference(batch)


@given(batches(nested=True))
def test_nested_records_encode_exactly_like_the_reference(batch: Batch) -> None:
    assert JsonLinesEncoder().encode(batch.events, batch.weights) == reference(batch)


@given(batches(), st.integers(1, 7))
def test_slices_join_to_the_reference(batch: Batch, slice_events: int) -> None:
    async def encode() -> list[bytes]:
        return await JsonLinesEncoder().encode_batch(batch, slice_events)

    blobs = trio.run(encode)
    assert len(blobs) == -(-len(batch) // slice_events)
    assert b"".join(blobs) == reference(batch)


def test_the_comparison_can_fail() -> None:
    """A column decoded without cutting at the first NUL would differ: the test sees bytes."""
    events = np.array([(b"ab\0cd",)], dtype=[("comm", "S8")])
    batch = Batch(events)
    wrong = REFERENCE.encode_lines([{"comm": "ab\0cd", "weight": 1.0}])
    assert JsonLinesEncoder().encode(batch.events, batch.weights) == reference(batch) != wrong
