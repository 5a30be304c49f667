"""When the ring-buffer reader reads: :func:`stages.reader.next_read_at`, and its config."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stages.reader import RingBufferReaderConfig, next_read_at

BUDGET_S = 0.05


def read_at(pending: int, threshold: int, *, now: float = 10.02, last_read: float = 10.0) -> float:
    return next_read_at(
        now=now,
        last_read=last_read,
        pending_bytes=pending,
        threshold_bytes=threshold,
        max_batch_delay_s=BUDGET_S,
    )


def test_below_the_threshold_waits_until_the_budget_after_the_last_read():
    assert read_at(0, 4096) == pytest.approx(10.05)
    assert read_at(100, 4096) == pytest.approx(10.05)  # (a kernel wake-up is read at once: the reader)


def test_at_or_past_the_threshold_reads_at_once():
    assert read_at(4096, 4096) == 10.02
    assert read_at(60_000, 4096) == 10.02


def test_past_the_budget_reads_at_once():
    assert read_at(8, 4096, now=10.2) <= 10.2


def test_without_moderation_reads_whatever_is_pending_and_otherwise_waits_for_a_wakeup():
    assert read_at(8, 0) == 10.02
    assert read_at(0, 0) == math.inf


@given(
    last_read=st.floats(0, 1e6),
    elapsed=st.floats(0, 10),
    pending=st.integers(0, 1 << 30),
    threshold=st.integers(0, 1 << 30),
    budget=st.floats(1e-3, 60),
)
def test_never_waits_past_the_budget_while_anything_is_pending(
    last_read, elapsed, pending, threshold, budget
):
    now = last_read + elapsed
    when = next_read_at(
        now=now,
        last_read=last_read,
        pending_bytes=pending,
        threshold_bytes=threshold,
        max_batch_delay_s=budget,
    )
    if pending:
        assert when <= max(now, last_read + budget)
    if pending >= threshold > 0 or (threshold == 0 and pending):
        assert when <= now


def test_config_defaults_and_bounds():
    config = RingBufferReaderConfig()
    assert (config.max_batch_delay_ms, config.wakeup_watermark) == (100.0, 0.5)
    with pytest.raises(ValueError, match="wakeup_watermark"):
        RingBufferReaderConfig(wakeup_watermark=0.95)
    for bad in ({"max_batch_delay_ms": 0}, {"wakeup_watermark": 1.0}, {"wakeup_watermark": -0.1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, RingBufferReaderConfig)
