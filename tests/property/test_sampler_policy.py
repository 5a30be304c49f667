"""The sampler policy's stated guarantees (see ``pipeline/sampling.py``), for random inputs.

Each adjustment period is simulated exactly: observations, then a tick at the
period boundary, so the numbers in the guarantees can be checked as stated.
The learned-capacity guarantees run the policy against :class:`Downstream`, a
fluid model of a channel and a consumer of fixed capacity.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from pipeline.sampling import (
    MAX_HOLD_FACTOR,
    ChangeReason,
    DownstreamCapacity,
    RateCapBucket,
    RateChange,
    SamplingParams,
    SamplingPolicy,
)

PERIOD = 0.5


@dataclass(frozen=True)
class Step:
    """One period's inputs."""

    fill: float
    lag_s: float
    input_per_s: float
    periods: int = 1  # how many periods long (>1: an idle gap, or a slow tick)
    consumed_per_s: float = 0.0
    """What the consumer took off the channel (0: no flows reported)."""
    sent_per_s: float = 0.0
    batch_events: float = 1.0
    lost_fraction: float = 0.0
    """Of ``input_per_s``, the part the source lost (reported as ``lost_upstream``)."""
    full_waits: int = 0
    """Times the sampler found the channel full and waited."""


fills = st.floats(min_value=0, max_value=1)
lags = st.floats(min_value=0, max_value=5)
rates = st.floats(min_value=0, max_value=1e7)
steps = st.builds(Step, fills, lags, rates, st.integers(min_value=1, max_value=3))
flow_steps = st.builds(
    Step,
    fills,
    lags,
    rates,
    st.integers(min_value=1, max_value=3),
    consumed_per_s=st.just(0.0) | st.floats(min_value=0, max_value=1e6),
    sent_per_s=st.floats(min_value=0, max_value=1e6),
    batch_events=st.floats(min_value=1, max_value=1e4),
    lost_fraction=st.floats(min_value=0, max_value=1),
)
"""Periods with random flows too: the policy may learn (any) downstream capacity."""


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
        adjust_period_s=PERIOD,
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
        self.exact_rates = [self.policy.exact_rate]
        self.reports: list[RateChange] = []

    def run(self, step: Step) -> int:
        duration = step.periods * self.p.adjust_period_s
        offered = step.input_per_s * duration
        consumed = step.consumed_per_s * duration
        self.policy.observe(
            fill=step.fill,
            lag_s=step.lag_s,
            weighted_events=offered * (1 - step.lost_fraction),
            lost_upstream=offered * step.lost_fraction,
            sent_events=step.sent_per_s * duration,
            consumed_events=consumed,
            consumed_batches=consumed / step.batch_events,
            full_waits=step.full_waits,
        )
        self.now += duration
        change = self.policy.tick(self.now)
        if change is not None:
            self.reports.append(change)
        self.rates.append(self.policy.rate)
        self.exact_rates.append(self.policy.exact_rate)
        return self.policy.rate


def quiet(p: SamplingParams, input_per_s: float = 0.0) -> Step:
    """A period with no pressure: fill and lag at the low watermarks."""
    return Step(p.low_fill, p.low_lag_s if p.high_lag_s else 0.0, input_per_s)


@given(params(), st.lists(steps | flow_steps, max_size=60))
def test_rate_stays_within_bounds(p: SamplingParams, inputs: list[Step]) -> None:
    sim = Sim(p)
    for step in inputs:
        rate = sim.run(step)
        assert isinstance(rate, int)
        assert p.min_sample_rate <= rate <= p.max_sample_rate
        # The exact rate sampled at is N, or a fraction below it: never more than a step.
        assert max(1, rate - 1) <= sim.policy.exact_rate <= rate
        assert sim.policy.gate_rate == math.floor(sim.policy.exact_rate) >= 1
        if sim.policy.capacity_per_s is None and not p.cap_per_s:  # no limit: AIMD's whole N
            assert sim.policy.exact_rate == rate


