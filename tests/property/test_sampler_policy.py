"""The sampler policy's stated guarantees (see ``pipeline/sampling.py``), for random inputs.

Each adjustment period is simulated exactly: observations, then a tick at the
period boundary, so the numbers in the guarantees can be checked as stated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from pipeline.sampling import ChangeReason, RateChange, SamplingParams, SamplingPolicy

PERIOD = 0.5


@dataclass(frozen=True)
class Step:
    """One period's inputs."""

    fill: float
    lag_s: float
    input_per_s: float
    periods: int = 1  # how many periods long (>1: an idle gap, or a slow tick)


fills = st.floats(min_value=0, max_value=1)
lags = st.floats(min_value=0, max_value=5)
rates = st.floats(min_value=0, max_value=1e7)
steps = st.builds(Step, fills, lags, rates, st.integers(min_value=1, max_value=3))


@st.composite
def params(draw: st.DrawFn, *, cap: bool | None = None, min_rate: int | None = None) -> SamplingParams:
    high_fill = draw(st.floats(min_value=0.05, max_value=1))
    high_lag = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    max_rate = draw(st.integers(min_value=1, max_value=5000))
    if min_rate is None:
        min_rate = draw(st.integers(min_value=1, max_value=max_rate))
    use_cap = draw(st.booleans()) if cap is None else cap
    return SamplingParams(
        min_sample_rate=min_rate,
        max_sample_rate=max(max_rate, min_rate),
        period_s=PERIOD,
        high_fill=high_fill,
        low_fill=draw(st.floats(min_value=0, max_value=high_fill, exclude_max=True)),
        high_lag_s=high_lag,
        low_lag_s=draw(st.floats(min_value=0, max_value=high_lag, exclude_max=True)) if high_lag else 0.2,
        decrease_factor=draw(st.floats(min_value=0.1, max_value=0.9)),
        increase_step=draw(st.floats(min_value=0.01, max_value=1)),
        max_events_per_sec=draw(st.floats(min_value=1, max_value=1e6)) if use_cap else 0.0,
        cap_hysteresis=draw(st.floats(min_value=0, max_value=0.5)),
    )


class Sim:
    """Drives a policy period by period on an exact clock."""

    def __init__(self, p: SamplingParams) -> None:
        self.p = p
        self.now = 1000.0
        self.policy = SamplingPolicy(p, now=self.now)
        self.rates = [self.policy.rate]
        self.reports: list[RateChange] = []

    def run(self, step: Step) -> int:
        duration = step.periods * self.p.period_s
        self.policy.observe(fill=step.fill, lag_s=step.lag_s, weighted_events=step.input_per_s * duration)
        self.now += duration
        change = self.policy.tick(self.now)
        if change is not None:
            self.reports.append(change)
        self.rates.append(self.policy.rate)
        return self.policy.rate


def quiet(p: SamplingParams, input_per_s: float = 0.0) -> Step:
    """A period with no pressure: fill and lag at the low watermarks."""
    return Step(p.low_fill, p.low_lag_s if p.high_lag_s else 0.0, input_per_s)


@given(params(), st.lists(steps, max_size=60))
def test_rate_stays_within_bounds(p: SamplingParams, inputs: list[Step]) -> None:
    sim = Sim(p)
    for step in inputs:
        rate = sim.run(step)
        assert isinstance(rate, int)
        assert p.min_sample_rate <= rate <= p.max_sample_rate


@given(params(), st.lists(steps, max_size=20), st.floats(min_value=0, max_value=1e7))
def test_rate_falls_under_sustained_pressure(p: SamplingParams, prefix: list[Step], rate: float) -> None:
    sim = Sim(p)
    for step in prefix:
        sim.run(step)
    bound = (
        math.ceil(math.log(p.max_sample_rate) / math.log(1 / p.decrease_factor))
        if p.max_sample_rate > 1
        else 0
    )
    for _ in range(bound):
        before = sim.policy.rate
        after = sim.run(Step(fill=1.0, lag_s=0.0, input_per_s=rate))
        assert after > before or after == p.max_sample_rate
    assert sim.policy.rate == p.max_sample_rate


@given(params(), st.lists(steps, max_size=30), st.floats(min_value=0, max_value=1))
def test_recovers_after_pressure_ends(p: SamplingParams, prefix: list[Step], load: float) -> None:
    sim = Sim(p)
    for step in prefix:
        sim.run(step)
    # Input at most h*C, so the cap does not hold N up.
    input_per_s = load * 0.999 * (1 - p.cap_hysteresis) * p.max_events_per_sec or load * 1e7
    bound = math.ceil(0.5 / p.increase_step) + 1
    for _ in range(bound):
        sim.run(quiet(p, input_per_s))
    assert sim.policy.rate == p.min_sample_rate


def test_recovery_at_defaults_takes_eleven_periods_from_the_top() -> None:
    p = SamplingParams()
    sim = Sim(p)
    while sim.policy.rate < p.max_sample_rate:
        sim.run(Step(1.0, 0.0, 0.0))
    path = [sim.run(quiet(p)) for _ in range(11)]  # the stated bound at defaults
    assert path[-1] == 1
    assert path == sorted(path, reverse=True)
    assert path[:7] == [19, 9, 6, 4, 3, 2, 1]  # keep fraction +0.05 a period, rounded up to 1/N
    assert all(c.reason is ChangeReason.RELIEF for c in sim.reports[-7:])


