"""The pure ``drain_oldest`` policy: when a blocked reader drains, and how much.

The reader acting on it (skipping records, the ledger, the warning once per
episode) is tested in ``test_reader_drain.py``.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.drain import Drain, DrainPolicy

KiB = 1024
RING = 16 * KiB
POLICY = DrainPolicy(high_watermark=0.9, low_watermark=0.5)


@pytest.mark.parametrize(
    ("usage", "pressure", "expected"),
    [
        (0.0, False, None),  # empty
        (0.5, False, None),  # at the low watermark
        (0.86, False, None),  # between the watermarks: not yet
        (0.9, False, Drain(int(0.4 * RING), "ring full")),  # at the high watermark is past it
        (490 * 32 / RING, False, Drain(234 * 32, "ring full")),  # 490 records of 32 bytes → 256 left
        (1.0, False, Drain(RING // 2, "ring full")),  # full: down to the low watermark
        (0.0, True, None),  # pressure, but nothing to drain
        (50 * 32 / RING, True, Drain(50 * 32, "memory pressure")),  # pressure: everything
        (1.0, True, Drain(RING, "memory pressure")),  # pressure wins over "ring full"
    ],
)
def test_table(usage: float, pressure: bool, expected: Drain | None) -> None:
    assert POLICY.decide(usage, RING, memory_pressure=pressure) == expected


def test_less_than_a_byte_above_the_target_is_nothing_to_drain() -> None:
    policy = DrainPolicy(high_watermark=0.5, low_watermark=0.5 - 1 / (2 * RING))
    assert policy.decide(0.5, RING, memory_pressure=False) is None  # half a byte of excess
    assert DrainPolicy(high_watermark=0.5, low_watermark=0.25).decide(
        0.5, RING, memory_pressure=False
    ) == Drain(RING // 4, "ring full")


@pytest.mark.parametrize(("low", "high"), [(0.5, 0.5), (0.8, 0.6), (-0.1, 0.5), (0.5, 1.1)])
def test_watermarks_must_be_ordered_fractions(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="0 <= low"):
        DrainPolicy(high_watermark=high, low_watermark=low)


fractions = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def policies(draw: st.DrawFn) -> DrainPolicy:
    low = draw(st.floats(0.0, 1.0, exclude_max=True, allow_nan=False))
    high = draw(st.floats(low, 1.0, exclude_min=True, allow_nan=False))
    return DrainPolicy(high_watermark=high, low_watermark=low)


ring_sizes = st.integers(12, 32).map(lambda bits: 1 << bits)  # whole pages, a power of two


@given(policies(), ring_sizes, st.data(), st.booleans())
def test_never_more_than_the_ring_holds_and_only_with_a_reason(
    policy: DrainPolicy, size: int, data: st.DataObject, pressure: bool
) -> None:
    used = data.draw(st.integers(0, size))
    usage = used / size  # as a ring reports it
    drain = policy.decide(usage, size, memory_pressure=pressure)
    if drain is None:
        return
    assert 0 < drain.min_bytes <= used
    assert drain.reason == ("memory pressure" if pressure else "ring full")
    if pressure:
        assert drain.min_bytes == used  # everything committed


@given(policies(), ring_sizes, st.data())
def test_without_pressure_nothing_below_the_high_watermark_nor_below_the_low_one(
    policy: DrainPolicy, size: int, data: st.DataObject
) -> None:
    used = data.draw(st.integers(0, size))
    usage = used / size
    drain = policy.decide(usage, size, memory_pressure=False)
    if usage < policy.high_watermark:
        assert drain is None
    elif drain is not None:
        assert used - drain.min_bytes >= math.floor(policy.low_watermark * size)  # to the byte
        assert used - drain.min_bytes < policy.low_watermark * size + 1  # and no further off


@given(policies(), fractions, st.integers(1, 1 << 32), st.booleans())
def test_any_usage_reading_gives_at_most_usage_times_size(
    policy: DrainPolicy, usage: float, size: int, pressure: bool
) -> None:
    drain = policy.decide(usage, size, memory_pressure=pressure)
    if drain is not None:
        assert 0 < drain.min_bytes <= usage * size
    if not pressure and usage < policy.high_watermark:
        assert drain is None