@given(params(), st.lists(steps | flow_steps, max_size=20), flow_steps)
def test_a_pressured_period_never_lowers_the_rate(p: SamplingParams, prefix: list[Step], step: Step) -> None:
    pressured = step.fill >= p.high_fill or (p.high_lag_s > 0 and step.lag_s >= p.high_lag_s)
    assume(pressured)
    sim = Sim(p)
    for s in prefix:
        sim.run(s)
    before, measured = sim.policy.rate, sim.policy.capacity.measurements
    fill_before = prefix[-1].fill if prefix else 0.0
    after = sim.run(step)
    assert after >= before
    # It rises unless the channel (full) holds fewer batches than at the last adjustment
    # (N relieves it already), or the period measured the capacity (``learned`` sets N).
    draining = step.fill >= p.high_fill and step.fill < fill_before
    assert (
        after > before
        or after == p.max_sample_rate
        or draining
        or sim.policy.capacity.measurements > measured
    )


@given(
    params(),
    st.lists(steps | flow_steps, max_size=20),
    st.floats(min_value=0, max_value=1e7),
    st.booleans(),
)
def test_rate_falls_under_sustained_pressure(
    p: SamplingParams, prefix: list[Step], rate: float, lag_alone: bool
) -> None:
    assume(p.high_lag_s > 0 or not lag_alone)
    sim = Sim(p)
    for step in prefix:
        sim.run(step)
    bound = (
        math.ceil(math.log(p.max_sample_rate) / math.log(1 / p.decrease_factor))
        if p.max_sample_rate > 1
        else 0
    )
    # A stalled consumer (it takes nothing), or lag alone: no measurement, N doubles.
    pressure = Step(p.low_fill, p.high_lag_s, rate) if lag_alone else Step(1.0, 0.0, rate)
    for _ in range(bound):
        before = sim.policy.rate
        after = sim.run(pressure)
        assert after > before or after == p.max_sample_rate
    assert sim.policy.rate == p.max_sample_rate


@given(
    capacity=st.floats(min_value=100, max_value=1e6),
    ratio=st.floats(min_value=1, max_value=2000),
    start=st.integers(min_value=0, max_value=5),
)
def test_a_period_that_measures_the_capacity_jumps_to_the_rate_that_fits(
    capacity: float, ratio: float, start: int
) -> None:
    p = SamplingParams()
    sim = Sim(p)
    for _ in range(start):
        sim.run(Step(1.0, 0.0, 0.0))  # pressure without flows: N doubles
    sim.run(Step(0.5, 0.0, 0.0))  # then a period between the watermarks: N holds
    before = sim.policy.rate
    # The consumer took `capacity` a second, in enough batches to measure; we sent more.
    sim.run(Step(1.0, 0.0, ratio * capacity, 1, capacity, 2 * capacity, capacity * PERIOD / 10))
    assert sim.policy.capacity_per_s == pytest.approx(capacity)
    fits = math.ceil(ratio / (1 - p.cap_hysteresis / 2) - 1e-9)  # h' = 0.95: half the hysteresis
    assert sim.policy.rate >= min(p.max_sample_rate, max(fits, before))
    assert sim.policy.rate <= max(fits, before + 1, 1)


@given(params(), st.lists(steps | flow_steps, max_size=30), st.floats(min_value=0, max_value=1))
def test_recovers_after_pressure_ends(p: SamplingParams, prefix: list[Step], load: float) -> None:
    sim = Sim(p)
    for step in prefix:
        sim.run(step)
    # Input at most h*C for C the cap and the learned capacity, so neither holds N up.
    limits = [c for c in (p.max_events_per_sec, sim.policy.capacity_per_s) if c]
    input_per_s = load * 0.999 * (1 - p.cap_hysteresis) * min(limits) if limits else load * 1e7
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
        # The exact rate sends more than whole N, and still no more than the cap.
        exact = sim.policy.exact_rate
        assert max(1, n - 1) <= exact <= n
        assert delivered * (1 - 1e-9) <= r2 / exact <= cap * (1 + 1e-9)


