"""pipeline.timerfd: a one-shot CLOCK_MONOTONIC timer an epoll set can wait on."""

from __future__ import annotations

import math
import select
import time

import pytest

from pipeline.timerfd import MonotonicTimer


def readable(timer: MonotonicTimer, wait_s: float) -> bool:
    ep = select.epoll()
    try:
        ep.register(timer.fileno(), select.EPOLLIN)
        return bool(ep.poll(wait_s))
    finally:
        ep.close()


def test_fires_after_the_delay_and_stays_readable_until_set_again() -> None:
    with MonotonicTimer() as timer:
        assert not readable(timer, 0)  # a new timer is disarmed
        start = time.monotonic()
        timer.arm(0.05)
        assert not readable(timer, 0.01)
        assert readable(timer, 1.0)
        assert time.monotonic() - start >= 0.05
        assert readable(timer, 0)  # level-triggered: still readable, nothing read
        timer.arm(10.0)  # setting it again resets the expiration
        assert not readable(timer, 0.02)
        timer.disarm()
        assert not readable(timer, 0.02)


def test_a_delay_not_in_the_future_fires_at_once() -> None:
    with MonotonicTimer() as timer:
        timer.arm(-1.0)
        assert readable(timer, 0.5)
        timer.arm(0.0)
        assert readable(timer, 0.5)


def test_huge_infinite_and_nan_delays_arm_for_the_longest_delay() -> None:
    with MonotonicTimer() as timer:
        for delay in (1e12, math.inf, math.nan):
            timer.arm(delay)
            assert not readable(timer, 0.01)


def test_closed_timer_has_no_fd() -> None:
    timer = MonotonicTimer()
    timer.close()
    timer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        timer.fileno()
