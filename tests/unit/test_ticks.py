"""pipeline.ticks: periodic work on one grid of trio's clock (timer coalescing)."""

from __future__ import annotations

import math

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from pipeline.ticks import last_tick_by, next_tick, sleep_to_next_tick

PERIODS = st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 5.0, 0.03, 0.007])


@given(now=st.floats(0, 1e7), period=PERIODS)
def test_next_tick_is_on_the_grid_and_within_one_period(now: float, period: float) -> None:
    tick = next_tick(now, period)
    assert now < tick <= now + period * (1 + 1e-9) + 1e-9
    assert math.isclose(round(tick / period) * period, tick, rel_tol=1e-9, abs_tol=1e-9)


@given(now=st.floats(0, 1e6), multiple=st.integers(1, 100))
def test_periods_that_divide_each_other_fall_due_together(now: float, multiple: int) -> None:
    # A task with period p and one with k*p: whenever the slower one is due, the fast
    # one is due at the same instant (to the ms that epoll resolves), so one wake-up.
    fast, slow = 0.05, 0.05 * multiple
    slow_tick = next_tick(now, slow)
    fast_tick = next_tick(slow_tick - 0.01, fast)
    assert abs(fast_tick - slow_tick) < 1e-6


@given(last=st.floats(0, 1e6), budget=st.floats(1e-3, 60))
def test_last_tick_by_keeps_the_budget(last: float, budget: float) -> None:
    deadline = last + budget
    tick = last_tick_by(deadline, budget, last)
    assert last < tick <= deadline


def test_last_tick_by_without_a_tick_in_the_gap_is_the_deadline() -> None:
    assert last_tick_by(10.3, 1.0, 10.2) == 10.3
    assert last_tick_by(10.3, 0.1, 10.2) == 10.3
    assert last_tick_by(10.35, 0.1, 10.2) == 10.3


async def _tick_times(periods: list[float], span_s: float) -> list[list[float]]:
    seen: list[list[float]] = [[] for _ in periods]

    async def tick(i: int, period: float) -> None:
        await trio.sleep(0.037 * i)  # started out of phase
        for _ in range(round(span_s / period)):
            await sleep_to_next_tick(period)
            seen[i].append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for i, period in enumerate(periods):
            nursery.start_soon(tick, i, period)
    return seen


def test_tasks_started_at_different_times_share_their_ticks() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    clock.jump(123.456)
    fast, slow = trio.run(_tick_times, [0.1, 0.5], 5.0, clock=clock)
    assert len(slow) == 10 and {round(t, 6) for t in slow} <= {round(t, 6) for t in fast}
    assert all(math.isclose(t / 0.5, round(t / 0.5), abs_tol=1e-6) for t in slow)