def test_cap_convergence_number_at_defaults() -> None:
    p = SamplingParams(max_events_per_sec=10_000)
    sim = Sim(p)
    for r in (100_000, 1_000_000, 3_000_000):
        sim.run(Step(0.0, 0.0, r))
        n = sim.run(Step(0.0, 0.0, r))
        assert 0.81 * 10_000 <= r / n <= 10_000
        # The exact rate: 0.95 x C where N allows it (at 100 000/s, 1 in 10 sends C itself).
        assert 0.95 * 10_000 * (1 - 1e-9) <= r / sim.policy.exact_rate <= 10_000


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


@given(params(), st.lists(steps | flow_steps, max_size=60))
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
        ({"adjust_period_s": 0.0}, "adjust_period_s"),
        ({"cap_hysteresis": 1.0}, "cap_hysteresis"),
        ({"low_lag_s": 2.0, "high_lag_s": 1.0}, "low_lag_s"),
        ({"capacity_growth": 1.0}, "capacity_growth"),
        ({"capacity_hold_periods": 0}, "capacity_hold_periods"),
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


# -- the learned capacity, against a model downstream -------------------------------------------


class Downstream:
    """A consumer of ``capacity_per_s`` events/s behind a channel of ``room`` events, fed by
    the sampler at ``offered_per_s / N`` (a fluid model, ``STEPS`` steps a period).

    When the channel is full the sampler can send no faster than the consumer takes. The
    source then either loses the rest and reports it (``reports_losses``: a ring reader
    draining) or is held back (a blocking source): the policy sees only what arrived."""

    STEPS = 10

    def __init__(
        self, capacity_per_s: float, room: float, batch: float, offered_per_s: float, reports_losses: bool
    ) -> None:
        self.capacity_per_s = capacity_per_s
        self.room = room
        self.batch = batch
        self.offered_per_s = offered_per_s
        self.reports_losses = reports_losses
        self.queue = 0.0
        self.held: list[bool] = []
        """Per period: whether the full channel held the sampler (and the source) back."""

    def period(self, sim: Sim) -> int:
        policy = sim.policy
        n = policy.exact_rate  # what the sampler samples at
        dt = sim.p.adjust_period_s / self.STEPS
        held = False
        for _ in range(self.STEPS):
            want = self.offered_per_s / n * dt
            can_take = self.capacity_per_s * dt
            sent = min(want, self.room - self.queue + can_take)
            consumed = min(can_take, self.queue + sent)
            self.queue += sent - consumed
            waited = sent < want * (1 - 1e-9)  # the channel was full: the sampler waited for room
            held = held or waited
            policy.observe(
                fill=self.queue / self.room,
                lag_s=0.0,
                weighted_events=sent * n,
                lost_upstream=(want - sent) * n if self.reports_losses else 0.0,
                sent_events=sent,
                consumed_events=consumed,
                consumed_batches=consumed / self.batch,
                full_waits=int(waited),
            )
        self.held.append(held)
        sim.now += sim.p.adjust_period_s
        change = policy.tick(sim.now)
        if change is not None:
            sim.reports.append(change)
        sim.rates.append(policy.rate)
        sim.exact_rates.append(policy.exact_rate)
        return policy.rate


@dataclass(frozen=True)
class Setting:
    capacity_per_s: float
    ratio: float
    """Offered rate / capacity."""
    room_periods: float
    """Channel room, in periods' worth of what the consumer takes."""
    batch_periods: float
    reports_losses: bool
    pressure_first: int
    """Periods of flow-less pressure before the downstream appears (N starts at 2^this)."""

    def downstream(self, p: SamplingParams) -> Downstream:
        per_period = self.capacity_per_s * p.adjust_period_s
        return Downstream(
            self.capacity_per_s,
            self.room_periods * per_period,
            self.batch_periods * per_period,
            self.ratio * self.capacity_per_s,
            self.reports_losses,
        )

    def start(self, p: SamplingParams) -> Sim:
        sim = Sim(p)
        for _ in range(self.pressure_first):
            sim.run(Step(1.0, 0.0, 0.0))
        return sim