def test_an_idle_gap_counts_every_period_it_spans() -> None:
    p = SamplingParams()
    sim = Sim(p)
    while sim.policy.rate < p.max_sample_rate:
        sim.run(Step(1.0, 0.0, 0.0))
    sim.run(Step(0.0, 0.0, 0.0, periods=11))
    assert sim.policy.rate == 1


@given(
    fill=st.floats(min_value=0.2501, max_value=0.7499),
    lag=st.floats(min_value=0, max_value=0.99),
    n=st.integers(min_value=1, max_value=20),
)
def test_holds_between_the_watermarks(fill: float, lag: float, n: int) -> None:
    p = SamplingParams()
    sim = Sim(p)
    for _ in range(3):
        sim.run(Step(1.0, 0.0, 0.0))
    held = sim.policy.rate
    for _ in range(n):
        assert sim.run(Step(fill, lag, 0.0)) == held


@given(
    p=params(cap=True, min_rate=1),
    before=st.just(0.0) | st.floats(min_value=1e-6, max_value=1),
    after=st.just(0.0) | st.floats(min_value=1e-6, max_value=1),
    step_at=st.floats(min_value=0, max_value=1),
    warmup=st.integers(min_value=0, max_value=10),
)
def test_converges_to_the_cap_within_two_periods(
    p: SamplingParams, before: float, after: float, step_at: float, warmup: int
) -> None:
    cap = p.max_events_per_sec
    top = cap * p.max_sample_rate * 1.5  # also cover inputs the bound cannot cap
    r1, r2 = before * top, after * top
    sim = Sim(p)
    for _ in range(warmup):
        sim.run(Step(0.0, 0.0, r1))
    # The step lands `step_at` of the way into a period: that period sees a mix.
    sim.run(Step(0.0, 0.0, r1 * step_at + r2 * (1 - step_at)))
    for _ in range(1 + 3):  # the second period after the step, then stays there
        n = sim.run(Step(0.0, 0.0, r2))
        if r2 > cap * p.max_sample_rate:
            assert n == p.max_sample_rate
            continue
        delivered = r2 / n
        h = 1 - p.cap_hysteresis
        assert delivered <= cap * (1 + 1e-9)
        assert delivered >= h * cap * r2 / (r2 + h * cap) * (1 - 1e-9)
        if r2 <= h * cap:
            assert n == 1


def test_cap_convergence_number_at_defaults() -> None:
    p = SamplingParams(max_events_per_sec=10_000)
    sim = Sim(p)
    for r in (100_000, 1_000_000, 3_000_000):
        sim.run(Step(0.0, 0.0, r))
        n = sim.run(Step(0.0, 0.0, r))
        assert 0.81 * 10_000 <= r / n <= 10_000


def test_cap_hysteresis_stops_flapping_near_a_boundary() -> None:
    p = SamplingParams(max_events_per_sec=1000)
    sim = Sim(p)
    wobbles = [1.02, 0.99, 1.01, 0.98, 1.0] * 4  # N is 4 or 5 right at the boundary
    for wobble in wobbles:
        sim.run(Step(0.0, 0.0, 4000 * wobble))
    assert set(sim.rates[1:]) == {5}
    assert len(sim.reports) == 1
    # Without hysteresis the same input flaps.
    sim = Sim(SamplingParams(max_events_per_sec=1000, cap_hysteresis=0.0))
    for wobble in wobbles:
        sim.run(Step(0.0, 0.0, 4000 * wobble))
    assert len(sim.reports) > 5


@given(params(), st.lists(steps, max_size=60))
def test_changes_are_reported_once_per_transition(p: SamplingParams, inputs: list[Step]) -> None:
    sim = Sim(p)
    for step in inputs:
        sim.run(step)
    transitions = [(a, b) for a, b in zip(sim.rates, sim.rates[1:], strict=False) if a != b]
    assert [(c.old_rate, c.new_rate) for c in sim.reports] == transitions
    assert sim.policy.changes == len(transitions)
    for change in sim.reports:
        if change.reason is ChangeReason.PRESSURE:
            assert change.new_rate > change.old_rate
        if change.reason is ChangeReason.RELIEF:
            assert change.new_rate < change.old_rate


def test_early_ticks_do_nothing() -> None:
    policy = SamplingPolicy(SamplingParams(), now=0.0)
    policy.observe(fill=1.0, lag_s=10.0, weighted_events=1e9)
    assert policy.tick(0.49) is None
    assert policy.rate == 1
    change = policy.tick(0.5)
    assert change is not None
    assert change.reason is ChangeReason.PRESSURE
    assert (change.old_rate, change.new_rate) == (1, 2)
    assert policy.due_at == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_sample_rate": 5, "max_sample_rate": 2}, "min_sample_rate"),
        ({"low_fill": 0.9, "high_fill": 0.5}, "low_fill"),
        ({"decrease_factor": 1.0}, "decrease_factor"),
        ({"increase_step": 0.0}, "increase_step"),
        ({"period_s": 0.0}, "period_s"),
        ({"cap_hysteresis": 1.0}, "cap_hysteresis"),
        ({"low_lag_s": 2.0, "high_lag_s": 1.0}, "low_lag_s"),
    ],
)
def test_rejects_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@given(params(), st.lists(steps, min_size=1, max_size=20))
def test_lag_alone_is_pressure_unless_ignored(p: SamplingParams, prefix: list[Step]) -> None:
    assume(p.high_lag_s > 0)
    sim = Sim(p)
    for step in prefix:
        sim.run(step)
    before = sim.policy.rate
    after = sim.run(Step(fill=p.low_fill, lag_s=p.high_lag_s, input_per_s=0.0))
    assert after > before or after == p.max_sample_rate