settings_ = st.builds(
    Setting,
    capacity_per_s=st.floats(min_value=100, max_value=1e6),
    ratio=st.floats(min_value=10, max_value=800),
    room_periods=st.floats(min_value=0.01, max_value=2),
    batch_periods=st.floats(min_value=1e-3, max_value=1 / 9),
    reports_losses=st.booleans(),
    pressure_first=st.integers(min_value=0, max_value=8),
)
"""Offered 10x to 800x the capacity (so the headroom rate stays under the default bound),
channels of up to two periods' worth, batches small enough for one period to measure."""

SETTLE_PERIODS = 20
"""The stated bound on settling at defaults (10 s)."""


def band(s: Setting, p: SamplingParams) -> tuple[int, int]:
    """``[⌈r/C⌉, ⌈r/(h·C)⌉]``: what the consumer can take, down to the headroom rate."""
    return math.ceil(s.ratio * (1 - 1e-12)), math.ceil(s.ratio / (1 - p.cap_hysteresis) * (1 + 1e-12))


def settled_at(rates: list[int], lo: int, hi: int, hold: int) -> int | None:
    """The first index from which N sits still in ``[lo, hi]`` for ``hold`` periods."""
    for i in range(len(rates) - hold):
        if lo <= rates[i] <= hi and len(set(rates[i : i + hold])) == 1:
            return i
    return None


@given(settings_)
@example(  # Whole N at 10.5 x C: 1 in 12 would deliver 0.875 x C; the exact rate, 0.95 x C
    Setting(
        capacity_per_s=1000.0,
        ratio=10.5,
        room_periods=1.0,
        batch_periods=0.05,
        reports_losses=True,
        pressure_first=0,
    )
)
@example(  # AIMD doubled past the band while a blocked source hid r, then held N until relief
    Setting(
        capacity_per_s=100.0,
        ratio=395.0,
        room_periods=2.0,
        batch_periods=0.0625,
        reports_losses=False,
        pressure_first=1,
    )
)
def test_converges_to_a_learned_capacity_and_stays(s: Setting) -> None:
    p = SamplingParams()
    sim = s.start(p)
    downstream = s.downstream(p)
    rates = [downstream.period(sim) for _ in range(SETTLE_PERIODS + 400)]
    lo, hi = band(s, p)
    at = settled_at(rates, lo, hi, p.capacity_hold_periods)
    # Settles within 20 periods, in the band, and does not move for the whole hold.
    assert at is not None and at < SETTLE_PERIODS, (lo, hi, rates[:40])
    # And at the exact rate it delivers 0.9 to 1 x C over that hold (h' x C, the aim, where
    # whole N could deliver as little as 0.81 x C).
    offered = s.ratio * s.capacity_per_s
    held = sim.exact_rates[len(sim.exact_rates) - len(rates) + at :][: p.capacity_hold_periods]
    delivered = [offered / x for x in held]
    assert all(0.9 * s.capacity_per_s <= d <= s.capacity_per_s * (1 + 1e-9) for d in delivered), delivered
    # From then on, probes for more capacity send at most 10 % more than the consumer takes,
    # and one ends in the period its channel first fills: the channel never holds the
    # source back two periods in a row.
    floor = math.floor(s.ratio / PROBE_OVERSHOOT)
    assert all(floor <= n <= hi for n in rates[at:]), (floor, hi, rates)
    held = downstream.held[at:]
    assert not any(a and b for a, b in itertools.pairwise(held)), (held, rates[at:])
    # No limit cycle: probes back off. Over the last 8 x hold periods, at most two probes.
    last = rates[-MAX_HOLD_FACTOR * p.capacity_hold_periods :]
    changes = sum(a != b for a, b in itertools.pairwise(last))
    assert changes <= 2 * PROBE_CHANGES, (changes, last)


PROBE_OVERSHOOT = 1.1
"""The stated bound on a probe: the sampler sends at most this times what the consumer takes."""

PROBE_CHANGES = math.ceil(math.log(PROBE_OVERSHOOT / 0.9) / math.log(1.02)) + 2
"""Changes one probe makes at most at defaults: a step per growth period from the headroom
rate to the overshoot, and back."""


@given(settings_, st.floats(min_value=1.3, max_value=4), st.integers(min_value=0, max_value=200))
def test_finds_more_capacity(s: Setting, faster: float, later: int) -> None:
    assume(s.ratio / faster >= 10)
    p = SamplingParams()
    sim = s.start(p)
    downstream = s.downstream(p)
    for _ in range(SETTLE_PERIODS + later):
        downstream.period(sim)
    downstream.capacity_per_s *= faster
    # Whatever is left of the hold (at most 8x), then growth by 2 % a period; those are
    # relieved periods, and a probe in progress when the consumer speeds up takes up to 3 more.
    within = (
        MAX_HOLD_FACTOR * p.capacity_hold_periods
        + math.ceil(math.log(faster) / math.log(1 + p.capacity_growth))
        + 3
    )
    fits_faster = math.ceil(s.ratio / faster / (1 - p.cap_hysteresis) * (1 + 1e-12))
    rates = [downstream.period(sim) for _ in range(within)]
    assert min(rates) <= fits_faster, (fits_faster, rates)


def test_only_a_new_bound_episode_that_agrees_lengthens_the_hold() -> None:
    p = SamplingParams()
    capacity = DownstreamCapacity(p)
    # One long overload: every period is bound and measures about the same rate. That is one
    # observation, not six: the hold stays at its base (doubling each time made it 80 s, and
    # a capacity measured low while the consumer shared the CPU with the overload stood as long).
    for per_s in (45_000, 46_000, 45_500, 44_800, 45_200, 45_900):
        assert capacity.period(bound=True, consumed=per_s / 2, batches=20, elapsed=0.5)
    assert capacity.hold_periods == p.capacity_hold_periods
    # A later episode (a probe's) that finds it where it was: trust it longer.
    assert not capacity.period(bound=False, consumed=20_000, batches=20, elapsed=0.5)
    assert capacity.period(bound=True, consumed=23_000, batches=20, elapsed=0.5)
    assert capacity.hold_periods == 2 * p.capacity_hold_periods
    # One that differs by more than the tolerance starts again.
    assert not capacity.period(bound=False, consumed=20_000, batches=20, elapsed=0.5)
    assert capacity.period(bound=True, consumed=40_000, batches=20, elapsed=0.5)
    assert capacity.hold_periods == p.capacity_hold_periods


def test_finding_twice_the_capacity_takes_at_most_98_s_at_defaults() -> None:
    p = SamplingParams()
    periods = MAX_HOLD_FACTOR * p.capacity_hold_periods + math.ceil(math.log(2) / math.log(1.02))
    assert periods * p.adjust_period_s == 98.0


@given(
    rate=st.floats(min_value=1e3, max_value=1e7),
    batches_per_period=st.floats(min_value=1.5, max_value=30),
    phase=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_the_input_rate_counts_whole_batches_over_the_time_they_gathered(
    rate: float, batches_per_period: float, phase: float
) -> None:
    # A source read every T seconds (not a divisor of the period): each period catches a
    # varying whole number of batches, but each batch spans the T it gathered over.
    p = SamplingParams()
    policy = SamplingPolicy(p, now=0.0)
    gap = p.adjust_period_s / batches_per_period
    arrivals = (phase + np.arange(int(40 * batches_per_period))) * gap
    last = 0.0
    seen = []
    for t in arrivals.tolist():
        while t >= policy.due_at:
            policy.tick(policy.due_at)
            seen.append(policy.input_per_s)
        policy.observe(fill=0.0, lag_s=0.0, weighted_events=rate * (t - last), weighted_span_s=t - last)
        last = t
    assert len(seen) >= 30
    # Every period reads the rate exactly (without spans: off by up to a batch either way).
    assert seen == pytest.approx([rate] * len(seen), rel=1e-9)


def test_the_input_rate_counts_what_the_source_lost() -> None:
    policy = SamplingPolicy(SamplingParams(), now=0.0)
    policy.observe(fill=1.0, weighted_events=100, lost_upstream=900)
    change = policy.tick(0.5)
    assert change is not None
    assert change.input_per_s == 2000


def test_a_learned_capacity_is_forgotten_once_unused() -> None:
    p = SamplingParams()
    sim = Sim(p)
    # One pressured period measures 1000 events/s at 10 000/s offered: N jumps to
    # ceil(10 000 / (0.95 x 1000)) = 11.
    sim.run(Step(1.0, 0.0, 10_000, 1, 1000, 2000, 10))
    assert sim.policy.capacity_per_s == 1000
    assert sim.policy.rate == 11
    assert sim.reports[-1].reason is ChangeReason.PRESSURE
    # The input falls to what the consumer takes with headroom: N back to 1, and the
    # capacity is forgotten after capacity_hold_periods relieved periods at N = 1.
    for _ in range(11 + p.capacity_hold_periods):
        sim.run(quiet(p, 800))
    assert sim.policy.rate == 1
    assert sim.policy.capacity_per_s is None
    # Meanwhile the input rising again re-applies a capacity still known.
    sim = Sim(p)
    sim.run(Step(1.0, 0.0, 10_000, 1, 1000, 2000, 10))
    sim.run(quiet(p, 800))
    sim.run(quiet(p, 5000))
    assert sim.policy.rate == 6  # 5000 / (0.95 x 1000), no pressure needed
    assert sim.reports[-1].reason is ChangeReason.CAPACITY


# -- the rate cap's bucket ------------------------------------------------------------------------

arrivals = st.lists(
    st.tuples(st.integers(min_value=0, max_value=5000), st.floats(min_value=0, max_value=2)),
    max_size=40,
)
"""Batches: (events, seconds since the previous batch)."""


@given(
    per_s=st.floats(min_value=1e-3, max_value=1e5),
    burst_periods=st.floats(min_value=0, max_value=2),
    phase=st.floats(min_value=0, max_value=1, exclude_max=True),
    batches=arrivals,
)
def test_the_cap_holds_from_the_first_event_over_any_interval(
    per_s: float, burst_periods: float, phase: float, batches: list[tuple[int, float]]
) -> None:
    burst = max(1.0, per_s * burst_periods)
    bucket = RateCapBucket(per_s, burst, now=0.0, phase=phase)
    now, kept, times = 0.0, [], []
    for count, dt in batches:
        now += dt
        q, keep = bucket.keep(count, now)
        assert 0 <= q <= 1
        assert (keep is None) == (q == 1)
        n = count if keep is None else int(np.count_nonzero(keep))
        assert keep is None or len(keep) == count
        assert abs(n - q * count) <= 1  # (< 1 but for rounding of the carried phase)
        kept.append(n)
        times.append(now)
    # Any run of batches: at most the burst, the refill over its span, and one for the phase.
    for i, j in itertools.combinations_with_replacement(range(len(kept)), 2):
        assert sum(kept[i : j + 1]) <= burst + per_s * (times[j] - times[i]) + 1 + 1e-6


@given(
    per_s=st.floats(min_value=1, max_value=1e4),
    batches=arrivals,
)
def test_the_cap_keeps_each_event_with_probability_q(per_s: float, batches: list[tuple[int, float]]) -> None:
    # The keep fractions do not depend on the phase, and over phases spread evenly on [0, 1)
    # each event is kept in a fraction q of them (to within one phase): weights / q are unbiased.
    phases = 200
    runs = []
    for k in range(phases):
        bucket = RateCapBucket(per_s, max(1.0, per_s / 2), now=0.0, phase=k / phases)
        now, run = 0.0, []
        for count, dt in batches:
            now += dt
            q, keep = bucket.keep(count, now)
            run.append((q, np.ones(count, bool) if keep is None else keep))
        runs.append(run)
    for b in range(len(batches)):
        qs = {run[b][0] for run in runs}
        assert max(qs) - min(qs) < 1e-9
        frequency = np.mean([run[b][1] for run in runs], axis=0)
        assert np.all(np.abs(frequency - runs[0][b][0]) <= 1 / phases + 1e-9)


def test_a_cap_of_one_a_second_passes_one_event_in_the_first_half_second() -> None:
    bucket = RateCapBucket(1.0, 1.0, now=0.0, phase=0.5)
    kept = 0
    for i in range(3000):  # 3 M events in 0.5 s, in batches of 1000
        _, keep = bucket.keep(1000, i * 0.5 / 3000)
        kept += 1000 if keep is None else int(np.count_nonzero(keep))
    assert kept <= 2


def test_probing_stops_at_the_cap() -> None:
    # The consumer measured at 900/s under a cap of 1000/s: probing may find up to the cap
    # (with the 5 % headroom left below C_L), not past it: there the cap, not the consumer,
    # limits what is sent. N never falls below what sends 95 % of the cap.
    p = SamplingParams(max_events_per_sec=1000)
    sim = Sim(p)
    sim.run(Step(1.0, 0.0, 10_000, 1, 900, 1800, 9))
    assert sim.policy.capacity_per_s == 900
    sim.run(Step(p.low_fill, 0.0, 10_000, 1, 2000, 0, 10))  # the backlog drains
    for _ in range(5 * p.capacity_hold_periods):
        sim.run(quiet(p, 10_000))
        assert sim.policy.capacity_per_s is not None
        assert sim.policy.capacity_per_s <= 1000
        assert sim.policy.rate >= math.ceil(10_000 / (0.95 * 1000))
    assert sim.policy.capacity_per_s == pytest.approx(1000)


def probing(p: SamplingParams, capacity: float, offered: float) -> Sim:
    """A policy that measured ``capacity`` under ``offered`` events/s, saw the backlog drain,
    and waited out the hold: the next quiet period starts a probe."""
    sim = Sim(p)
    sim.run(Step(1.0, 0.0, offered, 1, capacity, 2 * capacity, capacity * PERIOD / 10, lost_fraction=0.9))
    assert sim.policy.capacity_per_s == pytest.approx(capacity)
    sim.run(Step(p.low_fill, 0.0, offered, 1, 2 * capacity, 0, capacity * PERIOD / 10))  # drained
    for _ in range(p.capacity_hold_periods - 1):
        sim.run(quiet(p, offered))
    assert sim.policy.capacity_per_s == pytest.approx(capacity)
    return sim


def test_a_probe_sends_what_the_grown_capacity_allows_every_period() -> None:
    # While C_L grows 2 % a period, the exact rate follows it: h' x C_L (as it was when the
    # period began) is sent each period, no whole-N step pins it (sending less) and then
    # lets it jump (sending 7 % more at once).
    p = SamplingParams()
    capacity, offered = 1000.0, 10_000.0
    sim = probing(p, capacity, offered)
    sent = []
    for _ in range(12):
        grown = sim.policy.capacity_per_s
        assert grown is not None
        sim.run(quiet(p, offered))
        sent.append(offered / sim.policy.exact_rate)
        assert sent[-1] == pytest.approx(0.95 * grown)
    assert sent[-1] > 1.2 * 0.95 * capacity  # it grew all along
    assert all(b == pytest.approx(1.02 * a) for a, b in itertools.pairwise(sent[1:]))


def test_a_probe_ends_in_the_period_the_channel_first_fills() -> None:
    # The probe sends more than the consumer takes. Its channel (a few small batches) is full
    # for moments only, so the period's mean fill stays low; the sampler waited for room,
    # which held a blocking source back. That period measures the consumer at once, and N
    # goes back to what fits it, from the complete r of the period before.
    p = SamplingParams()
    capacity, offered = 1000.0, 10_000.0
    sim = probing(p, capacity, offered)
    for _ in range(7):
        sim.run(quiet(p, offered))
    assert offered / sim.policy.exact_rate > 1.05 * capacity  # sending more than it takes
    measured = sim.policy.capacity.measurements
    held_back = 0.9 * offered  # what arrived from the blocked source
    sim.run(Step(0.1, 0.0, held_back, 1, capacity, capacity, capacity * PERIOD / 20, full_waits=3))
    assert sim.policy.capacity.measurements == measured + 1
    assert sim.policy.capacity_per_s == pytest.approx(capacity)
    assert sim.policy.rate == math.ceil(offered / (0.95 * capacity))  # r from before the hold-back
    # A probe's measurement that agrees with the last: the next hold is twice as long.
    assert sim.policy.capacity.hold_periods == 2 * p.capacity_hold_periods


def test_full_waits_outside_a_probe_measure_nothing() -> None:
    # A channel full for a moment while N holds is noise (the consumer was not busy
    # throughout): no measurement, and C_L does not grow in that period either.
    p = SamplingParams()
    sim = probing(p, 1000.0, 10_000.0)
    before = (sim.policy.capacity.measurements, sim.policy.capacity_per_s)
    sim.run(Step(0.1, 0.0, 10_000.0, 1, 950, 950, 50, full_waits=2))
    assert (sim.policy.capacity.measurements, sim.policy.capacity_per_s) == before


def test_a_blocking_source_from_the_start_doubles_n_until_r_is_seen() -> None:
    # The channel is full from the first period and the source blocks: what arrives is what
    # the consumer takes times N, nothing says what is offered. One batch fewer in the full
    # channel at a period's end is no sign N suffices: N doubles until a period is free.
    p = SamplingParams()
    sim = Sim(p)
    rates = []
    for i in range(4):
        n = sim.policy.rate
        fill = 1.0 - 0.05 * (i % 2)  # a batch more, a batch less
        sim.run(Step(fill, 0.0, 1000 * n, 1, 1000, 1000, 25, full_waits=10))
        rates.append(sim.policy.rate)
    assert rates == [2, 4, 8, 16]


def test_where_the_cap_holds_n_a_step_high_the_exact_rate_still_sends_most_of_it() -> None:
    # A burst raised the cap's N to 15; at 10 x the cap its hysteresis lets N fall only to
    # 12 (1 in 12 sends 0.83 x the cap). The exact rate is clamped to N - 1, not snapped to
    # N: 1 in 11 sends 0.91 x the cap, and never more than it.
    p = SamplingParams(max_events_per_sec=1000)
    sim = Sim(p)
    sim.run(quiet(p, 15_000))
    assert sim.policy.rate == 15
    for _ in range(5):
        sim.run(quiet(p, 10_000))
        assert sim.policy.rate == 12
        assert 0.9 * 1000 <= 10_000 / sim.policy.exact_rate <= 1000


def test_lag_past_the_high_watermark_doubles_n_even_when_the_capacity_fits() -> None:
    # A measured consumer and a complete r: N jumps to what fits the consumer. That sends no
    # more than it takes, so events already queued upstream (lag) would never catch up: while
    # the lag stays past high_lag_s, N doubles instead, to shed the backlog.
    p = SamplingParams()
    sim = Sim(p)

    def overload(lag_s: float) -> Step:
        return Step(1.0, lag_s, 10_000, 1, 1000, 2000, 50, lost_fraction=0.9)

    sim.run(overload(0.0))
    assert sim.policy.rate == 11
    sim.run(overload(0.5))
    assert sim.policy.rate == 11  # lag below high_lag_s: it fits, it holds
    sim.run(overload(1.5))
    assert sim.policy.rate == 22
